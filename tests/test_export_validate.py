"""`export` + `validate` end to end on tiny seeded models, and every bad input of export and validate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regap_export.export.manifest import MANIFEST_FILENAME
from regap_export.options import RegapOptions
from regap_testing import (
    assert_all_ok, copy_of, export_and_validate, invoke, options_for, parity_tier, write_directions,
)
from tiny_models import save_tiny

ONNX_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "llava", "llava_next", "idefics3"]
MULTIMODAL = {"llava", "llava_next", "idefics3"}
# regap: probe band fixed + adaptive band gated; fixed: both bands fixed; regap-seq: both bands scaled
EXPECTED_KINDS = {"regap": {"fixed", "gated"}, "fixed": {"fixed"}, "regap-seq": {"scaled"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny(family, root / family) for family in ONNX_FAMILIES}


def parity_cases():
    """Every family x every mode, in the tiers ``regap_testing.parity_tier`` gives: Llama in
    every mode and every family in mode regap by default."""
    for family in ONNX_FAMILIES:
        for mode in ("regap", "fixed", "regap-seq"):
            yield pytest.param(family, mode, id=f"{family}-{mode}", marks=parity_tier(family, mode, every_mode="llama"))


@pytest.mark.parametrize("family,mode", parity_cases())
def test_export_parity(models, tmp_path, family, mode):
    """Every family x every mode: rewritten PyTorch (reloaded from the safetensors folder) and
    ONNX Runtime match the hook reference on prefill, KV cache, decode steps, greedy tokens."""
    # Multimodal families: the default positions (image rows only: last prompt token and decode
    # steps); text families, which have no image rows: every position.
    positions = "last+generated" if family in MULTIMODAL else "all"
    directions = write_directions(models[family], tmp_path / "dirs", options_for("regap", positions=positions))
    report = export_and_validate(models[family], directions, tmp_path / "out", "--mode", mode)
    assert_all_ok(report)
    if family in MULTIMODAL:
        # multimodal: image rows found from the modality channel, not fed
        assert any(c["quantity"] == "prefill logits, image channel cleared" and c["ok"] for c in report["checks"])
        onnx_config = json.loads((tmp_path / "out" / "onnx" / "regap_onnx.json").read_text())
        assert onnx_config["image_rows"] == "channel" and "regap_image_mask" not in onnx_config["decoder_inputs"]
    assert report["mode"] == mode
    assert (tmp_path / "out" / "parity.json").is_file()
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILENAME).read_text())
    assert manifest["parity"]["ok"] is True
    inputs = {c["inputs"] for c in report["checks"]}
    assert inputs == ({"text", "image"} if family in MULTIMODAL else {"text"})
    kinds = {c["kind"] for c in json.loads((tmp_path / "out" / "onnx" / "regap_onnx.json").read_text())["corrections"]}
    assert kinds == EXPECTED_KINDS[mode]
    if mode == "regap-seq":
        assert any(c["quantity"] == "regap_alpha" for c in report["checks"])


@pytest.mark.matrix
def test_image_positions_parity(models, tmp_path):
    """positions=image (every position from the first image token on) on the Idefics3 family."""
    directions = write_directions(models["idefics3"], tmp_path / "dirs", options_for("regap", positions="image"))
    report = export_and_validate(models["idefics3"], directions, tmp_path / "out")
    assert_all_ok(report)
    assert json.loads(report_options(tmp_path / "out"))["positions"] == "image"


def report_options(folder: Path) -> str:
    return json.loads((folder / MANIFEST_FILENAME).read_text())["options"]


def test_alpha_zero_matches_the_unmodified_model(models, tmp_path):
    """With every strength at 0, ONNX Runtime reproduces plain transformers."""
    from transformers import AutoModelForCausalLM

    from regap_export.runtime.session import OrtSessions
    from regap_export.runtime.generate import position_ids_from_mask

    directions = write_directions(models["llama"], tmp_path / "dirs")
    result = invoke("export", models["llama"], "--directions", directions, "--out", tmp_path / "out",
                    "--alpha0", "0", "--alpha-max", "0", "--format", "onnx")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    ids = torch.tensor([[0, 0, 5, 17, 99, 1203], [3, 44, 5, 17, 99, 1203]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    position = torch.from_numpy(position_ids_from_mask(mask.numpy()))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=position).logits.numpy()
    sessions = OrtSessions.open(tmp_path / "out" / "onnx")
    got = sessions.run_decoder(ids.numpy(), mask.numpy(), position.numpy(), sessions.empty_past(2)).logits
    attended = mask.numpy().astype(bool)
    np.testing.assert_allclose(got[attended], want[attended], atol=1e-4, rtol=1e-4)
    # An ONNX-only folder loads in clients as written: the config, tokenizer and generation files
    # are there without the weights, and `generate` runs on it.
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "genai_config.json"):
        assert (out / name).is_file(), name
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    reply = invoke("generate", out, "--prompt", "Hello", "--max-new-tokens", "2", "--json")
    assert reply.exit_code == 0, reply.output
    assert json.loads(reply.stdout)["new_tokens"] == 2


def test_export_folds_once_and_rewrites_once(models, tmp_path, monkeypatch):
    """export_to_folder folds the directions once and inserts each correction layer once;
    the safetensors and ONNX writers both read that one rewritten model."""
    from regap_export.method import rewrite
    from regap_export.export import pipeline, safetensors_export, stitch

    directions = write_directions(models["llama"], tmp_path / "dirs", options_for("regap-seq"))
    folds, wrapped = [], []
    for module in (pipeline, safetensors_export):
        monkeypatch.setattr(module, "fold", lambda *a, _fold=module.fold, **k: folds.append(1) or _fold(*a, **k))
    init = rewrite.CorrectedBlock.__init__

    def counting_init(self, block, correction):
        if not isinstance(block, stitch._PassThrough):  # the ONNX export's traced correction elements
            wrapped.append(correction.layer)
        init(self, block, correction)

    monkeypatch.setattr(rewrite.CorrectedBlock, "__init__", counting_init)
    result = invoke("export", models["llama"], "--directions", directions, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(folds) == 1
    section = json.loads((tmp_path / "out" / "config.json").read_text())["regap"]
    assert wrapped == [entry["layer"] for entry in section["layers"]], "each corrected layer wrapped exactly once"
    assert (tmp_path / "out" / "onnx" / "model.onnx").is_file()


# ----------------------------------------------------------------------------- bad input

def assert_refused(result, *fragments, out: Path | None = None):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_directions_of_another_model(models, tmp_path):
    directions = write_directions(models["llama"], tmp_path / "dirs")
    out = tmp_path / "out"
    assert_refused(invoke("export", models["qwen2"], "--directions", directions, "--out", out),
                   "fitted on another model", out=out)


def test_directions_of_another_format_version(models, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    directions = write_directions(models["llama"], tmp_path / "dirs")
    path = directions / "directions.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, "format_version": "99"})
    out = tmp_path / "out"
    assert_refused(invoke("export", models["llama"], "--directions", directions, "--out", out),
                   "directions format version '99'", "directions.safetensors", out=out)


def test_directions_of_format_version_1_still_load(models, tmp_path):
    """Version 1 predates the image mask: its positions ("all", the only value it had) is read
    as unset, so the file takes the current default."""
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from regap_export.calibration.directions_io import load_directions

    directions = write_directions(models["llama"], tmp_path / "dirs")
    path = directions / "directions.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    options = _json.loads(meta["options"])
    options.pop("layer_drift")
    save_file(tensors, str(path), metadata={**meta, "format_version": "1", "options": _json.dumps({**options, "positions": "all"})})
    bundle = load_directions(directions)
    assert bundle.options.positions == RegapOptions().positions == "last+generated"
    assert bundle.options.layer_drift == "increment"
    assert torch.equal(bundle.directions.drift, tensors["drift"])


def test_checkpoint_of_format_version_1_reads_as_it_was_written(models, tmp_path):
    """A format-1 corrected folder corrected every position with each layer's whole drift."""
    from regap_export.export.load import read_regap_checkpoint

    directions = write_directions(models["llama"], tmp_path / "dirs")
    out = tmp_path / "out"
    assert invoke("export", models["llama"], "--directions", directions, "--out", out, "--format",
                  "safetensors").exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config["regap"]["format_version"] = "1"
    (out / "config.json").write_text(json.dumps(config))
    rewrite_manifest(out)
    checkpoint = read_regap_checkpoint(out)
    assert (checkpoint.options.positions, checkpoint.options.layer_drift) == ("all", "total")


