"""``directions.safetensors``: the public calibration artifact (format version 2, or 3).

Tensors (float32): rhat [L, H], drift [L, H], anchor_text_harmful [L],
anchor_text_harmless [L], anchor_probe_harmful [L], anchor_probe_harmless [L], kappa [L];
version 3 adds gate_read [L, H] (calibrate --gate-read discriminant): the direction the gate
reads, along which the probe anchors and kappa were measured. Files without it are written as
version 2, so that older versions keep reading them; an older version refuses a version-3
file instead of gating along rhat with anchors measured along another direction.
Metadata (strings): format_version, model_fingerprint, calibration_sha256, options (JSON),
model_source, regap_export_version.

Version 2 (the image mask) changed the meaning of the ``positions`` option: the correction
acts only on inputs that hold an image. Version-1 files still load; their ``positions`` ("all",
the only value version 1 had) is read as unset, so they take the current default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from ..io.st_files import save_file_deterministic as save_file

from .. import __version__
from ..io.checks import check_tensors_finite
from .directions import Directions
from ..errors import ArtifactError, RegapError
from ..options import RegapOptions

FORMAT_VERSION = "3"
PLAIN_FORMAT_VERSION = "2"  # written when there is no gate_read
LEGACY_FORMAT_VERSIONS = ("2", "1")
FILENAME = "directions.safetensors"


@dataclass
class DirectionsFile:
    directions: Directions
    options: RegapOptions
    model_fingerprint: str
    calibration_sha256: str
    model_source: str = ""
    model_weight_sample: str = ""  # models/weight_sample.py: JSON {parameter: sampled values}

    def metadata(self) -> dict[str, str]:
        return {
            "format_version": FORMAT_VERSION if self.directions.gate_read is not None else PLAIN_FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "calibration_sha256": self.calibration_sha256,
            "options": self.options.to_json(),
            "model_source": self.model_source,
            "regap_export_version": __version__,
            **({"model_weight_sample": self.model_weight_sample} if self.model_weight_sample else {}),
        }


def save_directions(folder: Path, bundle: DirectionsFile) -> Path:
    path = Path(folder) / FILENAME
    save_file(bundle.directions.tensors(), str(path), metadata=bundle.metadata())
    return path


def load_directions(folder_or_file: Path) -> DirectionsFile:
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / FILENAME
    from ..io.files import check_regular_file

    check_regular_file(path, what="directions file", error=ArtifactError, missing="no directions file here",
                       hint="run `regap-export calibrate` first, or point at its --out folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types on a damaged file
        raise ArtifactError(f"not a readable safetensors file ({exc})", path=path) from None
    version = meta.get("format_version")
    if version not in (FORMAT_VERSION, *LEGACY_FORMAT_VERSIONS):
        raise ArtifactError(
            f"directions format version {version!r}; this regap-export reads version {FORMAT_VERSION!r}",
            path=path, hint="re-run calibrate with this version of regap-export",
        )
    missing = [name for name in Directions.TENSOR_NAMES if name not in tensors]
    if missing:
        raise ArtifactError(f"missing tensors: {', '.join(missing)}", path=path)
    names = Directions.TENSOR_NAMES + tuple(n for n in Directions.OPTIONAL_TENSOR_NAMES if n in tensors)
    if "gate_read" in names and version != FORMAT_VERSION:
        raise ArtifactError(f"a gate_read tensor in a version-{version} file (it came with version {FORMAT_VERSION})",
                            path=path, hint="re-run calibrate with this version of regap-export")
    check_tensors_finite({name: tensors[name] for name in names}, path=path, what="directions",
                         hint="re-run calibrate; the model produced non-finite activations or the file was edited")
    directions = Directions(**{name: tensors[name] for name in names})
    if directions.gate_read is not None and directions.gate_read.shape != directions.rhat.shape:
        raise ArtifactError(f"gate_read has shape {tuple(directions.gate_read.shape)}, rhat "
                            f"{tuple(directions.rhat.shape)}", path=path, hint="re-run calibrate")
    try:
        options = RegapOptions.from_json(meta["options"])
    except (RegapError, KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"the options stored with the directions are invalid ({exc})", path=path) from None
    if version == "1":
        options = dataclasses.replace(options, positions=RegapOptions.positions)
    return DirectionsFile(directions, options, meta.get("model_fingerprint", ""),
                          meta.get("calibration_sha256", ""), meta.get("model_source", ""),
                          meta.get("model_weight_sample", ""))
