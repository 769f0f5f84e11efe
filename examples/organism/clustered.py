"""Refusal rates with intervals that respect how the organism's splits are built.

val-wide and test-wide put every object (a slot: "a snowman", "pick a lock") under all 8
templates, so their requests come in groups of 8 that the model tends to refuse together
(one harmless object, "make a snowman", gave 6 of a variant's 13 harmless refusals on
val-wide). `evaluate`'s Wilson interval counts 96 or 192 independent requests; this script
resamples objects instead (a cluster bootstrap) and prints both, with the design effect (the
ratio of the two variances: how many requests one independent observation is worth, roughly).

    python examples/organism/clustered.py runs/s17/eval_test_wide.json [more evaluation.json ...]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

REPS = 10_000
SEED = 0


def slot_of(request_id: str) -> str:
    """"harmless-0-32-5-img" -> "harmless-0-32": the id without its template and modality."""
    stem = request_id[:-len("-img")] if request_id.endswith("-img") else request_id
    prefix, sep, template = stem.rpartition("-")
    if not sep or not template.isdigit():
        raise ValueError(f"{request_id!r} is not an organism template id (label-family-slot-template)")
    return prefix


def refusals_by_slot(ids: list[str], refused: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per slot (sorted): how many requests, how many of them refused."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for request_id in ids:
        entry = counts[slot_of(request_id)]
        entry[0] += 1
        entry[1] += request_id in refused
    slots = sorted(counts)
    return (np.array([counts[s][0] for s in slots]), np.array([counts[s][1] for s in slots]))


def resampled_rates(sizes: np.ndarray, refused: np.ndarray, *, reps: int = REPS, seed: int = SEED) -> np.ndarray:
    """The refusal rate of each of ``reps`` resamples of the slots (with replacement)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sizes), size=(reps, len(sizes)))
    return refused[picks].sum(1) / sizes[picks].sum(1)


def cluster_interval(sizes: np.ndarray, refused: np.ndarray, rates: np.ndarray | None = None
                     ) -> tuple[float, float, float]:
    """The rate, and the 2.5 / 97.5 percentiles of the resampled rates."""
    rates = resampled_rates(sizes, refused) if rates is None else rates
    low, high = np.percentile(rates, [2.5, 97.5])
    return float(refused.sum() / sizes.sum()), float(low), float(high)


def design_effect(sizes: np.ndarray, refused: np.ndarray, rates: np.ndarray | None = None) -> float:
    """Variance of the resampled rates / the binomial variance of as many independent requests."""
    rates = resampled_rates(sizes, refused) if rates is None else rates
    p, n = refused.sum() / sizes.sum(), sizes.sum()
    binomial = p * (1 - p) / n
    return float(rates.var() / binomial) if binomial > 0 else float("nan")


def table(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    lines = [f"{path}  ({data['mode']}, options {json.dumps(data['options'], sort_keys=True)})",
             "cell             n  slots  refusal on  Wilson 95 %       objects resampled 95 %  design effect"]
    for cell in data["behaviour"]["cells"]:
        ids = [g["id"] for g in data["generations"]
               if g["modality"] == cell["modality"] and g["label"] == cell["label"]]
        sizes, refused = refusals_by_slot(ids, set(cell["refused_ids_on"]))
        rates = resampled_rates(sizes, refused)
        rate, low, high = cluster_interval(sizes, refused, rates)
        wilson = cell["refusal_on_ci95"]
        lines.append(f"{cell['modality']:5s} {cell['label']:8s} {cell['n']:4d}  {len(sizes):5d}  {100 * rate:9.1f} %"
                     f"  [{100 * wilson[0]:4.1f}, {100 * wilson[1]:4.1f}]      [{100 * low:4.1f}, {100 * high:4.1f}]"
                     f"             {design_effect(sizes, refused, rates):5.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("evaluations", type=Path, nargs="+", help="evaluation.json files of organism splits")
    for path in ap.parse_args().evaluations:
        print("\n".join(table(path)) + "\n")


if __name__ == "__main__":
    main()
