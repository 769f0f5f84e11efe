"""The hook-based reference (parity oracle) against the rewritten model (folded layers)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from regap_export.method.folding import FIXED, GATED, fold, probe_only, score_readout, sequence_strength
from regap_export.models import adapter_for_model
from regap_export.validation.reference import (last_token_index, reference_corrections, reference_plan,
                                    reference_sequence_alpha)
from regap_export.method.rewrite import insert_corrections, remove_corrections

from regap_testing import batch_inputs, block_outputs, logits_of, options_for, realistic_directions
from tiny_models import build_tiny

FAMILIES = ["llama", "llava"]
MODES = ["fixed", "regap", "regap-seq"]
TOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    model, processor = build_tiny(request.param)
    adapter = adapter_for_model(model)
    inputs = batch_inputs(adapter, processor)
    directions = realistic_directions(model, adapter, inputs, options_for("regap"))
    return model, adapter, inputs, directions


def _alpha(model, adapter, directions, options, inputs):
    if options.mode != "regap-seq":
        return None
    return reference_sequence_alpha(model, adapter, directions, options, inputs)


def _folded_logits(model, adapter, inputs, corrections, alpha):
    """Logits with ``corrections`` inserted as layers (regap-seq's alpha as the regap_alpha input)."""
    insert_corrections(model, adapter, corrections)
    try:
        kwargs = {"regap_alpha": alpha.float()} if alpha is not None else {}
        return logits_of(model, inputs, **kwargs)
    finally:
        remove_corrections(model, adapter)


@pytest.mark.parametrize("mode", MODES)
def test_rewritten_model_matches_reference(setup, mode):
    model, adapter, inputs, directions = setup
    options = options_for(mode)
    original = logits_of(model, inputs)
    alpha = _alpha(model, adapter, directions, options, inputs)
    with reference_corrections(model, adapter, directions, options, sequence_alpha=alpha):
        expected = logits_of(model, inputs)
    assert torch.equal(logits_of(model, inputs), original), "the hooks must be gone after the context"
    assert (expected - original).abs().max() > 1e-3, "the correction should change the logits"

    got = _folded_logits(model, adapter, inputs, fold(directions, options), alpha)
    assert (got - expected).abs().max().item() <= TOL
    assert torch.equal(logits_of(model, inputs), original), "remove_corrections must restore the model exactly"


@pytest.mark.parametrize("mode", MODES)
def test_zero_strength_is_the_unmodified_model(setup, mode):
    model, adapter, inputs, directions = setup
    options = options_for(mode, alpha0=0.0, alpha_max=0.0)
    original = logits_of(model, inputs)
    alpha = _alpha(model, adapter, directions, options, inputs)
    if alpha is not None:
        assert torch.equal(alpha, torch.zeros_like(alpha))
    with reference_corrections(model, adapter, directions, options, sequence_alpha=alpha):
        assert torch.equal(logits_of(model, inputs), original)
    assert torch.equal(_folded_logits(model, adapter, inputs, fold(directions, options), alpha), original)


def test_gates_vary(setup):
    model, adapter, inputs, directions = setup
    options = options_for("regap")
    record: dict[int, torch.Tensor] = {}
    with reference_corrections(model, adapter, directions, options, record=record):
        logits_of(model, inputs)
    assert sorted(record) == options.resolved(directions.num_layers).adaptive_band.layers()
    mask = inputs["attention_mask"].bool()
    for layer, gate in record.items():
        values = gate[mask]
        assert 0.0 < values.min() < 0.3 and 0.7 < values.max() < 1.0, (layer, values.min(), values.max())
        assert values.std() > 0.1
        assert bool(((values > 0.05) & (values < 0.95)).any())


def test_sequence_alpha_varies_and_matches_folded_readout(setup):
    model, adapter, inputs, directions = setup
    options = options_for("regap-seq")
    alpha = reference_sequence_alpha(model, adapter, directions, options, inputs)
    assert alpha.shape == (inputs["input_ids"].shape[0],) and alpha.dtype == torch.float64
    assert 0.0 < alpha.min() < 0.2 and 0.8 < alpha.max() < 1.0 and alpha.std() > 0.1
    # The same score through the folded path: probe-band layers, affine readout, sigmoid.
    readout = score_readout(directions, options)
    insert_corrections(model, adapter, probe_only(directions, options))
    try:
        h = block_outputs(model, adapter, inputs)[readout.layer]
    finally:
        remove_corrections(model, adapter)
    last = last_token_index(inputs["attention_mask"], h.shape[0], h.shape[1])
    z = h[torch.arange(h.shape[0]), last] @ readout.w.double() + readout.b
    assert torch.allclose(sequence_strength(z, readout, options), alpha, atol=1e-5)
    # alpha scales with alpha_max
    half = reference_sequence_alpha(model, adapter, directions, dataclasses.replace(options, alpha_max=0.5), inputs)
    assert torch.allclose(half, alpha / 2, atol=1e-12)


@pytest.mark.parametrize("mode", ["regap", "regap-seq"])
def test_gate_sharpness_multiplies_the_slopes_in_the_fold_and_the_reference(setup, mode):
    model, adapter, inputs, directions = setup
    as_fitted, sharper = options_for(mode), options_for(mode, gate_sharpness=4.0)
    if mode == "regap":
        pairs = list(zip(fold(directions, as_fitted), fold(directions, sharper)))
        assert {plain.kind for plain, _ in pairs} == {FIXED, GATED}
        for plain, sharp in pairs:
            assert torch.equal(sharp.v, plain.v)
            if plain.kind == GATED:  # the gate's logit kappa (z - tau) = h . w + b, kappa x 4
                torch.testing.assert_close(sharp.w, 4 * plain.w, rtol=1e-6, atol=0)
                assert sharp.b == pytest.approx(4 * plain.b, rel=1e-9)
    else:
        plain, sharp = score_readout(directions, as_fitted), score_readout(directions, sharper)
        assert torch.equal(sharp.w, plain.w) and sharp.b == plain.b
        assert sharp.kappa == pytest.approx(4 * plain.kappa, rel=1e-12)
    fitted_alpha = _alpha(model, adapter, directions, as_fitted, inputs)
    alpha = _alpha(model, adapter, directions, sharper, inputs)
    with reference_corrections(model, adapter, directions, as_fitted, sequence_alpha=fitted_alpha):
        fitted = logits_of(model, inputs)
    with reference_corrections(model, adapter, directions, sharper, sequence_alpha=alpha):
        expected = logits_of(model, inputs)
    assert (expected - fitted).abs().max() > 1e-4, "a sharper gate should change the corrected logits"
    got = _folded_logits(model, adapter, inputs, fold(directions, sharper), alpha)
    assert (got - expected).abs().max().item() <= TOL


def test_plan_layers_per_mode():
    from regap_export.calibration.directions import Directions

    L, H = 8, 4
    d = Directions(torch.nn.functional.normalize(torch.randn(L, H), dim=-1), torch.randn(L, H), torch.ones(L),
                   torch.zeros(L), torch.ones(L), torch.zeros(L), torch.full((L,), 5.0))
    from regap_export.options import RegapOptions
    assert sorted(reference_plan(d, RegapOptions(mode="regap"))) == [2, 3, 4, 5]
    assert sorted(reference_plan(d, RegapOptions(mode="fixed"))) == [2, 3, 4, 5]
    assert sorted(reference_plan(d, RegapOptions(mode="regap-seq"), sequence_alpha=torch.ones(2))) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="sequence_alpha"):
        reference_plan(d, RegapOptions(mode="regap-seq"))
    with pytest.raises(ValueError, match="sequence_alpha"):
        reference_plan(d, RegapOptions(mode="regap"), sequence_alpha=torch.ones(2))
    # fixed: h - alpha_max d; regap probe layer: h - alpha0 d; gate at z = tau is 1/2
    h = torch.randn(2, 3, H)
    plan = reference_plan(d, RegapOptions(mode="fixed", alpha_max=0.5, positions="all", layer_drift="total"))
    assert torch.allclose(plan[2](h), h - 0.5 * d.drift[2])
    plan = reference_plan(d, RegapOptions(mode="regap", alpha0=0.25, alpha_max=1.0, positions="all", layer_drift="total"))
    assert torch.allclose(plan[3](h), h - 0.25 * d.drift[3])
    on_tau = (0.5 * d.rhat[4]).expand(1, 1, H)  # h . rhat = 0.5 = tau with c- = 0, c+ = 1
    assert torch.allclose(plan[4](on_tau), on_tau - 0.5 * d.drift[4], atol=1e-6)
    # The default subtracts the drift added since the previous corrected layer.
    plan = reference_plan(d, RegapOptions(mode="regap", alpha0=0.25, alpha_max=1.0, positions="all"))
    assert torch.allclose(plan[2](h), h - 0.25 * d.drift[2])
    assert torch.allclose(plan[3](h), h - 0.25 * (d.drift[3] - d.drift[2]))
    assert torch.allclose(plan[4](on_tau), on_tau - 0.5 * (d.drift[4] - d.drift[3]), atol=1e-6)


