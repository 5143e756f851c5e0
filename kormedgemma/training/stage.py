"""Phase 3: run one EEVE stage end to end — load, train, checkpoint, resume, save.

A stage starts from the model the previous stages left, rebuilt from the initialised model plus
each stage's trained tensors (`trained.safetensors`: rows or whole matrices; `adapter/`: LoRA,
merged). Every stage folder holds those tensors, so on `a5000` it need not hold an 8.6 GB copy
of the model (`staged.save_full_model=false`), and stage 6 can load the initialised model's
transformer in 4-bit directly: stages 1–5 never change it.

The loop, its checkpoints and resume are `training.loop`'s (shared with phase 4): `accelerate`
(one process, DDP, DeepSpeed ZeRO-2), accelerate's `save_state` cut to the trainable tensors, and
micro-batch k of the run a pure function of (k, seed), so a resumed run reads exactly the blocks
an uninterrupted one would have read.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.utils import set_seed
from safetensors import safe_open
from transformers import AutoTokenizer, BitsAndBytesConfig, get_scheduler

from config.training_config import StageConfig
from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.config import ProjectConfig, resolve_path
from kormedgemma.core.environment import free_memory, limit_compile_workers
from kormedgemma.core.io import stream_safetensors
from kormedgemma.core.manifest import select_config, write_artifact
from kormedgemma.data.batching import BlockOrder, PackedBlocks, leading_blocks
from kormedgemma.data.token_store import TokenStore
from kormedgemma.modeling.base_model import SHARD_SIZE, check_tokenizer_matches_model, decoder_layers, model_class, save_tokenizer
from kormedgemma.modeling.loss import CausalLMLoss, bits_per_char, logit_chunks
from kormedgemma.modeling.rows import merge_row_deltas
from kormedgemma.training.curves import save_stage_plot
from kormedgemma.training.loop import (
    Progress,
    Recipe,
    bitsandbytes_ready,
    deepspeed_notice,
    distributed_kind,
    make_optimizer,
    mean_loss,
    open_accelerator,
    peak_memory_gb,
    prepare_run,
    releases_memory,
    run_fingerprint,
    seal,
    train_loop,
)
from kormedgemma.training.results import EvalRecord, StageMetrics
from kormedgemma.training.stages import STAGES, StageSpec, apply_stage, trainable_parameters

TRAINED_FILE = "trained.safetensors"
ADAPTER_DIR = "adapter"
# Stage 6 on a 4-bit base: the weights its adapter was trained against (NF4 dequantised, bf16).
DEQUANTISED_FILE = "dequantised_base.safetensors"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "models/staged_training/checkpoints"


def stage_config(config: ProjectConfig, number: int) -> StageConfig:
    if number not in STAGES:
        raise ValueError(f"stage {number} does not exist: EEVE has stages 1–7")
    return getattr(config.staged, f"stage{number}")


def new_token_rows(config: ProjectConfig) -> tuple[int, int]:
    """(first id, count) of the new tokens, from phase 2's report."""

    report = json.loads((require(config, "initialized_model") / "init_report.json").read_text(encoding="utf-8"))
    ids = report["new_ids"]
    if not ids and not config.tokenizer.expand:
        return 0, 0  # no new tokens: the stages that train new rows are skipped
    if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError("init_report.json lists no contiguous block of new token ids: re-run phase 2")
    return ids[0], len(ids)


