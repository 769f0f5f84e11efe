"""Where the correction acts: the ``regap_image_mask`` [batch, seq] (METHOD section 6, "Where").

The drift ``d_l`` is the image-minus-text shift, so a text-only input has none: every
corrected layer multiplies its correction by this mask, and the mask is 0 on every row
that holds no image. Which positions of an image row it covers is ``RegapOptions.positions``:

- ``last+generated`` (default): the last prompt token and every generated token (ShiftDC's
  choice; the drift is estimated at the last prompt token, so that is where it is removed);
- ``image``: every position from the row's first image token on, and every generated token;
- ``all``: every position of every row, images or not (METHOD's first reading; it changes
  text-only replies whenever ``d`` is large).

Runtimes compute the mask from ``input_ids`` (the image token id) and feed it; the ONNX
decoder declares it as an overridable initializer whose default (``mask_default``) is what a
client that does not know the input gets. Pure numpy: no model, no torch.
"""
from __future__ import annotations

import numpy as np

from .errors import RegapError

IMAGE_ONLY = ("last+generated", "image")
INPUT_NAME = "regap_image_mask"


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
