"""Graphs at the precisions users ship (ONNX contract 5, "Precisions"), made from the exported
float32 graphs by ONNX Runtime's own tools (no quantizer of ours):

- ``fp16``: ONNX Runtime's float16 conversion
  (``onnxruntime.transformers.onnx_model.OnnxModel.convert_float_to_float16``: the float16
  converter, then its removal of redundant Casts). The correction runs in float16 like the rest
  of the model, gate included: the same six ops per gated layer as float32 (a float32 gate costs
  two Casts more; the gate error float16 adds, at most 1e-3 on embedded:organism, is below what
  float16 hidden states already carry: METHOD section 6, ``benchmarks/fp16_gate.py``). Pixel
  inputs stay float32 (as transformers.js feeds them) and so do ``regap_image_mask``,
  ``regap_alpha`` and ``regap_score`` (``keep_io_types``); every other floating-point input and
  output is float16;
- ``q4f16``: the fp16 graph with its MatMul weights in 4-bit blocks of 32
  (``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``, symmetric, as
  transformers.js's conversion script does; ONNX Runtime's ``MatMulNBits`` op);
- ``q8`` (transformers.js's ``quantized``): ``onnxruntime.quantization.quantize_dynamic``,
  8-bit MatMul and Gather weights, activations quantized per call;
- ``q4``: the float32 graph with 4-bit MatMul weights (``MatMulNBitsQuantizer``).

The correction's own nodes are never quantized (``nodes_to_exclude``): its constants keep their
names and values (in float16 in the fp16 and q4f16 graphs; ``onnx_graph.correction_values``),
so ``set_correction_values`` still edits them. Files take transformers.js's names (``<name>_fp16.onnx``, ``<name>_q4f16.onnx``,
``<name>_quantized.onnx``, ``<name>_q4.onnx``); each graph's metadata says its precision, and
``regap_onnx.json`` lists the files of each precision under ``precisions``.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import onnx

from ..errors import RegapError
from ..io.artifacts import CONFIG_FILE, read_config
from ..io.progress import quiet
from ..io.graph_metadata import DEFAULT_PRECISION, FLOAT32_IO, PRECISION_KEY, PRECISIONS, precision_file
from .onnx_graph import correction_chains

log = logging.getLogger(__name__)

Q4_BLOCK_SIZE = 32
# Above this many bytes of weights a graph is written with external data (as the exporter does).
EXTERNAL_DATA_BYTES = 64 * 2**20


def parse_precisions(text: str) -> tuple[str, ...]:
    """``"fp32,fp16,q4f16"`` -> the precisions, fp32 first (the others are made from it, and it is
    what clients load by default)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown or not names:
        raise RegapError(f"unknown precision {', '.join(repr(u) for u in unknown) or repr(text)}; "
                         f"choose from {', '.join(PRECISIONS)}", field="--precision")
    return tuple(dict.fromkeys([DEFAULT_PRECISION, *names]))


def write_precisions(folder: Path, precisions: Sequence[str]) -> dict[str, dict[str, str]]:
    """Write the graphs of every precision but fp32 next to the float32 graphs of ``folder``
    (an ``onnx/`` folder the exporter wrote) and list them in its ``regap_onnx.json``."""
    folder = Path(folder)
    config = read_config(folder)
    base = dict(config["files"])
    table = {DEFAULT_PRECISION: base}
    for precision in precisions:
        if precision == DEFAULT_PRECISION:
            continue
        if precision not in PRECISIONS:
            raise RegapError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        files = {}
        for key, name in base.items():
            target = precision_file(name, precision)
            convert_graph(folder / name, folder / target, precision, keep_float32=_float32_io(config, key))
            files[key] = target
        table[precision] = files
    config["precisions"] = table
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return table


def _float32_io(config: dict, key: str) -> list[str]:
    """What stays float32 in a float16 graph: the pixel inputs (transformers.js feeds them so) and
    the correction's own inputs and outputs."""
    if key == "vision_encoder":
        return list(config.get("vision_inputs") or [])
    names = set(config.get("decoder_inputs") or []) | set(config.get("decoder_outputs") or [])
    return [name for name in FLOAT32_IO if name in names]


def correction_node_names(model: onnx.ModelProto) -> list[str]:
    """Every node of every correction (never quantized)."""
    return [node.name for chain in correction_chains(model).values() for node in chain]


def _named(model: onnx.ModelProto) -> None:
    """Give unnamed nodes names (the converters' block and exclude lists go by name)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def convert_graph(source: Path, target: Path, precision: str, *, keep_float32: Sequence[str] = ()) -> Path:
    """``source`` (a float32 graph of this export) at ``precision``, written to ``target``."""
    model = onnx.load(str(source))
    _named(model)
    if precision == "fp16":
        model = _to_fp16(model, keep_float32)
    elif precision == "q4f16":
        model = _to_q4(_to_fp16(model, keep_float32))
    elif precision == "q4":
        model = _to_q4(model)
    elif precision == "q8":
        model = _to_q8(model)
    else:
        raise RegapError(f"unknown precision {precision!r}")
    _set_precision(model, precision)
    _save(model, Path(target))
    return Path(target)


def _to_fp16(model: onnx.ModelProto, keep_float32: Sequence[str]) -> onnx.ModelProto:
    """ONNX Runtime's mixed-precision conversion (``OnnxModel.convert_float_to_float16``: the
    float16 converter, then its removal of the Cast pairs it leaves between float32 nodes)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    with _quiet():
        wrapped.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=list(keep_float32) or False)
    return wrapped.model


def _to_q4(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=Q4_BLOCK_SIZE, is_symmetric=True,
                                     nodes_to_exclude=correction_node_names(model))
    with _quiet():
        quantizer.process()
    return quantizer.model.model


def _to_q8(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic runs ONNX's strict shape inference, which rejects shapes the tracer recorded
    # that it would compute otherwise (Idefics3's float arange counts one boundary more in torch):
    # the intermediate shapes are dropped, as the exporter drops them for ONNX Runtime.
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(source), save_as_external_data=_large(model), location="in.onnx.data")
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, nodes_to_exclude=correction_node_names(model),
                         extra_options={"MatMulConstBOnly": True}, use_external_data_format=_large(model))
        return onnx.load(str(target))


def _set_precision(model: onnx.ModelProto, precision: str) -> None:
    for prop in model.metadata_props:
        if prop.key == PRECISION_KEY:
            prop.value = precision
            return
    raise RegapError("the float32 graph carries no regap.precision metadata: not a graph of this export")


def _large(model: onnx.ModelProto) -> bool:
    return sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES


def _save(model: onnx.ModelProto, target: Path) -> None:
    data = target.with_name(target.name + ".data")
    if data.exists():
        data.unlink()
    if _large(model):
        onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(target))


def _quiet():
    """The converters log every node they touch at INFO and warn about opset upgrades."""
    return quiet("onnxruntime", "onnxruntime.quantization", "root")
