"""The modality channel (ONNX contract 5) and the one mask rule (``modality.call_mask``):
the decoder's in-graph mask (``export.image_rows``) equals the mask a caller computes from
``input_ids`` for a prompt, decode steps and a second user turn fed with the cache; the key
cache's flag channel leaves attention unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from regap_export.errors import RegapError
from regap_export.export.image_rows import (
    FlaggedKeyLayer, call_flags, flagged, past_flag, split_channel, with_image_channel,
)
from regap_export.method.modality import (
    call_mask, clear_image_flags, image_flags, past_holds_image, prompt_mask, rows_with_image, step_mask,
    without_channel,
)

IMAGE = 7


def prompt_batch(rng):
    """Left-padded ids [3, 10]: two rows with an image run at different places, one without."""
    ids = rng.integers(10, 50, (3, 10))
    ids[0, 3:6] = IMAGE
    ids[1, 6:9] = IMAGE
    ids[2, :2] = 0  # padding
    return ids


def test_the_channel_is_exact_in_float16_and_clears():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.standard_normal((2, 5, 8)).astype(np.float32)) * 1e3
    wide = with_image_channel(features, 1.0).to(torch.float16).numpy()
    assert image_flags(wide).all() and wide.shape[-1] == 9
    text = with_image_channel(features, 0.0).to(torch.float16).numpy()
    assert not image_flags(text).any()
    cleared = clear_image_flags(wide)
    assert not image_flags(cleared).any() and image_flags(wide).all()  # a copy
    assert np.array_equal(without_channel(cleared), without_channel(wide))


def test_last_generated_corrects_the_last_position_of_each_call():
    ids = prompt_batch(np.random.default_rng(1))
    mask = prompt_mask("last+generated", ids, IMAGE)
    assert mask[:, :-1].sum() == 0 and mask[:, -1].tolist() == [1, 1, 0]
    # a teacher-forced pass: the prompt's last token and every forced column
    forced = prompt_mask("last+generated", np.concatenate([ids, ids[:, :3]], axis=1), IMAGE, prompt_length=10)
    assert forced[:, 9:].tolist() == [[1] * 4, [1] * 4, [0] * 4] and forced[:, :9].sum() == 0
    # a teacher-forced conversation: an earlier turn ended at column 4 (row 0 holds an image there)
    conversation = prompt_mask("last+generated", ids, IMAGE, call_ends=[4])
    assert conversation[:, 4].tolist() == [1, 0, 0]
    with pytest.raises(RegapError, match="outside the prompt"):
        prompt_mask("last+generated", ids, IMAGE, call_ends=[10])


def test_image_positions_cover_from_the_first_image_row_and_the_cache():
    ids = prompt_batch(np.random.default_rng(2))
    mask = prompt_mask("image", ids, IMAGE)
    assert mask[0].tolist() == [0, 0, 0] + [1] * 7 and mask[1].tolist() == [0] * 6 + [1] * 4 and not mask[2].any()
    text = np.full((3, 4), 20)
    held = prompt_mask("image", text, IMAGE, past_holds=rows_with_image(ids, IMAGE))
    assert held.tolist() == [[1] * 4, [1] * 4, [0] * 4]
    assert step_mask("image", [True, False]).tolist() == [[1], [0]]


def test_a_continued_turn_is_a_call():
    """Turn 2 of a chat about an image, fed with the cache: only its last token (and the reply's
    tokens) are corrected under last+generated; a turn-2 image in a text chat starts the correction."""
    turn2 = np.full((2, 5), 20)
    mask = prompt_mask("last+generated", turn2, IMAGE, past_holds=np.array([True, False]))
    assert mask.tolist() == [[0, 0, 0, 0, 1], [0] * 5]
    turn2[1, 1] = IMAGE
    mask = prompt_mask("last+generated", turn2, IMAGE, past_holds=np.array([False, False]))
    assert mask.tolist() == [[0] * 5, [0, 0, 0, 0, 1]]


def test_unknown_positions_are_refused():
    with pytest.raises(RegapError, match="unknown positions"):
        call_mask("every", np.zeros((1, 2), bool))


@pytest.mark.parametrize("positions", ["last+generated", "image"])
def test_in_graph_mask_equals_the_callers_mask(positions):
    """Prefill, three decode steps, then a second turn of four tokens fed with the cache: the mask
    the graph builds from the channel and the cache flag equals modality's mask from input_ids."""
    rng = np.random.default_rng(3)
    ids = prompt_batch(rng)
    hidden, heads, head_dim = 8, 2, 4
    embeds = torch.from_numpy(rng.standard_normal((*ids.shape, hidden)).astype(np.float32))
    image = torch.from_numpy(ids == IMAGE)
    embeds = torch.where(image[..., None], with_image_channel(embeds, 1.0), with_image_channel(embeds, 0.0))
    model_embeds, rows = split_channel(embeds)
    assert model_embeds.shape[-1] == hidden and rows.tolist() == image.tolist()

    empty = torch.zeros(3, heads, 0, head_dim + 1)
    mask, flags = call_flags(rows, past_flag(empty), positions)
    assert np.array_equal(mask.numpy(), prompt_mask(positions, ids, IMAGE))

    layer = FlaggedKeyLayer(empty, torch.zeros(3, heads, 0, head_dim), flags)
    keys, _ = layer.update(torch.randn(3, heads, ids.shape[1], head_dim), torch.randn(3, heads, ids.shape[1], head_dim))
    assert keys.shape[-1] == head_dim + 1
    assert past_holds_image(keys.numpy()).tolist() == rows_with_image(ids, IMAGE).tolist()
    want_step = step_mask(positions, rows_with_image(ids, IMAGE))
    for _ in range(3):
        mask, flags = call_flags(torch.zeros(3, 1, dtype=torch.bool), past_flag(keys), positions)
        assert np.array_equal(mask.numpy(), want_step)
        layer = FlaggedKeyLayer(keys, torch.zeros(3, heads, keys.shape[2], head_dim), flags)
        keys, _ = layer.update(torch.randn(3, heads, 1, head_dim), torch.randn(3, heads, 1, head_dim))

    turn2 = rng.integers(10, 50, (3, 4))
    turn2[2, 1] = IMAGE  # the text row sends an image in turn 2
    rows2 = torch.from_numpy(turn2 == IMAGE)
    mask, _ = call_flags(rows2, past_flag(keys), positions)
    want = prompt_mask(positions, turn2, IMAGE, past_holds=past_holds_image(keys.numpy()))
    assert np.array_equal(mask.numpy(), want)


def test_a_wider_key_leaves_attention_unchanged():
    """The flag channel in the keys meets a zero channel in the queries: the same scores."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query, key, value = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    flag = torch.tensor([0.0, 1, 1, 1, 1])[None, None, :, None].expand(1, 2, 5, 1)
    want, _ = sdpa_attention_forward(module, query, key, value, None, scaling=8 ** -0.5, is_causal=False)
    got, _ = flagged(sdpa_attention_forward)(module, query, torch.cat([key, flag], -1), value, None,
                                            scaling=8 ** -0.5, is_causal=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_channel_graph_refuses_a_mask_and_says_why():
    from onnx_exports import exported
    from regap_export.runtime import OrtSessions

    sessions = OrtSessions.open(exported("idefics3").folder)
    assert sessions.image_channel and not sessions.has_image_mask
    embeds = np.zeros((1, 3, sessions.config["hidden_size"] + 1), dtype=np.float32)
    with pytest.raises(RegapError, match="modality channel") as info:
        sessions.run_decoder(embeds, np.ones((1, 3), np.int64), np.arange(3)[None], sessions.empty_past(1),
                             regap_image_mask=np.ones((1, 3), np.float32))
    assert "clear_image_flags" in info.value.hint
