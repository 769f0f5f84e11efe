"""LLaVA 1.5 (``llava``) and LLaVA-NeXT / v1.6 (``llava_next``).

In transformers 5 both are ``*ForConditionalGeneration`` wrapping ``model`` (a
``LlavaModel`` / ``LlavaNextModel``) whose ``language_model`` is the bare decoder.
The processors expand each ``<image>`` into the right number of image tokens (for
LLaVA-NeXT from the image's size, which they also return as ``image_sizes``).

The multimodal ONNX split: the vision encoder graph is tower -> chosen layer(s) ->
projector; LLaVA-NeXT's packing of the any-resolution crops (unpadding, newline columns)
depends on each image's size and runs in the runtime (numpy ports of transformers'
llava_next helpers below).

Both families' image preprocessing and ``<image>`` expansion without transformers (the
adapters' ``image_inputs``, ports of the PIL image processors) are at the end.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RegapError
from . import image_ops as ops
from . import register
from .base import ModelAdapter
from .image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RESCALE, ImageInputs, NotPorted, image_settings
from .vision_export import VisionSpec, model_dtype
from .vision_runtime import VisionRuntime

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

# Used only when the processor ships no chat template of its own.
LLAVA_CHAT_TEMPLATE = r"""{#- LLaVA 1.5 (Vicuna) format: "USER: <image>\n{prompt} ASSISTANT:". -#}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{%- if message['content'] is string -%}{{- message['content'] + ' ' -}}
{%- else -%}{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') + ' ' -}}{%- endif -%}
{%- else -%}
{{- message['role'].upper() + ': ' -}}
{%- if message['content'] is string -%}{{- message['content'] + ' ' -}}
{%- else -%}
{%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- '<image>\n' -}}{%- endfor -%}
{%- for content in message['content'] | selectattr('type', 'equalto', 'text') -%}{{- content['text'] + ' ' -}}{%- endfor -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
"""

LLAVA_NEXT_CHAT_TEMPLATE = r"""{#- LLaVA-NeXT (v1.6, Mistral) format: "[INST] <image>\n{prompt} [/INST]". -#}
{%- for message in messages -%}
{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set n_images = 0 -%}
{%- else -%}
{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') -%}
{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}
{%- endif -%}
{%- if message['role'] == 'system' -%}
{{- '<<SYS>>\n' + text + '\n<</SYS>>\n\n' -}}
{%- elif message['role'] == 'user' -%}
{{- '[INST] ' + '<image>\n' * n_images + text + ' [/INST]' -}}
{%- elif message['role'] == 'assistant' -%}
{{- ' ' + text + eos_token -}}
{%- endif -%}
{%- endfor -%}
"""


# -- LLaVA 1.5: export side ------------------------------------------------------------------
def _encode(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """LlavaModel.get_image_features: the chosen vision layer(s), CLS dropped for the
    "default" strategy, then the multimodal projector."""
    import torch

    inner = model.model
    config = model.config
    out = inner.vision_tower(pixel_values.to(model_dtype(model)), output_hidden_states=True, return_dict=True)
    layer = config.vision_feature_layer
    strategy = config.vision_feature_select_strategy
    layers = [layer] if isinstance(layer, int) else list(layer)
    selected = [out.hidden_states[i] for i in layers]
    if strategy == "default":
        selected = [h[:, 1:] for h in selected]
    feature = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
    return inner.multi_modal_projector(feature)


def _sample(model: nn.Module, n: int) -> tuple[torch.Tensor, ...]:
    import torch

    size = model.config.vision_config.image_size
    return (torch.randn(n, 3, size, size),)


# -- LLaVA 1.5: runtime side ------------------------------------------------------------------
def _prepare(config: dict, pixel_values: np.ndarray, **_: Any) -> dict[str, np.ndarray]:
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim == 5:
        pv = pv.reshape(-1, *pv.shape[2:])
    return {"pixel_values": np.ascontiguousarray(pv)}


# -- LLaVA-NeXT (v1.6): export side -----------------------------------------------------------
def _next_encode(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch features of the any-resolution crops [num_patches, tokens, hidden] (vision
    tower -> chosen layer(s) -> projector, as LlavaNextModel.get_image_features before
    ``pack_image_features``), and the learned ``image_newline`` [hidden]. The packing
    (unpadding, newline columns) depends on each image's size and is the runtime's job."""
    features = _encode(model, pixel_values)
    newline = model.model.image_newline
    return features, newline.to(features.dtype) * 1


def _next_runtime_config(config: Any) -> dict[str, Any]:
    return {"image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
            "image_size": int(config.vision_config.image_size),
            "patch_size": int(config.vision_config.patch_size)}


# -- LLaVA-NeXT (v1.6): runtime side (ports of transformers' llava_next helpers) ---------------
def select_best_resolution(original_size: tuple[int, int], possible_resolutions: list[list[int]]
                           ) -> tuple[int, int]:
    """transformers' ``image_processing_utils.select_best_resolution`` (ported so that the
    runtime needs numpy only): the (height, width) pinpoint that keeps the most of the image
    after downscaling, ties broken by the least wasted area."""
    original_height, original_width = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
                effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (height, width)
    return best_fit


def _best_resolution(image_size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    return tuple(int(x) for x in select_best_resolution(tuple(image_size), pinpoints))


def _num_patches(image_size: tuple[int, int], pinpoints: list[list[int]], crop: int) -> int:
    height, width = _best_resolution(image_size, pinpoints)
    return len(range(0, height, crop)) * len(range(0, width, crop)) + 1


def _unpad(tensor: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """transformers' llava_next ``unpad_image`` for a [channels, height, width] array."""
    original_height, original_width = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        scale = current_width / original_width
        new_height = int(round(original_height * scale, 7))
        padding = (current_height - new_height) // 2
        return tensor[:, padding: current_height - padding, :]
    scale = current_height / original_height
    new_width = int(round(original_width * scale, 7))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding: current_width - padding]


def _next_prepare(config: dict, pixel_values: np.ndarray, image_sizes: np.ndarray | None = None,
                  **_: Any) -> dict[str, np.ndarray]:
    """[num_images, max_patches, 3, S, S] -> the real crops of every image, concatenated."""
    if image_sizes is None:
        raise RegapError("LLaVA-NeXT needs image_sizes (the processor returns them)", field="image_sizes",
                         hint="pass the processor's image_sizes with pixel_values")
    vision = config["vision_config"]
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim == 4:
        return {"pixel_values": np.ascontiguousarray(pv)}
    crops = []
    for image, size in zip(pv, np.asarray(image_sizes)):
        n = _num_patches((int(size[0]), int(size[1])), vision["image_grid_pinpoints"], vision["image_size"])
        crops.append(image[:n])
    return {"pixel_values": np.ascontiguousarray(np.concatenate(crops, axis=0))}


def _next_place(config: dict, outputs: dict[str, np.ndarray], image_sizes: np.ndarray | None = None,
                **_: Any) -> np.ndarray:
    """LlavaNextModel.pack_image_features in numpy: base crop, then the unpadded grid of
    crops with an ``image_newline`` column after every row."""
    vision = config["vision_config"]
    features, newline = outputs["image_features"], outputs["image_newline"]
    crop, side = vision["image_size"], vision["image_size"] // vision["patch_size"]
    pinpoints = vision["image_grid_pinpoints"]
    packed, offset = [], 0
    for size in np.asarray(image_sizes):
        size = (int(size[0]), int(size[1]))
        n = _num_patches(size, pinpoints, crop)
        feature = features[offset: offset + n]
        offset += n
        if n > 1:
            base, grid = feature[0], feature[1:]
            best_h, best_w = _best_resolution(size, pinpoints)
            rows, cols = best_h // crop, best_w // crop
            dim = grid.shape[-1]
            grid = grid.reshape(rows, cols, side, side, dim).transpose(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)
            grid = _unpad(grid, size)
            column = np.broadcast_to(newline[:, None, None], (dim, grid.shape[1], 1)).astype(grid.dtype)
            grid = np.concatenate([grid, column], axis=-1)
            grid = grid.reshape(dim, -1).T
            packed.append(np.concatenate([base, grid], axis=0))
        else:
            packed.append(np.concatenate([feature[0], newline[None].astype(feature.dtype)], axis=0))
    if offset != features.shape[0]:
        raise RegapError(f"LLaVA-NeXT: {features.shape[0]} crops encoded, image_sizes account for {offset}")
    return np.concatenate(packed, axis=0)


# -- LLaVA 1.5: image preprocessing without transformers (CLIPImageProcessorPil, LlavaProcessor) --
def _clip_pixels(cfg: dict[str, Any], image: Image.Image) -> np.ndarray:
    """The PIL backend's default chain: resize, center crop, rescale, normalize -> [3, H, W]."""
    if cfg.get("do_pad") or cfg.get("pad_size"):
        raise NotPorted("padding")
    array = ops.to_channels_first(image)
    if cfg.get("do_resize", True):
        array = ops.resize_with_size(array, cfg.get("size") or {"shortest_edge": 224}, int(cfg.get("resample", 3)))
    if cfg.get("do_center_crop", True):
        crop = cfg.get("crop_size") or {"height": 224, "width": 224}
        array = ops.center_crop(array, int(crop["height"]), int(crop["width"]))
    if cfg.get("do_rescale", True):
        array = ops.rescale(array, float(cfg.get("rescale_factor", RESCALE)))
    if cfg.get("do_normalize", True):
        array = ops.normalize(array, cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD))
    return array.astype(np.float32)


def _image_inputs(settings: dict[str, Any], text: str, image: Image.Image) -> ImageInputs:
    cfg = image_settings(settings)
    if cfg.get("image_processor_type", "CLIPImageProcessor") not in ("CLIPImageProcessor", "CLIPImageProcessorPil"):
        raise NotPorted(cfg.get("image_processor_type"))
    pixels = _clip_pixels(cfg, image)
    patch = settings.get("patch_size")
    if not patch:
        raise NotPorted("no patch_size")
    height, width = pixels.shape[-2:]
    count = (height // int(patch)) * (width // int(patch)) + int(settings.get("num_additional_image_tokens") or 0)
    if settings.get("vision_feature_select_strategy") == "default":
        count -= 1
    token = settings.get("image_token") or "<image>"
    return ImageInputs(text=text.replace(token, token * count, 1), pixels={"pixel_values": pixels[None]})


# -- LLaVA-NeXT: image preprocessing without transformers (LlavaNextImageProcessorPil, LlavaNextProcessor)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _next_token_count(orig: tuple[int, int], crop: tuple[int, int], settings: dict[str, Any],
                      pinpoints: list[list[int]]) -> int:
    """``LlavaNextProcessor._get_number_of_features``: the base crop's patches, then the
    unpadded any-resolution grid with one newline per row."""
    patch = int(settings["patch_size"])
    height, width = crop
    best_height, best_width = select_best_resolution(orig, pinpoints)
    patches_height, patches_width = height // patch, width // patch
    current_height = patches_height * (best_height // height)
    current_width = patches_width * (best_width // width)
    orig_height, orig_width = orig
    if orig_width / orig_height > current_width / current_height:
        new_height = int(round(orig_height * (current_width / orig_width), 7))
        current_height -= ((current_height - new_height) // 2) * 2
    else:
        new_width = int(round(orig_width * (current_height / orig_height), 7))
        current_width -= ((current_width - new_width) // 2) * 2
    count = current_height * current_width + current_height
    count += patches_height * patches_width + int(settings.get("num_additional_image_tokens") or 0)
    if settings.get("vision_feature_select_strategy") == "default":
        count -= 1
    return count


def _next_image_inputs(settings: dict[str, Any], text: str, image: Image.Image) -> ImageInputs:
    cfg = image_settings(settings)
    if cfg.get("image_processor_type", "LlavaNextImageProcessor") not in ("LlavaNextImageProcessor",
                                                                          "LlavaNextImageProcessorPil"):
        raise NotPorted(cfg.get("image_processor_type"))
    if not settings.get("patch_size"):
        raise NotPorted("no patch_size")
    resample = int(cfg.get("resample", 3))  # BICUBIC
    size = cfg.get("size") or {"shortest_edge": 224}
    crop = cfg.get("crop_size") or {"height": 224, "width": 224}
    pinpoints = cfg.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS
    base_size = (size["height"], size["width"]) if size.get("height") else (size["shortest_edge"],) * 2
    tile = int(crop.get("height") or size.get("height") or size["shortest_edge"])
    array = ops.to_channels_first(image)
    orig = tuple(int(x) for x in array.shape[-2:])
    # get_image_patches: resize into the best grid resolution keeping the aspect, pad centred, cut tiles
    best_height, best_width = select_best_resolution(orig, pinpoints)
    scale_w, scale_h = best_width / orig[1], best_height / orig[0]
    if scale_w < scale_h:
        new_height, new_width = min(math.ceil(orig[0] * scale_w), best_height), best_width
    else:
        new_height, new_width = best_height, min(math.ceil(orig[1] * scale_h), best_width)
    resized = ops.resize(array, new_height, new_width, resample)
    pad_x, r_x = divmod(best_width - new_width, 2)
    pad_y, r_y = divmod(best_height - new_height, 2)
    padded = np.pad(resized, ((0, 0), (pad_y, pad_y + r_y), (pad_x, pad_x + r_x)), mode="constant", constant_values=0)
    tiles = [padded[:, i:i + tile, j:j + tile] for i in range(0, best_height, tile) for j in range(0, best_width, tile)]
    frames = [ops.resize(array, int(base_size[0]), int(base_size[1]), resample)] + tiles
    out = []
    for frame in frames:
        if cfg.get("do_resize", True):
            frame = ops.resize_with_size(frame, size, resample)
        if cfg.get("do_center_crop", True):
            frame = ops.center_crop(frame, int(crop["height"]), int(crop["width"]))
        if cfg.get("do_rescale", True):
            frame = ops.rescale(frame, float(cfg.get("rescale_factor", RESCALE)))
        if cfg.get("do_normalize", True):
            frame = ops.normalize(frame, cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD))
        out.append(frame)
    pixels = np.array(out).astype(np.float32)
    count = _next_token_count(orig, tuple(pixels.shape[-2:]), settings, pinpoints)
    token = settings.get("image_token") or "<image>"
    return ImageInputs(text=text.replace(token, token * count, 1),
                       pixels={"pixel_values": pixels[None], "image_sizes": np.array([orig], dtype=np.int64)})


LLAVA = register(ModelAdapter(
    family="llava",
    model_types=("llava",),
    language_model_path="model.language_model",
    multimodal=True,
    fallback_chat_template=LLAVA_CHAT_TEMPLATE,
    auto_class_name="AutoModelForImageTextToText",
    vision_export={"llava": VisionSpec(family="llava", inputs=("pixel_values",), encode=_encode, sample=_sample,
                                       input_dtypes=("float32",))},
    vision_runtime=VisionRuntime(_prepare),
    image_inputs=_image_inputs,
))

LLAVA_NEXT = register(ModelAdapter(
    family="llava_next",
    model_types=("llava_next",),
    language_model_path="model.language_model",
    multimodal=True,
    fallback_chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    auto_class_name="AutoModelForImageTextToText",
    pixel_extra_keys=("image_sizes",),
    vision_export={"llava_next": VisionSpec(
        family="llava_next", inputs=("pixel_values",), encode=_next_encode, sample=_sample,
        input_dtypes=("float32",), outputs=("image_features", "image_newline"),
        runtime_config=_next_runtime_config)},
    vision_runtime=VisionRuntime(_next_prepare, _next_place),
    image_inputs=_next_image_inputs,
))
