"""The KV cache reaches the model and the exported decoder.

transformers 5.24 takes the cache as ``cache=``; 5.17 (the CUDA image's) only as
``past_key_values=`` and passes an unknown ``cache=`` on where nothing reads it. Exports made
there ignored their past: prefill matched, every decode step attended to the new token alone.
``with_cache`` picks the keyword the forward takes; the exporter refuses a decoder whose
presents do not depend on their past inputs.
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import regap_export.export.onnx_export as onnx_export
from regap_export.errors import ModelError
from regap_export.export.onnx_export import export_text_decoder, presents_cut_from_past
from regap_export.models.base import with_cache

from onnx_exports import llama_adapter, tiny_llama


class TakesCache:
    def forward(self, input_ids=None, cache=None, past_key_values=None, **kwargs):
        return None


class TakesPastKeyValues:
    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        return None


def test_with_cache_uses_the_keyword_the_forward_takes():
    cache = object()
    assert with_cache(TakesCache(), cache) == {"cache": cache}
    assert with_cache(TakesPastKeyValues(), cache) == {"past_key_values": cache}


def _graph(value_from_past: bool) -> ir.Graph:
    def info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, None, 4])
    names = ["past_key_values.0.key", "past_key_values.0.value", "new"]
    nodes = [helper.make_node("Relu", ["new"], ["rotated"]),
             helper.make_node("Concat", ["past_key_values.0.key", "rotated"], ["present.0.key"], axis=2)]
    if value_from_past:
        nodes.append(helper.make_node("Concat", ["past_key_values.0.value", "new"], ["present.0.value"], axis=2))
    else:
        nodes.append(helper.make_node("Identity", ["new"], ["present.0.value"]))
    graph = helper.make_graph(nodes, "g", [info(n) for n in names], [info("present.0.key"), info("present.0.value")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])).graph


def test_presents_cut_from_their_past_are_found():
    assert presents_cut_from_past(_graph(value_from_past=True), 1) == []
    assert presents_cut_from_past(_graph(value_from_past=False), 1) == ["present.0.value"]


def test_export_refuses_a_decoder_that_ignores_its_cache(tmp_path, monkeypatch):
    model = tiny_llama()
    # What transformers 5.17 did with cache=: a keyword the model never reads.
    monkeypatch.setattr(onnx_export, "with_cache", lambda model, cache: {"unread_cache": cache})
    with pytest.raises(ModelError, match="ignores its KV cache"):
        export_text_decoder(model, llama_adapter(model), tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_export_keeps_the_cache(tmp_path):
    model = tiny_llama()
    export_text_decoder(model, llama_adapter(model), tmp_path / "onnx")
    proto = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    assert presents_cut_from_past(ir.from_proto(proto).graph, model.config.num_hidden_layers) == []
