"""Qwen2-VL / Qwen2.5-VL: multimodal ONNX split (M-RoPE decoder, patch-sequence vision
encoder), ONNX Runtime, and validate parity; the numpy M-RoPE positions against transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regap_export.models.positions import position_config, position_scheme
from regap_export.models.qwen2_vl import mrope_positions
from regap_testing import options_for, assert_all_ok, export_and_validate, parity_tier, write_directions
from tiny_models import build_tiny, save_tiny

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_vl_models")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


def parity_cases():
    """Both families x every mode, in the tiers ``regap_testing.parity_tier`` gives."""
    for family in FAMILIES:
        for mode in ("regap", "fixed", "regap-seq"):
            yield pytest.param(family, mode, id=f"{family}-{mode}", marks=parity_tier(family, mode))


@pytest.mark.parametrize("family,mode", parity_cases())
def test_qwen_vl_export_parity(models, tmp_path, family, mode):
    """Rewritten PyTorch and ONNX Runtime match the hook reference on text and image batches:
    prefill logits, KV cache, decode logits, greedy tokens (and regap_alpha in regap-seq)."""
    # The default positions (image rows only), so that the decoder finds image rows by the modality channel.
    directions = write_directions(models[family], tmp_path / "dirs", options_for("regap", positions="last+generated"))
    out = tmp_path / "out"
    report = export_and_validate(models[family], directions, out, "--mode", mode)
    assert_all_ok(report)
    assert json.loads((out / "onnx" / "regap_onnx.json").read_text())["image_rows"] == "channel"
    assert report["mode"] == mode
    assert {c["inputs"] for c in report["checks"]} == {"text", "image"}
    for inputs in ("text", "image"):
        for target in ("pytorch", "onnxruntime-cpu"):
            quantities = {c["quantity"] for c in report["checks"] if c["inputs"] == inputs and c["target"] == target}
            assert {"prefill logits", "present", "decode logits", "greedy tokens"} <= quantities, (inputs, target)
    if mode == "regap-seq":
        assert any(c["quantity"] == "regap_alpha" for c in report["checks"])
    config = json.loads((out / "onnx" / "regap_onnx.json").read_text())
    assert config["position_ids"]["scheme"] == "mrope" and config["position_ids"]["rank"] == 3
    assert sorted(config["files"]) == ["decoder", "embed_tokens", "vision_encoder"]
    windowed = family == "qwen2_5_vl"
    assert ("window_index" in config["vision_inputs"]) == windowed


@pytest.mark.parametrize("family", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=pytest.mark.matrix)])
def test_graphs_contract_and_varied_images(models, tmp_path, family):
    """The decoder takes position_ids [3, batch, seq] with dynamic batch/seq/past; the vision
    encoder matches transformers on images of different sizes encoded together."""
    import onnx
    from typer.testing import CliRunner

    from regap_export.models.loading import load_model
    from regap_export.runtime.session import OrtSessions
    from regap_export.cli import app

    directions = write_directions(models[family], tmp_path / "dirs")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(models[family]), "--directions", str(directions),
                                      "--out", str(out), "--format", "onnx"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False).graph
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert shapes["position_ids"] == [3, "batch_size", "sequence_length"]
    assert shapes["inputs_embeds"][:2] == ["batch_size", "sequence_length"]
    assert shapes["past_key_values.0.key"][2] == "past_sequence_length"

    model = load_model(models[family]).model
    vision = model.config.vision_config
    grid = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 2, 2]])  # three sizes, one small enough for one window
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.cat(model.model.get_image_features(pixels, grid).pooler_output).numpy()
    sessions = OrtSessions.open(out / "onnx")
    got = sessions.image_features(pixel_values=pixels.numpy(), image_grid_thw=grid.numpy())
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- positions

def _left_padded_image_batch(model, image_token_id: int, merge: int):
    """Two rows with different images (sizes and counts) and text lengths, left-padded."""
    start, end = model.config.vision_start_token_id, model.config.vision_end_token_id
    grids = [[1, 4, 6], [1, 8, 4], [1, 2, 2]]  # row 0: one image; row 1: two images

    def image(grid):
        return [start] + [image_token_id] * (grid[0] * grid[1] * grid[2] // merge ** 2) + [end]

    rows = [[5, 6, 7] + image(grids[0]) + [8, 9],
            [5] + image(grids[1]) + [10, 11, 12] + image(grids[2]) + [13]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, torch.tensor(grids)


@pytest.mark.parametrize("family", FAMILIES)
def test_mrope_positions_match_transformers(family):
    """The runtime's numpy M-RoPE positions equal transformers' get_rope_index on a left-padded
    batch with images (attention mask given), and decode steps continue them as rope_deltas does."""
    model, _ = build_tiny(family)
    inner = model.model
    settings = position_config("qwen2_vl", model.config)
    ids, mask, grids = _left_padded_image_batch(model, settings["image_token_id"], settings["spatial_merge_size"])
    assert (mask == 0).any()
    types = (ids == settings["image_token_id"]).long()
    want, deltas = inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grids, attention_mask=mask)
    got = mrope_positions(ids.numpy(), mask.numpy(), image_token_id=settings["image_token_id"],
                          spatial_merge_size=settings["spatial_merge_size"], image_grid_thw=grids.numpy())
    np.testing.assert_array_equal(got, want.numpy())
    # mm_token_type_ids from the processor give the same positions
    np.testing.assert_array_equal(
        mrope_positions(ids.numpy(), mask.numpy(), image_token_id=-1, spatial_merge_size=settings["spatial_merge_size"],
                        image_grid_thw=grids.numpy(), mm_token_type_ids=types.numpy()), want.numpy())
    # decode: transformers' position of the k-th new token is (attended count + k) + rope_delta
    scheme = position_scheme(settings)
    step = scheme.next(got)
    lengths = mask.sum(-1, keepdim=True)
    for k in range(3):
        expected = (lengths + k + deltas).numpy()
        assert step.shape == (3, 2, 1)
        np.testing.assert_array_equal(step[:, :, 0], np.broadcast_to(expected[:, 0], (3, 2)))
        step = scheme.next(step)


def test_mrope_positions_refuse_mismatched_grids():
    from regap_export.errors import RegapError

    ids = np.array([[1, 9, 9, 9, 9, 2]])
    with pytest.raises(RegapError, match="merges to"):
        mrope_positions(ids, None, image_token_id=9, spatial_merge_size=2, image_grid_thw=np.array([[1, 4, 6]]))
    with pytest.raises(RegapError, match="image_grid_thw has 1 rows"):
        mrope_positions(np.array([[1, 2]]), None, image_token_id=9, spatial_merge_size=2,
                        image_grid_thw=np.array([[1, 2, 2]]))
