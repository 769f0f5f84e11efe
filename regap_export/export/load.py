"""Read a corrected safetensors checkpoint back (regap-export's own loader, no remote code).

``load_corrected(folder)`` loads the original weights with the plain transformers class
(``trust_remote_code`` stays off; the folder's ``modeling_regap.py`` is never run), then
rebuilds the ``LayerCorrection``s from ``regap.safetensors`` and config.json's ``regap``
section and inserts them with ``rewrite.insert_corrections``. See ``safetensors_export``
for the layout.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ArtifactError, RegapError
from ..method.folding import FIXED, GATED, SCALED, LayerCorrection, ScoreReadout, sequence_strength
from ..method.modality import INPUT_NAME as IMAGE_MASK, mask_default
from ..models.hooks import StopForward, block_hidden, block_hooks, last_token_index, stopped_forward
from ..models.loading import LoadedModel, load_model
from ..options import RegapOptions
from ..method.rewrite import insert_corrections
from ..io.artifacts import ExportedFolder, sha256_file
from .safetensors_export import CONFIG_FILENAME, FORMAT_VERSION, LEGACY_FORMAT_VERSIONS, SCORE_B, SCORE_W

KINDS_OF_MODE = {"regap": {FIXED, GATED}, "fixed": {FIXED}, "regap-seq": {SCALED}}


@dataclass
class RegapCheckpoint:
    """What a corrected folder says about its corrections."""

    folder: Path
    section: dict[str, Any]
    options: RegapOptions
    corrections: list[LayerCorrection]
    readout: ScoreReadout | None  # regap-seq only

    @property
    def mode(self) -> str:
        return self.options.mode


def read_regap_checkpoint(folder: str | Path, *, verify_hashes: bool = True) -> RegapCheckpoint:
    """Parse and check config.json's ``regap`` section and ``regap.safetensors`` (sha256, names,
    shapes), after ``io.artifacts.ExportedFolder.open`` verified the folder."""
    folder = Path(folder)
    exported = ExportedFolder.open(folder, verify_hashes=verify_hashes)
    exported.require_formats("safetensors", command="reading the corrected checkpoint")
    config_path = exported.path(CONFIG_FILENAME)
    config = exported.model_config()
    section = config.get("regap")
    if not isinstance(section, dict):
        raise ArtifactError("config.json has no 'regap' section: not a corrected checkpoint", path=config_path,
                            hint="write one with `regap-export export --format safetensors`")
    version = str(section.get("format_version"))
    if version not in (FORMAT_VERSION, *LEGACY_FORMAT_VERSIONS):
        raise ArtifactError(f"corrected-checkpoint format version {section.get('format_version')!r}; this "
                            f"regap-export reads version {FORMAT_VERSION!r}", path=config_path,
                            field="regap.format_version")
    for key in ("mode", "options", "layers", "tensors_file", "hidden_size"):
        if key not in section:
            raise ArtifactError("the regap section is incomplete", path=config_path, field=f"regap.{key}")
    try:
        options = RegapOptions.from_json(json.dumps(section["options"]))
    except (RegapError, TypeError, ValueError) as exc:
        raise ArtifactError(f"invalid options ({exc})", path=config_path, field="regap.options") from None
    if version in LEGACY_FORMAT_VERSIONS:
        # Format 1 predates the image mask and the drift increments: its corrections act on every
        # position of every input, and each layer's constant holds its whole drift.
        options = dataclasses.replace(options, positions="all", layer_drift="total")
    if options.mode != section["mode"]:
        raise ArtifactError(f"mode {section['mode']!r} disagrees with the options' {options.mode!r}",
                            path=config_path, field="regap.mode")

    tensors_path = exported.path(str(section["tensors_file"]), what="regap.tensors_file")
    tensors = _read_tensors(tensors_path, section.get("tensors_sha256"))
    hidden = int(section["hidden_size"])

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in tensors:
            raise ArtifactError(f"tensor {key} is missing", path=tensors_path)
        if tuple(tensors[key].shape) != shape:
            raise ArtifactError(f"tensor {key} has shape {list(tensors[key].shape)}, expected {list(shape)}",
                                path=tensors_path)
        if not bool(torch.isfinite(tensors[key]).all()):
            raise ArtifactError(f"tensor {key} holds non-finite values", path=tensors_path)
        return tensors[key]

    corrections: list[LayerCorrection] = []
    for entry in section["layers"]:
        try:
            layer, kind = int(entry["layer"]), str(entry["kind"])
        except (TypeError, KeyError, ValueError):
            raise ArtifactError(f"bad layer entry {entry!r}", path=config_path, field="regap.layers") from None
        if kind not in KINDS_OF_MODE[options.mode]:
            raise ArtifactError(f"layer {layer} has kind {kind!r}, which mode {options.mode!r} does not use",
                                path=config_path, field="regap.layers")
        v = get(f"regap.{layer}.v", (hidden,)).to(torch.float32)
        if kind == GATED:
            w = get(f"regap.{layer}.w", (hidden, 1)).to(torch.float32).reshape(-1)
            b = float(get(f"regap.{layer}.b", (1,))[0])
            corrections.append(LayerCorrection(layer, kind, v, w, b))
        else:
            corrections.append(LayerCorrection(layer, kind, v))
    readout = None
    if options.mode == "regap-seq":
        info = section.get("readout")
        if not isinstance(info, dict) or "layer" not in info or "kappa" not in info:
            raise ArtifactError("regap-seq needs readout {layer, kappa}", path=config_path, field="regap.readout")
        readout = ScoreReadout(int(info["layer"]), get(SCORE_W, (hidden,)).to(torch.float32),
                               float(get(SCORE_B, (1,))[0]), float(info["kappa"]))
    return RegapCheckpoint(folder, section, options, corrections, readout)


def _read_tensors(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise ArtifactError("the correction tensors are missing", path=path)
    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise ArtifactError("sha256 does not match config.json's regap.tensors_sha256 (the file is damaged "
                            "or comes from another export)", path=path, hint="export the checkpoint again")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types on a damaged file
        raise ArtifactError(f"not a readable safetensors file ({exc})", path=path) from None


def load_corrected(out_dir: str | Path, *, dtype: str = "fp32", device: str = "cpu",
                   verify_hashes: bool = True) -> LoadedModel:
    """The corrected model of an exported folder, corrections inserted (never runs its custom
    code). The folder is verified first (``io.artifacts.ExportedFolder``: manifest complete,
    sizes and sha256 unless ``verify_hashes`` is False, strict JSON, files consistent)."""
    folder = Path(out_dir)
    checkpoint = read_regap_checkpoint(folder, verify_hashes=verify_hashes)
    loaded = load_model(folder, dtype=dtype, device=device, trust_remote_code=False)
    model, adapter = loaded.model, loaded.adapter
    config_path = folder / CONFIG_FILENAME
    expected = checkpoint.section.get("model_fingerprint")
    if expected and expected != loaded.fingerprint:
        raise ArtifactError(f"the weights do not match the model the corrections were made for (fingerprint "
                            f"{loaded.fingerprint}, expected {expected})", path=config_path,
                            field="regap.model_fingerprint")
    if adapter.hidden_size(model) != int(checkpoint.section["hidden_size"]):
        raise ArtifactError(f"hidden size {checkpoint.section['hidden_size']} but the model has "
                            f"{adapter.hidden_size(model)}", path=config_path, field="regap.hidden_size")
    num_layers = adapter.num_layers(model)
    bad = [c.layer for c in checkpoint.corrections if not 0 <= c.layer < num_layers]
    if bad:
        raise ArtifactError(f"layers {bad} are outside the model's {num_layers} blocks", path=config_path,
                            field="regap.layers")
    insert_corrections(model, adapter, checkpoint.corrections, mask_default=mask_default(checkpoint.options.positions))
    return loaded


@torch.no_grad()
def sequence_alpha(loaded: LoadedModel, inputs: Mapping[str, Any], checkpoint: RegapCheckpoint | None = None,
                   image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """regap-seq's alpha(x) [batch] (float64) on a ``load_corrected`` model: the probe pass runs
    the prompt with regap_alpha = alpha0, stops after block l_s and reads
    z = h . w + b at each row's last prompt token; alpha = alpha_max sigmoid(kappa (z - tau))."""
    checkpoint = checkpoint or read_regap_checkpoint(loaded.folder)
    if checkpoint.readout is None:
        raise RegapError(f"sequence alpha is for mode regap-seq; this checkpoint is {checkpoint.mode!r}")
    readout, options = checkpoint.readout, checkpoint.options
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = block_hidden(output)
        raise StopForward

    inputs = {k: v for k, v in inputs.items() if k not in ("use_cache", "regap_alpha")}
    reference = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
    alpha0 = torch.full((reference.shape[0],), float(options.alpha0), dtype=torch.float32, device=reference.device)
    if image_mask is not None:
        inputs[IMAGE_MASK] = image_mask
    blocks = loaded.adapter.decoder_layers(loaded.model)
    with block_hooks(blocks, {readout.layer: hook}), stopped_forward():
        loaded.model(**inputs, regap_alpha=alpha0, use_cache=False)
    h = captured["h"].to(torch.float64)
    batch, seq = h.shape[0], h.shape[1]
    index = last_token_index(inputs.get("attention_mask"), batch, seq)
    last = h[torch.arange(batch, device=h.device), index.to(h.device)]
    score = last @ readout.w.to(h.device, torch.float64) + readout.b
    return sequence_strength(score, readout, options).cpu()
