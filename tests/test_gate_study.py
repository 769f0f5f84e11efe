"""examples/organism/gate_study.py: the held-out gate study behind RESULTS.md's "The gate, measured"."""
from __future__ import annotations

import pytest
import torch

from regap_testing import organism_example


@pytest.fixture(scope="module")
def study():
    return organism_example("gate_study")


def test_out_of_fold_auroc_sees_signal_and_not_noise(study):
    gen = torch.Generator().manual_seed(5)
    noise_pos, noise_neg = (torch.randn(60, 40, generator=gen, dtype=torch.float64) for _ in range(2))
    shift = torch.zeros(40, dtype=torch.float64)
    shift[7] = 3.0
    assert study.out_of_fold_auroc(noise_pos + shift, noise_neg) > 0.9
    assert abs(study.out_of_fold_auroc(noise_pos, noise_neg) - 0.5) < 0.15
