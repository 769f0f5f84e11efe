"""Validation: parity of an exported folder against the independent reference (``regap-export validate``).

``parity`` runs the comparisons; ``reference`` is the oracle, which shares no correction code
with the product.

Names of ``parity`` are importable from the package itself (``from regap_export.validation import ...``);
they are resolved on first use, so importing a light submodule does not load the rest.
"""

from ..io.lazy import names_of

__getattr__ = names_of(__name__, "parity")