# --------------------------------------------------------------------------- a stage's result
def load_stage_model(config: ProjectConfig, upto: int, *, extra: Optional[Path] = None, quantize_4bit: bool = False,
                     device: Optional[torch.device] = None) -> tuple[Any, Any]:
    """(model, tokenizer) after stage `upto` (0: the initialised model); `extra` is one more stage
    folder to apply (a stage's own output before it is sealed)."""


    folders = [require(config, f"stage{k}") for k in range(1, upto + 1)] + ([Path(extra)] if extra else [])
    initialized = require(config, "initialized_model")
    tokenizer = AutoTokenizer.from_pretrained(initialized)
    dtype = getattr(torch, config.base.torch_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize_4bit:
        kwargs.update(quantization_config=_bnb_config(dtype), device_map={"": device or torch.device("cuda", 0)})
    elif device is not None:
        # straight onto the device, tensor by tensor: loading on the CPU first and moving would hold
        # the whole model (10 GB at MedGemma-4B shape) in the workstation's RAM
        kwargs.update(device_map={"": device})
    model = model_class(initialized).from_pretrained(initialized, **kwargs)
    for folder in folders:
        model = apply_trained(model, folder)
    check_tokenizer_matches_model(tokenizer, model)
    return model, tokenizer


def apply_trained(model: Any, folder: Path, merge_adapter: bool = True) -> Any:
    """Write a stage's trained rows into `model` and merge its LoRA adapter, if any (with
    `merge_adapter=False` the adapter stays a separate module, as it was during training)."""

    file = Path(folder) / TRAINED_FILE
    if file.is_file():
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
            for key in handle.keys():
                module = model.get_input_embeddings() if key == "input_embeddings" else model.get_output_embeddings()
                rows, first = handle.get_tensor(key), int(meta[f"{key}.first_row"])
                weight = module.weight
                if first + rows.shape[0] > weight.shape[0] or rows.shape[1] != weight.shape[1]:
                    raise ValueError(f"{file}: {key} rows [{first}, {first + rows.shape[0]}) × {rows.shape[1]} do not "
                                     f"fit a {tuple(weight.shape)} matrix: the stage was trained on another model")
                with torch.no_grad():
                    weight[first:first + rows.shape[0]].copy_(rows.to(weight.device, weight.dtype))
    dequantised = Path(folder) / DEQUANTISED_FILE
    if dequantised.is_file() and not getattr(model, "is_loaded_in_4bit", False):
        # the adapter merges into the weights it was trained against, not the unquantised originals
        # (tiny on a GPU: KL 0.022 against 6.7e-5 per token, benchmarks/results/stage6_merge_gap_gpu_h100.json)
        _write_weights(model, dequantised)
    adapter = Path(folder) / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        if not merge_adapter:
            return PeftModel.from_pretrained(model, str(adapter))
        if getattr(model, "is_loaded_in_4bit", False):
            raise ValueError(f"{adapter}: merging LoRA into a 4-bit model loses precision; load it in bf16")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model


def _write_weights(model: Any, file: Path) -> None:
    parameters = dict(model.named_parameters())
    for key in read_tensor_names(file):  # one tensor at a time, the file closed in between (see _swap_base)
        tensor = read_tensor(file, key)
        if key not in parameters or parameters[key].shape != tensor.shape:
            raise ValueError(f"{file}: {key} {tuple(tensor.shape)} is not a weight of this model: the stage was "
                             "trained on another model")
        with torch.no_grad():
            parameters[key].copy_(tensor.to(parameters[key].device, parameters[key].dtype))
        del tensor


def dequantised_layers(model: Any) -> dict[str, Any]:
    """name → 4-bit linear layer (none when the model is not quantised); names are those of the
    plain model's weights the adapter is merged into."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "is_loaded_in_4bit", False):
        return {}
    import bitsandbytes as bnb

    return {name.removesuffix(".base_layer") + ".weight": module for name, module in inner.named_modules()
            if isinstance(module, bnb.nn.Linear4bit)}


def write_dequantised_weights(layers: dict[str, Any], file: Path) -> int:
    """The bf16 weights the forward pass saw, as one safetensors file, one layer at a time (6.4 GB at
    MedGemma-4B shape, never in RAM at once); returns the bytes written."""
    import bitsandbytes as bnb


    def dequantised(key: str) -> torch.Tensor:
        weight = layers[key].weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    specs = [(key, tuple(layer.weight.quant_state.shape), layer.weight.quant_state.dtype) for key, layer in layers.items()]
    return stream_safetensors(file, specs, dequantised)


def trained_tensors(model: Any, spec: StageSpec, first: int, count: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The rows a stage trained, deltas folded in, as (tensors, safetensors metadata); the tensors
    are views of the model's weights, where they live (`stream_safetensors` copies one at a time)."""

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    merge_row_deltas(inner)
    tensors, meta = {}, {"stage": str(spec.number)}
    for key, rows, module in (("input_embeddings", spec.input_rows, inner.get_input_embeddings()),
                              ("output_embeddings", spec.output_rows, inner.get_output_embeddings())):
        if rows is None or (key == "output_embeddings" and "input_embeddings" in tensors
                            and module.weight.data_ptr() == inner.get_input_embeddings().weight.data_ptr()):
            continue  # a tied lm_head is the input matrix, written once
        start, stop = (first, first + count) if rows == "new" else (0, module.weight.shape[0])
        tensors[key] = module.weight.detach()[start:stop]
        meta[f"{key}.first_row"] = str(start)
    return tensors, meta


# --------------------------------------------------------------------------- data
@dataclass
class StageData:
    train: Any  # PackedBlocks: indexed by a list of block numbers, gives [k, seq_len] ids
    english_share: float
    valid: dict[str, torch.Tensor]  # language → [m, ≤seq_len] blocks
    valid_tokens_per_char: dict[str, float] = field(default_factory=dict)  # language → of those blocks


def stage_data(config: ProjectConfig, tokenizer: Any, spec: StageConfig, seed: int) -> StageData:
    """Blocks from the token store (step 1.04): views over memory maps, never the corpus in RAM."""

    store = TokenStore(require(config, "token_store"))
    store.check_tokenizer(tokenizer)
    train = PackedBlocks.build(store.stream("korean", "train"), store.stream("english", "train"), spec.seq_len,
                               spec.english_replay_fraction, seed)
    valid, per_char = {}, {}
    for language in ("korean", "english"):
        count = spec.eval_blocks
        if spec.eval_chars is not None:  # the same text under any tokenizer, to the nearest whole block
            count = max(1, round(store.tokens_for_chars(language, "valid", spec.eval_chars) / spec.seq_len))
        blocks = leading_blocks(store.stream(language, "valid"), spec.seq_len, count)
        if blocks is not None:
            valid[language] = blocks
            chars = store.prefix_chars(language, "valid", blocks.numel())
            if chars:  # the loss is per predicted token: a block's first token is context only
                per_char[language] = (blocks.numel() - blocks.shape[0]) / chars
    return StageData(train, train.english_share, valid, per_char)


# --------------------------------------------------------------------------- hardware choices
def _bnb_config(dtype: torch.dtype) -> Any:

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])


