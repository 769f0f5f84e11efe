"""The whole journey through the Python API, on the embedded text model (about 5 minutes on 2 CPU cores).

    python examples/end_to_end.py [OUT]
"""
from __future__ import annotations

import sys
from pathlib import Path

import regap_export as rx


def main(out: Path) -> None:
    # 1. Fit directions on the bundled training split (text model: refusal direction only).
    result = rx.calibrate_to_folder("embedded:smollm2", out / "directions", force=True)
    print("best layer", result.report["best_layer"], "held-out AUROC",
          round(result.report["heldout"]["auroc_T_at_best_layer"], 3))
    # 2. Export the corrected model (safetensors + ONNX).
    rx.export_to_folder("embedded:smollm2", out / "directions", out / "corrected", force=True)
    # 3. Prove parity.
    parity = rx.validate_folder(out / "corrected")
    print("parity", "ok" if parity["ok"] else "FAILED")
    # 4. Generate with ONNX Runtime.
    print(rx.generate(out / "corrected", "Name three colours of the rainbow.", max_new_tokens=24)["text"])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example"))
