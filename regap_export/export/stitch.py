"""A decoder graph from one traced block per kind: trace a truncated model, copy its blocks.

A decoder is mostly the same block again and again, and ``torch.onnx.export`` traces, decomposes
and optimizes every one of them, so the export's time grows with depth. Here the exporter traces
the same ``DecoderWrapper`` on a *truncated* model (``plan_layers``, ``truncated``) that holds
one element of each kind:

- a *block*: the first decoder block of each kind, without its correction layer;
- a *correction*: the correction layer of the first corrected block of each kind, behind a block
  that passes its input through (so tracing it costs a few ops, not a block);
- a *whole* block, correction included, where a block must be itself: block 0 when the wrapper
  handles its cache (the image flag in its keys, for graphs that read the modality channel), and regap-seq's readout block when it has
  no correction of its own (its output feeds ``regap_score``; a corrected readout block gets a
  correction element of its own, which the readout reads).

``expand`` then builds the full graph from that trace: every decoder block is its block element
(copied, or in place for the block it was taken from) followed by its correction element (the
same), with its own weights (taken from the torch tensors), its own ``past_key_values.{i}`` /
``present.{i}`` names and correction constants ``regap.{i}.*``, the hidden state chained from
block to block, and the values the blocks share (attention masks, rotary tables, shape
arithmetic, the image mask) read from the one place the trace computes them. The graph is the
one a trace of every block gives: the same ops in every block, the same inputs and outputs in the
same order, the same per-node module scopes (tests/test_stitch.py checks it against a full
trace in every family, and its outputs numerically).

What makes two blocks (or two correction layers) one kind (``block_kind``): the same module
classes and tensor shapes and dtypes, and the same plain attributes on every submodule
(attention type, sliding window, head counts, correction kind, ...) except the ones that give a
block's place in the stack (``layer_idx``, a correction's ``layer``), which are renumbered while
tracing.

Weights: the traced elements' weights are never written from the trace. While tracing, every
small tensor of a traced block carries a unique random value (so that the optimizer's
de-duplication of equal initializers cannot merge two blocks' norms, which real models never
share but freshly initialized ones do), the optimizer is kept from transposing the large ones (so
the trace holds no second copy of the traced blocks' weights), and every constant it folds from a
block's tensor is recorded as a recipe. Each block's initializers are then lazy tensors computed
from that block's torch tensors by the same recipes (or the transposes the optimizer would have
folded) when the graph is written, one tensor at a time.

When the traced graph is not in a form this module recognises (an element that reads another
element's values, passes more than its hidden state on, or a folded weight without a recipe),
``expand`` raises ``NotStitchable`` with the reason, and the exporter traces every block instead.
"""
from __future__ import annotations

import ast
import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..method.correction import RegapCorrection
from ..method.rewrite import CorrectedBlock
from ..models.base import ModelAdapter
from .onnx_graph import CORRECTION_NAME, public_name

# Per-node metadata written by torch.onnx: the module scopes a node was traced in (and, in
# step, the classes of those modules and the namespace that joins both).
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
NAMESPACE = "namespace"
# onnxscript's constant folder: the names a folded constant was computed from.
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
# onnxscript's constant folder folds no node with an input larger than this (elements), except a
# Transpose that is its input's only consumer (onnxscript.optimizer._constant_folding).
FOLD_INPUT_LIMIT = 8192
# Attributes that give a block's place in the stack, not what it computes.
_POSITION_ATTRIBUTES = frozenset({"layer_idx", "layer", "training"})
_CORRECTED_BLOCK = f"{CorrectedBlock.__module__}.{CorrectedBlock.__qualname__}"

WHOLE, BLOCK, CORRECTION = "whole", "block", "correction"


# Model types whose decoder is traced whole, and why: their copied blocks were measured to differ
# from the full trace (tests/test_stitch.py compares every family op for op).
TRACED_WHOLE = {
    "gemma3_text": "gemma3_text's copied blocks hold one more Where than its traced blocks "
                   "(the sliding-window mask), so its decoder is traced whole",
}


class NotStitchable(Exception):
    """The traced graph is not in the form ``expand`` knows; the message says why."""


@dataclass(frozen=True)
class Element:
    """One module of the truncated model: ``part`` (``WHOLE``, ``BLOCK`` or ``CORRECTION``) of
    the full model's block ``layer``."""

    layer: int
    part: str


@dataclass(frozen=True)
class LayerPlan:
    """``elements``: the truncated model's decoder modules, in order. ``layers``: for every block
    of the full model, the element of its block (or the whole block) and the element of its
    correction (None: uncorrected, or whole)."""

    elements: tuple[Element, ...]
    layers: tuple[tuple[int, int | None], ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def describe(self) -> str:
        blocks = [e.layer for e in self.elements if e.part != CORRECTION]
        corrections = [e.layer for e in self.elements if e.part == CORRECTION]
        return f"blocks {blocks} and the corrections of {corrections}" if corrections else f"blocks {blocks}"


# ======================================================================================
# what to trace
# ======================================================================================
def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


def block_kind(module: nn.Module) -> tuple:
    """What a traced module's graph depends on: per submodule its class, its tensors' names,
    shapes and dtypes, and its plain attributes but those in ``_POSITION_ATTRIBUTES``."""
    parts = []
    for name, sub in module.named_modules():
        attributes = tuple(sorted((key, repr(value)) for key, value in vars(sub).items()
                                  if not key.startswith("_") and key not in _POSITION_ATTRIBUTES and _plain(value)))
        tensors = tuple((n, tuple(t.shape), str(t.dtype))
                        for n, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)])
        parts.append((name, type(sub).__module__, type(sub).__qualname__, attributes, tensors))
    return tuple(parts)


