"""`evaluate` end to end on a tiny Idefics3 export: the report, text inputs left exactly
alone, both runtimes agreeing, the teacher-forced alignment behind KL, and every bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from regap_export.cli import app
from regap_testing import options_for
from tiny_models import save_tiny

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from regap_testing import write_directions

    root = tmp_path_factory.mktemp("evaluate")
    model = save_tiny("idefics3", root / "model")
    directions = write_directions(model, root / "dirs", options_for("regap", positions="last+generated"))
    result = invoke("export", model, "--directions", directions, "--out", root / "out")
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture(scope="module")
def report(exported):
    result = invoke("evaluate", exported, "--limit", "3", "--max-new-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def cell(report, modality, label):
    return next(c for c in report["behaviour"]["cells"] if c["modality"] == modality and c["label"] == label)


def test_report_covers_every_cell_and_is_written(exported, report):
    assert [(c["modality"], c["label"], c["n"]) for c in report["behaviour"]["cells"]] == [
        ("text", "harmful", 3), ("text", "harmless", 3), ("image", "harmful", 3), ("image", "harmless", 3)]
    assert json.loads((exported / "evaluation.json").read_text()) == report
    assert (exported / "evaluation.png").stat().st_size > 0
    assert report["options"]["positions"] == "last+generated" and report["runtime"] == "onnxruntime"
    assert len(report["generations"]) == 12



def test_human_view_says_how_sure_each_rate_is(report):
    """Below the table, one line per cell: both rates with their Wilson intervals and the
    records the correction changed; text rows never change (mask 0), so p = 1 there."""
    from regap_export.evaluation import table_lines

    block = table_lines(report)[2].splitlines()
    assert "Wilson" in block[0] and len(block) == 1 + 4
    for line, c in zip(block[1:], report["behaviour"]["cells"]):
        assert line.split()[:2] == [c["modality"], c["label"]]
        assert f"changed +{c['refused_only_on']} -{c['refused_only_off']}" in line
        assert c["refused_only_on"] - c["refused_only_off"] == round(c["n"] * (c["refusal_on"] - c["refusal_off"]))
    assert all(line.endswith("changed +0 -0, p = 1") for line in block[1:3])

def test_text_inputs_are_left_exactly_alone(report):
    """The drift is image-minus-text: text rows get mask 0, so their replies, first-token
    distributions and next-token distributions are those of the uncorrected model, exactly."""
    for label in ("harmful", "harmless"):
        text = cell(report, "text", label)
        assert text["identical_share"] == 1.0
        assert text["mean_kl"] == 0.0
        assert text["mean_log_odds_off"] == text["mean_log_odds_on"]


def test_image_inputs_are_corrected(report):
    for label in ("harmful", "harmless"):
        assert cell(report, "image", label)["mean_kl"] > 1e-4
    geometry = report["geometry"]["read_layer"]
    gap = geometry["image_text_gap"]
    assert abs(gap["on"]) < abs(gap["off"])
    assert geometry["gap_shrink"] == pytest.approx(1 - abs(gap["on"]) / abs(gap["off"]))


def test_pytorch_runtime_agrees_with_onnxruntime(exported, report):
    result = invoke("evaluate", exported, "--limit", "3", "--max-new-tokens", "6", "--runtime", "pytorch",
                    "--json", "--no-plot")
    assert result.exit_code == 0, result.output
    torch_report = json.loads(result.stdout)
    ort = {g["id"]: g for g in report["generations"]}
    for g in torch_report["generations"]:
        assert g["tokens_off"] == ort[g["id"]]["tokens_off"] and g["tokens_on"] == ort[g["id"]]["tokens_on"]
        assert np.allclose(g["kl"], ort[g["id"]]["kl"], atol=1e-5)
        assert g["log_odds_on"] == pytest.approx(ort[g["id"]]["log_odds_on"], abs=1e-3)


def test_teacher_forced_logits_line_up_with_greedy_tokens(exported):
    """The KL positions: logits at prompt-1+k of the forced pass predict generated token k."""
    from regap_export.evaluation import Batch, OrtEngine, evaluation_records, _batches
    from regap_export.export.load import load_corrected

    loaded = load_corrected(exported)
    records = [r for r in evaluation_records(multimodal=True) if r.label == "harmless"][:4]
    batch = _batches(records, loaded.adapter, loaded.processor, 8)[-1]  # the image batch
    assert isinstance(batch, Batch) and batch.records[0].modality == "image"
    engine = OrtEngine(exported)
    for correct in (False, True):
        tokens, first, alpha = engine.generate(batch, 5, correct=correct)
        logits = engine.forced_logits(batch, tokens[:, :4], correct, alpha)
        prompt = batch.ids.shape[1]
        assert np.array_equal(logits[:, prompt - 1: prompt + 4].argmax(-1), tokens)
        assert np.allclose(logits[:, prompt - 1], first, atol=1e-4)


# ----------------------------------------------------------------------------- bad input
def assert_refused(result, *fragments):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_unknown_runtime(exported):
    assert_refused(invoke("evaluate", exported, "--runtime", "tensorrt"), "unknown runtime 'tensorrt'")


def test_data_without_both_labels(exported, tmp_path):
    data = tmp_path / "harmful.jsonl"
    data.write_text(json.dumps({"id": "a", "instruction": "Explain how to pick a lock.", "label": "harmful"}) + "\n")
    assert_refused(invoke("evaluate", exported, "--data", data), str(data), "needs harmful and harmless",
                   "no harmless record")


def test_a_folder_that_is_not_an_export(tmp_path):
    assert_refused(invoke("evaluate", tmp_path), str(tmp_path), "not an exported folder")


def test_bad_markers_file(exported, tmp_path):
    markers = tmp_path / "markers.txt"
    markers.write_text("# only a comment\n\n")
    assert_refused(invoke("evaluate", exported, "--markers", markers), str(markers))


REMOTE_GENERATE = '''
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

folder, inputs_file, out_file = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
inputs = load_file(inputs_file)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    # A second user turn, continued with the cache as transformers' multi-turn chats do: the whole
    # conversation as input_ids, the first call's past_key_values.
    follow = torch.tensor([[5, 6, 7, 8]]).expand(out.sequences.shape[0], 4)
    conversation = torch.cat([out.sequences, follow], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(conversation.shape[0], conversation.shape[1]
                                                            - inputs["attention_mask"].shape[1], dtype=torch.long)], 1)
    turn2 = model.generate(input_ids=conversation, attention_mask=mask, past_key_values=out.past_key_values,
                           max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
save_file({"tokens": out.sequences[:, inputs["input_ids"].shape[1]:].contiguous(),
           "first_logits": out.logits[0].float().contiguous(), "second_logits": out.logits[1].float().contiguous(),
           "turn2_tokens": turn2.sequences[:, conversation.shape[1]:].contiguous(),
           "turn2_first_logits": turn2.logits[0].float().contiguous()},
          out_file)
'''


@pytest.mark.parametrize("with_image", [False, True])
def test_remote_code_generate_masks_like_the_runtime(exported, tmp_path, with_image):
    """Plain transformers with trust_remote_code computes the image mask itself in generate()
    and gives the tokens the ONNX runtime gives (whose graphs build it from the modality channel),
    in a first turn and in a second one continued with the cache."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from regap_export.evaluation import OrtEngine, _batches, evaluation_records
    from regap_export.export.load import load_corrected
    from regap_export.runtime.generate import generate

    loaded = load_corrected(exported)
    records = [r for r in evaluation_records(multimodal=True) if r.modality == ("image" if with_image else "text")][:3]
    batch = _batches(records, loaded.adapter, loaded.processor, 8)[0]
    save_file({k: __import__("torch").from_numpy(np.ascontiguousarray(v)) for k, v in batch.inputs.items()},
              str(tmp_path / "inputs.safetensors"))
    (tmp_path / "remote.py").write_text(REMOTE_GENERATE)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(exported), str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "out.safetensors")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = {k: v.numpy() for k, v in load_file(str(tmp_path / "out.safetensors")).items()}
    engine = OrtEngine(exported)
    on = generate(engine.sessions, batch.ids, batch.inputs["attention_mask"], max_new_tokens=5, eos_token_id=[],
                  **batch.pixels)
    off = generate(engine.sessions, batch.ids, batch.inputs["attention_mask"], max_new_tokens=5, eos_token_id=[],
                   correct=False, **batch.pixels)
    assert np.array_equal(remote["tokens"][:, :5], on.new_tokens)
    # The prompt's mask (first logits) and a decode step's (second logits, teacher-forced).
    prompt = batch.ids.shape[1]
    second = engine.forced_logits(batch, on.new_tokens[:, :1], True, None)[:, prompt]
    np.testing.assert_allclose(remote["first_logits"], on.first_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(remote["second_logits"], second, atol=1e-4, rtol=1e-4)
    # Text rows: the correction does nothing; image rows: it moves the logits, so the
    # agreement above means the remote code applied the mask the runtime applies.
    moved = np.abs(on.first_logits - off.first_logits).max()
    assert (moved > 1e-3) if with_image else (moved == 0.0)
    # Turn 2 (4 follow-up tokens fed with the cache): corrected at its last token only.
    conversation = np.concatenate([on.sequences, np.tile([[5, 6, 7, 8]], (on.sequences.shape[0], 1))], axis=1)
    full = np.ones_like(conversation)
    full[:, :batch.ids.shape[1]] = batch.inputs["attention_mask"]
    turn2 = generate(engine.sessions, conversation, full, past=on.cache, max_new_tokens=3, eos_token_id=[])
    np.testing.assert_allclose(remote["turn2_first_logits"], turn2.first_logits, atol=1e-4, rtol=1e-4)
    assert np.array_equal(remote["turn2_tokens"][:, :3], turn2.new_tokens)


def test_limit_keeps_pairs_whole():
    from regap_export.data import Record
    from regap_export.evaluation import _limited

    records = [Record("t1", "a", "harmful", pair="i1"), Record("i1", "a", "harmful", image=Path("x.png"), pair="t1"),
               Record("t2", "b", "harmful", pair="i2"), Record("i2", "b", "harmful", image=Path("y.png"), pair="t2"),
               Record("i3", "c", "harmless", image=Path("z.png")), Record("t3", "c", "harmless"),
               Record("i4", "d", "harmless", image=Path("w.png")), Record("t4", "d", "harmless")]
    assert [r.id for r in _limited(records, 1)] == ["t1", "i1", "i3", "t3"]
    assert [r.id for r in _limited(records, 2)] == [r.id for r in records]


def test_evaluate_a_regap_seq_export(exported, tmp_path):
    """regap-seq graphs take regap_alpha at every call, the teacher-forced KL passes included."""
    model = exported.parent / "model"
    out = tmp_path / "seq"
    assert invoke("export", model, "--directions", exported.parent / "dirs", "--out", out, "--mode",
                  "regap-seq").exit_code == 0
    for runtime in ("onnxruntime", "pytorch"):
        result = invoke("evaluate", out, "--limit", "1", "--max-new-tokens", "3", "--runtime", runtime, "--json",
                        "--no-plot")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["mode"] == "regap-seq"
        text = [c for c in report["behaviour"]["cells"] if c["modality"] == "text"]
        assert all(c["mean_kl"] == 0.0 and c["identical_share"] == 1.0 for c in text)
