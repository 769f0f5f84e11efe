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


def test_refusal_coordinate_aurocs_read_each_layer_along_its_own_direction(study):
    """Layer 3 separates its classes along its rhat, layer 5 only orthogonally to it: the sort
    must see the first and not the second (a swapped layer index or direction fails)."""
    gen = torch.Generator().manual_seed(2)
    hidden, layers = 16, [3, 5]
    rhat = torch.zeros(8, hidden)
    rhat[3, 0], rhat[5, 1] = 1.0, 1.0
    pos, neg = (torch.randn(50, 2, hidden, generator=gen, dtype=torch.float64) for _ in range(2))
    pos[:, 0, 0] += 10.0  # layer 3, along its rhat
    pos[:, 1, 0] += 10.0  # layer 5, along layer 3's rhat: orthogonal to its own
    sorted_3, sorted_5 = study.refusal_coordinate_aurocs(pos, neg, rhat, layers)
    assert sorted_3 == 1.0
    assert abs(sorted_5 - 0.5) < 0.15


def test_outcome_table_groups_requests_by_label_and_corrected_outcome(study):
    """Four groups, each counted once; the gate column counts band means >= 0.5 and the last
    column counts the group's refusals under the open gate (a swapped key or group fails)."""
    labels = {"a": "harmful", "b": "harmful", "c": "harmful", "d": "harmless", "e": "harmless"}
    refused = {"a": True, "b": False, "c": False, "d": False, "e": True}
    band_gate = {"a": 0.9, "b": 0.8, "c": 0.1, "d": 0.2, "e": 0.6}
    refused_open = {"a": True, "b": False, "c": True, "d": True, "e": True}
    rows = {(r["label"], r["refused"]): r for r in study.outcome_table(band_gate, labels, refused, refused_open)}
    assert [rows[k]["n"] for k in sorted(rows)] == [2, 1, 1, 1]  # (harmful, answered / refused), (harmless, ...)
    answered = rows[("harmful", False)]
    assert abs(answered["mean_gate"] - 0.45) < 1e-12
    assert answered["gate_open"] == 1 and answered["refused_gate_open"] == 1
    assert rows[("harmless", False)]["gate_open"] == 0 and rows[("harmless", False)]["refused_gate_open"] == 1
    assert study.outcome_table(band_gate, labels, refused)[0]["refused_gate_open"] is None
