"""The corrected folder under transformers 4.x: read as the same model, or refused.

transformers 5 writes RoPE only as ``rope_parameters``, which 4.x ignores; the corrected
config.json also carries 4.x's keys (``config_compat``), and ``modeling_regap.py`` refuses
the families and folders 4.x would read as another model. The slow tests install
transformers 4.57.6 once (tests/pinned_transformers.py) and load our folders there as a user
would, ``AutoModel*.from_pretrained(folder, trust_remote_code=True)``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from regap_export.calibration.directions_io import DirectionsFile
from regap_export.export.config_compat import (MIN_TRANSFORMERS_V4, MIN_TRANSFORMERS_V5, V4_UNREADABLE,
                                               transformers4_compat, v4_keys)
from regap_export.export.load import load_corrected
from regap_export.export.safetensors_export import write_corrected_checkpoint
from regap_export.models.loading import load_model

from regap_testing import batch_inputs, logits_of, options_for, realistic_directions, with_manifest
from tiny_models import TINY_FAMILIES, save_tiny

TOL = 1e-4  # fp32, two transformers versions' kernels
# Non-default RoPE, so that 4.x's class defaults (theta 10000 or 1e6, no scaling) would show.
LLAMA_ROPE = {"rope_type": "llama3", "rope_theta": 100000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
QWEN_VL_THETA = 300000.0


# -- config_compat (fast) ----------------------------------------------------------------
def test_flat_rope_parameters_get_v4_keys():
    config = {"model_type": "llama", "rope_parameters": dict(LLAMA_ROPE, partial_rotary_factor=0.5)}
    out, problems = v4_keys(config)
    assert problems == []
    assert out["rope_theta"] == 100000.0
    assert out["rope_scaling"] == {k: v for k, v in LLAMA_ROPE.items() if k != "rope_theta"}
    assert out["partial_rotary_factor"] == 0.5
    assert out["rope_parameters"] == config["rope_parameters"] and "rope_theta" not in config  # input unchanged
    plain, _ = v4_keys({"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert plain["rope_theta"] == 5e5 and plain["rope_scaling"] is None


def test_transformers5_values_win_over_stale_v4_keys():
    out, _ = v4_keys({"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                      "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}})
    assert out["rope_theta"] == 100000.0 and out["rope_scaling"] is None


def test_gemma3_per_layer_type_rope():
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    out, problems = v4_keys({"model_type": "gemma3_text", "rope_parameters": rope})
    assert problems == []
    assert (out["rope_theta"], out["rope_scaling"], out["rope_local_base_freq"]) == (
        1e6, {"rope_type": "linear", "factor": 8.0}, 1e4)
    rope["sliding_attention"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    _, problems = v4_keys({"model_type": "gemma3_text", "rope_parameters": rope})
    assert len(problems) == 1 and "sliding_attention" in problems[0]


def test_qwen_vl_keys_and_unexpressible_vision_theta():
    config = {"model_type": "qwen2_vl", "tie_word_embeddings": True,
              "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                  "mrope_section": [2, 3, 3]}},
              "vision_config": {"rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}}
    out, problems = v4_keys(config)
    assert problems == []
    assert out["text_config"]["rope_theta"] == 1e6
    assert out["text_config"]["rope_scaling"] == {"rope_type": "default", "mrope_section": [2, 3, 3]}
    assert out["text_config"]["tie_word_embeddings"] is True  # 4.x ties by the text config
    assert "rope_theta" not in out["vision_config"]
    config["vision_config"]["rope_parameters"]["rope_theta"] = 20000.0
    _, min_version, reason = transformers4_compat(config)
    assert min_version == MIN_TRANSFORMERS_V5 and "vision_config.rope_parameters.rope_theta is 20000" in reason


def test_families_4x_reads_differently_are_marked():
    for model_type in ("llava", "llava_next", "idefics3"):
        _, min_version, reason = transformers4_compat({"model_type": model_type})
        assert min_version == MIN_TRANSFORMERS_V5 and reason == V4_UNREADABLE[model_type]
    _, min_version, reason = transformers4_compat({"model_type": "llama",
                                                   "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}})
    assert (min_version, reason) == (MIN_TRANSFORMERS_V4, None)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_transformers5_reads_the_same_config_back(family, tmp_path):
    """The added keys change nothing for transformers 5: every family's config, with v4 keys,
    loads to the same config object (rope_parameters included)."""
    from transformers import AutoConfig

    source = save_tiny(family, tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    text = config.get("text_config", config)
    if "full_attention" not in text["rope_parameters"]:
        text["rope_parameters"].update(rope_theta=123456.0)
    (source / "config.json").write_text(json.dumps(config))
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / "config.json").write_text(json.dumps(v4_keys(config)[0]))
    before, after = AutoConfig.from_pretrained(source).to_dict(), AutoConfig.from_pretrained(compat).to_dict()
    assert after.pop("_name_or_path") != before.pop("_name_or_path")
    text = before.get("text_config")
    if text is not None and text.get("tie_word_embeddings") is None:
        # The one added key transformers 5 keeps: the text config's copy of the top-level value
        # (transformers 5 ties the LM head by the top-level key).
        text["tie_word_embeddings"] = before["tie_word_embeddings"]
    assert after == before


# -- transformers 4.57 (slow) ------------------------------------------------------------
@pytest.fixture(scope="module")
def tf4():
    from pinned_transformers import TransformersUnavailable, transformers4_dir

    try:
        return transformers4_dir()
    except TransformersUnavailable as exc:
        pytest.skip(f"transformers 4.x cannot be installed without network: {exc}")


def _export(family: str, root: Path, edit) -> tuple[Path, dict, str]:
    """A corrected folder (mode regap) of tiny ``family`` whose config.json ``edit`` changed."""
    source = save_tiny(family, root / f"{family}-source")
    config = json.loads((source / "config.json").read_text())
    edit(config.get("text_config", config))
    (source / "config.json").write_text(json.dumps(config))
    loaded = load_model(source)
    inputs = batch_inputs(loaded.adapter, loaded.processor)
    options = options_for("regap")
    directions = realistic_directions(loaded.model, loaded.adapter, inputs, options)
    out = root / f"{family}-corrected"
    out.mkdir()
    write_corrected_checkpoint(loaded, DirectionsFile(directions, options, loaded.fingerprint, "ab" * 32,
                                                      str(source)), options, out)
    with_manifest(out)
    return out, dict(inputs), loaded.adapter.auto_class_name


def _theta(value: float):
    return lambda c: c["rope_parameters"].update(rope_theta=value)


def _gemma3(c):
    c["rope_parameters"]["full_attention"].update(rope_type="linear", factor=4.0, rope_theta=500000.0)
    c["rope_parameters"]["sliding_attention"].update(rope_theta=20000.0)


# The families transformers 4.57 reads as the same model (config.json's min_transformers
# "4.57.0"), each with RoPE that 4.x's defaults would get wrong, and the text rope_theta 4.x
# must read.
SAME_UNDER_4X = {
    "llama": (lambda c: c.update(rope_parameters=dict(LLAMA_ROPE)), LLAMA_ROPE["rope_theta"]),
    "qwen2": (_theta(200000.0), 200000.0),
    "qwen3": (_theta(200000.0), 200000.0),
    "mistral": (_theta(200000.0), 200000.0),
    "gemma2": (_theta(200000.0), 200000.0),
    "gemma3_text": (_gemma3, 500000.0),
    "qwen2_vl": (_theta(QWEN_VL_THETA), QWEN_VL_THETA),
    "qwen2_5_vl": (_theta(QWEN_VL_THETA), QWEN_VL_THETA),
}
REFUSED_UNDER_4X = ["llava", "llava_next", "idefics3"]
assert sorted(REFUSED_UNDER_4X) == sorted(V4_UNREADABLE)
assert sorted([*SAME_UNDER_4X, *REFUSED_UNDER_4X]) == sorted(TINY_FAMILIES)


@pytest.fixture(scope="module")
def under_4x(tf4, tmp_path_factory):
    """Every family's corrected folder, and two damaged copies of the Llama one, loaded once
    under transformers 4.57 (one interpreter). Returns {name: (result, v4 logits, v5 logits
    (None for refused folders), inputs)}."""
    from pinned_transformers import run_transformers4

    root = tmp_path_factory.mktemp("tf4")
    folders = {family: _export(family, root, edit) for family, (edit, _) in SAME_UNDER_4X.items()}
    folders.update({family: _export(family, root, _theta(100000.0)) for family in REFUSED_UNDER_4X})
    out, inputs, auto = folders["llama"]
    # As regap-export wrote it before the v4 keys: no min_transformers, no rope_theta.
    legacy = root / "llama-legacy"
    shutil.copytree(out, legacy)
    config = json.loads((legacy / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key, None)
    for key in ("min_transformers", "min_transformers_reason"):
        config["regap"].pop(key, None)
    (legacy / "config.json").write_text(json.dumps(config))
    # Edited by hand: rope_theta no longer agrees with rope_parameters.
    edited = root / "llama-edited"
    shutil.copytree(out, edited)
    config = json.loads((edited / "config.json").read_text())
    config["rope_theta"] = 10000.0
    (edited / "config.json").write_text(json.dumps(config))
    folders["legacy"], folders["edited"] = (legacy, inputs, auto), (edited, inputs, auto)

    jobs = []
    for name, (folder, inputs, auto) in folders.items():
        torch.save(inputs, root / f"{name}-inputs.pt")
        jobs.append({"folder": str(folder), "auto_class": auto, "inputs": str(root / f"{name}-inputs.pt"),
                     "out": str(root / f"{name}-v4.pt")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    script = Path(__file__).with_name("transformers4_load.py")
    proc = run_transformers4(script, root / "jobs.json", modules_cache=root / "modules")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((root / "jobs.json.result.json").read_text())
    out = {}
    for (name, (folder, inputs, _)), result in zip(folders.items(), results):
        assert result["transformers"] == "4.57.6"
        v4 = torch.load(root / f"{name}-v4.pt") if "error" not in result else None
        v5 = logits_of(load_corrected(folder).model, inputs) if name in SAME_UNDER_4X else None
        out[name] = (result, v4, v5, inputs)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAME_UNDER_4X))
def test_transformers4_reads_the_same_corrected_model(under_4x, name):
    result, v4, v5, inputs = under_4x[name]
    theta = SAME_UNDER_4X[name][1]
    assert "error" not in result, result
    assert result["class"].startswith("Regap") and result["corrections"] == 4
    real = inputs["attention_mask"].bool()  # padded positions are not compared
    assert (v4 - v5)[real].abs().max().item() <= TOL
    assert result["rope_theta"] == theta


@pytest.mark.slow
@pytest.mark.parametrize("name", REFUSED_UNDER_4X)
def test_transformers4_refuses_families_it_reads_differently(under_4x, name):
    result = under_4x[name][0]
    assert result.get("error", "").startswith("ValueError: this ReGap-corrected checkpoint needs transformers >= "
                                              "5.0.0, found 4.57.6: "), result
    assert V4_UNREADABLE[name] in result["error"]


@pytest.mark.slow
def test_transformers4_refuses_a_folder_without_v4_keys(under_4x):
    result = under_4x["legacy"][0]
    assert "needs transformers >= 5.0.0" in result.get("error", ""), result
    assert "lacks the keys transformers 4.x reads" in result["error"]


@pytest.mark.slow
def test_transformers4_refuses_a_disagreeing_rope_theta(under_4x):
    result = under_4x["edited"][0]
    assert "rope_theta 10000.0 disagrees with rope_parameters.rope_theta 100000.0" in result.get("error", ""), result


@pytest.mark.slow
def test_transformers4_reads_the_real_smollm2_checkpoint(tf4, tmp_path):
    """The issue's case: the corrected SmolLM2-135M folder (RoPE theta 100000, which transformers
    5 writes only inside rope_parameters) under transformers 4.57: theta 100000 and the same
    logits as transformers 5, not a silently different model (without the v4 keys, 4.57 reads
    theta 10000 and the logits differ by up to 14.6)."""
    from pinned_transformers import run_transformers4

    loaded = load_model("embedded:smollm2")
    assert loaded.model.config.rope_parameters["rope_theta"] == 100000.0
    inputs = dict(batch_inputs(loaded.adapter, loaded.processor))
    options = options_for("regap")
    directions = realistic_directions(loaded.model, loaded.adapter, inputs, options)
    out = tmp_path / "corrected"
    out.mkdir()
    write_corrected_checkpoint(loaded, DirectionsFile(directions, options, loaded.fingerprint, "ab" * 32,
                                                      "embedded:smollm2"), options, out)
    with_manifest(out)
    del loaded
    v5 = logits_of(load_corrected(out).model, inputs)
    torch.save(inputs, tmp_path / "inputs.pt")
    jobs = [{"folder": str(out), "auto_class": "AutoModelForCausalLM", "inputs": str(tmp_path / "inputs.pt"),
             "out": str(tmp_path / "v4.pt")}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = run_transformers4(Path(__file__).with_name("transformers4_load.py"), tmp_path / "jobs.json",
                             modules_cache=tmp_path / "modules")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "jobs.json.result.json").read_text())[0]
    assert "error" not in result, result
    v4 = torch.load(tmp_path / "v4.pt")
    real = inputs["attention_mask"].bool()
    assert (v4 - v5)[real].abs().max().item() <= TOL
    assert torch.equal(v4[real].argmax(-1), v5[real].argmax(-1))
    assert result["class"] == "RegapLlamaForCausalLM" and result["rope_theta"] == 100000.0
