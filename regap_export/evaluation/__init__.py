"""Evaluation: behaviour with the correction off vs on, and how sure the figures are
(``regap-export evaluate``, ``compare``).

``evaluate`` runs the models; ``behaviour`` and ``proportions`` are pure metrics; ``comparison``
pairs two evaluations.

Names of ``evaluate`` are importable from the package itself (``from regap_export.evaluation import ...``);
they are resolved on first use, so importing a light submodule does not load the rest.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    # import_module, not "from . import": that form asks this very function for the submodule.
    return getattr(importlib.import_module(f"{__name__}.evaluate"), name)
