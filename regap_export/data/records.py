"""Calibration records (schema 1) and the loaders for JSONL, CSV and TXT files.

Why strict: a calibration set decides the directions that end up inside an exported
model. A silently ignored typo (``"lable"``), a missing image or a dangling pair would
give wrong directions with no visible error, so every problem is a ``DataError`` naming
the file, the line and the field, checked once at load time. The public schema is
documented in ``SCHEMA.md`` next to this file.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Union

from PIL import Image

from ..errors import DataError

SCHEMA_VERSION = 1
LABELS = ("harmful", "harmless")
SPLITS = ("train", "heldout")
FIELDS = ("id", "instruction", "label", "image", "pair", "carrier", "category", "split")
REQUIRED_FIELDS = ("id", "instruction", "label")
CLASS_KEYS = ("T+", "T-", "M+", "M-")
CLASS_NAMES = {"T+": "harmful text", "T-": "harmless text",
               "M+": "harmful multimodal", "M-": "harmless multimodal"}
SUFFIXES = (".jsonl", ".csv", ".txt")
# Bounds on input the model would otherwise be asked to take whole: a data file, one text field,
# an image (pixels; Pillow's own decompression-bomb limit is twice its warning threshold).
MAX_DATA_FILE_BYTES = 512 << 20
MAX_TEXT_CHARS = 100_000
MAX_IMAGE_PIXELS = 64_000_000
# CSV columns that hold the request, in order of preference (HarmBench: Behavior,
# AdvBench: goal); matched case-insensitively.
CSV_INSTRUCTION_COLUMNS = ("instruction", "Behavior", "goal", "prompt")
CSV_CATEGORY_COLUMNS = ("category", "SemanticCategory")

ImageRef = Union[Path, Image.Image]


@dataclass(frozen=True)
class Record:
    """One calibration input: a request, its label, and optionally an image.

    ``image`` is a resolved file path (from a JSONL file) or an in-memory PIL image
    (from the typographic renderer). ``source``/``line`` say where the record came from
    so later steps can point the user at it.
    """

    id: str
    instruction: str
    label: str
    image: ImageRef | None = field(default=None, hash=False)
    pair: str | None = None
    carrier: str | None = None
    category: str | None = None
    split: str | None = None
    source: str | None = None
    line: int | None = None

    @property
    def modality(self) -> str:
        """``"image"`` when the record carries an image, else ``"text"``."""
        return "text" if self.image is None else "image"

    @property
    def is_harmful(self) -> bool:
        return self.label == "harmful"

    @property
    def prompt_text(self) -> str:
        """The text that goes into the chat template.

        For an image record the instruction lives in the image, so the model's text is
        the carrier when one is given (FigStep-style), else the instruction itself.
        """
        if self.image is not None and self.carrier is not None:
            return self.carrier
        return self.instruction

    @property
    def class_key(self) -> str:
        """Calibration class: ``T+``, ``T-``, ``M+`` or ``M-`` (METHOD.md, Notation)."""
        return ("T" if self.image is None else "M") + ("+" if self.is_harmful else "-")

    def open_image(self) -> Image.Image:
        """The image as a fresh RGB ``PIL.Image`` (the caller may modify it), converted as the
        model's processor converts it (``io.images.to_rgb``)."""
        from ..io.images import open_rgb_image, to_rgb

        if self.image is None:
            raise DataError(f"record '{self.id}' has no image", path=self.source,
                            line=self.line, field="image")
        if isinstance(self.image, Image.Image):
            return to_rgb(self.image, where=self.where())
        return open_rgb_image(self.image, path=self.source, line=self.line, field="image")

    def where(self) -> str:
        """``file:line`` for messages (or the id when the record was built in memory)."""
        if self.source is None:
            return f"record '{self.id}'"
        return self.source + (f":{self.line}" if self.line is not None else "")


# --------------------------------------------------------------------------- loading

# What a file without labels is told to do, per caller: calibrate takes --label; evaluate
# reads several files, each of which must carry its own labels.
LABEL_HINT = "pass label='harmful' or 'harmless' (CLI: --label)"
LABELLED_FILES_HINT = "use a .jsonl with a label field, or a .csv with a label column"


