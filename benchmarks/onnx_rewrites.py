"""torch.onnx's graph optimizer with onnxscript's default rewrite rules vs the rules regap-export
exports with (the defaults without ``onnx_export.QUADRATIC_REWRITES``), side by side on one graph.

    python benchmarks/onnx_rewrites.py                      # embedded:smollm2's decoder (7.4 k nodes)
    python benchmarks/onnx_rewrites.py --model embedded:organism

One export of MODEL's decoder (synthetic regap directions, ``_synthetic.py``) runs with
torch.onnx's optimizer hook wrapped, so a copy of the graph *before* optimization is kept. Then
that graph, deserialized afresh for each run, goes through onnxscript's ``optimize_ir`` +
``onnx_fusions.fuse`` (what torch.onnx runs) ``--repeats`` times per rule set, alternating.
Reported: median seconds per rule set, their ratio, node counts, and whether the two optimized
graphs are byte-identical (they were: the rule regap-export leaves out never matched).
"""
from __future__ import annotations

import argparse
import contextlib
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


def unoptimized_decoder(model: str, work: Path) -> bytes:
    """The serialized decoder graph as torch.onnx hands it to its optimizer."""
    import onnx_ir as ir
    import onnxscript._framework_apis.torch_2_8 as torch_api

    from regap_export.export.pipeline import export_to_folder

    subprocess.run([sys.executable, str(HERE / "_synthetic.py"), "directions", model, str(work / "directions")],
                   check=True, stdout=subprocess.DEVNULL)
    graphs: list[bytes] = []
    optimize = torch_api.optimize

    def keep_a_copy(onnx_model):
        graphs.append(ir.to_proto(onnx_model).SerializeToString())
        return optimize(onnx_model)

    torch_api.optimize = keep_a_copy  # torch.onnx looks the hook up on every export
    try:
        export_to_folder(model, work / "directions", work / "export", formats=("onnx",), force=True)
    finally:
        torch_api.optimize = optimize
    return max(graphs, key=len)  # the decoder: the largest graph of the export


def optimized(graph: bytes, *, linear_time: bool) -> tuple[float, bytes, int]:
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    from regap_export.export.onnx_export import _linear_time_rewrites

    onnx_model = ir.from_proto(onnx.load_from_string(graph))
    start = time.perf_counter()
    with _linear_time_rewrites() if linear_time else contextlib.nullcontext():
        onnxscript.optimizer.optimize_ir(onnx_model)
        onnxscript.rewriter.onnx_fusions.fuse(onnx_model)
    seconds = time.perf_counter() - start
    return seconds, ir.to_proto(onnx_model).SerializeToString(), len(list(onnx_model.graph))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnx-rewrites-") as tmp:
        graph = unoptimized_decoder(args.model, Path(tmp))
    import onnx

    nodes_before = len(onnx.load_from_string(graph).graph.node)
    runs: dict[str, list[float]] = {"onnxscript defaults": [], "regap-export": []}
    outputs: dict[str, set[bytes]] = {name: set() for name in runs}
    nodes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name in runs:
            seconds, proto, count = optimized(graph, linear_time=name == "regap-export")
            runs[name].append(seconds)
            outputs[name].add(proto)
            nodes[name] = count
    median = {name: statistics.median(times) for name, times in runs.items()}
    identical = len(outputs["onnxscript defaults"] | outputs["regap-export"]) == 1
    rows = [(name, str(nodes_before), str(nodes[name]), f"{median[name]:.1f}",
             f"{median[name] / median['onnxscript defaults']:.2f}") for name in runs]
    emit("onnx_rewrites", {"model": args.model, "repeats": args.repeats, "nodes_before": nodes_before,
                           "nodes_after": nodes, "median_s": median, "runs_s": runs,
                           "optimized_graphs_identical": identical},
         rows, ("rules", "nodes in", "nodes out", "median s", "ratio"))
    print(f"optimized graphs byte-identical: {identical}")


if __name__ == "__main__":
    main()
