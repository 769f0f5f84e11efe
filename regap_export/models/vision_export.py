"""The multimodal ONNX split, export side: the generic part.

Each multimodal family module (``idefics3.py``, ``llava.py``, ``qwen2_vl.py``) declares its
``VisionSpec`` per model type on its adapter (``ModelAdapter.vision_export``): how
``vision_encoder.onnx`` turns its inputs into image features already in the language model's
embedding space (after the projector / connector), what its sample inputs look like, and
which patches tracing needs. ``vision_spec`` looks a model up in the registry. The runtime
side (numpy) is ``vision_runtime.py``.

torch is imported inside the functions that need it, so that ``regap_export.models`` (and
the family modules, which import this one) load without torch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class VisionSpec:
    family: str
    # Graph inputs of vision_encoder.onnx, in order; pixel_values first.
    inputs: tuple[str, ...]
    # encode(model, *inputs) -> image features [num_images, tokens_per_image, hidden] (model
    # dtype), or a tuple matching ``outputs``
    encode: Callable[..., Any]
    # sample(model, num_images) -> example inputs (tuple, same order as ``inputs``)
    sample: Callable[[nn.Module, int], tuple[torch.Tensor, ...]]
    # ONNX dtype of each input (numpy dtype names)
    input_dtypes: tuple[str, ...]
    # Patches active while tracing (ops torch.onnx cannot lower).
    patches: Callable[[], contextlib.AbstractContextManager] = field(default=lambda: contextlib.nullcontext())
    # Graph outputs of vision_encoder.onnx; image_features first.
    outputs: tuple[str, ...] = ("image_features",)
    # Family settings the runtime needs to place the features (written to regap_onnx.json).
    runtime_config: Callable[[Any], dict[str, Any]] = field(default=lambda config: {})
    # dynamic(model, Dim) -> per input {axis: torch.export dim}, and dim_names: the contract's
    # names of the inputs' and outputs' dimensions. None: dimension 0 of every input and output
    # is the number of images, outputs are [num_images, tokens, hidden].
    dynamic: Callable[[nn.Module, Any], tuple[dict[int, Any], ...]] | None = None
    dim_names: dict[str, list[str | None]] | None = None
    # rewrite(path) edits the traced vision_encoder.onnx in place (e.g. an input layout a client
    # needs) and returns the regap_onnx.json keys that change with it.
    rewrite: Callable[[Path], dict[str, Any]] | None = None

    def image_token_id(self, config: Any) -> int:
        from .base import image_token_id_of

        return image_token_id_of(config)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# -- shared export patches -----------------------------------------------------------------
def _bucketize(input, boundaries, *, out_int32: bool = False, right: bool = False, **_: Any):
    """``torch.bucketize`` as a broadcast comparison and a sum (torch.onnx has no lowering)."""
    import torch

    expanded = input.unsqueeze(-1)
    hits = (boundaries <= expanded) if right else (boundaries < expanded)
    out = hits.sum(dim=-1)
    return out.to(torch.int32 if out_int32 else torch.int64)


@contextlib.contextmanager
def patched_bucketize() -> Iterator[None]:
    import torch

    original = torch.bucketize
    torch.bucketize = _bucketize
    try:
        yield
    finally:
        torch.bucketize = original


def vision_specs() -> dict[str, VisionSpec]:
    """model_type -> spec, for every registered family with a multimodal split."""
    from . import registered_adapters

    return {model_type: spec for adapter in registered_adapters()
            for model_type, spec in (adapter.vision_export or {}).items()}


def vision_spec(family: str, config: Any = None) -> VisionSpec:
    """The spec for a model of ``family``; ``config`` (the Hugging Face config) picks a
    model type's own spec where a family has several."""
    specs = vision_specs()
    spec = specs.get(getattr(config, "model_type", None)) or specs.get(family)
    if spec is None:
        from ..errors import ModelError

        raise ModelError(f"cannot export {family!r} as a multimodal ONNX split: no multimodal ONNX split is "
                         "defined for this family", hint=f"supported: {', '.join(sorted(specs))}")
    return spec
