#!/usr/bin/env bash
# CPU-scale reproduction, small-data setting (issue 6, section 3). Small scale, NOT the paper's
# setting: PreActResNet-18 at quarter width (preactresnet18_w16), the first 500 CIFAR-10 (JPEG
# re-encoded) training images, batch 32 (16 steps per epoch), 40 epochs (lr 0.1, x0.1 at epochs 20
# and 30; TE from epoch 18, full weight at 30), PGD-5 training attack (eps 8/255, step 2/255);
# per epoch: PGD-10 accuracy on the first 300 test images and on the first 200 training images.
# Usage: bash docs/results/reproduction/run_cpu_small_data.sh /path/to/cifar10-jpg RUN [RUN ...]
# (RUN: small-pgd-at small-pgd-at-te small-trades small-trades-te). Ran as two chains side by side,
# OMP_NUM_THREADS=1 each: "small-pgd-at small-trades" and "small-pgd-at-te small-trades-te".
set -u
DATA=${1:?path to the unpacked cifar10-jpg folder}; shift
OUT=docs/results/reproduction
COMMON=(--dataset imagefolder --data-dir "$DATA" --model preactresnet18_w16 --train-size 500 --test-size 300
        --batch-size 32 --epochs 40 --steps 5 --eval-steps 10 --eval-train-size 200 --seed 0 --device cpu --quiet)
for name in "$@"; do
  method=${name#small-}
  if [ -f "$OUT/$name/last.pt" ]; then resume=--resume; else resume=; fi
  start=$(date +%s)
  at-mem train "${COMMON[@]}" --method "$method" --out "$OUT/$name" $resume > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$OUT/walltime.txt"
done
