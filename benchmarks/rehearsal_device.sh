#!/usr/bin/env bash
# One command of the a5000 rehearsal on the GPU machine (the library's `device` tool), which keeps
# files only between back-to-back commands of under 10 minutes: each command sets up what a fresh
# machine lacks, runs the pipeline for at most REHEARSAL_BUDGET_S seconds (the runner skips finished
# notebooks and a stage resumes from its checkpoint, so the next command continues), then writes
# the figures so far to $OUT.
#
#   bash benchmarks/rehearsal_device.sh [rehearsal_a5000.py run arguments, e.g. --to 2.02]
#   bash benchmarks/rehearsal_device.sh --watch [SECONDS]
#
# --watch runs the whole rehearsal (prepare, 0.00-2.02, prune models/resized/, 3.01-6.02) as one
# detached process session that outlives the command, so no notebook is cut at a command's limit
# and no time is lost between commands; each --watch command starts it if it is not running,
# follows it for SECONDS (default 540) or until it ends, and writes the figures so far to $OUT.
# After a failure it is restarted only once the code differs (a fix sent with the next command);
# until then a --watch command keeps the machine warm for at most 120 s and reports
# (REHEARSAL_RETRY=1 restarts it anyway, after a failure of the machine rather than the code). With
# REHEARSAL_NO_START=1 a --watch command on a fresh machine (the last one was given back) starts
# nothing. REHEARSAL_SKIP_EVAL=1 leaves out phase 5 and 6.02 (their memory is not in question, and
# the whole run is close to one session's 30 minutes of device time); with it, REHEARSAL_TO=3.06
# stops the stages there and leaves out 6.01 (one notebook's figures on what device time is left).
#
# Carried (ignored) folder .rehearsal/: what benchmarks/device_setup.sh installs, and data.tar.xz
# (../shared/data: kowiki_medical, kormedmcqa, the KCD list, the Gemma 3 tokenizer side files).
set -uo pipefail
started=$(date +%s)  # the command's clock: unpacking on a fresh machine counts against its limit
ROOT=${REHEARSAL_ROOT:-/root/rehearsal}
BUDGET=${REHEARSAL_BUDGET_S:-520}
OUT=${OUT:-/tmp/rehearsal_out}
mkdir -p "$OUT"
if [ "${1:-}" = "--watch" ] && [ -n "${REHEARSAL_NO_START:-}" ] && [ ! -f "$ROOT/daemon.log" ]; then
  echo "FRESH-MACHINE: no rehearsal here to follow (REHEARSAL_NO_START is set); nothing started"
  exit 0
fi
. benchmarks/device_setup.sh
if [ ! -d ../shared/data/kormedmcqa ]; then
  mkdir -p ../shared && tar -C ../shared -xJf .rehearsal/data.tar.xz || exit 3
fi
export TQDM_MININTERVAL=30

report() {  # what a command brings back: per-notebook figures, the report, logs, executed notebooks
  python3 benchmarks/rehearsal_a5000.py --root "$ROOT" collect --out "$OUT/rehearsal_a5000.json" > "$OUT/collect.log" 2>&1
  tail -30 "$OUT/collect.log"
  local latest
  latest=$(ls -d "$ROOT"/runs/* 2>/dev/null | tail -1)
  if [ -n "$latest" ]; then
    cp "$latest/report.md" "$OUT/report.md" 2>/dev/null
    (cd "$ROOT/runs" && tar -czf "$OUT/logs.tgz" -- */logs */executed 2>/dev/null)
  fi
  df -h "$ROOT" | tail -1
  du -sh "$ROOT"/models/* "$ROOT"/data 2>/dev/null | sort -h | tail -12
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
}

if [ "${1:-}" = "--watch" ]; then
  WATCH=${2:-540}
  mkdir -p "$ROOT"
  code=$(find kormedgemma benchmarks config phase* -type f \( -name '*.py' -o -name '*.ipynb' -o -name '*.yaml' \
         -o -name '*.sh' -o -name '*.jinja' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
  pid=$(cat "$ROOT/daemon.pid" 2>/dev/null)
  if [ -f "$ROOT/.done" ]; then
    echo "the rehearsal has finished"
  elif [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "rehearsal running (pid $pid)"
  elif [ "$(cat "$ROOT/.failed" 2>/dev/null)" = "$code" ] && [ -z "${REHEARSAL_RETRY:-}" ]; then
    echo "the rehearsal failed with this code ($code); waiting for a fix"
    sleep $(( WATCH < 120 ? WATCH : 120 ))
  else
    echo "starting the rehearsal with code $code"
    rm -f "$ROOT/.failed"
    setsid nohup bash -c '
      cd "$1"; ROOT=$2; code=$3
      step() { echo "== $(date +%T) $*"; "$@"; }
      (
        if [ ! -f "$ROOT/standins/medgemma-4b/config.json" ]; then
          step python3 benchmarks/rehearsal_a5000.py --root "$ROOT" prepare || exit 1
        fi
        if [ ! -f "$ROOT/models/initialized/manifest.json" ]; then
          step python3 benchmarks/rehearsal_a5000.py --root "$ROOT" run --to 2.02 || exit 1
        fi
        rm -rf "$ROOT/models/resized"  # read by 2.02 alone; the 64 GB disk needs the room
        if [ -n "${REHEARSAL_SKIP_EVAL:-}" ]; then  # the RAM figures: 3.01-4.01 and 6.01, not phase 5 or 6.02
          step python3 benchmarks/rehearsal_a5000.py --root "$ROOT" run --from 3.01 --to "${REHEARSAL_TO:-4.01}" || exit 1
          if [ -z "${REHEARSAL_TO:-}" ]; then
            step python3 benchmarks/rehearsal_a5000.py --root "$ROOT" run --from 6.01 --to 6.01 || exit 1
          fi
        else
          step python3 benchmarks/rehearsal_a5000.py --root "$ROOT" run --from 3.01 || exit 1
        fi
      ) && touch "$ROOT/.done" || echo "$code" > "$ROOT/.failed"
      echo "== $(date +%T) ended"' rehearsal "$PWD" "$ROOT" "$code" >> "$ROOT/daemon.log" 2>&1 < /dev/null &
    echo $! > "$ROOT/daemon.pid"
  fi
  pid=$(cat "$ROOT/daemon.pid" 2>/dev/null)
  while [ $(( $(date +%s) - started )) -lt "$WATCH" ] && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
    sleep 5
  done
  grep -E '^== |^\[|^run |pipeline finished|^error|Error|rror:' "$ROOT/daemon.log" | tail -40
  cp "$ROOT/daemon.log" "$OUT/daemon.log"
  report
  exit 0
fi

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
report
exit 0
