"""User-facing errors.

Every error a user can cause (bad file, bad option, wrong model) is a ``RegapError``
whose message says which file, which line or field, and what to do. The CLI prints the
message and exits with status 2; it never shows a traceback for these.

``ValueError`` is left for programming errors (a caller breaking a function's contract) and
for ``export/modeling_regap.py``, which ships inside exported folders and runs under
transformers without regap-export installed, so it cannot import this module.
"""
from __future__ import annotations

from pathlib import Path


class RegapError(Exception):
    """An error caused by input the user can fix."""

    def __init__(self, message: str, *, path: str | Path | None = None,
                 line: int | None = None, field: str | None = None, hint: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.hint = hint
        where = []
        if self.path is not None:
            where.append(self.path + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        text = (", ".join(where) + ": " if where else "") + message
        if hint:
            text += f" ({hint})"
        super().__init__(text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): libraries
    such as protobuf, tokenizers and ONNX Runtime put pages of detail below it."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class DataError(RegapError):
    """A calibration or evaluation data file is malformed."""


class ModelError(RegapError):
    """A model folder cannot be loaded or its architecture is not supported."""


class ActivationError(RegapError):
    """The model produced non-finite activations."""


class ArtifactError(RegapError):
    """A directions folder or exported artifact is missing, corrupt, or does not match."""