def _optimizer(spec: StageConfig, parameters: list[torch.nn.Parameter], notices: list[str]) -> torch.optim.Optimizer:
    if spec.optimizer in ("adamw_8bit", "paged_adamw_8bit") and bitsandbytes_ready(
            f"optimizer {spec.optimizer}", "torch-optimi AdamW (Kahan-compensated)", notices):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if spec.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    kind = spec.optimizer if spec.optimizer in ("adamw", "adamw_kahan", "adamw_8bit_sr") else "adamw_kahan"
    return make_optimizer(kind, parameters, spec.learning_rate, spec.weight_decay)


# --------------------------------------------------------------------------- checkpoints
def checkpoint_root(config: ProjectConfig, number: int) -> Path:

    return resolve_path(config, f"{CHECKPOINTS}/stage{number}")


def _fingerprint(config: ProjectConfig, number: int, inputs: dict[str, Path]) -> str:
    # select_config leaves out fields added later at their old behaviour's value, so a checkpoint
    # written before such a field existed still resumes
    stage = select_config(config, [f"staged.stage{number}"])[f"staged.stage{number}"]
    return run_fingerprint({"stage": stage, "seed": config.staged.seed}, inputs)


# --------------------------------------------------------------------------- the stage
def stage_inputs(config: ProjectConfig, number: int) -> dict[str, Path]:
    """Artifacts stage `number` reads; a missing one fails naming the notebook that makes it."""

    if number > 1:
        require(config, f"stage{number - 1}")  # the predecessor first: its notebook is the one to name
    inputs = {f"stage{k}": require(config, f"stage{k}") for k in range(1, number)}
    for key in ("initialized_model", "token_store"):
        inputs[key] = require(config, key)
    return inputs


