"""Per-family pieces of the multimodal ONNX split (export side).

Keyed by ``adapter.family``. Each entry says how ``vision_encoder.onnx`` turns its inputs
into image features already in the language model's embedding space (after the
projector / connector), what its sample inputs look like, and which token id marks image
positions. The runtime side (numpy: which pixel inputs to feed, how to drop padding
images) lives in ``regap_export.models.vision_runtime``.

Model internals live in ``regap_export.models`` only; the exporter looks families up here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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

    def image_token_id(self, config: Any) -> int:
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{self.family}: the config names no image token id")


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# -- shared export patches -----------------------------------------------------------------
def _bucketize(input, boundaries, *, out_int32: bool = False, right: bool = False, **_: Any):
    """``torch.bucketize`` as a broadcast comparison and a sum (torch.onnx has no lowering)."""
    expanded = input.unsqueeze(-1)
    hits = (boundaries <= expanded) if right else (boundaries < expanded)
    out = hits.sum(dim=-1)
    return out.to(torch.int32 if out_int32 else torch.int64)


@contextlib.contextmanager
def patched_bucketize() -> Iterator[None]:
    original = torch.bucketize
    torch.bucketize = _bucketize
    try:
        yield
    finally:
        torch.bucketize = original


# -- Idefics3 / SmolVLM -------------------------------------------------------------------
def _idefics3_encode(model: nn.Module, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
    """Idefics3Model.get_image_features for real images only (the runtime drops the
    all-zero padding images): patch mask -> vision tower -> connector."""
    inner = model.model
    patch = inner.config.vision_config.patch_size
    pixel_values = pixel_values.to(_model_dtype(model))
    subgrid = pixel_attention_mask.unfold(1, patch, patch).unfold(2, patch, patch)
    patch_mask = subgrid.sum(dim=(-1, -2)) > 0
    hidden = inner.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_mask).last_hidden_state
    return inner.connector(hidden)


def _idefics3_sample(model: nn.Module, n: int) -> tuple[torch.Tensor, ...]:
    size = model.config.vision_config.image_size
    pixels = torch.randn(n, 3, size, size)
    mask = torch.ones(n, size, size, dtype=torch.int64)
    return pixels, mask


# -- LLaVA 1.5 ----------------------------------------------------------------------------
def _llava_encode(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """LlavaModel.get_image_features: the chosen vision layer(s), CLS dropped for the
    "default" strategy, then the multimodal projector."""
    inner = model.model
    config = model.config
    out = inner.vision_tower(pixel_values.to(_model_dtype(model)), output_hidden_states=True, return_dict=True)
    layer = config.vision_feature_layer
    strategy = config.vision_feature_select_strategy
    layers = [layer] if isinstance(layer, int) else list(layer)
    selected = [out.hidden_states[i] for i in layers]
    if strategy == "default":
        selected = [h[:, 1:] for h in selected]
    feature = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
    return inner.multi_modal_projector(feature)


def _llava_sample(model: nn.Module, n: int) -> tuple[torch.Tensor, ...]:
    size = model.config.vision_config.image_size
    return (torch.randn(n, 3, size, size),)


# -- LLaVA-NeXT (v1.6) ----------------------------------------------------------------------
def _llava_next_encode(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch features of the any-resolution crops [num_patches, tokens, hidden] (vision
    tower -> chosen layer(s) -> projector, as LlavaNextModel.get_image_features before
    ``pack_image_features``), and the learned ``image_newline`` [hidden]. The packing
    (unpadding, newline columns) depends on each image's size and is the runtime's job."""
    features = _llava_encode(model, pixel_values)
    newline = model.model.image_newline
    return features, newline.to(features.dtype) * 1


def _llava_next_runtime(config: Any) -> dict[str, Any]:
    return {"image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
            "image_size": int(config.vision_config.image_size),
            "patch_size": int(config.vision_config.patch_size)}


VISION_FAMILIES: dict[str, VisionSpec] = {
    "idefics3": VisionSpec(
        family="idefics3",
        inputs=("pixel_values", "pixel_attention_mask"),
        encode=_idefics3_encode,
        sample=_idefics3_sample,
        input_dtypes=("float32", "int64"),
        patches=patched_bucketize,
    ),
    "llava": VisionSpec(
        family="llava",
        inputs=("pixel_values",),
        encode=_llava_encode,
        sample=_llava_sample,
        input_dtypes=("float32",),
    ),
    "llava_next": VisionSpec(
        family="llava_next",
        inputs=("pixel_values",),
        encode=_llava_next_encode,
        sample=_llava_sample,
        input_dtypes=("float32",),
        outputs=("image_features", "image_newline"),
        runtime_config=_llava_next_runtime,
    ),
}

# Families the split does not cover yet, with the reason (shown to the user).
UNSUPPORTED_VISION: dict[str, str] = {
    "qwen2_vl": "Qwen2-VL's 3-D rotary positions (position_ids [3, batch, seq]) and patch-sequence vision input "
                "are not exported yet",
    "qwen2_5_vl": "Qwen2.5-VL's 3-D rotary positions and windowed vision attention are not exported yet",
}


def vision_spec(family: str) -> VisionSpec:
    spec = VISION_FAMILIES.get(family)
    if spec is None:
        from ..errors import ModelError

        reason = UNSUPPORTED_VISION.get(family, "no multimodal ONNX split is defined for this family")
        raise ModelError(f"cannot export {family!r} as a multimodal ONNX split: {reason}",
                         hint=f"supported: {', '.join(sorted(VISION_FAMILIES))}")
    return spec
