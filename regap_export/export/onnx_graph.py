"""Reading and editing exported ONNX graphs: the ``regap.*`` correction initializers.

Everything here works on an ``onnx.ModelProto`` (or a path to one) and never needs the
weights themselves: models with external data are loaded without it.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import numpy_helper

OnnxLike = Union[onnx.ModelProto, str, Path]

CORRECTION_NAME = re.compile(r"^regap\.(\d+)\.(w|b|v)$")
SCORE_W, SCORE_B = "regap.score.w", "regap.score.b"


def public_name(layer: int, tensor: str) -> str:
    """The public initializer name of one correction constant (``w``, ``b`` or ``v``)."""
    return f"regap.{layer}.{tensor}"


def load_graph(model: OnnxLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


def correction_initializer_names(model: OnnxLike) -> dict[int, dict[str, str]]:
    """``{layer: {"w"|"b"|"v": initializer name}}`` for every ``regap.{layer}.*`` initializer."""
    proto = load_graph(model)
    out: dict[int, dict[str, str]] = defaultdict(dict)
    for init in proto.graph.initializer:
        m = CORRECTION_NAME.match(init.name)
        if m:
            out[int(m.group(1))][m.group(2)] = init.name
    return dict(sorted(out.items()))


def _index(proto: onnx.ModelProto):
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producer: dict[str, onnx.NodeProto] = {}
    for node in proto.graph.node:
        for name in node.input:
            if name:
                consumers[name].append(node)
        for name in node.output:
            producer[name] = node
    return consumers, producer


def _only(nodes: list[onnx.NodeProto], op_type: str, what: str) -> onnx.NodeProto:
    hits = [n for n in nodes if n.op_type == op_type]
    if len(hits) != 1:
        raise ValueError(f"expected one {op_type} node {what}, found {[n.op_type for n in nodes]}")
    return hits[0]


def _cast_to(node: onnx.NodeProto) -> int | None:
    for attr in node.attribute:
        if attr.name == "to":
            return attr.i
    return None


def correction_chains(model: OnnxLike) -> dict[int, list[onnx.NodeProto]]:
    """The nodes of every correction, in execution order, keyed by layer.

    gated:  [Cast] MatMul(h, w) -> Add(., b) -> Sigmoid -> Mul(., m) -> Mul(., v) -> Add(h, .) [Cast]
    fixed:  Mul(m, v) -> Add(h, .)
    scaled: [Cast] Mul(s, v) -> Add(h, .) [Cast]

    m is the image mask [batch, seq, 1] (``regap_image_mask``, or built from the modality
    channel) and s = alpha * m: both are computed once per graph and shared by every layer, so
    they are not part of a chain. The graphs of every ``--precision`` have exactly these ops (a
    float16 graph computes its correction in float16). The Casts appear only in graphs traced in
    half precision by the library (``export_text_decoder(dtype=torch.float16)``), which compute
    the correction in float32: one into float32 before, one back after.
    Raises ``ValueError`` when a correction is not in its folded form.
    """
    proto = load_graph(model)
    consumers, producer = _index(proto)
    chains: dict[int, list[onnx.NodeProto]] = {}
    for layer, names in correction_initializer_names(proto).items():
        v_users = consumers.get(names.get("v", ""), [])
        if "v" not in names or len(v_users) != 1:
            raise ValueError(f"regap.{layer}.v must feed exactly one node, feeds {len(v_users)}")
        scale_v = v_users[0]
        if scale_v.op_type != "Mul":
            raise ValueError(f"regap.{layer}.v feeds a {scale_v.op_type}, expected Mul")
        residual = _only(consumers.get(scale_v.output[0], []), "Add", f"after layer {layer}'s Mul by v")
        h = next(i for i in residual.input if i != scale_v.output[0])
        if "w" in names:  # gated
            if "b" not in names:
                raise ValueError(f"regap.{layer}.w without regap.{layer}.b")
            matmul = _only(consumers.get(names["w"], []), "MatMul", f"consuming regap.{layer}.w")
            add_b = _only(consumers.get(matmul.output[0], []), "Add", f"after layer {layer}'s MatMul")
            if names["b"] not in add_b.input:
                raise ValueError(f"layer {layer}: the Add after the MatMul does not add regap.{layer}.b")
            sigmoid = _only(consumers.get(add_b.output[0], []), "Sigmoid", f"after layer {layer}'s gate Add")
            mask_mul = _only(consumers.get(sigmoid.output[0], []), "Mul", f"after layer {layer}'s Sigmoid")
            if mask_mul.output[0] not in scale_v.input:
                raise ValueError(f"layer {layer}: the masked gate does not scale regap.{layer}.v")
            if matmul.input[0] != h:
                raise ValueError(f"layer {layer}: the residual Add does not add the gate's input")
            chain = [matmul, add_b, sigmoid, mask_mul, scale_v, residual]
        else:
            chain = [scale_v, residual]
        # Traced in half precision: h cast into float32 before the chain, the sum cast back after.
        traced = producer.get(h)
        if traced is not None and traced.op_type == "Cast" and _cast_to(traced) == onnx.TensorProto.FLOAT:
            chain.insert(0, traced)
            tail_users = consumers.get(residual.output[0], [])
            if len(tail_users) == 1 and tail_users[0].op_type == "Cast":
                chain.append(tail_users[0])
        chains[layer] = chain
    return chains


def correction_nodes(model: OnnxLike) -> dict[int, list[str]]:
    """``{layer: [op_type, ...]}``: the ops of each correction, in order (see ``correction_chains``).

    The graphs of every ``--precision`` give ``["MatMul", "Add", "Sigmoid", "Mul", "Mul", "Add"]``
    per gated layer and ``["Mul", "Add"]`` per fixed or scaled layer; a graph traced in float16 adds
    a ``Cast`` at each end of a gated or scaled chain.
    """
    return {layer: [n.op_type for n in chain] for layer, chain in correction_chains(model).items()}


def correction_values(model: OnnxLike, directory: Path | None = None) -> dict[int, dict[str, np.ndarray]]:
    """The values of the ``regap.{layer}.*`` initializers (reads external data when needed)."""
    if isinstance(model, (str, Path)):
        directory = Path(model).parent
        proto = onnx.load(str(model), load_external_data=False)
    else:
        proto = model
    wanted = {init.name: init for init in proto.graph.initializer if CORRECTION_NAME.match(init.name)}
    out: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    for name, init in wanted.items():
        if init.data_location == onnx.TensorProto.EXTERNAL:
            if directory is None:
                raise ValueError(f"{name} lives in external data; pass the model's directory")
            onnx.external_data_helper.load_external_data_for_tensor(init, str(directory))
        m = CORRECTION_NAME.match(name)
        out[int(m.group(1))][m.group(2)] = numpy_helper.to_array(init)
    return dict(sorted(out.items()))


def set_correction_values(path: Path, values: dict[int, dict[str, np.ndarray]], out_path: Path | None = None) -> Path:
    """Overwrite ``regap.{layer}.*`` initializers in a saved graph (small graphs only: the
    whole model is loaded). Shapes and dtypes must stay the same."""
    path = Path(path)
    proto = onnx.load(str(path))
    by_name = {init.name: init for init in proto.graph.initializer}
    for layer, tensors in values.items():
        for key, array in tensors.items():
            name = public_name(layer, key)
            if name not in by_name:
                raise KeyError(f"{name} is not an initializer of {path.name}")
            old = by_name[name]
            array = np.asarray(array)
            ref = numpy_helper.to_array(old)
            if ref.shape != array.reshape(ref.shape).shape:
                raise ValueError(f"{name}: shape {array.shape} does not fit {ref.shape}")
            old.CopyFrom(numpy_helper.from_array(array.reshape(ref.shape).astype(ref.dtype), name))
    target = Path(out_path) if out_path is not None else path
    onnx.save(proto, str(target))
    return target
