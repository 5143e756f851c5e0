#!/usr/bin/env bash
# One command of the a5000 rehearsal on the GPU machine (the library's `device` tool), which keeps
# files only between back-to-back commands of under 10 minutes: each command sets up what a fresh
# machine lacks, runs the pipeline for at most REHEARSAL_BUDGET_S seconds (the runner skips finished
# notebooks and a stage resumes from its checkpoint, so the next command continues), then writes
# the figures so far to $OUT.
#
#   bash benchmarks/rehearsal_device.sh [rehearsal_a5000.py run arguments, e.g. --to 2.02]
#
# Carried (ignored) folder .rehearsal/: gpusite.tar.xz (the packages the GPU image lacks, for
# Python 3.12: papermill and the Jupyter kernel, datatrove, gensim, bitsandbytes with its CUDA 13
# library only, torchao, torch-optimi, llm-compressor, FastAPI/uvicorn, openai) and data.tar.xz
# (../shared/data: kowiki_medical, kormedmcqa, the KCD list, the Gemma 3 tokenizer side files), and
# wheels of pinned versions the image holds in another release (xxhash 3.8.2).
set -uo pipefail
ROOT=${REHEARSAL_ROOT:-/root/rehearsal}
BUDGET=${REHEARSAL_BUDGET_S:-520}
OUT=${OUT:-/tmp/rehearsal_out}
mkdir -p "$OUT"
if [ ! -d /tmp/gpusite ]; then
  tar -C /tmp -xJf .rehearsal/gpusite.tar.xz || exit 3
fi
if [ ! -f /tmp/gpusite/.wheels ]; then
  # Versions the image has in another release: xxhash 4 refuses datatrove's str shingles.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpusite .rehearsal/*.whl && touch /tmp/gpusite/.wheels || exit 3
fi
if [ ! -d ../shared/data/kormedmcqa ]; then
  mkdir -p ../shared && tar -C ../shared -xJf .rehearsal/data.tar.xz || exit 3
fi
export PYTHONPATH=/tmp/gpusite:$PWD
export PATH=/tmp/gpusite/bin:$PATH
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
started=$(date +%s)
if [ ! -f "$ROOT/standins/medgemma-4b/config.json" ]; then
  python3 benchmarks/rehearsal_a5000.py --root "$ROOT" prepare > "$OUT/prepare.log" 2>&1 || { tail -40 "$OUT/prepare.log"; exit 4; }
  grep -E '^\{|seconds|pieces|agreement' "$OUT/prepare.log" | tail -12
fi
# The machine's disk is 64 GB and the run needs ~65: with REHEARSAL_PRUNE_RESIZED=1, models/resized/
# (read only by 2.02) goes once 2.02 has sealed its output; continue with `--from 3.01`.
if [ -n "${REHEARSAL_PRUNE_RESIZED:-}" ] && [ -f "$ROOT/models/initialized/manifest.json" ]; then
  rm -rf "$ROOT/models/resized" && echo "pruned models/resized (continue with --from 3.01)"
fi
left=$(( BUDGET - ($(date +%s) - started) ))
[ "$left" -lt 30 ] && left=30
timeout -s INT -k 30 "$left" python3 benchmarks/rehearsal_a5000.py --root "$ROOT" run "$@" > "$OUT/run.log" 2>&1
status=$?
grep -E '^\[|^run |killed|pipeline finished|^error|Error' "$OUT/run.log" | tail -40
echo "run exit status: $status"
python3 benchmarks/rehearsal_a5000.py --root "$ROOT" collect --out "$OUT/rehearsal_a5000.json" > "$OUT/collect.log" 2>&1
cat "$OUT/collect.log" | tail -30
latest=$(ls -d "$ROOT"/runs/* 2>/dev/null | tail -1)
[ -n "$latest" ] && cp "$latest/report.md" "$OUT/report.md" 2>/dev/null
[ -n "$latest" ] && tar -C "$latest" -czf "$OUT/logs.tgz" logs 2>/dev/null
df -h "$ROOT" | tail -1
du -sh "$ROOT"/models/* "$ROOT"/data 2>/dev/null | sort -h | tail -12
nvidia-smi --query-gpu=memory.used --format=csv,noheader
exit 0
