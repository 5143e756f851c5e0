"""DeepSpeed ZeRO-2 through `accelerate launch --config_file config/accelerate_zero2.yaml`, the
path a user who outgrows one card takes, run here on the CPU: DeepSpeed's CPU accelerator runs
ZeRO-2 over gloo with the project's own config files. Two processes must train what one process
accumulating two micro-batches trains, and a kill must resume to the uninterrupted result."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kormedgemma.core.config import load_config, repo_root
from kormedgemma.training.loop import CRASH_ENV
from kormedgemma.training.stage import TRAINED_FILE, checkpoint_root, train_stage

# Losses are recorded rounded to 5 decimals, so two runs within 1e-6 of each other can read 1e-5 apart
# (6.665455 and 6.665454 round to 6.66546 and 6.66545): runs that must agree are compared within two
# rounding units.
ROUNDED = 2e-5

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                     reason="deepspeed is not installed (requirements.txt installs "
                                                            "deepspeed==0.19.8)")]

ACCELERATE_ZERO2 = ["-m", "accelerate.commands.launch", "--config_file", "config/accelerate_zero2.yaml",
                    "--num_processes", "2"]


def _root(source: Path, target: Path, stages: range) -> None:
    for relative in ["data/processed", "data/tokens", "models/initialized", "models/base",
                     *(f"models/staged_training/stage{k}" for k in stages)]:
        if (source / relative).exists():
            shutil.copytree(source / relative, target / relative)


def _zero2(root: Path, stage: int, *overrides: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, *ACCELERATE_ZERO2, "-m", "kormedgemma", "train-stage", "--stage", str(stage),
               "--set", f"paths.root={root}"]
    for item in overrides:
        command += ["--set", item]
    return subprocess.run(command, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=900)


def _metrics(root: Path, stage: int) -> dict:
    return json.loads((root / f"models/staged_training/stage{stage}/metrics.json").read_text())


def _tensors(root: Path, stage: int, part: str = TRAINED_FILE) -> dict[str, torch.Tensor]:
    return load_file(root / f"models/staged_training/stage{stage}" / part)


def test_zero2_on_two_processes_accumulating_two_trains_stage1_as_one_process_accumulating_four(tiny_phase2, tmp_path):
    config, _, _ = tiny_phase2
    steps = ("staged.stage1.max_steps=4", "staged.stage1.save_every=2")
    _root(Path(config.paths.root), tmp_path / "zero2", range(0))
    _root(Path(config.paths.root), tmp_path / "single", range(0))
    ran = _zero2(tmp_path / "zero2", 1, *steps, "staged.stage1.grad_accum=2")
    assert ran.returncode == 0, ran.stderr[-3000:]
    single = load_config("tiny", overrides={"paths.root": str(tmp_path / "single"), "staged.stage1.max_steps": 4,
                                            "staged.stage1.save_every": 2, "staged.stage1.grad_accum": 4})
    expected = train_stage(single, 1, progress_bar=False)
    got = _metrics(tmp_path / "zero2", 1)
    # DeepSpeed really ran (accelerate without a CUDA device would otherwise fall back to DDP)
    assert got["distributed"] == "deepspeed-zero2" and got["processes"] == 2
    assert expected["distributed"] == "single"
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in expected["history"]], abs=ROUNDED)
    assert [h["grad_norm"] for h in got["history"]] == pytest.approx([h["grad_norm"] for h in expected["history"]],
                                                                     rel=1e-4)
    trained, reference = _tensors(tmp_path / "zero2", 1), _tensors(tmp_path / "single", 1)
    assert trained["input_embeddings"].dtype == torch.float32  # the tiny model's dtype, not DeepSpeed's bf16
    # ZeRO-2 sums gradients in another order than one process does. Adam's step m/√v is of order 1
    # however small the gradient, so in the few entries whose gradients are near zero that rounding
    # moves the weight by a small fraction of the learning rate (5e-3): 2e-5 to 6e-5 here, depending on
    # the init. What would betray a real difference is many entries moving, so that count is held tight.
    difference = (trained["input_embeddings"] - reference["input_embeddings"]).abs()
    assert float(difference.max()) < 2e-4 and int((difference > 1e-6).sum()) <= difference.numel() // 10_000


def test_zero2_trains_stage6_lora_and_embeddings_as_one_process(tiny_phase3, tmp_path):
    config, _ = tiny_phase3
    steps = ("staged.stage6.max_steps=2", "staged.stage6.save_every=2")
    for name in ("zero2", "single"):
        _root(Path(config.paths.root), tmp_path / name, range(1, 6))
    ran = _zero2(tmp_path / "zero2", 6, *steps, "staged.stage6.grad_accum=1")
    assert ran.returncode == 0, ran.stderr[-3000:]
    single = load_config("tiny", overrides={"paths.root": str(tmp_path / "single"), "staged.stage6.max_steps": 2,
                                            "staged.stage6.grad_accum": 2})
    expected = train_stage(single, 6, progress_bar=False)
    got = _metrics(tmp_path / "zero2", 6)
    assert got["distributed"] == "deepspeed-zero2"
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in expected["history"]], abs=ROUNDED)
    assert got["evals"][-1] == pytest.approx(expected["evals"][-1], abs=ROUNDED)
    for part in (TRAINED_FILE, "adapter/adapter_model.safetensors"):
        trained, reference = _tensors(tmp_path / "zero2", 6, part), _tensors(tmp_path / "single", 6, part)
        assert trained.keys() == reference.keys() and trained
        for key in trained:
            torch.testing.assert_close(trained[key], reference[key], rtol=0, atol=1e-5)


def test_zero2_run_killed_mid_stage_resumes_to_the_uninterrupted_result(tiny_phase2, tmp_path):
    config, _, _ = tiny_phase2
    steps = ("staged.stage1.max_steps=4", "staged.stage1.save_every=2", "staged.stage1.grad_accum=1")
    for name in ("whole", "killed"):
        _root(Path(config.paths.root), tmp_path / name, range(0))
    whole = _zero2(tmp_path / "whole", 1, *steps)
    assert whole.returncode == 0, whole.stderr[-3000:]
    crashed = _zero2(tmp_path / "killed", 1, *steps, env_extra={CRASH_ENV: "3"})
    assert crashed.returncode != 0
    private = load_config("tiny", overrides={"paths.root": str(tmp_path / "killed")})
    checkpoints = checkpoint_root(private, 1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]
    # DeepSpeed's checkpoint holds the trainable tensors only, not the frozen model
    states = torch.load(checkpoints / "step-000002/pytorch_model/mp_rank_00_model_states.pt", weights_only=False)
    assert {k: tuple(v.shape) for k, v in states["module"].items()} == {
        "model.model.language_model.embed_tokens.delta": tuple(_tensors(tmp_path / "whole", 1)["input_embeddings"].shape)}
    # another launch cannot take the checkpoint over: its data order and optimizer partitions differ
    with pytest.raises(ValueError, match=r"written by a deepspeed-zero2 x 2 run and this is a single x 1 run"):
        train_stage(load_config("tiny", overrides={"paths.root": str(tmp_path / "killed"), "staged.stage1.max_steps": 4,
                                                   "staged.stage1.save_every": 2, "staged.stage1.grad_accum": 1}),
                    1, progress_bar=False)
    # a checkpoint whose tensor names drifted is refused, not loaded non-strictly into nothing
    states_file = checkpoints / "step-000002/pytorch_model/mp_rank_00_model_states.pt"
    original = states_file.read_bytes()
    states["module"] = {"drifted." + k: v for k, v in states["module"].items()}
    torch.save(states, states_file)
    drifted = _zero2(tmp_path / "killed", 1, *steps)
    assert drifted.returncode != 0 and "does not hold this run's trainable tensors" in drifted.stdout + drifted.stderr
    states_file.write_bytes(original)
    resumed = _zero2(tmp_path / "killed", 1, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed stage 1 from step-000002" in resumed.stdout + resumed.stderr
    got, expected = _metrics(tmp_path / "killed", 1), _metrics(tmp_path / "whole", 1)
    assert got["resumed_from"] == "step-000002"
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in expected["history"]]
    assert got["evals"] == expected["evals"]
    torch.testing.assert_close(_tensors(tmp_path / "killed", 1)["input_embeddings"],
                               _tensors(tmp_path / "whole", 1)["input_embeddings"], rtol=0, atol=0)
    assert not checkpoints.exists()
