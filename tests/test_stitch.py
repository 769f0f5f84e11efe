"""The decoder graph built from one traced block per kind (``export/stitch.py``) against the graph
a trace of every block gives: same structure, same numbers; a wrong stitch is caught; and the
export falls back to tracing every block where the stitcher does not apply."""
from __future__ import annotations

import ast
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from regap_export.errors import ModelError
from regap_export.export import onnx_export, stitch
from regap_export.export.onnx_graph import correction_nodes
from regap_export.method.folding import FIXED, GATED, SCALED, LayerCorrection, ScoreReadout
from regap_export.method.rewrite import insert_corrections
from regap_export.models import adapter_for_model
from regap_export.options import Band, RegapOptions
from tiny_models import build_tiny

DEPTH = 8
# An MLP wide enough that its weights are over the constant folder's input limit, so both ways
# block weights reach the graph are exercised: transposed by the stitcher (large) and folded by
# the optimizer from a recorded recipe (small).
WIDE = 160
EXPORT_ID = "0123456789abcdef"
LAYER_SCOPE = re.compile(r"\.layers\.(\d+)$")


# ----------------------------------------------------------------------------------------
# models and exports
# ----------------------------------------------------------------------------------------
def deep_model(family: str = "llama", mode: str = "regap", layers: int = DEPTH):
    """A tiny model with ``layers`` blocks, every 1-D tensor (norms, biases) random so that no two
    blocks share a value, and corrections: regap = fixed at 2-3 and gated at 5-6; regap-seq =
    scaled at 2-6 with the readout at 3."""
    model, _ = build_tiny(family, layers=layers, intermediate=WIDE)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5, generator=g)
    adapter = adapter_for_model(model)
    hidden = adapter.hidden_size(model)

    def r():
        return torch.randn(hidden, generator=g) * 0.3

    positions = "last+generated" if adapter.multimodal else "all"
    if mode == "regap":
        corrections = [LayerCorrection(i, FIXED, r()) for i in (2, 3)]
        corrections += [LayerCorrection(i, GATED, r(), r(), 0.1 * i - 0.5) for i in (5, 6)]
        readout = None
        options = RegapOptions(mode="regap", probe_band=Band(2, 4), adaptive_band=Band(5, 7), positions=positions)
    else:
        corrections = [LayerCorrection(i, SCALED, r()) for i in range(2, 7)]
        readout = ScoreReadout(layer=3, w=r(), b=0.1, kappa=4.0)
        options = RegapOptions(mode="regap-seq", probe_band=Band(2, 4), adaptive_band=Band(4, 7), alpha0=1.0,
                               alpha_max=1.5, tau=0.5, positions=positions)
    insert_corrections(model, adapter, corrections)
    return model, adapter, readout, options


def export(model, adapter, readout, options, out: Path, *, every_block: bool = False) -> Path:
    """The decoder graph's path; ``every_block``: trace every block (the reference). Every export
    gets one export id, so that the two graphs' metadata can be compared whole."""
    saved = stitch.plan_layers
    if every_block:
        stitch.plan_layers = lambda *a, **k: (None, "the test traces every block")
    try:
        if adapter.multimodal:
            return onnx_export.export_multimodal(model, adapter, out, readout=readout, options=options,
                                                export_id=EXPORT_ID)["decoder"]
        return onnx_export.export_text_decoder(model, adapter, out, readout=readout, options=options,
                                               export_id=EXPORT_ID)
    finally:
        stitch.plan_layers = saved


