#!/usr/bin/env bash
# The GPU window, prepared: one call of at most 540 s that always brings numbers back, the most
# decisive first. Each part has its own timeout and writes its log into $OUT as it runs (a part
# cut short still leaves the candidates it finished: `ROW` lines); its RESULT line and exit code
# go to $OUT/summary.txt when it ends.
#
#   ../shared/tools/gpu-bundle 12000 "pytest-timeout>=2.3"   # .gpu/: wheels, data, env.sh
#   (device tool) run  command="bash benchmarks/gpu_session.sh"  carry=[".gpu"]  timeout_s=570
#   bash benchmarks/gpu_session.sh --dry-run                  # every part at toy size, on a CPU
#
# Parts, in order (timeouts in s; a timeout is itself a verdict):
#   versions     python, jax, jaxlib, the devices                                         20
#   round0       6 round-0 candidates of the gpu preset, 3 epochs on 10,000 images, compiled
#                ahead on a persistent cache at a fixed absolute path ($CACHE): cold ("ahead"),
#                warm, and with only the autotune results kept ("tuned")               180
#   packed       the same round packed, K=16, 3 epochs, its own cold cache              120
#   tests        the GPU-relevant tests, all of them (no -x)                             110
#   determinism  one candidate trained twice, each in a fresh process (fresh compile and
#                autotuning), with XLA's deterministic ops, compared bit for bit         100
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
if [[ $DRY_RUN == 1 ]]; then
  export OUT=${OUT:-$(mktemp -d -t gpu_session_XXXX)}
  CACHE=$(mktemp -d -t gpu_session_cache_XXXX)  # fixed within the run, as on the GPU
else
  source .gpu/env.sh  # wheels, PYTHONPATH, MEMNAS_DATA_DIR, OUT
  CACHE=/tmp/memnas_gpu_session/xla_cache
fi
mkdir -p "$OUT" "$CACHE"
export MEMNAS_DATA_DIR=${MEMNAS_DATA_DIR:-} OUT PYTHONUNBUFFERED=1
FAILED=0

log() { echo "=== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
part() {  # part SECONDS NAME COMMAND...: its log in $OUT/NAME.log, its verdict in summary.txt
  local seconds=$1 name=$2; shift 2
  local shown="$*"
  log "$name (timeout ${seconds}s): ${shown:0:160}"
  local start=$SECONDS
  timeout -k 10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  local verdict="exit $code"
  [[ $code == 124 || $code == 137 ]] && verdict="TIMEOUT after ${seconds}s (exit $code)"
  [[ $code != 0 ]] && FAILED=1
  echo "$verdict in $((SECONDS - start)) s" >> "$OUT/$name.log"
  grep -h "^RESULT\|passed\|failed\|error" "$OUT/$name.log" | tail -2 | tee -a "$OUT/summary.txt"
  echo "$name: $verdict in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

if [[ $DRY_RUN == 1 ]]; then  # toy sizes: synthetic 16 px data, width 4, 1 epoch
  ROUND="--preset test --candidates 2 --epochs 1"
  PACK=2
  TESTS=(tests/test_ops.py -k "closed_forms_by_hand or max_pool_ignores")
  DETERMINISM="--preset test --epochs 1 --deterministic on"
else
  ROUND="--preset gpu --round 0 --candidates 6 --epochs 3 --train_subset 10000 --validation_size 2000"
  PACK=16
  TESTS=(tests/test_ops.py tests/test_train.py tests/test_compile_ahead.py tests/test_packed.py
         tests/test_sharding.py -m "not slow")
  DETERMINISM="--preset gpu --epochs 1 --train_subset 4000 --validation_size 2000 --deterministic on"
fi

part 20 versions python3 -c "import sys, jax, jaxlib, flax, optax
print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__,
      'flax', flax.__version__, 'optax', optax.__version__)
print(jax.default_backend(), jax.devices())"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader >> "$OUT/versions.log"
# shellcheck disable=SC2086  # the size options split into words on purpose
part 180 round0 python3 benchmarks/search_throughput.py $ROUND --modes ahead,warm,tuned \
  --cache_dir "$CACHE"
# shellcheck disable=SC2086
part 120 packed python3 benchmarks/search_throughput.py $ROUND --modes packed --packing $PACK
part 110 tests python3 -m pytest -q -p no:cacheprovider -o addopts="" "${TESTS[@]}"
# shellcheck disable=SC2086
part 100 determinism python3 benchmarks/determinism.py $DETERMINISM
log "done (out: $OUT)"
exit $FAILED
