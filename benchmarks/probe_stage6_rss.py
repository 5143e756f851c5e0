"""What stage 6 leaves in the workstation's RAM: torchao's 8-bit AdamW step on the two embedding
matrices at MedGemma-4B shape (2 x 262,208 x 2,560, bf16), with inductor's compile-worker pool
and without it (GPU, ~30 s each; needs torchao: `. benchmarks/device_setup.sh` on the GPU machine).

    python benchmarks/probe_stage6_rss.py                                  # the pool (default threads)
    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/probe_stage6_rss.py  # compiled in-process
    python benchmarks/probe_stage6_rss.py --as-stage   # as 3.06 does it: import the stage module,
                                                       # then training.stage's limit_compile_workers()

Prints the process's RSS split (GB) before and after one optimizer step, with the CUDA caching host
allocator's pinned bytes and the number of child processes (inductor's compile workers).
"""
import json
import sys
from pathlib import Path

import torch


def split() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = round(int(line.split()[1]) * 1024 / 1e9, 3)
    return fields


def extras() -> dict[str, float]:
    import psutil

    stats = torch.cuda.host_memory_stats() if torch.cuda.is_available() else {}
    return {"pinned_host_gb": round(stats.get("reserved_bytes.current", stats.get("allocated_bytes.current", 0)) / 1e9, 3),
            "children": len(psutil.Process().children(recursive=True))}


def main() -> int:
    if "--as-stage" in sys.argv:
        from kormedgemma.core.environment import limit_compile_workers
        from kormedgemma.training import stage  # noqa: F401  (what 3.06's settings cell imports)

        limit_compile_workers()
    from torchao.optim import AdamW8bit

    figures = {"start": {**split(), **extras()}}
    matrices = [torch.nn.Parameter(torch.randn(262_208, 2_560, dtype=torch.bfloat16, device="cuda") * 0.02)
                for _ in range(2)]
    optimizer = AdamW8bit(matrices, lr=1e-4, bf16_stochastic_round=True)
    for matrix in matrices:
        matrix.grad = torch.randn_like(matrix) * 1e-3
    optimizer.step()
    torch.cuda.synchronize()
    figures["after_torchao_adamw8bit_step"] = {**split(), **extras()}
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # what accelerate's save_state does with the state
        torch.save(optimizer.state_dict(), Path(folder) / "optimizer.bin")
    figures["after_saving_optimizer_state"] = {**split(), **extras()}
    figures["host_memory_stats"] = {k: v for k, v in torch.cuda.host_memory_stats().items()
                                    if k.endswith(".current") or k.endswith(".peak")}
    # what free_memory() does once a stage's tensors are gone: the host allocator keeps its pinned
    # blocks cached (shared memory the kernel cannot reclaim) until its cache is emptied
    del optimizer, matrices
    import gc

    from kormedgemma.core.environment import free_memory

    gc.collect()
    torch.cuda.empty_cache()
    figures["after_del_and_cuda_empty_cache"] = {**split(), **extras()}
    free_memory()
    figures["after_free_memory"] = {**split(), **extras()}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
