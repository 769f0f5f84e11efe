"""The modality marker (ONNX contract 4): exact marking and unmarking, and the decoder's
in-graph mask (``export.image_rows``) equal to the mask a caller computes from ``input_ids``
(``modality.prompt_mask`` / ``step_mask``) for a prompt followed by decode steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from regap_export.export.image_rows import find_image_rows, mark_features, mark_key_cache
from regap_export.method.modality import (
    MARK_SCALE, marked_rows, prompt_mask, rows_with_image, step_mask, unmark, unmark_key_cache,
)

IMAGE = 7


def awkward_floats(rng: np.random.Generator, shape) -> np.ndarray:
    """Values across the marker's domain (|x| < 2**32): many exponents, negatives, exact zeros
    and float32 subnormals."""
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 9, shape)).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7] = 0.0
    flat[3::11] = np.float32(1e-42)  # subnormal
    flat[5::13] = -np.float32(3e-40)
    return x


def test_mark_and_unmark_are_exact():
    rng = np.random.default_rng(0)
    features = awkward_floats(rng, (4, 9, 16))
    marked = mark_features(torch.from_numpy(features)).numpy()
    assert marked_rows(marked).all()
    back = unmark(marked)
    assert back.dtype == np.float32 and np.array_equal(back.view(np.uint32), features.view(np.uint32))


def test_unmark_leaves_text_rows_alone():
    rng = np.random.default_rng(1)
    text = rng.standard_normal((2, 5, 8)).astype(np.float32) * 50
    embeds = text.copy()
    embeds[0, 2] = embeds[0, 2] * np.float32(MARK_SCALE)
    assert marked_rows(embeds).tolist() == [[False, False, True, False, False], [False] * 5]
    assert np.array_equal(unmark(embeds), text)
    assert unmark(text) is text or np.array_equal(unmark(text), text)


def test_key_cache_marks_are_exact():
    rng = np.random.default_rng(2)
    keys = awkward_floats(rng, (2, 3, 6, 4))
    keys[:, :, :, 0] += 1.0  # no all-zero key row
    marks = torch.tensor([[True, False, False, True, True, False], [False] * 6])
    marked = mark_key_cache(torch.from_numpy(keys), marks).numpy()
    assert marked_rows(marked, axis=(1, 3)).tolist() == marks.tolist()
    assert np.array_equal(unmark_key_cache(marked).view(np.uint32), keys.view(np.uint32))


def prompt_batch(rng):
    """Left-padded ids [3, 10]: two rows with an image run at different places, one without."""
    ids = rng.integers(10, 50, (3, 10))
    ids[0, 3:6] = IMAGE
    ids[1, 6:9] = IMAGE
    ids[2, :2] = 0  # padding
    return ids


@pytest.mark.parametrize("positions", ["last+generated", "image"])
def test_in_graph_mask_equals_the_callers_mask(positions):
    """Prefill, then three decode steps, then a teacher-forced continuation of two tokens:
    the mask found from marked rows equals modality's mask from input_ids at every call."""
    rng = np.random.default_rng(3)
    ids = prompt_batch(rng)
    hidden, heads, head_dim = 8, 2, 4
    embeds = torch.from_numpy(rng.standard_normal((*ids.shape, hidden)).astype(np.float32))
    image = torch.from_numpy(ids == IMAGE)
    embeds = torch.where(image[..., None], mark_features(embeds), embeds)
    empty = torch.zeros(3, heads, 0, head_dim)

    rows = find_image_rows(embeds, empty, positions)
    assert np.array_equal(rows.mask.numpy(), prompt_mask(positions, ids, IMAGE))
    assert rows.marks.tolist() == image.tolist()
    assert not marked_rows(rows.embeds.numpy()).any()

    # The cache the graph returns: layer-0 keys marked at the image positions.
    cache = mark_key_cache(torch.randn(3, heads, ids.shape[1], head_dim), rows.marks)
    want_step = step_mask(positions, rows_with_image(ids, IMAGE))
    for _ in range(3):
        step = torch.randn(3, 1, hidden)
        rows = find_image_rows(step, cache, positions)
        assert np.array_equal(rows.mask.numpy(), want_step)
        assert not marked_rows(rows.past_key.numpy(), axis=(1, 3)).any()
        cache = mark_key_cache(torch.cat([rows.past_key, torch.randn(3, heads, 1, head_dim)], dim=2), rows.marks)

    prompt_cache = cache[:, :, : ids.shape[1]]
    rows = find_image_rows(torch.randn(3, 2, hidden), prompt_cache, positions)
    forced = np.concatenate([ids, rng.integers(10, 50, (3, 2))], axis=1)
    want = prompt_mask(positions, forced, IMAGE, prompt_length=ids.shape[1])[:, ids.shape[1]:]
    assert np.array_equal(rows.mask.numpy(), want)


def test_a_marked_graph_refuses_a_mask_and_says_why():
    from onnx_exports import exported
    from regap_export.errors import RegapError
    from regap_export.runtime import OrtSessions

    sessions = OrtSessions.open(exported("idefics3").folder)
    assert sessions.marks_image_rows and not sessions.has_image_mask
    embeds = np.zeros((1, 3, sessions.config["hidden_size"]), dtype=np.float32)
    with pytest.raises(RegapError, match="marker") as info:
        sessions.run_decoder(embeds, np.ones((1, 3), np.int64), np.arange(3)[None], sessions.empty_past(1),
                             regap_image_mask=np.ones((1, 3), np.float32))
    assert "unmark" in info.value.hint
