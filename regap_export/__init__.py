"""regap-export: fit ReGap's drift-correction directions and export corrected models.

The public API: one name per CLI command, each taking and writing folders as the command
does, plus the in-memory pieces they are built from. Imported lazily, so ``import
regap_export`` stays cheap and ``generate`` needs neither torch nor transformers.

- ``calibrate_to_folder(model, out, data=None)``: ``regap-export calibrate``
- ``export_to_folder(model, directions, out)``: ``regap-export export`` (safetensors + ONNX)
- ``validate_folder(out)``: ``regap-export validate`` (parity report)
- ``evaluate_folder(out, data=None)``: ``regap-export evaluate`` (correction off vs on)
- ``tune_to_folder(model, out, data=())``: ``regap-export tune`` (the operating point, chosen by a
  stated rule on the user's records; writes directions carrying the chosen options)
- ``compare_evaluations(a, b)`` with ``read_evaluation(path)``: ``regap-export compare``
  (two evaluations' corrected refusals, paired)
- ``generate(out, prompt, image=None)``: ``regap-export generate`` (ONNX Runtime reply)
- ``describe(path)``: ``regap-export inspect``
- ``demo(model, out)``: ``regap-export demo``
- ``load_corrected(out)``: the corrected PyTorch model of an exported folder
- ``load_model(source)``, ``calibrate(loaded, records, options)``, ``load_directions(folder)``:
  a model with its processor and adapter, directions fitted in memory, directions read back
- ``RegapOptions``, ``RegapError``
"""
__version__ = "0.1.0"

# Top-level names must differ from submodule names: importing a submodule binds its name on
# the package, which would replace a function of the same name.
_LAZY = {
    "calibrate_to_folder": ("regap_export.calibration.folder", "calibrate_to_folder"),
    "export_to_folder": ("regap_export.export.pipeline", "export_to_folder"),
    "validate_folder": ("regap_export.validation.parity", "validate_folder"),
    "evaluate_folder": ("regap_export.evaluation.evaluate", "evaluate_folder"),
    "tune_to_folder": ("regap_export.evaluation.tune", "tune_to_folder"),
    "compare_evaluations": ("regap_export.evaluation.comparison", "compare_evaluations"),
    "read_evaluation": ("regap_export.evaluation.comparison", "read_evaluation"),
    "generate": ("regap_export.runtime.chat", "reply"),
    "describe": ("regap_export.inspection", "describe"),
    "demo": ("regap_export.tour", "demo"),
    "load_corrected": ("regap_export.export.load", "load_corrected"),
    "load_model": ("regap_export.models.loading", "load_model"),
    "calibrate": ("regap_export.calibration.fit", "calibrate"),
    "load_directions": ("regap_export.calibration.directions_io", "load_directions"),
    "RegapOptions": ("regap_export.options", "RegapOptions"),
    "RegapError": ("regap_export.errors", "RegapError"),
}


# Modules that lived at the top level before the package was laid out by stage. Importing an
# old path still works, with a DeprecationWarning naming the new one; they go in 0.3.
import sys as _sys

_MOVED = {
    "artifacts": "io.artifacts", "atomic": "io.atomic", "checks": "io.checks", "progress": "io.progress",
    "st_files": "io.st_files", "correction": "method.correction", "folding": "method.folding",
    "modality": "method.modality", "rewrite": "method.rewrite", "capture": "calibration.capture",
    "directions": "calibration.directions", "directions_io": "calibration.directions_io",
    "geometry": "calibration.geometry", "stats": "calibration.stats", "report": "calibration.report",
    "reference": "validation.reference", "behaviour": "evaluation.behaviour",
    "comparison": "evaluation.comparison", "proportions": "evaluation.proportions",
}


class _MovedModuleFinder:
    """Resolves ``regap_export.<old name>`` to the module's new home (``_MOVED``)."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in _MOVED:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(fullname, _MovedModuleFinder)

    @staticmethod
    def create_module(spec):
        return None

    @staticmethod
    def exec_module(module):
        # The import system returns whatever sys.modules holds under the name after this call,
        # so the old name resolves to the module itself (its own __spec__ untouched).
        import importlib
        import warnings

        new = f"{__name__}.{_MOVED[module.__name__.partition('.')[2]]}"
        warnings.warn(f"{module.__name__} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        _sys.modules[module.__name__] = importlib.import_module(new)


if not any(isinstance(f, type) and f.__name__ == "_MovedModuleFinder" for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModuleFinder)


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    if name in _MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'regap_export' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
