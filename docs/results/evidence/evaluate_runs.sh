#!/usr/bin/env bash
# Evaluate the study's runs as they finish: best and final checkpoints with clean, PGD-20 and CW on
# the first 1,000 MNIST test images (RUN/eval/{best,last}.json), then AutoAttack (standard) on the
# first 500 test images for the final checkpoints of the runs named with --autoattack.
# Usage: bash docs/results/evidence/evaluate_runs.sh RUNS_DIR EPOCHS RUN [RUN ...] [--autoattack RUN ...]
set -u
RUNS=${1:?runs folder}; EPOCHS=${2:?epochs per run}; shift 2
aa=0
for name in "$@"; do
  if [ "$name" = --autoattack ]; then aa=1; continue; fi
  run="$RUNS/$name"
  # wait for the run to finish all its epochs
  until [ -f "$run/metrics.jsonl" ] && [ "$(wc -l < "$run/metrics.jsonl")" -ge "$EPOCHS" ] \
        && ! pgrep -f -- "--out $run( |$)" > /dev/null; do sleep 20; done
  start=$(date +%s)
  if [ $aa = 0 ]; then
    at-mem evaluate "$run" --attack clean --attack pgd20 --attack cw --n-examples 1000 --device cpu >> "$run.eval.log" 2>&1
    echo "eval $name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$RUNS/walltime.txt"
  else
    at-mem evaluate "$run" --checkpoints last --attack autoattack --n-examples 500 --device cpu >> "$run.eval.log" 2>&1
    echo "autoattack $name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$RUNS/walltime.txt"
  fi
done