@pytest.mark.parametrize("option,value,message", [
    ("--mode", "sideways", "unknown mode 'sideways'"),
    ("--precision", "fp32,int3", "unknown precision 'int3'"),
    ("--dtype", "fp16", "export has no --dtype"),
    ("--adaptive-band", "2:40", "outside the model's 4 decoder blocks"),
    ("--format", "tflite", "unknown format 'tflite'"),
])
def test_bad_export_options(models, tmp_path, option, value, message):
    directions = write_directions(models["llama"], tmp_path / "dirs")
    out = tmp_path / "out"
    assert_refused(invoke("export", models["llama"], "--directions", directions, "--out", out, option, value),
                   message, out=out)


def test_the_gone_dtype_option_points_to_precision(models, tmp_path):
    directions = write_directions(models["llama"], tmp_path / "dirs")
    out = tmp_path / "out"
    assert_refused(invoke("export", models["llama"], "--directions", directions, "--out", out, "--dtype", "fp16"),
                   "--precision fp32,fp16", out=out)


def test_existing_out_needs_force(models, tmp_path):
    directions = write_directions(models["llama"], tmp_path / "dirs")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("export", models["llama"], "--directions", directions, "--out", out)
    assert result.exit_code == 2 and "output directory exists" in result.output and "--force" in result.output


