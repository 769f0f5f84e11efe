"""ONNX export of a (corrected) Hugging Face model: "onnx contract 5" (docs/ONNX_CONTRACT.md).

Text LLMs give one graph, ``model.onnx``; multimodal LLMs give the split existing ONNX
runtimes consume: ``vision_encoder.onnx``, ``embed_tokens.onnx`` and
``decoder_model_merged.onnx``. One decoder graph serves prefill (past length 0) and decode.
These are the float32 graphs; ``export.precision`` makes the other precisions from them.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript) on a small
wrapper module that turns the flat ``past_key_values.{i}.key|value`` inputs into a
transformers ``DynamicCache`` and returns the flat ``present.{i}.key|value`` tensors.

Correction constants become named initializers ``regap.{layer}.w|b|v``. To keep the
exporter's optimizer (constant folding, initializer de-duplication, no-op rewrites such as
``x + 0``) from touching them, every correction buffer carries a unique random *sentinel*
value while tracing; afterwards the sentinels are found by value, renamed to their public
names, and given their real values. The graph stays folded: per gated layer exactly
MatMul, Add, Sigmoid, Mul (image mask), Mul, Add; per fixed layer Mul (image mask), Add.
Where the image mask comes from: multimodal graphs with image-only positions build it from the
modality channel (``export.image_rows``); every other corrected decoder takes
``regap_image_mask``, an overridable initializer (its default: ``modality.mask_default``).
Every graph's metadata names its contract, role, precision, image-row scheme and export
(``io.graph_metadata``). The optimizer runs without onnxscript's one quadratic-time rule
(``QUADRATIC_REWRITES``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..method.correction import RegapCorrection
from ..errors import ModelError
from ..method.folding import FIXED, SCALED, ScoreReadout
from ..method.modality import INPUT_NAME as IMAGE_MASK, mask_default
from ..models.base import ModelAdapter, cache_of, with_cache
from ..options import RegapOptions
from ..io.artifacts import CONFIG_FILE, CONTRACT_VERSION
from ..io.progress import quiet
from ..io.graph_metadata import (
    IMAGE_ROWS_CHANNEL, IMAGE_ROWS_MASK, ROLE_DECODER, ROLE_EMBED, ROLE_MODEL, ROLE_VISION, GraphFacts, new_export_id,
)
from ..method.rewrite import CorrectedBlock
from ..models.hooks import block_hidden
from ..models.positions import position_config
from ..models.vision_export import VisionSpec, vision_spec
from .image_rows import FlaggedKeyLayer, call_flags, flagged_attention, past_flag, split_channel, with_image_channel
from .onnx_graph import SCORE_B, SCORE_W, public_name

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
TEXT_FILE = "model.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
EMBED_FILE = "embed_tokens.onnx"
VISION_FILE = "vision_encoder.onnx"
# Above this many bytes of weights a graph is written with external data. Protobuf's own limit
# is 2 GiB, but an inline save also holds a serialized copy of every weight: the 135M embedded
# model peaked at 5.3x its size inline and 2.3x with external data (benchmarks/RESULTS.md).
EXTERNAL_DATA_BYTES = 64 * 2**20

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
NUM_IMAGES = "num_images"
MASK_BATCH, MASK_SEQ = "regap_mask_batch", "regap_mask_sequence"

# Sample sizes used for tracing: distinct, and none of them 0 or 1 (torch.export specialises those).
_SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST, _SAMPLE_IMAGES = 2, 7, 5, 2


# ======================================================================================
# public API
# ======================================================================================
def export_text_decoder(model: nn.Module, adapter: ModelAdapter, out_dir: Path, *,
                        dtype: torch.dtype = torch.float32, readout: ScoreReadout | None = None,
                        options: RegapOptions | None = None, external_data: bool | None = None,
                        opset: int = DEFAULT_OPSET, file_name: str = TEXT_FILE, export_id: str | None = None) -> Path:
    """Write ``out_dir/model.onnx`` (+ ``regap_onnx.json``) for a text causal LM.

    ``model`` is corrected in place by ``rewrite.insert_corrections`` or uncorrected. With
    regap-seq ("scaled") corrections the graph takes ``regap_alpha`` [batch]; with a
    ``readout`` it also returns ``regap_score`` [batch, seq]. ``options`` (the export's
    RegapOptions) are recorded for the runtime's two-pass loop. When ``dtype`` differs from
    the model's, the model's parameters are cast **in place** (the gate constants stay
    float32). ``external_data``: None = automatic (weights over 64 MiB).
    """
    _check_dtype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    cast_model(model, dtype)
    path = out_dir / file_name
    graph = GraphFacts(export_id=export_id or new_export_id(), precision=_precision_of(dtype), image_rows=None)
    info = _export_decoder(model, adapter, path, embeds=False, readout=readout,
                           external_data=external_data, opset=opset, options=options, graph=graph)
    config = _config_json(model, adapter, dtype, info, readout, options, opset,
                          files={"decoder": file_name}, kind="text", graph=graph)
    _write_json(out_dir / CONFIG_FILE, config)
    return path


def export_multimodal(model: nn.Module, adapter: ModelAdapter, out_dir: Path, *,
                      dtype: torch.dtype = torch.float32, readout: ScoreReadout | None = None,
                      options: RegapOptions | None = None, external_data: bool | None = None,
                      opset: int = DEFAULT_OPSET, export_id: str | None = None) -> dict[str, Path]:
    """Write the multimodal split into ``out_dir``:

    - ``vision_encoder.onnx``: pixel inputs -> ``image_features`` [num_images, tokens, hidden]
      (in the LM embedding space, after the projector / connector);
    - ``embed_tokens.onnx``: ``input_ids`` -> ``inputs_embeds``;
    - ``decoder_model_merged.onnx``: the text decoder fed ``inputs_embeds``;
    - ``regap_onnx.json``: what the runtime needs (image token id, cache geometry, ...).

    Returns ``{"vision_encoder": path, "embed_tokens": path, "decoder": path}``.
    """
    _check_dtype(dtype)
    spec = vision_spec(adapter.family, model.config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    cast_model(model, dtype)
    paths = {
        "vision_encoder": out_dir / VISION_FILE,
        "embed_tokens": out_dir / EMBED_FILE,
        "decoder": out_dir / DECODER_FILE,
    }
    # The modality channel (contract 5) tells the decoder which rows are image rows. Exports that
    # correct every position take the mask as an input instead (nothing to find, and the input is
    # how a caller switches the correction off); uncorrected exports need neither.
    positions = (options or RegapOptions()).positions
    channel = _has_corrections(model) and positions != "all"
    graph = GraphFacts(export_id=export_id or new_export_id(), precision=_precision_of(dtype),
                       image_rows=IMAGE_ROWS_CHANNEL if channel else None)
    _export_vision(model, spec, paths["vision_encoder"], external_data=external_data, opset=opset, graph=graph)
    _export_embeddings(model, paths["embed_tokens"], external_data=external_data, opset=opset, graph=graph)
    info = _export_decoder(model, adapter, paths["decoder"], embeds=True, readout=readout,
                           external_data=external_data, opset=opset, options=options,
                           channel_positions=positions if channel else None, graph=graph)
    config = _config_json(model, adapter, dtype, info, readout, options, opset,
                          files={k: p.name for k, p in paths.items()}, kind="multimodal", graph=graph)
    config["image_token_id"] = spec.image_token_id(model.config)
    config["vision_inputs"] = list(spec.inputs)
    config["vision_input_dtypes"] = list(spec.input_dtypes)
    config["vision_outputs"] = list(spec.outputs)
    config["vision_config"] = spec.runtime_config(model.config)
    if spec.rewrite is not None:
        config.update(spec.rewrite(paths["vision_encoder"]))
    _write_json(out_dir / CONFIG_FILE, config)
    return paths


def _precision_of(dtype: torch.dtype) -> str:
    """The precision name of a graph traced in ``dtype``."""
    return {torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float16):
        from ..errors import RegapError

        raise RegapError(f"ONNX export supports float32 and float16, not {dtype}",
                         hint="ONNX Runtime has few bfloat16 kernels; use --dtype fp16")


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's parameters to ``dtype`` in place, keeping correction constants
    where they belong: the gate (w, b) and gated/scaled v in float32, fixed v in ``dtype``.
    Buffers other than the corrections' keep their dtype (rotary ``inv_freq`` stays float32,
    as transformers keeps it when loading in half precision)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported export dtype {dtype}")
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for module in model.modules():
        if isinstance(module, RegapCorrection):
            want = dtype if module.kind == FIXED else torch.float32
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf.dtype != want:
                    setattr(module, name, buf.to(want))


# ======================================================================================
# the decoder wrapper
# ======================================================================================
@dataclass
class _DecoderInfo:
    num_layers: int
    kv_heads: list[int]
    head_dims: list[int]
    key_dims: list[int]
    corrections: list[dict[str, Any]]
    has_alpha: bool
    has_score: bool
    input_names: list[str]
    output_names: list[str]
    seconds: float
    has_image_mask: bool = False
    image_channel: bool = False


class DecoderWrapper(nn.Module):
    """(input_ids | inputs_embeds, attention_mask, position_ids, [regap_image_mask], [regap_alpha], *past)
    -> (logits, [regap_score], *presents). Builds a DynamicCache from the flat past.

    ``channel_positions`` (multimodal exports with image-only positions): no mask input;
    ``inputs_embeds`` carries the modality channel and layer 0's key cache the running image
    flag (``image_rows``), and the mask of those positions is built in the graph. Trace it
    inside ``image_rows.flagged_attention(model)``."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, *, num_layers: int, embeds: bool,
                 alpha: bool, readout: ScoreReadout | None, image_mask: bool = False,
                 channel_positions: str | None = None):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.embeds = embeds
        self.alpha = alpha
        self.image_mask = image_mask
        self.channel_positions = channel_positions
        self.readout_layer = None if readout is None else readout.layer
        self._captured: dict[str, torch.Tensor] = {}
        self._hook = None
        if readout is not None:
            self.register_buffer("score_w", readout.w.detach().to(torch.float32).reshape(-1).clone())
            self.register_buffer("score_b", torch.tensor([float(readout.b)], dtype=torch.float32))
            block = adapter.decoder_layers(model)[readout.layer]
            self._hook = block.register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self._captured["h"] = block_hidden(output)

    def remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def forward(self, main: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *rest: torch.Tensor):
        from transformers import DynamicCache

        rest = list(rest)
        image_mask = rest.pop(0) if self.image_mask else None
        alpha = rest.pop(0) if self.alpha else None
        past = rest
        torch._check(attention_mask.shape[1] == past[0].shape[2] + main.shape[1])
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        if self.channel_positions is not None:
            main, image_rows = split_channel(main)
            image_mask, flags = call_flags(image_rows, past_flag(past[0]), self.channel_positions)
            cache.layers[0] = FlaggedKeyLayer(past[0], past[1], flags)
        kwargs: dict[str, Any] = dict(attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=True, **with_cache(self.model, cache))
        kwargs["inputs_embeds" if self.embeds else "input_ids"] = main
        if alpha is not None:
            kwargs["regap_alpha"] = alpha
        if image_mask is not None:
            kwargs[IMAGE_MASK] = image_mask
        out = self.model(**kwargs)
        cache = cache_of(out)
        outputs = [out.logits]
        if self.readout_layer is not None:
            h = self._captured.pop("h")
            outputs.append(h.to(torch.float32) @ self.score_w + self.score_b)
        for layer in cache.layers[: self.num_layers]:
            outputs += [layer.keys, layer.values]
        return tuple(outputs)


