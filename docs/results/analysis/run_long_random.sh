#!/usr/bin/env bash
# Supplement to run_experiment.sh: the two random-label runs again, 60 epochs at a constant lr 0.05.
# Usage: bash docs/results/analysis/run_long_random.sh RUNS_DIR [MNIST_DIR]
set -euo pipefail
RUNS=${1:-/tmp/at-mem-analysis}
DATA=${2:-../shared/data/mnist}
mkdir -p "$RUNS"
COMMON="--dataset mnist --data-dir $DATA --model smallcnn --epochs 60 --batch-size 32 --lr 0.05
        --milestones 1000 --train-size 256 --test-size 256 --eval-train-size 256
        --eps 0.1 --step-size 0.04 --steps 3 --eval-steps 5 --track-samples --device cpu --seed 0 --quiet
        --preset random-labels"
for method in trades pgd-at; do
  start=$(date +%s)
  at-mem train --method $method $COMMON --out "$RUNS/$method-random-long"
  echo "$method-random-long: $(( $(date +%s) - start )) s wall" | tee -a "$RUNS/times.txt"
done
