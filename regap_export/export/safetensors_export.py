"""The corrected safetensors checkpoint (``corrected/``, DESIGN "Artifacts"), format version 1.

Layout of the folder ``write_corrected_checkpoint`` fills:

- ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``):
  exactly what ``save_pretrained`` writes for the *unmodified* model: the original weights
  under transformers' own names, sharded as transformers shards. Any runtime that reads a
  Hugging Face checkpoint reads these files unchanged.
- ``regap.safetensors``: the correction constants under their public names (the same names
  as the ONNX initializers): ``regap.{layer}.v`` [H] for every corrected layer, and for gated
  layers ``regap.{layer}.w`` [H, 1] and ``regap.{layer}.b`` [1]; for regap-seq also the score
  readout at l_s, ``regap.score.w`` [H] and ``regap.score.b`` [1] (z = h . w + b, without
  kappa). float32, except fixed layers' v, which is stored in the model's dtype.
  A separate file (not merged into the weight index) so the weight files stay byte-for-byte
  transformers' output, plain loaders see no unexpected keys, and the constants can be
  checked (sha256) and swapped on their own.
- ``config.json``: the model's config plus
  ``auto_map`` ({AutoModelForCausalLM | AutoModelForImageTextToText: "modeling_regap.Regap<Base>"})
  and a ``regap`` section: format_version, regap_export_version, mode, options (object),
  layers ([{"layer", "kind"}], kind fixed | gated | scaled), readout ({"layer", "kappa"} for
  regap-seq, else null), model_fingerprint (of the unmodified model), calibration_sha256,
  model_source, tensors_file, tensors_sha256, decoder_layers_path, hidden_size, num_layers,
  base_class, auto_class, min_transformers (the lowest transformers version that reads the
  same model: "4.57.0", or "5.0.0" with min_transformers_reason saying why 4.x cannot;
  ``modeling_regap.py`` refuses to load under an older one).
  Beside transformers 5's keys, config.json also carries the keys transformers 4.x reads
  for the same values (rope_theta, rope_scaling, ...; see ``config_compat``).
- the tokenizer / processor files, and ``modeling_regap.py`` (custom code for
  ``trust_remote_code``; needs only torch, transformers, safetensors).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..io.artifacts import sha256_file
from ..io.atomic import write_file_atomic
from ..calibration.directions_io import DirectionsFile
from ..errors import ArtifactError, RegapError
from ..method.folding import ScoreReadout, fold, score_readout
from ..models.loading import LoadedModel, model_fingerprint
from ..options import RegapOptions
from ..method.rewrite import checkpoint_tensors, corrected, corrections_of, insert_corrections, remove_corrections
from .config_compat import transformers4_compat

FORMAT_VERSION = "2"
# Still read: format 1 corrected every position of every input (options.positions = "all").
LEGACY_FORMAT_VERSIONS = ("1",)
TENSORS_FILENAME = "regap.safetensors"
CODE_FILENAME = "modeling_regap.py"
CONFIG_FILENAME = "config.json"
SCORE_W, SCORE_B = "regap.score.w", "regap.score.b"
_TEMPLATE = Path(__file__).with_name("modeling_regap.py")
_TEMPLATE_BASE, _TEMPLATE_CLASS = "LlamaForCausalLM", "RegapLlamaForCausalLM"


def remote_class_name(base_class: str) -> str:
    return f"Regap{base_class}"


def render_remote_code(base_class: str) -> str:
    """``modeling_regap.py`` for a model of transformers class ``base_class``."""
    text = _TEMPLATE.read_text(encoding="utf-8")
    import_line = f"from transformers import {_TEMPLATE_BASE} as RegapBase"
    if text.count(import_line) != 1 or text.count(_TEMPLATE_CLASS) < 2:
        raise RuntimeError("the modeling_regap.py template has lost its markers")
    text = text.replace(import_line, f"from transformers import {base_class} as RegapBase")
    text = text.replace(_TEMPLATE_CLASS, remote_class_name(base_class))
    return f"# Written by regap-export {__version__} for transformers' {base_class}.\n" + text


def _base_class_name(model: torch.nn.Module) -> str:
    import transformers

    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        raise RegapError(f"the model's class {name} is not a transformers class, so the custom code cannot "
                         "subclass it", hint="export from the original model folder")
    return name


@dataclass(frozen=True)
class CheckpointBase:
    """What ``write_base_checkpoint`` found out about the unmodified model, for ``write_regap_files``."""

    fingerprint: str
    base_class: str


def write_corrected_checkpoint(loaded: LoadedModel, directions_file: DirectionsFile, options: RegapOptions,
                               out_dir: Path, *, max_shard_size: int | str | None = None) -> dict[str, Any]:
    """Write the corrected checkpoint of ``loaded`` into ``out_dir`` (an existing, empty folder).

    The model is saved *without* correction layers (any already inserted are taken out for
    the save and put back). ``max_shard_size`` as in ``save_pretrained`` (None: its default).
    Returns the ``regap`` section written to config.json.

    ``export_to_folder`` calls the two halves itself (``write_base_checkpoint`` before its one
    rewrite of the model, ``write_regap_files`` on the rewritten model); this function is the
    same for a caller holding a model without corrections.
    """
    model, adapter = loaded.model, loaded.adapter
    inserted = [c.spec() for c in corrections_of(model, adapter)]
    remove_corrections(model, adapter)
    try:
        opts = options.resolved(adapter.num_layers(model))
        base = write_base_checkpoint(loaded, directions_file, out_dir, max_shard_size=max_shard_size)
        readout = score_readout(directions_file.directions, opts) if opts.mode == "regap-seq" else None
        with corrected(model, adapter, fold(directions_file.directions, opts)):
            return write_regap_files(loaded, directions_file, opts, out_dir, base, readout)
    finally:
        if inserted and not corrections_of(model, adapter):
            insert_corrections(model, adapter, inserted)


def write_base_checkpoint(loaded: LoadedModel, directions_file: DirectionsFile, out_dir: Path, *,
                          max_shard_size: int | str | None = None) -> CheckpointBase:
    """The unmodified model's files (``save_pretrained``'s weights and config, the processor),
    after checking that the directions fit the model. The model must hold no corrections."""
    out_dir = Path(out_dir)
    model, adapter = loaded.model, loaded.adapter
    if corrections_of(model, adapter):
        raise ValueError("write the base checkpoint before the corrections are inserted")
    directions = directions_file.directions
    if directions.num_layers != adapter.num_layers(model) or directions.hidden_size != adapter.hidden_size(model):
        raise ArtifactError(
            f"the directions are for {directions.num_layers} layers of width {directions.hidden_size}, "
            f"the model has {adapter.num_layers(model)} of width {adapter.hidden_size(model)}")
    fingerprint = model_fingerprint(model, adapter)
    if directions_file.model_fingerprint and directions_file.model_fingerprint != fingerprint:
        raise ArtifactError(f"the directions were fitted on another model (fingerprint "
                            f"{directions_file.model_fingerprint}, this model {fingerprint})",
                            hint="calibrate this model, or export the model the directions came from")
    base_class = _base_class_name(model)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_kwargs)
    adapter.save_processor(loaded.processor, out_dir)
    return CheckpointBase(fingerprint, base_class)


def write_regap_files(loaded: LoadedModel, directions_file: DirectionsFile, options: RegapOptions, out_dir: Path,
                      base: CheckpointBase, readout: ScoreReadout | None) -> dict[str, Any]:
    """``regap.safetensors``, ``modeling_regap.py`` and config.json's ``regap`` section, read
    from the corrections inserted in ``loaded.model`` (``rewrite``) and regap-seq's ``readout``.
    ``options`` resolved; ``out_dir`` holds ``write_base_checkpoint``'s files."""
    out_dir = Path(out_dir)
    model, adapter = loaded.model, loaded.adapter
    corrections = corrections_of(model, adapter)
    if not corrections:
        raise ValueError("insert the corrections (rewrite.corrected) before writing their files")
    tensors = checkpoint_tensors(model, adapter)
    readout_section = None
    if readout is not None:
        tensors[SCORE_W] = readout.w.detach().to(torch.float32).reshape(-1).contiguous()
        tensors[SCORE_B] = torch.tensor([float(readout.b)], dtype=torch.float32)
        readout_section = {"layer": readout.layer, "kappa": float(readout.kappa)}
    from ..io.st_files import save_file_deterministic

    tensors_path = out_dir / TENSORS_FILENAME
    # config.json records this file's sha256, so equal inputs must give equal bytes.
    save_file_deterministic(tensors, tensors_path, metadata={"format_version": FORMAT_VERSION, "mode": options.mode})

    section = {
        "format_version": FORMAT_VERSION,
        "regap_export_version": __version__,
        "mode": options.mode,
        "options": json.loads(options.to_json()),
        # corrections_of reads the blocks in layer order, which is fold's order (the adaptive
        # band starts where the probe band ends)
        "layers": [{"layer": c.layer, "kind": c.kind} for c in corrections],
        "readout": readout_section,
        "model_fingerprint": base.fingerprint,
        "calibration_sha256": directions_file.calibration_sha256,
        "model_source": directions_file.model_source or loaded.source,
        "tensors_file": TENSORS_FILENAME,
        "tensors_sha256": sha256_file(tensors_path),
        "decoder_layers_path": f"{adapter.language_model_path}.{adapter.layers_attr}",
        "hidden_size": adapter.hidden_size(model),
        "num_layers": adapter.num_layers(model),
        "image_token_id": adapter.image_token_id(model.config),
        "base_class": base.base_class,
        "auto_class": adapter.auto_class_name,
    }
    write_file_atomic(out_dir / CODE_FILENAME, render_remote_code(base.base_class))
    config_path = out_dir / CONFIG_FILENAME
    config, min_transformers, reason = transformers4_compat(json.loads(config_path.read_text(encoding="utf-8")))
    section["min_transformers"] = min_transformers
    section["min_transformers_reason"] = reason
    config["regap"] = section
    config["auto_map"] = {adapter.auto_class_name: f"{Path(CODE_FILENAME).stem}.{remote_class_name(base.base_class)}"}
    write_file_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return section


__all__ = ["write_corrected_checkpoint", "write_base_checkpoint", "write_regap_files", "CheckpointBase",
           "render_remote_code", "FORMAT_VERSION", "TENSORS_FILENAME", "CODE_FILENAME", "SCORE_W", "SCORE_B"]
