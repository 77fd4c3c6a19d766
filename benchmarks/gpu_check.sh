#!/usr/bin/env bash
# The one GPU check: everything only a GPU can show, in one call of at most 9 minutes on one H100 / H200,
# written as one table (gpu_check.md) plus each step's log and figures (JSON) in the output folder.
#
#   benchmarks/gpu_check.sh --out DIR             # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run --out DIR   # rehearsal on CPU: the same steps at toy sizes
#   benchmarks/gpu_check.sh --only test_gpu,sweep_throughput,train_throughput --stages 1 --budget 340 --out DIR
#
# Steps, most important first, each under its own time limit and the whole under a deadline (a step that
# would start past it is skipped and said), so that one slow step costs its own row and not the others:
#   1. tests/integration/test_gpu.py: flash / memory-efficient SDPA in bf16, fused AdamW with the per-role groups, no
#      host wait inside a training step (ZeRO 0, 1, 2), nvJPEG against the CPU decoder, a stacked trial against
#      the same trial alone (float32 and TF32);
#   2. stacked against one-at-a-time proxies: trials per minute of a sweep in TF32 (benchmarks/sweep_throughput.py);
#   3. ViT-B/16 bf16 images/s and MFU, eager and compiled, ZeRO-0 and ZeRO-1 against timm's plain loop
#      (benchmarks/train_throughput.py);
#   4. data-fed against synthetic-fed, decode=cpu then decode=gpu (train_throughput.py --data-fed-only).
#
# The GPU machine has torch, torchvision, timm and pytest but no deepspeed, mlflow or webdataset: wheels for
# them (and their own needs) travel in .whl/ and are installed into /tmp/site first when .whl/ is there.
# Measured on an H100 (2026-12-06): the whole check 367 s, a second call of three steps 249 s, each plus about
# 30 s to start the machine; docs/benchmarks.md holds the figures, docs/gpu_checks/ the tables as written.
set -uo pipefail

DRY_RUN=0
OUT_DIR=${OUT:-gpu_check_out}
BUDGET_S=520
ONLY=""
STAGES=0,1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --budget) BUDGET_S="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --stages) STAGES="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --dry-run, --out DIR, --budget SECONDS, --only STEP,STEP, --stages 0,1)" >&2; exit 2 ;;
  esac
  shift
done
STEP_NAMES="test_gpu sweep_throughput train_throughput data_fed_cpu data_fed_gpu"
for name in ${ONLY//,/ }; do
  [[ " $STEP_NAMES " == *" $name "* ]] || { echo "gpu_check.sh: --only: no step '$name' (steps: $STEP_NAMES)" >&2; exit 2; }
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"

SCALE=1
if [ "$DRY_RUN" = 1 ]; then
  # CPU runs the toy sizes slower than the GPU the real ones (compiles, DeepSpeed's CPU op build): 5x the time
  SCALE=5
  [ "$BUDGET_S" = 520 ] && BUDGET_S=$((520 * SCALE))
  PY=${PY:-$REPO/.venv/bin/python}
  export DS_ACCELERATOR=cpu
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$REPO"
else
  PY=${PY:-python3}
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > "$OUT_DIR/install.log" 2>&1 || { echo "installing the wheels failed: see install.log" >&2; tail "$OUT_DIR/install.log"; exit 1; }
    export PYTHONPATH="/tmp/site:$REPO"
  else
    export PYTHONPATH="$REPO"
  fi
fi
export PYTHONUNBUFFERED=1
# Our own folder for the ops DeepSpeed builds at run time: a step stopped at its limit mid-build leaves a lock
# that would stall every later step, so locks are cleared between steps (steps never overlap).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/mutransfer_gpu_check_extensions}

# step NAME LIMIT_S COMMAND...: run COMMAND under min(LIMIT_S, what is left of the budget); log to NAME.log and
# record NAME, exit code and seconds in steps.tsv (124: stopped at its limit; skipped: no time left).
step() {
  local name=$1 limit=$(($2 * SCALE)) left=$((BUDGET_S - SECONDS))
  shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$STEPS"; echo "[$name] skipped: ${left}s of the budget left"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null
  local start=$SECONDS
  echo "[$name] up to ${limit}s: $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS"
  echo "[$name] exit $rc after $((SECONDS - start))s"; tail -n 4 "$OUT_DIR/$name.log"
}

"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
  | tee "$OUT_DIR/env.txt"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
  | tee -a "$OUT_DIR/env.txt"

if [ "$DRY_RUN" = 1 ]; then
  MODEL=(--preset tiny --rounds 2 --block 1 --warmup 1)
  FED=(--preset tiny --rounds 2 --block 1 --warmup 1 --workers 1)
  SWEEP=(--depths 4 --widths 32 --seeds 0 1 --lone-seeds 0 --steps 10 --rounds 1 --set run.matmul_precision=high)
else
  MODEL=(--preset vit_b16 --rounds 4 --block 3 --warmup 3)
  FED=(--preset vit_b16 --rounds 3 --block 2 --warmup 3 --workers 14)
  # 64 stacked trials (stacks as large as memory allows), 8 of them one at a time: a lone trial costs the same
  # however many there are (the first call's 16 trials, one stack, gave 4.2x; docs/benchmarks.md)
  # In TF32 (run.matmul_precision=high, both modes): in float32 the stacks ran at 15-18 % of the float32 peak,
  # 3.8-4.2x one at a time; NVIDIA's dense TF32 figure for an H100 (495 TFLOP/s) is 10x the float32 peak measured
  SWEEP=(--depths 12 --widths 384 --seeds 0 1 2 3 4 5 6 7 --lone-seeds 0 --steps 120 --rounds 1
         --set run.matmul_precision=high)
fi

step test_gpu 120 "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_gpu.py --junitxml="$OUT_DIR/test_gpu.xml"
step sweep_throughput 200 "$PY" benchmarks/sweep_throughput.py "${SWEEP[@]}" --work "$(mktemp -d)" \
  --json "$OUT_DIR/sweep_throughput.json"
step train_throughput 210 "$PY" benchmarks/train_throughput.py "${MODEL[@]}" --stages "$STAGES" --precisions bf16 \
  --compile both --json "$OUT_DIR/train_throughput.json"
for decode in cpu gpu; do
  step "data_fed_$decode" 70 "$PY" benchmarks/train_throughput.py "${FED[@]}" --stages 0 --precisions bf16 \
    --compile off --data-fed-only --decode "$decode" --json "$OUT_DIR/data_fed_$decode.json"
done

"$PY" benchmarks/gpu_check_table.py "$OUT_DIR" | tee "$OUT_DIR/gpu_check.md"
echo "gpu_check: ${SECONDS}s in all; table in $OUT_DIR/gpu_check.md"
