"""Cost of an export: wall time and peak memory, ours against optimum's on the same folder.

    python benchmarks/export_cost.py                     # embedded:smollm2 (135 M), 3 interleaved repeats
    python benchmarks/export_cost.py --large --organism  # + a random 1.1 B Llama (TinyLlama-1.1B widths)
                                                         #   and the organism's multimodal export
    python benchmarks/export_cost.py --every-block       # + ours with every decoder block traced
    python benchmarks/export_cost.py --no-optimum        # without optimum's rows
    python benchmarks/export_cost.py --diagnose          # + where RSS peaks, torch.export's captures

Every measured step runs in its own child process, and its peak resident memory is that child's
``ru_maxrss`` from ``os.wait4`` (the kernel's high-water mark of the process, so nothing between
samples is missed); wall time is the child's, from start to exit (interpreter, imports, model
load, export, files). Steps per model:

- ``load``: ``load_model`` only, once (the floor: the model in memory once, plus torch);
- ``ours onnx``: ``regap-export export --format onnx`` (``export_to_folder``), fp32, regap mode;
- ``optimum onnx``: ``optimum-cli export onnx --task text-generation-with-past`` in optimum-onnx
  0.1.0's own venv (``examples/clients/optimum/venv.sh``), the same folder, its defaults (fp32,
  and its own validation of the written graph, which is part of what its user waits for);
- ``ours onnx+safetensors``: the default export, both formats (the peak-memory target);
- ``--every-block``: ``ours onnx`` with every decoder block traced (how it was before the
  decoder was built from one traced block per kind, ``regap_export/export/stitch.py``).

``ours onnx`` and ``optimum onnx`` alternate (ours first in even repeats, optimum first in odd
ones), so that a change of load on a shared machine touches both; the table gives medians, the
range over the repeats, and ratios ours / optimum of the medians. The organism (``--organism``):
its full multimodal export (three graphs, safetensors, client files); optimum exports no
image-text-to-text model.

Targets: ours onnx <= optimum's time at 135 M and 1.1 B; the 1.1 B full export's peak RSS
<= 1.3 x its fp32 weights; the organism's export under a minute.
``--diagnose`` samples, in a thread, where each child's RSS peaks and records which torch.export
capture torch.onnx used; the sampler reads the main thread's frames while torch.export runs, which
makes its non-strict capture fail in some exports (torch.onnx then falls back to the strict one,
slower and larger), so the figures are taken without it.

The directions are synthetic (``_synthetic.py``: random, scaled to the model, carrying the
model's fingerprint), so no calibration run is part of the measurement; the export mode is
regap (probe band fixed, adaptive band gated; METHOD defaults).
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
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _common import emit  # noqa: E402

PEAK_TARGET = 1.3          # x fp32 weights, 1.1 B full export
ORGANISM_TARGET_S = 60.0


# --------------------------------------------------------------------------------------
# child side
# --------------------------------------------------------------------------------------
class PeakLocator:
    """Samples this process's RSS every ``interval`` s in a thread; at each new maximum it
    keeps the main thread's innermost frames in regap_export / torch.onnx / onnxscript /
    onnx_ir / safetensors / transformers, to say *where* the peak happens."""

    KEEP = ("regap_export", "torch/onnx", "onnxscript", "onnx_ir", "safetensors", "transformers", "torch/export")

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval = interval
        self.peak_kib = 0
        self.where: list[str] = []
        self.main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        import traceback

        while not self._stop.wait(self.interval):
            rss = self.rss_kib()
            if rss > self.peak_kib:
                self.peak_kib = rss
                frame = sys._current_frames().get(self.main)
                if frame is not None:
                    stack = traceback.extract_stack(frame)
                    kept = [f"{Path(f.filename).name}:{f.name}" for f in stack
                            if any(k in f.filename.replace(os.sep, "/") for k in self.KEEP)]
                    self.where = kept[-6:]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def watch_capture_strategies(log: list[dict[str, Any]]) -> None:
    """Record which torch.export capture torch.onnx used (non-strict first, then a silent
    fallback to strict), with the reason a strategy failed. Private torch API: best effort."""
    try:
        from torch.onnx._internal.exporter import _capture_strategies as cs
    except ImportError:
        return
    for cls in getattr(cs, "CAPTURE_STRATEGIES", ()):
        original = cls._capture

        def wrapped(self, *a, _original=original, _name=cls.__name__, **k):
            start = time.perf_counter()
            try:
                out = _original(self, *a, **k)
            except Exception as exc:
                log.append({"strategy": _name, "ok": False, "seconds": round(time.perf_counter() - start, 1),
                            "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
                raise
            log.append({"strategy": _name, "ok": True, "seconds": round(time.perf_counter() - start, 1)})
            return out

        cls._capture = wrapped


def child(step: str, model: str, directions: str, out: str) -> None:
    """One measured step. Prints one JSON line with in-process timings."""
    # The sampler and the capture watcher are opt-in (--diagnose): with them, torch.export's
    # non-strict capture fails in some exports and torch.onnx falls back to the strict one,
    # which changes what is measured.
    diagnose = os.environ.get("EXPORT_COST_DIAGNOSE") == "1"
    locator = PeakLocator().__enter__() if diagnose else None
    t0 = time.perf_counter()
    import torch  # noqa: F401  (import cost is part of the wall time, reported separately)

    t_import = time.perf_counter() - t0
    result: dict[str, Any] = {"import_seconds": t_import}
    captures: list[dict[str, Any]] = []
    if diagnose:
        watch_capture_strategies(captures)
    result["torch_export_captures"] = captures
    if step == "load":
        from regap_export.models.loading import load_model

        t = time.perf_counter()
        loaded = load_model(model)
        result["step_seconds"] = time.perf_counter() - t
        params = list(loaded.model.parameters())
        result["parameters"] = sum(p.numel() for p in params)
        result["fp32_bytes"] = sum(p.numel() * 4 for p in params)
    else:
        from regap_export.export.pipeline import export_to_folder

        formats = {"ours onnx+safetensors": ("onnx", "safetensors"), "ours onnx": ("onnx",),
                   "ours onnx, every block": ("onnx",)}[step]
        if step == "ours onnx, every block":
            from regap_export.export import stitch

            stitch.plan_layers = lambda *a, **k: (None, "the benchmark traces every block")
        t = time.perf_counter()
        export_to_folder(model, Path(directions), Path(out), formats=formats, force=True)
        result["step_seconds"] = time.perf_counter() - t
        result["output_bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    if locator is not None:
        locator.__exit__(None, None, None)
        result["sampled_peak_mib"] = locator.peak_kib / 1024
        result["peak_where"] = locator.where
    print("CHILD_RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------
def run_child(argv: list[str], timeout: float | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv``; its wall time and peak RSS (``os.wait4``), plus what it printed as CHILD_RESULT."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
                            env={**os.environ, **(env or {})})
    lines = []
    assert proc.stdout is not None
    timer = None
    if timeout:
        import threading

        timer = threading.Timer(timeout, proc.kill)
        timer.start()
    for line in proc.stdout:  # stream, so a long export shows progress and cannot fill the pipe
        lines.append(line)
        if not line.startswith("CHILD_RESULT"):
            sys.stderr.write("    | " + line)
    _, status, usage = os.wait4(proc.pid, 0)
    if timer is not None:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv[:4])} ... failed with exit code {proc.returncode}:\n"
                         + "".join(lines[-30:]))
    result = next((json.loads(l.split(" ", 1)[1]) for l in lines if l.startswith("CHILD_RESULT")), {})
    result["wall_seconds"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def ours(step: str, model: str, directions: Path, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", step, model, str(directions), str(out)]


def optimum_venv() -> Path:
    out = subprocess.run(["bash", str(ROOT / "examples" / "clients" / "optimum" / "venv.sh")], check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def optimum(venv: Path, folder: str, out: Path) -> list[str]:
    return [str(venv / "bin" / "optimum-cli"), "export", "onnx", "--model", folder,
            "--task", "text-generation-with-past", str(out)]


def folder_of(model: str) -> str:
    """A model folder optimum can read (``embedded:`` sources resolve to their cached folder)."""
    from regap_export.models.loading import resolve_source

    if Path(model).is_dir():
        return model
    return str(resolve_source(model)[1])


def prepare_large(root: Path, shape: str) -> Path:
    """A random TinyLlama-shaped Llama saved with save_pretrained (+ SmolLM2's tokenizer files,
    so ``load_model`` and optimum find a tokenizer; the export never tokenizes)."""
    folder = root / f"random-{shape}"
    code = f"""
