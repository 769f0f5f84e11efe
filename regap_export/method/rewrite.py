"""Insert correction layers at decoder-block outputs of a live model, and remove them.

A corrected block is the original block wrapped in ``CorrectedBlock``; removing the
corrections puts the very same block objects back, so the model is restored exactly.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .correction import RegapCorrection
from .folding import LayerCorrection
from ..models.base import ModelAdapter
from ..models.hooks import block_hidden, replace_hidden


class CorrectedBlock(nn.Module):
    """A decoder block followed by its correction. Pops ``regap_alpha`` and
    ``regap_image_mask`` from the kwargs that transformers forwards to every block, so
    neither needs global state."""

    wraps_attribute = "block"  # model_fingerprint looks through this wrapper

    def __init__(self, block: nn.Module, correction: RegapCorrection):
        super().__init__()
        self.block = block
        self.correction = correction

    def forward(self, *args, **kwargs):
        alpha = kwargs.pop("regap_alpha", None)
        mask = kwargs.pop("regap_image_mask", None)
        out = self.block(*args, **kwargs)
        return replace_hidden(out, self.correction(block_hidden(out), alpha, mask))

    def __getattr__(self, name: str):
        # transformers reads attributes such as ``attention_type`` off each block.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def insert_corrections(model: nn.Module, adapter: ModelAdapter, corrections: Sequence[LayerCorrection], *,
                       mask_default: float = 1.0) -> None:
    """Wrap each corrected block. ``mask_default``: the image mask of a forward that passes no
    ``regap_image_mask`` (``modality.mask_default`` of the export's positions)."""
    layers = adapter.decoder_layers(model)
    if any(isinstance(layer, CorrectedBlock) for layer in layers):
        raise ValueError("the model already has correction layers; remove them first")
    dtype = next(model.parameters()).dtype
    for spec in corrections:
        if not 0 <= spec.layer < len(layers):
            raise ValueError(f"layer {spec.layer} is outside the model's {len(layers)} decoder blocks")
        block = layers[spec.layer]
        device = next(block.parameters()).device
        correction = RegapCorrection(spec, dtype, mask_default=mask_default)
        layers[spec.layer] = CorrectedBlock(block, correction.to(device))


def remove_corrections(model: nn.Module, adapter: ModelAdapter) -> None:
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, CorrectedBlock):
            layers[i] = layer.block


def corrections_of(model: nn.Module, adapter: ModelAdapter) -> list[RegapCorrection]:
    return [layer.correction for layer in adapter.decoder_layers(model) if isinstance(layer, CorrectedBlock)]


@contextlib.contextmanager
def corrected(model: nn.Module, adapter: ModelAdapter, corrections: Sequence[LayerCorrection], *,
              mask_default: float = 1.0) -> Iterator[nn.Module]:
    insert_corrections(model, adapter, corrections, mask_default=mask_default)
    try:
        yield model
    finally:
        remove_corrections(model, adapter)


def checkpoint_tensors(model: nn.Module, adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """The ``regap.{layer}.{w|b|v}`` tensors of the inserted corrections (public names)."""
    out: dict[str, torch.Tensor] = {}
    for correction in corrections_of(model, adapter):
        for name, buffer in correction.named_buffers():
            out[f"regap.{correction.layer}.{name}"] = buffer.detach().cpu().contiguous()
    return out
