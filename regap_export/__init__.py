"""regap-export: fit ReGap's drift-correction directions and export corrected models.

The public API: one name per CLI command, each taking and writing folders as the command
does, plus the in-memory pieces they are built from. Imported lazily, so ``import
regap_export`` stays cheap and ``generate`` needs neither torch nor transformers.

- ``calibrate_to_folder(model, out, data=None)``: ``regap-export calibrate``
- ``export_to_folder(model, directions, out)``: ``regap-export export`` (safetensors + ONNX)
- ``validate_folder(out)``: ``regap-export validate`` (parity report)
- ``evaluate_folder(out, data=None)``: ``regap-export evaluate`` (correction off vs on)
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
    "calibrate_to_folder": ("regap_export.api", "calibrate_to_folder"),
    "export_to_folder": ("regap_export.export.pipeline", "export_to_folder"),
    "validate_folder": ("regap_export.validation", "validate_folder"),
    "evaluate_folder": ("regap_export.evaluation", "evaluate_folder"),
    "compare_evaluations": ("regap_export.comparison", "compare_evaluations"),
    "read_evaluation": ("regap_export.comparison", "read_evaluation"),
    "generate": ("regap_export.runtime.chat", "reply"),
    "describe": ("regap_export.api", "describe"),
    "demo": ("regap_export.api", "demo"),
    "load_corrected": ("regap_export.export.load", "load_corrected"),
    "load_model": ("regap_export.models.loading", "load_model"),
    "calibrate": ("regap_export.calibration", "calibrate"),
    "load_directions": ("regap_export.directions_io", "load_directions"),
    "RegapOptions": ("regap_export.options", "RegapOptions"),
    "RegapError": ("regap_export.errors", "RegapError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'regap_export' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
