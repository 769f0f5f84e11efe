#!/usr/bin/env bash
# Install the real clients tests/test_clients.py runs exported folders in (idempotent):
# Node.js (Debian's package, when node is missing), the npm package @huggingface/transformers
# (transformers.js) in clients/ from its lock file, and onnxruntime-genai into .venv.
# Call after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi
# onnxruntime-node's install script downloads optional GPU binaries; the CPU ones ship in
# the package, and that is all the tests use.
(cd clients && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error)
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m pip install -q "onnxruntime-genai==0.18.0"
echo "clients: node $(node --version), transformers.js $(node -p "require('./clients/node_modules/@huggingface/transformers/package.json').version"), onnxruntime-genai $("$PYTHON" -c 'import onnxruntime_genai as og; print(og.__version__)')"
