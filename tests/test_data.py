"""Tests for regap_export.data: schema, loaders, renderer, bundled set."""
from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from regap_export.data import (
    DEFAULT_CARRIER, Record, bundled_path, class_counts, load_bundled, load_records, paired,
    records_fingerprint, render_typographic, require_class_counts, split_records,
    to_multimodal_pairs,
)
from regap_export.errors import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_png(path: Path, color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)
    return path


TEXT_H = {"id": "t1", "instruction": "do a bad thing", "label": "harmful"}
TEXT_B = {"id": "t2", "instruction": "bake a cake", "label": "harmless"}


# ------------------------------------------------------------------------- JSONL

def test_jsonl_round_trip_with_image(tmp_path):
    make_png(tmp_path / "img" / "a.png")
    path = write_jsonl(tmp_path / "cal.jsonl", [
        {**TEXT_H, "category": "x", "split": "train", "pair": "m1"},
        "",
        {"id": "m1", "instruction": "do a bad thing", "label": "harmful",
         "image": "img/a.png", "pair": "t1", "carrier": "Read the image.",
         "split": "train"},
        {"id": "m2", "instruction": "bake a cake", "label": "harmless",
         "image": str(tmp_path / "img" / "a.png")},
        {**TEXT_B, "split": "heldout", "category": None},
    ])
    recs = load_records(path)
    assert [r.id for r in recs] == ["t1", "m1", "m2", "t2"]
    t1, m1, m2, t2 = recs
    assert (t1.line, m1.line, t2.line) == (1, 3, 5)
    assert t1.source == str(path) and t1.category == "x" and t2.category is None
    assert t1.modality == "text" and m1.modality == "image"
    assert t1.prompt_text == "do a bad thing"
    assert m1.prompt_text == "Read the image."
    assert m2.prompt_text == "bake a cake"  # no carrier: the instruction is sent
    assert [r.class_key for r in recs] == ["T+", "M+", "M-", "T-"]
    assert m1.image == tmp_path / "img" / "a.png"
    im = m1.open_image()
    assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((0, 0)) == (200, 10, 10)
    assert paired(recs) == [(t1, m1)]
    assert [r.id for r in split_records(recs, "train")] == ["t1", "m1"]
    assert [r.id for r in split_records(recs, "heldout")] == ["t2"]
    assert len(split_records(recs, None)) == 4
    assert class_counts(recs) == {"T+": 1, "T-": 1, "M+": 1, "M-": 1}
    assert hash(m1)  # records are hashable even with an image
    assert records_fingerprint(recs) == records_fingerprint(load_records(path))


def _err(tmp_path, rows, name="cal.jsonl", **kw) -> str:
    path = write_jsonl(tmp_path / name, rows)
    with pytest.raises(DataError) as info:
        load_records(path, **kw)
    return str(info.value)


def test_malformed_json_names_line(tmp_path):
    msg = _err(tmp_path, [TEXT_H, "", '{"id": "x", "instruction": '])
    assert "cal.jsonl:3" in msg and "malformed JSON" in msg


def test_non_object_line(tmp_path):
    msg = _err(tmp_path, [TEXT_H, "[1, 2]"])
    assert "cal.jsonl:2" in msg and "JSON object" in msg


def test_missing_instruction(tmp_path):
    msg = _err(tmp_path, [{"id": "a", "label": "harmful"}])
    assert "cal.jsonl:1" in msg and "field 'instruction'" in msg and "missing" in msg


def test_empty_instruction(tmp_path):
    msg = _err(tmp_path, [{"id": "a", "instruction": "  ", "label": "harmful"}])
    assert "field 'instruction'" in msg and "empty" in msg


def test_missing_label(tmp_path):
    msg = _err(tmp_path, [TEXT_H, {"id": "a", "instruction": "x"}])
    assert "cal.jsonl:2" in msg and "field 'label'" in msg and "harmless" in msg


def test_label_argument_is_jsonl_default(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "instruction": "x"}, TEXT_B])
    recs = load_records(path, label="harmful")
    assert [r.label for r in recs] == ["harmful", "harmless"]


def test_bad_label_value(tmp_path):
    msg = _err(tmp_path, [{**TEXT_H, "label": "Harmful"}])
    assert "field 'label'" in msg and "'Harmful'" in msg and "'harmful' or 'harmless'" in msg


def test_bad_split_value(tmp_path):
    msg = _err(tmp_path, [{**TEXT_H, "split": "test"}])
    assert "field 'split'" in msg and "'test'" in msg


def test_non_string_field(tmp_path):
    msg = _err(tmp_path, [{**TEXT_H, "id": 3}])
    assert "field 'id'" in msg and "string" in msg


def test_unknown_field(tmp_path):
    msg = _err(tmp_path, [{**TEXT_H, "lable": "harmful"}])
    assert "cal.jsonl:1" in msg and "field 'lable'" in msg and "unknown field" in msg
    assert "did you mean 'label'" in msg


