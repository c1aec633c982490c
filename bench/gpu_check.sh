#!/usr/bin/env bash
# The GPU check of issue 11, in one go (about 8 minutes on one H200), from the repository root:
#
#   OUT=/some/folder bash bench/gpu_check.sh            # on a machine with one CUDA GPU
#   OUT=/tmp/gpu_smoke bash bench/gpu_check.sh --smoke  # tiny sizes on the CPU: checks it runs
#
# Runs, each with its own time limit, and writes everything under $OUT:
#   1. bench/gpu_paper_scale.py: paper-scale analyses (69 x 128 x 256; DPS at K=128, C=2 and at the
#      accuracy bench's K=32, C=1, with 1 and 4 members; ObsFree; all with sampler.autocast=bf16_dps,
#      then DPS at K=128 with bf16 (float32 gradients)): gpu_paper_scale.json;
#   2. bench/gpu_align.py: candidates/s with 1 and 2 sampler actors sharing the GPU, the GPU's
#      utilisation meanwhile, DPO steps/s at demo and paper sizes: gpu_align.json;
#   3. bench/gpu_tiny_job.py: the tiny main job with run.device=cuda (learner and pretraining on
#      the GPU too; if that fails, again with only the actors on the GPU): tiny/, tiny_actors/,
#      and the processes holding GPU memory meanwhile (tiny_gpu_apps.csv);
#   4. with GPU_CHECK_COMPILE=1 and time left: the paper-scale DPS run with sampler.compile.
# BENCHMARKS.md is copied to $OUT and the benches add their rows to that copy; summary.txt lists
# each step's exit status and seconds. Environment: PYTHON (default python), OUT (default a new
# temporary folder), GPU_CHECK_COMPILE.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
SMOKE=""
if [ "${1:-}" = "--smoke" ]; then SMOKE="--smoke"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log, record status and time
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
  return $rc
}

{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  "$PY" -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('ray', ray.__version__)"
  command -v nvidia-smi > /dev/null && nvidia-smi
} > "$OUT/machine.txt" 2>&1
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
BENCH=(--out "$OUT" --bench-file "$OUT/BENCHMARKS.md")

if [ -n "$SMOKE" ]; then
  step paper_scale 300 "$PY" bench/gpu_paper_scale.py --smoke "${BENCH[@]}"
  step align 400 "$PY" bench/gpu_align.py --smoke "${BENCH[@]}"
  step tiny 900 "$PY" bench/gpu_tiny_job.py "$OUT/tiny" --device cpu
else
  step paper_scale 170 "$PY" bench/gpu_paper_scale.py --also-autocast bf16 "${BENCH[@]}"
  step align 140 "$PY" bench/gpu_align.py "${BENCH[@]}"
  nvidia-smi --query-compute-apps=timestamp,pid,process_name,used_memory --format=csv -lms 1000 \
    > "$OUT/tiny_gpu_apps.csv" 2>&1 &
  APPS=$!
  if ! step tiny 170 "$PY" bench/gpu_tiny_job.py "$OUT/tiny" --device cuda --learner-gpu; then
    LEFT=$(( 470 - ($(date +%s) - START) ))
    [ "$LEFT" -gt 60 ] && step tiny_actors "$LEFT" "$PY" bench/gpu_tiny_job.py "$OUT/tiny_actors" --device cuda
  fi
  kill "$APPS" 2> /dev/null
  LEFT=$(( 500 - ($(date +%s) - START) ))
  if [ "${GPU_CHECK_COMPILE:-0}" = "1" ] && [ "$LEFT" -gt 60 ]; then
    step paper_scale_compiled "$LEFT" "$PY" bench/gpu_paper_scale.py --compile --only 1 "${BENCH[@]}"
  fi
fi
# keep the small evidence of the tiny runs, not their stores and checkpoints
for d in tiny tiny_actors; do
  [ -d "$OUT/$d" ] || continue
  find "$OUT/$d" -name '*.zarr' -prune -exec rm -rf {} + 2> /dev/null
  find "$OUT/$d" \( -name '*.pt' -o -name '*.ckpt' -o -name '*.pkl' \) -delete 2> /dev/null
done
echo "total seconds=$(( $(date +%s) - START ))" | tee -a "$SUMMARY"
