"""Calibration on tiny seeded models of every family, checked against a direct computation."""
from __future__ import annotations


import pytest
import torch

from regap_export.calibration import calibrate
from regap_export.data import to_multimodal_pairs
from regap_export.models import adapter_for_model
from regap_export.models.loading import LoadedModel
from regap_export.options import RegapOptions
from tiny_models import TINY_FAMILIES, build_tiny


def loaded_tiny(family: str) -> LoadedModel:
    model, processor = build_tiny(family)
    return LoadedModel(model, processor, adapter_for_model(model), f"tiny:{family}", None)


def direct_block_outputs(loaded: LoadedModel, record) -> torch.Tensor:
    """[L, H] float64 block outputs at the last prompt token, one unpadded input at a time.

    Blocks 0..L-2 come from ``output_hidden_states``; the last entry of hidden_states is
    after the final norm in transformers, so block L-1 is read as the norm's input.
    """
    adapter, processor, model = loaded.adapter, loaded.processor, loaded.model
    with_image = record.modality == "image"
    prompt = adapter.render_prompt(processor, record.prompt_text, with_image=with_image)
    inputs = adapter.encode(processor, [prompt], [record.open_image()] if with_image else None)
    final_norm_input = {}
    norm = adapter.language_model(model).norm
    handle = norm.register_forward_pre_hook(lambda _m, args: final_norm_input.__setitem__("h", args[0]))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hidden = out.hidden_states
    num_layers = adapter.num_layers(model)
    rows = [hidden[l + 1][0, -1] for l in range(num_layers - 1)] + [final_norm_input["h"][0, -1]]
    return torch.stack(rows).double()


def records_for(loaded: LoadedModel, records):
    return to_multimodal_pairs(records) if loaded.adapter.multimodal else list(records)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_directions_match_direct_computation(family, small_records):
    loaded = loaded_tiny(family)
    records = records_for(loaded, small_records)
    result = calibrate(loaded, records, RegapOptions(), batch_size=4, show_progress=False)
    d = result.bundle.directions

    rows = {r.id: direct_block_outputs(loaded, r) for r in records}
    def mean(key):
        return torch.stack([rows[r.id] for r in records if r.class_key == key]).mean(0)
    r = mean("T+") - mean("T-")
    rhat = r / r.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(d.rhat.double(), rhat, atol=1e-5, rtol=0)
    torch.testing.assert_close(d.anchor_text_harmful.double(), (mean("T+") * rhat).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.anchor_text_harmless.double(), (mean("T-") * rhat).sum(-1), atol=1e-5, rtol=1e-5)
    if loaded.adapter.multimodal:
        by_id = {rec.id: rec for rec in records}
        diffs = [rows[rec.id] - rows[rec.pair] for rec in records if rec.modality == "image"]
        assert len(diffs) == len(small_records)
        assert all(by_id[rec.pair].modality == "text" for rec in records if rec.modality == "image")
        torch.testing.assert_close(d.drift.double(), torch.stack(diffs).mean(0), atol=1e-5, rtol=1e-5)
        assert float(d.drift.norm()) > 0
    else:
        assert float(d.drift.abs().max()) == 0.0
    assert set(result.report["counts"]) == {"T+", "T-", "M+", "M-"}
    assert len(result.report["layers"]) == loaded.adapter.num_layers(loaded.model)


def test_probe_anchors_match_a_hooked_forward(small_records):
    """c+/c- are mean projections of M+/M- with the probe band's fixed correction applied
    where the runtime applies it (default positions: the last prompt token of image inputs)."""
    loaded = loaded_tiny("llava")
    records = records_for(loaded, small_records)
    opts = RegapOptions().resolved(loaded.adapter.num_layers(loaded.model))
    assert opts.positions == "last+generated"
    result = calibrate(loaded, records, opts, batch_size=4, measure_after=False, show_progress=False)
    d = result.bundle.directions
    layers = loaded.adapter.decoder_layers(loaded.model)

    def at_last_token(out, layer):
        out = out.clone()
        out[:, -1] -= opts.alpha0 * d.drift[layer]
        return out

    handles = [layers[l].register_forward_hook(lambda _m, _a, out, l=l: at_last_token(out, l))
               for l in opts.probe_band.layers()]
    try:
        proj = {key: [] for key in ("M+", "M-")}
        for rec in records:
            if rec.modality == "image":
                proj[rec.class_key].append((direct_block_outputs(loaded, rec) * d.rhat.double()).sum(-1))
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(d.anchor_probe_harmful.double(), torch.stack(proj["M+"]).mean(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(d.anchor_probe_harmless.double(), torch.stack(proj["M-"]).mean(0), atol=1e-4, rtol=1e-5)
    assert torch.isfinite(d.kappa).all()


def test_post_instruction_mean_reads_more_than_the_last_token(small_records):
    loaded = loaded_tiny("qwen2")
    last = calibrate(loaded, small_records, RegapOptions(), show_progress=False).bundle.directions
    mean = calibrate(loaded, small_records, RegapOptions(read_position="post_instruction_mean"),
                     show_progress=False).bundle.directions
    assert loaded.adapter.post_instruction_length(loaded.processor) > 1
    assert not torch.allclose(last.rhat, mean.rhat)


def test_refusal_drift_component_lies_on_rhat(small_records):
    loaded = loaded_tiny("idefics3")
    records = records_for(loaded, small_records)
    d = calibrate(loaded, records, RegapOptions(drift_component="refusal"), show_progress=False,
                  measure_after=False).bundle.directions
    along = (d.drift * d.rhat).sum(-1, keepdim=True) * d.rhat
    torch.testing.assert_close(d.drift, along, atol=1e-6, rtol=1e-5)
