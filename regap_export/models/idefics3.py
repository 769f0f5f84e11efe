"""Idefics3 / SmolVLM (``model_type`` "idefics3").

Layout in transformers 5 (``Idefics3ForConditionalGeneration``)::

    model.vision_model        SigLIP-style vision tower
    model.connector           pixel shuffle + linear projection into the LM embedding space
    model.text_model          the Llama decoder (``layers``, ``norm``, ``embed_tokens``)
    lm_head                   (tied to ``model.text_model.embed_tokens`` in SmolVLM)

The processor wants images nested per sample (``[[img], [img], ...]``): with a flat list it
regroups images by counting ``<image>`` in each prompt, which breaks as soon as a batch
mixes prompts with and without images. One ``<image>`` in the prompt expands to
``<fake_token_around_image><global-img><image>*image_seq_len<fake_token_around_image>``
(plus per-tile blocks when the image processor splits large images).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import image_ops as ops
from . import register
from .base import ModelAdapter
from .image_ops import IMAGENET_STANDARD, RESCALE, ImageInputs, image_settings
from .vision_export import VisionSpec, model_dtype, patched_bucketize
from .vision_runtime import VisionRuntime

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

# SmolVLM's chat format: a single ``<|im_start|>`` at the very start, "User:" / "Assistant:"
# turns closed by ``<end_of_utterance>``; no space after the colon when the turn opens with
# an image. Also accepts plain-string content (text-only messages).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}"
    "{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'] and message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class Idefics3Adapter(ModelAdapter):
    def images_argument(self, images: Sequence[Any]) -> Any:
        # One image per prompt, nested per sample.
        return [[image] for image in images]


# -- multimodal ONNX split -------------------------------------------------------------------
def _encode(model: nn.Module, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
    """Idefics3Model.get_image_features for real images only (the runtime drops the
    all-zero padding images): patch mask -> vision tower -> connector."""
    inner = model.model
    patch = inner.config.vision_config.patch_size
    pixel_values = pixel_values.to(model_dtype(model))
    subgrid = pixel_attention_mask.unfold(1, patch, patch).unfold(2, patch, patch)
    patch_mask = subgrid.sum(dim=(-1, -2)) > 0
    hidden = inner.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_mask).last_hidden_state
    return inner.connector(hidden)


def _sample(model: nn.Module, n: int) -> tuple[torch.Tensor, ...]:
    import torch

    size = model.config.vision_config.image_size
    pixels = torch.randn(n, 3, size, size)
    mask = torch.ones(n, size, size, dtype=torch.int64)
    return pixels, mask


def _prepare(config: dict, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None = None,
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
    if config.get(LAYOUT_KEY) == LAYOUT_BATCH_IMAGES:  # contract 3: one sample of n images, a bool mask
        return {"pixel_values": np.ascontiguousarray(pv[None]),
                "pixel_attention_mask": np.ascontiguousarray(mask[None].astype(np.bool_))}
    return {"pixel_values": np.ascontiguousarray(pv), "pixel_attention_mask": np.ascontiguousarray(mask)}


# -- image preprocessing without transformers (Idefics3ImageProcessorPil, Idefics3Processor) --
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


def _image_inputs(settings: dict[str, Any], text: str, image: Image.Image) -> ImageInputs:
    cfg = image_settings(settings)
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


# -- the vision encoder in transformers.js's input layout (onnx contract 3) ----------------
# transformers.js feeds the image processor's output unchanged: pixel_values float32
# [batch, num_images, 3, H, W] and pixel_attention_mask bool [batch, num_images, H, W], samples
# with fewer images padded with all-zero images. The traced encoder takes real images only.
LAYOUT_KEY = "vision_input_layout"
LAYOUT_BATCH_IMAGES = "batch_images"  # absent: [real images, ...] with an int64 mask (contract 2)
_PREFIX = "regap_layout/"


def _batch_images_layout(path: Path) -> dict[str, Any]:
    """Rewrite the traced encoder at ``path`` to take transformers.js's layout: in front of the
    traced nodes (unchanged, weights in external data stay where they are), what
    ``Idefics3Model.get_image_features`` does: flatten batch and images, cast the mask, drop
    the all-zero images (keeping the first when every image is padding, as transformers 4.x
    did). Returns the ``regap_onnx.json`` keys that say so."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    by_name = {i.name: i for i in graph.input}
    if set(by_name) != {"pixel_values", "pixel_attention_mask"}:
        raise ValueError(f"{path}: unexpected Idefics3 vision inputs {sorted(by_name)}")
    pv_in = by_name["pixel_values"]
    dims = pv_in.type.tensor_type.shape.dim
    channels, height, width = (d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims[1:])
    inner_pv, inner_mask = _PREFIX + "pixel_values", _PREFIX + "pixel_attention_mask"
    _rename_uses(graph, {"pixel_values": inner_pv, "pixel_attention_mask": inner_mask})

    def name(suffix: str) -> str:
        return _PREFIX + suffix

    const = [
        helper.make_tensor(name("minus_one"), TensorProto.INT64, [1], [-1]),
        helper.make_tensor(name("zero_f"), TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor(name("zero_i"), TensorProto.INT64, [], [0]),
        helper.make_tensor(name("one_i"), TensorProto.INT64, [], [1]),
        helper.make_tensor(name("axes0"), TensorProto.INT64, [1], [0]),
        helper.make_tensor(name("axes123"), TensorProto.INT64, [3], [1, 2, 3]),
    ]
    n = name
    nodes = [
        # [batch, num_images, C, H, W] -> [batch * num_images, C, H, W]; the mask likewise.
        helper.make_node("Shape", ["pixel_values"], [n("pv_tail")], start=2),
        helper.make_node("Concat", [n("minus_one"), n("pv_tail")], [n("pv_shape")], axis=0),
        helper.make_node("Reshape", ["pixel_values", n("pv_shape")], [n("pv_flat")]),
        helper.make_node("Shape", ["pixel_attention_mask"], [n("mask_tail")], start=2),
        helper.make_node("Concat", [n("minus_one"), n("mask_tail")], [n("mask_shape")], axis=0),
        helper.make_node("Reshape", ["pixel_attention_mask", n("mask_shape")], [n("mask_flat")]),
        # real image: not every value 0 (Idefics3Model.get_image_features)
        helper.make_node("Equal", [n("pv_flat"), n("zero_f")], [n("is_zero")]),
        helper.make_node("Not", [n("is_zero")], [n("is_value")]),
        helper.make_node("Cast", [n("is_value")], [n("is_value_i")], to=TensorProto.INT64),
        helper.make_node("ReduceMax", [n("is_value_i"), n("axes123")], [n("real_i")], keepdims=0),
        # ... and when no image is real, the first one (as transformers 4.x did), not an empty batch
        helper.make_node("ReduceMax", [n("real_i")], [n("any_real")], keepdims=0),
        helper.make_node("Shape", [n("real_i")], [n("count")]),
        helper.make_node("Squeeze", [n("count"), n("axes0")], [n("count_s")]),
        helper.make_node("Range", [n("zero_i"), n("count_s"), n("one_i")], [n("index")]),
        helper.make_node("Equal", [n("index"), n("zero_i")], [n("is_first")]),
        helper.make_node("Equal", [n("any_real"), n("zero_i")], [n("none_real")]),
        helper.make_node("And", [n("is_first"), n("none_real")], [n("keep_first")]),
        helper.make_node("Cast", [n("real_i")], [n("real")], to=TensorProto.BOOL),
        helper.make_node("Or", [n("real"), n("keep_first")], [n("keep")]),
        helper.make_node("NonZero", [n("keep")], [n("kept")]),
        helper.make_node("Squeeze", [n("kept"), n("axes0")], [n("kept_index")]),
        helper.make_node("Gather", [n("pv_flat"), n("kept_index")], [inner_pv], axis=0),
        helper.make_node("Cast", [n("mask_flat")], [n("mask_i")], to=TensorProto.INT64),
        helper.make_node("Gather", [n("mask_i"), n("kept_index")], [inner_mask], axis=0),
    ]
    new_pv = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                           ["batch_size", "num_images", channels, height, width])
    new_mask = helper.make_tensor_value_info("pixel_attention_mask", TensorProto.BOOL,
                                             ["batch_size", "num_images", height, width])
    del graph.input[:]
    graph.input.extend([new_pv, new_mask])
    graph.initializer.extend(const)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)
    for output in graph.output:
        shape = output.type.tensor_type.shape
        if len(shape.dim) and shape.dim[0].dim_param:
            shape.dim[0].dim_param = "num_real_images"
    onnx.save(model, str(path))
    return {LAYOUT_KEY: LAYOUT_BATCH_IMAGES, "vision_input_dtypes": ["float32", "bool"]}


def _rename_uses(graph: Any, renames: dict[str, str]) -> None:
    """Point every use of a graph input at its new name (subgraphs included)."""
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in renames:
                node.input[i] = renames[value]
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_uses(sub, renames)


VISION = VisionSpec(
    family="idefics3",
    inputs=("pixel_values", "pixel_attention_mask"),
    encode=_encode,
    sample=_sample,
    input_dtypes=("float32", "int64"),
    patches=patched_bucketize,
    rewrite=_batch_images_layout,
)


IDEFICS3 = register(Idefics3Adapter(
    family="idefics3",
    model_types=("idefics3",),
    language_model_path="model.text_model",
    multimodal=True,
    fallback_chat_template=SMOLVLM_CHAT_TEMPLATE,
    auto_class_name="AutoModelForImageTextToText",
    vision_export={"idefics3": VISION},
    vision_runtime=VisionRuntime(_prepare),
    image_inputs=_image_inputs,
))
