"""Per-family handling of image inputs for ONNX Runtime (numpy): which pixel inputs the
vision encoder takes, which images are padding, and how encoder outputs become the
feature rows written at image-token positions. The export side is ``vision_export.py``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import RegapError

def _idefics3_images(config: dict, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None = None,
                     **_: Any) -> dict[str, np.ndarray]:
    """[batch, max_images, 3, H, W] (processor output) -> real images only [n, 3, H, W].
    Padding images are all zeros, as Idefics3Model.get_image_features decides."""
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim == 5:
        b, n = pv.shape[:2]
        pv = pv.reshape(b * n, *pv.shape[2:])
        if pixel_attention_mask is not None:
            pixel_attention_mask = np.asarray(pixel_attention_mask).reshape(b * n, *pv.shape[2:])
    real = ~(pv == 0.0).all(axis=(1, 2, 3))
    pv = pv[real]
    if pixel_attention_mask is None:
        mask = np.ones((pv.shape[0], pv.shape[2], pv.shape[3]), dtype=np.int64)
    else:
        mask = np.asarray(pixel_attention_mask).astype(np.int64)[real]
    return {"pixel_values": np.ascontiguousarray(pv), "pixel_attention_mask": np.ascontiguousarray(mask)}


def _llava_images(config: dict, pixel_values: np.ndarray, **_: Any) -> dict[str, np.ndarray]:
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim == 5:
        pv = pv.reshape(-1, *pv.shape[2:])
    return {"pixel_values": np.ascontiguousarray(pv)}


def _flatten_features(config: dict, outputs: dict[str, np.ndarray], **_: Any) -> np.ndarray:
    features = outputs["image_features"]
    return features.reshape(-1, features.shape[-1])


# LLaVA-NeXT: any-resolution crops. Ports of transformers' llava_next helpers.
def _best_resolution(image_size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution

    return tuple(int(x) for x in select_best_resolution(tuple(image_size), pinpoints))


def _llava_next_num_patches(image_size: tuple[int, int], pinpoints: list[list[int]], crop: int) -> int:
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


def _llava_next_images(config: dict, pixel_values: np.ndarray, image_sizes: np.ndarray | None = None,
                       **_: Any) -> dict[str, np.ndarray]:
    """[num_images, max_patches, 3, S, S] -> the real crops of every image, concatenated."""
    if image_sizes is None:
        raise RegapError("LLaVA-NeXT needs image_sizes (the processor returns them)")
    vision = config["vision_config"]
    pv = np.asarray(pixel_values, dtype=np.float32)
    if pv.ndim == 4:
        return {"pixel_values": np.ascontiguousarray(pv)}
    crops = []
    for image, size in zip(pv, np.asarray(image_sizes)):
        n = _llava_next_num_patches((int(size[0]), int(size[1])), vision["image_grid_pinpoints"], vision["image_size"])
        crops.append(image[:n])
    return {"pixel_values": np.ascontiguousarray(np.concatenate(crops, axis=0))}


def _llava_next_pack(config: dict, outputs: dict[str, np.ndarray], image_sizes: np.ndarray | None = None,
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
        n = _llava_next_num_patches(size, pinpoints, crop)
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


@dataclass(frozen=True)
class VisionRuntime:
    # prepare(config, **pixel inputs) -> the vision encoder's feeds
    prepare: Callable[..., dict[str, np.ndarray]]
    # place(config, outputs, **pixel inputs) -> feature rows [image tokens, hidden], in token order
    place: Callable[..., np.ndarray] = _flatten_features


VISION_RUNTIME: dict[str, VisionRuntime] = {
    "idefics3": VisionRuntime(_idefics3_images),
    "llava": VisionRuntime(_llava_images),
    "llava_next": VisionRuntime(_llava_next_images, _llava_next_pack),
}
