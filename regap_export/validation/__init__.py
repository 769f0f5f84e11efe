"""Validation: parity of an exported folder against the independent reference (``regap-export validate``).

``parity`` runs the comparisons; ``reference`` is the oracle, which shares no correction code
with the product.

Names of ``parity`` are importable from the package itself (``from regap_export.validation import ...``);
they are resolved on first use, so importing a light submodule does not load the rest.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    # import_module, not "from . import": that form asks this very function for the submodule.
    return getattr(importlib.import_module(f"{__name__}.parity"), name)