@pytest.fixture
def exported(exported_llama) -> Path:
    return exported_llama


def test_truncated_onnx_is_named(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    graph = out / "onnx" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    assert_refused(invoke("validate", out), "model.onnx", "truncated")


def test_modified_file_fails_the_manifest_hash(exported, tmp_path):
    out = copy_of(exported, tmp_path)
    tensors = out / "regap.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    assert_refused(invoke("validate", out), "regap.safetensors", "sha256 does not match the manifest")


def test_corrupted_onnx_with_matching_manifest_is_named(exported, tmp_path):
    """A graph broken before the manifest was written still fails, naming the graph."""
    out = copy_of(exported, tmp_path)
    graph = out / "onnx" / "model.onnx"
    graph.write_bytes(b"not an onnx graph")
    rewrite_manifest(out)
    assert_refused(invoke("validate", out), "model.onnx")


def rewrite_manifest(out: Path) -> dict:
    """Write ``out``'s manifest again over its files as they are now (an edit made before the
    manifest was written); returns the manifest as it was."""
    from regap_export.export.manifest import write_manifest

    manifest = json.loads((out / MANIFEST_FILENAME).read_text())
    write_manifest(out, {k: v for k, v in manifest.items()
                         if k not in ("files", "parity", "manifest_version", "regap_export_version", "created_with")})
    return manifest


def test_a_wrong_mask_default_fails_the_no_mask_fed_check(exported, tmp_path):
    """The graph's regap_image_mask default flipped (1 - the options' default: a client that
    feeds no mask gets the wrong rows corrected): every other check still passes, this one must
    not, and no rounding-noise judgement may rescue it (the correction's effect is far above
    float32 noise)."""
    import onnx

    from regap_export.method.modality import mask_default
    from regap_export.validation import validate_folder

    out = copy_of(exported, tmp_path)
    graph = out / "onnx" / "model.onnx"
    proto = onnx.load(str(graph), load_external_data=False)
    (default,) = [t for t in proto.graph.initializer if t.name == "regap_image_mask"]
    default_before = onnx.numpy_helper.to_array(default)
    default.CopyFrom(onnx.numpy_helper.from_array(1.0 - default_before, "regap_image_mask"))
    onnx.save(proto, str(graph))
    options = RegapOptions.from_json(rewrite_manifest(out)["options"])
    np.testing.assert_array_equal(default_before, np.full((1, 1), mask_default(options.positions), np.float32))
    report = validate_folder(out, write=False)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed and {c["quantity"] for c in failed} == {"prefill logits, no mask fed"}, failed
    assert all("vs float64" in c["detail"] for c in failed)  # judged by the noise rule, and failed it
    assert not report["ok"]


def test_validate_of_a_folder_without_manifest(tmp_path):
    assert_refused(invoke("validate", tmp_path), "regap_manifest.json", "no manifest")


def test_inspect_an_exported_folder(exported):
    result = invoke("inspect", exported, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "exported" and info["mode"] == "regap" and "onnx/model.onnx" in info["files"]
    assert info["precisions"] == ["fp32"]
    assert "mode regap, ONNX precisions fp32" in invoke("inspect", exported).output


def test_generate_prints_a_reply(exported):
    result = invoke("generate", exported, "--prompt", "Say hello.", "--max-new-tokens", "5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new_tokens"] == 5
