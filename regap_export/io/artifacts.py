"""Reading an exported folder without PyTorch or onnx: ``regap_onnx.json`` (the ONNX
contract), ``regap_manifest.json`` (file sizes and hashes), and the ``regap.*`` initializers
stored in a graph file. The ONNX Runtime runtime (``regap_export.runtime``) reads folders
through this module only; the exporter writes them (``export.onnx_export``, ``export.manifest``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import ArtifactError

CONTRACT_VERSION = "onnx contract 5"
# Contract 3 only adds to 2 (client files, the Idefics3 encoder layout flagged in regap_onnx.json);
# 4 added the modality marker (regap_onnx.json "image_rows": "marked"), which 5 replaces by the
# modality channel: contract-4 folders without the marker read as contract 3.
READABLE_CONTRACTS = ("onnx contract 2", "onnx contract 3", "onnx contract 4", CONTRACT_VERSION)
CONFIG_FILE = "regap_onnx.json"
MANIFEST_FILENAME = "regap_manifest.json"
MANIFEST_VERSION = "1"


def read_json(path: Path, *, what: str, hint: str = "re-run export") -> dict[str, Any]:
    """A JSON object file of an exported folder (``what`` names it in the error, ``hint`` says
    what to do; a syntax error names its line)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{what} is missing", path=path, hint=hint) from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{what} is not valid JSON ({exc.msg}, column {exc.colno})", path=path,
                            line=exc.lineno, hint=hint) from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{what} is not UTF-8 text", path=path, hint=hint) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} is not a JSON object", path=path, hint=hint)
    return data


# -- regap_onnx.json ------------------------------------------------------------------------
def read_config(out_dir: Path) -> dict[str, Any]:
    """The ``regap_onnx.json`` written next to the graphs."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError("no regap_onnx.json: this folder holds no regap-export ONNX graphs", path=path.parent)
    data = read_json(path, what=CONFIG_FILE)
    if data.get("contract") not in READABLE_CONTRACTS:
        raise ArtifactError(f"unsupported ONNX contract {data.get('contract')!r} (this version reads "
                            f"{CONTRACT_VERSION!r})", path=path)
    if data.get("image_rows") == "marked":
        raise ArtifactError("these graphs find image rows by onnx contract 4's modality marker (features x 2^64), "
                            "which this version no longer runs", path=path,
                            hint="re-export: contract 5 carries the image rows in a modality channel")
    return data


# -- regap_manifest.json --------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# -- graph initializers ---------------------------------------------------------------------
# A reader of the few protobuf fields needed (onnx.proto3): ModelProto.graph = 7,
# GraphProto.initializer = 5, and TensorProto's dims = 1, data_type = 2, float_data = 4,
# int32_data = 5, name = 8, raw_data = 9, double_data = 10, data_location = 14. The onnx
# package is an export-time dependency; this keeps the runtime's checks without it.
_FLOAT, _FLOAT16, _DOUBLE, _BFLOAT16 = 1, 10, 11, 16
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): an int for varints, a memoryview for length-delimited
    and fixed-width fields."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _Malformed("truncated field")
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        yield number, wire, value


def _tensor(buf: memoryview) -> tuple[str, int, np.ndarray | None]:
    """(name, data_location, values as a float array or None for non-float / external data)."""
    name, dtype, location = "", 0, 0
    raw = None
    floats: list[bytes] = []
    doubles: list[bytes] = []
    int32s: list[int] = []
    for number, wire, value in _fields(buf):
        if number == 8 and wire == 2:
            name = bytes(value).decode("utf-8", errors="replace")
        elif number == 2 and wire == 0:
            dtype = value
        elif number == 14 and wire == 0:
            location = value
        elif number == 9 and wire == 2:
            raw = value
        elif number == 4:
            floats.append(bytes(value))
        elif number == 10:
            doubles.append(bytes(value))
        elif number == 5:
            if wire == 2:  # packed
                inner, pos = value, 0
                while pos < len(inner):
                    item, pos = _varint(inner, pos)
                    int32s.append(item)
            else:
                int32s.append(value)
    if dtype not in (_FLOAT, _FLOAT16, _DOUBLE, _BFLOAT16) or location == EXTERNAL:
        return name, location, None
    if raw is not None:
        data = bytes(raw)
        if dtype == _FLOAT:
            return name, location, np.frombuffer(data, dtype="<f4")
        if dtype == _DOUBLE:
            return name, location, np.frombuffer(data, dtype="<f8")
        if dtype == _FLOAT16:
            return name, location, np.frombuffer(data, dtype="<f2")
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return name, location, bits.view(np.float32)
    if dtype == _FLOAT:
        return name, location, np.frombuffer(b"".join(floats), dtype="<f4")
    if dtype == _DOUBLE:
        return name, location, np.frombuffer(b"".join(doubles), dtype="<f8")
    # float16 / bfloat16 without raw_data: the bits in int32_data
    bits = np.asarray(int32s, dtype=np.uint32)
    if dtype == _FLOAT16:
        return name, location, bits.astype(np.uint16).view(np.float16)
    return name, location, (bits << 16).view(np.float32)


def graph_initializers(path: Path, prefix: str = "") -> list[tuple[str, int, np.ndarray | None]]:
    """(name, data_location, float values or None) of the main graph's initializers whose name
    starts with ``prefix``, read from the graph file (not its external data). Raises
    ArtifactError when the file is not a readable ONNX model."""
    path = Path(path)
    out = []
    # The whole file, as onnx.load reads it: graph files written with external data are small,
    # and inline ones stay under the exporter's external-data threshold.
    view = memoryview(path.read_bytes())
    try:
        graphs = [value for number, wire, value in _fields(view) if number == 7 and wire == 2]
        if not graphs:
            raise _Malformed("no graph")
        for number, wire, value in _fields(graphs[-1]):
            if number != 5 or wire != 2:
                continue
            name, location, values = _tensor(value)
            if name.startswith(prefix):
                out.append((name, location, values))
    except _Malformed as exc:
        raise ArtifactError(f"not a readable ONNX graph ({exc})", path=path, hint="re-run export") from None
    return out
