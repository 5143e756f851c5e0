"""What stage 6 leaves in the workstation's RAM: torchao's 8-bit AdamW step on the two embedding
matrices at MedGemma-4B shape (2 x 262,208 x 2,560, bf16), with inductor's compile-worker pool
and without it (GPU, ~30 s each; needs torchao: `. benchmarks/device_setup.sh` on the GPU machine).

    python benchmarks/probe_stage6_rss.py                                  # the pool (default threads)
    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/probe_stage6_rss.py  # compiled in-process

Prints the process's RSS split (GB) before and after one optimizer step.
"""
import json
from pathlib import Path

import torch


def split() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = round(int(line.split()[1]) * 1024 / 1e9, 3)
    return fields


def main() -> int:
    from torchao.optim import AdamW8bit

    figures = {"start": split()}
    matrices = [torch.nn.Parameter(torch.randn(262_208, 2_560, dtype=torch.bfloat16, device="cuda") * 0.02)
                for _ in range(2)]
    optimizer = AdamW8bit(matrices, lr=1e-4, bf16_stochastic_round=True)
    for matrix in matrices:
        matrix.grad = torch.randn_like(matrix) * 1e-3
    optimizer.step()
    torch.cuda.synchronize()
    figures["after_torchao_adamw8bit_step"] = split()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
