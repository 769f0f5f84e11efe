"""Graphs at the precisions users ship (``export --precision``), the metadata that makes a set of
graphs refuse loudly when it is not the one an export wrote, and the two-turn chat, on one tiny
SmolVLM-shaped (Idefics3) export with the default positions (last+generated)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from regap_export.errors import ArtifactError, RegapError
from regap_export.export.onnx_graph import correction_nodes, correction_values, set_correction_values
from regap_export.io.artifacts import read_config, read_manifest
from regap_export.io.graph_metadata import EXPORT_ID_KEY, PRECISION_KEY, PRECISIONS
from regap_export.method.modality import prompt_mask, rows_with_image
from regap_export.models.base import cache_of, pixel_inputs, with_cache
from regap_export.runtime import OrtSessions
from regap_export.runtime.generate import generate
from regap_testing import batch_inputs, copy_of, options_for, rehash, write_directions
from tiny_models import save_tiny

ALL = ("fp32", "fp16", "q4f16", "q8", "q4")
GATED = ["MatMul", "Add", "Sigmoid", "Mul", "Mul", "Add"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from regap_export.export.pipeline import export_to_folder

    root = tmp_path_factory.mktemp("precisions")
    model = save_tiny("idefics3", root / "model")
    directions = write_directions(model, root / "dirs", options_for("regap", positions="last+generated"))
    return export_to_folder(str(model), directions, root / "out", precisions=ALL)


def image_batch(folder: Path) -> dict[str, np.ndarray]:
    from regap_export.models.loading import load_model

    loaded = load_model(folder)
    return {k: v.numpy() for k, v in batch_inputs(loaded.adapter, loaded.processor, with_image=True).items()}


# -- files, names, constants ---------------------------------------------------------------------
def test_every_precision_has_transformers_js_names_and_metadata(export):
    config = read_config(export / "onnx")
    assert list(config["precisions"]) == sorted(ALL)
    assert config["precisions"]["fp16"] == {"decoder": "decoder_model_merged_fp16.onnx",
                                           "embed_tokens": "embed_tokens_fp16.onnx",
                                           "vision_encoder": "vision_encoder_fp16.onnx"}
    assert config["precisions"]["q8"]["decoder"] == "decoder_model_merged_quantized.onnx"
    listed = read_manifest(export)["files"]
    ids = set()
    for precision, files in config["precisions"].items():
        for name in files.values():
            assert f"onnx/{name}" in listed
            meta = {p.key: p.value for p in onnx.load(str(export / "onnx" / name), load_external_data=False).metadata_props}
            assert meta[PRECISION_KEY] == precision and meta["regap.onnx_contract"] == "onnx contract 5"
            ids.add(meta[EXPORT_ID_KEY])
    assert ids == {config["export_id"]}
    assert read_manifest(export)["precisions"] == list(ALL)


def test_pixel_inputs_stay_float32_and_embeddings_follow_the_precision(export):
    import onnxruntime as ort

    folder = export / "onnx"
    for precision in ALL:
        files = read_config(folder)["precisions"][precision]
        vision = ort.InferenceSession(str(folder / files["vision_encoder"]), providers=["CPUExecutionProvider"])
        embed = ort.InferenceSession(str(folder / files["embed_tokens"]), providers=["CPUExecutionProvider"])
        float_type = "tensor(float16)" if PRECISIONS[precision].io_dtype == "float16" else "tensor(float)"
        assert vision.get_inputs()[0].type == "tensor(float)", precision
        assert vision.get_outputs()[0].type == embed.get_outputs()[0].type == float_type, precision


def test_correction_constants_survive_every_precision(export):
    """Same names and values in every precision (never quantized), float16 in the float16 graphs."""
    folder = export / "onnx"
    files = read_config(folder)["precisions"]
    want = correction_values(folder / files["fp32"]["decoder"])
    assert want and all(v["w"].dtype == np.float32 for v in want.values() if "w" in v)
    for precision in ALL:
        got = correction_values(folder / files[precision]["decoder"])
        assert got.keys() == want.keys()
        for layer, tensors in want.items():
            for key, value in tensors.items():
                expected = value.astype(np.float16) if precision in ("fp16", "q4f16") else value
                np.testing.assert_array_equal(got[layer][key], expected, err_msg=f"{precision} regap.{layer}.{key}")


def test_every_precision_costs_six_ops_per_gated_layer(export):
    """The float32 chain in every precision: no Cast in the float16 graphs (a graph traced in float16
    had 8 ops per gated layer, two of them Casts of the whole hidden state)."""
    folder = export / "onnx"
    files = read_config(folder)["precisions"]
    for precision in ALL:
        nodes = correction_nodes(folder / files[precision]["decoder"])
        gated = [ops for ops in nodes.values() if "Sigmoid" in ops]
        assert gated and all(ops == GATED for ops in gated), (precision, nodes)
        assert all(ops == ["Mul", "Add"] for ops in nodes.values() if "Sigmoid" not in ops), (precision, nodes)


def test_set_correction_values_edits_a_converted_graph(export, tmp_path):
    folder = export / "onnx"
    path = folder / read_config(folder)["precisions"]["fp16"]["decoder"]
    values = correction_values(path)
    layer = next(iter(values))
    edited = set_correction_values(path, {layer: {"v": np.zeros_like(values[layer]["v"])}}, tmp_path / "edited.onnx")
    assert not correction_values(edited)[layer]["v"].any()


# -- every precision corrects image prompts and leaves text alone ----------------------------------
@pytest.mark.parametrize("precision", ALL)
def test_each_precision_corrects_images_and_leaves_text_exactly(export, precision):
    sessions = OrtSessions.open(export / "onnx", precision=precision)
    inputs = image_batch(export)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pixels = pixel_inputs(inputs)
    on = generate(sessions, ids, mask, max_new_tokens=2, eos_token_id=[], **pixels)
    off = generate(sessions, ids, mask, max_new_tokens=2, eos_token_id=[], correct=False, **pixels)
    assert np.abs(on.first_logits - off.first_logits).max() > 1e-2  # the correction acts on image prompts
    text_ids = np.where(ids == sessions.image_token_id, 5, ids)
    on = generate(sessions, text_ids, mask, max_new_tokens=2, eos_token_id=[])
    off = generate(sessions, text_ids, mask, max_new_tokens=2, eos_token_id=[], correct=False)
    assert np.array_equal(on.first_logits, off.first_logits)  # text: the very same graphs' numbers


# -- validate ------------------------------------------------------------------------------------
def test_validate_judges_every_precision_by_its_rule(export, tmp_path):
    from regap_export.validation.parity import PRECISION_RULES, validate_folder

    report = validate_folder(export, write=False, decode_steps=2, greedy_tokens=4)
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    assert report["precisions"] == list(ALL) and report["rules"] == {p: PRECISION_RULES[p] for p in ALL}
    checked = {(c["precision"], c["inputs"], c["quantity"]) for c in report["checks"] if c["target"] != "pytorch"}
    for precision in ALL:
        for inputs in ("text", "image"):
            assert {(precision, inputs, q) for q in ("prefill logits", "present", "decode logits")} <= checked
    quantized = [c for c in report["checks"] if c["precision"] == "q8" and c["quantity"] == "prefill logits"]
    assert all("uncorrected vs the unmodified model" in c["detail"] for c in quantized)


def test_validate_fails_a_quantized_graph_without_its_correction(export, tmp_path):
    """q8's rule can fail: the same graphs with the correction's constants zeroed are farther from the
    corrected reference than quantization moves the unmodified model."""
    from regap_export.validation.parity import validate_folder

    folder = copy_of(export, tmp_path)
    path = folder / "onnx" / read_config(folder / "onnx")["precisions"]["q8"]["decoder"]
    values = correction_values(path)
    set_correction_values(path, {layer: {"v": np.zeros_like(t["v"])} for layer, t in values.items()})
    rehash(folder)
    report = validate_folder(folder, write=False, decode_steps=2, greedy_tokens=4, precisions=["q8"])
    failed = {(c["inputs"], c["quantity"]) for c in report["checks"] if not c["ok"]}
    assert not report["ok"] and ("image", "prefill logits") in failed and all(i == "image" for i, _ in failed)


# -- loud, never silent ----------------------------------------------------------------------------
def _set_metadata(path: Path, key: str, value: str) -> None:
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, str(path))


def test_runtime_and_validate_refuse_a_graph_of_another_export(export, tmp_path):
    from regap_export.validation.parity import validate_folder

    folder = copy_of(export, tmp_path)
    path = folder / "onnx" / "vision_encoder_fp16.onnx"
    _set_metadata(path, EXPORT_ID_KEY, "0" * 32)
    rehash(folder)
    with pytest.raises(ArtifactError, match="comes from another export") as info:
        OrtSessions.open(folder / "onnx", precision="fp16")
    assert "vision_encoder_fp16.onnx" in str(info.value) and "re-export" in info.value.hint
    OrtSessions.open(folder / "onnx", precision="fp32")  # the other precisions' graphs are untouched
    with pytest.raises(ArtifactError, match="comes from another export"):
        validate_folder(folder, write=False, precisions=["fp16"])


def test_runtime_refuses_a_graph_converted_after_export(export, tmp_path):
    """transformers.js's conversion route (ONNX Runtime's float16 converter, constants clamped to
    1e4) applied to our float32 decoder: the metadata still says fp32, the inputs are float16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    folder = copy_of(export, tmp_path)
    path = folder / "onnx" / "decoder_model_merged.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(path)), max_finite_val=1e4, disable_shape_infer=True), str(path))
    rehash(folder)
    with pytest.raises(ArtifactError, match="says fp32 .* is float16: the graph was converted after export") as info:
        OrtSessions.open(folder / "onnx")
    assert "--precision fp16" in info.value.hint


