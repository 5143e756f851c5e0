"""What the machine offers, checked against what the profile needs, before days of work start."""
from __future__ import annotations

import gc
import os
import platform
import shutil
from typing import Any, Callable, TypeVar

from config.training_config import ProjectConfig
from kormedgemma.core.config import resolve_path
from kormedgemma.core.manifest import library_versions

Result = TypeVar("Result")

# Disk a full real run needs: corpora (~30 GB), tokenizer, 7 stage folders and final models.
A5000_DISK_GB = 150
A5000_VRAM_GB = 22


def free_memory() -> None:
    """Drop a model's last references and hand cached CUDA blocks back before the next one loads,
    pinned host blocks included: torch's host allocator keeps them cached as shared memory the
    kernel cannot reclaim (8.6 GB after stage 6's optimizer step in a probe,
    benchmarks/results/stage6_shmem_probe_h200.json)."""

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) \
            or getattr(torch._C, "_host_emptyCache", None)
        if empty_host_cache is not None:
            empty_host_cache()


def environment_report(config: ProjectConfig) -> list[dict[str, Any]]:
    """Rows of (check, value, status); status is 'ok', 'warn' or 'missing'."""
    rows: list[dict[str, Any]] = []

    def add(check: str, value: Any, status: str = "ok", note: str = "") -> None:
        rows.append({"check": check, "value": value, "status": status, "note": note})

    add("platform", f"{platform.system()} {platform.machine()}")
    add("cpu cores", os.cpu_count())
    memory = _memory_gb()
    if memory is not None:
        add("RAM (GB)", round(memory, 1), "ok" if memory >= 16 else "warn",
            "" if memory >= 16 else "≥ 16 GB recommended for phase 2 at MedGemma-4B shape")
    for name, version in library_versions().items():
        add(name, version)
    for optional in ("bitsandbytes", "deepspeed", "llmcompressor", "vllm"):
        add(optional, _version(optional) or "not installed", "ok" if _version(optional) else "warn",
            "GPU extras: pip install -r requirements-gpu.txt" if not _version(optional) else "")
    needs_gpu = not config.base.build_tiny
    try:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                vram = props.total_memory / 2**30
                ok = vram >= A5000_VRAM_GB or not needs_gpu
                add(f"GPU {index}", f"{props.name}, {vram:.1f} GiB, sm_{props.major}{props.minor}",
                    "ok" if ok else "warn", "" if ok else f"stages are sized for ≥ {A5000_VRAM_GB} GiB")
            add("bf16 supported", torch.cuda.is_bf16_supported())
        else:
            add("GPU", "none (CPU only)", "missing" if needs_gpu else "ok",
                f"profile {config.profile!r} trains on a GPU" if needs_gpu else "tiny profile runs on CPU")
    except ImportError:
        add("torch", "not installed", "missing", "pip install -r requirements.txt")
    root = resolve_path(config, ".")
    free = shutil.disk_usage(root).free / 2**30
    need = A5000_DISK_GB if needs_gpu else 1
    add("free disk at artifact root (GiB)", round(free, 1), "ok" if free >= need else "warn",
        f"{root}; a full {config.profile} run needs about {need} GiB")
    add("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "unset"))
    add("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "unset"))
    add(GPU_CAP_ENV, os.environ.get(GPU_CAP_ENV) or "unset (the whole GPU)")
    return rows


ALLOCATOR_DEFAULT = "expandable_segments:True"


def prefer_expandable_segments() -> bool:
    """Before a training process allocates on CUDA: the caching allocator's expandable segments,
    unless the user set PYTORCH_CUDA_ALLOC_CONF. True when the setting is in force.

    Measured at MedGemma-4B shape under a 24 GB cap (benchmarks/results/stage_steps_gpu_h100.json),
    the default allocator reserves 23.2-23.7 GB to hold stages 4-5's 20.5-21.3 GB: a fragmentation
    margin that leaves no headroom on a 24 GB card. Expandable segments reserve 1-1.5 GB less at
    the same speed.

    torch reads PYTORCH_CUDA_ALLOC_CONF once, when it is imported, so setting the variable here
    only reaches child processes; this process is switched through torch's runtime allocator
    setting. The a5000 rehearsal found the difference: in the notebooks' kernels (torch imported
    long before training starts) stages 4-5 reserved 23.8 / 23.3 GB, and stage 6 at micro-batch 4
    ran out of memory with 6.4 GiB reserved but unallocated. Not set at import: the serving
    process (vLLM) keeps its own allocator."""
    import torch

    users = " ".join(os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    if users.strip():
        # The user's own settings win, and torch parsed them at import: nothing to switch.
        return ALLOCATOR_DEFAULT in users
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_DEFAULT  # for child processes
    if not torch.cuda.is_available():
        return True
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) \
        or getattr(torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None)
    if setter is None:
        return False
    setter(ALLOCATOR_DEFAULT)
    return True


# Inductor compiles in a pool of worker processes, one per core up to 32; each imports torch. In the
# a5000 rehearsal (16 cores) the pool held ~7.5 GB beside 3.06's and 3.07's kernels (four: 1.65 GB),
# and with a pool, one step of stage 6's torchao 8-bit AdamW over the two embedding matrices left
# 8.6 GB of shared memory in the training process for good; compiled in-process, 0.01 GB
# (benchmarks/results/stage6_shmem_probe_h200.json). So training compiles in-process: Gemma 3's
# decoder layers are one graph, compiled once and cached, and the optimizer's step once.
COMPILE_WORKERS = 1


def limit_compile_workers(limit: int = COMPILE_WORKERS) -> int:
    """Before `torch.compile` first runs: at most `limit` inductor compile workers (1: compile
    in-process, no pool), unless the user set TORCHINDUCTOR_COMPILE_THREADS. Returns the number in force."""
    import torch._inductor.config as inductor

    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        inductor.compile_threads = max(1, min(inductor.compile_threads, limit))
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(inductor.compile_threads)  # for child processes
    return inductor.compile_threads


GPU_CAP_ENV = "KORMEDGEMMA_GPU_MEMORY_GB"


def cap_gpu_memory(device: Any = None) -> float | None:
    """Hold this process to KORMEDGEMMA_GPU_MEMORY_GB of its GPU; the cap in GB, or None.

    To rehearse a 24 GB RTX A5000 run on a larger card: an allocation past the cap fails with
    out-of-memory exactly where the smaller card would (torch's per-process memory fraction)."""
    import torch

    value = os.environ.get(GPU_CAP_ENV, "").strip()
    if not value:
        return None
    try:
        cap = float(value)
    except ValueError:
        raise ValueError(f"{GPU_CAP_ENV}={value!r} is not a number of GB (e.g. 24)") from None
    if cap <= 0:
        raise ValueError(f"{GPU_CAP_ENV}={value!r} must be > 0 GB")
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index if device is not None and torch.device(device).index is not None \
        else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1e9 / total), index)
    return cap


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def in_child_process(function: Callable[..., Result], *args: Any) -> Result:
    """`function(*args)` in a fresh Python process; its result, or its exception raised here.

    For a library that keeps what it built for the life of its process: llm-compressor's session
    (and the tracing around it) still held the calibrated model after 6.01's `oneshot` returned, so
    at MedGemma-4B shape the notebook kernel carried it through both evaluations that follow. A
    child's memory all goes back when it exits. Spawned, not forked: a fork would copy a CUDA
    context. Its output reaches the same stdout/stderr (a notebook kernel shows it in the cell)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()
