#!/usr/bin/env bash
# Train a chain of runs one after the other, each resumable: a run whose folder holds last.pt is
# continued with --resume (exact), a finished one is skipped by at-mem itself.
# Usage: bash docs/results/evidence/run_chain.sh SETTINGS_FILE OUT_DIR METHOD:SEED [METHOD:SEED ...]
# SETTINGS_FILE holds one line: the at-mem train options shared by every run of the study.
# Two chains side by side with OMP_NUM_THREADS=1 each use both cores of the 2-core machine.
set -u
SETTINGS=$(grep -v '^#' "${1:?settings file}" | tr '\n' ' '); shift
OUT=${1:?output folder}; shift
mkdir -p "$OUT"
for item in "$@"; do
  method=${item%%:*}; seed=${item##*:}
  run="$OUT/$method-s$seed"
  if [ -f "$run/last.pt" ]; then resume=--resume; else resume=; fi
  start=$(date +%s)
  # shellcheck disable=SC2086  # the settings are words on purpose
  at-mem train $SETTINGS --method "$method" --seed "$seed" --out "$run" $resume --quiet >> "$run.log" 2>&1
  echo "$method-s$seed rc=$? wall_s=$(( $(date +%s) - start ))" >> "$OUT/walltime.txt"
done