def presents_cut_from_past(graph: Any, num_layers: int) -> list[str]:
    """The ``present.{i}.{kv}`` outputs of an onnx_ir graph that no path of nodes connects to
    their ``past_key_values.{i}.{kv}`` input: a decoder that drops its cache input, as exports
    under transformers 5.17 did while the cache went in as ``cache=`` (decode then attends to
    the new token alone; prefill, with an empty past, still matches)."""
    outputs = {v.name: v for v in graph.outputs}
    cut = []
    for i in range(num_layers):
        for kv in ("key", "value"):
            name = f"present.{i}.{kv}"
            if f"past_key_values.{i}.{kv}" not in _ancestor_names(outputs[name]):
                cut.append(name)
    return cut


def _ancestor_names(value: Any) -> set[str]:
    seen, names, todo = set(), set(), [value]
    while todo:
        node = todo.pop().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for v in node.inputs:
            if v is not None:
                names.add(v.name)
                todo.append(v)
    return names


def _check_cache_flows(ir_model: Any, num_layers: int) -> None:
    cut = presents_cut_from_past(ir_model.graph, num_layers)
    if cut:
        import transformers

        raise ModelError(f"the exported decoder ignores its KV cache: {', '.join(cut[:2])}"
                         f"{' ...' if len(cut) > 2 else ''} do not depend on the past inputs",
                         hint=f"transformers {transformers.__version__} did not take the cache this exporter "
                              "passed; report it with that version")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _has_scaled(model: nn.Module) -> bool:
    return any(isinstance(m, RegapCorrection) and m.kind == SCALED for m in model.modules())