def test_increments_telescope_to_the_layer_drift():
    """Applied one after another on a residual stream that carries them, the increments of
    a contiguous band subtract exactly d_l by layer l (the folded and the reference rules)."""
    from regap_export.calibration.directions import Directions
    from regap_export.method.folding import fold
    from regap_export.options import Band, RegapOptions

    L, H = 8, 4
    d = Directions(torch.nn.functional.normalize(torch.randn(L, H), dim=-1), torch.randn(L, H), torch.ones(L),
                   torch.zeros(L), torch.ones(L), torch.zeros(L), torch.full((L,), 5.0))
    options = RegapOptions(mode="fixed", alpha_max=1.0, positions="all", probe_band=Band(2, 4), adaptive_band=Band(4, 6))
    folded = {c.layer: c.v.double() for c in fold(d, options)}
    plan = reference_plan(d, options)
    h = torch.zeros(1, 1, H, dtype=torch.float64)
    total = torch.zeros(H, dtype=torch.float64)
    for layer in range(2, 6):
        h = plan[layer](h)
        total = total + folded[layer]
        assert torch.allclose(h.reshape(-1), -d.drift[layer].double(), atol=1e-6)
        assert torch.allclose(total, -d.drift[layer].double(), atol=1e-6)


@pytest.mark.parametrize("mode", ["regap", "fixed", "regap-seq"])
def test_plan_applies_the_image_mask(mode):
    from regap_export.calibration.directions import Directions
    from regap_export.options import RegapOptions

    L, H = 8, 4
    d = Directions(torch.nn.functional.normalize(torch.randn(L, H), dim=-1), torch.randn(L, H), torch.ones(L),
                   torch.zeros(L), torch.ones(L), torch.zeros(L), torch.full((L,), 5.0))
    alpha = torch.tensor([0.7, 0.7]) if mode == "regap-seq" else None
    h = torch.randn(2, 3, H, dtype=torch.float64)
    mask = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    masked = reference_plan(d, RegapOptions(mode=mode), sequence_alpha=alpha, image_mask=mask)
    everywhere = reference_plan(d, RegapOptions(mode=mode, positions="all"), sequence_alpha=alpha)
    for layer in (3, 4):
        out = masked[layer](h)
        assert torch.equal(out[0], h[0]) and torch.equal(out[1, :2], h[1, :2]), "mask 0 must leave h exactly"
        assert torch.allclose(out[1, 2], everywhere[layer](h)[1, 2]), "mask 1 must correct as positions=all"
        assert not torch.allclose(out[1, 2], h[1, 2])
    # No mask: the default, 0 (uncorrected) for image-only positions, 1 for "all".
    default = reference_plan(d, RegapOptions(mode=mode), sequence_alpha=alpha)
    assert torch.equal(default[3](h), h)
    with pytest.raises(ValueError, match="image_mask has shape"):
        masked[3](torch.randn(2, 4, H))


