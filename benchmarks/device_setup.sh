# Sourced by the benchmarks' GPU-machine scripts (rehearsal_device.sh, deepspeed_device.sh): what a
# fresh machine of the library's `device` tool lacks, from the carried (ignored) folder .rehearsal/:
# gpusite.tar.xz (for Python 3.12: papermill and the Jupyter kernel, datatrove, gensim, bitsandbytes
# with its CUDA 13 library only, torchao, torch-optimi, pydantic, llm-compressor, FastAPI/uvicorn,
# openai) and wheels of what the image lacks or holds in another release (xxhash 3.8.2: xxhash 4
# refuses datatrove's str shingles; deepspeed 0.19.8 and hjson). NVLink multicast stays off in every
# process started from here: on a shared host it can take the GPUs out of service.
if [ ! -d /tmp/gpusite ]; then
  tar -C /tmp -xJf .rehearsal/gpusite.tar.xz || exit 3
fi
if [ ! -f /tmp/gpusite/.wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpusite \
    .rehearsal/*.whl && touch /tmp/gpusite/.wheels || exit 3
fi
export PYTHONPATH=/tmp/gpusite:$PWD PATH=/tmp/gpusite/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
