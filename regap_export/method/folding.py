"""Fold directions and options into per-layer correction constants (METHOD section 3).

    gated:  h' = h + sigmoid(h . w + b) * v
    fixed:  h' = h + v
    scaled: h' = h + alpha[batch] * v      (regap-seq; alpha is a runtime input)

Pure math: tensors in, tensors out. regap-seq's strength (``sequence_alpha``) is numpy, so
that the ONNX Runtime runtime computes it without PyTorch; this module imports torch only
for type checking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ArtifactError
from ..options import RegapOptions

if TYPE_CHECKING:
    import torch

    from ..calibration.directions import Directions

GATED, FIXED, SCALED = "gated", "fixed", "scaled"


@dataclass(frozen=True)
class LayerCorrection:
    """Constants of the correction after block ``layer``. ``w``/``b`` only for gated."""

    layer: int
    kind: str
    v: torch.Tensor                 # [H] float32
    w: torch.Tensor | None = None   # [H] float32
    b: float | None = None


@dataclass(frozen=True)
class ScoreReadout:
    """regap-seq's per-sequence score z = h . w + b at layer l_s (w, b without kappa; kappa is
    the fitted slope times the gate sharpness)."""

    layer: int
    w: torch.Tensor
    b: float
    kappa: float


def gate_slope(directions: Directions, layer: int, sharpness: float) -> float:
    """kappa of the gate at ``layer``: the fitted slope times the gate sharpness."""
    return sharpness * float(directions.kappa[layer])


def gate_constants(directions: Directions, layer: int, tau: float, *, with_kappa: bool = True,
                   sharpness: float = 1.0) -> tuple[torch.Tensor, float]:
    """w, b of the gate's logit kappa (z - tau) = h . w + b at ``layer``, kappa = sharpness x
    the fitted slope; without kappa, z itself (regap-seq's readout)."""
    read = directions.read_direction(layer).double()
    c_pos = float(directions.anchor_probe_harmful[layer])
    c_neg = float(directions.anchor_probe_harmless[layer])
    gap = c_pos - c_neg
    if gap == 0:
        raise ArtifactError(f"probe anchors coincide at layer {layer}; the gate is undefined",
                            field="anchor_probe_harmful",
                            hint="the calibration did not separate the classes at this layer; calibrate again "
                                 "with more or other records, or move the adaptive band")
    kappa = gate_slope(directions, layer, sharpness) if with_kappa else 1.0
    w = kappa * read / gap
    b = -kappa * (c_neg / gap + (tau if with_kappa else 0.0))
    return w.float(), float(b)


def layer_drifts(directions: Directions, layers: list[int], layer_drift: str) -> dict[int, torch.Tensor]:
    """What each corrected layer subtracts (before its strength), float64.

    ``increment``: d_l minus d of the previous corrected layer (0 for the first). A correction
    stays in the residual stream, so subtracting every layer's whole drift d_l would remove
    the early drift again at every later layer; the increments telescope to d_l in total.
    ``total``: d_l itself (METHOD's first reading)."""
    drift = directions.drift.double()
    out: dict[int, torch.Tensor] = {}
    previous: int | None = None
    for layer in sorted(layers):
        if layer_drift == "increment" and previous is not None:
            out[layer] = drift[layer] - drift[previous]
        else:
            out[layer] = drift[layer]
        previous = layer
    return out


def fold(directions: Directions, options: RegapOptions) -> list[LayerCorrection]:
    """The corrections of ``options.mode``, in layer order."""
    opts = options.resolved(directions.num_layers)
    drift = layer_drifts(directions, opts.probe_band.layers() + opts.adaptive_band.layers(), opts.layer_drift)
    out: list[LayerCorrection] = []
    if opts.mode == "regap":
        for layer in opts.probe_band.layers():
            out.append(LayerCorrection(layer, FIXED, (-opts.alpha0 * drift[layer]).float()))
        for layer in opts.adaptive_band.layers():
            w, b = gate_constants(directions, layer, opts.tau, sharpness=opts.gate_sharpness)
            out.append(LayerCorrection(layer, GATED, (-opts.alpha_max * drift[layer]).float(), w, b))
    elif opts.mode == "fixed":
        for layer in opts.probe_band.layers() + opts.adaptive_band.layers():
            out.append(LayerCorrection(layer, FIXED, (-opts.alpha_max * drift[layer]).float()))
    else:  # regap-seq: the strength alpha(x) arrives per sequence at run time
        for layer in opts.probe_band.layers() + opts.adaptive_band.layers():
            out.append(LayerCorrection(layer, SCALED, (-drift[layer]).float()))
    return out


def probe_only(directions: Directions, options: RegapOptions) -> list[LayerCorrection]:
    """The probe band's fixed corrections alone: the calibration's second pass."""
    opts = options.resolved(directions.num_layers)
    drift = layer_drifts(directions, opts.probe_band.layers() + opts.adaptive_band.layers(), opts.layer_drift)
    return [LayerCorrection(layer, FIXED, (-opts.alpha0 * drift[layer]).float()) for layer in opts.probe_band.layers()]


def score_readout(directions: Directions, options: RegapOptions) -> ScoreReadout:
    """z_{l_s} as an affine readout, for regap-seq's probe pass."""
    opts = options.resolved(directions.num_layers)
    layer = opts.read_layer
    w, b = gate_constants(directions, layer, opts.tau, with_kappa=False)
    return ScoreReadout(layer, w, b, gate_slope(directions, layer, opts.gate_sharpness))


def sequence_alpha(score: np.ndarray, kappa: float, options: RegapOptions) -> np.ndarray:
    """alpha(x) = alpha_max * sigmoid(kappa (z - tau)) for z [batch], float64 (numpy)."""
    z = np.asarray(score, dtype=np.float64)
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative scores: alpha 0
        return options.alpha_max / (1.0 + np.exp(-float(kappa) * (z - options.tau)))


def sequence_strength(score: torch.Tensor, readout: ScoreReadout, options: RegapOptions) -> torch.Tensor:
    """``sequence_alpha`` for torch scores [batch] (float64)."""
    import torch

    return torch.from_numpy(sequence_alpha(score.detach().double().cpu().numpy(), readout.kappa, options))
