#!/usr/bin/env bash
# The search for a setting where PGD-AT robust-overfits on the 2-core CPU (docs/REPRODUCTION.md,
# section 1b). Five candidates, PGD-AT only, seed 0; two at a time with OMP_NUM_THREADS=1 each.
# m-n40, f-n30 and f500-n40 were stopped early (at epochs 35, 35, 45) once their training robust
# accuracy had stalled at the share of clean labels; m500-n40-d0 ran to epoch 42 (enough to judge).
# Usage: bash docs/results/evidence/search.sh OUT_DIR
set -u
OUT=${1:-/tmp/search}
MNIST=(--dataset mnist --data-dir ../shared/data/mnist)
FMNIST=(--dataset fashion-mnist --data-dir ../shared/data/fashion-mnist)
BIG=(--model smallcnn --epochs 60 --batch-size 64 --lr 0.05 --train-size 2000 --test-size 1000 --eval-train-size 500
     --eps 0.1 --step-size 0.02 --steps 10 --eval-steps 10 --track-samples --device cpu --seed 0 --quiet)
SMALL=(--model smallcnn --epochs 60 --batch-size 32 --lr 0.05 --train-size 500 --test-size 1000 --eval-train-size 250
       --eps 0.1 --step-size 0.04 --steps 3 --eval-steps 10 --label-noise 0.4 --track-samples --device cpu --seed 0 --quiet)
at-mem train --method pgd-at "${MNIST[@]}" --label-noise 0.4 "${BIG[@]}" --out "$OUT/m-n40"
at-mem train --method pgd-at "${FMNIST[@]}" --label-noise 0.3 "${BIG[@]}" --out "$OUT/f-n30"
at-mem train --method pgd-at "${MNIST[@]}" "${SMALL[@]}" --out "$OUT/m500-n40"
at-mem train --method pgd-at "${FMNIST[@]}" "${SMALL[@]}" --out "$OUT/f500-n40"
at-mem train --method pgd-at "${MNIST[@]}" "${SMALL[@]}" --drop-rate 0 --out "$OUT/m500-n40-d0"
at-mem plot "$OUT/m-n40" "$OUT/f-n30" "$OUT/m500-n40" "$OUT/f500-n40" "$OUT/m500-n40-d0" \
    --output docs/results/evidence/search/search-curves.png
