"""The bundled calibration set, shipped inside the package.

Why bundled: ``calibrate`` and ``demo`` must work with no download. The set was written
for this project (not copied from a benchmark): 130 harmful requests over 10 harm
categories, phrased only as requests, and 130 harmless requests matched in length and
style, some of which look harmful on the surface ("How do I kill a Python process ...")
so that the refusal direction learns harm rather than keywords. A fixed ~70/30
train/heldout split, stratified by label and category, is stored in each record.
It is text only; ``to_multimodal_pairs`` renders the image twins.
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
