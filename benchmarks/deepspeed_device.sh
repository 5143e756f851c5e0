#!/usr/bin/env bash
# benchmarks/deepspeed_gpu.py on the GPU machine (the library's `device` tool), with carry
# [".rehearsal"] (what benchmarks/device_setup.sh installs).
#
#   bash benchmarks/deepspeed_device.sh [--gpus N]
set -uo pipefail
OUT=${OUT:-/tmp/deepspeed_out}
mkdir -p "$OUT"
. benchmarks/device_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/deepspeed_gpu.py --root /tmp/ds_gpu --out "$OUT" "$@"
status=$?
tar -C /tmp/ds_gpu -czf "$OUT/logs.tgz" logs
for log in /tmp/ds_gpu/logs/*.log; do
  echo "== $log"; grep -E "rror|Traceback|^\{|resumed|notice" "$log" | grep -v "Warning" | tail -8
done
exit $status
