"""What finding image rows costs, and what the correction costs, per precision (ONNX Runtime).

    python benchmarks/image_rows_cost.py                         # SmolVLM-256M text widths, CPU, 1 thread
    python benchmarks/image_rows_cost.py --pasts 512 --reps 10   # quicker
    python benchmarks/image_rows_cost.py --device cuda --threads 0 # a GPU (IO binding), fp32 and fp16

One seeded random-weight Llama with the text widths of SmolVLM-256M (the organism's: hidden
576, 30 blocks, 9 heads, 3 KV heads) takes ``inputs_embeds``, as a multimodal decoder does. Its
decoder is exported by regap-export's own exporter three times, then each graph is converted to
fp16 by ``export.precision`` (what ``export --precision fp16`` writes):

- ``uncorrected``: no correction layers;
- ``mask``: gated corrections on the middle half of the blocks (random constants whose gates lie
  in 0.2-0.8), image rows fed as the ``regap_image_mask`` input (what text graphs and
  ``positions = all`` exports take);
- ``channel``: the same corrections, image rows found from the modality channel (contract 5):
  ``inputs_embeds`` one channel wider, layer 0's key cache one channel wider, the mask built in
  the graph.

Timing: one decode step after ``--pasts`` tokens of cache and a prefill of ``--prefill``
tokens, batch 1, ``--threads`` intra-op threads (CPU; on CUDA inputs and outputs are bound on
the device once and the run synchronised); every repetition runs the variants in a freshly
shuffled order (interleaved), medians and a paired bootstrap 95 % CI of each ratio. Reported:
``channel / mask`` (the cost of finding image rows without an input: the target is <= 1.005 at a
4k context) and ``mask / uncorrected`` (the correction itself), within each precision, plus the
ops per gated layer of each graph.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit, median_and_spread, paired_bootstrap  # noqa: E402
from _synthetic import block_outputs, gated_constants, random_llama  # noqa: E402

SMOLVLM_TEXT = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49280)
VARIANTS = ("uncorrected", "mask", "channel")


def export_variants(workdir: Path, seed: int) -> dict[str, Path]:
    from regap_export.export.onnx_export import _export_decoder
    from regap_export.io.graph_metadata import IMAGE_ROWS_CHANNEL, GraphFacts, new_export_id
    from regap_export.method.folding import GATED, LayerCorrection
    from regap_export.method.rewrite import insert_corrections, remove_corrections
    from regap_export.models import adapter_for_model
    from regap_export.options import RegapOptions

    model = random_llama(**SMOLVLM_TEXT, max_positions=8192, seed=seed)
    adapter = adapter_for_model(model)
    layers = list(range(SMOLVLM_TEXT["layers"] // 4, 3 * SMOLVLM_TEXT["layers"] // 4))
    hs = block_outputs(model, adapter, tokens=64, batch=2, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    corrections = []
    for layer in layers:
        w, b, v, _ = gated_constants(hs[layer], gen)
        corrections.append(LayerCorrection(layer, GATED, v, w, b))
    paths = {}
    for name in VARIANTS:
        path = workdir / name / "decoder_model_merged.onnx"
        if path.is_file():  # --workdir of an earlier run
            paths[name] = path
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if name != "uncorrected":
            insert_corrections(model, adapter, corrections, mask_default=0.0)
        start = time.perf_counter()
        try:
            channel = name == "channel"
            graph = GraphFacts(new_export_id(), "fp32", IMAGE_ROWS_CHANNEL if channel else None)
            _export_decoder(model, adapter, path, embeds=True, readout=None, external_data=None, opset=18,
                            options=RegapOptions(), channel_positions="last+generated" if channel else None,
                            graph=graph)
        finally:
            remove_corrections(model, adapter)
        paths[name] = path
        print(f"exported {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def to_fp16(paths: dict[str, Path]) -> dict[str, Path]:
    from regap_export.export.precision import convert_graph

    out = {}
    for name, path in paths.items():
        target = path.with_name("decoder_model_merged_fp16.onnx")
        out[name] = target if target.is_file() else convert_graph(path, target, "fp16")
    return out


def feeds(sess, name: str, *, seq: int, past: int, rng) -> dict[str, np.ndarray]:
    """A decode step (seq 1) or a prefill of an image row (seq > 1), past ``past`` tokens of
    cache holding an image (channel: the flag set), every row an image row."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    out = {}
    for value in sess.get_inputs():
        dtype = types.get(value.type, np.int64)
        shape = [d if isinstance(d, int) else None for d in value.shape]
        if value.name == "inputs_embeds":
            x = rng.standard_normal((1, seq, shape[2])).astype(dtype)
            if name == "channel":
                x[..., -1] = 1.0 if seq > 1 else 0.0   # prefill: image rows; decode: a text token
            out[value.name] = x
        elif value.name == "attention_mask":
            out[value.name] = np.ones((1, past + seq), np.int64)
        elif value.name == "position_ids":
            out[value.name] = np.arange(past, past + seq, dtype=np.int64)[None]
        elif value.name == "regap_image_mask":
            out[value.name] = np.ones((1, seq), np.float32)
        elif value.name.startswith("past_key_values"):
            x = (rng.standard_normal((1, shape[1], past, shape[3])) * 0.5).astype(dtype)
            if name == "channel" and value.name == "past_key_values.0.key":
                x[..., -1] = 1.0
            out[value.name] = x
    return out


