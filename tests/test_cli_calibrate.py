"""`regap-export calibrate` and `inspect` through the CLI: outputs, merging, and every bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from regap_export.cli import app
from tiny_models import save_tiny

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return save_tiny("llava", tmp_path_factory.mktemp("models") / "llava")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def small_set(n: int = 4) -> list[dict]:
    harmful = [{"id": f"h{i}", "instruction": f"Explain how to break into house number {i} unnoticed.", "label": "harmful"}
               for i in range(n)]
    harmless = [{"id": f"b{i}", "instruction": f"Explain how to plant tomato variety number {i} in spring.", "label": "harmless"}
                for i in range(n)]
    return harmful + harmless


def test_calibrate_writes_the_public_format(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "dirs"
    result = invoke("calibrate", tiny_llama, "--data", data, "--out", out)
    assert result.exit_code == 0, result.output
    assert "AUROC text" in result.output and "best layer" in result.output
    assert "probe band [1, 2) (cyan)" in result.output      # half-open, as the options parse it
    with safe_open(str(out / "directions.safetensors"), framework="pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert shapes == {"rhat": (4, 64), "drift": (4, 64), "anchor_text_harmful": (4,), "anchor_text_harmless": (4,),
                      "anchor_probe_harmful": (4,), "anchor_probe_harmless": (4,), "kappa": (4,)}
    assert dtypes == {torch.float32}
    assert meta["format_version"] == "2"
    assert len(meta["calibration_sha256"]) == 64 and meta["model_fingerprint"]
    assert json.loads(meta["options"])["probe_band"] == [1, 2]
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 4 and report["counts"]["T+"] == 4
    inspected = invoke("inspect", out)
    assert inspected.exit_code == 0 and "kappa" in inspected.output
    as_json = json.loads(invoke("inspect", out, "--json").stdout)
    assert as_json["tensors"]["rhat"] == [4, 64]


def test_calibrate_options_reach_the_file(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "dirs"
    result = invoke("calibrate", tiny_llama, "--data", data, "--out", out, "--probe-band", "0:2",
                    "--adaptive-band", "2:4", "--tau", "0.3", "--alpha-max", "0.5", "--drift-component", "refusal",
                    "--gate-sharpness", "4", "--json")
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)["options"]
    assert options["probe_band"] == [0, 2] and options["adaptive_band"] == [2, 4]
    assert options["tau"] == 0.3 and options["alpha_max"] == 0.5 and options["drift_component"] == "refusal"
    assert options["gate_sharpness"] == 4.0


def test_two_half_runs_merge_into_one_full_run(tiny_llava, tmp_path):
    records = small_set(4)
    full = write_jsonl(tmp_path / "full.jsonl", records)
    half_a = write_jsonl(tmp_path / "a.jsonl", records[0::2])
    half_b = write_jsonl(tmp_path / "b.jsonl", records[1::2])
    common = ("--batch-size", "1", "--no-plot")
    for name, data in (("a", half_a), ("b", half_b)):
        assert invoke("calibrate", tiny_llava, "--data", data, "--out", tmp_path / name, "--save-stats", "--no-after",
                      *common).exit_code == 0
    whole = invoke("calibrate", tiny_llava, "--data", full, "--out", tmp_path / "full", *common)
    assert whole.exit_code == 0
    # Not a terminal here, as in a log: the geometry table's columns are whole, not cut to "0.9…".
    assert "AUROC mm" in whole.output and "…" not in whole.output
    merged = invoke("calibrate", tiny_llava, "--data", full, "--out", tmp_path / "merged", *common,
                    "--merge-stats", tmp_path / "a", "--merge-stats", tmp_path / "b")
    assert merged.exit_code == 0, merged.output
    for name in ("directions.safetensors", "report.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes(), name


def test_merge_refuses_statistics_of_other_records(tiny_llama, tmp_path):
    records = small_set(4)
    shard = write_jsonl(tmp_path / "a.jsonl", records[:6])
    full = write_jsonl(tmp_path / "full.jsonl", records)
    assert invoke("calibrate", tiny_llama, "--data", shard, "--out", tmp_path / "a", "--save-stats").exit_code == 0
    result = invoke("calibrate", tiny_llama, "--data", full, "--out", tmp_path / "m", "--merge-stats", tmp_path / "a")
    assert result.exit_code == 2 and "do not cover exactly the records" in result.output
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- bad input

def assert_refused(result, *fragments: str, out: Path):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert not out.exists(), "a failed run must leave no output folder"
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "temporary folder left behind"


def test_malformed_jsonl_names_file_and_line(tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(small_set()[0]) + "\n{not json\n")
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", tiny_llama, "--data", data, "--out", out), "bad.jsonl:2", out=out)


@pytest.mark.parametrize("missing", ["instruction", "label"])
def test_record_without_a_required_field(tiny_llama, tmp_path, missing):
    rows = small_set()
    del rows[1][missing]
    data = write_jsonl(tmp_path / "cal.jsonl", rows)
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", tiny_llama, "--data", data, "--out", out), "cal.jsonl:2", f"'{missing}'", out=out)


def test_missing_image_path(tiny_llava, tmp_path):
    rows = small_set() + [{"id": "m1", "instruction": "x", "label": "harmful", "image": "nope.png"}]
    data = write_jsonl(tmp_path / "cal.jsonl", rows)
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", tiny_llava, "--data", data, "--out", out), "cal.jsonl:9", "'image'", out=out)


def test_image_that_is_not_an_image(tiny_llava, tmp_path):
    (tmp_path / "fake.png").write_text("this is text")
    rows = small_set() + [{"id": "m1", "instruction": "x", "label": "harmful", "image": "fake.png"}]
    data = write_jsonl(tmp_path / "cal.jsonl", rows)
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", tiny_llava, "--data", data, "--out", out), "cal.jsonl:9", "'image'", out=out)


def test_fewer_than_two_records_in_a_class(tiny_llama, tmp_path):
    rows = [r for r in small_set() if r["label"] == "harmless"] + [small_set()[0]]
    data = write_jsonl(tmp_path / "cal.jsonl", rows)
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", tiny_llama, "--data", data, "--out", out),
                   "at least 2 records of class T+ (harmful text)", "has 1", out=out)


def test_multimodal_record_for_a_text_only_model(tiny_llama, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(tmp_path / "img.png")
    rows = small_set() + [{"id": "m1", "instruction": "x", "label": "harmful", "image": "img.png"}]
    data = write_jsonl(tmp_path / "cal.jsonl", rows)
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", tiny_llama, "--data", data, "--out", out),
                   "cal.jsonl:9", "'image'", "text-only model", out=out)


def test_model_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", tmp_path / "empty", "--out", out), "not a model folder", "config.json", out=out)
    assert_refused(invoke("calibrate", tmp_path / "absent", "--out", out), "no such model folder", out=out)


def test_unsupported_architecture_lists_the_supported(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(folder)
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", folder, "--out", out), "unsupported architecture 'gpt2'", "llama", "idefics3",
                   out=out)


def test_non_finite_activations_name_the_layer(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    folder = tmp_path / "nan-model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", folder, "--data", data, "--out", out), "non-finite activations at layer 2",
                   out=out)


def test_existing_output_needs_force(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("calibrate", tiny_llama, "--data", data, "--out", out)
    assert result.exit_code == 2 and "output directory exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only what regap-export wrote: a folder holding someone's file is refused
    forced = invoke("calibrate", tiny_llama, "--data", data, "--out", out, "--force")
    assert forced.exit_code == 2 and "keep.txt" in forced.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert invoke("calibrate", tiny_llama, "--data", data, "--out", out, "--force").exit_code == 0
    assert invoke("calibrate", tiny_llama, "--data", data, "--out", out, "--force").exit_code == 0
    assert (out / "directions.safetensors").is_file()


def test_band_outside_the_model(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "cal.jsonl", small_set())
    out = tmp_path / "o"
    assert_refused(invoke("calibrate", tiny_llama, "--data", data, "--out", out, "--adaptive-band", "2:9"),
                   "outside the model's 4 decoder blocks", out=out)
