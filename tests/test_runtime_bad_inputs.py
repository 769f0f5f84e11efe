"""Inputs the ONNX runtime refuses with a clear message, and the exporter's external-data rule."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from onnx_exports import exported  # noqa: E402

from regap_export.errors import RegapError  # noqa: E402
from regap_export.export import onnx_export  # noqa: E402
from regap_export.models import vision_runtime_for  # noqa: E402
from regap_export.models.qwen2_vl import mrope_positions  # noqa: E402
from regap_export.runtime import OrtSessions, generate, position_ids_from_mask  # noqa: E402

QWEN_CONFIG = {"vision_config": {"spatial_merge_size": 2, "patch_size": 14, "window_size": None}}


def test_position_ids_of_the_wrong_rank_are_refused():
    sessions = OrtSessions.open(exported("regap").folder)
    ids, mask = np.array([[5, 17, 99]]), np.ones((1, 3), dtype=np.int64)
    mrope_like = np.broadcast_to(position_ids_from_mask(mask), (3, 1, 3))
    with pytest.raises(RegapError, match="position_ids of rank 2"):
        sessions.run_decoder(ids, mask, mrope_like, sessions.empty_past(1))


@pytest.mark.parametrize("ids", [np.array([5, 17, 99]), np.zeros((1, 1, 3), dtype=np.int64)])
def test_a_bad_input_ids_shape_raises_the_same_error_everywhere(ids):
    sessions = OrtSessions.open(exported("regap").folder)
    calls = [lambda: generate(sessions, ids, max_new_tokens=1), lambda: sessions.positions.prefill(ids, None),
             lambda: mrope_positions(ids, None, image_token_id=9, spatial_merge_size=2)]
    raised = set()
    for call in calls:
        with pytest.raises(RegapError, match=r"input_ids must be \[batch, seq\]") as info:
            call()
        raised.add((type(info.value), info.value.field))
    assert raised == {(RegapError, "input_ids")}


def test_a_mask_of_another_shape_is_refused():
    sessions = OrtSessions.open(exported("regap").folder)
    with pytest.raises(RegapError, match="attention_mask has shape"):
        generate(sessions, np.array([[5, 17, 99]]), np.ones((1, 2), dtype=np.int64), max_new_tokens=1)


def test_qwen_vl_images_need_their_grid():
    prepare = vision_runtime_for("qwen2_vl").prepare
    with pytest.raises(RegapError, match="needs image_grid_thw"):
        prepare(QWEN_CONFIG, pixel_values=np.zeros((16, 1176), np.float32))


def test_qwen_vl_patches_must_match_the_grid():
    prepare = vision_runtime_for("qwen2_vl").prepare
    with pytest.raises(RegapError, match="do not hold the 16 patches"):
        prepare(QWEN_CONFIG, pixel_values=np.zeros((12, 1176), np.float32), image_grid_thw=np.array([[1, 4, 4]]))
    feeds = prepare(QWEN_CONFIG, pixel_values=np.zeros((16, 1176), np.float32), image_grid_thw=np.array([[1, 4, 4]]))
    assert feeds["cu_seqlens"].tolist() == [0, 16] and feeds["vision_position_ids"].shape == (16, 2)


@pytest.mark.matrix
def test_graphs_over_the_threshold_use_external_data(tmp_path, monkeypatch):
    """Automatic rule: weights above EXTERNAL_DATA_BYTES go to <file>.data (an inline save
    holds a second copy of every weight in memory)."""
    from regap_export.models.loading import load_model
    from tiny_models import save_tiny

    loaded = load_model(save_tiny("llama", tmp_path / "model"))
    small = onnx_export.export_text_decoder(loaded.model, loaded.adapter, tmp_path / "inline")
    assert not small.with_name(small.name + ".data").exists()
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1024)
    large = onnx_export.export_text_decoder(loaded.model, loaded.adapter, tmp_path / "external")
    assert large.with_name(large.name + ".data").is_file()


def test_sampling_temperature_must_be_positive():
    from regap_export.errors import RegapError
    from regap_export.runtime.generate import _select

    logits = np.zeros((1, 8), dtype=np.float32)
    with pytest.raises(RegapError, match="temperature must be positive") as caught:
        _select(logits, np.random.default_rng(0), True, 0.0, 0, 1.0)
    assert caught.value.field == "temperature"


def test_scaled_correction_without_regap_alpha_names_the_input():
    import torch

    from regap_export.method.correction import RegapCorrection
    from regap_export.errors import RegapError
    from regap_export.method.folding import SCALED, LayerCorrection

    layer = RegapCorrection(LayerCorrection(0, SCALED, torch.ones(4)))
    assert torch.equal(layer(torch.zeros(1, 2, 4), regap_alpha=torch.zeros(1)), torch.zeros(1, 2, 4))
    with pytest.raises(RegapError, match="needs regap_alpha") as caught:
        layer(torch.zeros(1, 2, 4))
    assert caught.value.field == "regap_alpha"


def test_a_continued_chat_needs_a_cache_it_continues():
    """generate(past=...): the cache of this export and batch, shorter than the conversation."""
    sessions = OrtSessions.open(exported("regap").folder)
    ids, mask = np.array([[5, 17, 99, 4]]), np.ones((1, 4), dtype=np.int64)
    first = generate(sessions, ids, mask, max_new_tokens=3, eos_token_id=[])
    with pytest.raises(RegapError, match="must continue it"):
        generate(sessions, ids, mask, past=first.cache, max_new_tokens=1)
    with pytest.raises(RegapError, match="past holds 2 tensors"):
        generate(sessions, first.sequences, np.ones_like(first.sequences), past=first.cache[:2], max_new_tokens=1)
    twice = np.concatenate([first.sequences] * 2)
    with pytest.raises(RegapError, match="past is for a batch of 1, input_ids for 2"):
        generate(sessions, twice, np.ones_like(twice), past=first.cache, max_new_tokens=1)


def test_regap_seq_does_not_continue_a_cache():
    sessions = OrtSessions.open(exported("seq").folder)
    ids, mask = np.array([[5, 17, 99, 4]]), np.ones((1, 4), dtype=np.int64)
    first = generate(sessions, ids, mask, max_new_tokens=2, eos_token_id=[])
    with pytest.raises(RegapError, match="does not continue a cache") as info:
        generate(sessions, first.sequences, np.ones_like(first.sequences), past=first.cache, max_new_tokens=1)
    assert "without past" in info.value.hint


def test_a_contract4_marker_folder_is_refused(tmp_path):
    import json

    from regap_export.errors import ArtifactError
    from regap_testing import copy_of, rehash

    folder = copy_of(exported("regap").folder.parent, tmp_path)
    config_path = folder / "onnx" / "regap_onnx.json"
    config = json.loads(config_path.read_text())
    config.update(contract="onnx contract 4", image_rows="marked")
    config_path.write_text(json.dumps(config))
    rehash(folder)
    with pytest.raises(ArtifactError, match="modality marker") as info:
        OrtSessions.open(folder / "onnx")
    assert "re-export" in info.value.hint


@pytest.mark.parametrize("precision,message", [("fp8", "unknown precision 'fp8'"),
                                               ({"decoder": "int3"}, "unknown precision 'int3' for decoder")])
def test_unknown_precisions_are_refused(precision, message):
    with pytest.raises(RegapError, match=message):
        OrtSessions.open(exported("regap").folder, precision=precision)
