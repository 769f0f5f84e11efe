"""Separability and drift statistics (METHOD section 2), and the 1-D logistic fit of kappa.

Pure tensor math: inputs are projections or vectors, nothing here knows a model.
"""
from __future__ import annotations

import math

import torch

KAPPA_L2 = 1e-2  # keeps kappa finite when M+ and M- are perfectly separated
KAPPA_MAX = 100.0


def cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Cohen's d with the pooled standard deviation (ddof = 1 per class)."""
    pos, neg = pos.double(), neg.double()
    n1, n2 = pos.numel(), neg.numel()
    if n1 < 2 or n2 < 2:
        return float("nan")
    pooled = ((n1 - 1) * pos.var(unbiased=True) + (n2 - 1) * neg.var(unbiased=True)) / (n1 + n2 - 2)
    gap = pos.mean() - neg.mean()
    if pooled <= 0:
        return math.copysign(float("inf"), float(gap)) if gap != 0 else 0.0
    return float(gap / pooled.sqrt())


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(p+ > p-) + 0.5 P(p+ = p-): the Mann-Whitney statistic, exact with ties."""
    pos, neg = pos.double().flatten(), neg.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


def usable_separation(pos: torch.Tensor, neg: torch.Tensor, threshold: float) -> float:
    """J = TPR - FPR of the rule "p > threshold" (positives are the harmful class)."""
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    return float((pos > threshold).double().mean() - (neg > threshold).double().mean())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.double().norm(), b.double().norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float(a.double() @ b.double() / (na * nb))


def fit_kappa(z_pos: torch.Tensor, z_neg: torch.Tensor, tau: float) -> float:
    """Slope of P(harmful | z) = sigmoid(kappa (z - tau)), by penalised Newton steps.

    The offset is fixed by tau, as in the gate, so kappa is the only free parameter.
    """
    z = torch.cat([z_pos.double(), z_neg.double()]) - tau
    y = torch.cat([torch.ones(z_pos.numel()), torch.zeros(z_neg.numel())]).double()
    if z.numel() == 0:
        return 0.0
    kappa = torch.zeros((), dtype=torch.float64)
    n = z.numel()
    for _ in range(100):
        p = torch.sigmoid(kappa * z)
        grad = ((p - y) * z).sum() / n + KAPPA_L2 * kappa
        hess = (p * (1 - p) * z * z).sum() / n + KAPPA_L2
        step = grad / hess
        kappa = (kappa - step).clamp(-KAPPA_MAX, KAPPA_MAX)
        if step.abs() < 1e-12:
            break
    return float(kappa)


def separability(pos: torch.Tensor, neg: torch.Tensor, threshold: float) -> dict[str, float]:
    return {"dprime": cohens_d(pos, neg), "auroc": auroc(pos, neg), "J": usable_separation(pos, neg, threshold)}
