#!/usr/bin/env bash
# The analysis of the 4 runs made by run_experiment.sh; writes into docs/results/analysis/.
# Usage: bash docs/results/analysis/analyze.sh RUNS_DIR
set -euo pipefail
RUNS=${1:-/tmp/at-mem-analysis}
OUT=docs/results/analysis
ALL="$RUNS/pgd-at-true $RUNS/pgd-at-random $RUNS/trades-true $RUNS/trades-random"
time at-mem plot $ALL --output $OUT/curves.png
time at-mem memorization $ALL --output $OUT/memorization.json --plot $OUT/memorization.png
time at-mem measures $ALL --output $OUT/measures.json --n-points 256 --gap-points 256 --device cpu
for run in pgd-at-true pgd-at-random trades-true trades-random; do
  time at-mem gradient-stability $RUNS/$run/last.pt --output $OUT/gradient_stability_$run.json \
    --n-batches 2 --batch-size 128 --radii 1e-3,1e-2,1e-1,1 --device cpu
done
# one figure with the four panels
python -c "
import json, sys
from at_memorization.analysis import plot_gradient_stability
runs = ['pgd-at-true', 'pgd-at-random', 'trades-true', 'trades-random']
plot_gradient_stability([json.load(open(f'$OUT/gradient_stability_{r}.json')) for r in runs], '$OUT/gradient_stability.png')
"
for run in pgd-at-true pgd-at-random trades-true trades-random; do
  mkdir -p $OUT/runs/$run
  cp $RUNS/$run/metrics.jsonl $RUNS/$run/config.json $OUT/runs/$run/
done
# the supplementary 60-epoch random-label runs (run_long_random.sh), when present
if [ -d "$RUNS/trades-random-long" ] && [ -d "$RUNS/pgd-at-random-long" ]; then
  LONG="$RUNS/pgd-at-random-long $RUNS/trades-random-long"
  time at-mem plot $LONG --output $OUT/curves_long_random.png
  time at-mem memorization $LONG --output $OUT/memorization_long_random.json
  time at-mem measures $ALL $LONG --output $OUT/measures_with_long_random.json --n-points 256 --gap-points 256 --device cpu
  for run in pgd-at-random-long trades-random-long; do
    time at-mem gradient-stability $RUNS/$run/last.pt --output $OUT/gradient_stability_$run.json \
      --n-batches 2 --batch-size 128 --radii 1e-3,1e-2,1e-1,1 --device cpu
    mkdir -p $OUT/runs/$run
    cp $RUNS/$run/metrics.jsonl $RUNS/$run/config.json $OUT/runs/$run/
  done
fi
