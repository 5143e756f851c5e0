#!/usr/bin/env bash
# Builds the ignored folder .rehearsal/ that benchmarks/rehearsal_device.sh (through
# device_setup.sh) carries to the GPU machine in one device command (64 MiB at most):
#   gpusite.tar.xz  the 270M runs' site folder from .dev/a (benchmarks/gpu_carry.sh builds it)
#   bitsandbytes-*.whl  requirements-gpu.txt's release with only the CUDA 13 library the image's
#                   torch (cu130) loads: the whole wheel (43 MB, every CUDA and ROCm build) would not fit
#   data.tar.xz     ../shared/data as data/... (kowiki_medical, kormedmcqa, the KCD list, side files)
#
#   bash benchmarks/gpu_carry.sh && bash benchmarks/rehearsal_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .dev/a/gpusite.tar.xz ] || { echo "no .dev/a/gpusite.tar.xz: run bash benchmarks/gpu_carry.sh first" >&2; exit 2; }
bnb=$(grep -E '^bitsandbytes==' requirements-gpu.txt)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
  --platform manylinux_2_24_x86_64 "$bnb" -d "$work"
wheel=$(ls "$work"/bitsandbytes-*.whl)
# pip installs the files a wheel holds and rewrites RECORD, so dropping libraries is safe
libs=$(python3 - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
print("\n".join(n for n in names if n.endswith(".so") and "cuda130" not in n))
PY
)
[ -n "$libs" ] && echo "$libs" | xargs zip -q -d "$wheel"
rm -rf .rehearsal && mkdir -p .rehearsal
cp .dev/a/gpusite.tar.xz "$wheel" .rehearsal/
XZ_OPT="-9 -T2" tar -C "$(cd .. && pwd)/shared" -cJf .rehearsal/data.tar.xz data
du -sh .rehearsal/*
