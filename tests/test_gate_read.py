"""calibrate --gate-read discriminant: the gate reads the image rows' own discriminant
(directions format 3, ``gate_read``), while the correction it scales stays ReGap's."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from regap_export.inspection import describe
from regap_export.calibration import calibrate
from regap_export.data import to_multimodal_pairs
from regap_export.calibration.directions import Directions, discriminant, discriminant_read
from regap_export.calibration.directions_io import DirectionsFile, load_directions, save_directions
from regap_export.errors import ArtifactError, RegapError
from regap_export.method.folding import gate_constants
from regap_export.models import adapter_for_model
from regap_export.models.loading import LoadedModel
from regap_export.options import RegapOptions
from regap_testing import assert_all_ok, export_and_validate, options_for, write_directions
from tiny_models import build_tiny


def loaded_tiny(family: str) -> LoadedModel:
    model, processor = build_tiny(family)
    return LoadedModel(model, processor, adapter_for_model(model), f"tiny:{family}", None)


def test_discriminant_weighs_the_tighter_axis_more():
    """Both axes move the harmful mean by 1; axis 1 varies 25 times less, so it separates far
    better and must dominate (the difference of means alone would weigh them equally)."""
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor([5.0, 0.2, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    pos, neg = (torch.randn(400, 6, generator=gen, dtype=torch.float64) * spread for _ in range(2))
    pos[:, :2] += 1.0
    w = discriminant(pos, neg)
    assert abs(float(w[1])) > 3 * abs(float(w[0]))
    assert float((pos.mean(0) - neg.mean(0)) @ w) > 0  # harmful rows project higher


def test_discriminant_read_fits_each_layer_on_its_own_rows():
    gen = torch.Generator().manual_seed(1)
    pos, neg = (torch.randn(60, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    pos[:, 0, 3] += 4.0  # layer 0 separates along axis 3
    pos[:, 1, 5] += 4.0  # layer 1 along axis 5
    read = discriminant_read(pos, neg)
    torch.testing.assert_close(read.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    assert float(read[0, 3]) > 0.9 and float(read[1, 5]) > 0.9
    with pytest.raises(RegapError, match="identical at layer 0"):
        discriminant_read(neg, neg)


def test_calibrate_reads_the_discriminant_and_keeps_the_correction(small_records):
    loaded = loaded_tiny("llava")
    records = to_multimodal_pairs(small_records)
    plain = calibrate(loaded, records, RegapOptions(), measure_after=False, show_progress=False)
    result = calibrate(loaded, records, RegapOptions(), measure_after=False, show_progress=False,
                       gate_read="discriminant")
    ours, theirs = result.bundle.directions, plain.bundle.directions
    assert theirs.gate_read is None and ours.gate_read.shape == ours.rhat.shape
    for name in ("rhat", "drift", "anchor_text_harmful", "anchor_text_harmless"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    torch.testing.assert_close(ours.gate_read.norm(dim=-1), torch.ones(ours.num_layers))
    assert float((ours.gate_read * ours.rhat).sum(-1).abs().max()) < 0.99  # another direction
    # fitted on these very rows, the discriminant puts the harmful anchor above the harmless one
    assert bool((ours.anchor_probe_harmful > ours.anchor_probe_harmless).all())
    assert not torch.equal(ours.anchor_probe_harmful, theirs.anchor_probe_harmful)
    assert result.report["gate_read"] == "discriminant"
    layer = RegapOptions().resolved(ours.num_layers).adaptive_band.layers()[0]
    w, _ = gate_constants(ours, layer, 0.5)
    cosine = float(torch.nn.functional.cosine_similarity(w.double(), ours.gate_read[layer].double(), dim=0))
    assert cosine > 0.9999


def test_discriminant_gate_needs_image_records(small_records):
    with pytest.raises(RegapError, match="image records"):
        calibrate(loaded_tiny("llama"), small_records, RegapOptions(), measure_after=False, show_progress=False,
                  gate_read="discriminant")
    with pytest.raises(RegapError, match="unknown gate read"):
        calibrate(loaded_tiny("llama"), small_records, RegapOptions(), show_progress=False, gate_read="rhat")


def _directions(gate_read: bool) -> Directions:
    gen = torch.Generator().manual_seed(2)
    unit = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen), dim=-1)
    return Directions(unit, torch.randn(3, 4, generator=gen), *(torch.randn(3, generator=gen) for _ in range(4)),
                      torch.ones(3), gate_read=unit.flip(0) if gate_read else None)


def test_gate_read_is_written_as_format_3_and_read_back(tmp_path):
    for with_read, version in ((True, "3"), (False, "2")):
        folder = tmp_path / version
        folder.mkdir()
        path = save_directions(folder, DirectionsFile(_directions(with_read), RegapOptions(), "f" * 16, "0" * 64))
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["format_version"] == version
        loaded = load_directions(folder).directions
        assert describe(folder)["gate_read"] == ("discriminant" if with_read else "refusal")
        if with_read:
            assert torch.equal(loaded.gate_read, _directions(True).gate_read)
        else:
            assert loaded.gate_read is None
    # a gate_read in a version-2 file: its anchors could be along either direction
    path = tmp_path / "3" / "directions.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "format_version": "2"})
    with pytest.raises(ArtifactError, match="gate_read tensor in a version-2 file"):
        load_directions(path)
    # a gate_read of another width than rhat: the gate would project along a wrong-sized vector
    tensors = load_file(str(path))
    tensors["gate_read"] = tensors["gate_read"][:, :-1].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ArtifactError, match=r"gate_read has shape \(3, 3\), rhat \(3, 4\)"):
        load_directions(path)


@pytest.mark.parametrize("mode", ["regap", pytest.param("regap-seq", marks=pytest.mark.slow)])
def test_export_folds_and_validates_the_gate_read(mode, tiny_llama_folder, tmp_path):
    """Directions whose gate_read is the direction the anchors were placed along and whose
    rhat is another: the graph's gate must project on gate_read (its w is parallel to it), and
    validate's independent reference must agree with the graph (positions "all", so the gate
    acts on text batches)."""
    folder = write_directions(tiny_llama_folder, tmp_path / "dirs", options_for(mode))
    bundle = load_directions(folder)
    d = bundle.directions
    other = torch.nn.functional.normalize(torch.randn(d.rhat.shape, generator=torch.Generator().manual_seed(3)), dim=-1)
    swapped = dataclasses.replace(d, rhat=other, gate_read=d.rhat)
    save_directions(folder, dataclasses.replace(bundle, directions=swapped))
    report = export_and_validate(tiny_llama_folder, folder, tmp_path / "out")
    assert_all_ok(report)
    tensors = load_file(str(tmp_path / "out" / "regap.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())["regap"]
    if mode == "regap":
        layer = bundle.options.adaptive_band.layers()[0]
        w = tensors[f"regap.{layer}.w"].reshape(-1)
    else:
        layer = config["readout"]["layer"]
        w = tensors["regap.score.w"]
    cosine = float(torch.nn.functional.cosine_similarity(w.double(), d.rhat[layer].double(), dim=0))
    assert cosine > 0.9999
