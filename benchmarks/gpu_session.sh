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
#   packed  issue "part 2": round 0 of the gpu preset (49 candidates) ahead vs packed
#           (packs of 16, then 49), a 4-cell round packed, the packed tests         <= 560 s
#   result  the README's results chain: gpu_quick search, final training of its answer and of
#           ResNet-20 (train_final.py:quick), compare.py                             <= 600 s
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
# Packed training: one program per round, K candidates per step (README, "Packed training").
if [[ " $PARTS " == *" packed "* ]]; then
  part 60 packed_tests python3 -m pytest -q -x -p no:cacheprovider tests/test_packed.py \
    -k "matches or diverging"
  part 200 packed_round0 python3 benchmarks/search_throughput.py --preset gpu --round 0 \
    --candidates 49 $SUBSET --modes ahead --packing 16
  part 120 packed_round0_49 python3 benchmarks/search_throughput.py --preset gpu --round 0 \
    --candidates 49 $SUBSET --modes ahead --packing 49
  part 180 packed_grown4 python3 benchmarks/search_throughput.py --preset gpu --round 1 \
    --base_cells 4 --candidates 32 $SUBSET --modes ahead --packing 16
fi
# The results chain (README, "Results"): work directories in /tmp, the reports copied to $OUT.
if [[ " $PARTS " == *" result "* ]]; then
  R=/tmp/runs; mkdir -p "$R" "$OUT/results"
  part 330 result_search python3 experiments/cifar10_search.py \
    --config=experiments/configs/cifar10.py:gpu_quick --workdir=$R/quick \
    --config.output.progress_bar=false --config.data.validation_size=2000
  FINAL="--config=experiments/configs/train_final.py:quick"
  part 150 result_final python3 experiments/train_final.py $FINAL \
    --arch=$R/quick/best_architecture.json --workdir=$R/final
  part 90 result_resnet20 python3 experiments/train_final.py $FINAL --baseline=resnet20 \
    --workdir=$R/resnet20
  part 30 result_compare python3 experiments/compare.py --search=$R/quick \
    --final=$R/final,$R/resnet20 --out="$OUT/results"
  cp $R/quick/{best.json,leaderboard.md,pareto.png,candidates.jsonl} "$OUT/results/" 2>/dev/null
  for d in final resnet20; do cp $R/$d/result.json "$OUT/results/$d.json" 2>/dev/null; done
fi
log done