def load_records(path: str | Path, *, label: str | None = None, label_hint: str = LABEL_HINT) -> list[Record]:
    """Load calibration records from ``.jsonl``, ``.csv`` or ``.txt``.

    ``label`` ("harmful" | "harmless") labels every row of a CSV without a ``label``
    column and every line of a TXT file; in a JSONL file it is the default for records
    that have no ``label`` field.
    """
    path = Path(path)
    if label is not None and label not in LABELS:
        raise DataError(f"label must be one of {_quoted(LABELS)}, got {label!r}",
                        path=path, field="label")
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError("is a folder, not a data file", path=path, hint="pass a .jsonl, .csv or .txt file")
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported file type '{path.suffix or '(none)'}'", path=path,
                        hint="use .jsonl (schema 1, see regap_export/data/SCHEMA.md), "
                             ".csv or .txt")
    text = read_text_file(path)
    if suffix == ".jsonl":
        records = _parse_jsonl(text, path, label)
    elif suffix == ".csv":
        records = _parse_csv(text, path, label, label_hint)
    else:
        records = _parse_txt(text, path, label, label_hint)
    if not records:
        raise DataError("the file contains no records", path=path,
                        hint="add at least one request")
    return records


def read_text_file(path: Path, *, kind: str = "file", expected: str = "a data file",
                   folder_hint: str = "pass a .jsonl, .csv or .txt file") -> str:
    """A UTF-8 text file (BOM accepted): a regular file (a FIFO or device is refused before it
    is opened), at most ``MAX_DATA_FILE_BYTES``, without NUL bytes; every failure is a
    DataError naming the file (and the line of an undecodable or NUL byte). ``kind``/``expected``
    word the messages."""
    from ..io.files import check_regular_file, read_regular_bytes

    path = Path(path)
    if path.is_dir():
        raise DataError(f"is a folder, not {expected}", path=path, hint=folder_hint)
    check_regular_file(path, what=kind, error=DataError, missing=f"{kind} not found")
    raw = read_regular_bytes(path, limit=MAX_DATA_FILE_BYTES, what=kind, error=DataError,
                             missing=f"{kind} not found")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"a NUL byte (byte {nul}): not a text file", path=path, line=raw[:nul].count(b"\n") + 1,
                        hint=f"save the {kind} as UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {exc.start})", path=path, line=line,
                        hint=f"save the {kind} as UTF-8") from None


def text_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a text file's lines, split at ``\\n`` (a ``\\r`` before it is
    dropped) and nowhere else: a form feed, U+2028 or U+0085 inside a line stays in it
    (``str.splitlines`` would split there)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [(n, line[:-1] if line.endswith("\r") else line) for n, line in enumerate(lines, start=1)]


def check_user_text(value: str, *, path: str | Path | None = None, line: int | None = None,
                    field: str | None = None, limit: int = MAX_TEXT_CHARS) -> str:
    """Text that goes to the model: no NUL character, at most ``limit`` characters."""
    if "\x00" in value:
        raise DataError("holds a NUL character", path=path, line=line, field=field,
                        hint="remove it; text with NUL characters is not sent to the model")
    if len(value) > limit:
        raise DataError(f"is {len(value):,d} characters long; at most {limit:,d} are accepted", path=path,
                        line=line, field=field, hint="shorten it")
    return value


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _parse_jsonl(text: str, path: Path, default_label: str | None) -> list[Record]:
    records: list[Record] = []
    for lineno, raw in text_lines(text):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as exc:
            raise DataError(f"the key {exc.key!r} appears twice in one record", path=path, line=lineno,
                            field=exc.key, hint="keep one of them") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=path,
                            line=lineno, hint="each line must be one JSON object") from None
        except RecursionError:
            raise DataError("malformed JSON: nested too deeply", path=path, line=lineno,
                            hint="each line must be one JSON object of strings") from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path,
                            line=lineno, hint="each line must be one JSON object")
        records.append(_record_from_obj(obj, path, lineno, default_label))
    _check_ids_and_pairs(records, path)
    return records


