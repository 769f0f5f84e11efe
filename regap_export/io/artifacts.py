"""The one reader of an exported folder: ``ExportedFolder.open(folder)`` verifies it before
any file in it is used, and every command reads exported folders through it (``generate``,
``validate``, ``evaluate`` with either runtime, ``load_corrected``, ``OrtSessions.open``).

What ``ExportedFolder.open`` checks (docs/SECURITY.md, "What we guarantee"):

- the manifest (``regap_manifest.json``) is there, strict JSON, of a readable version, with a
  valid file table;
- every listed path stays inside the folder: relative, no ``..``, no link on the way, a
  regular file (no FIFO, device or link), with the recorded size and (unless
  ``verify_hashes=False``, the CLI's ``--no-verify-hashes``) the recorded sha256;
- the manifest is complete: every file in the folder is listed, except the reports written
  into it later (``REPORT_FILES``) and their temporary files; nothing unlisted can be read by
  a command, and the folder holds no symbolic link;
- every listed ``.json`` file is strict JSON (no NaN or Infinity, no duplicate key);
- the files agree with each other (``check_consistency``): the options are valid and the same
  in the manifest, config.json and regap_onnx.json; config.json's model_type is the family
  the manifest names; hidden width, layer count and vocabulary agree between config.json,
  regap_onnx.json and the graphs' declared inputs and outputs; the graphs regap_onnx.json
  names are listed, and every external-data file a graph points at is a listed file beside it.

The checks are driven by the manifest's file table and regap_onnx.json's ``files``, so a new
file (another graph, a new format) is verified as soon as the exporter lists it. A folder is
verified once per process while its files are unchanged (size, mtime, inode).

It also holds the readers of the two JSON files an export is described by
(``read_manifest``, ``read_config``) and of the ``regap.*`` initializers in a graph file, all
without PyTorch or onnx (the runtime uses them).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import posixpath
import stat
from dataclasses import dataclass, field
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
ONNX_DIR = "onnx"
# Written into an exported folder after the export (by validate and evaluate), never listed in the
# manifest; ``compare`` reads evaluation.json as a plain JSON file.
REPORT_FILES = ("parity.json", "evaluation.json", "evaluation.png")
MAX_MANIFEST_BYTES = 16 << 20


def read_json(path: Path, *, what: str, hint: str = "re-run export") -> dict[str, Any]:
    """A JSON object file (``what`` names it in the error, ``hint`` says what to do): a regular
    file, strict JSON (no NaN/Infinity, no duplicate key; a syntax error names its line)."""
    from .files import read_strict_json

    data = read_strict_json(path, what=what, error=ArtifactError, hint=hint, missing=f"{what} is missing")
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} is not a JSON object", path=path, hint=hint)
    return data


# -- regap_onnx.json ------------------------------------------------------------------------
def check_contract(config: dict[str, Any], path: Path) -> None:
    """Refuse a ``regap_onnx.json`` of a contract this version does not run."""
    if config.get("contract") not in READABLE_CONTRACTS:
        raise ArtifactError(f"unsupported ONNX contract {config.get('contract')!r} (this version reads "
                            f"{CONTRACT_VERSION!r})", path=path, field="contract")
    if config.get("image_rows") == "marked":
        raise ArtifactError("these graphs find image rows by onnx contract 4's modality marker (features x 2^64), "
                            "which this version no longer runs", path=path,
                            hint="re-export: contract 5 carries the image rows in a modality channel")


def read_config(out_dir: Path) -> dict[str, Any]:
    """The ``regap_onnx.json`` written next to the graphs."""
    path = Path(out_dir) / CONFIG_FILE
    if not os.path.lexists(path):
        raise ArtifactError("no regap_onnx.json: this folder holds no regap-export ONNX graphs", path=path.parent)
    data = read_json(path, what=CONFIG_FILE)
    check_contract(data, path)
    return data


# -- regap_manifest.json --------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, strictly parsed, of a known version, with a valid file table."""
    path = Path(folder) / MANIFEST_FILENAME
    if not os.path.lexists(path):
        raise ArtifactError("no manifest: not an exported folder (one `regap-export export` wrote)", path=path,
                            hint="point at the --out folder of `regap-export export`")
    if os.path.islink(path):
        raise ArtifactError("the manifest is a symbolic link; it is not followed", path=path, hint="re-run export")
    manifest = read_json(path, what="the manifest")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(f"manifest version {manifest.get('manifest_version')!r}, expected {MANIFEST_VERSION!r}",
                            path=path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
            and not isinstance(e.get("bytes"), bool) and e["bytes"] >= 0 for e in files.values()):
        raise ArtifactError("the manifest has no valid file table", path=path, field="files", hint="re-run export")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Every listed file is a regular file inside ``folder`` with its recorded size and sha256
    (``hashes=False``: sizes only); the first mismatch is named. ``ExportedFolder.open`` calls it."""
    for rel, entry in manifest["files"].items():
        path = _listed_path(Path(folder), rel)
        size = path.lstat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"size {size} bytes, the manifest says {entry['bytes']} (truncated?)",
                                path=path, hint="re-run export")
        if hashes and sha256_file(path) != entry["sha256"]:
            raise ArtifactError("sha256 does not match the manifest (the file was modified or corrupted)",
                                path=path, hint="re-run export")


def _listed_path(root: Path, rel: Any) -> Path:
    """``root / rel`` for a manifest entry: a plain relative path with no ``..``, whose every
    folder on the way is a real folder (no link) and which is a regular file itself."""
    manifest = root / MANIFEST_FILENAME
    if (not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/")
            or posixpath.normpath(rel) != rel or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise ArtifactError(f"the manifest lists {rel!r}, a path that leaves the folder or is not a plain "
                            "relative path", path=manifest, field="files", hint="re-run export")
    path = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        path = path / part
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise ArtifactError("listed in the manifest but missing", path=path, hint="re-run export") from None
        except OSError as exc:
            raise ArtifactError(f"cannot read ({exc.strerror or exc})", path=path) from None
        if stat.S_ISLNK(info.st_mode):
            raise ArtifactError("a symbolic link where the manifest lists a file or folder; links are not "
                                "followed", path=path, hint="re-run export")
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(info.st_mode):
            raise ArtifactError("not a folder, but the manifest lists files under it", path=path)
        if last and not stat.S_ISREG(info.st_mode):
            raise ArtifactError("listed in the manifest but not a regular file", path=path, hint="re-run export")
    return path


def _unlisted(root: Path, listed: set[str]) -> Iterator[tuple[str, str]]:
    """(relative path, what it is) of everything in ``root`` that a reader must not meet:
    files the manifest does not list (except the reports and temporary files written later),
    and any symbolic link or special file."""
    allowed = set(REPORT_FILES)
    temporaries = tuple(f".{name}.tmp-" for name in (*REPORT_FILES, MANIFEST_FILENAME))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                yield rel, "a symbolic link"
            elif stat.S_ISDIR(info.st_mode):
                continue
            elif not stat.S_ISREG(info.st_mode):
                yield rel, "not a regular file"
            elif rel == MANIFEST_FILENAME or rel in listed or rel in allowed or rel.startswith(temporaries):
                continue
            else:
                yield rel, "a file the manifest does not list"


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


# -- what a graph declares: inputs, outputs, external data ----------------------------------
# ModelProto: graph = 7, functions = 25 (FunctionProto.node = 7). GraphProto: node = 1,
# initializer = 5, input = 11, output = 12, sparse_initializer = 15. NodeProto.attribute = 5;
# AttributeProto: t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22, sparse_tensors = 23.
# SparseTensorProto: values = 1, indices = 2. TensorProto: external_data = 13 (key = 1,
# value = 2), data_location = 14. ValueInfoProto: name = 1, type = 2; TypeProto.tensor_type = 1;
# its elem_type = 1, shape = 2; TensorShapeProto.dim = 1; Dimension: dim_value = 1, dim_param = 2.
_MAX_GRAPH_DEPTH = 64


@dataclass
class GraphFacts:
    """What a graph file declares: its inputs and outputs (name -> dims, an int for a fixed size,
    a str for a named one, None for an unknown one) and every external-data location its
    tensors name (initializers, constants, subgraphs and functions included)."""

    inputs: dict[str, tuple[int | str | None, ...]] = field(default_factory=dict)
    outputs: dict[str, tuple[int | str | None, ...]] = field(default_factory=dict)
    external_locations: set[str] = field(default_factory=set)


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _dims(value_info: memoryview) -> tuple[str, tuple[int | str | None, ...]]:
    name, dims = "", []
    for number, wire, value in _fields(value_info):
        if number == 1 and wire == 2:
            name = bytes(value).decode("utf-8", errors="replace")
        elif number == 2 and wire == 2:
            for t_number, t_wire, tensor_type in _fields(value):
                if t_number != 1 or t_wire != 2:
                    continue
                for s_number, s_wire, shape in _fields(tensor_type):
                    if s_number != 2 or s_wire != 2:
                        continue
                    for d_number, d_wire, dim in _fields(shape):
                        if d_number != 1 or d_wire != 2:
                            continue
                        size: int | str | None = None
                        for x_number, x_wire, x in _fields(dim):
                            if x_number == 1 and x_wire == 0:
                                size = _int64(x)
                            elif x_number == 2 and x_wire == 2:
                                size = bytes(x).decode("utf-8", errors="replace")
                        dims.append(size)
    return name, tuple(dims)


def _tensor_location(buf: memoryview, facts: GraphFacts) -> None:
    location_kind, where = 0, None
    for number, wire, value in _fields(buf):
        if number == 14 and wire == 0:
            location_kind = value
        elif number == 13 and wire == 2:
            entry = {n: bytes(v).decode("utf-8", errors="replace") for n, w, v in _fields(value) if w == 2}
            if entry.get(1) == "location":
                where = entry.get(2, "")
    if location_kind == EXTERNAL or where is not None:
        facts.external_locations.add(where or "")


def _walk_nodes(buf: memoryview, facts: GraphFacts, depth: int) -> None:
    for number, wire, attribute in _fields(buf):
        if number != 5 or wire != 2:
            continue
        for a_number, a_wire, value in _fields(attribute):
            if a_wire != 2:
                continue
            if a_number in (5, 10):
                _tensor_location(value, facts)
            elif a_number in (6, 11):
                _walk_graph(value, facts, depth + 1, top=False)
            elif a_number in (22, 23):
                for s_number, s_wire, tensor in _fields(value):
                    if s_number in (1, 2) and s_wire == 2:
                        _tensor_location(tensor, facts)


def _walk_graph(buf: memoryview, facts: GraphFacts, depth: int, *, top: bool) -> None:
    if depth > _MAX_GRAPH_DEPTH:
        raise _Malformed("subgraphs nest too deeply")
    for number, wire, value in _fields(buf):
        if wire != 2:
            continue
        if number == 5:
            _tensor_location(value, facts)
        elif number == 15:
            for s_number, s_wire, tensor in _fields(value):
                if s_number in (1, 2) and s_wire == 2:
                    _tensor_location(tensor, facts)
        elif number == 1:
            _walk_nodes(value, facts, depth)
        elif top and number in (11, 12):
            name, dims = _dims(value)
            (facts.inputs if number == 11 else facts.outputs)[name] = dims


def _graph_bytes(path: Path) -> memoryview:
    """The graph file's bytes (mapped, not copied, when large)."""
    size = path.stat().st_size
    if size == 0:
        raise _Malformed("empty file")
    if size < (64 << 20):
        return memoryview(path.read_bytes())
    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def graph_facts(path: Path) -> GraphFacts:
    """``GraphFacts`` of a graph file, read without onnx or ONNX Runtime (and without its
    external data). Raises ArtifactError when the file is not a readable ONNX model."""
    path = Path(path)
    facts = GraphFacts()
    try:
        view = _graph_bytes(path)
        graphs = 0
        for number, wire, value in _fields(view):
            if number == 7 and wire == 2:
                graphs += 1
                _walk_graph(value, facts, 0, top=True)
            elif number == 25 and wire == 2:
                for f_number, f_wire, node in _fields(value):
                    if f_number == 7 and f_wire == 2:
                        _walk_nodes(node, facts, 1)
        if not graphs:
            raise _Malformed("no graph")
    except _Malformed as exc:
        raise ArtifactError(f"not a readable ONNX graph ({exc})", path=path, hint="re-run export") from None
    except RecursionError:
        raise ArtifactError("not a readable ONNX graph (nested too deeply)", path=path, hint="re-run export") from None
    return facts


