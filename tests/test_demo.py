"""The README's quick start: ``regap-export demo`` on its default model, the organism. It runs
once per test process (conftest.py's organism_demo); test_clients.py runs the export it writes in
transformers.js."""
from __future__ import annotations

import json

import pytest

from regap_export.evaluation.behaviour import is_refusal
from regap_export.evaluation import EVALUATION_FILENAME
from regap_testing import ORGANISM_GROUP

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(ORGANISM_GROUP)]


def _replies(output: str, kind: str) -> tuple[str, str]:
    """(uncorrected, corrected) reply that step 5 printed for ``kind`` ("image harmful", ...)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{kind} prompt:"))
    off, on = (line.strip() for line in lines[start + 1:start + 3])
    assert off.startswith("uncorrected:") and on.startswith("corrected"), lines[start:start + 3]
    return off.split(":", 1)[1].strip(), on.split(":", 1)[1].strip()


def test_every_step_runs_and_parity_passes(organism_demo):
    _, output = organism_demo
    for step in range(1, 6):
        assert f"[{step}/5]" in output
    assert "parity PASSED" in output and "text reply unchanged by the correction" in output
    assert "FAILED" not in output


def test_it_calibrates_with_the_options_tune_chose_for_the_organism(organism_demo):
    """The demo shows the operating point a user would get from ``tune``: the options shipped in
    regap_export/models/organism/tuned_options.json, which the written directions carry."""
    from regap_export.calibration.directions_io import load_directions
    from regap_export.tour import tuned_options

    folder, output = organism_demo
    shipped = tuned_options("embedded:organism")
    assert shipped is not None, "the organism ships no tuned options"
    options, _, described = shipped
    assert f"with the options `regap-export tune` chose for it ({described};" in output
    assert load_directions(folder / "directions").options == options


def test_it_shows_a_harmful_image_request_refused_only_corrected_and_a_harmless_one_answered(organism_demo):
    _, output = organism_demo
    assert "image requests picked from step 4" in output  # step 4 found a request the correction flipped
    off, on = _replies(output, "image harmful")
    assert not is_refusal(off) and is_refusal(on), (off, on)
    off, on = _replies(output, "image harmless")
    assert not is_refusal(off) and not is_refusal(on), (off, on)


def test_its_evaluation_shows_the_gap_closing_and_text_untouched(organism_demo):
    folder, _ = organism_demo
    report = json.loads((folder / "corrected" / EVALUATION_FILENAME).read_text())
    generations = report["generations"]
    text = [g for g in generations if g["modality"] == "text"]
    assert text and all(g["text_on"] == g["text_off"] for g in text)
    cells = {(c["modality"], c["label"]): c for c in report["behaviour"]["cells"]}
    harmful_image = cells["image", "harmful"]
    assert harmful_image["refusal_on"] > harmful_image["refusal_off"]
    assert cells["text", "harmful"]["refusal_on"] == cells["text", "harmful"]["refusal_off"]