def _has_corrections(model: nn.Module) -> bool:
    return any(isinstance(m, RegapCorrection) for m in model.modules())


def _cache_geometry(model: nn.Module, adapter: ModelAdapter, embeds: bool, alpha: bool
                    ) -> tuple[int, list[int], list[int]]:
    """Number of cache layers, KV heads and head dim per layer, from one real forward."""
    hidden = adapter.hidden_size(model)
    dtype = next(model.parameters()).dtype
    kwargs: dict[str, Any] = dict(attention_mask=torch.ones(1, 2, dtype=torch.long), use_cache=True)
    if embeds:
        kwargs["inputs_embeds"] = torch.zeros(1, 2, hidden, dtype=dtype)
    else:
        kwargs["input_ids"] = torch.zeros(1, 2, dtype=torch.long)
    if alpha:
        kwargs["regap_alpha"] = torch.zeros(1)
    device = _device(model)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad():
        out = model(**kwargs)
    cache = cache_of(out)
    n = adapter.num_layers(model)
    layers = cache.layers[:n]
    # None where a layer never ran attention (the stitcher's traced correction elements).
    shapes = [getattr(l, "keys", None) for l in layers]
    shapes = [None if k is None or k.dim() != 4 else k.shape for k in shapes]
    return (len(layers), [None if k is None else int(k[1]) for k in shapes],
            [None if k is None else int(k[3]) for k in shapes])


