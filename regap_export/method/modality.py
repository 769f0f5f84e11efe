"""Where the correction acts: the ``regap_image_mask`` [batch, seq] (METHOD section 6, "Where").

The drift ``d_l`` is the image-minus-text shift, so a text-only input has none: every
corrected layer multiplies its correction by this mask, and the mask is 0 on every row
that holds no image. Which positions of an image row it covers is ``RegapOptions.positions``:

- ``last+generated`` (default): the last prompt token and every generated token (ShiftDC's
  choice; the drift is estimated at the last prompt token, so that is where it is removed);
- ``image``: every position from the row's first image token on, and every generated token;
- ``all``: every position of every row, images or not (METHOD's first reading; it changes
  text-only replies whenever ``d`` is large).

PyTorch callers compute the mask from ``input_ids`` (the image token id) and pass it.

The ONNX decoder sees no ``input_ids`` (multimodal exports take ``inputs_embeds``), so a
float32 multimodal export finds image rows itself, from a **modality marker** (ONNX contract
4): ``vision_encoder.onnx`` returns its features multiplied by ``MARK_SCALE`` = 2**64, the
decoder takes a row whose largest magnitude is at least ``MARK_THRESHOLD`` = 2**32 for an
image row and divides it back, and it keeps the same mark on those positions' rows of
``present.0.key``, so that later calls (decode steps) know the sequence holds an image.
Multiplying and dividing by a power of two is exact in IEEE arithmetic, so the model sees
exactly its own features; no token embedding or key comes near 2**32, and a feature row
would have to be below 2**-32 everywhere to be missed. Every client merges the encoder's
features into ``inputs_embeds`` and passes ``present.*`` back as ``past_key_values.*``, so
every client gets the correction on image prompts without knowing about it.
float16 cannot hold 2**64: float16 multimodal exports (and contract 2/3 folders) take the
mask as the overridable input ``regap_image_mask`` instead, whose default (``mask_default``)
is what a client that does not know the input gets. Pure numpy: no model, no torch.
"""
from __future__ import annotations

import numpy as np

from ..errors import RegapError

IMAGE_ONLY = ("last+generated", "image")
INPUT_NAME = "regap_image_mask"
MARK_SCALE = 2.0 ** 64
MARK_THRESHOLD = 2.0 ** 32


def marked_rows(x: np.ndarray, axis: int | tuple[int, ...] = -1) -> np.ndarray:
    """bool: which rows of ``x`` carry the modality marker, reducing over ``axis`` (a feature
    row: the last axis; a cache position of ``present.0.key``: heads and head dim, (1, 3))."""
    return np.abs(np.asarray(x, dtype=np.float32)).max(axis=axis) >= MARK_THRESHOLD


def _divided_back(x: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """``x`` divided by MARK_SCALE where ``marked`` (broadcast to ``x``); exact."""
    if not marked.any():
        return x
    return np.where(marked, x / np.asarray(MARK_SCALE, dtype=x.dtype), x)


def unmark(x: np.ndarray) -> np.ndarray:
    """``x`` with its marked rows divided back (exact): image features as the model computes
    them, or the embeddings of an uncorrected run (a decoder given unmarked rows finds no
    image, so it applies no correction)."""
    x = np.asarray(x)
    return _divided_back(x, marked_rows(x)[..., None])


def unmark_key_cache(key: np.ndarray) -> np.ndarray:
    """``present.0.key`` [batch, heads, seq, head_dim] with the marked positions divided back."""
    key = np.asarray(key)
    return _divided_back(key, marked_rows(key, axis=(1, 3))[:, None, :, None])


def mask_default(positions: str) -> float:
    """The mask a caller that feeds none gets: 1 for ``all``, else 0 (the uncorrected model)."""
    return 1.0 if positions == "all" else 0.0


def rows_with_image(input_ids: np.ndarray, image_token_id: int | None) -> np.ndarray:
    """bool [batch]: which rows hold at least one image token."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise RegapError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if image_token_id is None:
        return np.zeros(ids.shape[0], dtype=bool)
    return (ids == int(image_token_id)).any(axis=1)


def prompt_mask(positions: str, input_ids: np.ndarray, image_token_id: int | None, *,
                prompt_length: int | None = None) -> np.ndarray:
    """float32 [batch, seq] for a left-padded batch whose first ``prompt_length`` columns are
    the prompt (default: all of them) and whose remaining columns are generated tokens
    (teacher forcing)."""
    ids = np.asarray(input_ids)
    has_image = rows_with_image(ids, image_token_id)
    batch, seq = ids.shape
    prompt_length = seq if prompt_length is None else int(prompt_length)
    if not 1 <= prompt_length <= seq:
        raise RegapError(f"prompt_length {prompt_length} is outside 1..{seq}")
    if positions == "all":
        return np.ones((batch, seq), dtype=np.float32)
    if positions == "last+generated":
        covered = np.zeros((batch, seq), dtype=bool)
        covered[:, prompt_length - 1:] = True
    elif positions == "image":
        covered = np.cumsum(ids == image_token_id, axis=1) > 0 if image_token_id is not None else \
            np.zeros((batch, seq), dtype=bool)
        covered[:, prompt_length:] = True
    else:
        raise RegapError(f"unknown positions {positions!r}; choose one of last+generated, image, all")
    return (covered & has_image[:, None]).astype(np.float32)


def step_mask(positions: str, has_image: np.ndarray) -> np.ndarray:
    """float32 [batch, 1] for one decode step of rows ``has_image`` [batch]."""
    has_image = np.asarray(has_image, dtype=bool).reshape(-1)
    if positions == "all":
        return np.ones((has_image.shape[0], 1), dtype=np.float32)
    return has_image[:, None].astype(np.float32)


def mask_function(positions: str | None, image_token_id: int | None):
    """ids [batch, seq] -> the prompt mask of ``positions``; ``positions=None``: all zeros
    (the correction switched off)."""
    if positions is None:
        return lambda ids: np.zeros(np.shape(ids), dtype=np.float32)
    return lambda ids: prompt_mask(positions, ids, image_token_id)
