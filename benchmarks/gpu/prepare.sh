#!/usr/bin/env bash
# Run on the development machine (no GPU) before a GPU lease: everything the bare device machine
# lacks goes into two git-ignored folders that the device tool carries:
#   .whl/      wheels for Python 3.12 (torchattacks, robustbench, pyautoattack, timm 1.0.9, gdown,
#              geotorch, beautifulsoup4, soupsieve, setuptools<82 for robustbench's pkg_resources) and a wheel of this package built from the tree
#   .gpu-data/ the CIFAR-10 JPEG archive and MNIST from ../shared/data
# Then it prints the exact device `run` call. Usage: bash benchmarks/gpu/prepare.sh [SHARED_DATA]
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED_DATA="${1:-${AT_MEM_SHARED_DATA:-../shared/data}}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python

rm -rf .whl .gpu-data
mkdir -p .whl .gpu-data/cifar10-jpg .gpu-data/mnist
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl torchattacks==3.5.1 robustbench==1.1.1 pyautoattack==0.2.0 timm==1.0.9 gdown==5.1.0 \
    geotorch==0.4.0 beautifulsoup4 soupsieve 'setuptools<82'
# pyautoattack's wheel is 42 MB, 44.8 MB of it an example model (examples/model_test.pt) that
# nothing imports: rebuild the wheel without it so the carry stays far under 64 MiB.
"$PY" - <<'PY'
import glob, zipfile
path = glob.glob(".whl/pyautoattack-*.whl")[0]
drop = lambda name: name.startswith("pyautoattack/examples/") and not name.endswith(".py")
with zipfile.ZipFile(path) as src:
    items = [(info, src.read(info)) for info in src.infolist() if not drop(info.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines() if not drop(line.decode().split(",")[0]))
        dst.writestr(info, data)
PY
# Build from a copy: a build in the tree leaves at_memorization.egg-info behind, whose stale entry
# points `python -m at_memorization` (run from the root) would read instead of the installed ones.
build=$(mktemp -d)
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$build"/ 2>/dev/null || cp -r . "$build"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$build" >/dev/null
rm -rf "$build"
cp "$SHARED_DATA/cifar10-jpg/cifar10_jpg_YoongiKim_6d04f75.tar.gz" .gpu-data/cifar10-jpg/
cp "$SHARED_DATA"/mnist/*.gz .gpu-data/mnist/
du -sh .whl .gpu-data
cat <<'CALL'

Device call (one `run`, carry [".whl", ".gpu-data"]); stages in order of value, see docs/gpu.md:
  command:   bash benchmarks/gpu/run_on_device.sh all 540
  carry:     [".whl", ".gpu-data"]
  timeout_s: 580
Results come back under the reply's files_at: runtime.json, check.json, profile.json, speed.json,
reproduce.json, suite.log, runs.tar.gz. Commit them with: python benchmarks/gpu/collect.py FILES_AT
CALL
