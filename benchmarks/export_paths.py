"""Ways to export the decoder graph, side by side: the stitched export against the others.

    python benchmarks/export_paths.py                    # embedded:smollm2, regap mode, 2 repeats
    python benchmarks/export_paths.py --repeats 3 --paths stitched,every-block

Each run exports the decoder of one corrected model (synthetic directions, regap mode: probe
band fixed, adaptive band gated) in its own child process, after loading it, and reports the
seconds of the export step alone (no interpreter start, no model load), the child's peak RSS
(``os.wait4``), the graph's node count and its files' size. Paths:

- ``stitched``: what ``export`` does: one block and one correction layer of each kind traced
  with torch.onnx (dynamo), the other blocks copied (``regap_export/export/stitch.py``);
- ``every-block``: torch.onnx (dynamo) traces every block, as ``export`` did before;
- ``every-block, no decompositions``: the same with an empty decomposition table (how much of
  torch.onnx's ``run_decompositions`` step is the table, and how much the re-trace it runs);
- ``torchscript``: the legacy TorchScript exporter (``dynamo=False``, deprecated since torch 2.9;
  what optimum-onnx uses) on the same wrapper, every block. The wrapper's ``torch._check`` on the
  attention-mask length is not traceable by it and is switched off for this run; the graph is
  not folded, named or checked as ``export``'s are (the time is a lower bound).

Runs alternate between the paths (the order rotates each repeat); medians and ranges.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _common import emit  # noqa: E402

PATHS = ("stitched", "every-block", "every-block, no decompositions", "torchscript")


def child(path: str, model: str, directions: str, out: str) -> None:
    import warnings

    import onnx
    import torch

    from regap_export.calibration.directions_io import load_directions
    from regap_export.export import onnx_export, stitch
    from regap_export.method.folding import fold
    from regap_export.method.modality import mask_default
    from regap_export.method.rewrite import corrected
    from regap_export.models.loading import load_model

    warnings.simplefilter("ignore")
    loaded = load_model(model)
    bundle = load_directions(Path(directions))
    options = bundle.options.resolved(bundle.directions.num_layers)
    corrections = list(fold(bundle.directions, options))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if path != "stitched":
        stitch.plan_layers = lambda *a, **k: (None, "the benchmark traces every block")
    if path == "every-block, no decompositions":
        from torch.onnx._internal.exporter import _decomp

        _decomp.create_onnx_friendly_decomposition_table = lambda ops: {}
    with corrected(loaded.model, loaded.adapter, corrections, mask_default=mask_default(options.positions)):
        start = time.perf_counter()
        if path == "torchscript":
            graph = torchscript_export(loaded.model, loaded.adapter, out_dir / "model.onnx")
        else:
            graph = onnx_export.export_text_decoder(loaded.model, loaded.adapter, out_dir, options=options)
        seconds = time.perf_counter() - start
    nodes = len(onnx.load(str(graph), load_external_data=False).graph.node)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    print("CHILD_RESULT " + json.dumps({"seconds": seconds, "nodes": nodes, "bytes": size}), flush=True)


def torchscript_export(model, adapter, path: Path) -> Path:
    import torch

    from regap_export.export.onnx_export import DecoderWrapper, _cache_geometry, _decoder_names

    num_layers, kv_heads, head_dims = _cache_geometry(model, adapter, False, False)
    batch, seq, past = 2, 7, 5
    vocab = int(adapter.text_config(model.config).vocab_size)
    args = [torch.randint(0, vocab, (batch, seq)), torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous(),
            (torch.arange(seq) % 2).float().expand(batch, seq).contiguous()]
    args += [torch.randn(batch, kv_heads[i], past, head_dims[i]) for i in range(num_layers) for _ in range(2)]
    wrapper = DecoderWrapper(model, adapter, num_layers=num_layers, embeds=False, alpha=False, readout=None,
                             image_mask=True).eval()
    inputs, outputs = _decoder_names(embeds=False, image_mask=True, alpha=False, readout=False, num_layers=num_layers)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "regap_image_mask": {0: "batch", 1: "seq"}}
    axes.update({name: {0: "batch", 2: "past"} for name in inputs if name.startswith("past_key_values.")})
    check, torch._check = torch._check, lambda *a, **k: None
    try:
        with torch.no_grad():
            torch.onnx.export(wrapper, tuple(args), str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              opset_version=18, dynamic_axes=axes)
    finally:
        torch._check = check
    return path


def run(argv: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    lines = list(proc.stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(argv[-4:])} failed:\n" + "".join(lines[-30:]))
    result = next(json.loads(l.split(" ", 1)[1]) for l in lines if l.startswith("CHILD_RESULT"))
    result.update(wall_seconds=time.perf_counter() - start, peak_rss_mib=usage.ru_maxrss / 1024,
                  load_average=os.getloadavg()[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of: {', '.join(PATHS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {PATHS}")
    root = Path(tempfile.mkdtemp(prefix="export_paths_"))
    try:
        dirs = root / "directions"
        subprocess.run([sys.executable, str(HERE / "_synthetic.py"), "directions", args.model, str(dirs)], check=True,
                       cwd=str(ROOT), stdout=subprocess.DEVNULL)
        runs: dict[str, list] = {p: [] for p in paths}
        for r in range(args.repeats):
            for path in paths[r % len(paths):] + paths[:r % len(paths)]:
                out = root / "out"
                shutil.rmtree(out, ignore_errors=True)
                print(f"{path} ({r + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                result = run([sys.executable, str(Path(__file__).resolve()), "--child", path, args.model, str(dirs),
                              str(out)])
                runs[path].append(result)
                print(f"    {result['seconds']:.1f} s export, {result['peak_rss_mib']:.0f} MiB, {result['nodes']} nodes "
                      f"(load {result['load_average']:.1f})", file=sys.stderr, flush=True)
        rows, summary = [], {}
        base = statistics.median(r["seconds"] for r in runs[paths[0]])
        for path in paths:
            secs = [r["seconds"] for r in runs[path]]
            med = statistics.median(secs)
            summary[path] = {"seconds_median": med, "seconds": secs, "runs": runs[path]}
            rows.append((path, str(len(secs)), f"{med:.1f}", f"{min(secs):.1f}-{max(secs):.1f}",
                         f"{med / base:.2f}x", f"{statistics.median(r['peak_rss_mib'] for r in runs[path]):.0f}",
                         str(runs[path][0]["nodes"]), f"{runs[path][0]['bytes'] / 2**20:.0f}"))
        emit("export_paths", {"model": args.model, "paths": summary}, rows,
             ("path", "n", "export s (median)", "range", f"vs {paths[0]}", "peak RSS MiB", "nodes", "MiB"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
