"""Checks at the boundaries: options in range, tensors finite, JSON strict.

Every value that reaches an artifact passes here first: options when they are built
(``RegapOptions.__post_init__``), directions when they are loaded, the folded correction
constants before an export writes them, config.json after it is written, and an exported
folder's correction constants before the runtime runs it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ArtifactError, RegapError

ALPHA_RANGE = (0.0, 100.0)   # strengths: 0 turns a band off, 1 removes the mean drift
TAU_RANGE = (0.0, 1.0)       # the gate threshold on the normalised coordinate (0: harmless anchor, 1: harmful)
SHARPNESS_RANGE = (0.0, 100.0)  # a factor on the fitted gate slopes: 0 makes every gate 1/2, 1 is as fitted


def check_option_values(options: Any) -> None:
    """Numeric options are real numbers in range (called by ``RegapOptions.__post_init__``)."""
    for name, (low, high) in (("alpha0", ALPHA_RANGE), ("alpha_max", ALPHA_RANGE), ("tau", TAU_RANGE),
                               ("gate_sharpness", SHARPNESS_RANGE)):
        value = getattr(options, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RegapError(f"{flag} must be a number, got {value!r}", field=name)
        if not math.isfinite(value):
            raise RegapError(f"{flag} must be a finite number, got {value}", field=name)
        if not low <= value <= high:
            raise RegapError(f"{flag} must be between {low:g} and {high:g}, got {value:g}", field=name)


def nonfinite_where(tensor) -> str | None:
    """None if every element is finite, else where the first non-finite one is ("row 2", "index 5").
    A numpy array is checked with numpy (the runtime has no PyTorch), anything else with torch."""
    import numpy as np

    if isinstance(tensor, np.ndarray):
        t = tensor
        if t.dtype.kind != "f":
            return None
        bad = ~np.isfinite(t)
        if not bad.any():
            return None
        first = [int(i) for i in np.argwhere(bad)[0]] if t.ndim else []
    else:
        import torch

        t = tensor.detach() if isinstance(tensor, torch.Tensor) else torch.as_tensor(tensor)
        if not t.is_floating_point():
            return None
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            return None
        first = [int(i) for i in bad.nonzero()[0].tolist()]
    value = float(t[tuple(first)])
    if t.ndim == 0:
        return f"value {value}"
    where = f"layer {first[0]}" if t.ndim == 2 else f"index {first[0]}"
    return f"{value} at {where}" + (f", element {first[1]}" if t.ndim == 2 else "")


def check_tensors_finite(tensors: Mapping[str, Any], *, path: str | Path | None, what: str,
                         hint: str | None = None) -> None:
    for name, tensor in tensors.items():
        where = nonfinite_where(tensor)
        if where is not None:
            raise ArtifactError(f"{what} tensor {name!r} is not finite ({where})", path=path, field=name,
                                hint=hint)


def check_corrections_finite(corrections: Iterable[Any], *, path: str | Path | None = None) -> None:
    """The folded constants (v, w, b of every layer; a ScoreReadout's w, b, kappa) are finite."""
    for c in corrections:
        for attr in ("v", "w", "b", "kappa"):
            value = getattr(c, attr, None)
            if value is None:
                continue
            where = nonfinite_where(value)
            if where is not None:
                layer = getattr(c, "layer", "?")
                raise ArtifactError(f"the correction constant {attr} of layer {layer} is not finite ({where})",
                                    path=path, hint="check the directions (regap-export inspect) and the options")


class _NotStrict(ValueError):
    pass


def _refuse_constant(token: str):
    raise _NotStrict(f"{token} is not JSON")


def strict_json_loads(text: str, *, path: str | Path | None = None, what: str = "the file",
                      error: type[RegapError] = ArtifactError, hint: str | None = None) -> Any:
    """Parse JSON refusing NaN/Infinity (Python's json accepts them) and duplicate keys; the
    error names the line of a syntax error."""
    def pairs(items):
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise _NotStrict(f"duplicate key {key!r}")
            seen[key] = value
        return seen

    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg}, column {exc.colno})", path=path, line=exc.lineno,
                    hint=hint) from None
    except _NotStrict as exc:
        raise error(f"{what} is not strict JSON ({exc})", path=path, hint=hint) from None
    except RecursionError:
        raise error(f"{what} nests too deeply to be read", path=path, hint=hint) from None


def check_strict_json_file(path: Path) -> None:
    if Path(path).is_file():
        strict_json_loads(Path(path).read_text(encoding="utf-8"), path=path)


def check_exported_constants(folder) -> None:
    """The correction constants of an exported folder (an ``artifacts.ExportedFolder``) are
    finite: the listed ``regap.safetensors`` and the ``regap.*`` initializers of every listed
    ONNX graph (read without their external weight data)."""
    hint = "re-export with finite directions and options"
    if folder.has("regap.safetensors"):
        from safetensors import safe_open

        tensors_file = folder.path("regap.safetensors")
        try:
            with safe_open(str(tensors_file), framework="numpy") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # safetensors raises several types on a damaged file
            raise ArtifactError(f"not a readable safetensors file ({exc})", path=tensors_file) from None
        check_tensors_finite(tensors, path=tensors_file, what="correction", hint=hint)
    for rel in sorted(r for r in folder.manifest["files"] if r.endswith(".onnx")):
        _check_graph_constants(folder.path(rel))


def _check_graph_constants(graph: Path) -> None:
    """The ``regap.*`` initializers stored in the graph file itself are finite."""
    import numpy as np

    from .artifacts import EXTERNAL, graph_initializers

    for name, location, array in graph_initializers(graph, prefix="regap."):
        if location == EXTERNAL or array is None:
            continue
        if not np.isfinite(array).all():
            raise ArtifactError(f"correction constant {name!r} is not finite", path=graph,
                                field=name, hint="re-export with finite directions and options")
