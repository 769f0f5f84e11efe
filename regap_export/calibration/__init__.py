"""Calibration: capture activations, fit the directions, measure the geometry (METHOD sections 1-3).

``fit`` holds the journey in memory, ``folder`` writes it (``regap-export calibrate``).

Names of ``fit`` are importable from the package itself (``from regap_export.calibration import ...``);
they are resolved on first use, so importing a light submodule does not load the rest.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    # import_module, not "from . import": that form asks this very function for the submodule.
    return getattr(importlib.import_module(f"{__name__}.fit"), name)
