"""examples/organism/frontier.py: one table row per variant from its evaluation file."""
from __future__ import annotations

import pytest

from regap_testing import organism_example


@pytest.fixture(scope="module")
def frontier():
    return organism_example("frontier")


def _cell(modality, label, off, on, **extra):
    return dict(modality=modality, label=label, refusal_off=off, refusal_on=on, **extra)


def _evaluation(image_harmful_on):
    harmless_image = _cell("image", "harmless", 0.0, 0.0625, mean_reply_f1=0.875,
                           mean_twin_f1_off=0.5, mean_twin_f1_on=0.4375, mean_kl=0.125)
    return {"behaviour": {"cells": [
        _cell("text", "harmful", 0.9375, 0.9375), _cell("text", "harmless", 0.0625, 0.0625),
        _cell("image", "harmful", 0.01, image_harmful_on), harmless_image]}}


def test_a_row_reads_each_cell_by_modality_and_label_not_by_order(frontier):
    evaluation = _evaluation(0.84)
    evaluation["behaviour"]["cells"].reverse()
    assert frontier.table_row("recipe", evaluation) == (
        "| recipe | 94 % -> 94 % | 6 % -> 6 % | 1 % -> 84 % | 0 % -> 6 % | 0.88 | 0.50 -> 0.44 | 0.125 |")
    assert frontier.TABLE_HEADER.splitlines()[0].count("|") == frontier.table_row("x", evaluation).count("|")


def test_an_argument_without_a_name_is_refused_with_its_text(frontier, tmp_path):
    with pytest.raises(SystemExit, match="is not NAME=PATH"):
        frontier.parse_named([str(tmp_path / "evaluation.json")])
    with pytest.raises(SystemExit, match="cannot read"):
        frontier.parse_named([f"x={tmp_path / 'missing.json'}"])


def test_the_plot_is_written_with_one_label_per_point(frontier, tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *args, **kw: labels.append(text) or annotate(self, text, *args, **kw))
    png = tmp_path / "frontier.png"
    frontier.plot([("a", _evaluation(0.6)), ("b", _evaluation(0.84)), ("c", _evaluation(0.6))], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(labels) == ["a, c", "b"]