def run(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Every output of a decoder graph on random inputs: a prefill of 5 tokens after a past of 3,
    batch 2; in graphs that read the modality channel, image rows in the prompt of row 0 and in
    the past of row 1; a random image mask and alpha."""
    config = json.loads((path.parent / "regap_onnx.json").read_text())
    channel = config.get("image_rows") == "channel"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options)
    rng = np.random.default_rng(seed)
    batch, seq, past = 2, 5, 3
    feeds = {}
    for value in session.get_inputs():
        name = value.name
        if name == "input_ids":
            feeds[name] = rng.integers(0, 200, (batch, seq))
        elif name == "inputs_embeds":
            feeds[name] = rng.standard_normal((batch, seq, value.shape[2])).astype(np.float32)
            if channel:
                feeds[name][..., -1] = 0.0
                feeds[name][0, 1:3, -1] = 1.0
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past + seq), np.int64)
        elif name == "position_ids":
            positions = np.tile(np.arange(past, past + seq), (batch, 1))
            feeds[name] = np.stack([positions] * 3) if len(value.shape) == 3 else positions
        elif name == "regap_image_mask":
            feeds[name] = rng.uniform(0, 1, (batch, seq)).astype(np.float32)
        elif name == "regap_alpha":
            feeds[name] = rng.uniform(0.5, 1.5, (batch,)).astype(np.float32)
        elif name.startswith("past_key_values."):
            feeds[name] = rng.standard_normal((batch, value.shape[1], past, value.shape[3])).astype(np.float32)
            if channel and name == "past_key_values.0.key":
                feeds[name][..., -1] = np.array([0.0, 1.0], np.float32)[:, None, None]
        else:
            raise AssertionError(f"unexpected decoder input {name}")
    float16 = {v.name for v in session.get_inputs() if v.type == "tensor(float16)"}
    feeds = {name: value.astype(np.float16) if name in float16 else value for name, value in feeds.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def size_nodes(proto: onnx.ModelProto) -> set[int]:
    """Indices of the nodes that compute sizes: Shape / Size, and nodes whose every input is a
    size or a constant. torch.export chooses which input it reads a size off, and where it computes
    a sum of sizes once for several blocks; a full trace and a stitched one may choose apart."""
    constants = {i.name for i in proto.graph.initializer}
    sizes: set[str] = set()
    out = set()
    for index, node in enumerate(proto.graph.node):
        inputs = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size") or (inputs and all(i in sizes or i in constants for i in inputs)
                                                  and any(i in sizes for i in inputs)):
            sizes.update(node.output)
            out.add(index)
    return out


def layer_ops(proto: onnx.ModelProto, *, sizes: bool = False) -> dict[int | None, Counter]:
    """The op multiset of each block's nodes, by the block scope torch.onnx recorded (None: no
    block); of the nodes that compute sizes (``size_nodes``) or of the others."""
    out: dict[int | None, Counter] = {}
    size = size_nodes(proto)
    for index, node in enumerate(proto.graph.node):
        if (index in size) != sizes:
            continue
        meta = {m.key: m.value for m in node.metadata_props}
        scopes = ast.literal_eval(meta.get(stitch.NAME_SCOPES, "[]"))
        layer = next((int(m.group(1)) for s in scopes for m in [LAYER_SCOPE.search(s)] if m), None)
        out.setdefault(layer, Counter())[node.op_type] += 1
    return out


def assert_same_graph(stitched: Path, reference: Path, *, size_nodes_at_most: bool = True) -> None:
    """``size_nodes_at_most``: the stitched graph's size arithmetic is at most the full trace's."""
    a = onnx.load(str(stitched), load_external_data=False)
    b = onnx.load(str(reference), load_external_data=False)
    assert [v.name for v in a.graph.input] == [v.name for v in b.graph.input]
    assert [v.name for v in a.graph.output] == [v.name for v in b.graph.output]
    assert [str(v.type) for v in a.graph.input] == [str(v.type) for v in b.graph.input]
    assert [str(v.type) for v in a.graph.output] == [str(v.type) for v in b.graph.output]
    assert layer_ops(a) == layer_ops(b)
    # Size arithmetic: at most what the full trace computes (the copies share the traced block's).
    if size_nodes_at_most:
        sizes = [layer_ops(p, sizes=True) for p in (a, b)]
        assert sum(sizes[0].values(), Counter()) <= sum(sizes[1].values(), Counter())
        assert len(a.graph.node) <= len(b.graph.node)
    shapes = [Counter((tuple(i.dims), i.data_type) for i in p.graph.initializer) for p in (a, b)]
    assert shapes[0] == shapes[1]
    assert correction_nodes(a) == correction_nodes(b)
    assert {p.key: p.value for p in a.metadata_props} == {p.key: p.value for p in b.metadata_props}


def assert_same_outputs(stitched: Path, reference: Path) -> None:
    got, want = run(stitched), run(reference)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def export_stitched(built, out: Path) -> Path:
    """``export`` that fails unless the decoder was built from one traced block per kind (the
    comparisons would otherwise compare two full traces)."""
    logger = logging.getLogger("regap_export")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        path = export(*built, out)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    assert any("the others copied" in m for m in messages), messages
    return path


def at_precision(decoder: Path, precision: str) -> Path:
    """The decoder graph of ``decoder``'s export at ``precision``, made by the export's converters."""
    from regap_export.export.precision import write_precisions
    from regap_export.io.graph_metadata import precision_file

    write_precisions(decoder.parent, (precision,))
    return decoder.with_name(precision_file(decoder.name, precision))


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory):
    """The deep Llama (regap) exported both ways: (stitched decoder, every block traced)."""
    root = tmp_path_factory.mktemp("stitch-llama")
    built = deep_model()
    stitched = export_stitched(built, root / "stitched")
    reference = export(*built, root / "reference", every_block=True)
    return stitched, reference


@pytest.fixture(scope="module")
def idefics3_exports(tmp_path_factory):
    """The deep Idefics3 (regap, image rows from the modality channel) exported both ways."""
    root = tmp_path_factory.mktemp("stitch-idefics3")
    built = deep_model("idefics3")
    stitched = export_stitched(built, root / "stitched")
    reference = export(*built, root / "reference", every_block=True)
    return stitched, reference


# ----------------------------------------------------------------------------------------
# which blocks are traced
# ----------------------------------------------------------------------------------------
def test_plan_traces_one_block_and_one_correction_per_kind():
    model, adapter, _, _ = deep_model()
    plan, reason = stitch.plan_layers(adapter.decoder_layers(model))
    assert reason == ""
    block, fixed, gated = (stitch.Element(0, stitch.BLOCK), stitch.Element(2, stitch.CORRECTION),
                           stitch.Element(5, stitch.CORRECTION))
    assert plan.elements == (block, fixed, gated)
    assert plan.layers == ((0, None), (0, None), (0, 1), (0, 1), (0, None), (0, 2), (0, 2), (0, None))
    # a wrapper that handles block 0's cache itself (the modality channel): block 0 is traced whole
    plan, _ = stitch.plan_layers(adapter.decoder_layers(model), first_is_special=True)
    assert plan.elements == (stitch.Element(0, stitch.WHOLE), stitch.Element(1, stitch.BLOCK), fixed, gated)
    assert [b for b, _ in plan.layers] == [0, 1, 1, 1, 1, 1, 1, 1]


def test_plan_gives_the_readout_its_own_element_and_keeps_the_attention_kinds():
    model, adapter, readout, _ = deep_model(mode="regap-seq")
    plan, _ = stitch.plan_layers(adapter.decoder_layers(model), readout_layer=readout.layer)
    assert plan.elements == (stitch.Element(0, stitch.BLOCK), stitch.Element(2, stitch.CORRECTION),
                             stitch.Element(3, stitch.CORRECTION))
    assert plan.layers[3] == (0, 2) and plan.layers[4] == (0, 1)
    # gemma2 alternates sliding and global attention: blocks of the two types are two kinds
    gemma, _ = build_tiny("gemma2", layers=DEPTH)
    blocks = adapter_for_model(gemma).decoder_layers(gemma)
    plan, _ = stitch.plan_layers(blocks)
    assert [e.layer for e in plan.elements] == [0, 1]
    for i, (element, _) in enumerate(plan.layers):
        assert blocks[plan.elements[element].layer].self_attn.layer_type == blocks[i].self_attn.layer_type


def test_block_kind_ignores_the_position_and_sees_what_the_block_computes():
    model, _ = build_tiny("llama", layers=4)
    blocks = adapter_for_model(model).decoder_layers(model)
    assert stitch.block_kind(blocks[1]) == stitch.block_kind(blocks[2])
    blocks[2].self_attn.scaling *= 2
    assert stitch.block_kind(blocks[1]) != stitch.block_kind(blocks[2])


def test_plan_refuses_when_nothing_repeats_or_blocks_share_a_tensor():
    model, _ = build_tiny("llama", layers=4)
    blocks = adapter_for_model(model).decoder_layers(model)
    plan, _ = stitch.plan_layers(blocks)
    assert plan.elements == (stitch.Element(0, stitch.BLOCK),)
    for i in (1, 2, 3):
        blocks[i].self_attn.scaling *= i + 1
    plan, reason = stitch.plan_layers(blocks)
    assert plan is None and reason == "no two of the 4 blocks are of one kind"
    blocks[2].mlp.up_proj.weight = blocks[1].mlp.up_proj.weight
    plan, reason = stitch.plan_layers(blocks)
    assert plan is None and reason == "blocks 1 and 2 share a tensor"


def test_plan_traces_whole_the_model_types_whose_copies_were_measured_to_differ():
    model, _ = build_tiny("llama", layers=4)
    blocks = adapter_for_model(model).decoder_layers(model)
    assert stitch.plan_layers(blocks, model_type="llama")[0] is not None
    plan, reason = stitch.plan_layers(blocks, model_type="gemma3_text")
    assert plan is None and reason == stitch.TRACED_WHOLE["gemma3_text"]


def test_truncation_is_undone():
    model, adapter, _, _ = deep_model()
    blocks = adapter.decoder_layers(model)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    plan, _ = stitch.plan_layers(blocks)
    with stitch.truncated(model, adapter, plan):
        kept = adapter.decoder_layers(model)
        assert len(kept) == 3 and model.config.num_hidden_layers == 3
        assert kept[0] is blocks[0] and kept[1].correction is blocks[2].correction
        assert kept[2].correction is blocks[5].correction and kept[2].self_attn is blocks[5].block.self_attn
        assert not torch.equal(kept[0].input_layernorm.weight, before["model.layers.0.input_layernorm.weight"])
    assert adapter.decoder_layers(model) is blocks and model.config.num_hidden_layers == DEPTH
    assert [b.self_attn.layer_idx for b in blocks] == list(range(DEPTH))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------
# the stitched graph is the full trace
# ----------------------------------------------------------------------------------------
def test_stitched_graph_has_the_structure_of_the_full_trace(llama_exports):
    assert_same_graph(*llama_exports)


def test_stitched_graph_computes_what_the_full_trace_computes(llama_exports):
    assert_same_outputs(*llama_exports)


def test_each_block_gets_its_own_weights_cache_and_corrections(llama_exports):
    stitched, _ = llama_exports
    proto = onnx.load(str(stitched), load_external_data=False)
    names = {i.name for i in proto.graph.initializer}
    for layer in range(DEPTH):
        prefix = f"model.model.layers.{layer}."
        assert sum(n.startswith(prefix) for n in names) >= 9, layer    # 7 projections and 2 norms
    for layer in (2, 3):
        assert f"regap.{layer}.v" in names
    for layer in (5, 6):
        assert {f"regap.{layer}.{k}" for k in "wbv"} <= names
    # every present depends on its own past
    assert not onnx_export.presents_cut_from_past(ir.load(str(stitched)).graph, DEPTH)


def test_a_copy_with_another_blocks_weights_is_caught(llama_exports, tmp_path, monkeypatch):
    """The comparison above fails for a stitch that gives copied blocks 3 and 6 the weights of
    the block before them (of their kind, so that the graph is still complete)."""
    _, reference = llama_exports
    real = stitch._Weights.tensor
    monkeypatch.setattr(stitch._Weights, "tensor", lambda self, layer, part, suffix: real(
        self, layer - 1 if layer in (3, 6) else layer, part, suffix))
    stitched = export(*deep_model(), tmp_path / "out")
    with pytest.raises(AssertionError):
        assert_same_outputs(stitched, reference)
    got, want = run(stitched), run(reference)
    assert np.array_equal(got["present.2.key"], want["present.2.key"])
    assert not np.allclose(got["present.3.key"], want["present.3.key"], atol=1e-3)


def test_a_copy_wired_to_another_cache_is_refused(tmp_path, monkeypatch):
    """A copied block that reads another block's past (here its own key and value swapped) is
    refused by the export's cache-flow check, naming the present."""
    real = stitch._Builder.copy

    def swapped(self, t, nodes, layer, hidden_in):
        out = real(self, t, nodes, layer, hidden_in)
        if layer == 4:
            key, value = out[1]
            key.name, value.name = "past_key_values.4.value", "past_key_values.4.key"
        return out
    monkeypatch.setattr(stitch._Builder, "copy", swapped)
    with pytest.raises(ModelError, match="present.4.key, present.4.value do not depend on the past inputs"):
        export(*deep_model(), tmp_path / "out")


