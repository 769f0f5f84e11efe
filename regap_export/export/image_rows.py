"""The modality marker inside the exported graphs (ONNX contract 4; ``regap_export.method.modality``).

``vision_encoder.onnx`` multiplies its outputs by ``MARK_SCALE``; the decoder graph finds the
marked rows of ``inputs_embeds`` and of ``past_key_values.0.key``, divides them back, builds
the image mask of the export's ``positions`` from them, and marks the same positions of
``present.0.key`` again. Traced by torch.onnx into plain ReduceMax / Where / Div / Mul nodes.

In-graph rules (the mask ``modality.prompt_mask`` / ``step_mask`` give a caller that knows
``input_ids``; equal for a prompt prefill followed by decode steps, which is what every
client runs):
- ``last+generated``: a row with an image anywhere (this call or its cache) is corrected at
  its last position, and at every position of a call that continues a cache;
- ``image``: from the row's first image row on, and every position after a cache that holds one.
``all`` (every position, images or not) needs no marker: such exports take ``regap_image_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method.modality import MARK_SCALE, MARK_THRESHOLD


@dataclass
class ImageRows:
    embeds: torch.Tensor      # inputs_embeds, unmarked
    past_key: torch.Tensor    # past_key_values.0.key, unmarked
    marks: torch.Tensor       # bool [batch, past + seq]: which positions hold image rows
    mask: torch.Tensor        # float32 [batch, seq]: regap_image_mask for this call


def mark_features(features: torch.Tensor) -> torch.Tensor:
    return features * MARK_SCALE


def find_image_rows(embeds: torch.Tensor, past_key: torch.Tensor, positions: str) -> ImageRows:
    past_marks = past_key.abs().amax(dim=(1, 3)) >= MARK_THRESHOLD          # [batch, past]
    new_marks = embeds.abs().amax(dim=-1) >= MARK_THRESHOLD                  # [batch, seq]
    past_key = torch.where(past_marks[:, None, :, None], past_key / MARK_SCALE, past_key)
    embeds = torch.where(new_marks[..., None], embeds / MARK_SCALE, embeds)
    # Sums, not any(): a reduction over an empty past (prefill) is then a well-defined 0.
    past_has = past_marks.to(torch.float32).sum(dim=1, keepdim=True) > 0   # [batch, 1]
    has_image = past_has | (new_marks.to(torch.float32).sum(dim=1, keepdim=True) > 0)
    seq = embeds.shape[1]
    marks = torch.cat([past_marks, new_marks], dim=1)
    if positions == "last+generated":
        past_length = torch.ones_like(past_key[:1, :1, :, :1]).sum()  # 0 at prefill
        last = torch.arange(seq, device=embeds.device) == seq - 1
        covered = last[None, :] | (past_length > 0)
    elif positions == "image":
        covered = (new_marks.to(torch.int64).cumsum(dim=1) > 0) | past_has
    else:
        raise ValueError(f"unknown positions {positions!r}")
    return ImageRows(embeds, past_key, marks, (covered & has_image).to(torch.float32))


def mark_key_cache(key: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """present.0.key [batch, heads, past + seq, head_dim] with the image positions marked."""
    return torch.where(marks[:, None, :, None], key * MARK_SCALE, key)
