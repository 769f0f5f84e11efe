"""Source model folders whose config.json declares a quantization (``quantization_config``).

regap-export fits and folds its corrections against dense weights and writes the corrected
checkpoint with ``save_pretrained``, which transformers refuses for most quantized models
(``The model is quantized with gguf and is not serializable``). So ``load_model`` decides
before any work, from config.json alone (top level and any ``*_config``):

- ``quant_method`` "gguf" (``DENSE_METHODS``): a folder saved from a GGUF-loaded model.
  transformers dequantized the GGUF blocks when it loaded the ``.gguf`` file (its own
  dequantization, into float), so the folder's safetensors hold plain dense tensors and the
  ``quantization_config`` is only a leftover label. The model is loaded without it: the
  weights are the folder's tensors, cast to the requested dtype exactly as for any dense
  checkpoint (bit for bit in fp32), and the corrected folder is an ordinary dense
  checkpoint. Weights that are not floating point after loading are refused.
- any other ``quant_method`` (bitsandbytes, gptq, awq, fp8, compressed-tensors, ...): the
  tensors are packed or scaled integers; turning them back into dense weights needs the
  method's own library (often a GPU) and transformers documents no exact dequantization
  into every export dtype, so the load is refused, before any work, with one line naming
  the method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelError

DENSE_METHODS = frozenset({"gguf"})


def declared_quantization(config: dict[str, Any]) -> tuple[str, str] | None:
    """(field, quant_method) of the first ``quantization_config`` in a config.json object, or None."""
    candidates = [("", config)] + [(f"{k}.", v) for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    for prefix, section in candidates:
        quant = section.get("quantization_config")
        if quant is None:
            continue
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        return f"{prefix}quantization_config.quant_method", str(method) if method is not None else "unknown"
    return None


def check_source_quantization(config_path: Path, config: dict[str, Any]) -> str | None:
    """The dense quant_method to load without its quantization_config (None: not quantized);
    raises ``ModelError`` (one line) for any other method."""
    found = declared_quantization(config)
    if found is None:
        return None
    field, method = found
    if method in DENSE_METHODS:
        return method
    raise ModelError(f"the model is quantized with {method}; regap-export needs dense weights and dequantizes "
                     "only GGUF-derived folders", path=config_path, field=field,
                     hint="calibrate and export the unquantized model")


def strip_quantization(config: Any) -> None:
    """Remove ``quantization_config`` from a transformers config and its sub-configs."""
    for sub in [config] + [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None)]:
        if hasattr(sub, "quantization_config"):
            delattr(sub, "quantization_config")


def check_dense(model: nn.Module, method: str, folder: Path) -> None:
    """After loading a ``DENSE_METHODS`` folder: every weight must be a float tensor."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() and name.endswith("weight"):
            raise ModelError(f"config.json declares {method} and tensor {name} is {tensor.dtype}, not dense floats",
                             path=folder, hint="save the model again from a dequantized load")


__all__ = ["DENSE_METHODS", "declared_quantization", "check_source_quantization", "strip_quantization",
           "check_dense"]
