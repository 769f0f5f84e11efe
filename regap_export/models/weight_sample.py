"""A cheap sample of a model's weight values, to tell two models of the same shape apart.

``model_fingerprint`` hashes the architecture and parameter shapes only, so directions
fitted on one model would be accepted for any other model of the same shape. The sample
is 32 values read at fixed positions of four parameters (chosen by sorted name, stored
with their names); two models match when every sampled value agrees within a tolerance
loose enough for a re-save or a cast to fp16/bf16 (relative 2e-2) and far tighter than
two different trainings or initialisations agree.
"""
from __future__ import annotations

import json
import math

from torch import nn

VALUES_PER_TENSOR = 8
TENSORS = 4
RTOL, ATOL = 2e-2, 1e-3


def _floating_parameters(model: nn.Module) -> dict:
    from .loading import _original_parameters

    return {name: p for name, p in _original_parameters(model)
            if p.is_floating_point() and p.numel() >= VALUES_PER_TENSOR}


def _values(param) -> list[float]:
    flat = param.detach().reshape(-1)
    stride = flat.numel() // VALUES_PER_TENSOR
    return [float(flat[i * stride + stride // 2]) for i in range(VALUES_PER_TENSOR)]


def weight_sample(model: nn.Module) -> dict[str, list[float]]:
    """{parameter name: 8 values} for four parameters chosen by sorted name."""
    params = _floating_parameters(model)
    names = sorted(params)
    if not names:
        return {}
    picks = sorted({round(i * (len(names) - 1) / max(TENSORS - 1, 1)) for i in range(TENSORS)})
    return {names[i]: _values(params[names[i]]) for i in picks}


def weight_sample_json(model: nn.Module) -> str:
    return json.dumps({name: [round(v, 6) for v in values] for name, values in weight_sample(model).items()},
                      sort_keys=True)


def samples_match(stored: str, model: nn.Module) -> bool:
    """True when the values ``stored`` (``weight_sample_json``) agree with ``model``'s. Nothing
    to compare (an empty or unreadable ``stored``, as in directions written before the sample
    existed, or a sampled parameter the model lacks or holds quantized) counts as a match."""
    try:
        want = json.loads(stored) if stored else {}
        want = {str(name): [float(v) for v in values] for name, values in want.items()}
    except (ValueError, TypeError, AttributeError):
        return True
    params = _floating_parameters(model)
    if not want or any(name not in params for name in want):
        return True
    for name, values in want.items():
        got = _values(params[name])
        if len(got) != len(values) or not all(
                math.isfinite(g) and abs(g - w) <= ATOL + RTOL * abs(w) for g, w in zip(got, values)):
            return False
    return True