def _record_from_obj(obj: Mapping, path: Path, lineno: int,
                     default_label: str | None) -> Record:
    for key in obj:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = (f"did you mean '{close[0]}'? " if close else "") + \
                f"allowed fields: {', '.join(FIELDS)}"
            raise DataError("unknown field", path=path, line=lineno, field=str(key),
                            hint=hint)
    # JSON null on an optional field means "absent".
    vals = {k: v for k, v in obj.items() if v is not None}
    if "label" not in vals and default_label is not None:
        vals["label"] = default_label
    for key in REQUIRED_FIELDS:
        if key not in vals:
            hint = {"label": "add \"label\": \"harmful\" or \"harmless\"",
                    "id": "add a unique string id, e.g. \"id\": \"h-001\"",
                    "instruction": "add the request text"}[key]
            raise DataError("required field is missing", path=path, line=lineno,
                            field=key, hint=hint)
    for key, value in vals.items():
        if not isinstance(value, str):
            raise DataError(f"must be a string, got {type(value).__name__}", path=path,
                            line=lineno, field=key)
        if not value.strip():
            raise DataError("must not be empty", path=path, line=lineno, field=key)
        check_user_text(value, path=path, line=lineno, field=key)
    if vals["label"] not in LABELS:
        raise DataError(f"must be {_quoted(LABELS, ' or ')}, got {vals['label']!r}",
                        path=path, line=lineno, field="label")
    if "split" in vals and vals["split"] not in SPLITS:
        raise DataError(f"must be {_quoted(SPLITS, ' or ')}, got {vals['split']!r}",
                        path=path, line=lineno, field="split")
    image = None
    if "image" in vals:
        image = _check_image(vals["image"], path, lineno)
    elif "carrier" in vals:
        raise DataError("a carrier is only used beside an image", path=path, line=lineno,
                        field="carrier", hint="add an 'image' field or remove 'carrier'")
    return Record(id=vals["id"], instruction=vals["instruction"], label=vals["label"],
                  image=image, pair=vals.get("pair"), carrier=vals.get("carrier"),
                  category=vals.get("category"), split=vals.get("split"),
                  source=str(path), line=lineno)


def _check_image(ref: str, path: Path, lineno: int) -> Path:
    """Resolve an image path against the JSONL folder and make sure it is an image we read
    (a regular file, a format and mode Pillow and the model's processor take, within the size
    limit: ``io.images.check_image_file``)."""
    from ..io.images import check_image_file

    img_path = Path(ref).expanduser()
    if not img_path.is_absolute():
        img_path = path.parent / img_path
    if not img_path.exists():
        raise DataError(f"image file not found: {img_path}", path=path, line=lineno,
                        field="image",
                        hint="image paths are relative to the folder of the JSONL file")
    check_image_file(img_path, path=path, line=lineno, field="image")
    return img_path


def _check_ids_and_pairs(records: list[Record], path: Path) -> None:
    by_id: dict[str, Record] = {}
    for rec in records:
        if rec.id in by_id:
            raise DataError(f"duplicate id '{rec.id}' (first used on line "
                            f"{by_id[rec.id].line})", path=path, line=rec.line, field="id",
                            hint="ids must be unique within a file")
        by_id[rec.id] = rec
    for rec in records:
        if rec.pair is None:
            continue
        other = by_id.get(rec.pair)
        if other is None:
            raise DataError(f"pair refers to id '{rec.pair}', which is not in this file",
                            path=path, line=rec.line, field="pair",
                            hint="pair must be the id of the equivalent record in the "
                                 "other modality")
        if other.modality == rec.modality:
            raise DataError(f"pair '{rec.pair}' (line {other.line}) has the same modality "
                            f"({rec.modality})", path=path, line=rec.line, field="pair",
                            hint="a pair links a text record and an image record")
        if other.label != rec.label:
            raise DataError(f"pair '{rec.pair}' (line {other.line}) has label "
                            f"'{other.label}', this record '{rec.label}'", path=path,
                            line=rec.line, field="pair",
                            hint="paired records must say the same thing")
        if other.pair is not None and other.pair != rec.id:
            raise DataError(f"pair '{rec.pair}' (line {other.line}) is paired with "
                            f"'{other.pair}' instead", path=path, line=rec.line,
                            field="pair", hint="pairs must point at each other")


def csv_reader(text: str):
    """A strict CSV reader: an unterminated quote or a stray one is an error, not a field that
    swallows the rows after it."""
    return csv.reader(io.StringIO(text, newline=""), strict=True)