def test_a_graph_without_metadata_is_refused(export, tmp_path):
    folder = copy_of(export, tmp_path)
    path = folder / "onnx" / "embed_tokens.onnx"
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    rehash(folder)
    with pytest.raises(ArtifactError, match="embed_tokens.onnx: it carries no onnx contract 5 metadata"):
        OrtSessions.open(folder / "onnx")


def test_a_precision_the_export_did_not_write_is_refused(export, tmp_path):
    folder = copy_of(export, tmp_path)
    config = read_config(folder / "onnx")
    del config["precisions"]["q4"]
    (folder / "onnx" / "regap_onnx.json").write_text(json.dumps(config))
    rehash(folder)
    with pytest.raises(RegapError, match="holds no q4 graphs") as info:
        OrtSessions.open(folder / "onnx", precision="q4")
    assert "--precision" in info.value.hint


# -- a two-turn chat -------------------------------------------------------------------------------
def _follow_up(folder: Path, batch: int) -> np.ndarray:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)("And in one word?", add_special_tokens=False)["input_ids"]
    return np.tile(np.asarray(ids, dtype=np.int64), (batch, 1))


@torch.no_grad()
def _torch_chat(model, inputs, reply, follow, masks_to, *, hooks=None):
    """The calls a client makes for a two-turn chat: the prompt, one decode step per reply token but
    the last, then the reply's last token and turn 2 in one call. ``masks_to(mask)`` hands each call's
    image mask to the model. Returns each call's logits."""
    from regap_export.models.positions import text_positions

    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    conversation = np.concatenate([ids, reply, follow], axis=1)
    full = np.concatenate([attention, np.ones((ids.shape[0], reply.shape[1] + follow.shape[1]), np.int64)], axis=1)
    positions = text_positions(full)
    cuts = [ids.shape[1]] + [ids.shape[1] + i + 1 for i in range(reply.shape[1] - 1)] + [conversation.shape[1]]
    logits, cache, start = [], None, 0
    for call, end in enumerate(cuts):
        kwargs = dict(input_ids=torch.from_numpy(conversation[:, start:end]),
                      attention_mask=torch.from_numpy(full[:, :end]),
                      position_ids=torch.from_numpy(positions[:, start:end]), use_cache=True,
                      **with_cache(model, cache), **masks_to(call, conversation[:, :start], conversation[:, start:end]))
        if call == 0:
            kwargs.update({k: torch.from_numpy(v) for k, v in pixel_inputs(inputs).items()})
        out = model(**kwargs)
        cache, start = cache_of(out), end
        logits.append(out.logits.float().numpy())
    return logits


