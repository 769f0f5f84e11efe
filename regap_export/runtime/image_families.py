"""Each family's image preprocessing and prompt expansion without transformers: one short
composition of ``image_ops`` per family, matching that family's transformers processor
(PIL backend) output exactly. ``IMAGE_FAMILIES[family](settings, text, image)`` returns the
prompt with its image placeholder expanded and the processor's pixel inputs (numpy, with a
batch axis of one).

``settings``: the folder's processor settings, ``processor_config.json`` (the processor's
own keys, with the image processor's nested under ``image_processor``) or, as older folders
and other writers store them, ``preprocessor_config.json``.

Families without a composition here go through transformers (``runtime.chat``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from . import image_ops as ops

IMAGENET_STANDARD = [0.5, 0.5, 0.5]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RESCALE = 1 / 255


class NotPorted(Exception):
    """These processor settings are outside what the composition reproduces: the caller
    uses the family's transformers processor instead."""


@dataclass(frozen=True)
class ImageInputs:
    text: str                       # the prompt with every image placeholder expanded
    pixels: dict[str, np.ndarray]   # pixel_values (+ the family's extras), batch axis first


def _image_settings(settings: dict[str, Any]) -> dict[str, Any]:
    nested = settings.get("image_processor")
    return nested if isinstance(nested, dict) else settings


# -- Idefics3 / SmolVLM (Idefics3ImageProcessorPil, Idefics3Processor) -----------------------
IDEFICS3_MAX_IMAGE_SIZE = 4096


def _idefics3_fit(height: int, width: int, longest: int) -> tuple[int, int]:
    """The size after scaling the longest edge to ``longest`` (heights/widths rounded up to
    even), then below 4096 (``get_resize_output_image_size``)."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > IDEFICS3_MAX_IMAGE_SIZE:
        width = IDEFICS3_MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > IDEFICS3_MAX_IMAGE_SIZE:
        height = IDEFICS3_MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _idefics3_resize(image: np.ndarray, size: dict[str, Any], resample: int) -> np.ndarray:
    if size.get("longest_edge"):
        height, width = _idefics3_fit(*image.shape[-2:], int(size["longest_edge"]))
    else:
        height, width = int(size["height"]), int(size["width"])
    return ops.resize(image, height, width, resample)


def idefics3(settings: dict[str, Any], text: str, image: Image.Image) -> ImageInputs:
    cfg = _image_settings(settings)
    resample = int(cfg.get("resample", 1))  # LANCZOS
    tile = int((cfg.get("max_image_size") or {"longest_edge": 364})["longest_edge"])
    array = ops.to_channels_first(image)
    if cfg.get("do_resize", True):
        array = _idefics3_resize(array, cfg.get("size") or {"longest_edge": 4 * 364}, resample)
    rows = cols = 0
    if cfg.get("do_image_splitting", True):
        # resize_for_vision_encoder: both sides up to multiples of the tile
        height, width = array.shape[-2:]
        aspect = width / height
        if width >= height:
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect) / tile) * tile
        array = ops.resize(array, height, width, resample)
        frames = []
        if height > tile or width > tile:
            rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
            frames = [array[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                      for r in range(rows) for c in range(cols)]
        frames.append(ops.resize(array, tile, tile, resample) if frames else array)
    else:
        frames = [ops.resize(array, tile, tile, resample)]
    if cfg.get("do_rescale", True):
        frames = [ops.rescale(f, float(cfg.get("rescale_factor", RESCALE))) for f in frames]
    if cfg.get("do_normalize", True):
        frames = [ops.normalize(f, cfg.get("image_mean", IMAGENET_STANDARD), cfg.get("image_std", IMAGENET_STANDARD))
                  for f in frames]
    if cfg.get("do_pad", True):
        height = max(f.shape[-2] for f in frames)
        width = max(f.shape[-1] for f in frames)
        padded = [ops.pad_bottom_right(f.astype(np.float32), height, width) for f in frames]
        pixels = {"pixel_values": np.stack([p for p, _ in padded])[None],
                  "pixel_attention_mask": np.stack([m for _, m in padded])[None]}
    else:
        pixels = {"pixel_values": np.asarray(frames)[None]}

    seq_len = int(settings.get("image_seq_len", 169))
    fake, image_token, global_tag = "<fake_token_around_image>", "<image>", "<global-img>"
    expansion = ""
    if rows or cols:
        for r in range(rows):
            for c in range(cols):
                expansion += f"{fake}<row_{r + 1}_col_{c + 1}>" + image_token * seq_len
            expansion += "\n"
        expansion += "\n"
    expansion += f"{fake}{global_tag}" + image_token * seq_len + fake
    return ImageInputs(text=text.replace(image_token, expansion, 1), pixels=pixels)


# -- LLaVA 1.5 (CLIPImageProcessorPil, LlavaProcessor) --------------------------------------
def _shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """``get_resize_output_image_size(..., default_to_square=False)`` without max_size."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def clip_pixels(cfg: dict[str, Any], image: Image.Image) -> np.ndarray:
    """The PIL backend's default chain: resize, center crop, rescale, normalize -> [3, H, W]."""
    if cfg.get("do_pad") or cfg.get("pad_size"):
        raise NotPorted("padding")
    array = ops.to_channels_first(image)
    if cfg.get("do_resize", True):
        array = _resize_with_size(array, cfg.get("size") or {"shortest_edge": 224}, int(cfg.get("resample", 3)))
    if cfg.get("do_center_crop", True):
        crop = cfg.get("crop_size") or {"height": 224, "width": 224}
        array = ops.center_crop(array, int(crop["height"]), int(crop["width"]))
    if cfg.get("do_rescale", True):
        array = ops.rescale(array, float(cfg.get("rescale_factor", RESCALE)))
    if cfg.get("do_normalize", True):
        array = ops.normalize(array, cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD))
    return array.astype(np.float32)


