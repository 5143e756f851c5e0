"""Training processes start CUDA with expandable segments unless the user chose an allocator, and
compile in-process unless the user chose a pool; what a finished step held goes back to the system."""
from __future__ import annotations

import os

import pytest
import torch

from kormedgemma.core.environment import ALLOCATOR_DEFAULT, GPU_CAP_ENV, cap_gpu_memory, environment_report, prefer_expandable_segments


def test_training_sets_expandable_segments_when_unset(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # recorded, so the value set below is undone
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert prefer_expandable_segments() is True
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ALLOCATOR_DEFAULT


def test_a_users_allocator_setting_is_kept(monkeypatch):
    import os

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert prefer_expandable_segments() is False
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_environment_report_shows_the_allocator_setting(monkeypatch):
    from kormedgemma.core.config import load_config

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_DEFAULT)
    rows = {row["check"]: row["value"] for row in environment_report(load_config("tiny"))}
    assert rows["PYTORCH_CUDA_ALLOC_CONF"] == ALLOCATOR_DEFAULT


def test_gpu_memory_cap_sets_the_fraction_of_the_card(monkeypatch):
    """24 GB on an 80 GB card is a fraction of 0.3 of device 1."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 80e9})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, index: calls.append((f, index)))
    monkeypatch.setenv(GPU_CAP_ENV, "24")
    assert cap_gpu_memory("cuda:1") == 24.0
    assert calls == [(pytest.approx(0.3), 1)]
    monkeypatch.setenv(GPU_CAP_ENV, "")
    assert cap_gpu_memory("cuda:1") is None and len(calls) == 1


def test_a_gpu_memory_cap_that_is_not_a_number_is_refused(monkeypatch):
    monkeypatch.setenv(GPU_CAP_ENV, "24GB")
    with pytest.raises(ValueError, match="not a number of GB"):
        cap_gpu_memory()
    monkeypatch.setenv(GPU_CAP_ENV, "0")
    with pytest.raises(ValueError, match="must be > 0"):
        cap_gpu_memory()


def test_expandable_segments_reach_an_already_imported_torch(monkeypatch):
    # torch parses PYTORCH_CUDA_ALLOC_CONF when it is imported: a notebook kernel imports it long
    # before training starts, so the setting has to go through torch's runtime allocator call.
    import os

    calls = []
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert prefer_expandable_segments() is True
    assert calls == [ALLOCATOR_DEFAULT] and os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ALLOCATOR_DEFAULT
    # A user's settings (either variable) were parsed at import and stand: no runtime call.
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:128")
    assert prefer_expandable_segments() is True and calls == [ALLOCATOR_DEFAULT]
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:128")
    assert prefer_expandable_segments() is False and calls == [ALLOCATOR_DEFAULT]
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_training_compiles_in_process_unless_the_user_chose_a_pool(monkeypatch):
    """A compile-worker pool left 8.6 GB of shared memory in stage 6's process (torchao's 8-bit AdamW)."""
    import torch._inductor.config as inductor

    from kormedgemma.core.environment import limit_compile_workers

    # set and restored by hand: monkeypatch's undo deletes the entry from torch's config module,
    # which then fails every later compile ("compile_threads does not exist")
    before = inductor.compile_threads
    try:
        monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
        inductor.compile_threads = 16
        assert limit_compile_workers() == 1 and inductor.compile_threads == 1
        assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "1"  # compile workers of child processes too
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "8")
        inductor.compile_threads = 8
        assert limit_compile_workers() == 8  # the user's setting wins
    finally:
        inductor.compile_threads = before


def test_free_memory_also_hands_back_pinned_host_blocks(monkeypatch):
    # stage 6 left 8.9 GB of pinned host memory cached in the a5000 rehearsal's 3.06 kernel
    import torch

    from kormedgemma.core.environment import free_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("device"))
    monkeypatch.setattr(torch.accelerator, "empty_host_cache", lambda: calls.append("host"), raising=False)
    free_memory()
    assert calls == ["device", "host"]


def _pid_and_square(x: int) -> tuple[int, int]:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return os.getpid(), x * x


def test_in_child_process_returns_from_another_process_and_raises_its_errors_here():
    from kormedgemma.core.environment import in_child_process

    pid, square = in_child_process(_pid_and_square, 7)
    assert square == 49 and pid != os.getpid()
    with pytest.raises(ValueError, match="negative: -2"):
        in_child_process(_pid_and_square, -2)
