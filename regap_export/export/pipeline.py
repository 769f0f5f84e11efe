"""`regap-export export`: directions + model -> corrected safetensors checkpoint and ONNX graphs."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io.atomic import atomic_output_dir, check_free_space, check_output_dir
from ..calibration.directions_io import FILENAME as DIRECTIONS_FILENAME
from ..calibration.directions_io import load_directions
from ..io.checks import check_corrections_finite, check_strict_json_file
from ..errors import ArtifactError, RegapError
from ..method.folding import LayerCorrection, ScoreReadout, fold, score_readout
from ..method.modality import mask_default
from ..models.loading import load_model
from ..models.weight_sample import samples_match
from ..options import MODES, RegapOptions
from ..method.rewrite import corrected
from ..io.graph_metadata import DEFAULT_PRECISION
from .client_files import write_client_files
from .precision import parse_precisions
from .manifest import write_manifest

FORMATS = ("onnx", "safetensors")
ONNX_DIR = "onnx"
DIRECTIONS_COPY = "regap_directions.safetensors"


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise RegapError(f"unknown format {', '.join(repr(u) for u in unknown) or repr(text)}; "
                         f"choose from {', '.join(FORMATS)}")
    return formats


def export_to_folder(model: str | None, directions: Path, out_dir: Path, *, formats: Sequence[str] = FORMATS,
                     precisions: Sequence[str] = (DEFAULT_PRECISION,), overrides: dict[str, Any] | None = None,
                     force: bool = False) -> Path:
    """Write OUT: model.safetensors + regap.safetensors + config (+ custom code), onnx/ (the
    float32 graphs, and the other ``precisions`` made from them: ``export.precision``), manifest."""
    out_dir = Path(out_dir)
    inputs = [Path(directions), model]
    check_output_dir(out_dir, force=force, inputs=inputs)
    precisions = parse_precisions(",".join(precisions))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if overrides.get("mode") is not None and overrides["mode"] not in MODES:
        raise RegapError(f"unknown mode {overrides['mode']!r}; choose one of {', '.join(MODES)}")
    bundle = load_directions(directions)
    options = dataclasses.replace(bundle.options, **overrides)
    loaded = load_model(model if model is not None else (bundle.model_source or None))
    if bundle.model_fingerprint != loaded.fingerprint:
        raise ArtifactError(
            f"these directions were fitted on another model (fingerprint {bundle.model_fingerprint}, "
            f"this model {loaded.fingerprint})", path=Path(directions),
            hint="calibrate this model first, or pass the model the directions came from")
    if not samples_match(bundle.model_weight_sample, loaded.model):
        raise ArtifactError(
            "these directions were fitted on a model of the same shape but with other weights "
            f"(fingerprint {loaded.fingerprint} covers shapes; the sampled weight values differ)",
            path=Path(directions), hint="calibrate this model first, or pass the model the directions came from")
    if bundle.directions.num_layers != loaded.adapter.num_layers(loaded.model):
        raise ArtifactError("directions and model differ in depth", path=Path(directions))
    options = options.resolved(bundle.directions.num_layers)
    bundle = dataclasses.replace(bundle, options=options)
    # The one fold: every writer below writes these constants.
    corrections, readout = check_folded_constants(bundle.directions, options, path=Path(directions))
    check_free_space(out_dir, minimum_export_bytes(loaded.model, formats, precisions),
                     f"the export ({', '.join(formats)}, {', '.join(precisions)})",
                     hint="free some space, choose another --out, or write one --format at a time")
    with atomic_output_dir(out_dir, force=force, inputs=[*inputs, loaded.folder]) as tmp:
        src = Path(directions)
        shutil.copyfile(src / DIRECTIONS_FILENAME if src.is_dir() else src, tmp / DIRECTIONS_COPY)
        base = None
        if "safetensors" in formats:
            from .safetensors_export import write_base_checkpoint, write_regap_files

            # save_pretrained writes the unmodified model, so it runs before the rewrite
            base = write_base_checkpoint(loaded, bundle, tmp)
        # The one rewrite: each writer reads the corrected model.
        with corrected(loaded.model, loaded.adapter, corrections, mask_default=mask_default(options.positions)):
            if base is not None:
                write_regap_files(loaded, bundle, options, tmp, base, readout)
            if "onnx" in formats:
                _write_onnx(loaded, readout, options, tmp / ONNX_DIR, precisions)
        if base is None:  # an ONNX-only export: clients still need the config, tokenizer and processor
            write_model_description(loaded, tmp)
        # What transformers.js, optimum and ONNX Runtime GenAI need to load the folder as written.
        write_client_files(tmp, loaded.adapter)
        check_strict_json_file(tmp / "config.json")
        write_manifest(tmp, {
            "model": {"source": loaded.source, "family": loaded.adapter.family, "fingerprint": loaded.fingerprint,
                      "multimodal": loaded.adapter.multimodal},
            "calibration_sha256": bundle.calibration_sha256, "mode": options.mode, "dtype": DEFAULT_PRECISION,
            "precisions": list(precisions) if "onnx" in formats else [], "formats": list(formats),
            "options": options.to_json(),
        })
    return out_dir


# Bytes per weight of each precision's graphs (4-bit blocks of 32 carry a 2-byte scale each).
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "q4f16": 0.5625, "q8": 1.0, "q4": 0.5625}


def write_model_description(loaded, folder: Path) -> None:
    """The unmodified model's config, generation config, tokenizer and processor files, without
    its weights: what a client reads beside the ONNX graphs."""
    loaded.model.config.save_pretrained(folder)
    generation = getattr(loaded.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    loaded.adapter.save_processor(loaded.processor, folder)


def minimum_export_bytes(model: torch.nn.Module, formats: Sequence[str],
                         precisions: Sequence[str] = (DEFAULT_PRECISION,)) -> int:
    """A lower bound of what an export writes: every weight once in the checkpoint (at most in
    its loaded width) and once per ONNX precision (tied weights counted once; ONNX may write them
    twice, the graphs add more)."""
    total = 0
    if "safetensors" in formats:
        total += sum(p.numel() * min(p.element_size(), 4) for p in model.parameters())
    if "onnx" in formats:
        weights = sum(p.numel() for p in model.parameters())
        total += int(weights * sum(BYTES_PER_WEIGHT[p] for p in precisions))
    return total


def check_folded_constants(directions, options: RegapOptions, *, path: Path | None = None
                           ) -> tuple[list[LayerCorrection], ScoreReadout | None]:
    """Fold the corrections (and regap-seq's score readout) and check that the constants an
    export would write are finite (before anything is written). Returns both."""
    try:
        corrections = list(fold(directions, options))
    except ArtifactError as exc:  # fold knows the field, not the file
        raise ArtifactError(str(exc), path=path) from None
    readout = score_readout(directions, options) if options.mode == "regap-seq" else None
    check_corrections_finite(corrections + ([readout] if readout is not None else []), path=path)
    return corrections, readout


def _write_onnx(loaded, readout: ScoreReadout | None, options: RegapOptions, folder: Path,
                precisions: Sequence[str]) -> None:
    """The ONNX graphs of ``loaded.model``, which holds the corrections already: float32, then
    the other precisions converted from them."""
    from .onnx_export import export_multimodal, export_text_decoder
    from .precision import write_precisions

    export = export_multimodal if loaded.adapter.multimodal else export_text_decoder
    export(loaded.model, loaded.adapter, folder, dtype=torch.float32, readout=readout, options=options)
    write_precisions(folder, precisions)
