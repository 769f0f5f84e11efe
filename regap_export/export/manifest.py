"""``regap_manifest.json``: what an exported folder holds, how it was made, and its hashes.

Manifest version "1": {manifest_version, regap_export_version, created_with (library
versions), model (source, family, fingerprint), calibration_sha256, mode, dtype, formats,
options, files: {relative path: {sha256, bytes}}, parity (the last validate report or null)}.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..io.artifacts import MANIFEST_FILENAME, MANIFEST_VERSION, read_manifest, sha256_file
from ..io.atomic import write_json_atomic
from ..calibration.report import json_safe



def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except the manifest and parity report."""
    table = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in (MANIFEST_FILENAME, "parity.json") and "__pycache__" not in rel:
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def write_manifest(folder: Path, content: dict[str, Any]) -> Path:
    manifest = {"manifest_version": MANIFEST_VERSION, "regap_export_version": __version__,
                "created_with": library_versions(), **content, "files": file_table(folder), "parity": None}
    return write_json_atomic(Path(folder) / MANIFEST_FILENAME, json_safe(manifest))


def record_parity(folder: Path, parity: dict[str, Any]) -> None:
    """The last validate report into the manifest of a folder already verified by the reader."""
    manifest = read_manifest(folder)
    manifest["parity"] = parity
    write_json_atomic(Path(folder) / MANIFEST_FILENAME, json_safe(manifest))
