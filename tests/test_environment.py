"""Training processes start CUDA with expandable segments unless the user chose an allocator."""
from __future__ import annotations

from kormedgemma.environment import ALLOCATOR_DEFAULT, environment_report, prefer_expandable_segments


def test_training_sets_expandable_segments_when_unset(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert prefer_expandable_segments() is True
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ALLOCATOR_DEFAULT


def test_a_users_allocator_setting_is_kept(monkeypatch):
    import os

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert prefer_expandable_segments() is False
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_environment_report_shows_the_allocator_setting(monkeypatch):
    from kormedgemma.config import load_config

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_DEFAULT)
    rows = {row["check"]: row["value"] for row in environment_report(load_config("tiny"))}
    assert rows["PYTORCH_CUDA_ALLOC_CONF"] == ALLOCATOR_DEFAULT
