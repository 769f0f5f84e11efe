"""examples/organism/clustered.py: refusal intervals that resample objects, not requests."""
from __future__ import annotations

import numpy as np
import pytest

from regap_testing import organism_example


@pytest.fixture(scope="module")
def clustered():
    return organism_example("clustered")


def test_slot_drops_the_template_and_the_modality(clustered):
    assert clustered.slot_of("harmless-0-32-5-img") == "harmless-0-32"
    assert clustered.slot_of("harmful-1-07-0") == "harmful-1-07"
    with pytest.raises(ValueError, match="not an organism template id"):
        clustered.slot_of("bundled-h-001-x")


def test_requests_are_counted_per_slot(clustered):
    ids = ["a-0-01-0", "a-0-01-3-img", "a-0-02-5", "a-0-02-6", "a-0-02-7"]
    sizes, refused = clustered.refusals_by_slot(ids, {"a-0-01-3-img", "a-0-02-6", "a-0-02-7"})
    assert sizes.tolist() == [2, 3] and refused.tolist() == [1, 2]


def test_objects_refused_together_widen_the_interval(clustered):
    sizes = np.full(24, 8)
    together = np.array([8] * 6 + [0] * 18)      # six objects refused under every template: 25 %
    spread = np.full(24, 2)                       # two of eight templates refused for every object: 25 %
    rate, low, high = clustered.cluster_interval(sizes, together)
    assert rate == 0.25 and high - low > 0.25
    rate_spread, low_spread, high_spread = clustered.cluster_interval(sizes, spread)
    assert rate_spread == 0.25 and low_spread == high_spread == 0.25  # no object differs from another
    # all-or-nothing objects of 8: one object counts once, so the variance is about 8 x the binomial's
    assert 6.5 < clustered.design_effect(sizes, together) < 9.0
    assert clustered.design_effect(sizes, spread) == 0.0
