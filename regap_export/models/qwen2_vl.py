"""Qwen2-VL and Qwen2.5-VL.

In transformers 5 the decoder is ``model.language_model``; the processor expands each
``<|image_pad|>`` to the image's merged patch count and returns ``image_grid_thw`` and
``mm_token_type_ids``, from which the model computes its own 3-D (M-RoPE) position ids.

transformers 5 builds these processors only with a video processor, and video processors
need torchvision. regap-export feeds images only, so without torchvision the processor
is built with no video processor (``image_only_processor``) and saved without one.

This module also holds the family's multimodal ONNX split (the vision encoder graph takes
the patch layout that transformers derives from ``image_grid_thw`` as inputs, computed in
numpy here), its image preprocessing without transformers and its M-RoPE position ids.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from unittest import mock

import numpy as np

from ..errors import RegapError
from . import image_ops as ops
from . import pil_processors, register
from .base import ModelAdapter
from .image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RESCALE, ImageInputs, NotPorted, image_settings
from .positions import PositionKind, check_prompt
from .vision_export import VisionSpec, model_dtype
from .vision_runtime import VisionRuntime

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

_PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def image_only_processor(processor_class: str, image_processor: Any, tokenizer: Any,
                         chat_template: str | None = None) -> Any:
    """A Qwen2-VL-family processor without a video processor (videos unsupported)."""
    import transformers
    from transformers import ProcessorMixin

    cls = getattr(transformers, processor_class)
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self: Any, name: str, arg: Any) -> Any:
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                   chat_template=chat_template)


@dataclass(frozen=True)
class Qwen2VLAdapter(ModelAdapter):
    def load_processor(self, path: str | Path, **kwargs: Any) -> Any:
        if not pil_processors.torchvision_missing():
            return super().load_processor(path, **kwargs)
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        model_type = AutoConfig.from_pretrained(str(path), **kwargs).model_type
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        return image_only_processor(_PROCESSOR_CLASSES[model_type], pil_processors.pil_image_processor(path), tokenizer,
                                    pil_processors.saved_chat_template(path) or tokenizer.chat_template)

    def save_processor(self, processor: Any, path: str | Path) -> None:
        if getattr(processor, "video_processor", None) is not None:
            return super().save_processor(processor, path)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        processor.tokenizer.save_pretrained(str(path))
        image_config = processor.image_processor.to_dict()
        # The video processor a torchvision install would build, from the image settings.
        video_config = {k: v for k, v in image_config.items() if k != "image_processor_type"}
        video_config["video_processor_type"] = "Qwen2VLVideoProcessor"  # both families use it
        config = {"processor_class": type(processor).__name__,
                  "image_processor": image_config, "video_processor": video_config}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if isinstance(processor.chat_template, str):
            (path / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")


# Used only when the processor ships no chat template of its own.
CHAT_TEMPLATE = r"""{#- Qwen2-VL / Qwen2.5-VL ChatML format; each image is <|vision_start|><|image_pad|><|vision_end|>. -#}
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] + '<|im_end|>\n' -}}
{%- else -%}
{%- for content in message['content'] -%}
{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
{%- set image_count.value = image_count.value + 1 -%}
{%- if add_vision_id -%}{{- 'Picture ' + image_count.value | string + ': ' -}}{%- endif -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif content['type'] == 'video' or 'video' in content -%}
{%- set video_count.value = video_count.value + 1 -%}
{%- if add_vision_id -%}{{- 'Video ' + video_count.value | string + ': ' -}}{%- endif -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in content -%}
{{- content['text'] -}}
{%- endif -%}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""


# -- multimodal ONNX split: export side --------------------------------------------------------
# The tower takes every image's patches as one sequence [patches, C*T*P*P]. What transformers
# derives from image_grid_thw with data-dependent shapes (vision_utils: patch positions,
# segment offsets, Qwen2.5-VL's window order) is a graph input, computed by the runtime
# (below); the tower pops these precomputed tensors from its kwargs.
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
    return visual(pixel_values.to(model_dtype(model)), grid_thw=None, **precomputed).pooler_output


def _qwen_vl_sample(model: nn.Module, n: int) -> tuple[torch.Tensor, ...]:
    import torch

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

    import torch

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


# -- multimodal ONNX split: runtime side (numpy) ---------------------------------------------
# The vision tower takes all images' patches as one sequence. What
# transformers derives from image_grid_thw with data-dependent shapes (vision_utils) is
# computed here and fed to the graph.
def qwen_vl_patch_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(row, column) of every patch [patches, 2], patches in spatial-merge-block order
    (transformers' ``vision_utils.get_vision_position_ids``)."""
    out = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def qwen_vl_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """Patch offsets of the attention segments (one per frame), [segments + 1]."""
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def qwen_vl_window_index(grid_thw: np.ndarray, merge: int, window_size: int, patch_size: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's windowed attention (transformers' ``vision_utils.get_vision_window_index``):
    the order of the merged patches grouped by window [merged patches], and the patch offsets
    of the windows [windows + 1]."""
    side = window_size // merge // patch_size
    unit = merge * merge
    index, cu, offset = [], [0], 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist():
        gh, gw = h // merge, w // merge
        pad_h, pad_w = side - gh % side, side - gw % side
        nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
        grid = np.full((t, gh + pad_h, gw + pad_w), -100, dtype=np.int64)
        grid[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        grid = grid.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, side, side)
        counts = (grid != -100).sum(axis=(2, 3)).reshape(-1)
        flat = grid.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(counts) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], np.diff(cu_arr) != 0])  # torch.unique_consecutive: empty windows
    return np.concatenate(index).astype(np.int64), cu_arr[keep]


def _qwen_vl_images(config: dict, pixel_values: np.ndarray, image_grid_thw: np.ndarray | None = None,
                    **_: Any) -> dict[str, np.ndarray]:
    """Processor output (``pixel_values`` [patches, C*T*P*P], ``image_grid_thw``) -> the
    vision encoder's feeds."""
    if image_grid_thw is None:
        raise RegapError("Qwen2-VL needs image_grid_thw (the processor returns it)", field="image_grid_thw",
                         hint="pass the processor's image_grid_thw with pixel_values")
    vision = config["vision_config"]
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim != 2 or pv.shape[0] != int(grid.prod(axis=1).sum()):
        raise RegapError(f"pixel_values {pv.shape} do not hold the {int(grid.prod(axis=1).sum())} patches "
                         "image_grid_thw describes")
    merge = int(vision["spatial_merge_size"])
    feeds = {"pixel_values": np.ascontiguousarray(pv),
             "vision_position_ids": qwen_vl_patch_positions(grid, merge),
             "cu_seqlens": qwen_vl_cu_seqlens(grid)}
    if vision.get("window_size") is not None:
        feeds["window_index"], feeds["cu_window_seqlens"] = qwen_vl_window_index(
            grid, merge, int(vision["window_size"]), int(vision["patch_size"]))
    return feeds


# -- image preprocessing without transformers (Qwen2VLImageProcessorPil, Qwen2VLProcessor) ------
def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Both sides multiples of ``factor``, the area within [min_pixels, max_pixels], the aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise NotPorted("aspect ratio over 200 (transformers refuses it)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _image_inputs(settings: dict[str, Any], text: str, image: Image.Image) -> ImageInputs:
    cfg = image_settings(settings)
    patch, merge = int(cfg.get("patch_size", 14)), int(cfg.get("merge_size", 2))
    temporal = int(cfg.get("temporal_patch_size", 2))
    array = ops.to_channels_first(image)
    if cfg.get("do_resize", True):
        size = dict(cfg.get("size") or {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
        if cfg.get("min_pixels") is not None:
            size["shortest_edge"] = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            size["longest_edge"] = cfg["max_pixels"]
        height, width = _smart_resize(*array.shape[-2:], patch * merge, int(size["shortest_edge"]),
                                      int(size["longest_edge"]))
        array = ops.resize(array, height, width, int(cfg.get("resample", 3)))  # BICUBIC
    if cfg.get("do_rescale", True):
        array = ops.rescale(array, float(cfg.get("rescale_factor", RESCALE)))
    if cfg.get("do_normalize", True):
        array = ops.normalize(array, cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD))
    # patchify: [grid_h * grid_w, C * temporal * patch * patch], patches in merge-block order
    array = np.asarray(array, dtype=np.float32)
    channels, height, width = array.shape
    grid_h, grid_w = height // patch, width // patch
    patches = array.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
    patches = np.broadcast_to(patches[:, :, :, :, :, None, :, :], (*patches.shape[:5], temporal, *patches.shape[5:]))
    flat = patches.reshape(grid_h * grid_w, channels * temporal * patch * patch)
    token = settings.get("image_token") or "<|image_pad|>"
    count = grid_h * grid_w // (merge * merge)
    return ImageInputs(text=text.replace(token, token * count, 1),
                       pixels={"pixel_values": flat, "image_grid_thw": np.array([[1, grid_h, grid_w]], dtype=np.int64)})


# -- position ids: M-RoPE ----------------------------------------------------------------------
# ``position_ids`` [3, batch, seq] (temporal, height, width), transformers'
# ``Qwen2VLModel.get_rope_index`` for images: text tokens advance all three axes together, an
# image's merged patches take (start, start + row, start + column) and the text after it starts
# at ``start + max(rows, columns)``. Padding positions are 0 (as ``get_rope_index`` leaves
# them). A decode step is the row's largest position + 1 on all three axes, which is what
# transformers' ``rope_deltas`` amounts to.
MROPE = "mrope"
# mm_token_type_ids values (transformers' ProcessorMixin.create_mm_token_type_ids)
_TEXT_TOKEN, _IMAGE_TOKEN = 0, 1


def _mrope_settings(config: Any) -> dict[str, Any]:
    return {"scheme": MROPE, "rank": 3, "image_token_id": int(config.image_token_id),
            "spatial_merge_size": int(config.vision_config.spatial_merge_size)}


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray | None, *, image_token_id: int,
                    spatial_merge_size: int, image_grid_thw: np.ndarray | None = None,
                    mm_token_type_ids: np.ndarray | None = None) -> np.ndarray:
    """[3, batch, seq] position ids: transformers' ``get_rope_index`` for text and images.

    ``mm_token_type_ids`` (the processor's) or, when absent, ``input_ids == image_token_id``
    says which tokens are image tokens; ``image_grid_thw`` [num_images, 3] gives each image's
    patch grid, in the order the images appear in the batch."""
    ids, mask = check_prompt(input_ids, attention_mask)
    if mm_token_type_ids is None:
        types = np.where(ids == image_token_id, _IMAGE_TOKEN, _TEXT_TOKEN)
    else:
        types = np.asarray(mm_token_type_ids, dtype=np.int64)
    if types.shape != ids.shape:
        raise RegapError(f"mm_token_type_ids has shape {types.shape}, input_ids {ids.shape}: they must match",
                         field="mm_token_type_ids", hint="pass the processor's outputs together")
    if np.any((types != _TEXT_TOKEN) & (types != _IMAGE_TOKEN)):
        raise RegapError("only text and image tokens are supported (videos are not)")
    grids = np.zeros((0, 3), dtype=np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    grids = grids.reshape(-1, 3)
    out = np.zeros((3,) + ids.shape, dtype=np.int64)
    image = 0
    for row in range(ids.shape[0]):
        keep = mask[row].astype(bool)
        row_types = types[row][keep]
        pieces, current = [], 0
        # Runs of one token type, as get_rope_index groups them (one image per image run).
        bounds = np.flatnonzero(np.diff(row_types)) + 1
        for run in np.split(row_types, bounds):
            if run.size == 0:
                continue
            if run[0] == _TEXT_TOKEN:
                pieces.append(np.broadcast_to(np.arange(run.size) + current, (3, run.size)))
                current += run.size
                continue
            if image >= len(grids):
                raise RegapError(f"the batch has more image-token runs than image_grid_thw rows ({len(grids)})")
            t, grid_h, grid_w = (int(x) for x in grids[image])
            image += 1
            h, w = grid_h // spatial_merge_size, grid_w // spatial_merge_size
            if t * h * w != run.size:
                raise RegapError(f"image {image - 1}: {run.size} image tokens, but its grid {(t, grid_h, grid_w)} "
                                 f"merges to {t * h * w}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(grid_h, grid_w) // spatial_merge_size
        if pieces:
            out[:, row, keep] = np.concatenate(pieces, axis=1)
    if image != len(grids):
        raise RegapError(f"image_grid_thw has {len(grids)} rows but the batch has {image} image-token runs")
    return out


def _mrope_prefill(settings: dict, input_ids: np.ndarray, attention_mask: np.ndarray,
                   image_grid_thw: np.ndarray | None = None, mm_token_type_ids: np.ndarray | None = None,
                   **_: Any) -> np.ndarray:
    return mrope_positions(input_ids, attention_mask, image_token_id=settings["image_token_id"],
                           spatial_merge_size=settings["spatial_merge_size"], image_grid_thw=image_grid_thw,
                           mm_token_type_ids=mm_token_type_ids)


def _mrope_next(previous: np.ndarray) -> np.ndarray:
    step = previous.max(axis=(0, 2)) + 1
    return np.broadcast_to(step[None, :, None], (3, previous.shape[1], 1)).copy()


QWEN2_VL = register(Qwen2VLAdapter(
    family="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    language_model_path="model.language_model",
    multimodal=True,
    fallback_chat_template=CHAT_TEMPLATE,
    auto_class_name="AutoModelForImageTextToText",
    pixel_extra_keys=("image_grid_thw",),
    # one adapter family, two model types: Qwen2.5-VL adds windowed attention
    vision_export={"qwen2_vl": _qwen_vl_spec("qwen2_vl"), "qwen2_5_vl": _qwen_vl_spec("qwen2_5_vl")},
    # image_features [image tokens, hidden] come out in token order already
    vision_runtime=VisionRuntime(_qwen_vl_images),
    positions=PositionKind(MROPE, _mrope_settings, _mrope_prefill, _mrope_next),
    image_inputs=_image_inputs,
))