def _correction_entries(model: nn.Module, adapter: ModelAdapter) -> list[tuple[str, RegapCorrection, str]]:
    """(public name, module, buffer name) for every correction constant in layer order."""
    out = []
    for block in adapter.decoder_layers(model):
        if isinstance(block, CorrectedBlock):
            corr = block.correction
            for buf in ("w", "b", "v"):
                if hasattr(corr, buf) and isinstance(getattr(corr, buf), torch.Tensor):
                    out.append((public_name(corr.layer, buf), corr, buf))
    return out


# ======================================================================================
# sentinels: keep the correction constants as distinct named initializers
# ======================================================================================
@dataclass
class _Sentinel:
    name: str          # public name
    sentinel: np.ndarray
    value: np.ndarray


@contextlib.contextmanager
def _sentinels(entries: Sequence[tuple[str, nn.Module, str]]) -> Iterator[list[_Sentinel]]:
    rng = np.random.default_rng(20240607)
    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    out: list[_Sentinel] = []
    try:
        for public, module, buf in entries:
            real = getattr(module, buf)
            shape = tuple(real.shape)
            raw = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
            sentinel_t = torch.from_numpy(raw).to(real.dtype)
            # Values must be exactly representable to be found again byte for byte.
            out.append(_Sentinel(public, _to_numpy(sentinel_t), _to_numpy(real)))
            saved.append((module, buf, real))
            setattr(module, buf, sentinel_t.to(real.device))
        yield out
    finally:
        for module, buf, real in saved:
            setattr(module, buf, real)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)  # raw bits; compared as bytes only
    return t.numpy()


def _bind_initializers(ir_model, sentinels: Sequence[_Sentinel]) -> None:
    """Find each sentinel among the graph's initializers, rename it to its public name and
    give it its real value."""
    import onnx_ir as ir

    graph = ir_model.graph
    by_size: dict[int, list] = {}
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None:
            continue
        by_size.setdefault(int(np.prod(tensor.shape.numpy())) if len(tensor.shape) else 1, []).append(value)
    for s in sentinels:
        want = s.sentinel.tobytes()
        hits = []
        for value in by_size.get(s.sentinel.size, []):
            tensor = value.const_value
            if tensor.nbytes != len(want):
                continue
            if tensor.tobytes() == want:
                hits.append(value)
        if len(hits) != 1:
            raise RuntimeError(f"the exported graph holds {len(hits)} copies of correction constant {s.name} "
                               "(expected exactly one named initializer; the exporter changed the correction)")
        value = hits[0]
        shape = tuple(value.const_value.shape.numpy())
        real = s.value.reshape(shape)
        dtype = value.const_value.dtype
        value.name = s.name
        if real.dtype == np.uint16 and dtype == ir.DataType.BFLOAT16:
            value.const_value = ir.Tensor(real, dtype=ir.DataType.BFLOAT16, name=s.name)
        else:
            value.const_value = ir.tensor(real, name=s.name)


# ======================================================================================
# export steps
# ======================================================================================
def _quiet():
    """Silence the exporter's progress prints and routine warnings."""
    return quiet("torch.onnx", "torch._export", "torch.export", "torch._dynamo",
                 "torch.fx.experimental.symbolic_shapes", "onnxscript")


# onnxscript (0.7) matches a rewrite pattern with two output nodes by scanning the whole graph
# once per node, so such a rule costs time quadratic in the graph's size. Its one default rule
# of that kind, SlicesSplit (x[..., :h] and x[..., h:] -> one Split, rotate_half's pair), took
# 49 s of a 159 s organism export on 2 cores and about 1 s of a 18 s tiny one
# (benchmarks/onnx_rewrites.py). It never rewrote anything in these graphs (the optimized
# graphs are byte-identical without it), and the two Slices it merges give the same values.
QUADRATIC_REWRITES = frozenset({"SlicesSplit"})


@contextlib.contextmanager
def _linear_time_rewrites() -> Iterator[None]:
    """torch.onnx's optimizer pass without ``QUADRATIC_REWRITES``. The rule list is
    onnxscript's private ``rewriter._DEFAULT_REWRITE_RULES``, which its optimizer reads on every
    call; an onnxscript without it exports unchanged, only slower. Not thread-safe: another
    thread's onnxscript optimizer sees the same list meanwhile."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in QUADRATIC_REWRITES)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _torch_onnx_export(module: nn.Module, args: tuple, *, dynamic_shapes: Any, input_names: list[str],
                       output_names: list[str], opset: int, optimizer=None):
    """``optimizer``: run this on the exported ONNX IR model instead of torch.onnx's optimizer pass."""
    with _quiet(), _linear_time_rewrites(), torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
            output_names=output_names, opset_version=opset, optimize=optimizer is None, verbose=False, report=False,
        )
        if optimizer is not None:
            optimizer(program.model)
    _warn_on_capture_fallback(program, type(module).__name__)
    return program


