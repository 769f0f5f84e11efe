"""``regap_manifest.json``: what an exported folder holds, how it was made, and its hashes.

Manifest version "1": {manifest_version, regap_export_version, created_with (library
versions), model (source, family, fingerprint), calibration_sha256, mode, dtype, formats,
options, files: {relative path: {sha256, bytes}}, parity (the last validate report or null)}.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ArtifactError
from ..report import json_safe
from .safetensors_export import sha256_file

MANIFEST_FILENAME = "regap_manifest.json"
MANIFEST_VERSION = "1"


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
    path = Path(folder) / MANIFEST_FILENAME
    path.write_text(json.dumps(json_safe(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_FILENAME
    if not path.is_file():
        raise ArtifactError("no manifest: not a folder written by `regap-export export`", path=path)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"the manifest is not valid JSON ({exc})", path=path) from None
    if not isinstance(manifest, dict):
        raise ArtifactError("the manifest is not a JSON object", path=path)
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(f"manifest version {manifest.get('manifest_version')!r}, expected {MANIFEST_VERSION!r}",
                            path=path)
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Every listed file exists with its recorded size and sha256 (``hashes=False``: sizes only);
    the first mismatch is named."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e)
                                              for e in files.values()):
        raise ArtifactError("the manifest has no valid file table", path=Path(folder) / MANIFEST_FILENAME,
                            hint="re-run export")
    for rel, entry in files.items():
        path = Path(folder) / rel
        if not path.is_file():
            raise ArtifactError("listed in the manifest but missing", path=path)
        if path.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"size {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)",
                                path=path, hint="re-run export")
        if hashes and sha256_file(path) != entry["sha256"]:
            raise ArtifactError("sha256 does not match the manifest (the file was modified or corrupted)",
                                path=path, hint="re-run export")


def record_parity(folder: Path, parity: dict[str, Any]) -> None:
    path = Path(folder) / MANIFEST_FILENAME
    manifest = json.loads(path.read_text())
    manifest["parity"] = parity
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
