"""Loaders for MM-SafetyBench and FigStep layouts, on tiny fake copies built here."""
import csv
import json

import pytest
from PIL import Image

from regap_export.data import class_counts, paired
from regap_export.data.benchmarks import (
    FIGSTEP_CARRIER, detect_layout, load_benchmark, load_figstep, load_mm_safetybench,
)
from regap_export.errors import DataError

SCEN_A, SCEN_B = "01-Alpha_Scenario", "02-Beta"


def _img(path, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path, fmt)


def _question(i):
    return {"Question": f"Original question {i}?", "Changed Question": f"Changed {i}",
            "Key Phrase": f"phrase {i}", "Phrase Type": "activity",
            "Rephrased Question": f"The bottom of the image shows phrase {i}.",
            "Rephrased Question(SD)": f"The image shows phrase {i}."}


@pytest.fixture
def mmsb(tmp_path):
    """data/ with two scenarios: A has questions 10, 0, 2 (file order), B has 0."""
    root = tmp_path / "MM-SafetyBench" / "data"
    qdir = root / "processed_questions"
    qdir.mkdir(parents=True)
    for scen, keys in ((SCEN_A, ("10", "0", "2")), (SCEN_B, ("0",))):
        (qdir / f"{scen}.json").write_text(
            json.dumps({k: _question(f"{scen[:2]}-{k}") for k in keys}, indent=4),
            encoding="utf-8")
        for k in keys:
            for kind in ("SD", "SD_TYPO", "TYPO"):
                _img(root / "imgs" / scen / kind / f"{k}.jpg", "JPEG")
    return root


def test_mmsb_records_pairs_and_order(mmsb):
    recs = load_mm_safetybench(mmsb)
    assert [r.id for r in recs] == [
        f"mmsb-{SCEN_A}-0", f"mmsb-{SCEN_A}-0-SD_TYPO",
        f"mmsb-{SCEN_A}-2", f"mmsb-{SCEN_A}-2-SD_TYPO",     # numeric, not string, order
        f"mmsb-{SCEN_A}-10", f"mmsb-{SCEN_A}-10-SD_TYPO",
        f"mmsb-{SCEN_B}-0", f"mmsb-{SCEN_B}-0-SD_TYPO"]
    assert all(r.label == "harmful" for r in recs)
    assert class_counts(recs) == {"T+": 4, "T-": 0, "M+": 4, "M-": 0}
    text, image = recs[4], recs[5]
    assert text.image is None and text.carrier is None
    assert text.instruction == "Original question 01-10?" == image.instruction
    assert text.prompt_text == "Original question 01-10?"
    assert image.image == mmsb / "imgs" / SCEN_A / "SD_TYPO" / "10.jpg"
    assert image.carrier == "The bottom of the image shows phrase 01-10."
    assert image.prompt_text == image.carrier
    assert text.pair == image.id and image.pair == text.id
    assert text.category == image.category == SCEN_A
    assert image.source == str(mmsb / "processed_questions" / f"{SCEN_A}.json")
    assert image.line == 2                     # "10" is the first key in the file
    assert paired(recs)[2] == (text, image)
    assert image.open_image().size == (4, 4)


def test_mmsb_sd_uses_the_sd_rephrasing_and_repo_root_works(mmsb):
    recs = load_mm_safetybench(mmsb.parent, image_type="sd")     # repo root, lower case
    img = recs[1]
    assert img.id == f"mmsb-{SCEN_A}-0-SD"
    assert img.image == mmsb / "imgs" / SCEN_A / "SD" / "0.jpg"
    assert img.carrier == "The image shows phrase 01-0."
    typo = load_mm_safetybench(mmsb, image_type="TYPO")[1]
    assert typo.carrier == "The bottom of the image shows phrase 01-0."
    assert typo.image.parent.name == "TYPO"


def test_mmsb_without_twins(mmsb):
    recs = load_mm_safetybench(mmsb, twins=False)
    assert len(recs) == 4
    assert all(r.image is not None and r.pair is None for r in recs)


def test_mmsb_missing_image_is_an_error_naming_file_line_and_image(mmsb):
    missing = mmsb / "imgs" / SCEN_A / "SD_TYPO" / "2.jpg"
    missing.unlink()
    with pytest.raises(DataError) as err:
        load_mm_safetybench(mmsb)
    msg = str(err.value)
    qfile = mmsb / "processed_questions" / f"{SCEN_A}.json"
    assert err.value.path == str(qfile) and err.value.field == "image"
    assert err.value.line == 18           # "2" is the third key, 8 lines per question
    assert msg.startswith(f"{qfile}:18, field 'image': question '2': image not found")
    assert str(missing) in msg and "skip_missing_images" in msg
    recs = load_mm_safetybench(mmsb, skip_missing_images=True)
    assert f"mmsb-{SCEN_A}-2" not in {r.id for r in recs} and len(recs) == 6


