#!/usr/bin/env bash
# The runs in runs/: PGD-AT with AWP on the MNIST label-noise plan's settings
# (configs/plans/mnist-label-noise.toml), seed 0, the first 5 epochs (12 for the warmup run; the
# milestones stay at the plan's 20,30, so the lr is the plan's 0.05 throughout).
# Run from the repository root; each run took under 2 minutes on one core.
set -euo pipefail
D=${OUT:-docs/results/evidence/awp-smallcnn/runs}  # OUT=DIR: somewhere else
common="--dataset mnist --data-dir ../shared/data/mnist --model smallcnn --drop-rate 0 --label-noise 0.4
  --train-size 500 --test-size 500 --batch-size 32 --lr 0.05 --epochs 5 --milestones 20,30
  --eps 0.1 --step-size 0.04 --steps 3 --device cpu --seed 0"
for gamma in 0.01 0.005 0.002 0; do
  OMP_NUM_THREADS=1 at-mem train --method pgd-at-awp --awp-gamma $gamma $common --out $D/awp-gamma$gamma
done
OMP_NUM_THREADS=1 at-mem train --method pgd-at $common --out $D/pgd-at
# AWP switched on after 5 epochs of plain PGD-AT (--epochs 12 given last wins over the 5 above)
OMP_NUM_THREADS=1 at-mem train --method pgd-at-awp --awp-gamma 0.01 --awp-warmup 5 $common --epochs 12 \
  --out $D/awp-gamma0.01-warmup5
