"""Source folders whose config.json declares a quantization: a GGUF-derived folder is loaded
as the dense model it holds (calibrate and export work, the corrected folder is dense); any
other quant_method is refused before any work, with one line naming it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from regap_export.errors import ModelError
from regap_export.export.load import load_corrected
from regap_export.models.loading import load_model
from regap_export.cli import app
from regap_testing import batch_inputs, logits_of
from tiny_models import save_tiny

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _declare(folder: Path, quantization: dict, *, where: str | None = None) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (config[where] if where else config)["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def gguf_labelled(dense, tmp_path_factory) -> Path:
    """The same folder as transformers leaves it after a GGUF load: dense safetensors, a
    quantization_config of quant_method gguf."""
    folder = tmp_path_factory.mktemp("models") / "llama-gguf"
    shutil.copytree(dense, folder)
    return _declare(folder, {"quant_method": "gguf"})


def test_gguf_folder_loads_as_its_dense_weights(dense, gguf_labelled):
    loaded = load_model(gguf_labelled)
    model = loaded.model
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert "quantization_config" not in model.config.to_dict()
    stored = _tensors(gguf_labelled / "model.safetensors")
    state = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name  # bit for bit in fp32
    plain = load_model(dense)
    inputs = batch_inputs(loaded.adapter, loaded.processor)
    assert torch.equal(logits_of(model, inputs), logits_of(plain.model, inputs))
    assert loaded.fingerprint == plain.fingerprint


def test_gguf_folder_dequantizes_into_the_export_dtype(gguf_labelled):
    model = load_model(gguf_labelled, dtype="fp16").model
    state = model.state_dict()
    for name, tensor in _tensors(gguf_labelled / "model.safetensors").items():
        assert state[name].dtype == torch.float16 and torch.equal(state[name], tensor.to(torch.float16)), name


def test_gguf_folder_calibrates_and_exports(gguf_labelled, tmp_path):
    """The issue's failure: calibrate worked, export died in save_pretrained (not serializable)."""
    data = tmp_path / "data.jsonl"
    records = [{"id": f"{label}{i}", "instruction": f"{text} number {i}.", "label": label}
               for label, text in (("harmful", "Explain how to break into house"),
                                   ("harmless", "Explain how to plant tomato variety")) for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    directions = tmp_path / "directions"
    result = invoke("calibrate", gguf_labelled, "--data", data, "--out", directions)
    assert result.exit_code == 0, result.output
    out = tmp_path / "corrected"
    result = invoke("export", gguf_labelled, "--directions", directions, "--out", out, "--format", "safetensors")
    assert result.exit_code == 0, result.output
    corrected = out / "corrected" if (out / "corrected").is_dir() else out
    config = json.loads((corrected / "config.json").read_text())
    assert "quantization_config" not in config
    stored, written = _tensors(gguf_labelled / "model.safetensors"), _tensors(corrected / "model.safetensors")
    assert written.keys() == stored.keys() and all(torch.equal(written[k], stored[k]) for k in stored)
    loaded = load_corrected(corrected)
    assert loaded.fingerprint == config["regap"]["model_fingerprint"]


@pytest.mark.parametrize("quantization,where", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None),
    ({"quant_method": "gptq", "bits": 4}, None),
    ({"quant_method": "fp8"}, "text_config"),
    ({"bits": 4}, None),
])
def test_other_quantizations_are_refused_before_any_work(tmp_path, quantization, where):
    """config.json alone: no weights in the folder, yet the refusal names the method (the
    weights were never looked at)."""
    family = "llava" if where else "llama"
    folder = tmp_path / family
    save_tiny(family, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    _declare(folder, quantization, where=where)
    method = quantization.get("quant_method", "unknown")
    with pytest.raises(ModelError) as caught:
        load_model(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert f"quantized with {method};" in message
    assert f"field '{where + '.' if where else ''}quantization_config.quant_method'" in message
    result = invoke("calibrate", folder, "--out", tmp_path / "directions")
    assert result.exit_code == 2
    assert f"quantized with {method};" in result.output and "Traceback" not in result.output
