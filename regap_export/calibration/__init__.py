"""Calibration: capture activations, fit the directions, measure the geometry (METHOD sections 1-3).

``fit`` holds the journey in memory, ``folder`` writes it (``regap-export calibrate``).

Names of ``fit`` are importable from the package itself (``from regap_export.calibration import ...``);
they are resolved on first use, so importing a light submodule does not load the rest.
"""

from ..io.lazy import names_of

__getattr__ = names_of(__name__, "fit")
