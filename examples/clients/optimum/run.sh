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
VENV="$(bash "$HERE/venv.sh")"
TOOL_PYTHON="${TOOL_PYTHON:-$ROOT/.venv/bin/python}"
RESULT="$(mktemp)"
trap 'rm -f "$RESULT"' EXIT
"$VENV/bin/python" "$HERE/optimum_generate.py" "$OUT" "$PROMPT" > "$RESULT"
"$TOOL_PYTHON" "$HERE/compare.py" "$OUT" "$PROMPT" "$RESULT"
