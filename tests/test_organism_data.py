"""The organism's splits (examples/organism/data.py) stay apart: no held-out object is trained on.

The organism's figures (examples/organism/RESULTS.md) are only honest while val, val-wide and
test (and test-wide) share no object with training and the choosing splits (val, val-wide) share
none with test.
"""
from __future__ import annotations

import pytest

from regap_testing import organism_example


@pytest.fixture(scope="module")
def data():
    return organism_example("data")


def _slots(records):
    return {r["slot"] for r in records}


def test_held_out_objects_are_never_trained_on(data):
    train = data.records("train") + data.bundled_train()
    for split in ("val", "val-wide", "test", "test-wide"):
        held = data.records(split)
        assert held and not _slots(held) & _slots(train), split
        assert not {r["instruction"] for r in held} & {r["instruction"] for r in train}, split
    assert not _slots(data.records("val-wide")) & _slots(data.records("test-wide"))


@pytest.mark.parametrize("split, per_label", [("val", 96), ("test", 192)])
def test_wide_is_its_split_under_every_template(data, split, per_label):
    narrow, wide = data.records(split), data.records(split + "-wide")
    assert _slots(wide) == _slots(narrow)
    assert {(r["id"], r["instruction"]) for r in narrow} <= {(r["id"], r["instruction"]) for r in wide}
    for label in ("harmful", "harmless"):
        rows = [r for r in wide if r["label"] == label]
        assert len(rows) == len(_slots(rows)) * 8 == per_label
        assert len({r["instruction"] for r in rows}) == per_label


def test_an_unknown_split_is_refused(data):
    with pytest.raises(SystemExit, match="unknown split 'valid'"):
        data.records("valid")


def test_broad_requests_are_new_and_their_validation_is_never_trained_on():
    """examples/organism/broad.py (the stage-3 experiment): its training requests are not in the
    bundled set (any split) nor the organism's held-out splits, and its validation requests are
    in none of the training data."""
    from regap_export.data import load_bundled

    broad, data = organism_example("broad"), organism_example("data")
    bundled = {r.instruction for r in load_bundled()}
    held = {r["instruction"] for split in ("val", "val-wide", "test", "test-wide") for r in data.records(split)}
    trained = set(broad.BROAD_HARMLESS) | set(broad.BROAD_HARMFUL)
    val = {text for text, _ in broad.BROAD_VAL}
    assert len(trained) == len(broad.BROAD_HARMLESS) + len(broad.BROAD_HARMFUL) and len(val) == len(broad.BROAD_VAL)
    assert not trained & (bundled | held | val)
    assert not val & (bundled | {r["instruction"] for r in data.build(with_extra_harmful=True)})
    assert {label for _, label in broad.BROAD_VAL} == {"harmful", "harmless"}