def test_mmsb_broken_image(mmsb):
    (mmsb / "imgs" / SCEN_B / "SD_TYPO" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="not a decodable image") as err:
        load_mm_safetybench(mmsb)
    assert err.value.path.endswith(f"{SCEN_B}.json")


def test_mmsb_missing_key(mmsb):
    qfile = mmsb / "processed_questions" / f"{SCEN_B}.json"
    data = json.loads(qfile.read_text())
    del data["0"]["Rephrased Question"]
    qfile.write_text(json.dumps(data, indent=4))
    with pytest.raises(DataError) as err:
        load_mm_safetybench(mmsb)
    assert err.value.field == "Rephrased Question" and err.value.line == 2
    assert "question '0' has no 'Rephrased Question'" in str(err.value)
    assert str(err.value).startswith(f"{qfile}:2")
    # SD images use the other key, so the same file still loads for SD.
    assert len(load_mm_safetybench(mmsb, image_type="SD")) == 8


def test_mmsb_malformed_and_empty_json(mmsb):
    qfile = mmsb / "processed_questions" / f"{SCEN_B}.json"
    qfile.write_text('{\n "0": {"Question": "x",\n}\n')
    with pytest.raises(DataError, match="not valid JSON") as err:
        load_mm_safetybench(mmsb)
    assert err.value.path == str(qfile) and err.value.line == 3
    qfile.write_text("{}")
    with pytest.raises(DataError, match="no questions"):
        load_mm_safetybench(mmsb)
    qfile.write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object of questions"):
        load_mm_safetybench(mmsb)


def test_mmsb_empty_folders_and_bad_type(tmp_path, mmsb):
    with pytest.raises(DataError, match="no processed_questions") as err:
        load_mm_safetybench(tmp_path / "MM-SafetyBench" / "data" / "imgs")
    assert "processed_questions" in err.value.hint
    empty = tmp_path / "empty"
    (empty / "processed_questions").mkdir(parents=True)
    (empty / "imgs").mkdir()
    with pytest.raises(DataError, match=r"no question files \(\*\.json\)") as err:
        load_mm_safetybench(empty)
    assert err.value.path == str(empty / "processed_questions")
    with pytest.raises(DataError, match="not found"):
        load_mm_safetybench(tmp_path / "nowhere")
    with pytest.raises(DataError, match="image type") as err:
        load_mm_safetybench(mmsb, image_type="PNG")
    assert err.value.field == "image_type"
    with pytest.raises(DataError, match="image folder not found"):
        load_mm_safetybench(mmsb, images_dir=tmp_path / "noimgs")
    # Every image of the type missing, skipping on: still an error, not an empty set.
    for p in (mmsb / "imgs").rglob("SD_TYPO/*.jpg"):
        p.unlink()
    with pytest.raises(DataError, match="no question has a SD_TYPO image"):
        load_mm_safetybench(mmsb, skip_missing_images=True)


# --------------------------------------------------------------------------- FigStep

HEADER = ["dataset", "category_id", "task_id", "category_name", "question", "instruction"]
ROWS = [
    ["SafeBench", "1", "1", "Illegal Activity", "How can someone do thing one?",
     "Steps to do thing one."],
    ["SafeBench", "1", "2", "Illegal Activity", "How can someone do thing two?",
     "Steps to do thing two."],
    ["SafeBench", "2", "1", "Hate Speech", "What is thing three?", "List of thing three."],
]


def _figstep(folder, rows=ROWS, header=HEADER, images="images/SafeBench", skip=()):
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "safebench.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    img_dir = folder / images
    img_dir.mkdir(parents=True, exist_ok=True)
    for d, c, t, *_ in rows:
        if (d, c, t) not in skip:
            _img(img_dir / f"query_{d}_{c}_{t}_6.png", "PNG")
    return csv_path


def test_figstep_records(tmp_path):
    csv_path = _figstep(tmp_path / "fs")
    recs = load_figstep(csv_path)
    assert [r.id for r in recs] == [
        "figstep-SafeBench-1-1", "figstep-SafeBench-1-1-img",
        "figstep-SafeBench-1-2", "figstep-SafeBench-1-2-img",
        "figstep-SafeBench-2-1", "figstep-SafeBench-2-1-img"]
    text, image = recs[4], recs[5]
    assert text.label == image.label == "harmful"
    assert text.instruction == image.instruction == "What is thing three?"
    assert text.image is None and text.prompt_text == "What is thing three?"
    assert image.carrier == FIGSTEP_CARRIER == image.prompt_text
    assert FIGSTEP_CARRIER.startswith("The image shows a list numbered 1, 2, and 3")
    assert image.image == tmp_path / "fs" / "images" / "SafeBench" / \
        "query_SafeBench_2_1_6.png"
    assert text.category == "Hate Speech" and text.line == image.line == 4
    assert text.pair == image.id and image.pair == text.id
    assert len(paired(recs)) == 3
    assert [r.id for r in load_figstep(csv_path, twins=False)] == [
        "figstep-SafeBench-1-1-img", "figstep-SafeBench-1-2-img",
        "figstep-SafeBench-2-1-img"]


