"""Decoder position ids per family, in numpy, for every implementation that feeds them
explicitly (ONNX Runtime, and validate's PyTorch traces so that all three see the same).

Two schemes:

- ``text`` (every family but Qwen-VL): ``position_ids`` [batch, seq] = ``cumsum(mask) - 1``
  with padding positions set to 1; a decode step is the previous last position + 1.
- ``mrope`` (Qwen2-VL, Qwen2.5-VL): ``position_ids`` [3, batch, seq] (temporal, height,
  width), transformers' ``Qwen2VLModel.get_rope_index`` for images: text tokens advance all
  three axes together, an image's merged patches take (start, start + row, start + column)
  and the text after it starts at ``start + max(rows, columns)``. Padding positions are 0
  (as ``get_rope_index`` leaves them). A decode step is the row's largest position + 1 on
  all three axes, which is what transformers' ``rope_deltas`` amounts to.

The settings a scheme needs (``position_config``) are written to ``regap_onnx.json`` as
``position_ids``, so the runtime does not need the Hugging Face config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import RegapError

TEXT, MROPE = "text", "mrope"
_MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# mm_token_type_ids values (transformers' ProcessorMixin.create_mm_token_type_ids)
_TEXT_TOKEN, _IMAGE_TOKEN = 0, 1


def position_config(family: str, config: Any) -> dict[str, Any]:
    """The scheme and its settings for a Hugging Face model ``config`` of ``family``."""
    if family in _MROPE_FAMILIES:
        return {"scheme": MROPE, "rank": 3, "image_token_id": int(config.image_token_id),
                "spatial_merge_size": int(config.vision_config.spatial_merge_size)}
    return {"scheme": TEXT, "rank": 2}


# -- text ---------------------------------------------------------------------------------
def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    return pos


def _text_prefill(settings: dict, input_ids: np.ndarray, attention_mask: np.ndarray, **_: Any) -> np.ndarray:
    return text_positions(attention_mask)


def _text_next(previous: np.ndarray) -> np.ndarray:
    return previous[:, -1:] + 1


# -- M-RoPE (Qwen2-VL family) -------------------------------------------------------------
def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray | None, *, image_token_id: int,
                    spatial_merge_size: int, image_grid_thw: np.ndarray | None = None,
                    mm_token_type_ids: np.ndarray | None = None) -> np.ndarray:
    """[3, batch, seq] position ids: transformers' ``get_rope_index`` for text and images.

    ``mm_token_type_ids`` (the processor's) or, when absent, ``input_ids == image_token_id``
    says which tokens are image tokens; ``image_grid_thw`` [num_images, 3] gives each image's
    patch grid, in the order the images appear in the batch."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise RegapError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mm_token_type_ids is None:
        types = np.where(ids == image_token_id, _IMAGE_TOKEN, _TEXT_TOKEN)
    else:
        types = np.asarray(mm_token_type_ids, dtype=np.int64)
    if types.shape != ids.shape or mask.shape != ids.shape:
        raise RegapError("input_ids, attention_mask and mm_token_type_ids must have one shape")
    if np.any((types != _TEXT_TOKEN) & (types != _IMAGE_TOKEN)):
        raise RegapError("only text and image tokens are supported (videos are not)")
    grids = np.zeros((0, 3), dtype=np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    grids = grids.reshape(-1, 3)
    out = np.zeros((3,) + ids.shape, dtype=np.int64)
    image = 0
    for row in range(ids.shape[0]):
        keep = mask[row].astype(bool)
        row_types = types[row][keep]
        pieces, current = [], 0
        # Runs of one token type, as get_rope_index groups them (one image per image run).
        bounds = np.flatnonzero(np.diff(row_types)) + 1
        for run in np.split(row_types, bounds):
            if run.size == 0:
                continue
            if run[0] == _TEXT_TOKEN:
                pieces.append(np.broadcast_to(np.arange(run.size) + current, (3, run.size)))
                current += run.size
                continue
            if image >= len(grids):
                raise RegapError(f"the batch has more image-token runs than image_grid_thw rows ({len(grids)})")
            t, grid_h, grid_w = (int(x) for x in grids[image])
            image += 1
            h, w = grid_h // spatial_merge_size, grid_w // spatial_merge_size
            if t * h * w != run.size:
                raise RegapError(f"image {image - 1}: {run.size} image tokens, but its grid {(t, grid_h, grid_w)} "
                                 f"merges to {t * h * w}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(grid_h, grid_w) // spatial_merge_size
        if pieces:
            out[:, row, keep] = np.concatenate(pieces, axis=1)
    if image != len(grids):
        raise RegapError(f"image_grid_thw has {len(grids)} rows but the batch has {image} image-token runs")
    return out


def _mrope_prefill(settings: dict, input_ids: np.ndarray, attention_mask: np.ndarray,
                   image_grid_thw: np.ndarray | None = None, mm_token_type_ids: np.ndarray | None = None,
                   **_: Any) -> np.ndarray:
    return mrope_positions(input_ids, attention_mask, image_token_id=settings["image_token_id"],
                           spatial_merge_size=settings["spatial_merge_size"], image_grid_thw=image_grid_thw,
                           mm_token_type_ids=mm_token_type_ids)


def _mrope_next(previous: np.ndarray) -> np.ndarray:
    step = previous.max(axis=(0, 2)) + 1
    return np.broadcast_to(step[None, :, None], (3, previous.shape[1], 1)).copy()


# -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PositionScheme:
    settings: dict[str, Any]
    # prefill(settings, input_ids, attention_mask, **image inputs) -> position_ids of the prompt
    _prefill: Callable[..., np.ndarray]
    # next(previous call's position_ids) -> position_ids [.., batch, 1] of the next token
    next: Callable[[np.ndarray], np.ndarray]

    @property
    def rank(self) -> int:
        return int(self.settings["rank"])

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, **image_inputs: Any) -> np.ndarray:
        return self._prefill(self.settings, np.asarray(input_ids), np.asarray(attention_mask), **image_inputs)


_SCHEMES = {TEXT: (_text_prefill, _text_next), MROPE: (_mrope_prefill, _mrope_next)}


def position_scheme(settings: dict[str, Any] | None) -> PositionScheme:
    """The scheme for ``settings`` (``position_config``'s dict; None = ``text``, as exports
    written before the key existed)."""
    settings = {"scheme": TEXT, "rank": 2} if settings is None else dict(settings)
    fns = _SCHEMES.get(settings.get("scheme"))
    if fns is None:
        raise RegapError(f"unknown position_ids scheme {settings.get('scheme')!r}")
    return PositionScheme(settings, *fns)
