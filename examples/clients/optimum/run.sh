#!/usr/bin/env bash
# optimum-onnx on an exported text LLM, as written, in its own venv (optimum-onnx 0.1.0 pins
# transformers < 4.58, beside regap-export's transformers 5):
#   bash examples/clients/optimum/run.sh OUT [PROMPT]
# Prints optimum's greedy reply and whether its tokens equal `regap-export generate`'s
# (compare.py; the tool side runs in the project's .venv).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
OUT="$(cd "$1" && pwd)"
PROMPT="${2:-Write a short poem about the sea.}"
VENV="${OPTIMUM_VENV:-$HOME/.cache/regap-export/optimum-venv}"
TOOL_PYTHON="${TOOL_PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "optimum-onnx[onnxruntime]==0.1.0" "transformers==4.57.6" "torch==2.13.0"
  touch "$VENV/.complete"
fi
RESULT="$(mktemp)"
trap 'rm -f "$RESULT"' EXIT
"$VENV/bin/python" "$HERE/optimum_generate.py" "$OUT" "$PROMPT" > "$RESULT"
"$TOOL_PYTHON" "$HERE/compare.py" "$OUT" "$PROMPT" "$RESULT"