def llava(settings: dict[str, Any], text: str, image: Image.Image) -> ImageInputs:
    cfg = _image_settings(settings)
    if cfg.get("image_processor_type", "CLIPImageProcessor") not in ("CLIPImageProcessor", "CLIPImageProcessorPil"):
        raise NotPorted(cfg.get("image_processor_type"))
    pixels = clip_pixels(cfg, image)
    patch = settings.get("patch_size")
    if not patch:
        raise NotPorted("no patch_size")
    height, width = pixels.shape[-2:]
    count = (height // int(patch)) * (width // int(patch)) + int(settings.get("num_additional_image_tokens") or 0)
    if settings.get("vision_feature_select_strategy") == "default":
        count -= 1
    token = settings.get("image_token") or "<image>"
    return ImageInputs(text=text.replace(token, token * count, 1), pixels={"pixel_values": pixels[None]})


# -- LLaVA-NeXT (LlavaNextImageProcessorPil, LlavaNextProcessor) --------------------------------
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def select_best_resolution(original_size: tuple[int, int], possible: list[list[int]]) -> tuple[int, int]:
    """transformers' ``select_best_resolution``: the (height, width) that keeps the most of the
    image, then wastes the least."""
    original_height, original_width = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in possible:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = (width * height) - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit


def _resize_with_size(array: np.ndarray, size: dict[str, Any], resample: int) -> np.ndarray:
    """``PilBackend.resize`` for the two size forms CLIP-style processors save."""
    if set(size) == {"shortest_edge"}:
        height, width = _shortest_edge_size(*array.shape[-2:], int(size["shortest_edge"]))
    elif set(size) == {"height", "width"}:
        height, width = int(size["height"]), int(size["width"])
    else:
        raise NotPorted(f"size {size}")
    return ops.resize(array, height, width, resample)


def _llava_next_token_count(orig: tuple[int, int], crop: tuple[int, int], settings: dict[str, Any],
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


def llava_next(settings: dict[str, Any], text: str, image: Image.Image) -> ImageInputs:
    cfg = _image_settings(settings)
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
            frame = _resize_with_size(frame, size, resample)
        if cfg.get("do_center_crop", True):
            frame = ops.center_crop(frame, int(crop["height"]), int(crop["width"]))
        if cfg.get("do_rescale", True):
            frame = ops.rescale(frame, float(cfg.get("rescale_factor", RESCALE)))
        if cfg.get("do_normalize", True):
            frame = ops.normalize(frame, cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD))
        out.append(frame)
    pixels = np.array(out).astype(np.float32)
    count = _llava_next_token_count(orig, tuple(pixels.shape[-2:]), settings, pinpoints)
    token = settings.get("image_token") or "<image>"
    return ImageInputs(text=text.replace(token, token * count, 1),
                       pixels={"pixel_values": pixels[None], "image_sizes": np.array([orig], dtype=np.int64)})


# -- Qwen2-VL / Qwen2.5-VL (Qwen2VLImageProcessorPil, Qwen2VLProcessor) -----------------------
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


def qwen2_vl(settings: dict[str, Any], text: str, image: Image.Image) -> ImageInputs:
    cfg = _image_settings(settings)
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


# family -> composition
IMAGE_FAMILIES: dict[str, Callable[[dict[str, Any], str, Image.Image], ImageInputs]] = {
    "idefics3": idefics3,
    "llava": llava,
    "llava_next": llava_next,
    "qwen2_vl": qwen2_vl,
}
