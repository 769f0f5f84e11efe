"""Shared helpers for the benchmarks: machine/version facts, medians, JSON + table output."""
from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
from typing import Any

import numpy as np


def environment() -> dict[str, Any]:
    import torch
    import transformers

    info = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_and_spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = lambda p: ordered[min(len(ordered) - 1, int(p * len(ordered)))]
    return {"median": statistics.median(values), "p10": q(0.1), "p90": q(0.9), "n": len(values)}


def emit(name: str, results: dict[str, Any], rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    """Print a readable table, then one JSON line (for RESULTS.md and scripts)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"== {name}")
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)))
    print(json.dumps({"benchmark": name, "environment": environment(), **results}, sort_keys=True))
    sys.stdout.flush()


def paired_bootstrap(base: np.ndarray, other: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """95 % CI of median(other) / median(base), resampling repetitions (pairs) together."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(n, len(base)))
    ratios = np.median(other[idx], axis=1) / np.median(base[idx], axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)
