"""Where the correction acts: the image mask m [batch, seq] (METHOD section 6, "Where" and
"Multi-turn"). The one mask helper: every caller (calibration, the reference, the rewritten
model, the runtime, validate, evaluate) computes m here; the exported graphs compute the same
rule from the modality channel (``export.image_rows``).

The drift ``d_l`` is the image-minus-text shift, so a text-only input has none: every
corrected layer multiplies its correction by m, and m is 0 at every position of a row that
holds no image so far. Which positions of an image row it covers is ``RegapOptions.positions``:

- ``last+generated`` (default): the last position of every call, once the row holds an image
  (ShiftDC's choice; the drift is estimated at the last prompt token, so that is where it is
  removed). A call is what one forward computes: a prompt, one decode step, or a later user
  turn fed after a reply with the cache. So the last prompt token and every generated token
  are corrected, and in a chat continued with the cache, the last token of each later prompt;
  the other prompt tokens of a later turn are not;
- ``image``: every position from the row's first image token on (this call or its cache);
- ``all``: every position of every row, images or not (METHOD's first reading; it changes
  text-only replies whenever ``d`` is large).

A row "holds an image" at position t when an image token occurs at or before t, in this
call or in the cache it continues (``past_holds``).

Multimodal graphs widen the embedding by one **modality channel** (ONNX contract 5):
``embed_tokens.onnx`` writes 0 there, ``vision_encoder.onnx`` writes 1, so every client that
merges the encoder's features into the embeddings tells the decoder which rows came from an
image, at any precision (0 and 1 are exact in float16 and survive every float16 converter and
quantizer). The decoder carries the running "holds an image" flag on to later calls in one
extra channel of ``present.0.key``. The helpers below read and clear those channels; pure
numpy, no model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import RegapError

IMAGE_ONLY = ("last+generated", "image")
POSITIONS = ("last+generated", "image", "all")
INPUT_NAME = "regap_image_mask"
# 0 (text row) and 1 (image row) are exact in every float format; anything above one half is an image row.
FLAG_THRESHOLD = 0.5


def rows_with_image(input_ids: np.ndarray, image_token_id: int | None) -> np.ndarray:
    """bool [batch]: which rows hold at least one image token."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise RegapError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if image_token_id is None:
        return np.zeros(ids.shape[0], dtype=bool)
    return (ids == int(image_token_id)).any(axis=1)