def test_unrecognised_structure_falls_back_to_every_block(tmp_path, monkeypatch, caplog):
    def refuse(self, t):
        raise stitch.NotStitchable("a test's reason")
    monkeypatch.setattr(stitch._Traced, "_element_output", refuse)
    built = deep_model()
    with caplog.at_level(logging.WARNING, logger="regap_export"):
        path = export(*built, tmp_path / "out")
    assert "a test's reason" in caplog.text and "tracing all 8 blocks" in caplog.text
    run(path)  # a complete graph


def test_the_image_channel_graph_is_stitched_and_equals_the_full_trace(idefics3_exports):
    stitched, reference = idefics3_exports
    config = json.loads((stitched.parent / "regap_onnx.json").read_text())
    assert config["image_rows"] == "channel" and config["key_dim"][0] == config["head_dim"][0] + 1
    assert_same_graph(stitched, reference)
    assert_same_outputs(stitched, reference)
    got, want = run(stitched), run(reference)
    # block 0 writes the flag channel into its keys: image rows in row 0's prompt, row 1's past
    assert np.array_equal(got["present.0.key"][..., -1], want["present.0.key"][..., -1])
    assert got["present.0.key"][..., -1].any() and not got["present.0.key"][..., -1].all()


@pytest.mark.parametrize("precision", ["fp16", "q4f16", "q8", "q4"])
@pytest.mark.parametrize("family", ["llama", "idefics3"])
def test_every_precision_of_the_stitched_graph_is_the_full_traces(family, precision, request):
    """The converters make the same graph of both: the same ops per block, the same correction
    nodes, and the same outputs."""
    stitched, reference = (at_precision(path, precision) for path in request.getfixturevalue(f"{family}_exports"))
    assert_same_graph(stitched, reference)
    got, want = run(stitched), run(reference)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ----------------------------------------------------------------------------------------
