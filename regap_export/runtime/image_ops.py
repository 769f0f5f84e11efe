"""Image preprocessing in numpy and PIL, as transformers' PIL image processors do it
(``image_processing_backends.PilBackend`` and ``image_transforms``), so that an exported
folder's images are prepared without transformers. Images are channels-first arrays
[channels, height, width]: uint8 until ``rescale``, float32 after.

The per-family compositions of these steps are in ``image_families``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

# transformers' PILImageResampling values are PIL's own (NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, ...)
BILINEAR = int(Image.Resampling.BILINEAR)


def to_channels_first(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as uint8 [3, height, width] (``PilBackend.process_image``). Images
    with transparency are composited onto white first (``convert_to_rgb``)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.moveaxis(np.array(image), -1, 0)


def resize(image: np.ndarray, height: int, width: int, resample: int | None = None) -> np.ndarray:
    """Resize a uint8 [C, H, W] image with PIL (``image_transforms.resize``: PIL's resize on
    the uint8 image, back to channels-first)."""
    if image.dtype != np.uint8:
        # transformers rescales float images to [0, 255] for PIL and back; every composition
        # here resizes before rescaling, so only uint8 reaches this point.
        raise ValueError(f"resize expects a uint8 image, got {image.dtype}")
    resample = BILINEAR if resample is None else int(resample)
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
