"""Model families: one module per family, looked up by ``config.model_type``.

This package is the only place in regap-export that knows model internals. Each family
module (``llama.py``, ``qwen2_vl.py``, ...) registers one ``ModelAdapter`` per family, which
carries everything about it: where the decoder blocks are, its chat template, its pixel
inputs, and for multimodal families the ONNX split's vision export spec, vision runtime and
position scheme. The lookups below read that registry; no other table names families.
See docs/ADDING_A_FAMILY.md.

Neither this package nor the family modules import torch or transformers at module level
(functions that need them import them), so the ONNX runtime can use the lookups with numpy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ModelError, RegapError
from .base import ModelAdapter, tokenizer_of

if TYPE_CHECKING:
    from .vision_runtime import VisionRuntime

_REGISTRY: dict[str, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    for model_type in adapter.model_types:
        if model_type in _REGISTRY:
            raise RuntimeError(f"model_type {model_type!r} registered twice")
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def registered_adapters() -> list[ModelAdapter]:
    """Every registered adapter once, in registration order."""
    return list({id(adapter): adapter for adapter in _REGISTRY.values()}.values())


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


def adapter_for_family(family: str) -> ModelAdapter | None:
    """The adapter whose ``family`` is ``family`` (as exports record it), or None."""
    return next((a for a in registered_adapters() if a.family == family), None)


def vision_runtime_for(family: str) -> VisionRuntime:
    """The numpy image-input handling of ``family`` (an export's ``family``; a model type works too)."""
    adapter = adapter_for_family(family) or _REGISTRY.get(family)
    if adapter is None or adapter.vision_runtime is None:
        raise RegapError(f"no image input handling for family {family!r}")
    return adapter.vision_runtime


def pixel_extra_keys() -> tuple[str, ...]:
    """Processor outputs beside ``pixel_*`` that some family's image path needs."""
    return tuple(dict.fromkeys(k for a in registered_adapters() for k in a.pixel_extra_keys))


# Each family module registers its adapter(s) on import.
from . import gemma, idefics3, llama, llava, mistral, qwen2, qwen2_vl  # noqa: E402,F401

__all__ = ["ModelAdapter", "register", "adapter_for_config", "adapter_for_model", "adapter_for_family",
           "registered_adapters", "supported_model_types", "tokenizer_of", "vision_runtime_for",
           "pixel_extra_keys"]
