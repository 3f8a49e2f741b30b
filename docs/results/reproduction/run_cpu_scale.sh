#!/usr/bin/env bash
# CPU-scale reproduction (issue 6, section 3): the exact commands behind docs/REPRODUCTION.md.
# Small scale, NOT the paper's setting: PreActResNet-18 at quarter width (preactresnet18_w16),
# 2,000 CIFAR-10 (JPEG re-encoded) training images, the first 500 test images, 30 epochs,
# PGD-5 training attack (step 2/255), PGD-10 test attack per epoch.
# Usage: bash docs/results/reproduction/run_cpu_scale.sh /path/to/cifar10-jpg
set -u
DATA=${1:?path to the unpacked cifar10-jpg folder}
OUT=docs/results/reproduction
COMMON=(--dataset imagefolder --data-dir "$DATA" --model preactresnet18_w16 --train-size 2000 --test-size 500
        --steps 5 --eval-steps 10 --eval-train-size 500 --seed 0 --device cpu --quiet)
run() {  # name, then extra flags
  local name=$1; shift
  if [ -f "$OUT/$name/last.pt" ]; then resume=--resume; else resume=; fi
  local start=$(date +%s)
  at-mem train "${COMMON[@]}" "$@" --out "$OUT/$name" $resume > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall_s=$(( $(date +%s) - start ))" >> "$OUT/walltime.txt"
}
run pgd-at      --method pgd-at    --epochs 30
run pgd-at-te   --method pgd-at-te --epochs 30
run trades      --method trades    --epochs 30
run trades-te   --method trades-te --epochs 30
# Random labels (the paper's preset: label noise 1, weight decay 0, no augmentation), 1,000 images.
run random-pgd-at --method pgd-at --epochs 30 --preset random-labels --train-size 1000 --eval-train-size 1000
run random-trades --method trades --epochs 30 --preset random-labels --train-size 1000 --eval-train-size 1000