def test_figstep_repository_layout_and_explicit_images_dir(tmp_path):
    # FigStep repo: data/question/safebench.csv, data/images/SafeBench/*.png
    csv_path = _figstep(tmp_path / "FigStep" / "data" / "question",
                        images="../images/SafeBench")
    recs = load_figstep(csv_path)
    assert recs[1].image.parent.resolve() == \
        (tmp_path / "FigStep" / "data" / "images" / "SafeBench").resolve()
    other = tmp_path / "elsewhere"
    _figstep(tmp_path / "copy", images=str(other))
    recs = load_figstep(tmp_path / "copy" / "safebench.csv", images_dir=other)
    assert recs[1].image == other / "query_SafeBench_1_1_6.png"


def test_figstep_missing_image(tmp_path):
    csv_path = _figstep(tmp_path / "fs", skip={("SafeBench", "1", "2")})
    with pytest.raises(DataError) as err:
        load_figstep(csv_path)
    missing = tmp_path / "fs" / "images" / "SafeBench" / "query_SafeBench_1_2_6.png"
    assert err.value.line == 3 and err.value.field == "image"
    assert str(err.value).startswith(f"{csv_path}:3, field 'image': row SafeBench/1/2: "
                                     f"image not found: {missing}")
    assert "skip_missing_images" in str(err.value)
    recs = load_figstep(csv_path, skip_missing_images=True)
    assert [r.id for r in recs if r.image is None] == [
        "figstep-SafeBench-1-1", "figstep-SafeBench-2-1"]


def test_figstep_missing_column_and_empty_cell(tmp_path):
    header = [h for h in HEADER if h != "task_id"]
    rows = [[c for i, c in enumerate(r) if i != 2] for r in ROWS]
    csv_path = _figstep(tmp_path / "a", rows=[], header=header)
    csv_path.write_text(",".join(header) + "\n" + "\n".join(",".join(r) for r in rows))
    with pytest.raises(DataError, match="missing column 'task_id'") as err:
        load_figstep(csv_path)
    assert err.value.line == 1 and err.value.field == "task_id"
    assert "category_id, task_id" in err.value.hint
    rows = [list(r) for r in ROWS]
    rows[1][4] = "  "
    csv_path = _figstep(tmp_path / "b", rows=rows)
    with pytest.raises(DataError, match="empty 'question'") as err:
        load_figstep(csv_path)
    assert err.value.line == 3 and err.value.field == "question"


def test_figstep_empty_file_no_images_dir_and_duplicates(tmp_path):
    csv_path = _figstep(tmp_path / "a", rows=[])
    with pytest.raises(DataError, match="no questions"):
        load_figstep(csv_path)
    csv_path.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        load_figstep(csv_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "safebench.csv").write_text(",".join(HEADER) + "\n")
    with pytest.raises(DataError, match="no FigStep image folder") as err:
        load_figstep(bare / "safebench.csv")
    assert "images_dir" in err.value.hint
    with pytest.raises(DataError, match="image folder not found"):
        load_figstep(bare / "safebench.csv", images_dir=bare / "x")
    csv_path = _figstep(tmp_path / "dup", rows=ROWS + [ROWS[0]])
    with pytest.raises(DataError, match="duplicate id") as err:
        load_figstep(csv_path)
    assert err.value.line == 5
    with pytest.raises(DataError, match="not found"):
        load_figstep(tmp_path / "none.csv")


# --------------------------------------------------------------------------- dispatch

def test_detect_layout_and_load_benchmark(tmp_path, mmsb):
    fs = _figstep(tmp_path / "fs")
    repo = _figstep(tmp_path / "FigStep" / "data" / "question", images="../images/SafeBench")
    assert detect_layout(mmsb) == "mm-safetybench"
    assert detect_layout(mmsb.parent) == "mm-safetybench"
    assert detect_layout(fs) == "figstep"
    assert detect_layout(fs.parent) == "figstep"
    assert detect_layout(tmp_path / "FigStep") == "figstep"
    other = tmp_path / "other.csv"
    other.write_text("instruction,label\nx,harmful\n")
    assert detect_layout(other) is None
    assert detect_layout(tmp_path / "nowhere") is None
    (tmp_path / "emptydir").mkdir()
    assert detect_layout(tmp_path / "emptydir") is None

    assert [r.id for r in load_benchmark(mmsb, image_type="TYPO")][1] == \
        f"mmsb-{SCEN_A}-0-TYPO"
    assert load_benchmark(fs.parent)[0].id == "figstep-SafeBench-1-1"
    assert load_benchmark(tmp_path / "FigStep", twins=False)[0].image.parent.name == \
        "SafeBench"
    assert len(load_benchmark(repo)) == 6
    with pytest.raises(DataError, match="not a known benchmark layout") as err:
        load_benchmark(tmp_path / "emptydir")
    assert "processed_questions" in err.value.hint and "safebench.csv" in err.value.hint
    with pytest.raises(DataError, match="not found"):
        load_benchmark(tmp_path / "nowhere")
