"""Evaluation: behaviour with the correction off vs on, and how sure the figures are
(``regap-export evaluate``, ``compare``).

``evaluate`` runs the models; ``behaviour`` and ``proportions`` are pure metrics; ``comparison``
pairs two evaluations.

Names of ``evaluate`` are importable from the package itself (``from regap_export.evaluation import ...``);
they are resolved on first use, so importing a light submodule does not load the rest.
"""

from ..io.lazy import names_of

__getattr__ = names_of(__name__, "evaluate")
