#!/usr/bin/env bash
# (The eval_*.json files it wrote were later merged, numbers unchanged, into RUN/eval/best.json and
# RUN/eval/last.json, the layout of `at-mem evaluate RUN`, and tabulated with `at-mem report`.)
# Evaluate the best and final checkpoints of CPU-scale runs on CIFAR-10 (JPEG re-encoded):
#   clean, PGD-20 and CW (30 steps) on the first 300 test points  -> RUN/eval_{best,final}.json
#   with --autoattack also AutoAttack standard (pyautoattack) on the first 100 test points
#                                                                   -> RUN/eval_{best,final}_aa.json
# (AutoAttack costs minutes per checkpoint on a CPU core, hence the smaller set.)
# Usage: bash docs/results/reproduction/evaluate.sh [--autoattack] RUN [RUN ...]
set -u
OUT=docs/results/reproduction
AA=0; if [ "${1:-}" = --autoattack ]; then AA=1; shift; fi
for run in "$@"; do
  for which in best last; do
    name=$([ "$which" = last ] && echo final || echo best)
    start=$(date +%s)
    at-mem evaluate "$OUT/$run/$which.pt" --attack clean --attack pgd20 --attack cw --n-examples 300 \
        --device cpu --output "$OUT/$run/eval_$name.json" > /dev/null 2>&1
    echo "eval $run $name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$OUT/walltime.txt"
    if [ $AA = 1 ]; then
      start=$(date +%s)
      at-mem evaluate "$OUT/$run/$which.pt" --attack autoattack --n-examples 100 --device cpu \
          --output "$OUT/$run/eval_${name}_aa.json" > /dev/null 2>&1
      echo "autoattack $run $name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$OUT/walltime.txt"
    fi
  done
done
