"""Does copying GPU tensors to the CPU leave resident memory behind? (GPU, ~1 minute)

The a5000 rehearsal's 3.06 kernel held ~8.9 GB that was neither allocated (RssAnon) nor pages of
files (RssFile) from the end of `train_stage(6)` on: about the 9.1 GB that stage 6 copies from the
GPU when it writes its dequantised base and trained embeddings through `io.stream_safetensors`.
This runs that same function on 6.4 GB of GPU tensors and prints the process's RSS split before
and after, and after the allocators are emptied.

    python benchmarks/d2h_shmem_probe.py [--gb 6.4] [--out benchmarks/results/d2h_shmem_probe.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def split() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            fields[key] = round(int(line.split()[1]) * 1024 / 1e9, 3)
    return fields


def main() -> int:
    import torch

    from kormedgemma.core.io import stream_safetensors
    from kormedgemma.core.resources import largest_mappings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=6.4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/d2h_shmem_probe.json")
    args = parser.parse_args()
    figures = {"start": split()}
    torch.zeros(1, device="cuda")
    figures["cuda_initialised"] = split()
    layer = 2560 * 10240  # a MedGemma-4B MLP matrix, bf16: 52 MB
    count = int(args.gb * 1e9 / (2 * layer))
    tensors = {f"layer.{i}.weight": torch.full((2560, 10240), float(i), dtype=torch.bfloat16, device="cuda")
               for i in range(count)}
    figures["gpu_tensors_made"] = split()
    with tempfile.TemporaryDirectory() as tmp:
        written = stream_safetensors(Path(tmp) / "probe.safetensors", [(k, (2560, 10240), torch.bfloat16) for k in tensors],
                                     tensors.__getitem__)
        figures["after_stream_safetensors"] = split()
        figures["largest_mappings_after"] = largest_mappings(6)
    del tensors
    gc.collect()
    torch.cuda.empty_cache()
    figures["after_freeing_gpu_tensors"] = split()
    figures["written_gb"] = round(written / 1e9, 3)
    figures["torch"] = torch.__version__
    figures["device"] = torch.cuda.get_device_name(0)
    figures["command"] = "python benchmarks/d2h_shmem_probe.py"
    args.out.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
