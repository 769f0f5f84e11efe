"""Calibration data: the JSONL schema (schema 1, see SCHEMA.md), loaders for JSONL / CSV /
TXT, the typographic renderer that makes image twins of text requests, and the bundled
calibration set."""
from .bundled import bundled_path, load_bundled
from .records import (
    CLASS_KEYS, CLASS_NAMES, FIELDS, LABELS, SCHEMA_VERSION, SPLITS, Record, class_counts,
    load_records, paired, records_fingerprint, require_class_counts, split_records,
)
from .render import (
    DEFAULT_CARRIER, DEFAULT_SIZE, render_text, render_typographic, to_multimodal_pairs,
)

__all__ = [
    "CLASS_KEYS", "CLASS_NAMES", "DEFAULT_CARRIER", "DEFAULT_SIZE", "FIELDS", "LABELS",
    "SCHEMA_VERSION", "SPLITS", "Record", "bundled_path", "class_counts", "load_bundled",
    "load_records", "paired", "records_fingerprint", "render_text", "render_typographic",
    "require_class_counts", "split_records", "to_multimodal_pairs",
]
