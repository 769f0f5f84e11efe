"""Cost of a full export: wall time and peak memory vs the model's float32 size.

    python benchmarks/export_cost.py                 # embedded:smollm2 (135 M parameters)
    python benchmarks/export_cost.py --large         # + a random 1.1 B Llama (TinyLlama-1.1B shape)
    python benchmarks/export_cost.py --no-breakdown  # only the full export

Every measured step runs in its own child process (``python export_cost.py --child ...``),
and its peak resident memory is that child's ``ru_maxrss`` from ``os.wait4`` (the kernel's
high-water mark of the process, so nothing between samples is missed). Steps per model:

- ``load``: ``load_model`` only (the floor: the model in memory once, plus torch);
- ``export onnx+safetensors``: ``export_to_folder`` in fp32, both formats (the target case);
- with the breakdown (default): ``export onnx`` and ``export safetensors`` alone.

Target: peak RSS of the full export <= 2.5 x the fp32 size of the model's parameters.
Each child also reports where its RSS peaked (a 20 ms sampler; short spikes can slip
between samples, ``ru_maxrss`` never misses them) and which torch.export capture
torch.onnx used (it tries non-strict first and silently falls back to strict, which
costs time and memory).
The directions are synthetic (``_synthetic.py``: random, scaled to the model, carrying the
model's fingerprint), so no calibration run is part of the measurement; the export mode is
regap (probe band fixed, adaptive band gated; METHOD defaults).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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

TARGET_RATIO = 2.5


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
    locator = PeakLocator().__enter__()
    t0 = time.perf_counter()
    import torch  # noqa: F401  (import cost is part of the wall time, reported separately)

    t_import = time.perf_counter() - t0
    result: dict[str, Any] = {"import_seconds": t_import}
    captures: list[dict[str, Any]] = []
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

        formats = {"export onnx+safetensors": ("onnx", "safetensors"), "export onnx": ("onnx",),
                   "export safetensors": ("safetensors",)}[step]
        t = time.perf_counter()
        export_to_folder(model, Path(directions), Path(out), formats=formats, dtype="fp32", force=True)
        result["step_seconds"] = time.perf_counter() - t
        result["output_bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    locator.__exit__(None, None, None)
    result["sampled_peak_mib"] = locator.peak_kib / 1024
    result["peak_where"] = locator.where
    print("CHILD_RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------
def run_child(args: list[str], timeout: float | None) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
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
        raise SystemExit(f"error: child {' '.join(args[:2])} failed with exit code {proc.returncode}:\n"
                         + "".join(lines[-30:]))
    result = next(json.loads(l.split(" ", 1)[1]) for l in lines if l.startswith("CHILD_RESULT"))
    result["wall_seconds"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def prepare_large(root: Path, shape: str) -> Path:
    """A random TinyLlama-shaped Llama saved with save_pretrained (+ SmolLM2's tokenizer files,
    so ``load_model`` finds a tokenizer; the export never tokenizes)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="embedded:smollm2", help="the small case's model")
    parser.add_argument("--large", action="store_true", help="also a random 1.1 B Llama (TinyLlama-1.1B shape)")
    parser.add_argument("--large-shape", default="tinyllama-1.1b", help="_synthetic.SHAPES key for --large")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the onnx-only / safetensors-only steps")
    parser.add_argument("--only-large", action="store_true", help="skip the small model")
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=None, help="per child, seconds")
    parser.add_argument("--child", nargs=4, metavar=("STEP", "MODEL", "DIRECTIONS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    cleanup = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="export_cost_")) if cleanup else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    steps = ["load", "export onnx+safetensors"] + ([] if args.no_breakdown else ["export onnx", "export safetensors"])
    results: dict[str, Any] = {"target_peak_over_fp32_size": TARGET_RATIO, "models": {}}
    rows = []
    try:
        models = [] if args.only_large else [args.model]
        if args.large:
            models.append(str(prepare_large(root, args.large_shape)))
        for i, model in enumerate(models):
            label = model if not Path(model).is_dir() else f"random {args.large_shape}"
            dirs = root / f"directions_{i}"
            write_directions(model, dirs)
            per: dict[str, Any] = {}
            fp32_bytes = None
            for step in steps:
                out = root / f"out_{i}_{step.replace(' ', '_').replace('+', '_')}"
                print(f"[{label}] {step} ...", file=sys.stderr, flush=True)
                r = run_child(["--child", step, model, str(dirs), str(out)], args.timeout)
                if step == "load":
                    fp32_bytes = r["fp32_bytes"]
                    per["parameters"] = r["parameters"]
                    per["fp32_mib"] = fp32_bytes / 2**20
                r["peak_over_fp32_size"] = r["peak_rss_mib"] * 2**20 / fp32_bytes
                per[step] = r
                shutil.rmtree(out, ignore_errors=True)
                verdict = ""
                if step == "export onnx+safetensors":
                    verdict = "meets" if r["peak_over_fp32_size"] <= TARGET_RATIO else "MISSES"
                    verdict += f" <= {TARGET_RATIO}x"
                rows.append((label, step, f"{fp32_bytes / 2**20:.0f}", f"{r['wall_seconds']:.1f}",
                             f"{r['step_seconds']:.1f}", f"{r['peak_rss_mib']:.0f}",
                             f"{r['peak_over_fp32_size']:.2f}x", verdict))
                for c in r.get("torch_export_captures", []):
                    print(f"    torch.export capture: {c}", file=sys.stderr, flush=True)
                print(f"    {step}: {r['wall_seconds']:.1f} s, peak {r['peak_rss_mib']:.0f} MiB "
                      f"({r['peak_over_fp32_size']:.2f}x); sampled peak {r['sampled_peak_mib']:.0f} MiB at "
                      f"{' > '.join(r['peak_where']) or '?'}", file=sys.stderr, flush=True)
            results["models"][label] = per
        results["load_average_after"] = os.getloadavg()
        emit("export_cost", results, rows, ("model", "step", "fp32 MiB", "wall s", "in-process s",
                                             "peak RSS MiB", "peak / fp32", "target"))
    finally:
        if cleanup:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