def csv_header(reader, path: Path, known: Iterable[str]) -> list[str] | None:
    """The header row (None for an empty file); a column of ``known`` (case-insensitive) named
    twice is an error: which one to read would be a guess."""
    try:
        header = next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        raise DataError(f"malformed CSV: {exc}", path=path, line=1) from None
    wanted = {name.lower() for name in known}
    seen: dict[str, int] = {}
    for i, name in enumerate(header):
        key = name.strip().lower()
        if key in wanted and key in seen:
            raise DataError(f"the column {name.strip()!r} appears twice (columns {seen[key] + 1} and {i + 1})",
                            path=path, line=1, field=name.strip(), hint="keep one of them")
        seen.setdefault(key, i)
    return header


def _parse_csv(text: str, path: Path, label: str | None, label_hint: str = LABEL_HINT) -> list[Record]:
    reader = csv_reader(text)
    header = csv_header(reader, path, (*CSV_INSTRUCTION_COLUMNS, *CSV_CATEGORY_COLUMNS, "label"))
    if header is None:
        return []
    columns = {name.strip().lower(): i for i, name in reversed(list(enumerate(header)))}
    instr_col = _first_column(columns, CSV_INSTRUCTION_COLUMNS)
    if instr_col is None:
        raise DataError(f"no request column; found {', '.join(header) or 'none'}",
                        path=path, line=1,
                        hint=f"name it one of {', '.join(CSV_INSTRUCTION_COLUMNS)}")
    label_col = columns.get("label")
    cat_col = _first_column(columns, CSV_CATEGORY_COLUMNS)
    if label_col is None and label is None:
        raise DataError("no 'label' column and no label given", path=path, field="label",
                        hint=label_hint)
    return [_csv_record(row, start, path, instr_col, label_col, cat_col, label, header, label_hint)
            for start, row in csv_rows(reader, path)]


def csv_rows(reader, path: Path):
    """(first line number, row) of every non-blank row after the header; a malformed row is
    a DataError naming its line."""
    prev_end = reader.line_num
    try:
        for row in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if any(cell.strip() for cell in row):
                yield start, row
    except csv.Error as exc:
        start = prev_end + 1
        if "unexpected end of data" in str(exc):
            raise DataError(f"malformed CSV: a quoted field that starts on line {start} is never closed", path=path,
                            line=start, hint="close the quote, or double a quote inside a quoted field") from None
        raise DataError(f"malformed CSV: {exc}", path=path, line=start) from None


def _csv_record(row: list[str], lineno: int, path: Path, instr_col: int,
                label_col: int | None, cat_col: int | None, label: str | None,
                header: list[str], label_hint: str = LABEL_HINT) -> Record:
    def cell(i: int | None) -> str:
        return row[i].strip() if i is not None and i < len(row) else ""

    instruction = cell(instr_col)
    if not instruction:
        raise DataError("empty request", path=path, line=lineno, field=header[instr_col])
    check_user_text(instruction, path=path, line=lineno, field=header[instr_col].strip())
    row_label = cell(label_col) or label
    if row_label is None:
        raise DataError("empty label and no label given", path=path, line=lineno,
                        field="label", hint="fill the cell" + ("" if label_hint != LABEL_HINT
                                                               else " or pass label= (CLI: --label)"))
    if row_label not in LABELS:
        raise DataError(f"must be {_quoted(LABELS, ' or ')}, got {row_label!r}",
                        path=path, line=lineno, field="label")
    return Record(id=f"{path.stem}-{lineno}", instruction=instruction, label=row_label,
                  category=cell(cat_col) or None, source=str(path), line=lineno)


def _first_column(columns: dict[str, int], names: Iterable[str]) -> int | None:
    for name in names:
        if name.lower() in columns:
            return columns[name.lower()]
    return None


def _parse_txt(text: str, path: Path, label: str | None, label_hint: str = LABEL_HINT) -> list[Record]:
    if label is None:
        raise DataError("a .txt file has no labels and no label was given", path=path,
                        field="label",
                        hint=label_hint)
    return [Record(id=f"{path.stem}-{n}", label=label, source=str(path), line=n,
                   instruction=check_user_text(raw.strip(), path=path, line=n))
            for n, raw in text_lines(text) if raw.strip()]


# --------------------------------------------------------------------------- helpers

