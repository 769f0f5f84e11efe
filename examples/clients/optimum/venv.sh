#!/usr/bin/env bash
# The optimum-onnx venv (optimum-onnx 0.1.0 pins transformers < 4.58, beside regap-export's
# transformers 5): built once, then reused. Prints its path.
#   bash examples/clients/optimum/venv.sh
set -euo pipefail
VENV="${OPTIMUM_VENV:-$HOME/.cache/regap-export/optimum-venv}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "optimum-onnx[onnxruntime]==0.1.0" "transformers==4.57.6" "torch==2.13.0" >&2
  touch "$VENV/.complete"
fi
echo "$VENV"
