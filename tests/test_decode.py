"""The one decode loop (``regap_export.runtime.decode``) and the one mask helper
(``regap_export.method.modality.call_masks``) that the runtime, validate and evaluate share."""
from __future__ import annotations

import numpy as np

from regap_export.method.modality import call_masks
from regap_export.runtime.decode import decode, extend_attention


def scripted(rows: list[list[int]], vocab: int = 10):
    """first logits and a step function whose argmax follows ``rows`` (one list per row), and
    the list of token batches the loop fed back."""
    script = np.array(rows)
    fed: list[np.ndarray] = []

    def logits_for(column: int) -> np.ndarray:
        out = np.zeros((script.shape[0], vocab), dtype=np.float32)
        out[np.arange(script.shape[0]), script[:, min(column, script.shape[1] - 1)]] = 1.0
        return out

    def step(tokens: np.ndarray) -> np.ndarray:
        fed.append(tokens.copy())
        return logits_for(len(fed))

    return logits_for(0), step, fed


def test_decode_stops_at_the_budget_and_never_feeds_the_last_token():
    first, step, fed = scripted([[1, 2, 3, 4, 5]])
    tokens = decode(first, step, max_new_tokens=3)
    assert tokens.tolist() == [[1, 2, 3]]
    assert [t.tolist() for t in fed] == [[1], [2]]


def test_a_finished_row_gets_pad_until_every_row_is_done():
    first, step, fed = scripted([[1, 9, 4, 4], [2, 3, 5, 9]])
    tokens = decode(first, step, max_new_tokens=10, eos=[9], pad=0)
    assert tokens.tolist() == [[1, 9, 0, 0], [2, 3, 5, 9]]
    assert len(fed) == 3 and fed[-1].tolist() == [0, 5]


def test_no_eos_never_stops_early_and_zero_tokens_is_empty():
    first, step, _ = scripted([[9, 9, 9]])
    assert decode(first, step, max_new_tokens=3, eos=()).tolist() == [[9, 9, 9]]
    assert decode(first, step, max_new_tokens=0).shape == (1, 0)


def test_select_picks_the_tokens():
    first, step, _ = scripted([[1, 2, 3]])
    assert decode(first, step, max_new_tokens=3, select=lambda logits: np.full(len(logits), 7)).tolist() == [[7, 7, 7]]


def test_extend_attention_adds_one_attended_column():
    mask = np.array([[0, 1], [1, 1]], dtype=np.int64)
    grown = extend_attention(mask)
    assert grown.tolist() == [[0, 1, 1], [1, 1, 1]] and grown.dtype == np.int64


def test_call_masks_correct_only_image_rows_and_follow_the_switches():
    image = 5
    ids = np.array([[0, 1, 2, 3], [0, 5, 2, 3]])
    prompt, step = call_masks("last+generated", ids, image)
    assert prompt.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]] and step.tolist() == [[0], [1]]
    prompt, step = call_masks("image", ids, image)
    assert prompt.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1]]
    off_prompt, off_step = call_masks("last+generated", ids, image, correct=False)
    assert not off_prompt.any() and not off_step.any()
    typed, typed_step = call_masks("last+generated", ids, image, images=False)
    assert not typed.any() and not typed_step.any()
    everywhere, _ = call_masks("all", ids, image, images=False)
    assert everywhere.all()
    later, later_step = call_masks("last+generated", np.array([[7, 8]]), image, past_ids=np.array([[5, 1]]))
    assert later.tolist() == [[0, 1]] and later_step.tolist() == [[1]]