def runner(sess, inputs: dict[str, np.ndarray], device: str):
    """A no-argument callable running ``sess`` once on ``inputs`` (CUDA: bound on the device once)."""
    import onnxruntime as ort

    if device == "cpu":
        names = [o.name for o in sess.get_outputs()]
        return lambda: sess.run(names, inputs)
    binding = sess.io_binding()
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for output in sess.get_outputs():
        binding.bind_output(output.name, "cuda", 0)

    def run():
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return run


def time_cases(paths: dict[str, Path], cases: list[tuple[str, int, int]], reps: int, threads: int,
               seed: int, device: str = "cpu") -> dict[str, dict[str, list[float]]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"] if device == "cpu" else [("CUDAExecutionProvider", {"use_tf32": 0}),
                                                                   "CPUExecutionProvider"]
    sessions = {n: ort.InferenceSession(str(p), so, providers=providers) for n, p in paths.items()}
    rng = np.random.default_rng(seed)
    times: dict[str, dict[str, list[float]]] = {case: {n: [] for n in paths} for case, _, _ in cases}
    calls = {(case, n): runner(sessions[n], feeds(sessions[n], n, seq=seq, past=past, rng=rng), device)
             for case, seq, past in cases for n in paths}
    order = list(paths)
    shuffler = random.Random(seed)
    for call in calls.values():  # warm-up
        for _ in range(2):
            call()
    for _ in range(reps):
        for case, _, _ in cases:
            shuffler.shuffle(order)
            for n in order:
                start = time.perf_counter()
                calls[(case, n)]()
                times[case][n].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pasts", default="512,4096", help="decode steps after these cache lengths")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: ONNX Runtime's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the graphs here and reuse them on the next run (default: a temporary folder)")
    args = parser.parse_args()

    from regap_export.export.onnx_graph import correction_nodes

    pasts = [int(p) for p in args.pasts.split(",")]
    cases = [(f"decode past {p}", 1, p) for p in pasts] + [(f"prefill {args.prefill}", args.prefill, 0)]
    with tempfile.TemporaryDirectory(prefix="image_rows_cost_") as tmp:
        fp32 = export_variants(args.workdir or Path(tmp), args.seed)
        graphs = {}
        if "fp32" in args.precisions.split(","):
            graphs["fp32"] = fp32
        if "fp16" in args.precisions.split(","):
            graphs["fp16"] = to_fp16(fp32)
        results, rows = {}, []
        for precision, paths in graphs.items():
            ops = {n: sorted({tuple(v) for v in correction_nodes(p).values()}) for n, p in paths.items()}
            times = time_cases(paths, cases, args.reps, args.threads, args.seed, args.device)
            for case, by_variant in times.items():
                arr = {n: np.asarray(v) for n, v in by_variant.items()}
                med = {n: median_and_spread(v)["median"] for n, v in by_variant.items()}
                channel = med["channel"] / med["mask"]
                correction = med["mask"] / med["uncorrected"]
                ci_channel = paired_bootstrap(arr["mask"], arr["channel"], 2000, args.seed)
                ci_correction = paired_bootstrap(arr["uncorrected"], arr["mask"], 2000, args.seed)
                results[f"{precision} {case}"] = {"median_s": med, "channel_over_mask": channel,
                                                  "channel_ci95": ci_channel, "mask_over_uncorrected": correction,
                                                  "correction_ci95": ci_correction}
                rows.append((precision, case, f"{med['uncorrected'] * 1e3:.2f}", f"{med['mask'] * 1e3:.2f}",
                             f"{med['channel'] * 1e3:.2f}",
                             f"{channel:.4f} [{ci_channel[0]:.4f}, {ci_channel[1]:.4f}]",
                             f"{correction:.4f} [{ci_correction[0]:.4f}, {ci_correction[1]:.4f}]"))
            results[f"{precision} ops per gated layer"] = {n: [list(o) for o in v] for n, v in ops.items()}
        emit("image_rows_cost", {"shape": SMOLVLM_TEXT, "reps": args.reps, "threads": args.threads,
                                 "device": args.device, **results}, rows,
             ("precision", "case", "uncorrected ms", "mask ms", "channel ms", "channel/mask [95% CI]",
              "mask/uncorrected [95% CI]"))


if __name__ == "__main__":
    main()
