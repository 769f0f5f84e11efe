"""Image preprocessing in numpy and PIL, as transformers' PIL image processors do it
(``image_processing_backends.PilBackend`` and ``image_transforms``), so that an exported
folder's images are prepared without transformers: the generic part.

Each multimodal family module composes these steps into its processor's preprocessing and
prompt expansion and declares it on its adapter (``ModelAdapter.image_inputs``, an
``ImagePreprocess``); ``runtime.chat`` runs it. Images are channels-first arrays
[channels, height, width]: uint8 until ``rescale``, float32 after.

PIL is imported inside the functions that use it, so ``regap_export.models`` loads without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

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


# A family's composition: (settings, prompt text, RGB image) -> ImageInputs, matching that
# family's transformers processor (PIL backend) output exactly. ``settings``: the folder's
# processor settings, ``processor_config.json`` (the processor's own keys, with the image
# processor's nested under ``image_processor``) or, as older folders and other writers store
# them, ``preprocessor_config.json``. Raises ``NotPorted`` for settings it does not reproduce.
ImagePreprocess = Callable[[dict[str, Any], str, "Image.Image"], ImageInputs]


def image_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The image processor's settings: nested in processor_config.json, or the whole file."""
    nested = settings.get("image_processor")
    return nested if isinstance(nested, dict) else settings


def to_channels_first(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as uint8 [3, height, width] (``PilBackend.process_image``). Images
    with transparency are composited onto white first (``convert_to_rgb``; ``io.images.to_rgb``)."""
    from ..io.images import to_rgb

    return np.moveaxis(np.array(to_rgb(image)), -1, 0)


def resize(image: np.ndarray, height: int, width: int, resample: int | None = None) -> np.ndarray:
    """Resize a uint8 [C, H, W] image with PIL (``image_transforms.resize``: PIL's resize on
    the uint8 image, back to channels-first)."""
    from PIL import Image

    if image.dtype != np.uint8:
        # transformers rescales float images to [0, 255] for PIL and back; every family's
        # composition resizes before rescaling, so only uint8 reaches this point.
        raise ValueError(f"resize expects a uint8 image, got {image.dtype}")
    # transformers' PILImageResampling values are PIL's own (NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, ...)
    resample = int(Image.Resampling.BILINEAR) if resample is None else int(resample)
    pil = Image.fromarray(np.moveaxis(image, 0, -1))
    resized = np.array(pil.resize((int(width), int(height)), resample=resample))
    if resized.ndim == 2:
        resized = resized[..., None]
    return np.moveaxis(resized, -1, 0)


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """``image * factor`` computed in float64, returned as float32 (``image_transforms.rescale``)."""
    return (image.astype(np.float64) * factor).astype(np.float32)


def normalize(image: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
    """``(image - mean) / std`` per channel in the image's float dtype (``image_transforms.normalize``)."""
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    channels = image.shape[0]
    mean = np.array(list(mean) if isinstance(mean, (list, tuple)) else [mean] * channels, dtype=image.dtype)
    std = np.array(list(std) if isinstance(std, (list, tuple)) else [std] * channels, dtype=image.dtype)
    return ((image.T - mean) / std).T


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image_transforms.center_crop`` for [C, H, W] (padding with zeros where the crop is larger)."""
    orig_h, orig_w = image.shape[-2:]
    top = (orig_h - height) // 2
    bottom = top + height
    left = (orig_w - width) // 2
    right = left + width
    if top >= 0 and bottom <= orig_h and left >= 0 and right <= orig_w:
        return image[..., top:bottom, left:right]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros(image.shape[:-2] + (new_h, new_w), dtype=image.dtype)
    top_pad = int(np.ceil((new_h - orig_h) / 2))
    left_pad = int(np.ceil((new_w - orig_w) / 2))
    padded[..., top_pad:top_pad + orig_h, left_pad:left_pad + orig_w] = image
    top += top_pad
    bottom += top_pad
    left += left_pad
    right += left_pad
    return padded[..., max(0, top):min(new_h, bottom), max(0, left):min(new_w, right)]


def pad_bottom_right(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad [C, h, w] to [C, height, width] at the bottom and right; with the pixel mask
    [height, width] int64 (1 on the image, 0 on the padding)."""
    h, w = image.shape[-2:]
    if h > height or w > width:
        raise ValueError(f"cannot pad a {h}x{w} image to {height}x{width}")
    out = np.zeros(image.shape[:-2] + (height, width), dtype=image.dtype)
    out[..., :h, :w] = image
    mask = np.zeros((height, width), dtype=np.int64)
    mask[:h, :w] = 1
    return out, mask


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """``get_resize_output_image_size(..., default_to_square=False)`` without max_size."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_with_size(array: np.ndarray, size: dict[str, Any], resample: int) -> np.ndarray:
    """``PilBackend.resize`` for the two size forms CLIP-style processors save."""
    if set(size) == {"shortest_edge"}:
        height, width = shortest_edge_size(*array.shape[-2:], int(size["shortest_edge"]))
    elif set(size) == {"height", "width"}:
        height, width = int(size["height"]), int(size["width"])
    else:
        raise NotPorted(f"size {size}")
    return resize(array, height, width, resample)
