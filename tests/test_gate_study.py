"""examples/organism/gate_study.py: the two helpers behind RESULTS.md's "The gate, measured"."""
from __future__ import annotations

import pytest
import torch

from regap_export.directions import Directions
from regap_export.directions_io import DirectionsFile, load_directions, save_directions
from regap_export.options import Band, RegapOptions
from regap_testing import organism_example


@pytest.fixture(scope="module")
def study():
    return organism_example("gate_study")


def test_scale_kappa_multiplies_the_slopes_and_keeps_everything_else(study, tmp_path):
    gen = torch.Generator().manual_seed(3)
    layers, hidden = 4, 6
    directions = Directions(*(torch.randn(layers, hidden, generator=gen) for _ in range(2)),
                            *(torch.randn(layers, generator=gen) for _ in range(5)))
    options = RegapOptions(probe_band=Band(0, 2), adaptive_band=Band(2, 4), tau=0.3)
    save_directions(tmp_path, DirectionsFile(directions, options, "f" * 64, "0" * 64, "tiny"))
    study.scale_kappa(tmp_path, 2.5, tmp_path / "sharper")
    before, after = load_directions(tmp_path), load_directions(tmp_path / "sharper")
    torch.testing.assert_close(after.directions.kappa, 2.5 * before.directions.kappa, rtol=1e-6, atol=0)
    for name in Directions.TENSOR_NAMES:
        if name != "kappa":
            assert torch.equal(getattr(after.directions, name), getattr(before.directions, name)), name
    assert after.options == before.options and after.model_fingerprint == before.model_fingerprint


def test_out_of_fold_auroc_sees_signal_and_not_noise(study):
    gen = torch.Generator().manual_seed(5)
    noise_pos, noise_neg = (torch.randn(60, 40, generator=gen, dtype=torch.float64) for _ in range(2))
    shift = torch.zeros(40, dtype=torch.float64)
    shift[7] = 3.0
    assert study.out_of_fold_auroc(noise_pos + shift, noise_neg) > 0.9
    assert abs(study.out_of_fold_auroc(noise_pos, noise_neg) - 0.5) < 0.15
