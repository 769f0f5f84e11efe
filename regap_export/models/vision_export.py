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

import numpy as np
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

    def image_token_id(self, config: Any) -> int:
        from .base import image_token_id_of

        return image_token_id_of(config)


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


# -- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------
# The tower takes every image's patches as one sequence [patches, C*T*P*P]. What transformers
# derives from image_grid_thw with data-dependent shapes (vision_utils: patch positions,
# segment offsets, Qwen2.5-VL's window order) is a graph input, computed by the runtime
# (vision_runtime.py); the tower pops these precomputed tensors from its kwargs.
QWEN_PATCHES, QWEN_MERGED, QWEN_SEGMENTS, QWEN_WINDOWS = ("num_patches", "num_merged_patches",
                                                          "num_segments_plus_1", "num_windows_plus_1")


def _qwen_vl_encode(model: nn.Module, pixel_values: torch.Tensor, vision_position_ids: torch.Tensor,
                    cu_seqlens: torch.Tensor, *window: torch.Tensor) -> torch.Tensor:
    """Merged patch features [image tokens, hidden] in token order (the tower's pooler output,
    Qwen2VLModel.get_image_features before its per-image split)."""
    precomputed = {"position_ids": vision_position_ids, "cu_seqlens": cu_seqlens}
    if window:
        precomputed["window_index"], precomputed["cu_window_seqlens"] = window
    visual = model.model.visual
    return visual(pixel_values.to(_model_dtype(model)), grid_thw=None, **precomputed).pooler_output


def _qwen_vl_sample(model: nn.Module, n: int) -> tuple[torch.Tensor, ...]:
    from .vision_runtime import qwen_vl_cu_seqlens, qwen_vl_patch_positions, qwen_vl_window_index

    vision = model.config.vision_config
    merge = vision.spatial_merge_size
    # Distinct, non-square grids (torch.export specialises sizes 0 and 1 and equal sizes).
    grid = np.array([[1, merge * (i + 2), merge * (i + 3)] for i in range(n)], dtype=np.int64)
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    inputs = [torch.randn(int(grid.prod(axis=1).sum()), width),
              torch.from_numpy(qwen_vl_patch_positions(grid, merge)),
              torch.from_numpy(qwen_vl_cu_seqlens(grid))]
    if _windowed(model.config):
        inputs += [torch.from_numpy(a) for a in qwen_vl_window_index(grid, merge, vision.window_size,
                                                                     vision.patch_size)]
    return tuple(inputs)


def _windowed(config: Any) -> bool:
    return getattr(config, "model_type", None) == "qwen2_5_vl"


def _qwen_vl_dynamic(model: nn.Module, Dim: Any) -> tuple[dict[int, Any], ...]:
    # Patches come in spatial-merge units (the merger and the window order reshape by them).
    merged = Dim(QWEN_MERGED)
    patches = model.config.vision_config.spatial_merge_size ** 2 * merged
    shapes = ({0: patches}, {0: patches}, {0: Dim(QWEN_SEGMENTS)})
    return shapes + (({0: merged}, {0: Dim(QWEN_WINDOWS)}) if _windowed(model.config) else ())


def _qwen_vl_spec(model_type: str) -> VisionSpec:
    windowed = model_type == "qwen2_5_vl"
    inputs = ("pixel_values", "vision_position_ids", "cu_seqlens")
    dims: dict[str, list[str | None]] = {
        "pixel_values": [QWEN_PATCHES, None], "vision_position_ids": [QWEN_PATCHES, None],
        "cu_seqlens": [QWEN_SEGMENTS], "image_features": ["num_image_tokens", None]}
    if windowed:
        inputs += ("window_index", "cu_window_seqlens")
        dims.update(window_index=[QWEN_MERGED], cu_window_seqlens=[QWEN_WINDOWS])
    return VisionSpec(
        family="qwen2_vl",
        inputs=inputs,
        encode=_qwen_vl_encode,
        sample=_qwen_vl_sample,
        input_dtypes=("float32",) + ("int64",) * (len(inputs) - 1),
        patches=patched_qwen_vl_attention,
        runtime_config=_qwen_vl_runtime,
        dynamic=_qwen_vl_dynamic,
        dim_names=dims,
    )


def _qwen_vl_runtime(config: Any) -> dict[str, Any]:
    vision = config.vision_config
    return {"spatial_merge_size": int(vision.spatial_merge_size), "patch_size": int(vision.patch_size),
            "window_size": int(vision.window_size) if _windowed(config) else None}


def _block_diagonal_attention(self: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                              position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                              **_: Any) -> torch.Tensor:
    """Qwen-VL vision attention without its data-dependent split into segments
    (``torch.split(..., lengths.tolist())``): one attention over all patches with a
    block-diagonal mask built from ``cu_seqlens``. Masked scores get zero weight, so each
    segment attends exactly to itself, as in the split."""
    import sys

    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    index = torch.arange(seq, device=hidden_states.device)
    # segment of patch i = how many segment ends lie at or before it
    segment = (cu_seqlens[1:].unsqueeze(0) <= index.unsqueeze(1)).sum(dim=-1)
    same = segment.unsqueeze(0) == segment.unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=same, scale=self.scaling)
    return self.proj(out.squeeze(0).transpose(0, 1).reshape(seq, -1))


@contextlib.contextmanager
def patched_qwen_vl_attention() -> Iterator[None]:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    classes = [modeling_qwen2_vl.VisionAttention, modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention]
    originals = [cls.forward for cls in classes]
    for cls in classes:
        cls.forward = _block_diagonal_attention
    try:
        yield
    finally:
        for cls, forward in zip(classes, originals):
            cls.forward = forward


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
    # one adapter family, two model types: Qwen2.5-VL adds windowed attention
    "qwen2_vl": _qwen_vl_spec("qwen2_vl"),
    "qwen2_5_vl": _qwen_vl_spec("qwen2_5_vl"),
}

# Families the split does not cover yet, with the reason (shown to the user).
UNSUPPORTED_VISION: dict[str, str] = {}


def vision_spec(family: str, config: Any = None) -> VisionSpec:
    """The spec for a model of ``family``; ``config`` (the Hugging Face config) picks a
    model type's own spec where a family has several."""
    spec = VISION_FAMILIES.get(getattr(config, "model_type", None)) or VISION_FAMILIES.get(family)
    if spec is None:
        from ..errors import ModelError

        reason = UNSUPPORTED_VISION.get(family, "no multimodal ONNX split is defined for this family")
        raise ModelError(f"cannot export {family!r} as a multimodal ONNX split: {reason}",
                         hint=f"supported: {', '.join(sorted(VISION_FAMILIES))}")
    return spec