def _warn_on_capture_fallback(program, what: str) -> None:
    """torch.onnx tries torch.export's non-strict capture first and falls back silently; the
    strict capture once took a 1.1B export from 1.15x to 2.53x the model's size in memory
    (benchmarks/RESULTS.md), so say when it happened. The strategy is a private attribute."""
    strategy = getattr(program, "_capture_strategy", None)
    if strategy is not None and strategy != "TorchExportNonStrictStrategy":
        log.warning("%s: torch.export's non-strict capture failed; torch.onnx fell back to %s, which can "
                    "take noticeably more time and memory", what, strategy)


def _export_decoder(model: nn.Module, adapter: ModelAdapter, path: Path, *, embeds: bool,
                    readout: ScoreReadout | None, external_data: bool | None, opset: int,
                    options: RegapOptions | None = None, channel_positions: str | None = None,
                    graph: "GraphFacts") -> _DecoderInfo:
    """``channel_positions``: find image rows from the modality channel and correct these
    positions of them (``image_rows``), instead of taking ``regap_image_mask``.

    The graph is traced on one block of each kind and the other blocks are copied in
    (``stitch``); when the blocks are all different, or the traced graph is not in a form the
    stitcher knows, every block is traced."""
    start = time.perf_counter()
    alpha = _has_scaled(model)
    channel = channel_positions is not None
    image_mask = _has_corrections(model) and not channel
    mrope = position_config(adapter.family, model.config)["rank"] == 3
    geometry = functools.partial(_cache_geometry, model, adapter, embeds, alpha)
    trace = functools.partial(_trace_decoder, model, adapter, embeds=embeds, alpha=alpha, image_mask=image_mask,
                              channel_positions=channel_positions, mrope=mrope, opset=opset)
    ir_model, (num_layers, kv_heads, head_dims) = _stitched_decoder(model, adapter, readout, geometry, trace,
                                                                    channel=channel)
    if ir_model is None:
        num_layers, kv_heads, head_dims = geometry()
        ir_model = trace(readout=readout, kv_heads=kv_heads, head_dims=head_dims)
    key_dims = _key_dims(head_dims, channel)
    input_names, output_names = _decoder_names(embeds=embeds, image_mask=image_mask, alpha=alpha,
                                                readout=readout is not None, num_layers=num_layers)
    main_name = input_names[0]
    dims = {main_name: [BATCH, SEQ] + ([] if not embeds else [None]),
            "attention_mask": [BATCH, TOTAL], "position_ids": [None, BATCH, SEQ] if mrope else [BATCH, SEQ],
            "logits": [BATCH, SEQ, None]}
    if alpha:
        dims["regap_alpha"] = [BATCH]
    if image_mask:
        # Dimension names of its own: the [1, 1] default broadcasts, and ONNX Runtime would
        # otherwise plan every [batch, seq] buffer for batch 1 and length 1.
        dims[IMAGE_MASK] = [MASK_BATCH, MASK_SEQ]
    if readout is not None:
        dims["regap_score"] = [BATCH, SEQ]
    for i in range(num_layers):
        for kv in ("key", "value"):
            dims[f"past_key_values.{i}.{kv}"] = [BATCH, None, PAST, None]
            dims[f"present.{i}.{kv}"] = [BATCH, None, TOTAL, None]
    _name_dims(ir_model, dims)
    if image_mask:
        default = mask_default(options.positions) if options is not None else 1.0
        _make_overridable(ir_model, IMAGE_MASK, np.full((1, 1), default, dtype=np.float32))
        _drop_shapes_downstream(ir_model, IMAGE_MASK)
    _check_cache_flows(ir_model, num_layers)
    _set_metadata(ir_model, graph.metadata(ROLE_DECODER if embeds else ROLE_MODEL,
                                           IMAGE_ROWS_MASK if image_mask else graph.image_rows))
    _save(ir_model, path, external_data)
    corrections = []
    for block in adapter.decoder_layers(model):
        if isinstance(block, CorrectedBlock):
            corrections.append({"layer": block.correction.layer, "kind": block.correction.kind})
    seconds = time.perf_counter() - start
    log.info("exported %s in %.1f s", path.name, seconds)
    return _DecoderInfo(num_layers, kv_heads, head_dims, key_dims, corrections, alpha, readout is not None,
                        input_names, output_names, seconds, image_mask, channel)


def _key_dims(head_dims: list[int], channel: bool) -> list[int]:
    """The last dimension of each layer's key cache: layer 0's keys carry the image flag in one
    more channel when the decoder reads the modality channel."""
    return [head_dims[0] + 1] + head_dims[1:] if channel else list(head_dims)