class StageRecipe(Recipe):
    """Stage `number` in the shared loop: packed blocks in a seeded order, the fixed tokens of a
    step, both languages' valid blocks evaluated (loss and bits per character)."""

    show_speed = True

    def __init__(self, number: int, hyper: StageConfig, data: StageData, seed: int) -> None:
        self.number, self.name, self.hyper, self.data = number, f"stage {number}", hyper, data
        self.steps, self.eval_every, self.save_every = hyper.max_steps, hyper.eval_every, hyper.save_every
        self.keep_checkpoints, self.max_grad_norm = hyper.keep_checkpoints, hyper.max_grad_norm
        self.order = BlockOrder(len(data.train), hyper.micro_batch_size, seed)
        self.module: Any = None  # the prepared module and its accelerator, once bound
        self.accelerator: Any = None

    def micro_batches(self, step: int, accelerator: Any) -> list[dict[str, torch.Tensor]]:
        world, first = accelerator.num_processes, step * self.hyper.grad_accum
        return [{"input_ids": self.data.train[self.order.blocks((first + micro) * world + accelerator.process_index)]}
                for micro in range(self.hyper.grad_accum)]

    def step_tokens(self, batches: Any, accelerator: Any) -> int:
        hyper = self.hyper
        return hyper.micro_batch_size * hyper.seq_len * hyper.grad_accum * accelerator.num_processes

    def evaluate(self, step: int) -> Optional[dict[str, Any]]:
        if not self.data.valid:
            return None
        return _evaluate(self.module, self.data, self.accelerator, self.hyper.micro_batch_size)

    def out_of_memory(self) -> str:
        hyper, number = self.hyper, self.number
        return (f"{self.name} ran out of GPU memory at micro_batch_size={hyper.micro_batch_size}, "
                f"seq_len={hyper.seq_len}: lower staged.stage{number}.micro_batch_size (raise grad_accum to keep "
                f"the batch), keep gradient_checkpointing on, or for stage 6 keep load_in_4bit and an 8-bit optimizer.")

    def bind(self, module: Any, accelerator: Any) -> None:
        self.module, self.accelerator = module, accelerator


@releases_memory
def train_stage(config: ProjectConfig, number: int, progress_bar: bool = True) -> StageMetrics:
    """Train stage `number` (resuming from its newest checkpoint) and write its folder: setup
    (model, trainable tensors, data, optimizer, resume), the shared loop, save. Returns its metrics."""
    started = time.perf_counter()
    spec, hyper = STAGES[number], stage_config(config, number)
    inputs = stage_inputs(config, number)
    if skipped_without_expansion(config, spec):
        return _write_skipped_stage(config, number, inputs)
    limit_compile_workers()  # before anything compiles: the layers, torchao's optimizer step
    accelerator = open_accelerator(hyper.grad_accum, hyper.micro_batch_size, hyper.max_grad_norm,
                                   config.base.torch_dtype)
    device = accelerator.device
    notices: list[str] = []
    quantize = hyper.load_in_4bit and bitsandbytes_ready(
        "4-bit QLoRA (load_in_4bit)", "plain LoRA on the unquantised model", notices)
    seed = config.staged.seed * 10 + number
    set_seed(seed)
    first, count = new_token_rows(config)
    model, tokenizer = load_stage_model(config, number - 1, quantize_4bit=quantize, device=device)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    if hyper.gradient_checkpointing and (spec.input_rows is not None or spec.lora):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = apply_stage(model, spec, first, count, hyper.lora)
    if hyper.compile_layers and device.type == "cuda":
        for layer in decoder_layers(trained):
            layer.compile()
    data = stage_data(config, tokenizer, hyper, seed)
    if notice := replay_notice(data, hyper, number, accelerator.num_processes):
        notices.append(notice)
    parameters = [p for p in trained.parameters() if p.requires_grad]
    optimizer = _optimizer(hyper, parameters, notices)
    if notice := deepspeed_notice(accelerator, config.base.torch_dtype):
        notices.append(notice)
    scheduler = get_scheduler(hyper.lr_scheduler, optimizer, num_warmup_steps=math.ceil(hyper.warmup_ratio * hyper.max_steps),
                              num_training_steps=hyper.max_steps)
    folder, fingerprint = checkpoint_root(config, number), _fingerprint(config, number, inputs)
    module, optimizer, progress, checkpoint = prepare_run(
        accelerator, CausalLMLoss(trained), optimizer, scheduler, folder, fingerprint, config.staged.resume,
        f"stage {number}", "staged.resume")
    for notice in notices:
        accelerator.print(f"notice: {notice}")
    recipe = StageRecipe(number, hyper, data, seed)
    recipe.bind(module, accelerator)
    # load, earlier stages, compile wrappers, data, resume: timed from the call (Progress exists only now)
    progress.spent("setup_seconds", time.perf_counter() - started)
    if progress.step == 0:
        with progress.timing("eval_seconds"):
            figures = recipe.evaluate(0)
        if figures is not None:
            progress.evals.append({"step": 0, **figures})
    train_loop(recipe, accelerator, module, optimizer, scheduler, parameters, progress, folder, fingerprint, progress_bar)
    resumed_from = checkpoint.name if checkpoint else None
    metrics = _metrics(config, number, hyper, data, progress, accelerator, device, resumed_from, notices, trained)
    unwrapped = accelerator.unwrap_model(module).model
    _write_stage(config, number, unwrapped, spec, first, count, tokenizer, inputs, metrics, accelerator)
    seal(accelerator, folder)
    return metrics


