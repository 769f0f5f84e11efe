"""The Idefics3 / SmolVLM vision encoder in transformers.js's input layout.

transformers.js 4.x feeds the Idefics3 image processor's output unchanged: ``pixel_values``
float32 [batch, num_images, 3, H, W] and ``pixel_attention_mask`` bool [batch, num_images, H, W],
where samples with fewer images are padded with all-zero images. The traced encoder takes
only real images, [n, 3, H, W] and an int64 mask [n, H, W]. ``wrap_vision_encoder`` puts in
front of it what transformers' ``Idefics3Model.get_image_features`` does: flatten batch and
images, cast the mask, drop the all-zero images (keeping the first when every image is
padding, as transformers 4.x did). The traced nodes and weights are unchanged.

``runtime_feeds`` turns the runtime's real-images feeds into that layout (numpy only; the
runtime imports it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VISION_FILE = "vision_encoder.onnx"
CONFIG_FILE = "regap_onnx.json"
LAYOUT_KEY = "vision_input_layout"
# [batch, num_images, ...] with padding images (transformers.js); absent: [real images, ...].
LAYOUT_BATCH_IMAGES = "batch_images"
_PREFIX = "regap_layout/"


def runtime_feeds(config: dict[str, Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The vision encoder's feeds for this export's layout: real images [n, ...] (and an
    int64 mask) become one sample of n images with a bool mask."""
    if config.get(LAYOUT_KEY) != LAYOUT_BATCH_IMAGES:
        return feeds
    return {"pixel_values": np.ascontiguousarray(feeds["pixel_values"][None], dtype=np.float32),
            "pixel_attention_mask": np.ascontiguousarray(feeds["pixel_attention_mask"][None].astype(np.bool_))}


def wrap_vision_encoder(onnx_dir: Path) -> None:
    """Rewrite ``onnx_dir/vision_encoder.onnx`` (Idefics3) to take transformers.js's layout,
    and record it in ``regap_onnx.json``. Weights stored as external data stay where they are."""
    import json

    import onnx
    from onnx import TensorProto, helper

    onnx_dir = Path(onnx_dir)
    path = onnx_dir / VISION_FILE
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

    config_path = onnx_dir / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config[LAYOUT_KEY] = LAYOUT_BATCH_IMAGES
    config["vision_input_dtypes"] = ["float32", "bool"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _rename_uses(graph: Any, renames: dict[str, str]) -> None:
    """Point every use of a graph input at its new name (subgraphs included)."""
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in renames:
                node.input[i] = renames[value]
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_uses(sub, renames)
