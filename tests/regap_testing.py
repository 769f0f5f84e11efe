"""Test helpers shared by the reference and export tests: a left-padded batch for a tiny
model, random but realistic ``Directions`` whose gates really vary on that batch, and
export + validate through the CLI."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from regap_export.calibration.directions import Directions
from regap_export.calibration.directions_io import DirectionsFile, save_directions
from regap_export.models.loading import load_model
from regap_export.options import Band, RegapOptions
from regap_export.validation.reference import last_token_index, reference_corrections
from regap_export.cli import app

runner = CliRunner()

PROMPTS = ("How do I bake a loaf of sourdough bread at home?", "hi", "Write a short poem about the sea.")
# A 4-layer tiny model: probe band [0, 2) (l_s = 1), adaptive band [2, 4).
BANDS = {"probe_band": Band(0, 2), "adaptive_band": Band(2, 4)}
# The xdist group of the tests that share conftest.py's smollm2_calibration / smollm2_export.
SMOLLM2_GROUP = "smollm2"
# ... and of those that share its organism_demo (the README's main job).
ORGANISM_GROUP = "organism"


@functools.lru_cache(maxsize=None)
def organism_example(name: str):
    """examples/organism/<name>.py (a script folder, not a package), loaded by path; the folder is
    on sys.path while it loads, since the scripts import their siblings (``import data as D``)."""
    folder = Path(__file__).resolve().parents[1] / "examples" / "organism"
    spec = importlib.util.spec_from_file_location(f"organism_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def options_for(mode: str, **changes: Any) -> RegapOptions:
    """The tiny models' bands; positions "all" (every position corrected) unless changed, so
    the correction math is exercised on text batches too; alpha 1 (the strength that removes
    the drift exactly, which the tests' expectations are written at) unless changed."""
    return RegapOptions(mode=mode, **{**BANDS, "positions": "all", "alpha0": 1.0, "alpha_max": 1.0, **changes})


def batch_inputs(adapter, processor, *, with_image: bool | None = None) -> dict[str, torch.Tensor]:
    """Three prompts of different lengths, left-padded; with images for multimodal families."""
    with_image = adapter.multimodal if with_image is None else with_image
    prompts = [adapter.render_prompt(processor, text, with_image) for text in PROMPTS]
    images = None
    if with_image:
        images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (48, 40), (20, 160, 40)),
                  Image.linear_gradient("L").convert("RGB").resize((40, 40))]
    inputs = adapter.encode(processor, prompts, images)
    mask = inputs["attention_mask"]
    assert bool((mask[:, 0] == 0).any()), "the batch should be left-padded"
    return inputs


