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
RESCALE = 1 / 255


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


# family -> composition
IMAGE_FAMILIES: dict[str, Callable[[dict[str, Any], str, Image.Image], ImageInputs]] = {
    "idefics3": idefics3,
}
