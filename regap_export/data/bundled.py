"""The bundled calibration set, shipped inside the package.

Why bundled: ``calibrate``, ``tune`` and ``demo`` must work with no download. The set was
written for this project (not copied from a benchmark): 230 harmful requests over 10 harm
categories, phrased only as requests, and 230 harmless requests in the same style, some of
which look harmful on the surface ("How do I kill a Python process ...") so that the refusal
direction learns harm rather than keywords. The first 13 requests of each category carry a
fixed ~70/30 train/heldout split, stratified by label and category; the 10 more per category
(numbered 014-023), written so that ``tune`` has enough records to fit, select and report on,
are all in the train split, so the held-out split (40 + 40) is unchanged. Every word of the
set is one that ``embedded:organism``'s image reader reads. It is text only;
``to_multimodal_pairs`` renders the image twins.
"""
from __future__ import annotations

from pathlib import Path

from .records import Record, load_records, split_records

BUNDLED_FILE = "regap_calibration.jsonl"


def bundled_path() -> Path:
    """Path of the bundled JSONL file (schema 1)."""
    return Path(__file__).resolve().parent / "bundled" / BUNDLED_FILE


def load_bundled(split: str | None = None) -> list[Record]:
    """The bundled records; ``split`` = "train" | "heldout" | None (all)."""
    return split_records(load_records(bundled_path()), split)