def test_a_two_turn_chat_is_the_reference_in_every_runtime(export):
    """Turn 1 about an image, turn 2 in text fed with the cache: the runtime (ONNX Runtime), the
    rewritten PyTorch model and the hook reference compute the same turn-2 logits, and the reference's
    teacher-forced pass over the whole conversation (``call_ends``) gives them too."""
    from regap_export.calibration.directions_io import load_directions
    from regap_export.export.load import load_corrected
    from regap_export.export.pipeline import DIRECTIONS_COPY
    from regap_export.models.loading import load_model
    from regap_export.validation.reference import reference_corrections

    sessions = OrtSessions.open(export / "onnx")
    image = sessions.image_token_id
    inputs = image_batch(export)
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    turn1 = generate(sessions, ids, attention, max_new_tokens=3, eos_token_id=[], **pixel_inputs(inputs))
    follow = _follow_up(export, ids.shape[0])
    conversation = np.concatenate([turn1.sequences, follow], axis=1)
    full = np.ones_like(conversation)
    full[:, :ids.shape[1]] = attention
    turn2 = generate(sessions, conversation, full, past=turn1.cache, max_new_tokens=2, eos_token_id=[])
    # turn 2 of a chat about an image is corrected (at its last token: last+generated)
    off = generate(sessions, conversation, full, past=generate(
        sessions, ids, attention, max_new_tokens=3, eos_token_id=[], correct=False, **pixel_inputs(inputs)).cache,
        max_new_tokens=2, eos_token_id=[], correct=False)
    assert np.abs(turn2.first_logits - off.first_logits).max() > 1e-2

    def masks(call, past, new):
        holds = rows_with_image(past, image) if past.shape[1] else None
        return prompt_mask("last+generated", new, image, past_holds=holds)

    rewritten = load_corrected(export)
    got = _torch_chat(rewritten.model, inputs, turn1.new_tokens, follow,
                      lambda c, p, n: {"regap_image_mask": torch.from_numpy(masks(c, p, n))})
    np.testing.assert_allclose(turn2.first_logits, got[-1][:, -1], atol=1e-4, rtol=1e-4)

    plain = load_model(export)
    bundle = load_directions(export / DIRECTIONS_COPY)
    options = read_manifest(export)["options"]
    from regap_export.options import RegapOptions

    current = {}
    with reference_corrections(plain.model, plain.adapter, bundle.directions, RegapOptions.from_json(options),
                               image_mask=lambda: current.get("m")):
        def hand(c, p, n):
            current["m"] = torch.from_numpy(masks(c, p, n))
            return {}
        reference = _torch_chat(plain.model, inputs, turn1.new_tokens, follow, hand)
    for a, b in zip(got, reference):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)

    # The same conversation teacher-forced in one pass: calls ended at the prompt's last token and at
    # every reply token fed back (all but the reply's last), and at the end.
    prompt = ids.shape[1]
    ends = [prompt - 1] + [prompt + i for i in range(turn1.new_tokens.shape[1] - 1)]
    one_pass = prompt_mask("last+generated", conversation, image, call_ends=ends)
    with torch.no_grad():
        from regap_export.models.positions import text_positions

        out = rewritten.model(input_ids=torch.from_numpy(conversation), attention_mask=torch.from_numpy(full),
                              position_ids=torch.from_numpy(text_positions(full)),
                              regap_image_mask=torch.from_numpy(one_pass),
                              **{k: torch.from_numpy(v) for k, v in pixel_inputs(inputs).items()})
    np.testing.assert_allclose(out.logits[:, -1].float().numpy(), turn2.first_logits, atol=1e-4, rtol=1e-4)


def test_modules_of_one_float_type_mix_and_others_are_refused(export):
    """As transformers.js's per-module dtype: a float16 vision encoder with a q4f16 decoder runs;
    float32 and float16 modules pass embeddings of different types and are refused in one line."""
    sessions = OrtSessions.open(export / "onnx", precision={"vision_encoder": "fp16", "embed_tokens": "fp16",
                                                            "decoder": "q4f16"})
    assert sessions.precisions == {"vision_encoder": "fp16", "embed_tokens": "fp16", "decoder": "q4f16"}
    inputs = image_batch(export)
    generate(sessions, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=1, **pixel_inputs(inputs))
    with pytest.raises(RegapError, match="do not fit together") as info:
        OrtSessions.open(export / "onnx", precision={"vision_encoder": "fp16", "decoder": "fp32"})
    assert "fp16, q4f16 (float16)" in info.value.hint
    with pytest.raises(RegapError, match="no module 'lm_head'"):
        OrtSessions.open(export / "onnx", precision={"lm_head": "fp16"})