def image_tokens(input_ids: np.ndarray, image_token_id: int | None) -> np.ndarray:
    """bool [batch, seq]: the image-token positions."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise RegapError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if image_token_id is None:
        return np.zeros(ids.shape, dtype=bool)
    return ids == int(image_token_id)


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise RegapError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")


def holds_image(image_rows: np.ndarray, past_holds: np.ndarray | None = None) -> np.ndarray:
    """bool [batch, seq]: the row holds an image at or before each position (``past_holds``
    [batch]: the cache this call continues already does)."""
    rows = np.asarray(image_rows, dtype=bool)
    held = np.cumsum(rows, axis=1) > 0
    if past_holds is not None:
        held |= np.asarray(past_holds, dtype=bool).reshape(-1, 1)
    return held


def call_mask(positions: str, image_rows: np.ndarray, *, past_holds: np.ndarray | None = None,
              call_ends: np.ndarray | None = None) -> np.ndarray:
    """float32 [batch, seq]: m for one call whose image rows are ``image_rows`` [batch, seq]
    (bool), continuing a cache whose rows ``past_holds`` [batch] an image (None: a prefill).
    ``call_ends`` [seq] (bool): the columns where a call ends, for a teacher-forced pass that
    stands for several calls; default: the last column only (one call; batches are left-padded)."""
    _check_positions(positions)
    rows = np.asarray(image_rows, dtype=bool)
    if rows.ndim != 2:
        raise RegapError(f"image rows must be [batch, seq], got shape {rows.shape}")
    batch, seq = rows.shape
    if positions == "all":
        return np.ones((batch, seq), dtype=np.float32)
    held = holds_image(rows, past_holds)
    if positions == "image":
        return held.astype(np.float32)
    if call_ends is None:
        ends = np.zeros(seq, dtype=bool)
        ends[-1] = seq > 0
    else:
        ends = np.asarray(call_ends, dtype=bool).reshape(-1)
        if ends.shape != (seq,):
            raise RegapError(f"call_ends has {ends.shape[0]} columns for a call of {seq}")
    return (held & ends[None, :]).astype(np.float32)


def prompt_mask(positions: str, input_ids: np.ndarray, image_token_id: int | None, *,
                prompt_length: int | None = None, call_ends: Sequence[int] = (),
                past_holds: np.ndarray | None = None) -> np.ndarray:
    """float32 [batch, seq] for a left-padded batch whose first ``prompt_length`` columns are
    the prompt of this call (default: all of them) and whose remaining columns are generated
    tokens fed back (teacher forcing: each stands for its own decode step). ``call_ends``:
    further columns of the prompt where an earlier call of a conversation ended (a previous
    turn's last prompt token, the fed-back tokens of its reply), for a teacher-forced pass over
    a whole conversation. ``past_holds`` [batch]: the cache this call continues holds an image."""
    ids = np.asarray(input_ids)
    rows = image_tokens(ids, image_token_id)
    seq = ids.shape[1]
    prompt_length = seq if prompt_length is None else int(prompt_length)
    if not 1 <= prompt_length <= seq:
        raise RegapError(f"prompt_length {prompt_length} is outside 1..{seq}")
    ends = np.zeros(seq, dtype=bool)
    ends[prompt_length - 1:] = True
    for column in call_ends:
        if not 0 <= int(column) < prompt_length:
            raise RegapError(f"call end {column} is outside the prompt's columns 0..{prompt_length - 1}")
        ends[int(column)] = True
    return call_mask(positions, rows, past_holds=past_holds, call_ends=ends)


def step_mask(positions: str, has_image: np.ndarray) -> np.ndarray:
    """float32 [batch, 1] for one decode step of rows ``has_image`` [batch] (the row holds an
    image by now): a call of one token, so every rule corrects it on such rows."""
    has_image = np.asarray(has_image, dtype=bool).reshape(-1, 1)
    return call_mask(positions, np.zeros_like(has_image), past_holds=has_image[:, 0])


def call_masks(positions: str, input_ids: np.ndarray, image_token_id: int | None, *, correct: bool = True,
               prompt_length: int | None = None, past_ids: np.ndarray | None = None,
               images: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(prompt mask [batch, seq], decode-step mask [batch, 1]) of one generation: the mask of its
    first call (``prompt_mask``) and of each decode step after it (``step_mask``). The one place
    the runtime, ``validate`` and ``evaluate`` get their masks from.

    ``correct=False``: zeros (the uncorrected model). ``past_ids``: the tokens the cache this call
    continues holds. ``images=False`` (no pixel inputs in this conversation): no row holds an
    image, whatever ids it holds (an image token typed as text is not an image; the graphs see it
    so too)."""
    ids = np.asarray(input_ids)
    if not images and positions != "all":
        correct = False
    if not correct:
        return np.zeros(ids.shape, dtype=np.float32), np.zeros((ids.shape[0], 1), dtype=np.float32)
    past_holds = None if past_ids is None else rows_with_image(past_ids, image_token_id)
    has_image = rows_with_image(ids, image_token_id) | (False if past_holds is None else past_holds)
    return (prompt_mask(positions, ids, image_token_id, prompt_length=prompt_length, past_holds=past_holds),
            step_mask(positions, has_image))


def mask_default(positions: str) -> float:
    """The mask a caller that feeds none gets: 1 for ``all``, else 0 (the uncorrected model)."""
    return 1.0 if positions == "all" else 0.0


def mask_function(positions: str | None, image_token_id: int | None):
    """ids [batch, seq] -> the prompt mask of ``positions``; ``positions=None``: all zeros
    (the correction switched off)."""
    if positions is None:
        return lambda ids: np.zeros(np.shape(ids), dtype=np.float32)
    return lambda ids: prompt_mask(positions, ids, image_token_id)


# -- the modality channel (ONNX contract 5) -------------------------------------------------
def image_flags(embeds: np.ndarray) -> np.ndarray:
    """bool [..]: which rows of ``inputs_embeds`` / image features [.., hidden + 1] are image rows."""
    return np.asarray(embeds)[..., -1].astype(np.float32) > FLAG_THRESHOLD


def clear_image_flags(embeds: np.ndarray) -> np.ndarray:
    """``embeds`` [.., hidden + 1] with the channel 0 everywhere (a copy): a decoder given these
    rows finds no image and runs the unmodified model exactly (how a caller switches the
    correction off)."""
    out = np.array(embeds, copy=True)
    out[..., -1] = 0
    return out


def without_channel(x: np.ndarray) -> np.ndarray:
    """The model's own values of a widened tensor: features / embeddings [.., hidden] or
    ``present.0.key`` [batch, heads, seq, head_dim] (the last channel dropped)."""
    return np.asarray(x)[..., :-1]


def past_holds_image(key0: np.ndarray) -> np.ndarray:
    """bool [batch]: which rows of a cache hold an image, from ``present.0.key`` [batch,
    heads, seq, head_dim + 1] (the flag of its last position; False for an empty cache)."""
    key0 = np.asarray(key0)
    if key0.shape[2] == 0:
        return np.zeros(key0.shape[0], dtype=bool)
    return key0[:, 0, -1, -1].astype(np.float32) > FLAG_THRESHOLD
