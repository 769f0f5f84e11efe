"""Load a model folder (or an embedded default model) with its processor and adapter."""
from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, first_line
from . import adapter_for_config
from .base import ModelAdapter
from .quantization import check_dense, check_source_quantization, strip_quantization

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any  # a tokenizer for text families, a processor for multimodal ones
    adapter: ModelAdapter
    source: str
    folder: Path

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model, self.adapter)


def model_fingerprint(model: nn.Module, adapter: ModelAdapter) -> str:
    """Hash of the architecture (model type, text config sizes) and every parameter shape.

    Weights are not hashed: directions fitted on a model transfer to its re-saves and
    dtype casts, but not to a model of another shape.
    """
    text = adapter.text_config(model.config)
    description = {
        "model_type": model.config.model_type,
        "hidden_size": int(text.hidden_size),
        "num_hidden_layers": int(text.num_hidden_layers),
        "vocab_size": int(text.vocab_size),
        "parameters": [[name, list(p.shape)] for name, p in _original_parameters(model)],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _original_parameters(model: nn.Module):
    """named_parameters as the unmodified model names them: a wrapper module that marks
    itself with ``wraps_attribute`` (the correction layer's block wrapper) is looked through."""
    wrappers = {prefix: module.wraps_attribute for prefix, module in model.named_modules()
                if getattr(type(module), "wraps_attribute", None)}
    for name, param in model.named_parameters():
        parts = name.split(".")
        kept = []
        for i, part in enumerate(parts):
            prefix = ".".join(parts[:i])
            if prefix in wrappers and part != wrappers[prefix]:
                break  # the wrapper's own parameters (none today) are not the model's
            if not (prefix in wrappers and part == wrappers[prefix]):
                kept.append(part)
        else:
            yield ".".join(kept), param


def resolve_source(source: str | Path | None) -> tuple[str, Path]:
    """A user's MODEL argument as (display name, local folder). Embedded names build once."""
    from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS, materialize

    name = str(source) if source is not None else DEFAULT_MODEL
    if name in EMBEDDED_MODELS:
        return name, materialize(name)
    folder = Path(name)
    if not folder.exists():
        raise ModelError("no such model folder", path=folder,
                         hint=f"give a local model folder or one of {', '.join(EMBEDDED_MODELS)}")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelError("not a model folder: config.json is missing", path=folder,
                         hint="point MODEL at a folder saved with save_pretrained")
    check_folder_files(folder)
    return name, folder


def check_folder_files(folder: Path) -> None:
    """Every file transformers may open in a model folder is a regular file (links followed, as
    in a Hugging Face cache snapshot): a FIFO, socket or device would block its read."""
    import os
    import stat

    for entry in sorted(folder.iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError as exc:
            raise ModelError(f"cannot read ({exc.strerror or exc})", path=entry,
                             hint="remove the broken link or file") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelError("not a regular file; a model folder holds files and folders only", path=entry,
                             hint="remove it")


def load_model(source: str | Path | None = None, *, dtype: str = "fp32", device: str = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    import transformers
    from transformers import AutoConfig

    name, folder = resolve_source(source)
    config_path = folder / "config.json"
    from ..io.files import read_strict_json

    raw = read_strict_json(config_path, what="config.json", error=ModelError,
                           hint="point MODEL at a folder saved with save_pretrained")
    quantized = check_source_quantization(config_path, raw) if isinstance(raw, dict) else None
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"config.json cannot be read ({exc})", path=config_path) from None
    if quantized:
        strip_quantization(config)  # the weights are dense already (models/quantization.py)
    adapter = adapter_for_config(config, source=str(config_path))
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of fp32, fp16, bf16")
    auto_class = getattr(transformers, adapter.auto_class_name)
    try:
        extra = {"config": config} if quantized else {}
        # Weights only from safetensors: a pickled checkpoint (pytorch_model.bin) is never unpickled.
        model = auto_class.from_pretrained(folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                           use_safetensors=True, **extra)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ModelError(f"the model cannot be loaded ({first_line(exc)})", path=folder,
                         hint="regap-export reads weights from safetensors files only") from None
    if quantized:
        check_dense(model, quantized, folder)
    processor = _load_processor(folder, adapter, trust_remote_code)
    model.to(device).eval()
    return LoadedModel(model, processor, adapter, name, folder)


def _load_processor(folder: Path, adapter: ModelAdapter, trust_remote_code: bool) -> Any:
    # The adapter's loader: Qwen2-VL's processor needs a video processor (torchvision) unless
    # the adapter builds an image-only one.
    try:
        return adapter.load_processor(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers and tokenizers raise many types for a malformed file
        raise ModelError(f"the tokenizer/processor cannot be loaded ({first_line(exc)})", path=folder) from None