def _decoder_names(*, embeds: bool, image_mask: bool, alpha: bool, readout: bool, num_layers: int
                   ) -> tuple[list[str], list[str]]:
    input_names = ["inputs_embeds" if embeds else "input_ids", "attention_mask", "position_ids"]
    input_names += [IMAGE_MASK] if image_mask else []
    input_names += ["regap_alpha"] if alpha else []
    input_names += [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    output_names = ["logits"] + (["regap_score"] if readout else [])
    output_names += [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return input_names, output_names


def _stitched_decoder(model: nn.Module, adapter: ModelAdapter, readout: ScoreReadout | None, geometry, trace, *,
                      channel: bool) -> tuple[Any, tuple[int, list[int], list[int]]]:
    """The decoder graph traced on one block of each kind, the others copied in, and the cache
    geometry (``_cache_geometry``, measured on the traced blocks: a block has its kind's); None
    (and the reason in the log) where that does not apply. ``channel``: the wrapper gives block
    0's key cache the image flag (``image_rows``), so block 0 is copied to no other block."""
    from . import stitch

    blocks = adapter.decoder_layers(model)
    plan, reason = stitch.plan_layers(blocks, first_is_special=channel,
                                      readout_layer=None if readout is None else readout.layer,
                                      model_type=getattr(model.config, "model_type", None))
    if plan is None:
        log.info("tracing every decoder block: %s", reason)
        return None, (0, [], [])
    try:
        with stitch.truncated(model, adapter, plan) as truncation:
            traced_layers, kv_heads, head_dims = geometry()
            if traced_layers != len(plan.elements) or kv_heads[0] is None:
                raise stitch.NotStitchable(f"the truncated model's cache has {traced_layers} layers")
            # A correction element has no cache of its own; its past and present pass through.
            kv_heads = [h if h is not None else kv_heads[0] for h in kv_heads]
            head_dims = [d if d is not None else head_dims[0] for d in head_dims]
            layers_fqn = f"model.{truncation.layers_path}"   # DecoderWrapper holds the model as `model`
            traced_readout = None if readout is None else dataclasses.replace(
                readout, layer=truncation.readout_element(readout.layer))
            ir_model = trace(readout=traced_readout, kv_heads=kv_heads, head_dims=head_dims,
                             optimizer=stitch.optimizer(truncation, layers_fqn))
        stitch.expand(ir_model, truncation, layers_fqn)
    except Exception as exc:  # noqa: BLE001 - every block traced is the export as it always was
        log.warning("could not build the decoder from one traced block per kind (%s: %s); tracing all %d blocks",
                    type(exc).__name__, exc, len(blocks))
        return None, (0, [], [])
    log.info("decoder traced on %s of %d, the others copied", plan.describe(), len(blocks))
    blocks_of = [block for block, _ in plan.layers]
    return ir_model, (plan.num_layers, [kv_heads[t] for t in blocks_of], [head_dims[t] for t in blocks_of])


def _trace_decoder(model: nn.Module, adapter: ModelAdapter, *, embeds: bool, alpha: bool, image_mask: bool,
                   channel_positions: str | None, mrope: bool, opset: int, readout: ScoreReadout | None,
                   kv_heads: list[int], head_dims: list[int], optimizer=None) -> Any:
    """The optimized ONNX IR model of ``DecoderWrapper`` on ``model`` as it is (all its blocks, or
    the ones ``stitch.truncated`` keeps), correction constants bound to their public names."""
    from torch.export import Dim

    channel = channel_positions is not None
    num_layers = len(kv_heads)
    key_dims = _key_dims(head_dims, channel)
    dtype = next(model.parameters()).dtype
    B, S, P = _SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST

    batch, seq, past_len = Dim(BATCH), Dim(SEQ), Dim(PAST)
    if embeds:
        main = torch.randn(B, S, adapter.hidden_size(model) + int(channel), dtype=dtype)
    else:
        vocab = int(adapter.text_config(model.config).vocab_size)
        main = torch.randint(0, vocab, (B, S), dtype=torch.long)
    mask = torch.ones(B, P + S, dtype=torch.long)
    position_ids = torch.arange(P, P + S, dtype=torch.long).unsqueeze(0).expand(B, S).contiguous()
    # M-RoPE families take [3, batch, seq] (temporal, height, width) position ids.
    if mrope:
        position_ids = position_ids.unsqueeze(0).expand(3, B, S).contiguous()
    past = []
    for i in range(num_layers):
        past += [torch.randn(B, kv_heads[i], P, key_dims[i], dtype=dtype),
                 torch.randn(B, kv_heads[i], P, head_dims[i], dtype=dtype)]
    if channel:  # both kinds of rows and flags in the sample, so that no branch of the trace sees a constant
        main[..., -1] = (torch.arange(S) % 3 == 1).to(dtype)
        past[0][..., -1] = (torch.arange(B) % 2).to(dtype)[:, None, None]
    # A sample mask with both values, so that no branch of the trace sees a constant.
    extra = [(torch.arange(S) % 2).to(torch.float32).expand(B, S).contiguous()] if image_mask else []
    extra += [torch.ones(B, dtype=torch.float32)] if alpha else []
    args = tuple(a.to(_device(model)) for a in (main, mask, position_ids, *extra, *past))

    input_names, output_names = _decoder_names(embeds=embeds, image_mask=image_mask, alpha=alpha,
                                                readout=readout is not None, num_layers=num_layers)
    dynamic_shapes = {
        "main": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},
        "position_ids": {1: batch, 2: seq} if mrope else {0: batch, 1: seq},
        "rest": tuple(([{0: batch, 1: seq}] if image_mask else []) + ([{0: batch}] if alpha else [])
                      + [{0: batch, 2: past_len}] * (2 * num_layers)),
    }

    wrapper = DecoderWrapper(model, adapter, num_layers=num_layers, embeds=embeds, alpha=alpha, readout=readout,
                             image_mask=image_mask, channel_positions=channel_positions).eval()
    entries = _correction_entries(model, adapter)
    try:
        score_entries = [(SCORE_W, wrapper, "score_w"), (SCORE_B, wrapper, "score_b")] if readout is not None else []
        flag_attention = flagged_attention(model) if channel else contextlib.nullcontext()
        with _sentinels(entries + score_entries) as sentinels, flag_attention:
            program = _torch_onnx_export(wrapper, args, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                         output_names=output_names, opset=opset, optimizer=optimizer)
    finally:
        wrapper.remove_hook()
    ir_model = program.model
    _bind_initializers(ir_model, sentinels)
    return ir_model


class _VisionWrapper(nn.Module):
    """The family's encoder; with ``channel``, every output row gets the modality channel 1."""

    def __init__(self, model: nn.Module, spec: VisionSpec, channel: bool = False):
        super().__init__()
        self.model = model
        self.spec = spec
        self.channel = channel

    def forward(self, *inputs: torch.Tensor):
        out = self.spec.encode(self.model, *inputs)
        if not self.channel:
            return out
        if isinstance(out, tuple):
            return tuple(with_image_channel(o, 1.0) for o in out)
        return with_image_channel(out, 1.0)


def _export_vision(model: nn.Module, spec: VisionSpec, path: Path, *, external_data: bool | None, opset: int,
                   graph: "GraphFacts") -> None:
    from torch.export import Dim

    n = Dim(NUM_IMAGES)
    args = tuple(a.to(_device(model)) for a in spec.sample(model, _SAMPLE_IMAGES))
    wrapper = _VisionWrapper(model, spec, graph.image_rows == IMAGE_ROWS_CHANNEL).eval()
    per_input = spec.dynamic(model, Dim) if spec.dynamic is not None else tuple({0: n} for _ in args)
    dynamic_shapes = {"inputs": per_input}
    with spec.patches():
        program = _torch_onnx_export(wrapper, args, dynamic_shapes=dynamic_shapes, input_names=list(spec.inputs),
                                     output_names=list(spec.outputs), opset=opset)
    if spec.dim_names is not None:
        dims = dict(spec.dim_names)
    else:
        dims = {name: [NUM_IMAGES] + [None] * (a.dim() - 1) for name, a in zip(spec.inputs, args)}
        dims["image_features"] = [NUM_IMAGES, None, None]
    _name_dims(program.model, dims)
    _drop_intermediate_shapes(program.model)
    _set_metadata(program.model, graph.metadata(ROLE_VISION, graph.image_rows))
    _save(program.model, path, external_data)


class _EmbedWrapper(nn.Module):
    """The token embeddings; with ``channel``, every row gets the modality channel 0."""

    def __init__(self, embeddings: nn.Module, channel: bool = False):
        super().__init__()
        self.embeddings = embeddings
        self.channel = channel

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.embeddings(input_ids)
        return with_image_channel(embeds, 0.0) if self.channel else embeds


def _export_embeddings(model: nn.Module, path: Path, *, external_data: bool | None, opset: int,
                       graph: "GraphFacts") -> None:
    from torch.export import Dim

    wrapper = _EmbedWrapper(model.get_input_embeddings(), graph.image_rows == IMAGE_ROWS_CHANNEL).eval()
    args = (torch.zeros(_SAMPLE_BATCH, _SAMPLE_SEQ, dtype=torch.long, device=_device(model)),)
    dynamic_shapes = {"input_ids": {0: Dim(BATCH), 1: Dim(SEQ)}}
    program = _torch_onnx_export(wrapper, args, dynamic_shapes=dynamic_shapes, input_names=["input_ids"],
                                 output_names=["inputs_embeds"], opset=opset)
    _name_dims(program.model, {"input_ids": [BATCH, SEQ], "inputs_embeds": [BATCH, SEQ, None]})
    _set_metadata(program.model, graph.metadata(ROLE_EMBED, graph.image_rows))
    _save(program.model, path, external_data)


# ======================================================================================
# graph finishing and files
# ======================================================================================
def _name_dims(ir_model, dims: dict[str, list[str | None]]) -> None:
    """Give the graph's inputs and outputs the contract's symbolic dimension names
    (``None`` keeps the dimension as exported)."""
    import onnx_ir as ir

    for value in list(ir_model.graph.inputs) + list(ir_model.graph.outputs):
        names = dims.get(value.name)
        if names is None or value.shape is None:
            continue
        old = list(value.shape)
        if len(old) != len(names):
            raise RuntimeError(f"{value.name}: exported rank {len(old)}, contract rank {len(names)}")
        new = [ir.SymbolicDim(n) if n is not None else d for n, d in zip(names, old)]
        value.shape = ir.Shape(new)


def _drop_intermediate_shapes(ir_model) -> None:
    """Forget the traced shapes of intermediate values (ONNX Runtime infers them again).

    Float ``arange`` (Idefics3's patch-position boundaries) can count one element more in
    torch than ONNX's Range computes; the extra boundary never changes the result, but the
    recorded shape would make ONNX Runtime warn about a shape mismatch at load time."""
    outputs = {id(v) for v in ir_model.graph.outputs}
    for node in ir_model.graph:
        for value in node.outputs:
            if id(value) not in outputs:
                value.shape = None


def _make_overridable(ir_model, name: str, default: np.ndarray) -> None:
    """Give graph input ``name`` a default value: an initializer of the same name (ONNX IR >= 4).
    ONNX Runtime then lists it among the overridable initializers instead of the required
    inputs, uses the default when the input is not fed, and the fed value otherwise."""
    import onnx_ir as ir

    value = next((v for v in ir_model.graph.inputs if v.name == name), None)
    if value is None:
        raise RuntimeError(f"the exported graph has no input {name!r}")
    value.const_value = ir.tensor(default, name=name)
    ir_model.graph.register_initializer(value)


_BROADCASTING = ("Add", "Mul", "Sub", "Div")


def _drop_shapes_downstream(ir_model, name: str) -> None:
    """Forget the traced shapes of every value computed from input ``name`` (graph outputs
    keep theirs): traced as [batch, seq, ...], they are [1, 1, ...] when the [1, 1] default
    feeds them, and ONNX Runtime plans buffers from recorded shapes."""
    outputs = {id(v) for v in ir_model.graph.outputs}
    tainted = {id(v) for v in ir_model.graph.inputs if v.name == name}
    for node in ir_model.graph:  # topological order
        if not any(v is not None and id(v) in tainted for v in node.inputs):
            continue
        if node.op_type in _BROADCASTING and len(node.outputs) == 1:
            # An elementwise op with an untainted operand of the output's full shape (the
            # residual add h + m v, the gate g * m) has that shape whatever the mask's is.
            shape = node.outputs[0].shape
            if shape is not None and any(v is not None and id(v) not in tainted and v.shape == shape
                                         for v in node.inputs):
                continue
        for value in node.outputs:
            tainted.add(id(value))
            if id(value) not in outputs:
                value.shape = None


def _set_metadata(ir_model, props: dict[str, str]) -> None:
    ir_model.metadata_props.update(props)


def _weight_bytes(ir_model) -> int:
    total = 0
    for value in ir_model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _save(ir_model, path: Path, external_data: bool | None) -> None:
    """Write ``ir_model`` to ``path``; its weights to ``path.data`` when ``external_data`` (None:
    when over ``EXTERNAL_DATA_BYTES``). Initializers are written one at a time, and lazy ones
    (the stitched decoder's weights, computed from the torch tensors) only then computed."""
    import onnx_ir as ir

    path = Path(path)
    use_external = external_data if external_data is not None else _weight_bytes(ir_model) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if use_external:
        ir.save(ir_model, str(path), external_data=data.name)
    else:
        ir.save(ir_model, str(path))


def _config_json(model: nn.Module, adapter: ModelAdapter, dtype: torch.dtype, info: _DecoderInfo,
                 readout: ScoreReadout | None, options: RegapOptions | None, opset: int, *,
                 files: dict[str, str], kind: str, graph: "GraphFacts") -> dict[str, Any]:
    text = adapter.text_config(model.config)
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    pad = getattr(generation, "pad_token_id", None) if generation is not None else None
    if pad is None:
        pad = getattr(text, "pad_token_id", None)
    return {
        "contract": CONTRACT_VERSION,
        "kind": kind,
        "family": adapter.family,
        "model_type": getattr(model.config, "model_type", None),
        "dtype": str(dtype).replace("torch.", ""),
        "opset": opset,
        "files": files,
        "num_layers": info.num_layers,
        "num_key_value_heads": info.kv_heads,
        "head_dim": info.head_dims,
        "key_dim": info.key_dims,
        "hidden_size": adapter.hidden_size(model),
        "vocab_size": int(text.vocab_size),
        "corrections": info.corrections,
        "regap_alpha": info.has_alpha,
        "regap_score": info.has_score,
        "regap_image_mask": info.has_image_mask,
        "image_rows": (IMAGE_ROWS_CHANNEL if info.image_channel
                       else IMAGE_ROWS_MASK if info.has_image_mask else None),
        "export_id": graph.export_id,
        "readout": None if readout is None else {"layer": readout.layer, "kappa": float(readout.kappa)},
        "options": None if options is None else json.loads(options.to_json()),
        "eos_token_id": [eos] if isinstance(eos, int) else (list(eos) if eos is not None else []),
        "pad_token_id": pad,
        "position_ids": position_config(adapter.family, model.config),
        "decoder_inputs": info.input_names,
        "decoder_outputs": info.output_names,
        "export_seconds": round(info.seconds, 2),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