# -- the verifying reader -------------------------------------------------------------------
_VERIFIED: dict[tuple[str, bool], tuple[Any, "ExportedFolder"]] = {}


def _signature(root: Path) -> tuple:
    """What ``ExportedFolder.open`` remembers a verification by: every entry's size, times and inode."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            info = os.lstat(os.path.join(dirpath, name))
            entries.append((os.path.join(dirpath, name), info.st_mode, info.st_size, info.st_mtime_ns,
                            info.st_ctime_ns, info.st_ino))
    return tuple(sorted(entries))


@dataclass
class ExportedFolder:
    """A verified exported folder (``open`` says what is checked). Read its files through
    ``path`` / ``json``: a file the manifest does not list is refused."""

    root: Path
    manifest: dict[str, Any]
    hashes_verified: bool
    _json: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path, *, verify_hashes: bool = True) -> "ExportedFolder":
        """Verify ``folder`` (see the module docstring) and return its reader. ``verify_hashes``
        False (the CLI's ``--no-verify-hashes``) skips the sha256 of each file, and only that."""
        root = Path(folder)
        if not root.is_dir():
            if not os.path.lexists(root):
                raise ArtifactError("no such folder", path=root, hint="point at the --out folder of `regap-export export`")
            raise ArtifactError("not a folder", path=root, hint="point at the --out folder of `regap-export export`")
        key = os.path.realpath(root)
        signature = _signature(root)
        for hashed in ((True,) if verify_hashes else (True, False)):
            cached = _VERIFIED.get((key, hashed))
            if cached is not None and cached[0] == signature:
                return cls(root, cached[1].manifest, cached[1].hashes_verified, dict(cached[1]._json))
        manifest = read_manifest(root)
        listed = set(manifest["files"])
        for rel in sorted(listed):
            _listed_path(root, rel)
        for rel, what in _unlisted(root, listed):
            raise ArtifactError(f"{what} in an exported folder; a command could read it unverified",
                                path=root / rel, hint="remove it, or re-run export")
        verify_files(root, manifest, hashes=verify_hashes)
        folder_reader = cls(root, manifest, verify_hashes)
        for rel in sorted(listed):
            if rel.endswith(".json"):
                folder_reader.json(rel)
        from .consistency import check_consistency

        check_consistency(folder_reader)
        _VERIFIED[(key, verify_hashes)] = (signature, folder_reader)
        return folder_reader

    # -- reading -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILENAME

    @property
    def formats(self) -> list[str]:
        return list(self.manifest.get("formats") or [])

    def has(self, rel: str) -> bool:
        return rel in self.manifest["files"]

    def path(self, rel: str, *, what: str | None = None, hint: str = "re-run export") -> Path:
        """The path of a listed file; a file the manifest does not list is refused."""
        if rel not in self.manifest["files"]:
            raise ArtifactError(f"{what or rel} is not in the manifest (missing, or added after the export), so "
                                "it is not read",
                                path=self.root / rel, hint=hint)
        return self.root / rel

    def json(self, rel: str, *, what: str | None = None, hint: str = "re-run export") -> dict[str, Any]:
        """A listed JSON object file, strictly parsed (read once)."""
        if rel not in self._json:
            self._json[rel] = read_json(self.path(rel, what=what, hint=hint), what=what or rel, hint=hint)
        return self._json[rel]

    def onnx_folder(self) -> Path:
        return self.root / ONNX_DIR

    def onnx_config(self) -> dict[str, Any]:
        """``onnx/regap_onnx.json``, of a readable contract."""
        rel = f"{ONNX_DIR}/{CONFIG_FILE}"
        if not self.has(rel):
            raise ArtifactError("this export has no ONNX graphs (no onnx/regap_onnx.json in the manifest)",
                                path=self.root, hint="export with --format onnx")
        data = self.json(rel)
        check_contract(data, self.root / rel)
        return data

    def model_config(self) -> dict[str, Any]:
        """config.json (every export writes it; an ONNX-only folder holds it without the weights)."""
        return self.json("config.json", what="config.json",
                         hint="re-run export: it writes the config and tokenizer beside the graphs")

    def require_formats(self, *formats: str, command: str) -> None:
        missing = [f for f in formats if f not in self.formats]
        if missing:
            raise ArtifactError(f"{command} needs the {' and '.join(formats)} export; this folder has "
                                f"{', '.join(self.formats) or 'none'}", path=self.root,
                                hint=f"export with --format {','.join(sorted(set(self.formats) | set(formats)))}")


def exported_folder_of(path: str | Path, *, verify_hashes: bool = True) -> ExportedFolder:
    """The reader of the exported folder that holds ``path`` (the folder itself, or its ``onnx/``)."""
    path = Path(path)
    if not os.path.lexists(path / MANIFEST_FILENAME) and path.name == ONNX_DIR \
            and os.path.lexists(path.parent / MANIFEST_FILENAME):
        path = path.parent
    return ExportedFolder.open(path, verify_hashes=verify_hashes)
