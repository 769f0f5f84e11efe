"""``regap-export inspect``: what a directions folder or an exported folder holds, as plain data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .calibration.directions_io import FILENAME as DIRECTIONS_FILENAME
from .calibration.directions_io import load_directions
from .calibration.report import REPORT_FILENAME, json_safe
from .errors import ArtifactError, RegapError


def describe(path: Path) -> dict[str, Any]:
    """What a directions folder holds, as plain data."""
    path = Path(path)
    if not path.exists():
        raise RegapError("no such file or folder", path=path)
    if (path / DIRECTIONS_FILENAME).is_file() or path.name == DIRECTIONS_FILENAME:
        bundle = load_directions(path)
        folder = path if path.is_dir() else path.parent
        info: dict[str, Any] = {
            "kind": "directions",
            "path": str(folder),
            "model_source": bundle.model_source,
            "model_fingerprint": bundle.model_fingerprint,
            "calibration_sha256": bundle.calibration_sha256,
            "options": json.loads(bundle.options.to_json()),
            "gate_read": "refusal" if bundle.directions.gate_read is None else "discriminant",
            "tensors": {name: list(t.shape) for name, t in bundle.directions.tensors().items()},
            "per_layer": [
                {"layer": l,
                 "drift_norm": float(bundle.directions.drift[l].norm()),
                 "anchor_text": [float(bundle.directions.anchor_text_harmless[l]), float(bundle.directions.anchor_text_harmful[l])],
                 "anchor_probe": [float(bundle.directions.anchor_probe_harmless[l]), float(bundle.directions.anchor_probe_harmful[l])],
                 "kappa": float(bundle.directions.kappa[l])}
                for l in range(bundle.directions.num_layers)
            ],
        }
        report = folder / REPORT_FILENAME
        if report.exists():
            from .io.artifacts import read_json

            data = read_json(report, what=REPORT_FILENAME, hint="re-run calibrate")
            info["best_layer"] = data.get("best_layer")
            info["best_auroc_T"] = data.get("best_auroc_T")
        return json_safe(info)
    from .io.artifacts import MANIFEST_FILENAME, read_manifest

    if (path / MANIFEST_FILENAME).is_file():
        manifest = read_manifest(path)
        parity = manifest.get("parity")
        return json_safe({
            "kind": "exported", "path": str(path), "model": manifest["model"], "mode": manifest["mode"],
            "dtype": manifest["dtype"], "precisions": manifest.get("precisions", [manifest["dtype"]]),
            "formats": manifest["formats"],
            "options": json.loads(manifest["options"]), "calibration_sha256": manifest["calibration_sha256"],
            "files": {rel: entry["bytes"] for rel, entry in manifest["files"].items()},
            "parity_ok": None if parity is None else parity["ok"],
        })
    raise ArtifactError("neither a directions folder (directions.safetensors) nor an exported folder "
                        "(regap_manifest.json)", path=path)


def describe_lines(info: dict[str, Any]) -> list[str]:
    if info["kind"] == "exported":
        parity = {None: "not validated yet", True: "passed", False: "FAILED"}[info["parity_ok"]]
        lines = [f"exported {info['path']}",
                 f"  model {info['model']['source']} ({info['model']['family']}, fingerprint {info['model']['fingerprint']})",
                 f"  mode {info['mode']}, ONNX precisions {', '.join(info['precisions']) or '-'}, "
                 f"formats {', '.join(info['formats'])}, parity {parity}",
                 "  options " + ", ".join(f"{k}={v}" for k, v in sorted(info["options"].items()))]
        lines += [f"  {size:>12,d}  {rel}" for rel, size in info["files"].items()]
        return lines
    lines = [f"{info['kind']} {info['path']}",
             f"  model {info['model_source']} (fingerprint {info['model_fingerprint']})",
             f"  calibration set sha256 {info['calibration_sha256']}",
             "  options " + ", ".join(f"{k}={v}" for k, v in sorted(info["options"].items())),
             f"  gate reads {'rhat' if info['gate_read'] == 'refusal' else 'gate_read (a discriminant)'}",
             "  tensors " + ", ".join(f"{k} {v}" for k, v in info["tensors"].items())]
    if info.get("best_layer") is not None:
        lines.append(f"  best layer {info['best_layer']} (text AUROC {info['best_auroc_T']:.3f})")
    lines.append("  layer  |drift|   a-        a+        c-        c+        kappa")
    for row in info["per_layer"]:
        lines.append(f"  {row['layer']:5d}  {row['drift_norm']:7.3f}  {row['anchor_text'][0]:8.3f}  {row['anchor_text'][1]:8.3f}  "
                     f"{row['anchor_probe'][0]:8.3f}  {row['anchor_probe'][1]:8.3f}  {row['kappa']:7.3f}")
    return lines