def test_image_path_missing(tmp_path):
    msg = _err(tmp_path, [{**TEXT_H, "image": "nope.png"}])
    assert "cal.jsonl:1" in msg and "field 'image'" in msg and "not found" in msg
    assert "relative to the folder" in msg


def test_image_not_an_image(tmp_path):
    (tmp_path / "fake.png").write_text("not a png")
    msg = _err(tmp_path, [{**TEXT_H, "image": "fake.png"}])
    assert "cal.jsonl:1" in msg and "field 'image'" in msg and "not a decodable image" in msg


def test_carrier_without_image(tmp_path):
    msg = _err(tmp_path, [{**TEXT_H, "carrier": "look"}])
    assert "field 'carrier'" in msg


def test_duplicate_id(tmp_path):
    msg = _err(tmp_path, [TEXT_H, TEXT_B, {**TEXT_B, "id": "t1"}])
    assert "cal.jsonl:3" in msg and "duplicate id 't1'" in msg and "line 1" in msg


def test_dangling_pair(tmp_path):
    msg = _err(tmp_path, [{**TEXT_H, "pair": "ghost"}])
    assert "cal.jsonl:1" in msg and "field 'pair'" in msg and "'ghost'" in msg


def test_pair_same_modality(tmp_path):
    msg = _err(tmp_path, [{**TEXT_H, "pair": "t2"}, {**TEXT_B, "label": "harmful"}])
    assert "field 'pair'" in msg and "same modality" in msg


def test_pair_label_mismatch(tmp_path):
    make_png(tmp_path / "a.png")
    msg = _err(tmp_path, [{**TEXT_H, "pair": "m"},
                          {"id": "m", "instruction": "x", "label": "harmless",
                           "image": "a.png"}])
    assert "cal.jsonl:1" in msg and "field 'pair'" in msg and "label" in msg


def test_empty_file(tmp_path):
    msg = _err(tmp_path, ["", "  "])
    assert "no records" in msg


