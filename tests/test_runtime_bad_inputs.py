"""Inputs the ONNX runtime refuses with a clear message, and the exporter's external-data rule."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from test_onnx_export import exported  # noqa: E402

from regap_export.errors import RegapError  # noqa: E402
from regap_export.export import onnx_export  # noqa: E402
from regap_export.models import vision_runtime_for  # noqa: E402
from regap_export.runtime import OrtSessions, position_ids_from_mask  # noqa: E402

QWEN_CONFIG = {"vision_config": {"spatial_merge_size": 2, "patch_size": 14, "window_size": None}}


def test_position_ids_of_the_wrong_rank_are_refused():
    sessions = OrtSessions.open(exported("regap").folder)
    ids, mask = np.array([[5, 17, 99]]), np.ones((1, 3), dtype=np.int64)
    mrope_like = np.broadcast_to(position_ids_from_mask(mask), (3, 1, 3))
    with pytest.raises(RegapError, match="position_ids of rank 2"):
        sessions.run_decoder(ids, mask, mrope_like, sessions.empty_past(1))


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
