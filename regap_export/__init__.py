"""regap-export: fit ReGap's drift-correction directions and export corrected models.

The public API, imported lazily so that ``import regap_export`` stays cheap:

- ``load_model(source)``: a model folder or embedded model, with its processor and adapter
- ``calibrate(loaded, records, options)``: directions + geometry report
- ``load_directions(folder)``: read ``directions.safetensors``
- ``export_to_folder(model, directions, out)``: safetensors + ONNX + manifest
- ``load_corrected(out)``: the corrected PyTorch model from an exported folder
- ``validate_folder(out)``: parity report
- ``evaluate_folder(out, data)``: behaviour with the correction off vs on
- ``reply(out, prompt, image=None)``: one ONNX Runtime reply (``regap-export generate``)
"""
__version__ = "0.1.0"

_LAZY = {
    "load_model": "regap_export.models.loading",
    "calibrate": "regap_export.calibrate",
    "load_directions": "regap_export.directions_io",
    "export_to_folder": "regap_export.export.pipeline",
    "load_corrected": "regap_export.export.load",
    "validate_folder": "regap_export.validate",
    "evaluate_folder": "regap_export.evaluate",
    "reply": "regap_export.runtime.chat",
    "RegapOptions": "regap_export.options",
    "RegapError": "regap_export.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regap_export' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
