#!/usr/bin/env bash
# One prepared GPU command (issue #21): everything diffq needs a GPU for, in at most 8 minutes on one
# H100/H200, into one results file.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--wheels DIR] [--out DIR]
#
# The GPU machine has its own Python 3.12, torch 2.11 and Triton 3.6 and no package registry, so the
# pure-Python wheels it lacks (benchmarks/gpu_env.py CARRIED: diffusers and its needs) are fetched here
# first, where pip works, into .whl/ (ignored by git):
#
#   bash benchmarks/gpu_wheels.sh                                   # here, once
#   bash benchmarks/gpu_check.sh --wheels .whl --out "$OUT"         # there (the device tool: carry [".whl"])
#
# --wheels DIR installs DIR/*.whl with `pip install --no-index --no-deps --target`; diffq itself is
# staged from this tree (gpu_env.py stage), so nothing is built there. Phases, each with a time cap
# (seconds; GPU_CHECK_CAP_<PHASE> overrides); one that fails or overruns is recorded and the rest run:
#   env      60  the GPU, torch/Triton versions, carried wheels installed, diffq staged
#   tests    80  the kernel tests natively on CUDA (no TRITON_INTERPRET): tests/test_gpu_check.py's CUDA
#                tests (every kernel case and real SDXL/Flux shapes against the float64 reference) and
#                the CUDA tests of tests/test_integration.py (torch.compile, model CPU offload) and the
#                peak GPU memory of low-memory quantization (tests/test_low_memory.py, seconds)
#   kernels  90  benchmarks/kernel_speed.py: each kernel vs torch.matmul fp16/bf16, torch._int_mm int8,
#                torch._scaled_mm fp8 (tensor- and row-wise), the low-rank branch fused vs separate
#   step    230  benchmarks/gpu_step.py: one SDXL UNet and one Flux.1 transformer step at full size,
#                16-bit vs w8a8/w4a8/w4a4/w4a16, eager and compiled, with peak GPU memory
#   report   20  benchmarks/gpu_report.py: everything into OUT/results.md and OUT/results.json
# (480 s in all.) The log of every phase is OUT/gpu_check.log; those three files are all it leaves in
# OUT (the parts the report merges are removed once results.json holds them). Exit status 0 when
# every phase passed.
#
# --dry-run rehearses it all on the CPU in about a minute, launching nothing heavy: the same phases
# with the carried wheels' requirements checked against the GPU image, diffq staged into a temporary
# folder and imported from there, every import of this repository's code checked against what the
# image has (gpu_env.py simulate), the GPU tests collected, kernel_speed.py and gpu_step.py run in their
# --dry-run modes (gpu_step builds both models at full size on the meta device) and the report merged.
set -uo pipefail

DRY=0
WHEELS=""
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
    --out) OUTDIR=${2:?--out needs a folder}; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print} /^set /{exit}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
[ -n "$OUTDIR" ] || { [ $DRY = 1 ] && OUTDIR=$SCRATCH/out || OUTDIR=benchmarks/results/gpu; }
PARTS=$OUTDIR/parts
mkdir -p "$PARTS" || exit 2
rm -f "$PARTS/phases.tsv"
LOG=$OUTDIR/gpu_check.log
: >"$LOG"

SITE=$SCRATCH/site
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} DIFFQ_STAGED=$SITE/diffq
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ $DRY = 1 ] || unset TRITON_INTERPRET  # the kernels must really compile for the GPU

# The native GPU tests (their dry-run test, which runs this script, is left out).
GPU_TESTS=(tests/test_gpu_check.py tests/test_integration.py::test_torch_compile_on_gpu
           tests/test_integration.py::test_model_cpu_offload_where_supported
           "tests/test_low_memory.py::test_peak_memory_is_one_block_of_float_weights_plus_the_quantized_model[cuda]")
FAILED=0

cap() {  # cap PHASE DEFAULT: the phase's time cap in seconds
  local var="GPU_CHECK_CAP_${1^^}"
  echo "${!var:-$2}"
}

phase() {  # phase NAME CAP COMMAND...: run it under its cap, log it, record its status
  local name=$1 limit=$2 start end rc
  shift 2
  echo "== phase $name (cap ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s.%N)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$LOG"  # bash -c: functions run too
  rc=${PIPESTATUS[0]}
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk "BEGIN {printf \"%.1f\", $end - $start}")
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >>"$PARTS/phases.tsv"
  echo "== phase $name: exit $rc after ${seconds}s" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

env_real() {  # install the carried wheels, stage diffq, show what the run will use
  set -e
  if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      --find-links "$WHEELS" "$WHEELS"/*.whl
  fi
  "$PY" benchmarks/gpu_env.py stage "$SITE"
  nvidia-smi -L || true
  "$PY" -c 'import sys, torch, triton, diffusers, diffq
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "diffusers", diffusers.__version__, "diffq", diffq.__file__)
assert torch.cuda.is_available(), "no CUDA device"
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())'
}

env_dry() {  # the same, without installing: requirements against the image, staging, carried wheels present
  set -e
  "$PY" benchmarks/gpu_env.py check
  "$PY" benchmarks/gpu_env.py stage "$SITE"
  if [ -n "$WHEELS" ]; then
    "$PY" -c 'import sys, pathlib, gpu_env
names = {gpu_env.norm(p.name.split("-")[0]) for p in pathlib.Path(sys.argv[1]).glob("*.whl")}
missing = [c for c in gpu_env.CARRIED if gpu_env.norm(c) not in names]
sys.exit(f"{sys.argv[1]} lacks wheels of {missing}: run benchmarks/gpu_wheels.sh" if missing else 0)' "$WHEELS"
  fi
  echo "diffq staged in $SITE; the GPU run will import it from there"
}

export -f env_real env_dry
export PY SITE WHEELS
if [ $DRY = 1 ]; then
  SIM=("$PY" benchmarks/gpu_env.py simulate)
  export PYTHONPATH=benchmarks:$PYTHONPATH  # env_dry's inline check imports gpu_env
  phase env "$(cap env 60)" env_dry
  phase tests "$(cap tests 80)" "${SIM[@]}" -m pytest --collect-only -q -p no:cacheprovider "${GPU_TESTS[@]}" \
    -k "not dry_run"
  phase kernels "$(cap kernels 90)" "${SIM[@]}" benchmarks/kernel_speed.py --dry-run
  phase step "$(cap step 230)" "${SIM[@]}" benchmarks/gpu_step.py --dry-run
  phase report "$(cap report 20)" "$PY" benchmarks/gpu_report.py "$OUTDIR" --dry-run
else
  phase env "$(cap env 60)" env_real
  phase tests "$(cap tests 80)" "$PY" -P -m pytest -q -p no:cacheprovider --junitxml="$PARTS/tests.xml" \
    "${GPU_TESTS[@]}" -k "not dry_run"
  phase kernels "$(cap kernels 90)" "$PY" benchmarks/kernel_speed.py --budget 70 --results "$PARTS/kernels"
  phase step "$(cap step 230)" "$PY" benchmarks/gpu_step.py --budget 200 --out "$PARTS/step"
  phase report "$(cap report 20)" "$PY" benchmarks/gpu_report.py "$OUTDIR"
fi
[ -s "$OUTDIR/results.json" ] && rm -rf "$PARTS"  # results.json holds every part
echo "gpu_check: $FAILED phase(s) failed; results in $OUTDIR (results.md, results.json, gpu_check.log)"
[ "$FAILED" = 0 ]
