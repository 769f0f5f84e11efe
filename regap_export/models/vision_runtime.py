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


# Qwen2-VL / Qwen2.5-VL: the vision tower takes all images' patches as one sequence. What
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
        raise RegapError("Qwen2-VL needs image_grid_thw (the processor returns it)")
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
    # image_features [image tokens, hidden] come out in token order already
    "qwen2_vl": VisionRuntime(_qwen_vl_images),
}
