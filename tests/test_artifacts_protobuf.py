"""``artifacts.graph_initializers``, the runtime's own protobuf reader, against the onnx
package on graphs written by onnx itself: every float storage (raw_data, float_data,
double_data, float16 / bfloat16 in raw_data and in int32_data), external data, non-float
initializers, and a damaged file."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from regap_export.io.artifacts import EXTERNAL, graph_initializers
from regap_export.errors import ArtifactError

RNG = np.random.default_rng(0)


def _graph(initializers: list[TensorProto]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y], initializer=initializers)
    return helper.make_model(graph)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_every_float_storage_reads_as_onnx_does(tmp_path):
    f32 = RNG.standard_normal(5).astype(np.float32)
    f16 = RNG.standard_normal(6).astype(np.float16)
    f64 = RNG.standard_normal(3)
    bf16 = RNG.standard_normal(4).astype(np.float32)
    bf16_exact = (_bf16_bits(bf16).astype(np.uint32) << 16).view(np.float32)
    tensors = [
        numpy_helper.from_array(f32, "regap.raw32"),
        helper.make_tensor("regap.list32", TensorProto.FLOAT, [5], f32.tolist()),  # float_data
        numpy_helper.from_array(f16, "regap.raw16"),
        helper.make_tensor("regap.list16", TensorProto.FLOAT16, [6], f16.astype(np.float32).tolist()),  # int32_data
        numpy_helper.from_array(f64, "regap.raw64"),
        helper.make_tensor("regap.list64", TensorProto.DOUBLE, [3], f64.tolist()),
        helper.make_tensor("regap.rawbf16", TensorProto.BFLOAT16, [4], _bf16_bits(bf16).tobytes(), raw=True),
        helper.make_tensor("regap.listbf16", TensorProto.BFLOAT16, [4], bf16_exact.tolist()),  # int32_data
        numpy_helper.from_array(np.arange(4, dtype=np.int64), "regap.ints"),
        numpy_helper.from_array(f32, "other.weight"),
    ]
    path = tmp_path / "g.onnx"
    onnx.save(_graph(tensors), str(path))
    got = {name: (location, values) for name, location, values in graph_initializers(path, prefix="regap.")}
    assert "other.weight" not in got and got["regap.ints"][1] is None
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name in ("regap.raw32", "regap.list32", "regap.raw16", "regap.list16", "regap.raw64", "regap.list64"):
        location, values = got[name]
        assert location == 0
        assert values.dtype == want[name].dtype and np.array_equal(values, want[name].reshape(-1)), name
    assert np.array_equal(got["regap.list16"][1], f16) and np.array_equal(got["regap.list32"][1], f32)
    for name in ("regap.rawbf16", "regap.listbf16"):
        assert np.array_equal(got[name][1], bf16_exact), name


def test_external_data_is_located_not_read(tmp_path):
    big = RNG.standard_normal(4096).astype(np.float32)
    small = RNG.standard_normal(3).astype(np.float32)
    model = _graph([numpy_helper.from_array(big, "regap.big"), numpy_helper.from_array(small, "regap.small")])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="g.onnx.data",
              size_threshold=1024)
    got = {name: (location, values) for name, location, values in graph_initializers(path)}
    assert got["regap.big"] == (EXTERNAL, None)
    assert got["regap.small"][0] == 0 and np.array_equal(got["regap.small"][1], small)


def test_a_damaged_graph_is_an_artifact_error(tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(_graph([numpy_helper.from_array(np.ones(64, np.float32), "regap.v")]), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable ONNX graph"):
        graph_initializers(path)
