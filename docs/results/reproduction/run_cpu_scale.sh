#!/usr/bin/env bash
# CPU-scale reproduction (issue 6, section 3): the exact commands behind docs/REPRODUCTION.md.
# Small scale, NOT the paper's setting: PreActResNet-18 at quarter width (preactresnet18_w16),
# 2,000 CIFAR-10 (JPEG re-encoded) training images, the first 500 test images, 20 epochs (lr x0.1 at
# epochs 10 and 15; TE from epoch 9, full weight at 15), PGD-5 training attack (step 2/255), PGD-10
# test attack per epoch, clean/PGD-10 accuracy on the first 200 training images per epoch.
# Usage: bash docs/results/reproduction/run_cpu_scale.sh /path/to/cifar10-jpg [RUN ...]
# (RUN: pgd-at pgd-at-te trades trades-te random-pgd-at random-trades; default all, in order.)
# Ran as two chains side by side with OMP_NUM_THREADS=1 (one core each), for pgd-at and pgd-at-te
# only (both killed and resumed on the way); the TRADES and random-label runs of this setting were
# dropped for time in favour of run_cpu_small_data.sh (see docs/REPRODUCTION.md).
set -u
DATA=${1:?path to the unpacked cifar10-jpg folder}; shift
WANTED=" ${*:-pgd-at pgd-at-te trades trades-te random-pgd-at random-trades} "
OUT=docs/results/reproduction
COMMON=(--dataset imagefolder --data-dir "$DATA" --model preactresnet18_w16 --train-size 2000 --test-size 500
        --steps 5 --eval-steps 10 --eval-train-size 200 --seed 0 --device cpu --quiet)
run() {  # name, then extra flags
  local name=$1; shift
  [[ "$WANTED" == *" $name "* ]] || return 0
  if [ -f "$OUT/$name/last.pt" ]; then resume=--resume; else resume=; fi
  local start=$(date +%s)
  at-mem train "${COMMON[@]}" "$@" --out "$OUT/$name" $resume > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$OUT/walltime.txt"
}
run pgd-at      --method pgd-at    --epochs 20
run pgd-at-te   --method pgd-at-te --epochs 20
run trades      --method trades    --epochs 20
run trades-te   --method trades-te --epochs 20
# Random labels (the paper's preset: label noise 1, weight decay 0, no augmentation), 1,000 images.
run random-pgd-at --method pgd-at --epochs 20 --preset random-labels --train-size 1000
run random-trades --method trades --epochs 20 --preset random-labels --train-size 1000
