"""Corrected greedy generation on CPU: ONNX Runtime (exported graph) vs PyTorch eager.

    python benchmarks/ort_vs_torch.py [--new-tokens 48] [--repeats 5] [--export DIR]

The embedded SmolLM2-135M-Instruct (``embedded:smollm2``) with synthetic regap-mode
directions (``_synthetic.py``; probe band fixed, adaptive band gated, METHOD defaults) is
exported with ``export_to_folder`` (onnx, fp32) unless ``--export`` names an existing
export folder. Variants, same prompts (batch 1, chat template), exactly ``--new-tokens``
greedy tokens each (no EOS stop), KV cache everywhere, the same number of threads:

- ``onnxruntime``: ``runtime.generate`` on the exported ``onnx/model.onnx``;
- ``torch_reference``: the unmodified model with ``reference.reference_corrections`` (the
  hook-based parity oracle, float64 corrections), a plain greedy loop with the cache;
- ``torch_rewritten``: the model with ``rewrite.insert_corrections`` (the folded correction
  layers the exporter traces), same loop.

Every repetition runs each prompt through the variants in a shuffled order. Reported:
tokens per second (new tokens / wall time of the whole generation, prefill included),
the ratio onnxruntime / torch_reference with a paired bootstrap 95 % CI, and how many
greedy tokens ONNX Runtime and the reference agree on.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import emit, median_and_spread, paired_bootstrap, peak_rss_mib  # noqa: E402
from regap_export.models.base import cache_of, with_cache  # noqa: E402

PROMPTS = (
    "Give me three tips for keeping basil alive on a windowsill.",
    "Explain how a bicycle gear works to a ten-year-old.",
    "Write a short note thanking a colleague for their help with a report.",
    "What should I pack for a two-day hike in autumn?",
)


@torch.no_grad()
def torch_greedy(model, input_ids: torch.Tensor, new_tokens: int) -> np.ndarray:
    """Greedy decoding with the KV cache."""
    mask = torch.ones_like(input_ids)
    out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    cache = cache_of(out)
    tokens = []
    token = out.logits[:, -1].argmax(-1)
    for step in range(new_tokens):
        tokens.append(token)
        if step == new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, use_cache=True, **with_cache(model, cache))
        cache = cache_of(out)
        token = out.logits[:, -1].argmax(-1)
    return torch.stack(tokens, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--export", type=Path, default=None, help="an existing export folder (regap mode, fp32)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5, help="passes over the prompts")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: all)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)

    from _synthetic import write_directions
    from regap_export.calibration.directions_io import load_directions
    from regap_export.export.pipeline import DIRECTIONS_COPY, export_to_folder
    from regap_export.models.loading import load_model
    from regap_export.validation.reference import reference_corrections
    from regap_export.method.rewrite import insert_corrections, remove_corrections
    from regap_export.method.folding import fold
    from regap_export.runtime.generate import generate
    from regap_export.runtime.session import OrtSessions

    tmp = None
    if args.export is None:
        tmp = Path(tempfile.mkdtemp(prefix="ort_vs_torch_"))
        write_directions(args.model, tmp / "directions", mode="regap")
        t = time.perf_counter()
        export_to_folder(args.model, tmp / "directions", tmp / "export", formats=("onnx",))
        print(f"exported {args.model} in {time.perf_counter() - t:.0f} s", flush=True)
        folder = tmp / "export"
    else:
        folder = args.export
    try:
        bundle = load_directions(folder / DIRECTIONS_COPY)
        if bundle.options.mode != "regap":
            raise SystemExit(f"error: {folder} was exported in mode {bundle.options.mode}, not regap")
        loaded = load_model(args.model)
        model, adapter, tok = loaded.model, loaded.adapter, loaded.processor
        options = bundle.options.resolved(bundle.directions.num_layers)
        sessions = OrtSessions.open(folder / "onnx", "cpu", intra_op_threads=threads)
        if sessions.config["dtype"] != "float32" or sessions.has_regap_alpha:
            raise SystemExit("error: the export must be fp32 and regap (or fixed) mode")

        prompts = [adapter.render_prompt(tok, p, False) for p in PROMPTS[: args.prompts]]
        encoded = [adapter.encode(tok, [p], None)["input_ids"] for p in prompts]
        n = args.new_tokens

        def run_ort(ids):
            return generate(sessions, ids.numpy(), max_new_tokens=n, eos_token_id=[]).new_tokens

        def run_reference(ids):
            with reference_corrections(model, adapter, bundle.directions, options):
                return torch_greedy(model, ids, n)

        corrections = fold(bundle.directions, options)

        def run_rewritten(ids):
            insert_corrections(model, adapter, corrections)
            try:
                return torch_greedy(model, ids, n)
            finally:
                remove_corrections(model, adapter)

        variants = {"onnxruntime": run_ort, "torch_reference": run_reference, "torch_rewritten": run_rewritten}
        # warm-up, and the agreement check
        outputs = {name: [fn(ids) for ids in encoded] for name, fn in variants.items()}
        agree = [float((o == r).mean()) for o, r in zip(outputs["onnxruntime"], outputs["torch_reference"])]
        first_diff = []
        for o, r in zip(outputs["onnxruntime"], outputs["torch_reference"]):
            d = np.nonzero(o[0] != r[0])[0]
            first_diff.append(int(d[0]) if len(d) else None)
        for o in outputs["onnxruntime"]:
            assert o.shape == (1, n), o.shape

        times: dict[str, list[float]] = {name: [] for name in variants}
        order_rng = random.Random(args.seed)
        for rep in range(args.repeats):
            for ids in encoded:
                order = list(variants)
                order_rng.shuffle(order)
                for name in order:
                    start = time.perf_counter()
                    variants[name](ids)
                    times[name].append(time.perf_counter() - start)
        base = np.array(times["torch_reference"])
        stats, rows = {}, []
        for name in variants:
            arr = np.array(times[name])
            s = median_and_spread(list(arr))
            ratio = float(np.median(base) / np.median(arr))  # speed-up: > 1 means faster than the reference
            ci = paired_bootstrap(arr, base, args.bootstrap, args.seed) if name != "torch_reference" else (1.0, 1.0)
            stats[name] = {"seconds_per_generation": s, "tokens_per_second": n / s["median"],
                           "speedup_vs_torch_reference": ratio, "speedup_ci95": ci}
            rows.append((name, f"{n / s['median']:.1f}", f"{s['median']:.3f}", f"{s['p10']:.3f}-{s['p90']:.3f}",
                         f"{ratio:.2f}x", "-" if name == "torch_reference" else f"{ci[0]:.2f}-{ci[1]:.2f}"))
        results = {"model": args.model, "export": str(folder) if args.export else "(temporary)",
                   "mode": options.mode, "new_tokens": n, "prompts": len(encoded),
                   "prompt_tokens": [int(e.shape[1]) for e in encoded], "repeats": args.repeats,
                   "threads": threads, "variants": stats,
                   "token_agreement_ort_vs_reference": agree, "first_differing_token": first_diff,
                   "load_average": os.getloadavg(), "peak_rss_mib": peak_rss_mib()}
        emit("ort_vs_torch", results, rows, ("variant", "tokens/s", "median s", "p10-p90 s",
                                             "speed vs torch_reference", "95% CI"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
