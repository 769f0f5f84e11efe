"""Model families: one adapter per family, looked up by ``config.model_type``.

This package is the only place in regap-export that knows model internals.
"""
from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .base import ModelAdapter, tokenizer_of

_REGISTRY: dict[str, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    for model_type in adapter.model_types:
        if model_type in _REGISTRY:
            raise RuntimeError(f"model_type {model_type!r} registered twice")
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for_config(config: Any, *, source: str | None = None) -> ModelAdapter:
    model_type = getattr(config, "model_type", None)
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise ModelError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}",
            path=source,
        )
    return adapter


def adapter_for_model(model: Any) -> ModelAdapter:
    return adapter_for_config(model.config)


# Each family module registers its adapter(s) on import.
from . import gemma, idefics3, llama, llava, mistral, qwen2, qwen2_vl  # noqa: E402,F401

__all__ = ["ModelAdapter", "register", "adapter_for_config", "adapter_for_model",
           "supported_model_types", "tokenizer_of"]
