"""Shared fixtures: every test writes artifacts under a temporary `paths.root`, never the repo's."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach for the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def root_overrides(tmp_path: Path) -> dict:
    return {"paths.root": str(tmp_path)}


@pytest.fixture(scope="session")
def tiny_phase0(tmp_path_factory: pytest.TempPathFactory):
    """Phase 0 run through the library on the tiny profile, once per session."""
    from kormedgemma.core.config import load_config
    from kormedgemma.data.dictionary import build_dictionary_artifact
    from kormedgemma.data.preprocess import preprocess_all
    from kormedgemma.data.sources import collect_all
    from kormedgemma.modeling.base_model import build_base_artifact

    root = tmp_path_factory.mktemp("phase0")
    config = load_config("tiny", overrides={"paths.root": str(root)})
    build_base_artifact(config)
    collect_all(config)
    build_dictionary_artifact(config)
    figures = preprocess_all(config, progress=False)
    return config, figures


@pytest.fixture(scope="session")
def tiny_phase1(tiny_phase0):
    """Phase 1 through the library, on top of the session's phase 0."""
    from kormedgemma.data.token_store import token_store_artifact
    from kormedgemma.vocab.tokenizer import filter_tokens_artifact, merge_artifact, train_tokenizer_artifact

    config, _ = tiny_phase0
    train_tokenizer_artifact(config)
    filtered = filter_tokens_artifact(config)
    merged = merge_artifact(config)
    token_store_artifact(config, progress=False)
    return config, filtered, merged


@pytest.fixture(scope="session")
def tiny_phase2(tiny_phase1):
    """Phase 2 (hybrid) through the library, on top of the session's phase 1."""
    from kormedgemma.vocab.embeddings import initialize_artifact, resize_artifact

    config, _, _ = tiny_phase1
    resized = resize_artifact(config)
    initialized = initialize_artifact(config)
    return config, resized, initialized


@pytest.fixture(scope="session")
def tiny_phase3(tiny_phase2):
    """Phase 3 (seven stages + merge) through the library, on top of the session's phase 2."""
    from kormedgemma.training.stage import merge_stages, train_stage

    config, _, _ = tiny_phase2
    metrics = {n: train_stage(config, n, progress_bar=False) for n in range(1, 8)}
    merge_stages(config)
    return config, metrics


@pytest.fixture(scope="session")
def tiny_phase4(tiny_phase3):
    """Phase 4 (instruction tuning) through the library, on top of the session's phase 3."""
    from kormedgemma.training.instruct import read_instruct_metrics, train_instruct

    config, _ = tiny_phase3
    out = train_instruct(config, progress_bar=False)
    return config, out, read_instruct_metrics(config)


@pytest.fixture(scope="session")
def tiny_phase6(tiny_phase4):
    """Phase 6.01 (AWQ W4A16 + the source-vs-4-bit report) on top of the session's phase 4."""
    import json

    from kormedgemma.deploy.quantize import quantize_step

    config, _, _ = tiny_phase4
    out = quantize_step(config, progress=False)
    return config, out, json.loads((out / "quantization.json").read_text(encoding="utf-8"))
