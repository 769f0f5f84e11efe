"""The correction layer: one small module per corrected block output.

Its constants come from ``folding.LayerCorrection``. The gate's projection always runs in
float32, whatever the model's dtype, so an fp16 graph keeps the calibrated threshold.
Every correction is multiplied by ``regap_image_mask`` [batch, seq] (``regap_export.method.modality``):
where the mask is 0 the block output passes through exactly unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import RegapError
from .folding import FIXED, GATED, SCALED, LayerCorrection


class RegapCorrection(nn.Module):
    """h' = h + m * sigmoid(h . w + b) * v (gated), h + m * v (fixed) or h + m * alpha * v (scaled),
    with m the image mask [batch, seq], or ``mask_default`` everywhere when none is given."""

    def __init__(self, spec: LayerCorrection, dtype: torch.dtype = torch.float32, *, mask_default: float = 1.0):
        super().__init__()
        self.layer = spec.layer
        self.kind = spec.kind
        self.mask_default = float(mask_default)
        if spec.kind == FIXED:
            # A constant add needs no float32 detour: store it in the model's dtype.
            self.register_buffer("v", spec.v.detach().to(dtype).clone())
        else:
            self.register_buffer("v", spec.v.detach().to(torch.float32).clone())
        if spec.kind == GATED:
            self.register_buffer("w", spec.w.detach().to(torch.float32).reshape(-1, 1).clone())
            self.register_buffer("b", torch.tensor([spec.b], dtype=torch.float32))

    def forward(self, h: torch.Tensor, regap_alpha: torch.Tensor | None = None,
                regap_image_mask: torch.Tensor | None = None) -> torch.Tensor:
        if regap_image_mask is None:
            mask = torch.full((1, 1, 1), self.mask_default, dtype=torch.float32, device=h.device)
        else:
            mask = regap_image_mask.to(device=h.device, dtype=torch.float32).unsqueeze(-1)
        if self.kind == FIXED:
            return h + mask.to(h.dtype) * self.v
        wide = h if h.dtype == torch.float32 else h.to(torch.float32)
        if self.kind == GATED:
            out = wide + torch.sigmoid(wide @ self.w + self.b) * mask * self.v
        elif self.kind == SCALED:
            if regap_alpha is None:
                raise RegapError("a regap-seq model needs regap_alpha [batch] at every forward", field="regap_alpha",
                                 hint="pass regap_alpha=..., or generate with the exported folder's "
                                      "modeling_regap.py / regap_export.generate, which compute it")
            out = wide + regap_alpha.to(torch.float32).reshape(-1, 1, 1) * mask * self.v
        else:
            raise ValueError(f"unknown correction kind {self.kind!r}")
        return out if h.dtype == torch.float32 else out.to(h.dtype)

    def spec(self) -> LayerCorrection:
        w = self.w.reshape(-1).clone() if self.kind == GATED else None
        b = float(self.b) if self.kind == GATED else None
        return LayerCorrection(self.layer, self.kind, self.v.float().clone(), w, b)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kind={self.kind}, hidden={self.v.numel()}"
