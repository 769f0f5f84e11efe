"""Decoder position ids per family, in numpy, for every implementation that feeds them
explicitly (ONNX Runtime, and validate's PyTorch traces so that all three see the same).

The generic part. The ``text`` scheme (every family without a scheme of its own):
``position_ids`` [batch, seq] = ``cumsum(mask) - 1`` with padding positions set to 1; a
decode step is the previous last position + 1. A family with other position ids declares a
``PositionKind`` on its adapter (Qwen2-VL's ``mrope``, in ``qwen2_vl.py``).

The settings a scheme needs (``position_config``) are written to ``regap_onnx.json`` as
``position_ids``, so the runtime does not need the Hugging Face config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import RegapError

TEXT = "text"


@dataclass(frozen=True)
class PositionKind:
    """A family's own position scheme (``ModelAdapter.positions``); families without one use ``text``."""

    name: str
    # settings(Hugging Face config) -> the dict written to regap_onnx.json (``scheme`` and ``rank`` first)
    settings: Callable[[Any], dict[str, Any]]
    # prefill(settings, input_ids, attention_mask, **image inputs) -> position_ids of the prompt
    prefill: Callable[..., np.ndarray]
    # next(previous call's position_ids) -> position_ids [.., batch, 1] of the next token
    next: Callable[[np.ndarray], np.ndarray]


def position_config(family: str, config: Any) -> dict[str, Any]:
    """The scheme and its settings for a Hugging Face model ``config`` of ``family``."""
    from . import adapter_for_family

    adapter = adapter_for_family(family)
    if adapter is None or adapter.positions is None:
        return {"scheme": TEXT, "rank": 2}
    return adapter.positions.settings(config)


def check_prompt(input_ids: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` [batch, seq] and its ``attention_mask`` (all ones when None) as int64 arrays.
    Every implementation that takes a prompt (positions, the ONNX runtime's generate) checks it
    here, so the same bad shape raises the same error everywhere."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise RegapError(f"input_ids must be [batch, seq], got shape {ids.shape}", field="input_ids",
                         hint="pass a batch, e.g. the tokenizer's output for a list of prompts")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise RegapError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: they must match",
                         field="attention_mask", hint="pass the mask the tokenizer returned with input_ids")
    return ids, mask


# -- text ---------------------------------------------------------------------------------
def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    return pos


def _text_prefill(settings: dict, input_ids: np.ndarray, attention_mask: np.ndarray, **_: Any) -> np.ndarray:
    return text_positions(attention_mask)


def _text_next(previous: np.ndarray) -> np.ndarray:
    return previous[:, -1:] + 1


# -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PositionScheme:
    settings: dict[str, Any]
    # prefill(settings, input_ids, attention_mask, **image inputs) -> position_ids of the prompt
    _prefill: Callable[..., np.ndarray]
    # next(previous call's position_ids) -> position_ids [.., batch, 1] of the next token
    next: Callable[[np.ndarray], np.ndarray]

    @property
    def rank(self) -> int:
        return int(self.settings["rank"])

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, **image_inputs: Any) -> np.ndarray:
        ids, mask = check_prompt(input_ids, attention_mask)
        return self._prefill(self.settings, ids, mask, **image_inputs)


def _schemes() -> dict[str, tuple[Callable[..., np.ndarray], Callable[[np.ndarray], np.ndarray]]]:
    from . import registered_adapters

    out = {TEXT: (_text_prefill, _text_next)}
    for adapter in registered_adapters():
        if adapter.positions is not None:
            out[adapter.positions.name] = (adapter.positions.prefill, adapter.positions.next)
    return out


def position_scheme(settings: dict[str, Any] | None) -> PositionScheme:
    """The scheme for ``settings`` (``position_config``'s dict; None = ``text``, as exports
    written before the key existed)."""
    settings = {"scheme": TEXT, "rank": 2} if settings is None else dict(settings)
    fns = _schemes().get(settings.get("scheme"))
    if fns is None:
        raise RegapError(f"unknown position_ids scheme {settings.get('scheme')!r}")
    return PositionScheme(settings, *fns)
