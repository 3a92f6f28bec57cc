#!/usr/bin/env bash
# The GPU checks of the search-throughput work, as one script with a timeout on each part, for a
# session that is lent a GPU (DEVELOPERS.md, "The machines"). Prepare and send it from here:
#
#   ../shared/tools/gpu-bundle 12000          # .gpu/: wheels, a 12,000-image CIFAR-10 subset, env.sh
#   (device tool) run  command="bash benchmarks/gpu_session.sh tests round0"  carry=[".gpu"]
#
# Parts (arguments, in order; default "tests round0", which fits one 600 s call):
#   tests   the numeric tests on the GPU (TF32 tolerances)                        <= 90 s
#   round0  round 0 of the gpu preset: sequential vs compile-ahead vs warm cache  <= 390 s
#   flags   narrowing the autotuner, each setting on a cold cache                  <= 5 x 150 s
#   grown4  a round grown from a 4-cell base                                       <= 360 s
# Everything lands in $OUT (logs and the RESULT lines); each part has its own timeout, so a part
# that times out leaves the others' figures.
set -uo pipefail
source .gpu/env.sh
export MEMNAS_DATA_DIR OUT
log() { echo "=== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
part() {  # part SECONDS NAME COMMAND...
  local seconds=$1 name=$2; shift 2
  log "$name (timeout ${seconds}s)"
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?" >> "$OUT/$name.log"
  grep -h "^RESULT\|passed\|failed\|^exit" "$OUT/$name.log" | tail -3 | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
SUBSET="--train_subset 10000 --validation_subset 2000"
PARTS=${*:-tests round0}

# The numeric tests on the GPU (TF32 tolerances; issue "part 1", item 4).
[[ " $PARTS " == *" tests "* ]] && part 90 tests python3 -m pytest -q -x -p no:cacheprovider tests/test_ops.py tests/test_train.py \
  tests/test_compile_ahead.py -k "not slow"

# Round 0 of the gpu preset: sequential (the old path) against compile-ahead and a warm cache.
# The RESULT line counts the files of XLA's per-fusion autotune cache in the compilation cache.
[[ " $PARTS " == *" round0 "* ]] && part 390 round0 python3 benchmarks/search_throughput.py \
  --preset gpu --round 0 --candidates 6 $SUBSET

# Narrowing the autotuner: each setting on a cold cache, ahead mode only.
[[ " $PARTS " == *" flags "* ]] && for flags in "--xla_gpu_autotune_level=1" "--xla_gpu_autotune_level=2" \
             "--xla_gpu_experimental_enable_fusion_autotuner=false" \
             "--xla_gpu_enable_triton_gemm=false"; do
  name=flags$(echo "$flags" | tr -c 'a-z0-9' '_' | cut -c1-60)
  part 150 "$name" python3 benchmarks/search_throughput.py --preset gpu --round 0 \
    --candidates 6 $SUBSET --modes ahead --xla_flags "$flags"
done
[[ " $PARTS " == *" flags "* ]] && part 150 eval_autotune0 python3 \
  benchmarks/search_throughput.py --preset gpu --round 0 --candidates 6 $SUBSET --modes ahead \
  --eval_compiler_options xla_gpu_autotune_level=0

# A round grown from a 4-cell base (bigger programs).
[[ " $PARTS " == *" grown4 "* ]] && part 360 grown4 python3 benchmarks/search_throughput.py --preset gpu --round 1 --base_cells 4 \
  --candidates 4 $SUBSET --modes sequential,ahead
log done