def test_last_token_index():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert last_token_index(mask, 3, 4).tolist() == [3, 3, 1]
    assert last_token_index(None, 2, 5).tolist() == [4, 4]


def test_reference_does_not_import_the_folded_path():
    import ast
    from pathlib import Path

    import regap_export.validation.reference as reference

    tree = ast.parse(Path(reference.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for forbidden in ("folding", "correction", "rewrite"):
        assert not any(name.split(".")[-1] == forbidden for name in imported), forbidden


def test_coinciding_probe_anchors_are_a_directions_error_in_product_and_reference():
    from regap_export.calibration.directions import Directions
    from regap_export.errors import ArtifactError
    from regap_export.options import RegapOptions

    L, H = 8, 4
    # anchor_probe_harmful == anchor_probe_harmless at every layer: the gate is undefined
    d = Directions(torch.nn.functional.normalize(torch.randn(L, H), dim=-1), torch.randn(L, H), torch.ones(L),
                   torch.zeros(L), torch.ones(L), torch.ones(L), torch.full((L,), 5.0))
    with pytest.raises(ArtifactError, match="probe anchors coincide") as product:
        list(fold(d, RegapOptions(mode="regap")))
    plan = reference_plan(d, RegapOptions(mode="regap", positions="all"))
    with pytest.raises(ArtifactError, match="probe anchors coincide") as oracle:
        plan[4](torch.randn(1, 2, H))
    assert product.value.field == oracle.value.field == "anchor_probe_harmful"


def test_directions_of_another_model_are_refused_by_the_reference(setup):
    from regap_export.errors import ArtifactError

    model, adapter, inputs, directions = setup
    shorter = dataclasses.replace(directions, **{name: getattr(directions, name)[:-1]
                                                 for name in directions.TENSOR_NAMES})
    with pytest.raises(ArtifactError, match="layers, the model"):
        with reference_corrections(model, adapter, shorter, options_for("regap")):
            pass


def test_regap_seq_reads_at_the_probe_bands_end():
    """METHOD.md's recipe for a later score: end the probe band later; every layer keeps alpha(x)."""
    from regap_export.calibration.directions import Directions
    from regap_export.method.folding import SCALED, gate_constants
    from regap_export.options import Band, RegapOptions

    L, H = 8, 4
    d = Directions(torch.nn.functional.normalize(torch.randn(L, H), dim=-1), torch.randn(L, H), torch.ones(L),
                   torch.zeros(L), torch.linspace(1, 2, L), torch.zeros(L), torch.linspace(1, 8, L))
    default, late = RegapOptions(mode="regap-seq"), RegapOptions(mode="regap-seq", probe_band=Band(2, 7),
                                                                  adaptive_band=Band(7, 8))
    assert score_readout(d, default).layer == 3
    readout = score_readout(d, late)
    assert readout.layer == 6 and readout.kappa == pytest.approx(float(d.kappa[6]))
    w, b = gate_constants(d, 6, late.tau, with_kappa=False)
    assert torch.equal(readout.w, w) and readout.b == b
    corrections = fold(d, late)
    assert [c.layer for c in corrections] == list(range(2, 8)) and {c.kind for c in corrections} == {SCALED}
