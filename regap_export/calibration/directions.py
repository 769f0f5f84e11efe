"""Refusal and drift directions, anchors and kappa (METHOD sections 1 and 3).

Pure tensor math over ``ActivationStats`` rows: float64 throughout, float32 on output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RegapError
from .geometry import fit_kappa
from .stats import CLASS_NAMES, ActivationStats

MIN_PER_CLASS = 2


@dataclass
class Directions:
    """What ``directions.safetensors`` holds: one row or value per decoder block."""

    rhat: torch.Tensor                    # [L, H]
    drift: torch.Tensor                   # [L, H], after the drift_component option
    anchor_text_harmful: torch.Tensor     # [L]  a+
    anchor_text_harmless: torch.Tensor    # [L]  a-
    anchor_probe_harmful: torch.Tensor    # [L]  c+
    anchor_probe_harmless: torch.Tensor   # [L]  c-
    kappa: torch.Tensor                   # [L]
    # [L, H] unit rows: what the gate reads (its anchors c+- and kappa are measured along it),
    # when calibrated with gate_read="discriminant"; None: the gate reads rhat (ReGap's gate).
    gate_read: torch.Tensor | None = None

    TENSOR_NAMES = ("rhat", "drift", "anchor_text_harmful", "anchor_text_harmless",
                    "anchor_probe_harmful", "anchor_probe_harmless", "kappa")
    OPTIONAL_TENSOR_NAMES = ("gate_read",)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = self.TENSOR_NAMES + tuple(n for n in self.OPTIONAL_TENSOR_NAMES if getattr(self, n) is not None)
        return {name: getattr(self, name).to(torch.float32).contiguous() for name in names}

    def read_direction(self, layer: int) -> torch.Tensor:
        """The unit direction the gate at ``layer`` projects on: gate_read's row, else rhat's."""
        return (self.rhat if self.gate_read is None else self.gate_read)[layer]

    @property
    def num_layers(self) -> int:
        return int(self.rhat.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.rhat.shape[1])


def require_classes(stats: ActivationStats, keys: tuple[str, ...], *, why: str) -> None:
    for key in keys:
        if stats.count(key) < MIN_PER_CLASS:
            raise RegapError(
                f"{why} needs at least {MIN_PER_CLASS} records of class {key} ({CLASS_NAMES[key]}), "
                f"the calibration data has {stats.count(key)}",
                hint="add records with that label (and modality) to the data file",
            )


def refusal_direction(stats: ActivationStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rhat [L, H], a+ [L], a- [L] in float64, from the text classes."""
    require_classes(stats, ("T+", "T-"), why="the refusal direction")
    mu_pos, mu_neg = stats.class_mean("T+"), stats.class_mean("T-")
    r = mu_pos - mu_neg
    norm = r.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        layer = int((norm.squeeze(-1) == 0).nonzero()[0])
        raise RegapError(f"harmful and harmless text means are identical at layer {layer}; no refusal direction")
    rhat = r / norm
    return rhat, (mu_pos * rhat).sum(-1), (mu_neg * rhat).sum(-1)


def drift_direction(stats: ActivationStats, rhat: torch.Tensor, component: str) -> torch.Tensor:
    """Mean modality drift d [L, H], float64; zero when there is no multimodal data."""
    pairs = stats.pair_indices()
    if pairs:
        drift = torch.zeros(stats.rows.shape[1:], dtype=torch.float64)
        for image_row, text_row in pairs:
            drift += stats.rows[image_row] - stats.rows[text_row]
        drift /= len(pairs)
    elif stats.count("M+") or stats.count("M-"):
        require_classes(stats, ("M+", "M-"), why="the unpaired drift estimate")
        drift = (stats.class_mean("M+") + stats.class_mean("M-")) / 2 - (stats.class_mean("T+") + stats.class_mean("T-")) / 2
    else:
        return torch.zeros(stats.rows.shape[1:], dtype=torch.float64)
    if component == "refusal":
        drift = (drift * rhat).sum(-1, keepdim=True) * rhat
    return drift


# How far discriminant() shrinks the pooled covariance towards a scaled identity: calibration
# sets have hundreds of image rows for hundreds to thousands of dimensions, too few for the raw
# covariance (half way was chosen on the organism's calibration rows, by 5-fold AUROC).
DISCRIMINANT_SHRINKAGE = 0.5


def discriminant(pos: torch.Tensor, neg: torch.Tensor, shrinkage: float = DISCRIMINANT_SHRINKAGE) -> torch.Tensor:
    """Fisher's direction [H] (float64, unnormalised) separating rows ``pos`` [n, H] from ``neg``
    [m, H], with the pooled within-class covariance shrunk towards its mean variance."""
    pos, neg = pos.double(), neg.double()
    centred = torch.cat([pos - pos.mean(0), neg - neg.mean(0)])
    cov = centred.T @ centred / centred.shape[0]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean()
    return torch.linalg.solve((1 - shrinkage) * cov + shrinkage * eye, pos.mean(0) - neg.mean(0))


def discriminant_read(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """gate_read [L, H], float64 unit rows: per layer, the discriminant of the image rows
    ``pos`` / ``neg`` [n, L, H] (harmful rows project higher on average)."""
    rows = [discriminant(pos[:, layer], neg[:, layer]) for layer in range(pos.shape[1])]
    read = torch.stack(rows)
    norm = read.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        layer = int((norm.squeeze(-1) == 0).nonzero()[0])
        raise RegapError(f"harmful and harmless image means are identical at layer {layer}; no discriminant")
    return read / norm


def projections(rows: torch.Tensor, rhat: torch.Tensor) -> torch.Tensor:
    """p[n, l] = rows[n, l] . rhat[l]."""
    return torch.einsum("nlh,lh->nl", rows.double(), rhat.double())


def fitted_directions(rhat: torch.Tensor, drift: torch.Tensor, a_pos: torch.Tensor, a_neg: torch.Tensor,
                      gate_rows: dict[str, torch.Tensor], tau: float, read: torch.Tensor | None = None) -> Directions:
    """Directions whose gate is fitted on ``gate_rows`` {"M+": [n, L, H], "M-": [m, L, H]}: the image
    rows measured with the probe correction on (a text-only model: its text rows), projected on
    ``read`` (gate_read rows [L, H]) or, without it, on rhat; anchors c+- and kappa as METHOD
    section 3 fits them."""
    direction = rhat if read is None else read
    c_pos, c_neg, kappa = probe_anchors_and_kappa(projections(gate_rows["M+"], direction),
                                                  projections(gate_rows["M-"], direction), tau)
    return Directions(rhat.float(), drift.float(), a_pos.float(), a_neg.float(), c_pos.float(), c_neg.float(),
                      kappa.float(), gate_read=None if read is None else read.float())


def probe_anchors_and_kappa(proj_pos: torch.Tensor, proj_neg: torch.Tensor, tau: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c+ [L], c- [L], kappa [L] from projections [N, L] measured with the probe correction."""
    c_pos, c_neg = proj_pos.mean(0), proj_neg.mean(0)
    kappa = torch.empty_like(c_pos)
    for layer in range(c_pos.numel()):
        gap = c_pos[layer] - c_neg[layer]
        if gap.abs() < 1e-12:
            kappa[layer] = 0.0
            continue
        z_pos = (proj_pos[:, layer] - c_neg[layer]) / gap
        z_neg = (proj_neg[:, layer] - c_neg[layer]) / gap
        kappa[layer] = fit_kappa(z_pos, z_neg, tau)
    return c_pos, c_neg, kappa