import sys; sys.path.insert(0, {str(HERE)!r}); sys.path.insert(0, {str(ROOT)!r})
from _synthetic import SHAPES, random_llama
from regap_export.models.loading import resolve_source
from transformers import AutoTokenizer
model = random_llama(**SHAPES[{shape!r}])
model.save_pretrained({str(folder)!r})
_, smol = resolve_source("embedded:smollm2")
AutoTokenizer.from_pretrained(smol).save_pretrained({str(folder)!r})
print(sum(p.numel() for p in model.parameters()))
"""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))
    print(f"saved random {shape} to {folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return folder


def write_directions(model: str, out: Path) -> None:
    subprocess.run([sys.executable, str(HERE / "_synthetic.py"), "directions", model, str(out)], check=True,
                   cwd=str(ROOT), stdout=subprocess.DEVNULL)


def output_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def summary(runs: list[dict[str, Any]], fp32_bytes: int) -> dict[str, Any]:
    walls = [r["wall_seconds"] for r in runs]
    peaks = [r["peak_rss_mib"] for r in runs]
    return {"n": len(runs), "wall_median_s": statistics.median(walls), "wall_min_s": min(walls),
            "wall_max_s": max(walls), "peak_median_mib": statistics.median(peaks), "peak_max_mib": max(peaks),
            "peak_over_fp32": max(peaks) * 2**20 / fp32_bytes,
            "output_mib": statistics.median(r["output_bytes"] for r in runs) / 2**20, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="embedded:smollm2", help="the small case's model")
    parser.add_argument("--large", action="store_true", help="also a random 1.1 B Llama (TinyLlama-1.1B widths)")
    parser.add_argument("--large-shape", default="tinyllama-1.1b", help="_synthetic.SHAPES key for --large")
    parser.add_argument("--only-large", action="store_true", help="skip the small model")
    parser.add_argument("--organism", action="store_true", help="also the organism's full multimodal export")
    parser.add_argument("--every-block", action="store_true", help="also ours with every decoder block traced")
    parser.add_argument("--no-optimum", action="store_true", help="skip optimum's export")
    parser.add_argument("--no-full", action="store_true", help="skip the onnx+safetensors export")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each step (interleaved)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=None, help="per child, seconds")
    parser.add_argument("--diagnose", action="store_true",
                        help="sample where RSS peaks and record torch.export's captures (perturbs the export)")
    parser.add_argument("--child", nargs=4, metavar=("STEP", "MODEL", "DIRECTIONS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.diagnose:
        os.environ["EXPORT_COST_DIAGNOSE"] = "1"      # read by the children
    if args.child:
        child(*args.child)
        return

    cleanup = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="export_cost_")) if cleanup else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    venv = None if args.no_optimum else optimum_venv()
    results: dict[str, Any] = {"targets": {"ours_over_optimum_time": 1.0, "peak_over_fp32_1.1b": PEAK_TARGET,
                                           "organism_seconds": ORGANISM_TARGET_S},
                               "repeats": args.repeats, "load_average_before": os.getloadavg(), "models": {}}
    rows = []
    try:
        cases: list[tuple[str, str, bool]] = [] if args.only_large else [(args.model, args.model, True)]
        if args.large:
            folder = str(prepare_large(root, args.large_shape))
            cases.append((f"random {args.large_shape}", folder, True))
        if args.organism:
            cases.append(("embedded:organism", "embedded:organism", False))
        for i, (label, model, text) in enumerate(cases):
            dirs = root / f"directions_{i}"
            write_directions(model, dirs)
            print(f"[{label}] load ...", file=sys.stderr, flush=True)
            load = run_child(ours("load", model, dirs, root / "unused"), args.timeout)
            fp32 = load["fp32_bytes"]
            steps = ["ours onnx"] if text else []
            steps += ["optimum onnx"] if text and venv is not None else []
            steps += ["ours onnx, every block"] if args.every_block else []
            steps += ["ours onnx+safetensors"] if not args.no_full or not text else []
            runs: dict[str, list] = {step: [] for step in steps}
            for r in range(args.repeats):
                order = steps if r % 2 == 0 else [*steps[1::-1], *steps[2:]] if len(steps) > 1 else steps
                for step in order:
                    out = root / f"out_{i}"
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"[{label}] {step} ({r + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                    argv = optimum(venv, folder_of(model), out) if step == "optimum onnx" else ours(step, model, dirs, out)
                    result = run_child(argv, args.timeout)
                    result["output_bytes"] = output_bytes(out)
                    result["load_average"] = os.getloadavg()[0]
                    runs[step].append(result)
                    print(f"    {step}: {result['wall_seconds']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB "
                          f"(load {result['load_average']:.1f})", file=sys.stderr, flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            per = {"parameters": load["parameters"], "fp32_mib": fp32 / 2**20, "load": load}
            per.update({step: summary(rs, fp32) for step, rs in runs.items()})
            results["models"][label] = per
            base = per.get("optimum onnx")
            for step in steps:
                s = per[step]
                vs = ""
                if base is not None and step != "optimum onnx":
                    vs = (f"{s['wall_median_s'] / base['wall_median_s']:.2f}x / "
                          f"{s['peak_median_mib'] / base['peak_median_mib']:.2f}x")
                rows.append((label, step, str(s["n"]), f"{s['wall_median_s']:.1f}",
                             f"{s['wall_min_s']:.1f}-{s['wall_max_s']:.1f}", f"{s['peak_median_mib']:.0f}",
                             f"{s['peak_over_fp32']:.2f}x", f"{s['output_mib']:.0f}", vs))
        results["load_average_after"] = os.getloadavg()
        emit("export_cost", results, rows, ("model", "step", "n", "wall s (median)", "range", "peak RSS MiB",
                                             "peak / fp32", "out MiB", "vs optimum (time / peak)"))
    finally:
        if cleanup:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
