"""Phase 4: answer-only loss, the leakage guard, dev early stopping, what the merged model changed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kormedgemma.training.instruct import build_instruct_data, encode_chat, mcqa_messages

# Losses are recorded rounded to 5 decimals, so two runs within 1e-6 of each other can read 1e-5 apart
# (6.665455 and 6.665454 round to 6.66546 and 6.66545): runs that must agree are compared within two
# rounding units.
ROUNDED = 2e-5

ROW = {"question": "지역사회 획득 폐렴의 가장 흔한 원인균은?", "A": "황색포도알균", "B": "폐렴사슬알균", "C": "대장균",
       "D": "녹농균", "E": "결핵균", "answer": 2, "cot": "폐렴사슬알균이 가장 흔하다.", "subject": "doctor"}


@pytest.fixture(scope="module")
def tokenizer(tiny_phase3):
    from transformers import AutoTokenizer

    from kormedgemma.core.artifacts import artifact_path

    config, _ = tiny_phase3
    return AutoTokenizer.from_pretrained(artifact_path(config, "merged_model"))


def test_messages_put_the_explanation_before_the_answer():
    user, model = mcqa_messages(ROW)
    assert user["content"].endswith("E. 결핵균\n정답：") and model["content"] == "폐렴사슬알균이 가장 흔하다.\n정답: B"
    assert mcqa_messages(ROW, use_cot=False)[1]["content"] == "정답: B"


def test_prompt_tokens_carry_label_minus_100_and_the_answer_is_trained(tokenizer):
    messages = mcqa_messages(ROW, use_cot=False)
    ids, labels = encode_chat(tokenizer, messages)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[:len(prompt_ids)] == prompt_ids
    assert labels[:len(prompt_ids)] == [-100] * len(prompt_ids)
    trained = [t for t, label in zip(ids, labels) if label != -100]
    assert trained == ids[len(prompt_ids):] == labels[len(prompt_ids):]
    assert tokenizer.decode(trained) == "정답: B<end_of_turn>\n"
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_a_test_question_planted_in_train_is_refused(tiny_phase3, tokenizer, tmp_path: Path):
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.config import apply_overrides

    config, _ = tiny_phase3
    source = artifact_path(config, "kormedmcqa")
    copy = apply_overrides(config, {"paths.root": str(tmp_path)})
    target = artifact_path(copy, "kormedmcqa")
    shutil.copytree(source, target)
    test_row = json.loads((target / "nurse" / "test.jsonl").read_text(encoding="utf-8").splitlines()[1])
    with open(target / "doctor" / "train.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(dict(test_row, subject="doctor"), ensure_ascii=False) + "\n")
    data = build_instruct_data(copy, tokenizer)
    assert [r["source"] for r in data.refused] == ["kormedmcqa/doctor/train"]
    assert data.refused[0]["row"] == 8 and data.refused[0]["text"].startswith(test_row["question"][:40])
    assert data.counts["kormedmcqa/doctor/train"] == 7 and len(data.train) == 28
    assert len(data.dev) == 8  # dev rows are measured, never trained
    dev_ids = {tuple(ids) for ids, _ in data.dev}
    assert not dev_ids & {tuple(ids) for ids, _ in data.train}


def test_instruction_tuning_lowers_the_dev_loss_and_keeps_the_best_step(tiny_phase4):
    _, out, metrics = tiny_phase4
    assert metrics["examples"] == 28 and metrics["dev_examples"] == 8 and metrics["refused_leakage"] == []
    first_dev = metrics["evals"][0]["dev_loss"]
    assert metrics["best_dev_loss"] < first_dev - 1.0
    assert metrics["best_dev_loss"] == min(e["dev_loss"] for e in metrics["evals"])
    assert metrics["best_step"] == next(e["step"] for e in metrics["evals"] if e["dev_loss"] == metrics["best_dev_loss"])
    assert metrics["last_loss"] < metrics["first_loss"]
    assert (out / "loss.png").is_file() and (out / "tokenizer.model").is_file()
    # the dev evaluations' time is counted apart from the steps'
    assert metrics["eval_seconds"] > 0 and metrics["checkpoint_seconds"] >= 0 and metrics["train_seconds"] > 0


def test_merged_instruct_model_changed_only_the_lora_layers(tiny_phase4):
    from safetensors.torch import load_file

    from kormedgemma.core.artifacts import artifact_path

    config, out, _ = tiny_phase4
    before = load_file(artifact_path(config, "merged_model") / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = tuple(f"{m}.weight" for m in config.instruct.lora.target_modules)
    assert changed and all(k.endswith(targets) and "language_model" in k for k in changed)
    assert not any("vision" in k or "embed" in k or "lm_head" in k for k in changed)


def test_when_dev_loss_only_rises_the_untrained_model_is_kept(tiny_phase3, tmp_path: Path, monkeypatch):
    """Deterministic by construction: every evaluation after step 0 reports the real dev loss plus
    1000 per evaluation, so it rises whatever the update did (a real loss lies in [0, ~60] here). The
    training, early stopping and the restore of the step-0 adapter are the real ones."""
    from safetensors.torch import load_file

    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.config import apply_overrides
    from kormedgemma.training import instruct
    from kormedgemma.training.instruct import read_instruct_metrics, train_instruct

    real_mean_loss, calls = instruct.mean_loss, []

    def rising(module, batches, accelerator):
        figure = real_mean_loss(module, batches, accelerator)
        calls.append(figure)
        return figure + 1000.0 * (len(calls) - 1)

    monkeypatch.setattr(instruct, "mean_loss", rising)  # the dev loss the instruction recipe reads
    config, _ = tiny_phase3
    wild = apply_overrides(config, {"paths.root": str(tmp_path), "instruct.learning_rate": 1e-2,
                                    "instruct.warmup_ratio": 0.0, "instruct.eval_every": 2,
                                    "instruct.early_stopping_patience": 2})
    for key in ("merged_model", "kormedmcqa"):  # its own root: the session's phase-4 artifact stays as it is
        shutil.copytree(artifact_path(config, key), artifact_path(wild, key))
    out = train_instruct(wild, progress_bar=False)
    metrics = read_instruct_metrics(wild)
    assert len(calls) == 3 and [e["step"] for e in metrics["evals"]] == [0, 2, 4]
    assert metrics["stopped_early"] and metrics["steps"] == 4 < metrics["planned_steps"]
    assert metrics["best_step"] == 0 and metrics["best_dev_loss"] == pytest.approx(calls[0], abs=1e-6)
    assert all(h["grad_norm"] and h["grad_norm"] > 0 for h in metrics["history"])  # real updates were made
    before = load_file(artifact_path(config, "merged_model") / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # launches its own training processes: `make test-slow`
def test_instruction_tuning_killed_mid_run_resumes_to_the_uninterrupted_result(tiny_phase4, tmp_path: Path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.config import apply_overrides, repo_root
    from kormedgemma.training.instruct import checkpoint_root, read_instruct_metrics, train_instruct
    from kormedgemma.training.loop import CRASH_ENV

    config, out, uninterrupted = tiny_phase4
    private = apply_overrides(config, {"paths.root": str(tmp_path)})
    for key in ("merged_model", "kormedmcqa"):
        shutil.copytree(artifact_path(config, key), artifact_path(private, key))
    crashed = subprocess.run([sys.executable, "-m", "kormedgemma", "train-instruct", "--set", f"paths.root={tmp_path}"],
                             cwd=repo_root(), env={**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: "10"},
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    checkpoints = checkpoint_root(private)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000007"]
    assert not (artifact_path(private, "instruct_model") / "manifest.json").exists()
    train_instruct(private, progress_bar=False)
    resumed = read_instruct_metrics(private)
    assert resumed["resumed_from"] == "step-000007" and uninterrupted["resumed_from"] is None
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in uninterrupted["history"]],
                                                                    abs=ROUNDED)
    assert [e["step"] for e in resumed["evals"]] == [e["step"] for e in uninterrupted["evals"]]
    assert [e["dev_loss"] for e in resumed["evals"]] == pytest.approx([e["dev_loss"] for e in uninterrupted["evals"]],
                                                                      abs=ROUNDED)
    assert (resumed["best_step"], resumed["steps"]) == (uninterrupted["best_step"], uninterrupted["steps"])
    a, b = load_file(artifact_path(private, "instruct_model") / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert not checkpoints.exists()  # spent once the model is written


@pytest.mark.slow  # launches its own training processes: `make test-slow`
def test_two_processes_equal_one_process_accumulating_their_micro_batches(tiny_phase3, tmp_path: Path):
    """torchrun (gloo DDP): each step's answer tokens weigh the same whichever process holds them."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.config import apply_overrides, repo_root
    from kormedgemma.training.instruct import read_instruct_metrics, train_instruct

    config, _ = tiny_phase3
    steps = {"instruct.max_steps": 4, "instruct.eval_every": 2, "instruct.micro_batch_size": 2}
    runs = {}
    for name, accum in (("ddp", 1), ("single", 2)):
        runs[name] = apply_overrides(config, {"paths.root": str(tmp_path / name), **steps, "instruct.grad_accum": accum})
        for key in ("merged_model", "kormedmcqa"):
            shutil.copytree(artifact_path(config, key), artifact_path(runs[name], key))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kormedgemma",
               "train-instruct", "--set", f"paths.root={tmp_path / 'ddp'}", "--set", "instruct.grad_accum=1",
               *[f"--set={k}={v}" for k, v in steps.items()]]
    ddp = subprocess.run(command, cwd=repo_root(), env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train_instruct(runs["single"], progress_bar=False)
    got, expected = read_instruct_metrics(runs["ddp"]), read_instruct_metrics(runs["single"])
    assert got["processes"] == 2 and expected["processes"] == 1 and got["steps"] == expected["steps"] == 4
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in expected["history"]], abs=ROUNDED)
    assert [h["answer_tokens"] for h in got["history"]] == [h["answer_tokens"] for h in expected["history"]]
    assert [e["dev_loss"] for e in got["evals"]] == pytest.approx([e["dev_loss"] for e in expected["evals"]], abs=ROUNDED)
    a = load_file(artifact_path(runs["ddp"], "instruct_model") / "model.safetensors")
    b = load_file(artifact_path(runs["single"], "instruct_model") / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_shown_labels_bracket_exactly_the_answer(tokenizer):
    import re

    from kormedgemma.training.instruct import show_labels

    ids, labels = encode_chat(tokenizer, mcqa_messages(ROW, use_cot=False))
    shown = show_labels(tokenizer, ids, labels)
    trained = [t for t, label in zip(ids, labels) if label != -100]
    assert re.findall(r"\[(.*?)\]", shown, flags=re.S) == [tokenizer.decode([t]) for t in trained]
    assert shown.startswith(tokenizer.decode(ids[:3]))
