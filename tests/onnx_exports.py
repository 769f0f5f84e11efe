"""Tiny models and their ONNX exports, built once per test process (``exported(kind)``), and
the small helpers the ONNX, runtime and bad-input tests share to drive the graphs."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from regap_export.io.artifacts import read_config
from regap_export.export.onnx_export import export_multimodal, export_text_decoder
from regap_export.method.folding import FIXED, GATED, SCALED, LayerCorrection, ScoreReadout
from regap_export.models.base import ModelAdapter, cache_of, with_cache
from regap_export.options import Band, RegapOptions
from regap_export.method.rewrite import insert_corrections


HIDDEN, LAYERS, VOCAB = 64, 4, 256
ATOL = 1e-4
GATED_OPS = ["MatMul", "Add", "Sigmoid", "Mul", "Mul", "Add"]
FIXED_OPS = ["Mul", "Add"]


# ----------------------------------------------------------------------------------------
# tiny models and their exports (built once per session)
# ----------------------------------------------------------------------------------------
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def llama_adapter(model: torch.nn.Module) -> ModelAdapter:
    from regap_export.models import adapter_for_model

    return adapter_for_model(model)


def regap_corrections(seed: int = 1, *, zero_fixed: bool = False) -> list[LayerCorrection]:
    """fixed at layer 1, gated at layers 2-3 (random constants; ``zero_fixed``: v = 0 at layer 1)."""
    g = torch.Generator().manual_seed(seed)
    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale
    fixed_v = r(HIDDEN, scale=0.5)
    return [
        LayerCorrection(1, FIXED, torch.zeros(HIDDEN) if zero_fixed else fixed_v),
        LayerCorrection(2, GATED, r(HIDDEN, scale=0.5), r(HIDDEN, scale=0.3), 0.25),
        LayerCorrection(3, GATED, r(HIDDEN, scale=0.5), r(HIDDEN, scale=0.3), -0.4),
    ]


def seq_corrections(seed: int = 2) -> tuple[list[LayerCorrection], ScoreReadout, RegapOptions]:
    g = torch.Generator().manual_seed(seed)
    corrections = [LayerCorrection(layer, SCALED, torch.randn(HIDDEN, generator=g) * 0.5) for layer in (1, 2, 3)]
    readout = ScoreReadout(layer=1, w=torch.randn(HIDDEN, generator=g) * 0.2, b=0.1, kappa=4.0)
    options = RegapOptions(mode="regap-seq", probe_band=Band(1, 2), adaptive_band=Band(2, 4),
                           alpha0=1.0, alpha_max=1.5, tau=0.5, positions="all")
    return corrections, readout, options


@dataclass
class Export:
    model: torch.nn.Module
    adapter: ModelAdapter
    folder: Path
    corrections: list[LayerCorrection]
    readout: ScoreReadout | None = None
    options: RegapOptions | None = None
    processor: Any = None

    @property
    def path(self) -> Path:
        files = read_config(self.folder)["files"]
        return self.folder / files["decoder"]


_ROOT = Path(tempfile.mkdtemp(prefix="regap_onnx_tests_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def exported(kind: str) -> Export:
    """kind: plain | regap | seq | fp16 | idefics3 | llava | llava_next. The graphs go to
    ``<root>/<kind>/onnx`` with a manifest beside (``with_manifest``), as an export writes them."""
    folder = _ROOT / kind / "onnx"
    if kind in ("plain", "regap", "seq", "fp16"):
        model = tiny_llama()
        adapter = llama_adapter(model)
        readout = options = None
        corrections: list[LayerCorrection] = []
        if kind in ("regap", "fp16"):
            # fp16 also checks that a zero correction (x + 0) survives the exporter's optimizer
            corrections = regap_corrections(zero_fixed=kind == "fp16")
        elif kind == "seq":
            corrections, readout, options = seq_corrections()
        insert_corrections(model, adapter, corrections)
        dtype = torch.float16 if kind == "fp16" else torch.float32
        # regap-seq is written with external data (as models over 2 GB are)
        export_text_decoder(model, adapter, folder, dtype=dtype, readout=readout, options=options,
                            external_data=kind == "seq")
        with_manifest(folder)
        return Export(model, adapter, folder, corrections, readout, options)
    if kind in ("idefics3", "llava", "llava_next"):
        tiny_models = pytest.importorskip("tiny_models")
        model, processor = tiny_models.build_tiny(kind)
        from regap_export.models import adapter_for_model

        adapter = adapter_for_model(model)
        corrections = regap_corrections()
        insert_corrections(model, adapter, corrections)
        export_multimodal(model, adapter, folder, dtype=torch.float32)
        with_manifest(folder)
        return Export(model, adapter, folder, corrections, processor=processor)
    raise KeyError(kind)


def with_manifest(graph_folder: Path) -> Path:
    """Write the manifest an export would write beside ``graph_folder`` (its parent must hold
    nothing else), so ``OrtSessions.open`` accepts graphs exported on their own: the runtime
    runs only verified folders (``io.artifacts.ExportedFolder``)."""
    import json

    from regap_export.export.manifest import write_manifest

    config = read_config(graph_folder)
    options = (RegapOptions.from_json(json.dumps(config["options"])) if config.get("options") is not None
               else RegapOptions())
    write_manifest(Path(graph_folder).parent, {
        "model": {"source": "tests", "family": config["family"], "fingerprint": "", "multimodal":
                  config["kind"] == "multimodal"},
        "calibration_sha256": "0" * 64, "mode": options.mode, "dtype": "fp32", "formats": ["onnx"],
        "options": options.to_json()})
    return graph_folder


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def left_padded_batch(seed: int = 0, lengths=(9, 6)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(3, VOCAB, size=n)
        mask[row, width - n:] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    return pos


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def empty_past(cfg: dict, batch: int, dtype=np.float32) -> dict[str, np.ndarray]:
    feeds = {}
    key_dims = cfg.get("key_dim") or cfg["head_dim"]
    for i in range(cfg["num_layers"]):
        heads = cfg["num_key_value_heads"][i]
        feeds[f"past_key_values.{i}.key"] = np.zeros((batch, heads, 0, key_dims[i]), dtype)
        feeds[f"past_key_values.{i}.value"] = np.zeros((batch, heads, 0, cfg["head_dim"][i]), dtype)
    return feeds


def run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def torch_step(model, *, mask, pos, ids=None, embeds=None, cache=None, alpha=None):
    kwargs: dict[str, Any] = dict(attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos),
                                  use_cache=True, **with_cache(model, cache))
    if ids is not None:
        kwargs["input_ids"] = torch.from_numpy(ids)
    else:
        kwargs["inputs_embeds"] = torch.from_numpy(embeds)
    if alpha is not None:
        kwargs["regap_alpha"] = torch.from_numpy(alpha)
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits.float().numpy(), cache_of(out)


def assert_close_valid(ort_logits, torch_logits, mask_now, atol=ATOL):
    """Compare at attended positions only (padding rows are unspecified by the contract)."""
    seq = ort_logits.shape[1]
    valid = mask_now[:, -seq:].astype(bool)
    diff = np.abs(ort_logits - torch_logits)[valid]
    assert diff.max() <= atol, f"max |ORT - torch| = {diff.max():.3g}"


def assert_presents_close(outputs, cache, mask_total, layers, atol=ATOL):
    valid = mask_total.astype(bool)
    for i in range(layers):
        for kv, ref in (("key", cache.layers[i].keys), ("value", cache.layers[i].values)):
            got = outputs[f"present.{i}.{kv}"]
            ref = ref.float().numpy()
            assert got.shape == ref.shape
            diff = np.abs(got - ref).transpose(0, 2, 1, 3)[valid]
            assert diff.max() <= atol, f"present.{i}.{kv}: {diff.max():.3g}"



def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, size=(40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def multimodal_batch(exp: Export) -> dict[str, torch.Tensor]:
    """A left-padded batch of two prompts, each with one image."""
    adapter, processor = exp.adapter, exp.processor
    prompts = [adapter.render_prompt(processor, "Describe this picture in detail please.", True),
               adapter.render_prompt(processor, "What is it?", True)]
    return adapter.encode(processor, prompts, _images(2))
