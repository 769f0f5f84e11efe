"""Module-level ``__getattr__`` for a stage package that re-exports one submodule's names lazily."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def names_of(package: str, submodule: str) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package``: a name it lacks is looked up in ``package.submodule``,
    imported on first use, so importing a light sibling submodule does not load it."""
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        # import_module, not "from . import": that form would ask this very function for the submodule.
        return getattr(importlib.import_module(f"{package}.{submodule}"), name)

    return __getattr__