def check_context(lengths: Iterable[tuple[Record, int]], limit: int | None, *, new_tokens: int = 0,
                  what: str = "tokens") -> None:
    """Every record's prompt (``lengths``: record, prompt tokens) fits the model's context,
    with ``new_tokens`` generated after it; else a DataError naming the record and its line."""
    if not limit:
        return
    for record, tokens in lengths:
        if int(tokens) + new_tokens <= limit:
            continue
        extra = f" plus {new_tokens} new tokens (--max-new-tokens)" if new_tokens else ""
        raise DataError(f"record {record.id!r} is {int(tokens)} {what}{extra}; the model's context holds {limit}",
                        path=record.source, line=record.line,
                        hint="shorten or remove the record" + (", or lower --max-new-tokens" if new_tokens else ""))


def split_records(records: Iterable[Record], split: str | None) -> list[Record]:
    """Records whose ``split`` field equals ``split`` (all records when ``None``).

    Records without a split field are never in "train" or "heldout": guessing would leak
    evaluation data into calibration.
    """
    records = list(records)
    if split is None:
        return records
    if split not in SPLITS:
        raise DataError(f"split must be {_quoted(SPLITS, ' or ')}, got {split!r}",
                        field="split")
    return [r for r in records if r.split == split]


def class_counts(records: Iterable[Record]) -> dict[str, int]:
    """Number of records per calibration class, every key of ``CLASS_KEYS`` present."""
    counts = dict.fromkeys(CLASS_KEYS, 0)
    for rec in records:
        counts[rec.class_key] += 1
    return counts


def require_class_counts(records: Iterable[Record], needed: Mapping[str, int]) -> dict[str, int]:
    """Raise ``DataError`` unless every class in ``needed`` has that many records.

    Returns the counts of all classes. ``needed`` maps class keys (``T+``, ``T-``,
    ``M+``, ``M-``) to minimum counts, e.g. ``{"T+": 2, "T-": 2}``.
    """
    records = list(records)
    counts = class_counts(records)
    sources = sorted({r.source for r in records if r.source is not None})
    where = ", ".join(sources) if sources else "the given records"
    for key, minimum in needed.items():
        if key not in CLASS_KEYS:
            raise ValueError(f"unknown class key {key!r}; expected one of {CLASS_KEYS}")
        if counts[key] < minimum:
            hint = ("add image records, or render the text records into images "
                    "(to_multimodal_pairs)" if key.startswith("M") else
                    f"add {'harmful' if key.endswith('+') else 'harmless'} text records")
            raise DataError(f"fewer than {minimum} records in class {key} "
                            f"({CLASS_NAMES[key]}) in {where} (found {counts[key]}); "
                            f"a statistic needs at least {minimum}", hint=hint)
    return counts


def paired(records: Iterable[Record]) -> list[tuple[Record, Record]]:
    """``(text, image)`` pairs, from a ``pair`` field on either side, in input order."""
    records = list(records)
    by_id = {r.id: r for r in records}
    out: list[tuple[Record, Record]] = []
    seen: set[tuple[str, str]] = set()
    for rec in records:
        other = by_id.get(rec.pair) if rec.pair is not None else None
        if other is None or other.modality == rec.modality:
            continue
        text, image = (rec, other) if rec.modality == "text" else (other, rec)
        if (text.id, image.id) not in seen:
            seen.add((text.id, image.id))
            out.append((text, image))
    return out


def records_fingerprint(records: Iterable[Record]) -> str:
    """SHA-256 over every field the model sees (and the image pixels/bytes).

    Stored in the directions metadata as the calibration-set hash: two runs with the
    same fingerprint calibrated on the same data, whatever the file names.
    """
    h = hashlib.sha256()
    for rec in records:
        for value in (rec.id, rec.instruction, rec.label, rec.pair, rec.carrier,
                      rec.category, rec.split):
            h.update(b"\x00" if value is None else value.encode("utf-8"))
            h.update(b"\x1f")
        if isinstance(rec.image, Image.Image):
            im = rec.image.convert("RGB")
            h.update(f"{im.size}".encode())
            h.update(im.tobytes())
        elif rec.image is not None:
            h.update(Path(rec.image).read_bytes())
        h.update(b"\x1e")
    return h.hexdigest()


def _quoted(values: Iterable[str], sep: str = ", ") -> str:
    return sep.join(f"'{v}'" for v in values)
