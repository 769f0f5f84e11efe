"""Per-sample activations at the read position, and the class sums derived from them.

Statistics are kept as rows (one per calibration record, float64) so that every derived
quantity, including rank statistics such as AUROC, is exact after a merge. Sums are
always taken in id order, so merging two shards gives bit-for-bit the sums of one run
over the whole set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from ..io.st_files import save_file_deterministic as save_file

from ..errors import ArtifactError, RegapError

CLASS_KEYS = ("T+", "T-", "M+", "M-")
CLASS_NAMES = {"T+": "harmful text", "T-": "harmless text", "M+": "harmful multimodal", "M-": "harmless multimodal"}
STATS_FORMAT_VERSION = "1"


@dataclass
class ActivationStats:
    ids: list[str]
    class_keys: list[str]
    pairs: list[str | None]
    rows: torch.Tensor  # [N, L, H] float64, sorted by id

    def __post_init__(self) -> None:
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        if order != list(range(len(self.ids))):
            self.ids = [self.ids[i] for i in order]
            self.class_keys = [self.class_keys[i] for i in order]
            self.pairs = [self.pairs[i] for i in order]
            self.rows = self.rows[order]
        self.rows = self.rows.to(torch.float64)

    @property
    def num_layers(self) -> int:
        return int(self.rows.shape[1])

    def count(self, key: str) -> int:
        return sum(1 for k in self.class_keys if k == key)

    def indices(self, key: str) -> list[int]:
        return [i for i, k in enumerate(self.class_keys) if k == key]

    def class_rows(self, key: str) -> torch.Tensor:
        return self.rows[self.indices(key)]

    def class_sum(self, key: str) -> torch.Tensor:
        """Sum over the class's rows in id order, [L, H] float64."""
        total = torch.zeros(self.rows.shape[1:], dtype=torch.float64)
        for i in self.indices(key):
            total += self.rows[i]
        return total

    def class_mean(self, key: str) -> torch.Tensor:
        n = self.count(key)
        if n == 0:
            raise RegapError(f"no records in class {key} ({CLASS_NAMES[key]})")
        return self.class_sum(key) / n

    def pair_indices(self) -> list[tuple[int, int]]:
        """(image row, text row) for every image record whose pair is a text record here."""
        position = {id_: i for i, id_ in enumerate(self.ids)}
        found = []
        for i, (key, pair) in enumerate(zip(self.class_keys, self.pairs)):
            if key.startswith("M") and pair is not None and pair in position:
                j = position[pair]
                if self.class_keys[j].startswith("T"):
                    found.append((i, j))
        return found

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        if self.rows.shape[1:] != other.rows.shape[1:]:
            raise RegapError(f"cannot merge statistics of shapes {tuple(self.rows.shape[1:])} and {tuple(other.rows.shape[1:])}")
        clash = set(self.ids) & set(other.ids)
        if clash:
            raise RegapError(f"cannot merge statistics that share record ids, e.g. {sorted(clash)[0]!r}")
        return ActivationStats(self.ids + other.ids, self.class_keys + other.class_keys,
                               self.pairs + other.pairs, torch.cat([self.rows, other.rows]))

    def save(self, path: Path, *, model_fingerprint: str) -> None:
        meta = {"format_version": STATS_FORMAT_VERSION, "model_fingerprint": model_fingerprint,
                "records": json.dumps({"ids": self.ids, "class_keys": self.class_keys, "pairs": self.pairs})}
        save_file({"rows": self.rows.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> tuple["ActivationStats", str]:
        """Returns the statistics and the fingerprint of the model that produced them."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                rows = f.get_tensor("rows")
        except Exception as exc:  # safetensors raises several types for a bad file
            raise ArtifactError(f"not a readable statistics file ({exc})", path=path) from None
        if meta.get("format_version") != STATS_FORMAT_VERSION:
            raise ArtifactError(f"statistics format {meta.get('format_version')!r}, expected {STATS_FORMAT_VERSION!r}", path=path)
        records = json.loads(meta["records"])
        return cls(records["ids"], records["class_keys"], records["pairs"], rows), meta["model_fingerprint"]