def block_outputs(model, adapter, inputs) -> list[torch.Tensor]:
    """Every decoder block's output [batch, seq, H] as the next block sees it (float64).

    The capture hooks are registered last, so they see outputs after any correction hooks."""
    blocks = adapter.decoder_layers(model)
    out: dict[int, torch.Tensor] = {}

    def make(layer):
        def hook(_m, _i, output):
            h = output[0] if isinstance(output, tuple) else output
            out[layer] = h.detach().to(torch.float64)
        return hook

    handles = [block.register_forward_hook(make(i)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [out[i] for i in range(len(blocks))]


def realistic_directions(model, adapter, inputs, options: RegapOptions, *, seed: int = 0,
                         drift_scale: float = 0.3) -> Directions:
    """Random unit rhat, random drift (|d| ~ drift_scale |h|), kappa ~ 5, and probe anchors
    c- < c+ placed at the 20th/80th percentiles of the batch's projections measured with
    the probe correction applied, so the gates span (0, 1). At l_s the anchors are the
    lowest/highest last-token projection, so regap-seq's alpha(x) varies across the batch."""
    blocks = adapter.decoder_layers(model)
    num_layers, hidden = len(blocks), adapter.hidden_size(model)
    gen = torch.Generator().manual_seed(seed)
    rhat = torch.randn(num_layers, hidden, generator=gen, dtype=torch.float64)
    rhat = rhat / rhat.norm(dim=-1, keepdim=True)
    plain = block_outputs(model, adapter, inputs)
    scale = torch.stack([h.norm(dim=-1).mean() for h in plain])
    drift = torch.randn(num_layers, hidden, generator=gen, dtype=torch.float64)
    drift = drift / drift.norm(dim=-1, keepdim=True) * (drift_scale * scale).unsqueeze(-1)
    kappa = 5.0 + torch.rand(num_layers, generator=gen, dtype=torch.float64) - 0.5
    zeros, ones = torch.zeros(num_layers), torch.ones(num_layers)
    provisional = Directions(rhat.float(), drift.float(), zeros, zeros, ones, zeros, kappa.float())
    # regap mode with alpha_max = 0: exactly the probe correction alone.
    probe_only = dataclasses.replace(options, mode="regap", alpha_max=0.0)
    with reference_corrections(model, adapter, provisional, probe_only):
        probed = block_outputs(model, adapter, inputs)
    mask = inputs["attention_mask"].bool()
    opts = options.resolved(num_layers)
    c_pos, c_neg = torch.empty(num_layers, dtype=torch.float64), torch.empty(num_layers, dtype=torch.float64)
    for layer, h in enumerate(probed):
        proj = h @ rhat[layer]
        if layer == opts.read_layer:
            last = last_token_index(inputs["attention_mask"], proj.shape[0], proj.shape[1])
            values = proj[torch.arange(proj.shape[0]), last]
            c_neg[layer], c_pos[layer] = values.min(), values.max()
        else:
            values = proj[mask] if mask.shape == proj.shape else proj.reshape(-1)
            c_neg[layer], c_pos[layer] = torch.quantile(values, 0.2), torch.quantile(values, 0.8)
    assert bool((c_pos > c_neg).all())
    gap = c_pos - c_neg
    return Directions(rhat.float(), drift.float(), (c_pos + 0.5 * gap).float(), (c_neg - 0.5 * gap).float(),
                      c_pos.float(), c_neg.float(), kappa.float())


def logits_of(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False, **kwargs).logits.detach().clone()


# -- export + validate through the CLI ----------------------------------------------------
def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_directions(model_folder: Path, out: Path, options: RegapOptions = options_for("regap")) -> Path:
    """Directions with non-zero drift and a gate that varies, for the model in ``model_folder``."""
    loaded = load_model(model_folder)
    inputs = batch_inputs(loaded.adapter, loaded.processor)
    directions = realistic_directions(loaded.model, loaded.adapter, inputs, options)
    out.mkdir(parents=True, exist_ok=True)
    opts = options.resolved(directions.num_layers)
    save_directions(out, DirectionsFile(directions, opts, loaded.fingerprint, "0" * 64, str(model_folder)))
    return out


def parity_tier(family: str, mode: str, *, every_mode: str | None = None) -> tuple:
    """The test tier of one family x mode export-and-validate case: mode regap (and every mode
    of family ``every_mode``) in the default tier; regap-seq (scaled layers, the probe pass) in
    `matrix`; fixed in `full`, by hand: its graph holds only fixed layers, which the family's
    regap graph (probe band fixed) already has, so CI would repeat a check."""
    if mode == "regap" or family == every_mode:
        return ()
    return (pytest.mark.full,) if mode == "fixed" else (pytest.mark.matrix,)


def export_and_validate(model: Path, directions: Path, out: Path, *extra: str) -> dict:
    result = invoke("export", model, "--directions", directions, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    checked = invoke("validate", out, "--json")
    report = json.loads(checked.stdout)
    assert checked.exit_code == (0 if report["ok"] else 1)
    return report


def assert_all_ok(report: dict) -> None:
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    targets = {(c["target"], c["quantity"]) for c in report["checks"]}
    for quantity in ("prefill logits", "present", "decode logits", "greedy tokens"):
        assert ("onnxruntime-cpu", quantity) in targets and ("pytorch", quantity) in targets


def with_manifest(folder: Path, *, formats: tuple[str, ...] = ("safetensors",)) -> Path:
    """Write the manifest an export writes into a corrected checkpoint a test wrote with the
    library's writers (``write_corrected_checkpoint``): readers verify folders against it
    (``io.artifacts.ExportedFolder``)."""
    from types import SimpleNamespace

    from regap_export.export.manifest import write_manifest
    from regap_export.models import adapter_for_config

    config = json.loads((folder / "config.json").read_text())
    section = config["regap"]
    adapter = adapter_for_config(SimpleNamespace(model_type=config["model_type"]))
    write_manifest(folder, {
        "model": {"source": section.get("model_source", ""), "family": adapter.family,
                  "fingerprint": section.get("model_fingerprint", ""), "multimodal": adapter.multimodal},
        "calibration_sha256": section.get("calibration_sha256", ""), "mode": section["mode"], "dtype": "fp32",
        "formats": list(formats), "options": json.dumps(section["options"])})
    return folder


def rehash(folder: Path) -> dict:
    """The manifest's file table written again over the files as they are now: the folder is
    then as consistent as someone who edits it on purpose makes it, and only the checks behind
    the hashes can catch the edit. Returns the new manifest."""
    from regap_export.export.manifest import file_table
    from regap_export.io.artifacts import MANIFEST_FILENAME

    path = folder / MANIFEST_FILENAME
    manifest = json.loads(path.read_text())
    manifest["files"] = file_table(folder)
    path.write_text(json.dumps(manifest, indent=2))
    return manifest


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A copy of a shared (read-only) folder that a test may change."""
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target
