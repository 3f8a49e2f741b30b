#!/usr/bin/env bash
# Evaluate the best and final checkpoints of the CPU-scale runs: clean, PGD-20, CW and AutoAttack
# (standard, pyautoattack) on the first 200 test points of CIFAR-10 (JPEG re-encoded).
# Usage: bash docs/results/reproduction/evaluate.sh RUN [RUN ...]
set -u
OUT=docs/results/reproduction
for run in "$@"; do
  for which in best last; do
    name=$([ "$which" = last ] && echo final || echo best)
    start=$(date +%s)
    at-mem evaluate "$OUT/$run/$which.pt" --attack all --n-examples 200 --device cpu \
        --output "$OUT/$run/eval_$name.json" > "$OUT/$run/eval_$name.log" 2>&1
    echo "eval $run $name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$OUT/walltime.txt"
  done
done
