#!/usr/bin/env bash
# benchmarks/deepspeed_gpu.py on the GPU machine (the library's `device` tool), with carry
# [".rehearsal"]: gpusite.tar.xz (papermill, datatrove, gensim, bitsandbytes, torchao, torch-optimi,
# pydantic, ... for Python 3.12) and wheels of what the image lacks or holds in another version
# (deepspeed 0.19.8, hjson, xxhash 3.8.2). The multicast variables stay set for every process.
#
#   bash benchmarks/deepspeed_device.sh [--gpus N]
set -uo pipefail
OUT=${OUT:-/tmp/deepspeed_out}
mkdir -p "$OUT"
if [ ! -d /tmp/gpusite ]; then
  tar -C /tmp -xJf .rehearsal/gpusite.tar.xz || exit 3
fi
if [ ! -f /tmp/gpusite/.wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpusite .rehearsal/*.whl && touch /tmp/gpusite/.wheels || exit 3
fi
export PYTHONPATH=/tmp/gpusite:$PWD PATH=/tmp/gpusite/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/deepspeed_gpu.py --root /tmp/ds_gpu --out "$OUT" "$@"
status=$?
tar -C /tmp/ds_gpu -czf "$OUT/logs.tgz" logs
for log in /tmp/ds_gpu/logs/*.log; do
  echo "== $log"; grep -E "rror|Traceback|^\{|resumed|notice" "$log" | grep -v "Warning" | tail -8
done
exit $status
