"""Phase 3 end to end on tiny: stage folders, exact resume after a kill, two processes, chain."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from kormedgemma.core.artifacts import artifact_path
from kormedgemma.core.config import load_config, repo_root
from kormedgemma.core.io import MissingArtifactError
from kormedgemma.data.batching import BlockOrder
from kormedgemma.training.loop import CRASH_ENV
from kormedgemma.training.stage import TRAINED_FILE, apply_trained, checkpoint_root, load_stage_model, new_token_rows, train_stage

# Losses are recorded rounded to 5 decimals, so two runs within 1e-6 of each other can read 1e-5 apart
# (6.665455 and 6.665454 round to 6.66546 and 6.66545): runs that must agree are compared within two
# rounding units.
ROUNDED = 2e-5

EMBED, HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _rows(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    return set(torch.nonzero((before != after).any(dim=1)).flatten().tolist())


@pytest.fixture(scope="module")
def chain(tiny_phase3):
    """Weights after each stage 0..7, rebuilt from the stage folders."""
    config, _ = tiny_phase3
    return {k: _weights(load_stage_model(config, k)[0]) for k in range(8)}


# stage → (input rows, output rows, LoRA layers move)
TABLE = {1: ("new", None, False), 2: (None, "new", False), 3: ("new", "new", False), 4: (None, "all", False),
         5: ("new", "all", False), 6: ("all", "all", True), 7: (None, None, True)}


@pytest.mark.parametrize("number", range(1, 8))
def test_stage_folder_changes_exactly_the_tensors_of_its_table_row(tiny_phase3, chain, number):
    config, _ = tiny_phase3
    first, count = new_token_rows(config)
    new = set(range(first, first + count))
    before, after = chain[number - 1], chain[number]
    input_rows, output_rows, lora = TABLE[number]
    for name, kind in ((EMBED, input_rows), (HEAD, output_rows)):
        changed = _rows(before[name], after[name])
        if kind is None:
            assert not changed, f"stage {number} moved {len(changed)} rows of {name}"
        elif kind == "new":
            assert changed and changed <= new, f"stage {number}: {name} rows outside the new block moved"
        else:
            assert changed - new, f"stage {number}: no base row of {name} moved"
    for name, value in before.items():
        if name in (EMBED, HEAD):
            continue
        moved = not torch.equal(value, after[name])
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert not moved, f"stage {number} moved {name}"
        elif "language_model.layers" in name and name.endswith(tuple(f"{m}.weight" for m in LORA_TARGETS)):
            assert moved == lora, f"stage {number}: {name} moved={moved}"
        else:
            assert not moved, f"stage {number} moved {name}"


@pytest.mark.parametrize("number", range(1, 8))
def test_stage_folder_is_a_full_model_equal_to_the_rebuilt_chain(tiny_phase3, chain, number):
    config, _ = tiny_phase3
    folder = artifact_path(config, f"stage{number}")
    loaded = _weights(AutoModelForImageTextToText.from_pretrained(folder))
    assert loaded.keys() == chain[number].keys()
    assert all(torch.equal(loaded[k], chain[number][k]) for k in loaded)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == config.staged.__dict__[f"stage{number}"].max_steps
    # the saved curve draws this stage's own losses
    from matplotlib.figure import Figure
    from plotdata import line_data, png_size

    from kormedgemma.training.curves import plot_stage

    ax = Figure().subplots()
    plot_stage(metrics, ax)
    drawn = line_data(ax)
    assert drawn["train"] == [h["loss"] for h in metrics["history"]]
    assert drawn["korean valid"] == [e["korean_valid_loss"] for e in metrics["evals"] if "korean_valid_loss" in e]
    assert min(png_size(folder / "loss.png")) >= 200


def test_merged_model_equals_stage7_with_lora_merged(tiny_phase3, chain):
    config, _ = tiny_phase3
    merged = _weights(AutoModelForImageTextToText.from_pretrained(artifact_path(config, "merged_model")))
    assert all(torch.equal(merged[k], chain[7][k]) for k in merged)
    assert not any("lora" in k for k in merged)


def test_korean_valid_loss_falls_in_every_stage(tiny_phase3):
    _, metrics = tiny_phase3
    for number, m in metrics.items():
        first, last = m["evals"][0]["korean_valid_loss"], m["evals"][-1]["korean_valid_loss"]
        assert last < first, f"stage {number}: Korean valid loss {first} → {last}"
        assert m["tokens"] == m["steps"] * 4 * 128  # tiny: micro-batch 4 × seq 128 × accum 1


def test_stage_evals_give_bits_per_char_of_the_valid_blocks(tiny_phase3):
    """Loss per token × the valid blocks' tokens per character / ln 2, the characters counted from
    the valid texts themselves: the figure the method and the no-expansion baseline compare in."""
    import math

    from transformers import AutoTokenizer

    from kormedgemma.data.readers import read_split
    from kormedgemma.training.stage import stage_config

    config, metrics = tiny_phase3
    tokenizer = AutoTokenizer.from_pretrained(artifact_path(config, "merged_tokenizer"))
    for language in ("korean", "english"):
        spec = stage_config(config, 1)
        texts = read_split(artifact_path(config, language), "valid")
        lengths = [len(tokenizer.encode(t, add_special_tokens=False)) + 2 for t in texts]
        blocks = min(spec.eval_blocks, sum(lengths) // spec.seq_len)
        tokens = blocks * spec.seq_len or sum(lengths)
        predicted = tokens - max(blocks, 1)  # each block's first token is context, not a prediction
        chars, left = 0.0, tokens
        for text, length in zip(texts, lengths):
            chars += len(text) * min(1.0, left / length)
            left -= min(left, length)
        for m in metrics.values():
            assert m["valid_tokens_per_char"][language] == pytest.approx(predicted / chars, abs=1e-5)
            for e in m["evals"]:
                assert e[f"{language}_valid_bits_per_char"] == pytest.approx(
                    e[f"{language}_valid_loss"] * predicted / chars / math.log(2), abs=1e-4)


def test_stage1_leaves_english_valid_loss_untouched(tiny_phase3):
    """English text uses no new token, and stage 1 moves only new input rows."""
    _, metrics = tiny_phase3
    evals = metrics[1]["evals"]
    assert evals[0]["english_valid_loss"] == evals[-1]["english_valid_loss"]


def test_stage6_on_cpu_says_it_runs_plain_lora(tiny_phase3):
    _, metrics = tiny_phase3
    notices = " ".join(metrics[6]["notices"])
    assert "plain LoRA" in notices and "torch-optimi AdamW (Kahan-compensated)" in notices


def _copy_root(source: Path, target: Path, stages: range) -> None:
    """A private project root holding phase 0-2 outputs and the given stage folders."""
    for relative in ["data/processed", "data/tokens", "models/initialized", "models/base",
                     *(f"models/staged_training/stage{k}" for k in stages)]:
        if (source / relative).exists():
            shutil.copytree(source / relative, target / relative)


def _train_stage_process(root: Path, stage: int, env_extra: dict[str, str], *launcher: str,
                         overrides: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    command = [*(launcher or [sys.executable]), "-m", "kormedgemma", "train-stage", "--stage", str(stage),
               "--set", f"paths.root={root}"]
    for item in overrides:
        command += ["--set", item]
    return subprocess.run(command, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # launches its own training processes: `make test-slow`
def test_stage_killed_mid_run_resumes_to_the_uninterrupted_result(tiny_phase3, tmp_path):
    config, _ = tiny_phase3
    root = Path(config.paths.root)
    _copy_root(root, tmp_path, range(1, 6))
    crashed = _train_stage_process(tmp_path, 6, {CRASH_ENV: "17"})
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    private = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    checkpoints = checkpoint_root(private, 6)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000010"]  # step 20 never came
    assert not (artifact_path(private, "stage6") / "manifest.json").exists()
    # a checkpoint of another config is refused rather than mixed into this run
    other = load_config("tiny", overrides={"paths.root": str(tmp_path), "staged.stage6.learning_rate": 1e-4})
    with pytest.raises(ValueError, match="delete"):
        train_stage(other, 6, progress_bar=False)
    # a checkpoint whose tensor names drifted would load nothing under strict=False: refused
    saved_file = checkpoints / "step-000010" / "model.safetensors"
    original = saved_file.read_bytes()
    tensors = load_file(saved_file)
    renamed = next(iter(tensors))
    save_file({("drifted." + k if k == renamed else k): v for k, v in tensors.items()}, saved_file)
    with pytest.raises(ValueError, match=r"does not hold this run's trainable tensors \(1 missing"):
        train_stage(private, 6, progress_bar=False)
    saved_file.write_bytes(original)
    states = [torch.load(f, weights_only=False) for f in (checkpoints / "step-000010").glob("custom_checkpoint_*.pkl")]
    before = next(state["overhead"] for state in states if "overhead" in state)  # accelerate's copy of Progress
    assert before["setup_seconds"] > 0 and before["eval_seconds"] > 0  # the killed process's, kept by its checkpoint
    resumed = train_stage(private, 6, progress_bar=False)
    assert resumed["resumed_from"] == "step-000010"
    # like train_seconds, the time besides the steps covers both processes
    assert resumed["setup_seconds"] > round(before["setup_seconds"], 2)
    assert resumed["eval_seconds"] > round(before["eval_seconds"], 2)
    uninterrupted = json.loads((artifact_path(config, "stage6") / "metrics.json").read_text())
    # the crashed run's steps ran in a 1-thread subprocess, the uninterrupted run with this process's
    # threads: sums in another order may differ in the last bits, never by 1e-5
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in uninterrupted["history"]],
                                                                    abs=ROUNDED)
    assert [e["step"] for e in resumed["evals"]] == [e["step"] for e in uninterrupted["evals"]]
    for got, expected in zip(resumed["evals"], uninterrupted["evals"]):
        assert got == pytest.approx(expected, abs=ROUNDED)
    for part in (TRAINED_FILE, "adapter/adapter_model.safetensors"):
        a = load_file(artifact_path(private, "stage6") / part)
        b = load_file(artifact_path(config, "stage6") / part)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert not checkpoints.exists()  # spent once the stage is sealed


@pytest.mark.slow  # launches its own training processes: `make test-slow`
def test_two_processes_equal_one_process_accumulating_two_micro_batches(tiny_phase2, tmp_path):
    config, _, _ = tiny_phase2
    root = Path(config.paths.root)
    for name in ("ddp", "single"):
        _copy_root(root, tmp_path / name, range(0))
    steps = ("staged.stage1.max_steps=4", "staged.stage1.save_every=2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    ddp = _train_stage_process(tmp_path / "ddp", 1, {}, *torchrun, overrides=(*steps, "staged.stage1.grad_accum=1"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = load_config("tiny", overrides={"paths.root": str(tmp_path / "single"), "staged.stage1.max_steps": 4,
                                            "staged.stage1.save_every": 2, "staged.stage1.grad_accum": 2})
    expected = train_stage(single, 1, progress_bar=False)
    folder = lambda name: tmp_path / name / "models/staged_training/stage1"  # noqa: E731
    got = json.loads((folder("ddp") / "metrics.json").read_text())
    assert got["processes"] == 2 and expected["processes"] == 1
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in expected["history"]], abs=ROUNDED)
    torch.testing.assert_close(load_file(folder("ddp") / TRAINED_FILE)["input_embeddings"],
                               load_file(folder("single") / TRAINED_FILE)["input_embeddings"], rtol=0, atol=1e-6)


def test_stage_without_its_predecessor_names_the_notebook_to_run(tiny_phase2, tmp_path):
    config, _, _ = tiny_phase2
    _copy_root(Path(config.paths.root), tmp_path, range(0))
    private = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    with pytest.raises(MissingArtifactError, match=r"02_stage2_new_output_embeds\.ipynb"):
        train_stage(private, 3, progress_bar=False)


def test_trained_rows_from_another_model_are_refused(tiny_phase3, tmp_path):
    config, _ = tiny_phase3
    from safetensors.torch import save_file

    save_file({"input_embeddings": torch.zeros(4, 7)}, str(tmp_path / TRAINED_FILE),
              metadata={"input_embeddings.first_row": "0"})
    model, _ = load_stage_model(config, 0)
    with pytest.raises(ValueError, match="another model"):
        apply_trained(model, tmp_path)


def test_block_order_visits_every_block_once_per_pass_and_depends_only_on_the_seed():
    order = BlockOrder(count=10, micro_batch=2, seed=3)
    first_pass = [b for k in range(5) for b in order.blocks(k)]
    assert sorted(first_pass) == list(range(10))
    second_pass = [b for k in range(5, 10) for b in order.blocks(k)]
    assert sorted(second_pass) == list(range(10)) and second_pass != first_pass
    assert BlockOrder(10, 2, 3).blocks(7) == order.blocks(7)  # a fresh process reads the same blocks


def test_deepspeed_zero2_config_leaves_batch_sizes_to_the_stage():
    ds = json.loads((repo_root() / "config/ds_config_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    launch = (repo_root() / "config/accelerate_zero2.yaml").read_text()
    assert "config/ds_config_zero2.json" in launch and "distributed_type: DEEPSPEED" in launch


def test_merge_gap_rebuilds_stage6_as_trained_and_finds_no_gap_without_quantisation(tiny_phase3):
    """On the CPU stage 6 trains plain LoRA, so merged and unmerged must agree; the "as trained"
    model must reproduce the loss stage 6 itself measured at its last step."""
    from kormedgemma.training.stage import qlora_merge_gap, read_metrics

    config, _ = tiny_phase3
    gap = qlora_merge_gap(config, torch.device("cpu"))
    assert gap["quantized"] is False and "no GPU" in gap["notices"][0]
    final = read_metrics(config, 6)["evals"][-1]
    for language in ("korean", "english"):
        figures = gap[language]
        assert figures["tokens"] > 0
        assert figures["as_trained_loss"] == pytest.approx(final[f"{language}_valid_loss"], abs=2e-4)
        assert abs(figures["loss_gap"]) < 1e-4 and figures["kl_per_token"] < 1e-6
        assert figures["top1_agreement"] > 0.999


def test_stage6_adapter_merges_into_the_dequantised_weights_it_was_trained_against(tiny_phase3, tmp_path):
    """A stage-6 folder with dequantised_base.safetensors (written when the base was 4-bit) puts
    those weights under the adapter before merging; a weight of another model is refused."""
    from safetensors.torch import save_file

    from kormedgemma.training.stage import DEQUANTISED_FILE

    config, _ = tiny_phase3
    stage6 = artifact_path(config, "stage6")
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    plain = dict(apply_trained(load_stage_model(config, 5)[0], stage6).named_parameters())
    original = dict(load_stage_model(config, 5)[0].named_parameters())[key].detach()
    folder = tmp_path / "stage6"
    shutil.copytree(stage6, folder)
    save_file({key: original + 0.01}, str(folder / DEQUANTISED_FILE))
    merged = dict(apply_trained(load_stage_model(config, 5)[0], folder).named_parameters())
    torch.testing.assert_close(merged[key], plain[key] + 0.01, rtol=0, atol=1e-6)
    other = "model.language_model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[other], plain[other], rtol=0, atol=0)
    save_file({key: torch.zeros(3, 3)}, str(folder / DEQUANTISED_FILE))
    with pytest.raises(ValueError, match="another model"):
        apply_trained(load_stage_model(config, 5)[0], folder)


def test_merge_gap_puts_the_initialised_weights_under_the_adapter_by_their_saved_names(tiny_phase3, tmp_path):
    """The 'merged into originals' comparison reads each original from the initialised model's files
    (saved as `language_model.model.layers…`, named `model.language_model.layers…` once loaded)."""
    from kormedgemma.core.io import stream_safetensors
    from kormedgemma.training.stage import _swap_base

    config, _ = tiny_phase3
    keys = ["model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.1.mlp.down_proj.weight"]
    original = {k: v.detach().clone() for k, v in load_stage_model(config, 0)[0].named_parameters() if k in keys}
    file = tmp_path / "dequantised.safetensors"
    stream_safetensors(file, [(k, tuple(original[k].shape), original[k].dtype) for k in keys],
                       lambda k: original[k] + 0.01 * (1 + keys.index(k)))
    merged = load_stage_model(config, 6)[0]
    before = {k: v.detach().clone() for k, v in merged.named_parameters()}
    with torch.no_grad():
        _swap_base(merged, file, artifact_path(config, "initialized_model"))
    after = dict(merged.named_parameters())
    for number, key in enumerate(keys, start=1):
        torch.testing.assert_close(after[key].detach(), before[key] - 0.01 * number, rtol=0, atol=1e-6)
    assert all(torch.equal(after[k].detach(), v) for k, v in before.items() if k not in keys)


def test_a_stage_on_torchaos_8bit_optimizer_writes_its_metrics_and_frees_memory_once_its_model_is_gone(
        tiny_phase3, tmp_path, monkeypatch):
    # torchao keeps the learning rate as a tensor: the first a5000 rehearsal lost stage 6 when its
    # history ({"lr": tensor(...)}) would not serialise after training had finished.
    # And the notebook kernel lives on after train_stage: what the stage cached (8.9 GB of pinned
    # host memory after stage 6 in the rehearsal) is only handed back once nothing holds its model.
    import gc
    import weakref

    import kormedgemma.training.loop as loop
    import kormedgemma.training.stage as stage_module

    loaded, alive_when_freed = [], []
    load = stage_module.load_stage_model

    def load_and_watch(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, tokenizer

    def free_and_look():
        gc.collect()
        alive_when_freed.append([ref() is not None for ref in loaded])

    monkeypatch.setattr(stage_module, "load_stage_model", load_and_watch)
    monkeypatch.setattr(loop, "free_memory", free_and_look)
    config, _ = tiny_phase3
    _copy_root(Path(config.paths.root), tmp_path, range(1, 4))
    private = load_config("tiny", overrides={"paths.root": str(tmp_path), "staged.stage4.optimizer": "adamw_8bit_sr",
                                             "staged.stage4.max_steps": 2, "staged.stage4.eval_every": 2})
    metrics = train_stage(private, 4, progress_bar=False)
    assert alive_when_freed == [[False] * len(loaded)] and loaded  # freed once, after the model died
    saved = json.loads((artifact_path(private, "stage4") / "metrics.json").read_text())
    assert [type(h["lr"]) for h in saved["history"]] == [float, float]
    assert saved["history"] == json.loads(json.dumps(metrics["history"]))


def test_a_stage_that_replays_a_small_english_set_too_often_says_so():
    import numpy as np

    from config.training_config import StageConfig
    from kormedgemma.data.batching import PackedBlocks
    from kormedgemma.training.stage import StageData, replay_notice

    korean, english = np.arange(160, dtype=np.uint32), np.arange(8, dtype=np.uint32)
    blocks = PackedBlocks.build(korean, english, seq_len=4, english_fraction=0.25, seed=0)
    data = StageData(blocks, blocks.english_share, {})
    # 53 blocks a pass, 6.5 showings of each English block a pass: 8 steps × 4 blocks = 0.6 passes → 3.9
    short = StageConfig(max_steps=8, micro_batch_size=4, grad_accum=1, seq_len=4)
    assert replay_notice(data, short, 6) is None
    long = StageConfig(max_steps=20, micro_batch_size=4, grad_accum=1, seq_len=4)  # 80 blocks: 1.5 passes → 9.8 showings
    assert replay_notice(data, long, 6) == (
        "stage 6 shows each of its 2 English replay blocks 10 times: held-out English will over-fit and rise (on the "
        "real Gemma 3 270M it passed the base's bits/char after ~7 passes); add English text (data.sources), shorten "
        "the stage (staged.stage6.max_steps) or lower staged.stage6.english_replay_fraction")
    assert replay_notice(data, short, 6, world=2) is not None  # two processes read twice the blocks a step


def test_a_checkpoint_fingerprint_ignores_fields_added_later_at_their_old_value(tmp_path):
    """A stage checkpoint written before `eval_chars` existed must still resume."""
    from dataclasses import replace

    from kormedgemma.core.config import config_to_dict, load_config
    from kormedgemma.training.loop import run_fingerprint
    from kormedgemma.training.stage import _fingerprint

    config = load_config("tiny", overrides={"paths.root": str(tmp_path)})
    source = tmp_path / "input.bin"
    source.write_bytes(b"ids")
    inputs = {"token_store": source}
    older = {k: v for k, v in config_to_dict(config.staged.stage1).items() if k != "eval_chars"}
    assert _fingerprint(config, 1, inputs) == run_fingerprint({"stage": older, "seed": config.staged.seed}, inputs)
    changed = replace(config, staged=replace(config.staged, stage1=replace(config.staged.stage1, eval_chars=1000)))
    assert _fingerprint(changed, 1, inputs) != _fingerprint(config, 1, inputs)


def test_a_stage_accounts_for_its_seconds_outside_the_optimizer_steps(tiny_phase3, tmp_path):
    config, _ = tiny_phase3
    _copy_root(Path(config.paths.root), tmp_path, range(1, 2))
    private = load_config("tiny", overrides={"paths.root": str(tmp_path), "staged.stage2.save_every": 2,
                                             "staged.stage2.eval_every": 2})
    started = time.perf_counter()
    metrics = train_stage(private, 2, progress_bar=False)
    wall = time.perf_counter() - started
    steps = metrics["steps"]
    assert steps > 2 and len(metrics["evals"]) == 1 + steps // 2 + (steps % 2 > 0)  # step 0, every 2nd, the last
    assert metrics["setup_seconds"] > 0 and metrics["eval_seconds"] > 0 and metrics["checkpoint_seconds"] > 0
    parts = metrics["setup_seconds"] + metrics["eval_seconds"] + metrics["checkpoint_seconds"] + metrics["train_seconds"]
    assert parts <= wall + 0.05  # each part measured once, none counted twice
    saved = json.loads((artifact_path(private, "stage2") / "metrics.json").read_text())
    assert saved["checkpoint_seconds"] == metrics["checkpoint_seconds"]