# every family, both correction layouts
# ----------------------------------------------------------------------------------------
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "llava", "llava_next", "idefics3",
            "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.matrix
@pytest.mark.parametrize("mode", ["regap", "regap-seq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stitched_graph_equals_the_full_trace_in_every_family(family, mode, tmp_path, caplog):
    layers = 12 if family.startswith("gemma") else DEPTH    # gemma alternates kinds: deeper for copies
    built = deep_model(family, mode, layers)
    with caplog.at_level(logging.INFO, logger="regap_export"):
        stitched = export(*built, tmp_path / "stitched")
    from regap_export.export.stitch import TRACED_WHOLE

    assert ("tracing every decoder block" if family in TRACED_WHOLE else "the others copied") in caplog.text
    reference = export(*built, tmp_path / "reference", every_block=True)
    assert_same_graph(stitched, reference)
    assert_same_outputs(stitched, reference)


# ----------------------------------------------------------------------------------------
# a real model
# ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_organisms_stitched_decoder_equals_its_full_trace(tmp_path):
    """embedded:organism (SmolVLM's decoder, image rows from the modality channel) with fixed and
    gated corrections in two bands, exported both ways."""
    from regap_export.models.loading import load_model

    loaded = load_model("embedded:organism")
    model, adapter = loaded.model, loaded.adapter
    n, hidden = adapter.num_layers(model), adapter.hidden_size(model)
    g = torch.Generator().manual_seed(11)
    probe, adaptive = Band(n // 3, n // 2), Band(n // 2, 3 * n // 4)
    corrections = [LayerCorrection(i, FIXED, torch.randn(hidden, generator=g) * 0.1) for i in probe.layers()]
    corrections += [LayerCorrection(i, GATED, torch.randn(hidden, generator=g) * 0.1,
                                    torch.randn(hidden, generator=g) * 0.1, 0.2) for i in adaptive.layers()]
    insert_corrections(model, adapter, corrections)
    options = RegapOptions(mode="regap", probe_band=probe, adaptive_band=adaptive, positions="last+generated")
    built = (model, adapter, None, options)
    stitched = export_stitched(built, tmp_path / "stitched")
    reference = export(*built, tmp_path / "reference", every_block=True)
    assert_same_outputs(stitched, reference)
    # Here each copied block computes a few sizes (Shape, Squeeze, Add, Reshape, Concat: about six
    # nodes) from its own input that the full trace computes once for every block.
    assert_same_graph(stitched, reference, size_nodes_at_most=False)
