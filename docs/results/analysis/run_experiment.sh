#!/usr/bin/env bash
# The small random-label study of docs/memorization.md: 4 runs (PGD-AT / TRADES x true / random
# labels), smallcnn on the first 256 MNIST training images, run one after the other on CPU.
# Usage: bash docs/results/analysis/run_experiment.sh RUNS_DIR [MNIST_DIR]
set -euo pipefail
RUNS=${1:-/tmp/at-mem-analysis}
DATA=${2:-../shared/data/mnist}
mkdir -p "$RUNS"
COMMON="--dataset mnist --data-dir $DATA --model smallcnn --epochs 25 --batch-size 32 --lr 0.05
        --milestones 20,23 --train-size 256 --test-size 256 --eval-train-size 256
        --eps 0.1 --step-size 0.04 --steps 3 --eval-steps 5 --track-samples --device cpu --seed 0 --quiet"
for method in pgd-at trades; do
  for labels in true random; do
    extra=""; [ "$labels" = random ] && extra="--preset random-labels"
    start=$(date +%s)
    at-mem train --method $method $COMMON $extra --out "$RUNS/$method-$labels"
    echo "$method-$labels: $(( $(date +%s) - start )) s wall" | tee -a "$RUNS/times.txt"
  done
done