def _split(block: nn.Module) -> tuple[nn.Module, RegapCorrection | None]:
    if isinstance(block, CorrectedBlock):
        return block.block, block.correction
    return block, None


def plan_layers(blocks: Sequence[nn.Module], *, readout_layer: int | None = None,
                first_is_special: bool = False, model_type: str | None = None) -> tuple[LayerPlan | None, str]:
    """What to trace, or ``(None, why not)`` when tracing a subset would not save anything, the
    blocks cannot be told apart safely or ``model_type`` is in ``TRACED_WHOLE``. ``first_is_special``:
    the decoder wrapper reads or writes block 0's cache itself (block 0 is traced whole and copied
    to no other block)."""
    if model_type in TRACED_WHOLE:
        return None, TRACED_WHOLE[model_type]
    n = len(blocks)
    owners: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for tensor in [*block.parameters(), *block.buffers()]:
            if owners.setdefault(id(tensor), i) != i:
                return None, f"blocks {owners[id(tensor)]} and {i} share a tensor"
    elements: list[Element] = []
    index: dict[Any, int] = {}

    def element(key: Any, layer: int, part: str) -> int:
        if key not in index:
            index[key] = len(elements)
            elements.append(Element(layer, part))
        return index[key]

    layers = []
    for i, block in enumerate(blocks):
        inner, correction = _split(block)
        if (i == 0 and first_is_special) or (i == readout_layer and correction is None):
            layers.append((element((WHOLE, i), i, WHOLE), None))
            continue
        block_element = element((BLOCK, block_kind(inner)), i, BLOCK)
        correction_element = None
        if correction is not None:
            key = (CORRECTION, "readout") if i == readout_layer else (CORRECTION, block_kind(correction))
            correction_element = element(key, i, CORRECTION)
        layers.append((block_element, correction_element))
    if sum(e.part != CORRECTION for e in elements) == n:
        return None, f"no two of the {n} blocks are of one kind"
    return LayerPlan(tuple(elements), tuple(layers)), ""


# ======================================================================================
# the truncated model
# ======================================================================================
class _PassThrough(nn.Module):
    """The block under a traced correction element: returns its input hidden state. Attributes
    the decoder reads off its blocks (``attention_type``, ...) come from the block it stands for,
    which is not a submodule (its weights are not traced)."""

    def __init__(self, stands_for: nn.Module):
        super().__init__()
        self.__dict__["_stands_for"] = stands_for

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_stands_for"], name)


@dataclass
class Truncation:
    """What ``truncated`` changed, for ``optimizer`` and ``expand``."""

    plan: LayerPlan
    layers_path: str                       # the decoder ModuleList's path in the model, e.g. "model.layers"
    blocks: Sequence[nn.Module]            # the full model's blocks
    records: dict[str, "_Folded"] = field(default_factory=dict)

    def readout_element(self, readout_layer: int) -> int:
        """The element whose output regap-seq's score reads."""
        block_element, correction_element = self.plan.layers[readout_layer]
        return block_element if correction_element is None else correction_element


@contextlib.contextmanager
def truncated(model: nn.Module, adapter: ModelAdapter, plan: LayerPlan) -> Iterator[Truncation]:
    """While inside, ``model``'s decoder is the plan's elements: its ModuleList,
    ``num_hidden_layers`` and every per-layer list of its text config (``layer_types``, ...) are
    cut to them, their ``layer_idx`` renumbered 0, 1, ..., and the small floating-point tensors of
    their blocks (correction constants aside, which the exporter's own sentinels hold) carry unique
    random values. Everything is put back on the way out."""
    language_model = adapter.language_model(model)
    blocks = adapter.decoder_layers(model)
    modules = []
    for e in plan.elements:
        inner, correction = _split(blocks[e.layer])
        if e.part == WHOLE:
            modules.append(blocks[e.layer])
        elif e.part == BLOCK:
            modules.append(inner)
        else:
            modules.append(CorrectedBlock(_PassThrough(inner), correction))
    kept = nn.ModuleList(modules)
    undo: list[Callable[[], None]] = []
    try:
        setattr(language_model, adapter.layers_attr, kept)
        undo.append(lambda: setattr(language_model, adapter.layers_attr, blocks))
        _truncate_configs(model, adapter, language_model, plan, undo)
        for t, module in enumerate(kept):
            for sub in module.modules():
                if isinstance(getattr(sub, "layer_idx", None), int):
                    undo.append(lambda m=sub, v=sub.layer_idx: setattr(m, "layer_idx", v))
                    sub.layer_idx = t
        _small_tensor_sentinels(kept, undo)
        path = next(name for name, module in model.named_modules() if module is kept)
        yield Truncation(plan, path, blocks)
    finally:
        for step in reversed(undo):
            step()


