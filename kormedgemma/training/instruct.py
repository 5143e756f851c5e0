"""Phase 4: instruction tuning on KorMedMCQA's train split, in the Gemma 3 chat template.

Each question becomes one user turn (the harness prompt, so chat-mode evaluation asks exactly
what training taught) and one model turn: the `cot` explanation when the row has one, then
``정답: X`` — the form the KorMedMCQA paper's answer extraction reads first. Loss falls on the
model turn only (prompt tokens carry label -100): the model should learn to answer, not to
reproduce exam questions.

Training runs on phase 3's loop (`training.loop`): answer tokens weighted equally across
gradient accumulation and processes, resume after a kill, several GPUs under `torchrun`.

Two guards keep the evaluation honest. A training example whose text shares a 25-character
n-gram with any dev, test or fewshot question (the phase-0 leakage rule) is refused and listed;
the dev split is only ever measured, for early stopping, never trained on.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from config.training_config import InstructConfig
from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.config import ProjectConfig, config_to_dict, resolve_input, resolve_path
from kormedgemma.core.hub import hub_access, is_hub_id
from kormedgemma.core.io import read_jsonl
from kormedgemma.core.manifest import write_artifact
from kormedgemma.core.plots import new_figure, saved
from kormedgemma.data.batching import BlockOrder, collate
from kormedgemma.data.kormedmcqa import doc_to_text, letter
from kormedgemma.data.leakage import LeakageIndex, heldout_questions
from kormedgemma.data.text import normalize_text
from kormedgemma.modeling.base_model import SHARD_SIZE, load_for_eval, save_tokenizer
from kormedgemma.modeling.loss import IGNORE, CausalLMLoss
from kormedgemma.training.loop import (
    Progress,
    Recipe,
    distributed_kind,
    make_optimizer,
    mean_loss,
    open_accelerator,
    peak_memory_gb,
    prepare_run,
    read_extra,
    releases_memory,
    run_fingerprint,
    seal,
    train_loop,
)
from kormedgemma.training.results import InstructMetrics
from kormedgemma.training.stages import with_lora

METRICS_FILE = "metrics.json"
CHECKPOINTS = "models/final/checkpoints/instruct"


# --------------------------------------------------------------------------- examples
def mcqa_messages(row: dict[str, Any], use_cot: bool = True) -> list[dict[str, str]]:
    answer = f"정답: {letter(row['answer'])}"
    if use_cot and row.get("cot"):
        answer = f"{row['cot'].strip()}\n{answer}"
    return [{"role": "user", "content": doc_to_text(row)}, {"role": "assistant", "content": answer}]


def instruction_messages(row: dict[str, Any]) -> Optional[list[dict[str, str]]]:
    """Chat turns of one extra-data row (`messages`, `prompt`/`response`, or alpaca-style), or None."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        turns = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in row["messages"]
                 if isinstance(m, dict)]
        turns = [{**t, "role": "assistant" if t["role"] in ("model", "gpt") else "user" if t["role"] == "human"
                  else t["role"]} for t in turns]
        return turns if turns and turns[-1]["role"] == "assistant" else None
    prompt = row.get("prompt") or row.get("instruction") or row.get("question")
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}" if prompt else row["input"]
    response = row.get("response") or row.get("output") or row.get("answer")
    if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip():
        return [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": response.strip()}]
    return None


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels are -100 everywhere but the last model turn.

    The prompt and the answer are tokenized apart, so the boundary never falls inside a token.
    """
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation without its own generation prompt as a "
                         "prefix; loss masking cannot find the answer (is this a Gemma 3 tokenizer?)")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def show_labels(tokenizer: Any, ids: Sequence[int], labels: Sequence[int]) -> str:
    """The example as text, trained tokens in [brackets]: what the notebook shows to prove the mask."""
    return "".join(f"[{tokenizer.decode([t])}]" if label != IGNORE else tokenizer.decode([t])
                   for t, label in zip(ids, labels))


@dataclass
class InstructData:
    train: list[tuple[list[int], list[int]]]
    dev: list[tuple[list[int], list[int]]]
    counts: dict[str, int] = field(default_factory=dict)
    refused: list[dict[str, Any]] = field(default_factory=list)  # leakage
    too_long: int = 0


def heldout_index(mcqa_root: Path, spec: Any) -> Any:
    """Every dev/test/fewshot question as a leakage index (phase 0's rule and settings)."""

    return LeakageIndex(heldout_questions(mcqa_root), ngram_chars=spec.leakage_ngram_chars,
                        min_share=spec.leakage_min_share, min_span_chars=spec.leakage_min_span_chars)


def leaks(index: Any, messages: Sequence[dict[str, str]]) -> bool:

    return index.overlaps(normalize_text("\n".join(m["content"] for m in messages)))


def build_instruct_data(config: ProjectConfig, tokenizer: Any) -> InstructData:
    """Encoded train and dev examples; leaking and over-long examples are counted, never trained."""

    spec = config.instruct
    mcqa = require(config, "kormedmcqa")
    index = heldout_index(mcqa, config.data.preprocess)
    data = InstructData(train=[], dev=[])
    sources: list[tuple[str, Iterable[tuple[int, list[dict[str, str]]]]]] = []
    for subset in config.data.kormedmcqa.subsets:
        file = mcqa / subset / "train.jsonl"
        sources.append((f"kormedmcqa/{subset}/train",
                        ((n, mcqa_messages(row, spec.use_cot)) for n, row in enumerate(read_jsonl(file), 1))))
    for ref in spec.extra_datasets:
        sources.append((ref, _extra_rows(config, ref)))
    for name, rows in sources:
        kept = 0
        for number, messages in rows:
            if leaks(index, messages):
                data.refused.append({"source": name, "row": number, "text": messages[0]["content"][:80]})
                continue
            example = encode_chat(tokenizer, messages)
            if len(example[0]) > spec.seq_len:
                data.too_long += 1
                continue
            data.train.append(example)
            kept += 1
        data.counts[name] = kept
    for subset in config.data.kormedmcqa.subsets:
        for row in read_jsonl(mcqa / subset / "dev.jsonl"):
            example = encode_chat(tokenizer, mcqa_messages(row, spec.use_cot))
            if len(example[0]) <= spec.seq_len:
                data.dev.append(example)
    if not data.train:
        raise ValueError(f"no instruction example left to train on ({len(data.refused)} refused as leakage, "
                         f"{data.too_long} longer than instruct.seq_len={spec.seq_len})")
    return data


def _extra_rows(config: ProjectConfig, ref: str) -> Iterable[tuple[int, list[dict[str, str]]]]:
    """Rows of one extra instruction dataset: a local JSONL file or a Hub dataset's train split."""

    local = resolve_input(config, ref)
    if local.is_file():
        rows: Iterable[dict[str, Any]] = read_jsonl(local)
    elif is_hub_id(ref):
        with hub_access(f"instruction dataset {ref}", "Download it as JSONL and list the file in instruct.extra_datasets."):
            from datasets import load_dataset

            rows = load_dataset(ref, split="train")
    else:
        raise FileNotFoundError(f"instruct.extra_datasets: {ref} is neither a file nor a Hub id")
    unusable = 0
    for number, row in enumerate(rows, start=1):
        messages = instruction_messages(dict(row))
        if messages is None:
            unusable += 1
            continue
        yield number, messages
    if unusable:
        print(f"notice: {ref}: {unusable} rows had no usable prompt/response and were skipped")


# --------------------------------------------------------------------------- training
def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def checkpoint_root(config: ProjectConfig) -> Path:

    return resolve_path(config, CHECKPOINTS)


def _fingerprint(config: ProjectConfig, inputs: dict[str, Path]) -> str:

    return run_fingerprint({"instruct": config_to_dict(config.instruct),
                            "subsets": list(config.data.kormedmcqa.subsets)}, inputs)


def _batches(examples: Sequence[tuple[list[int], list[int]]], size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(examples[start:start + size], pad_id) for start in range(0, len(examples), size)]


class InstructRecipe(Recipe):
    """Instruction tuning in the shared loop: padded chat examples in a fresh permutation each
    epoch, steps weighted by their answer tokens, the dev loss after each evaluation keeping the
    best adapter so far (saved with every checkpoint) and stopping after `early_stopping_patience`
    evaluations without a better one."""

    name = "instruction tuning"

    def __init__(self, spec: InstructConfig, data: InstructData, steps: int, pad: int,
                 dev: list[dict[str, torch.Tensor]]) -> None:
        self.spec, self.data, self.pad, self.dev = spec, data, pad, dev
        self.steps, self.eval_every, self.save_every = steps, spec.eval_every, spec.save_every
        self.keep_checkpoints, self.max_grad_norm = spec.keep_checkpoints, spec.max_grad_norm
        self.order = BlockOrder(len(data.train), spec.micro_batch_size, spec.seed)
        self.best: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] = {}

    def bind(self, model: Any, module: Any, accelerator: Any, progress: Progress, checkpoint: Optional[Path]) -> None:
        """The prepared module, and where the best adapter so far comes from: the checkpoint
        resumed from, or (a fresh start) the untrained adapter, scored on dev at step 0."""
        self.model, self.module, self.accelerator = model, module, accelerator
        if checkpoint is not None:
            self.best_state = read_extra(checkpoint)
        else:
            first = mean_loss(module, self.dev, accelerator)
            progress.evals.append({"step": 0, "dev_loss": first})
            progress.extra = {"best_step": 0, "best_dev_loss": first, "stale": 0, "stopped_early": False}
            self.best_state = _lora_state(model)
        self.best = progress.extra  # checkpointed with the progress

    def micro_batches(self, step: int, accelerator: Any) -> list[dict[str, torch.Tensor]]:
        world, first = accelerator.num_processes, step * self.spec.grad_accum
        return [collate([self.data.train[i] for i in self.order.blocks((first + m) * world + accelerator.process_index)],
                        self.pad) for m in range(self.spec.grad_accum)]

    def step_tokens(self, batches: Sequence[dict[str, torch.Tensor]], accelerator: Any) -> int:
        local = torch.tensor([float(sum(int(b["attention_mask"].sum()) for b in batches))], device=accelerator.device)
        return int(accelerator.reduce(local, reduction="sum")[0])

    def history_fields(self, step_tokens: int, answer_tokens: int) -> dict[str, Any]:
        return {"tokens": step_tokens, "answer_tokens": answer_tokens}

    def evaluate(self, step: int) -> Optional[dict[str, Any]]:
        if not self.dev:
            return None
        figure = mean_loss(self.module, self.dev, self.accelerator)
        if figure < self.best["best_dev_loss"]:
            self.best.update(best_step=step, best_dev_loss=figure, stale=0)
            self.best_state = _lora_state(self.model)
        else:
            self.best["stale"] += 1
            self.best["stopped_early"] = self.best["stale"] >= self.spec.early_stopping_patience
        return {"dev_loss": figure}

    def stopped(self) -> bool:
        return bool(self.best.get("stopped_early"))

    def checkpoint_extra(self) -> Optional[dict[str, torch.Tensor]]:
        return self.best_state

    def out_of_memory(self) -> str:
        spec = self.spec
        return (f"instruction tuning ran out of GPU memory at micro_batch_size={spec.micro_batch_size}, "
                f"seq_len={spec.seq_len}: lower instruct.micro_batch_size (raise grad_accum to keep the batch) or "
                "instruct.seq_len, and keep gradient_checkpointing on.")


@releases_memory
def train_instruct(config: ProjectConfig, progress_bar: bool = True) -> Path:
    """4.01: LoRA on the merged stage-7 model, best dev checkpoint merged into models/final/instruct/.

    The loop is phase 3's (`training.loop.train_loop`): every answer token of an optimizer step
    weighs the same across micro-batches and processes, a kill resumes from the newest checkpoint
    (which also holds the best adapter so far), and `torchrun`/`accelerate launch` spread it over GPUs."""
    spec: InstructConfig = config.instruct
    inputs = {"merged_model": require(config, "merged_model"), "kormedmcqa": require(config, "kormedmcqa")}
    accelerator = open_accelerator(spec.grad_accum, spec.micro_batch_size, spec.max_grad_norm, config.base.torch_dtype)
    device, world = accelerator.device, accelerator.num_processes
    set_seed(spec.seed)
    model, tokenizer = load_for_eval(inputs["merged_model"], device=str(device), dtype=config.base.torch_dtype)
    data = build_instruct_data(config, tokenizer)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = with_lora(model, spec.lora)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    # LoRA weights are fp32 (peft upcasts adapters), so plain AdamW loses nothing to rounding.
    optimizer = make_optimizer("adamw", parameters, spec.learning_rate, spec.weight_decay)
    per_step = spec.micro_batch_size * spec.grad_accum * world
    steps = math.ceil(spec.epochs * len(data.train) / per_step)
    steps = min(steps, spec.max_steps) if spec.max_steps else steps
    scheduler = get_scheduler(spec.lr_scheduler, optimizer, num_warmup_steps=math.ceil(spec.warmup_ratio * steps),
                              num_training_steps=steps)
    folder, fingerprint = checkpoint_root(config), _fingerprint(config, inputs)
    module, optimizer, progress, checkpoint = prepare_run(
        accelerator, CausalLMLoss(model), optimizer, scheduler, folder, fingerprint, spec.resume,
        "instruction tuning", "instruct.resume")
    dev = _batches(data.dev, spec.micro_batch_size, tokenizer.pad_token_id)
    recipe = InstructRecipe(spec, data, steps, tokenizer.pad_token_id, dev)
    recipe.bind(model, module, accelerator, progress, checkpoint)
    train_loop(recipe, accelerator, module, optimizer, scheduler, parameters, progress, folder, fingerprint, progress_bar)
    best, best_state = recipe.best, recipe.best_state
    if not dev:  # nothing to choose by: the last adapter is the one kept
        best.update(best_step=progress.step, best_dev_loss=None)
        best_state = _lora_state(model)
    history, timed = progress.history, [h["seconds"] for h in progress.history[1:]]
    metrics: InstructMetrics = {
        "examples": len(data.train), "examples_per_source": data.counts, "dev_examples": len(data.dev),
        "refused_leakage": data.refused, "too_long": data.too_long, "planned_steps": steps, "steps": progress.step,
        "epochs": round(progress.step * per_step / len(data.train), 3), "stopped_early": best["stopped_early"],
        "best_step": best["best_step"], "best_dev_loss": best["best_dev_loss"],
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "train_seconds": round(progress.train_seconds, 2),
        # dev-set evaluations and checkpoints, every process's (the 270M's 4.01 took 193 s for 113 s of steps)
        **{key: round(progress.overhead.get(key, 0.0), 2) for key in ("eval_seconds", "checkpoint_seconds")},
        "processes": world, "distributed": distributed_kind(accelerator),
        "resumed_from": checkpoint.name if checkpoint else None,
        # tokens (prompt and answer, padding excluded) per second; the first step (warm-up) left out
        "tokens_per_second": round(progress.tokens / progress.step * len(timed) / sum(timed), 1) if timed else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **peak_memory_gb(device),
        "trainable_parameters": sum(p.numel() for p in parameters), "history": history, "evals": progress.evals,
    }
    if accelerator.is_main_process:
        _write_instruct(config, model, best_state, tokenizer, inputs, metrics)
    accelerator.wait_for_everyone()
    seal(accelerator, folder)
    return artifact_path(config, "instruct_model")


def _write_instruct(config: ProjectConfig, model: Any, state: dict[str, torch.Tensor], tokenizer: Any,
                    inputs: dict[str, Path], metrics: InstructMetrics) -> None:

    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, tensor in state.items():
            named[name].copy_(tensor.to(named[name].device))
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.config.get_text_config().use_cache = True
    keys = ["instruct", "data.kormedmcqa.subsets", "data.preprocess.leakage_ngram_chars",
            "data.preprocess.leakage_min_share", "data.preprocess.leakage_min_span_chars"]
    with write_artifact(artifact_path(config, "instruct_model"), "4.01", config, keys, inputs) as out:
        merged.save_pretrained(out.path, max_shard_size=SHARD_SIZE)
        save_tokenizer(tokenizer, out.path)
        (out.path / METRICS_FILE).write_text(json.dumps(metrics, ensure_ascii=False, indent=1), encoding="utf-8")
        save_instruct_plot(metrics, out.path / "loss.png")
        out.metrics.update({k: metrics[k] for k in ("examples", "dev_examples", "steps", "best_step", "best_dev_loss",
                                                    "first_loss", "last_loss", "stopped_early", "too_long")})
        out.metrics["refused_leakage"] = len(metrics["refused_leakage"])


def save_instruct_plot(metrics: InstructMetrics, path: Optional[Path] = None) -> Any:
    """Train loss per step and dev loss per evaluation, the kept (best) step marked."""

    figure = new_figure((6, 3.2))
    ax = figure.subplots()
    ax.plot([h["step"] for h in metrics["history"]], [h["loss"] for h in metrics["history"]], color="0.5", lw=1,
            label="train (answer tokens)")
    points = [(e["step"], e["dev_loss"]) for e in metrics["evals"] if e["dev_loss"] is not None]
    if points:
        ax.plot(*zip(*points), marker="o", ms=3, color="tab:blue", label="dev")
    if metrics.get("best_dev_loss") is not None:
        ax.axvline(metrics["best_step"], ls="--", lw=0.8, color="tab:green", label=f"kept: step {metrics['best_step']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("instruction tuning on KorMedMCQA", fontsize=9)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return saved(figure, path)


def read_instruct_metrics(config: ProjectConfig) -> InstructMetrics:

    return json.loads((require(config, "instruct_model") / METRICS_FILE).read_text(encoding="utf-8"))


def instruct_headline(metrics: InstructMetrics) -> str:
    """4.01's line: examples, early stopping, the step kept."""
    stopped = ", stopped early" if metrics.get("stopped_early") else ""
    return (f"{metrics.get('examples', 0):,} examples ({metrics.get('refused_leakage', 0)} refused as leakage), "
            f"{metrics.get('steps', 0):,} steps{stopped}; kept step {metrics.get('best_step')} (dev loss "
            f"{metrics.get('best_dev_loss')}); train loss {metrics.get('first_loss')} → {metrics.get('last_loss')}")