# Passes over the English replay blocks within one stage beyond which it warns. Measured on the real
# Gemma 3 270M (benchmarks/results/gemma3_270m_gpu_attempt2_h200.json, 326 English blocks replayed at
# 25 %): held-out English bits/char fell from 1.02 to 0.81 in the first ~2 passes, was back at the
# base's after ~7 and reached 1.79 after ~26.
ENGLISH_PASSES_WARNING = 4.0


def replay_notice(data: StageData, hyper: StageConfig, number: int, world: int = 1) -> Optional[str]:
    """A notice when this stage will show each English replay block more than
    ENGLISH_PASSES_WARNING times: the replay set is too small for the stage's length."""
    if not len(data.train) or not data.train.english_repeats:
        return None
    passes = data.train.english_repeats * hyper.max_steps * hyper.micro_batch_size * hyper.grad_accum * world / len(data.train)
    if passes <= ENGLISH_PASSES_WARNING:
        return None
    unique = min(len(data.train.english) // data.train.seq_len, int(data.train.is_english.sum()))
    return (f"stage {number} shows each of its {unique:,} English replay blocks {passes:.0f} times: held-out English "
            f"will over-fit and rise (on the real Gemma 3 270M it passed the base's bits/char after ~7 passes); add "
            f"English text (data.sources), shorten the stage (staged.stage{number}.max_steps) or lower "
            f"staged.stage{number}.english_replay_fraction")


def skipped_without_expansion(config: ProjectConfig, spec: StageSpec) -> bool:
    """Stages 1-5 adapt embedding rows to new tokens (new rows, then the lm_head around them);
    without expansion (`tokenizer.expand: false`) there are none, and the baseline spends that
    GPU time in stage 6 instead."""
    return not config.tokenizer.expand and spec.number <= 5


def _write_skipped_stage(config: ProjectConfig, number: int, inputs: dict[str, Path]) -> StageMetrics:
    """A stage folder that trained nothing, sealed like any other so later stages and resumes read it."""

    note = "skipped: tokenizer.expand is false (no new tokens; plain continued pretraining)"
    metrics: StageMetrics = {"stage": number, "name": STAGES[number].name, "skipped": note, "steps": 0, "tokens": 0,
               "trainable_parameters": 0, "first_loss": None, "last_loss": None, "tokens_per_second": None,
               "train_seconds": 0.0, "resumed_from": None, "processes": 1, "notices": [note], "history": [],
               "evals": []}
    keys = [f"staged.stage{number}", "staged.seed", "tokenizer.expand"]
    with write_artifact(artifact_path(config, f"stage{number}"), f"3.0{number}", config, keys, inputs) as out:
        (out.path / METRICS_FILE).write_text(json.dumps(metrics, ensure_ascii=False, indent=1), encoding="utf-8")
        out.metrics.update({"skipped": note, "steps": 0})
    print(note)
    return metrics


def _evaluate(module: Any, data: StageData, accelerator: Any, batch_size: int) -> EvalRecord:
    """Mean token loss on each language's valid blocks, split across processes, and the same in
    bits per character: a loss per token does not compare across tokenizers (a merged token
    carries more text), so the method and the no-expansion baseline meet only in bits per char."""
    figures: dict[str, Any] = {}
    for language, blocks in data.valid.items():
        loss = mean_loss(module, [{"input_ids": blocks[start:start + batch_size]}
                                  for start in range(0, len(blocks), batch_size)], accelerator)
        figures[f"{language}_valid_loss"] = loss
        if loss is not None and language in data.valid_tokens_per_char:
            # nats per token × tokens per character: the nats spent on one character
            figures[f"{language}_valid_bits_per_char"] = bits_per_char(loss * data.valid_tokens_per_char[language], 1.0)
    return EvalRecord(**figures)


def _metrics(config: ProjectConfig, number: int, hyper: StageConfig, data: StageData, progress: Progress, accelerator: Any,
             device: torch.device, resumed_from: Optional[str], notices: list[str], trained: Any) -> StageMetrics:

    timed = [h["seconds"] for h in progress.history[1:]] or [h["seconds"] for h in progress.history]
    tokens_per_step = progress.tokens // max(progress.step, 1)
    return {
        "stage": number, "name": STAGES[number].name, "steps": progress.step, "tokens": progress.tokens,
        "train_blocks": len(data.train), "english_share": round(data.english_share, 4),
        "valid_tokens_per_char": {k: round(v, 5) for k, v in data.valid_tokens_per_char.items()},
        "epochs": round(progress.step * hyper.micro_batch_size * hyper.grad_accum * accelerator.num_processes / len(data.train), 3),
        "trainable_parameters": sum(trainable_parameters(trained).values()),
        "first_loss": progress.history[0]["loss"] if progress.history else None,
        "last_loss": progress.history[-1]["loss"] if progress.history else None,
        # the first step (compilation, allocator warm-up) is left out of the rate
        "tokens_per_second": round(tokens_per_step * len(timed) / sum(timed), 1) if timed else None,
        "train_seconds": round(progress.train_seconds, 2),
        **{key: round(progress.overhead.get(key, 0.0), 2) for key in ("setup_seconds", "eval_seconds", "checkpoint_seconds")},
        "processes": accelerator.num_processes,
        "distributed": distributed_kind(accelerator),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **peak_memory_gb(device), "resumed_from": resumed_from, "notices": notices,
        "history": progress.history, "evals": progress.evals,
    }


def _write_stage(config: ProjectConfig, number: int, model: Any, spec: StageSpec, first: int, count: int, tokenizer: Any,
                 inputs: dict[str, Path], metrics: StageMetrics, accelerator: Any) -> None:

    tensors, meta = trained_tensors(model, spec, first, count)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    keys = [f"staged.stage{number}", "staged.seed", "staged.save_full_model"]
    with write_artifact(artifact_path(config, f"stage{number}"), f"3.0{number}", config, keys, inputs) as out:
        if tensors:  # one matrix in RAM at a time (save_file would hold both, then their bytes: 5.6 GB at 4B shape)
            stream_safetensors(out.path / TRAINED_FILE, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                               tensors.__getitem__, metadata=meta)
        del tensors
        if spec.lora:
            model.save_pretrained(str(out.path / ADAPTER_DIR), save_embedding_layers=False)
            layers = dequantised_layers(model)
            if layers:
                write_dequantised_weights(layers, out.path / DEQUANTISED_FILE)
        save_tokenizer(tokenizer, out.path)
        (out.path / METRICS_FILE).write_text(json.dumps(metrics, ensure_ascii=False, indent=1), encoding="utf-8")
        save_stage_plot(metrics, out.path / "loss.png")
        if config.staged.save_full_model:
            del model
            free_memory()
            # on the CPU: the stage's own model and optimizer are still referenced by train_stage, so the
            # GPU may not hold a second copy (a5000 keeps save_full_model off: stage folders hold tensors)
            full, _ = load_stage_model(config, number - 1, extra=out.path)
            full.save_pretrained(out.path, max_shard_size=SHARD_SIZE)
            del full
        out.metrics.update({k: metrics[k] for k in ("steps", "tokens", "first_loss", "last_loss", "tokens_per_second",
                                                    "trainable_parameters", "resumed_from")})
        out.metrics["final_eval"] = metrics["evals"][-1] if metrics["evals"] else None
    accelerator.wait_for_everyone()


def merge_stages(config: ProjectConfig) -> Path:
    """3.07: models/staged_training/merged/: the full model after stage 7, every LoRA merged."""

    inputs = {f"stage{k}": require(config, f"stage{k}") for k in range(1, 8)}
    inputs["initialized_model"] = require(config, "initialized_model")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else None  # the merge runs where it fits
    with write_artifact(artifact_path(config, "merged_model"), "3.07", config, ["staged"], inputs) as out:
        model, tokenizer = load_stage_model(config, 7, device=device)
        model.save_pretrained(out.path, max_shard_size=SHARD_SIZE)
        save_tokenizer(tokenizer, out.path)
        out.metrics["parameters"] = sum(p.numel() for p in model.parameters())
    return artifact_path(config, "merged_model")


@torch.no_grad()
def qlora_merge_gap(config: ProjectConfig, device: Optional[torch.device] = None) -> dict[str, Any]:
    """Stage 6 as it trained (its base in 4-bit NF4 when `load_in_4bit`, adapter separate) against
    stage 6 merged, which is what stage 7 and every later phase load.

    The adapter learns a correction to the dequantised weights it saw; merged into the originals,
    it meets weights that differ by the quantisation error, so stage 6 keeps the dequantised weights
    (`dequantised_base.safetensors`) and merges into those. Per language: valid loss of both, the
    mean KL divergence between their next-token distributions, and how often their top tokens
    agree; with a 4-bit base, `merged_into_originals` is the same comparison for the adapter
    merged into the unquantised originals (what this project did before)."""

    hyper = stage_config(config, 6)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notices: list[str] = []
    quantized = hyper.load_in_4bit and bitsandbytes_ready("4-bit QLoRA (load_in_4bit)", "plain LoRA", notices)
    as_trained, tokenizer = load_stage_model(config, 5, quantize_4bit=quantized, device=device)
    as_trained = apply_trained(as_trained, require(config, "stage6"), merge_adapter=False).eval()
    merged, _ = load_stage_model(config, 6, device=device)
    merged.eval()
    valid = stage_data(config, tokenizer, hyper, config.staged.seed * 10 + 6).valid
    figures: dict[str, Any] = {"quantized": quantized, "notices": notices, **_compare(as_trained, merged, valid, device)}
    dequantised = require(config, "stage6") / DEQUANTISED_FILE
    if dequantised.is_file():  # what merging into the unquantised originals would have given
        # stages 1-5 train embedding rows only: the originals of the 4-bit layers are the initialised
        # model's, read from its files one tensor at a time (not a second model in RAM)
        _swap_base(merged, dequantised, require(config, "initialized_model"))
        figures["merged_into_originals"] = _compare(as_trained, merged, valid, device)
    return figures


def _compare(reference: Any, other: Any, valid: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:

    figures = {}
    for language, blocks in valid.items():
        sums = torch.zeros(4, dtype=torch.float64)  # loss of reference, loss of other, KL, top-1 agreements
        tokens = 0
        for row in range(blocks.shape[0]):
            ids = blocks[row:row + 1].to(device)
            # 256 positions: a, b, their log-softmaxes and one product at 272K rows stay ~1.4 GB in all
            for (a, targets), (b, _) in zip(logit_chunks(reference, ids, 256), logit_chunks(other, ids, 256)):
                log_a, log_b = a.log_softmax(-1), b.log_softmax(-1)
                sums += torch.stack([-log_a.gather(1, targets[:, None]).sum(), -log_b.gather(1, targets[:, None]).sum(),
                                     (log_a.exp() * (log_a - log_b)).sum(), (a.argmax(-1) == b.argmax(-1)).sum()
                                     ]).double().cpu()
                tokens += targets.numel()
        mean = (sums / max(tokens, 1)).tolist()
        figures[language] = {"as_trained_loss": round(mean[0], 5), "merged_loss": round(mean[1], 5),
                             "loss_gap": round(mean[1] - mean[0], 5), "kl_per_token": round(mean[2], 6),
                             "top1_agreement": round(mean[3], 5), "tokens": tokens}
    return figures


def _swap_base(merged: Any, dequantised: Path, originals: Path) -> None:
    """Under each merged weight W_deq + BA, put the unquantised W (from the model folder `originals`)
    in place of W_deq. One tensor at a time, each file opened and closed per tensor: a file held open
    keeps every page it has read mapped into this process (6.4 + 10 GB at MedGemma-4B shape)."""
    targets = dict(merged.named_parameters())
    keys = read_tensor_names(dequantised)
    saved = saved_names(merged, keys)
    files = tensor_files(originals)
    for key in keys:
        target = targets[key]
        if saved[key] not in files:
            raise KeyError(f"{originals} holds no tensor {saved[key]}: the stage was trained on another model")
        original = read_tensor(files[saved[key]], saved[key]).to(target.device, target.dtype)
        target.add_(original - read_tensor(dequantised, key).to(target.device, target.dtype))
        del original


def read_tensor_names(file: Path) -> list[str]:
    """The tensor names of a safetensors file, the file closed again (see `_swap_base`)."""

    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name → the file of a saved model folder that holds it (one file, or shards and their index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {key: folder / name for key, name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    return dict.fromkeys(read_tensor_names(folder / "model.safetensors"), folder / "model.safetensors")


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, read and the file closed again (see `_swap_base`)."""

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def saved_names(model: Any, names: list[str]) -> dict[str, str]:
    """Parameter name → the key `save_pretrained` writes it under: transformers 5 keeps Gemma 3's
    legacy checkpoint layout (`language_model.model.layers…` for `model.language_model.layers…`)."""
    from transformers.core_model_loading import revert_weight_conversion

    placeholders = {name: torch.empty(0) for name in names}
    by_id = {id(tensor): name for name, tensor in placeholders.items()}
    renamed = {by_id[id(tensor)]: key for key, tensor in revert_weight_conversion(model, placeholders).items()
               if id(tensor) in by_id}
    return {name: renamed.get(name, name) for name in names}


def read_metrics(config: ProjectConfig, number: int) -> StageMetrics:

    return json.loads((require(config, f"stage{number}") / METRICS_FILE).read_text(encoding="utf-8"))


def stage_headline(metrics: StageMetrics) -> str:
    """3.0N's line: steps, speed, train loss, the last valid losses."""
    final = metrics.get("final_eval") or {}
    resumed = f"; resumed from {metrics['resumed_from']}" if metrics.get("resumed_from") else ""
    return (f"{metrics.get('steps', 0):,} steps, {metrics.get('tokens', 0):,} tokens at "
            f"{metrics.get('tokens_per_second', 0):,.0f} tok/s; train loss {metrics.get('first_loss')} → "
            f"{metrics.get('last_loss')}; valid ko {final.get('korean_valid_loss')} / en "
            f"{final.get('english_valid_loss')}{resumed}")


def merged_headline(metrics: dict[str, Any]) -> str:
    """3.07's line for the model after stage 7."""
    return f"{metrics.get('parameters', 0):,} parameters, every LoRA merged"