def _truncate_configs(model, adapter, language_model, plan: LayerPlan, undo: list) -> None:
    configs = []
    for config in (adapter.text_config(model.config), getattr(language_model, "config", None)):
        if config is not None and all(config is not c for c in configs):
            configs.append(config)
    n = plan.num_layers
    for config in configs:
        if getattr(config, "num_hidden_layers", None) != n:
            raise NotStitchable(f"the text config says {getattr(config, 'num_hidden_layers', None)} layers, "
                                f"the model has {n} blocks")
        for key, value in list(vars(config).items()):
            if isinstance(value, (list, tuple)) and len(value) == n and not key.startswith("_"):
                undo.append(lambda c=config, k=key, v=value: setattr(c, k, v))
                setattr(config, key, type(value)(value[e.layer] for e in plan.elements))
        undo.append(lambda c=config: setattr(c, "num_hidden_layers", n))
        config.num_hidden_layers = len(plan.elements)


def _small_tensor_sentinels(modules: nn.ModuleList, undo: list) -> None:
    rng = np.random.default_rng(20251207)
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, RegapCorrection):
                continue
            for store in (sub._parameters, sub._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None or not tensor.is_floating_point() or tensor.numel() > FOLD_INPUT_LIMIT:
                        continue
                    shape = tuple(tensor.shape)
                    raw = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
                    value = torch.from_numpy(raw).to(dtype=tensor.dtype, device=tensor.device)
                    store[name] = nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
                    undo.append(lambda s=store, k=name, v=tensor: s.__setitem__(k, v))


# ======================================================================================
# the optimizer, recording what it folds from block tensors
# ======================================================================================
@dataclass
class _Folded:
    domain: str
    op_type: str
    version: int
    attributes: dict[str, Any]
    inputs: list[tuple[str | None, Any]]     # (name, constant value at the time) per input


def optimizer(trunc: Truncation, layers_fqn: str) -> Callable[[Any], None]:
    """torch.onnx's optimizer pass (onnxscript's ``optimize_ir`` + ``onnx_fusions.fuse``), except
    that it transposes no large tensor of a traced block (``expand`` does, per block, when it
    writes) and that every constant it folds from a block's tensor is recorded in ``trunc.records``.
    ``layers_fqn``: the decoder blocks' ModuleList as named in the exported module."""
    pattern = re.compile(rf"^{re.escape(layers_fqn)}\.\d+\.")

    def run(ir_model) -> None:
        import onnxscript.optimizer
        from onnx_ir import AttributeType
        from onnx_ir.serde import serialize_tensor
        from onnxscript.rewriter import onnx_fusions

        graph = ir_model.graph
        opsets = dict(ir_model.opset_imports)
        large = {name for name, value in graph.initializers.items() if pattern.match(name)
                 and value.const_value is not None and value.const_value.size > FOLD_INPUT_LIMIT}
        records = trunc.records

        def derived(name: str | None) -> bool:
            return name is not None and (pattern.match(name) is not None or name in records)

        def should_fold(node) -> bool | None:
            names = [v.name if v is not None else None for v in node.inputs]
            if any(name in large for name in names):
                return False
            if any(derived(name) for name in names):
                attributes = {}
                for key, attr in node.attributes.items():
                    attributes[key] = serialize_tensor(attr.value) if attr.type == AttributeType.TENSOR else attr.value
                version = node.version if node.version is not None else opsets.get(node.domain, 1)
                inputs = [(v.name, v.const_value) if v is not None else (None, None) for v in node.inputs]
                for output in node.outputs:
                    records[output.name] = _Folded(node.domain, node.op_type, version, attributes, inputs)
            return None

        onnxscript.optimizer.optimize_ir(ir_model, should_fold=should_fold)
        onnx_fusions.fuse(ir_model)

    return run


# ======================================================================================
# the full graph from the truncated one
# ======================================================================================
def _layer_of_scope(node, scope: re.Pattern) -> int | None:
    text = node.metadata_props.get(NAME_SCOPES)
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    for name in scopes:
        m = scope.match(name)
        if m:
            return int(m.group(1))
    return None


def _descendants(values: Sequence[Any]) -> set[int]:
    """ids of the nodes that read any of ``values``, directly or not."""
    seen: set[int] = set()
    todo = [node for v in values for node in v.consumers()]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for out in node.outputs:
            todo.extend(out.consumers())
    return seen


def _ancestors(values: Sequence[Any]) -> set[int]:
    seen: set[int] = set()
    todo = [v.producer() for v in values if v.producer() is not None]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return seen


def _folded_from(value) -> list[str]:
    text = value.metadata_props.get(FOLDED_FROM) if value.metadata_props else None
    if not text:
        return []
    try:
        return list(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return []


@dataclass
class _Recipe:
    """How one block's initializer is computed from that block's tensors."""

    kind: str                      # "tensor" (a block tensor as is), "folded" (a recorded fold), "transpose"
    suffix: str = ""               # the block tensor's name inside its element ("tensor", "transpose")
    name: str = ""                 # the recorded folded value ("folded")
    perm: tuple[int, ...] = ()     # ("transpose")


@dataclass
class _Like:
    dtype: Any
    shape: Any


class _Traced:
    """The truncated model's graph, analysed: for each element ``t`` its weights (the
    initializers computed from its tensors, and its correction constants), its past inputs and
    present outputs, the hidden state it reads (``h_in[t]``) and hands on (``h_out[t]``) and, for
    the elements that are copied, its nodes."""

    def __init__(self, ir_model, trunc: Truncation, layers_fqn: str):
        self.graph = ir_model.graph
        self.trunc = trunc
        self.plan = trunc.plan
        self.k = len(self.plan.elements)
        self.scope = re.compile(rf"^{re.escape(layers_fqn)}\.(\d+)$")
        self.tensor_name = re.compile(rf"^{re.escape(layers_fqn)}\.(\d+)\.(.+)$")
        self.nodes = list(self.graph)
        self.layer_of = {id(n): _layer_of_scope(n, self.scope) for n in self.nodes}
        self.recipes: dict[int, tuple[int, _Recipe]] = {}     # id(initializer) -> (element, recipe)
        self.corrections: dict[int, tuple[int, str]] = {}     # id(initializer) -> (element, "w"|"b"|"v")
        self.weights: list[list[Any]] = [[] for _ in range(self.k)]
        self._classify_initializers()
        inputs = {v.name: v for v in self.graph.inputs}
        outputs = {v.name: v for v in self.graph.outputs}
        self.pasts = [[inputs.get(f"past_key_values.{t}.{kv}") for kv in ("key", "value")] for t in range(self.k)]
        self.presents = [[outputs.get(f"present.{t}.{kv}") for kv in ("key", "value")] for t in range(self.k)]
        if any(v is None for pair in self.pasts + self.presents for v in pair):
            raise NotStitchable("the traced graph lacks a past_key_values or present input/output")
        self.weight_desc = [_descendants(w) for w in self.weights]
        self.h_out = [self._element_output(t) for t in range(self.k)]
        self.h_in = [self._first_input(), *self.h_out[:-1]]
        # The nodes after the last element that carry on to the logits (the final norm), not the
        # ones that compute regap_score from the readout's output.
        logits = [v for v in self.graph.outputs if v.name == "logits"]
        carry_on = _ancestors(logits)
        self.tail_readers = [c for c in self.h_out[-1].consumers() if id(c) in carry_on]
        if not logits or not self.tail_readers:
            raise NotStitchable("no path from the last traced block to the logits")

    def element(self, t: int) -> Element:
        return self.plan.elements[t]

    # -- initializers --------------------------------------------------------------
    def roots(self, name: str, seen: frozenset[str] = frozenset()) -> set[int]:
        """The elements whose tensors the recorded value ``name`` is computed from."""
        m = self.tensor_name.match(name)
        if m:
            return {int(m.group(1))}
        folded = self.trunc.records.get(name)
        if folded is None or name in seen:
            return set()
        roots: set[int] = set()
        for input_name, _ in folded.inputs:
            if input_name is not None:
                roots |= self.roots(input_name, seen | {name})
        return roots

    def _classify_initializers(self) -> None:
        owner = {e.layer: t for t, e in enumerate(self.plan.elements) if e.part != BLOCK}
        for name, value in self.graph.initializers.items():
            m = CORRECTION_NAME.match(name)
            if m:
                t = owner.get(int(m.group(1)))
                if t is None:
                    raise NotStitchable(f"correction constant {name} of an untraced block")
                self.corrections[id(value)] = (t, m.group(2))
                self.weights[t].append(value)
                continue
            roots = self.roots(name)
            if len(roots) > 1:
                raise NotStitchable(f"initializer {name} is computed from elements {sorted(roots)}")
            if roots:
                t = roots.pop()
                m = self.tensor_name.match(name)
                self.recipes[id(value)] = (t, _Recipe("tensor", suffix=m.group(2)) if m else _Recipe("folded", name=name))
                self.weights[t].append(value)
            elif any(self.tensor_name.match(source) for source in _folded_from(value)):
                raise NotStitchable(f"initializer {name} was folded from a block's tensor without a recipe")

    # -- per-element structure -----------------------------------------------------
    def _element_output(self, t: int):
        """The hidden state element ``t`` hands on: the one value that a node of its scope
        computes from its weights and that nodes of another scope read (of element t + 1 where
        there is one)."""
        graph_outputs = {id(v) for v in self.graph.outputs}
        candidates = []
        for node in self.nodes:
            if self.layer_of[id(node)] != t or id(node) not in self.weight_desc[t]:
                continue
            for value in node.outputs:
                readers = {self.layer_of[id(c)] for c in value.consumers()}
                if id(value) not in graph_outputs and readers - {t}:
                    candidates.append((value, readers))
        if t < self.k - 1:
            candidates = [(v, r) for v, r in candidates if t + 1 in r]
        if len(candidates) != 1:
            raise NotStitchable(f"traced element {t} hands on {len(candidates)} values, not one hidden state")
        return candidates[0][0]

    def _first_input(self):
        """The hidden state element 0 reads: the one value from outside its scope that its nodes
        read, that carries the data (not only the shape) of the decoder's main input and that
        has the type of the hidden state element 0 hands on (a whole block 0 also reads the
        image flags computed from the modality channel)."""
        main = next((v for v in self.graph.inputs if v.name in ("input_ids", "inputs_embeds")), None)
        if main is None:
            raise NotStitchable("the traced graph has no input_ids or inputs_embeds input")
        data, todo = {id(main)}, [main]
        while todo:
            for node in todo.pop().consumers():
                if node.op_type in ("Shape", "Size"):
                    continue
                for out in node.outputs:
                    if id(out) not in data:
                        data.add(id(out))
                        todo.append(out)
        found = {}
        for node in self.nodes:
            if self.layer_of[id(node)] != 0:
                continue
            for value in node.inputs:
                producer = None if value is None else value.producer()
                if value is not None and id(value) in data and (producer is None or self.layer_of[id(producer)] != 0):
                    found[id(value)] = value
        hidden = self.h_out[0]
        found = {key: v for key, v in found.items() if v.type == hidden.type
                 and (v.shape is None or hidden.shape is None or len(v.shape) == len(hidden.shape))}
        if len(found) != 1:
            raise NotStitchable(f"the first traced block reads {len(found)} values of the main input, not one")
        return next(iter(found.values()))

    def region(self, t: int) -> set[int]:
        """ids of the nodes that compute element ``t``'s outputs (its hidden state, and its
        presents where it has a cache)."""
        presents = self.presents[t] if self.element(t).part != CORRECTION else []
        return _ancestors([*presents, self.h_out[t]])

    def element_nodes(self, t: int) -> list:
        """Element ``t``'s nodes in graph order: downstream of its weights, its past or its input
        hidden state, and not downstream of its output hidden state."""
        h_in = self.h_in[t]
        has_cache = self.element(t).part != CORRECTION
        pasts = self.pasts[t] if has_cache else []
        inside = _descendants([*self.weights[t], *pasts, h_in]) - _descendants([self.h_out[t]])
        # Of those, the nodes of another scope are shared (torch.export reads a size off one past
        # input for every block, say); so are the unscoped ones read outside the element.
        ids = {id(n) for n in self.nodes if id(n) in inside and self.layer_of[id(n)] in (t, None)}
        graph_outputs = {id(v) for v in self.graph.outputs}
        for node in reversed(self.nodes):       # readers before what they read
            if id(node) in ids and self.layer_of[id(node)] is None and any(
                    id(v) in graph_outputs or any(id(c) not in ids for c in v.consumers()) for v in node.outputs):
                ids.discard(id(node))
        nodes = [n for n in self.nodes if id(n) in ids]
        what = f"traced element {t} (block {self.element(t).layer}'s {self.element(t).part})"
        for node in nodes:
            if any(a.type is not None and a.type.name in ("GRAPH", "GRAPHS") for a in node.attributes.values()):
                raise NotStitchable(f"{what} holds a subgraph ({node.op_type})")
            for value in node.inputs:
                producer = None if value is None else value.producer()
                if producer is None or value is h_in or id(producer) in ids:
                    continue
                scope = self.layer_of[id(producer)]
                if scope is not None and scope != t and id(producer) in self.weight_desc[scope]:
                    raise NotStitchable(f"{what} reads a value of traced element {scope}")
        presents = {id(v) for v in self.presents[t]} if has_cache else set()
        for node in nodes:
            for value in node.outputs:
                if value is self.h_out[t] or id(value) in presents:
                    continue
                if id(value) in graph_outputs or any(id(c) not in ids for c in value.consumers()):
                    raise NotStitchable(f"{what} hands on {value.name} besides its hidden state")
        if has_cache and any(p.producer() is None or id(p.producer()) not in ids for p in self.presents[t]):
            raise NotStitchable(f"{what}: its present outputs are computed outside it")
        return nodes

    def foldable_transposes(self) -> dict[int, tuple[str, tuple[int, ...], _Like]]:
        """The Transposes of a large block tensor that the constant folder would have folded (the
        tensor's only reader): id(node) -> (tensor suffix, perm, dtype and shape of the result)."""
        out = {}
        for node in self.nodes:
            if node.op_type != "Transpose" or node.domain != "" or not node.inputs or node.inputs[0] is None:
                continue
            source = node.inputs[0]
            if id(source) not in self.recipes or self.recipes[id(source)][1].kind != "tensor":
                continue
            if source.const_value.size <= FOLD_INPUT_LIMIT or len(source.uses()) != 1:
                continue
            perm = node.attributes.get("perm")
            perm = tuple(perm.value) if perm is not None else tuple(range(len(source.const_value.shape) - 1, -1, -1))
            dims = [int(source.const_value.shape[p]) for p in perm]
            out[id(node)] = (self.recipes[id(source)][1].suffix, perm, _Like(source.const_value.dtype, dims))
        return out


# -- tensors --------------------------------------------------------------------------
def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _ir_tensor(array: np.ndarray, dtype, name: str):
    import onnx_ir as ir

    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16 and dtype == ir.DataType.BFLOAT16:
        return ir.Tensor(array, dtype=dtype, name=name)
    return ir.Tensor(array, name=name)


class _Weights:
    """The full model's block initializers as lazy tensors, computed from their torch tensors
    when the graph is written."""

    def __init__(self, traced: _Traced):
        self.traced = traced
        self._named: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def tensor(self, layer: int, part: str, suffix: str) -> torch.Tensor:
        """Block ``layer``'s tensor ``suffix``, named inside the block (``WHOLE``) or inside the
        block without its correction (``BLOCK``)."""
        key = (layer, part)
        if key not in self._named:
            block = self.traced.trunc.blocks[layer]
            module = block if part == WHOLE else _split(block)[0]
            named = dict(module.named_parameters(remove_duplicate=False))
            named.update(module.named_buffers(remove_duplicate=False))
            self._named[key] = named
        if suffix not in self._named[key]:
            raise NotStitchable(f"block {layer} has no tensor {suffix}")
        return self._named[key][suffix]

    def folded(self, layer: int, part: str, name: str) -> np.ndarray:
        """A recorded folded value, computed from block ``layer``'s tensors."""
        import onnx.reference.ops

        m = self.traced.tensor_name.match(name)
        if m:
            return _numpy(self.tensor(layer, part, m.group(2)))
        folded = self.traced.trunc.records[name]
        args = []
        for input_name, constant in folded.inputs:
            if input_name is None:
                args.append(None)
            elif self.traced.roots(input_name):
                args.append(self.folded(layer, part, input_name))
            else:
                args.append(constant.numpy())
        result = onnx.reference.ops.load_op(folded.domain, folded.op_type, folded.version).eval(*args, **folded.attributes)
        return result[0] if isinstance(result, (tuple, list)) else result

    def lazy(self, layer: int, part: str, recipe: _Recipe, like, name: str):
        """An ``ir.LazyTensor`` with ``like``'s dtype and shape, computed for block ``layer``."""
        import onnx_ir as ir

        want = tuple(int(d) for d in like.shape)
        if recipe.kind in ("tensor", "transpose"):
            tensor = self.tensor(layer, part, recipe.suffix)
            shape = tuple(tensor.shape) if recipe.kind == "tensor" else tuple(tensor.shape[p] for p in recipe.perm)
            if shape != want:
                raise NotStitchable(f"{name}: block {layer} gives shape {shape}, the traced block {want}")

        def make():
            if recipe.kind == "tensor":
                array = _numpy(self.tensor(layer, part, recipe.suffix))
            elif recipe.kind == "transpose":
                array = _numpy(self.tensor(layer, part, recipe.suffix).detach().permute(*recipe.perm))
            else:
                array = np.asarray(self.folded(layer, part, recipe.name))
            if tuple(array.shape) != want:
                raise RuntimeError(f"{name}: computed shape {tuple(array.shape)}, the graph holds {want}")
            return _ir_tensor(array, like.dtype, name)

        return ir.LazyTensor(make, dtype=like.dtype, shape=ir.Shape(list(want)), name=name)


def _correction_tensor(block: nn.Module, key: str, like, name: str):
    _, correction = _split(block)
    constant = getattr(correction, key, None) if correction is not None else None
    if not isinstance(constant, torch.Tensor):
        raise NotStitchable(f"{name}: the block has no correction constant {key!r} where the traced one has")
    array = _numpy(constant).astype(like.dtype.numpy(), copy=False).reshape(tuple(int(d) for d in like.shape))
    return _ir_tensor(array, like.dtype, name)


def _copy_shape(shape):
    import onnx_ir as ir

    return None if shape is None else ir.Shape(list(shape))


def _weight_name(fqn: str, layer: int, inner: bool, recipe: _Recipe) -> str:
    """An initializer's name: the tensor's path in the full model (``inner``: a block element in a
    corrected block, whose tensors are under ``.block``)."""
    path = f"{fqn}.{layer}.block" if inner else f"{fqn}.{layer}"
    if recipe.kind == "tensor":
        return f"{path}.{recipe.suffix}"
    if recipe.kind == "transpose":
        return f"{path}.{recipe.suffix}.transposed"
    return f"{path}.folded.{recipe.name}"


class _Scopes:
    """Per-node metadata of a traced element's nodes, renumbered for block ``layer`` of the full
    model. A block element placed in a corrected block gets the scopes of the block inside
    ``CorrectedBlock`` (``layers.{i}.block``), as a full trace writes them."""

    def __init__(self, fqn: str):
        self.fqn = fqn
        self.scope = re.compile(rf"{re.escape(fqn)}\.(\d+)(?![0-9])")
        self.text = re.compile(rf"{re.escape(fqn)}\.(\d+)(?![0-9])(: |\.)?")

    def rename(self, metadata: dict[str, str], layer_of: Callable[[int], tuple[int, bool]]) -> dict[str, str]:
        """``layer_of(t)``: (the block of the full model, whether inside a CorrectedBlock)."""
        fqn = self.fqn

        def text(m) -> str:
            layer, inner = layer_of(int(m.group(1)))
            sep = m.group(2) or ""
            if inner and sep == ": ":
                return f"{fqn}.{layer}: {_CORRECTED_BLOCK}/{fqn}.{layer}.block: "
            if inner and sep == ".":
                return f"{fqn}.{layer}.block."
            return f"{fqn}.{layer}{sep}"

        out = {}
        scopes = ast.literal_eval(metadata[NAME_SCOPES]) if NAME_SCOPES in metadata else []
        for key, value in metadata.items():
            if key == NAME_SCOPES:
                out[key] = repr(self._scopes(scopes, layer_of))
            elif key == CLASS_HIERARCHY and len(ast.literal_eval(value)) == len(scopes):
                classes = list(ast.literal_eval(value))
                for position in reversed(range(len(scopes))):
                    m = self.scope.fullmatch(scopes[position])
                    if m and layer_of(int(m.group(1)))[1]:
                        classes.insert(position, _CORRECTED_BLOCK)
                out[key] = repr(classes)
            else:
                out[key] = self.text.sub(text, value)
        return out

    def _scopes(self, scopes: list[str], layer_of) -> list[str]:
        out = []
        for scope in scopes:
            m = self.scope.match(scope)
            if not m:
                out.append(scope)
                continue
            layer, inner = layer_of(int(m.group(1)))
            rest = scope[m.end():]
            if not inner:
                out.append(f"{self.fqn}.{layer}{rest}")
            elif rest:
                out.append(f"{self.fqn}.{layer}.block{rest}")
            else:
                out += [f"{self.fqn}.{layer}", f"{self.fqn}.{layer}.block"]
        return out


class _Builder:
    """Writes the full graph into the traced one."""

    def __init__(self, traced: _Traced, layers_fqn: str):
        self.traced = traced
        self.graph = traced.graph
        self.fqn = layers_fqn
        self.weights = _Weights(traced)
        self.scopes = _Scopes(layers_fqn)
        self.transposes = traced.foldable_transposes()

    def inside_correction(self, t: int, layer: int) -> bool:
        """Whether element ``t``'s nodes sit inside block ``layer``'s ``CorrectedBlock`` as its
        ``.block`` (a block element placed in a corrected block)."""
        return self.traced.element(t).part == BLOCK and isinstance(self.traced.trunc.blocks[layer], CorrectedBlock)

    def weight_name(self, t: int, layer: int, recipe: _Recipe) -> str:
        return _weight_name(self.fqn, layer, self.inside_correction(t, layer), recipe)

    def initializer(self, value, t: int, layer: int):
        """Block ``layer``'s own version of element ``t``'s initializer ``value``, or None when
        every block shares it."""
        import onnx_ir as ir

        traced = self.traced
        if id(value) in traced.corrections:
            key = traced.corrections[id(value)][1]
            name = public_name(layer, key)
            tensor = _correction_tensor(traced.trunc.blocks[layer], key, value.const_value, name)
        elif id(value) in traced.recipes:
            recipe = traced.recipes[id(value)][1]
            name = self.weight_name(t, layer, recipe)
            tensor = self.weights.lazy(layer, traced.element(t).part, recipe, value.const_value, name)
        else:
            return None
        new = ir.Value(name=name, shape=_copy_shape(value.shape), type=value.type)
        new.const_value = tensor
        self.graph.register_initializer(new)
        return new

    def transposed(self, node, t: int, layer: int):
        """The initializer that replaces a foldable Transpose of a block tensor, for ``layer``."""
        import onnx_ir as ir

        suffix, perm, like = self.transposes[id(node)]
        recipe = _Recipe("transpose", suffix=suffix, perm=perm)
        name = self.weight_name(t, layer, recipe)
        new = ir.Value(name=name, shape=ir.Shape(like.shape), type=ir.TensorType(like.dtype))
        new.const_value = self.weights.lazy(layer, self.traced.element(t).part, recipe, like, name)
        self.graph.register_initializer(new)
        return new

    def copy(self, t: int, nodes: list, layer: int, hidden_in) -> tuple[Any, list, list]:
        """Element ``t`` for block ``layer``, reading ``hidden_in``: (its hidden state, its past
        inputs and presents; none for a correction element)."""
        import onnx_ir as ir

        traced = self.traced
        value_map: dict[int, Any] = {id(traced.h_in[t]): hidden_in}
        pasts = []
        if traced.element(t).part != CORRECTION:
            for kv, source in zip(("key", "value"), traced.pasts[t]):
                past = ir.Value(name=f"past_key_values.{layer}.{kv}", shape=_copy_shape(source.shape), type=source.type)
                value_map[id(source)] = past
                pasts.append(past)
        inner = self.inside_correction(t, layer)
        for node in nodes:
            if id(node) in self.transposes:
                value_map[id(node.outputs[0])] = self.transposed(node, t, layer)
                continue
            inputs = []
            for value in node.inputs:
                if value is None:
                    inputs.append(None)
                    continue
                if id(value) not in value_map and value.is_initializer():
                    own = self.initializer(value, t, layer)
                    if own is not None:
                        value_map[id(value)] = own
                inputs.append(value_map.get(id(value), value))
            outputs = [ir.Value(name=f"{v.name}.{layer}", shape=_copy_shape(v.shape), type=v.type,
                                metadata_props=dict(v.metadata_props)) for v in node.outputs]
            value_map.update((id(old), new) for old, new in zip(node.outputs, outputs))
            self.graph.append(ir.Node(
                node.domain, node.op_type, inputs, [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                outputs=outputs, version=node.version, name=f"{node.name}.{layer}" if node.name else None,
                metadata_props=self.scopes.rename(dict(node.metadata_props), lambda _t: (layer, inner))))
        presents = []
        if traced.element(t).part != CORRECTION:
            for kv, present in zip(("key", "value"), traced.presents[t]):
                out = value_map[id(present)]
                out.name = f"present.{layer}.{kv}"
                presents.append(out)
        return value_map[id(traced.h_out[t])], pasts, presents

    def rewire(self, t: int, hidden, region: set[int]) -> None:
        """Element ``t`` (in place) reads ``hidden`` instead of what it read in the trace.
        ``region``: the nodes that computed its outputs in the trace (``_Traced.region``)."""
        h_in = self.traced.h_in[t]
        for node in list(h_in.consumers()):
            if id(node) in region:
                for index, value in enumerate(node.inputs):
                    if value is h_in:
                        node.replace_input_with(index, hidden)

    def park_weights(self, t: int) -> None:
        """Temporary names for element ``t``'s weights, out of the way of the copies' names (the
        truncated model numbers its elements 0, 1, ...)."""
        for value in self.traced.weights[t]:
            if id(value) in self.traced.recipes:
                value.name = f"{value.name}.regap_stitch_tmp.{t}"

    def finish_in_place(self, t: int) -> None:
        """Element ``t``'s own weights for the block it was taken from: its tensors as lazy
        initializers with their names, transposes folded. After the copies, which read the
        element as traced."""
        traced, graph = self.traced, self.graph
        layer = traced.element(t).layer
        for node in traced.nodes:
            if id(node) in self.transposes and node.inputs[0] is not None and traced.recipes[id(node.inputs[0])][0] == t:
                new = self.transposed(node, t, layer)
                node.outputs[0].replace_all_uses_with(new)
                graph.remove(node, safe=True)
        for value in traced.weights[t]:
            if id(value) in traced.corrections or not value.uses():
                continue                                     # bound to its real value already, or unused
            recipe = traced.recipes[id(value)][1]
            name = self.weight_name(t, layer, recipe)
            value.const_value = self.weights.lazy(layer, traced.element(t).part, recipe, value.const_value, name)
            value.name = name


def _same_static_shape(a, b) -> bool:
    """Whether two values have the same rank and the same sizes where both are fixed numbers."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(not isinstance(x, int) or not isinstance(y, int) or x == y for x, y in zip(a.shape, b.shape))


def expand(ir_model, trunc: Truncation, layers_fqn: str) -> None:
    """Turn the truncated model's optimized graph ``ir_model`` into the full model's, in place.
    ``layers_fqn``: the decoder ModuleList as named in the exported module."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    traced = _Traced(ir_model, trunc, layers_fqn)
    plan, graph, k = trunc.plan, traced.graph, traced.k
    builder = _Builder(traced, layers_fqn)
    copied = {t for i, pair in enumerate(plan.layers) for t in pair if t is not None and plan.elements[t].layer != i}
    element_nodes = {t: traced.element_nodes(t) for t in copied}
    # The traced blocks' inputs and outputs get their block's names (through temporary names,
    # since the two numberings overlap); a correction element's are dropped.
    renamed = []
    for t, e in enumerate(plan.elements):
        if e.part == CORRECTION:
            continue
        for kv, past, present in zip(("key", "value"), traced.pasts[t], traced.presents[t]):
            renamed += [(past, f"past_key_values.{e.layer}.{kv}"), (present, f"present.{e.layer}.{kv}")]
    for value, _ in renamed:
        value.name = f"{value.name}.regap_stitch_tmp"
    for value, name in renamed:
        value.name = name
    inside = {t: builder.inside_correction(t, e.layer) for t, e in enumerate(plan.elements)}
    for node in traced.nodes:
        node.metadata_props.update(builder.scopes.rename(
            dict(node.metadata_props), lambda t: (plan.elements[t].layer, inside[t]) if t < k else (t, False)))
    for t in range(k):
        builder.park_weights(t)
    # Every block: its block element and its correction element, each in place for the block it
    # was taken from and copied for the others, the hidden state chained through.
    regions = {t: traced.region(t) for t in range(k)}
    hidden = traced.h_in[0]
    pasts: dict[int, list] = {}
    presents: dict[int, list] = {}
    rewire = []
    for i, (block_element, correction_element) in enumerate(plan.layers):
        for t in (block_element, correction_element):
            if t is None:
                continue
            e = plan.elements[t]
            if e.layer == i:
                if hidden is not traced.h_in[t]:
                    rewire.append((t, hidden))
                hidden = traced.h_out[t]
                if e.part != CORRECTION:
                    pasts[i], presents[i] = traced.pasts[t], traced.presents[t]
            else:
                hidden, block_pasts, block_presents = builder.copy(t, element_nodes[t], i, hidden)
                if e.part != CORRECTION:
                    pasts[i], presents[i] = block_pasts, block_presents
    # Last, since the copies read the traced elements as they were traced.
    for t in range(k):
        builder.finish_in_place(t)
    for t, value in rewire:
        builder.rewire(t, value, regions[t])
    for node in traced.tail_readers:
        for index, value in enumerate(node.inputs):
            if value is traced.h_out[-1]:
                node.replace_input_with(index, hidden)
    # Inputs and outputs in the contract's order, without the correction elements' cache.
    dropped = [p for t, e in enumerate(plan.elements) if e.part == CORRECTION for p in traced.pasts[t]]
    own = {id(v) for pair in traced.pasts for v in pair}
    head = [v for v in graph.inputs if id(v) not in own]
    graph.inputs.clear()
    graph.inputs.extend(head + [v for i in range(plan.num_layers) for v in pasts[i]])
    own = {id(v) for pair in traced.presents for v in pair}
    head = [v for v in graph.outputs if id(v) not in own]
    graph.outputs.clear()
    graph.outputs.extend(head + [v for i in range(plan.num_layers) for v in presents[i]])
    RemoveUnusedNodesPass()(ir_model)
    for value in dropped:
        for node in list(value.consumers()):
            # A size torch.export read off this input: a block's cache of the same shape has the
            # same sizes (not block 0's key where it carries the image flag).
            if node.op_type not in ("Shape", "Size"):
                raise NotStitchable(f"a node reads the data of {value.name}, the cache of a correction element")
            kv = 0 if value.name.rsplit(".", 1)[-1] == "key" else 1
            stand_in = next((pasts[i][kv] for i in range(plan.num_layers)
                             if _same_static_shape(pasts[i][kv], value)), None)
            if stand_in is None:
                raise NotStitchable(f"no block's cache has the shape of {value.name}, whose size a node reads")
            for index, v in enumerate(node.inputs):
                if v is value:
                    node.replace_input_with(index, stand_in)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)
    graph.sort()
