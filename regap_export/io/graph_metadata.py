"""What every exported graph says about itself (ONNX contract 5, docs/ONNX_CONTRACT.md
"Graph metadata"), the precisions an export writes, and the check that a set of graphs is
the one an export wrote: without PyTorch or onnx (the runtime reads the metadata through
ONNX Runtime's ``get_modelmeta``).

Each graph's ``metadata_props``:

- ``regap.onnx_contract``: the contract it speaks (``"onnx contract 5"``);
- ``regap.graph``: its role, ``model`` (text LLM), ``decoder``, ``embed_tokens`` or ``vision_encoder``;
- ``regap.precision``: ``fp32``, ``fp16``, ``q4f16``, ``q8`` or ``q4`` (``PRECISIONS``);
- ``regap.image_rows``: ``channel`` (writes or reads the modality channel: ``embed_tokens``
  writes 0, ``vision_encoder`` 1, the decoder reads it), ``mask input`` (the decoder takes
  ``regap_image_mask``) or ``none``;
- ``regap.export_id``: one id shared by the graphs of one export (and ``regap_onnx.json``).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ArtifactError

CONTRACT_KEY = "regap.onnx_contract"
ROLE_KEY = "regap.graph"
PRECISION_KEY = "regap.precision"
IMAGE_ROWS_KEY = "regap.image_rows"
EXPORT_ID_KEY = "regap.export_id"

ROLE_MODEL, ROLE_DECODER, ROLE_EMBED, ROLE_VISION = "model", "decoder", "embed_tokens", "vision_encoder"
# regap_onnx.json "files" key of each role
ROLE_OF_FILE_KEY = {"decoder": None, "embed_tokens": ROLE_EMBED, "vision_encoder": ROLE_VISION}
IMAGE_ROWS_CHANNEL, IMAGE_ROWS_MASK, IMAGE_ROWS_NONE = "channel", "mask input", "none"
# Float32 at every precision: the correction's own inputs and outputs (pixel inputs too).
FLOAT32_IO = ("regap_image_mask", "regap_alpha", "regap_score")


@dataclass(frozen=True)
class Precision:
    name: str        # what --precision and regap.precision say
    suffix: str      # transformers.js's file-name suffix for it (its ``dtype`` option of the same name)
    io_dtype: str    # the graphs' floating-point inputs and outputs (pixel inputs stay float32)
    summary: str


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "", "float32", "float32, as traced"),
    Precision("fp16", "_fp16", "float16", "float16 weights and activations; the correction's gate in float32"),
    Precision("q4f16", "_q4f16", "float16", "the fp16 graph with MatMul weights in 4-bit blocks of 32"),
    Precision("q8", "_quantized", "float32", "MatMul and Gather weights in 8 bits, activations quantized per call"),
    Precision("q4", "_q4", "float32", "MatMul weights in 4-bit blocks of 32, float32 activations"),
)}
DEFAULT_PRECISION = "fp32"


def precision_file(file_name: str, precision: str) -> str:
    """``decoder_model_merged.onnx`` -> ``decoder_model_merged_fp16.onnx`` (transformers.js's names)."""
    path = Path(file_name)
    return f"{path.stem}{PRECISIONS[precision].suffix}{path.suffix}"


def new_export_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class GraphFacts:
    """What the graphs of one export share; ``metadata(role, image_rows)`` is one graph's metadata_props."""

    export_id: str
    precision: str
    image_rows: str | None   # IMAGE_ROWS_CHANNEL for channel exports, else None (set per graph)

    def metadata(self, role: str, image_rows: str | None) -> dict[str, str]:
        from .artifacts import CONTRACT_VERSION

        return {CONTRACT_KEY: CONTRACT_VERSION, ROLE_KEY: role, PRECISION_KEY: self.precision,
                IMAGE_ROWS_KEY: image_rows or IMAGE_ROWS_NONE, EXPORT_ID_KEY: self.export_id}


def _float_types(types: Mapping[str, str], skip: tuple[str, ...]) -> dict[str, str]:
    return {name: t for name, t in types.items() if t in ("float32", "float16", "bfloat16") and name not in skip}


def check_graph(path: Path, metadata: Mapping[str, str], io_types: Mapping[str, str], *, role: str,
                config: Mapping[str, Any], precision: str) -> None:
    """One line, and how to re-export, when the graph at ``path`` is not the one this folder's
    ``regap_onnx.json`` describes for ``precision``: no or another contract's metadata, another
    export's id, another role, precision or image-row scheme, or floating-point inputs and
    outputs of another type than its precision's (a graph converted after export).
    ``io_types``: name -> "float32" | "float16" | "int64" | ... of its inputs and outputs."""
    from .artifacts import CONTRACT_VERSION

    redo = "re-export the folder (regap-export export --precision ...) and use its graphs together, as written"
    if metadata.get(CONTRACT_KEY) != CONTRACT_VERSION or PRECISION_KEY not in metadata:
        raise ArtifactError(f"it carries no {CONTRACT_VERSION} metadata (regap.onnx_contract "
                            f"{metadata.get(CONTRACT_KEY)!r}): it was not written by this export, or was "
                            "rewritten by another tool", path=path, hint=redo)
    if metadata.get(EXPORT_ID_KEY) != config.get("export_id"):
        raise ArtifactError(f"it comes from another export (export id {metadata.get(EXPORT_ID_KEY)}, "
                            f"regap_onnx.json says {config.get('export_id')}): graphs of different exports "
                            "do not fit together", path=path, hint=redo)
    if metadata.get(ROLE_KEY) != role:
        raise ArtifactError(f"it is a {metadata.get(ROLE_KEY)} graph where regap_onnx.json expects the "
                            f"{role}", path=path, hint=redo)
    if metadata.get(PRECISION_KEY) != precision:
        raise ArtifactError(f"its metadata says precision {metadata.get(PRECISION_KEY)}, regap_onnx.json "
                            f"lists it as {precision}", path=path, hint=redo)
    want_rows = _image_rows_of(config, role)
    if metadata.get(IMAGE_ROWS_KEY) != want_rows:
        raise ArtifactError(f"image rows {metadata.get(IMAGE_ROWS_KEY)!r}, regap_onnx.json says "
                            f"{want_rows!r} (a graph of an export with other options)", path=path, hint=redo)
    want = PRECISIONS[precision].io_dtype
    float32_always = tuple(config.get("vision_inputs") or ()) if role == ROLE_VISION else FLOAT32_IO
    for io_name, got in _float_types(io_types, float32_always).items():
        if got != want:
            raise ArtifactError(f"its metadata says {precision} ({want} inputs and outputs) but "
                                f"{io_name} is {got}: the graph was converted after export (e.g. by a float16 "
                                "or quantization script), which this contract does not cover", path=path,
                                hint=f"re-export with regap-export export --precision {_suggest(got)}")


def _suggest(io_dtype: str) -> str:
    return "fp16" if io_dtype == "float16" else "fp32"


def _image_rows_of(config: Mapping[str, Any], role: str) -> str:
    rows = config.get("image_rows")
    if rows == IMAGE_ROWS_CHANNEL:
        return IMAGE_ROWS_CHANNEL
    if role in (ROLE_MODEL, ROLE_DECODER) and rows == IMAGE_ROWS_MASK:
        return IMAGE_ROWS_MASK
    return IMAGE_ROWS_NONE