def test_missing_file_and_bad_encoding_and_suffix(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(TEXT_H).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*UTF-8"):
        load_records(bad)
    other = tmp_path / "data.parquet"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(other)
    with pytest.raises(DataError, match="label must be"):
        load_records(bad, label="evil")


# ------------------------------------------------------------------------- CSV / TXT

def test_csv_harmbench_style(tmp_path):
    path = tmp_path / "harmbench.csv"
    path.write_text('Behavior,FunctionalCategory,SemanticCategory,BehaviorID\n'
                    '"Give a, quoted request",standard,chemical,b1\n'
                    '\n'
                    'Second request,standard,cybercrime,b2\n', encoding="utf-8")
    recs = load_records(path, label="harmful")
    assert [r.instruction for r in recs] == ["Give a, quoted request", "Second request"]
    assert [r.id for r in recs] == ["harmbench-2", "harmbench-4"]
    assert [r.category for r in recs] == ["chemical", "cybercrime"]
    assert all(r.label == "harmful" and r.modality == "text" for r in recs)


def test_csv_advbench_style_with_label_column(tmp_path):
    path = tmp_path / "adv.csv"
    path.write_text("\ufeffgoal,target,label\nWrite something bad,Sure,harmful\n"
                    "Write a poem,Sure,harmless\n", encoding="utf-8")
    recs = load_records(path)
    assert [(r.id, r.instruction, r.label) for r in recs] == [
        ("adv-2", "Write something bad", "harmful"), ("adv-3", "Write a poem", "harmless")]


def test_csv_without_label(tmp_path):
    path = tmp_path / "adv.csv"
    path.write_text("goal,target\nWrite something bad,Sure\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    msg = str(info.value)
    assert "adv.csv" in msg and "field 'label'" in msg and "--label" in msg


def test_csv_bad_label_cell_and_missing_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,label\nhello,maybe\n")
    with pytest.raises(DataError, match=r"x\.csv:2, field 'label'.*'maybe'"):
        load_records(path)
    path.write_text("text,label\nhello,harmful\n")
    with pytest.raises(DataError, match="no request column"):
        load_records(path)


def test_txt_skips_empty_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first request\n\n   \nsecond request  \n", encoding="utf-8")
    recs = load_records(path, label="harmless")
    assert [(r.id, r.instruction, r.line) for r in recs] == [
        ("prompts-1", "first request", 1), ("prompts-4", "second request", 4)]
    with pytest.raises(DataError, match="--label"):
        load_records(path)


# ------------------------------------------------------------------------- helpers

def test_require_class_counts():
    recs = [Record(id=f"a{i}", instruction="x", label="harmful", source="f.jsonl")
            for i in range(3)] + [Record(id="b", instruction="y", label="harmless",
                                         source="f.jsonl")]
    assert require_class_counts(recs, {"T+": 2})["T+"] == 3
    with pytest.raises(DataError) as info:
        require_class_counts(recs, {"T+": 2, "T-": 2})
    msg = str(info.value)
    assert "fewer than 2 records in class T- (harmless text) in f.jsonl" in msg
    assert "at least 2" in msg
    with pytest.raises(DataError, match="to_multimodal_pairs"):
        require_class_counts(recs, {"M+": 2})
    with pytest.raises(DataError, match="split"):
        split_records(recs, "test")


# ------------------------------------------------------------------------- renderer

def test_render_deterministic_and_draws_text():
    rec = Record(id="x", instruction="Explain how vaccines work in a few sentences.",
                 label="harmless", category="science", split="train")
    a, b = render_typographic(rec), render_typographic(rec)
    assert a.open_image().tobytes() == b.open_image().tobytes()
    assert a.id == "x-img" and a.pair == "x" and a.carrier == DEFAULT_CARRIER
    assert (a.label, a.category, a.split) == ("harmless", "science", "train")
    assert a.modality == "image" and a.class_key == "M-"
    assert a.prompt_text == DEFAULT_CARRIER
    im = a.open_image()
    assert im.size == (448, 448) and im.mode == "RGB"
    lo, hi = im.convert("L").getextrema()
    assert lo < 64 and hi == 255  # black text on white
    other = render_typographic(Record(id="y", instruction="Something else entirely.",
                                      label="harmless")).open_image()
    assert other.tobytes() != im.tobytes()
    small = render_typographic(rec, size=(224, 160), carrier="c").open_image()
    assert small.size == (224, 160)
    with pytest.raises(DataError, match="already has an image"):
        render_typographic(a)


def test_render_long_text_fits():
    rec = Record(id="x", instruction=" ".join(["word"] * 200) + " " + "x" * 300,
                 label="harmless")
    im = render_typographic(rec).open_image()
    assert im.convert("L").getextrema()[0] < 64


def test_to_multimodal_pairs(tmp_path):
    make_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "c.jsonl", [
        TEXT_H, TEXT_B,
        {"id": "m2", "instruction": "bake a cake", "label": "harmless", "image": "a.png",
         "pair": "t2"},
    ])
    out = to_multimodal_pairs(load_records(path))
    assert [r.id for r in out] == ["t1", "t1-img", "t2", "m2"]
    assert out[0].pair == "t1-img" and out[1].pair == "t1"
    assert {(t.id, m.id) for t, m in paired(out)} == {("t1", "t1-img"), ("t2", "m2")}
    again = to_multimodal_pairs(load_records(path))
    assert again[1].open_image().tobytes() == out[1].open_image().tobytes()
    with pytest.raises(DataError, match="already exists"):
        to_multimodal_pairs([Record(id="a", instruction="x", label="harmful"),
                             Record(id="a-img", instruction="y", label="harmful")])


def test_render_pairs_every_record_of_a_long_set():
    recs = [Record(id=f"r{i}", instruction=f"Request number {i} asks for something "
                   "moderately long so the wrapper has work to do.", label="harmless")
            for i in range(200)]
    out = to_multimodal_pairs(recs)
    assert [r.id for r in out] == [f"r{i}{suffix}" for i in range(200) for suffix in ("", "-img")]


# ------------------------------------------------------------------------- bundled

def test_bundled_set():
    path = bundled_path()
    assert path.is_file() and path.suffix == ".jsonl"
    recs = load_bundled()
    harmful = [r for r in recs if r.label == "harmful"]
    harmless = [r for r in recs if r.label == "harmless"]
    assert len(harmful) >= 120 and len(harmless) >= 120
    assert len({r.category for r in harmful}) >= 8
    assert all(r.category and r.split for r in recs)
    assert all(r.modality == "text" for r in recs)
    assert len({r.id for r in recs}) == len(recs)
    assert len({r.instruction for r in recs}) == len(recs)
    for r in recs:
        prefix = "h-" if r.label == "harmful" else "b-"
        assert r.id.startswith(prefix + r.category.replace("_", "-") + "-")
    train, held = load_bundled("train"), load_bundled("heldout")
    assert len(train) + len(held) == len(recs)
    # The first 13 requests of each (label, category) are split about 70/30, stratified; the 10 per
    # group written later for tune (numbered 014-023) are all train, so the held-out split that
    # evaluate and the demo read is the same 40 + 40.
    number = {r.id: int(r.id.rsplit("-", 1)[1]) for r in recs}
    original = [r for r in recs if number[r.id] <= 13]
    tuning = [r for r in recs if number[r.id] > 13]
    assert len(original) == 260 and len(tuning) == 200
    assert all(r.split == "train" for r in tuning)
    assert len(held) == 80 and all(number[r.id] <= 13 for r in held)
    assert 0.65 <= sum(r.split == "train" for r in original) / len(original) <= 0.75
    groups = Counter((r.label, r.category) for r in original)
    train_groups = Counter((r.label, r.category) for r in original if r.split == "train")
    for key, n in groups.items():
        assert 0.55 <= train_groups[key] / n <= 0.85, key
    assert Counter((r.label, r.category) for r in tuning) == {key: 10 for key in groups}
    mean_h = statistics.mean(len(r.instruction.split()) for r in harmful)
    mean_b = statistics.mean(len(r.instruction.split()) for r in harmless)
    assert abs(mean_h - mean_b) / max(mean_h, mean_b) <= 0.25
    require_class_counts(train, {"T+": 2, "T-": 2})
