"""Phase 3: run one EEVE stage end to end — load, train, checkpoint, resume, save.

A stage starts from the model the previous stages left, rebuilt from the initialised model plus
each stage's trained tensors (`trained.safetensors`: rows or whole matrices; `adapter/`: LoRA,
merged). Every stage folder holds those tensors, so on `a5000` it need not hold an 8.6 GB copy
of the model (`staged.save_full_model=false`), and stage 6 can load the initialised model's
transformer in 4-bit directly: stages 1–5 never change it.

The loop runs on `accelerate` (one process, DDP under `torchrun`/`accelerate launch`, DeepSpeed
ZeRO-2 with `config/accelerate_zero2.yaml`). Resume state is accelerate's own `save_state`
(optimizer, scheduler, RNG of every process, the accumulation counter) with the weights cut to
the trainable tensors, plus the data position: micro-batch k of the run is a pure function of
(k, seed), so a resumed run reads exactly the blocks an uninterrupted one would have read.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from config.training_config import StageConfig
from kormedgemma.config import ProjectConfig, config_hash, config_to_dict
from kormedgemma.corpus.batching import BlockOrder
from kormedgemma.stages import STAGES, StageSpec, apply_stage

TRAINED_FILE = "trained.safetensors"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "models/staged_training/checkpoints"
# Test hook: the process dies (os._exit, no clean-up) right after this optimizer step, like `kill -9`.
CRASH_ENV = "KORMEDGEMMA_CRASH_AT_STEP"


def stage_config(config: ProjectConfig, number: int) -> StageConfig:
    if number not in STAGES:
        raise ValueError(f"stage {number} does not exist: EEVE has stages 1–7")
    return getattr(config.staged, f"stage{number}")


def new_token_rows(config: ProjectConfig) -> tuple[int, int]:
    """(first id, count) of the new tokens, from phase 2's report."""
    from kormedgemma.artifacts import require

    report = json.loads((require(config, "initialized_model") / "init_report.json").read_text(encoding="utf-8"))
    ids = report["new_ids"]
    if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError("init_report.json lists no contiguous block of new token ids: re-run phase 2")
    return ids[0], len(ids)


# --------------------------------------------------------------------------- a stage's result
def load_stage_model(config: ProjectConfig, upto: int, *, extra: Optional[Path] = None, quantize_4bit: bool = False,
                     device: Optional[torch.device] = None) -> tuple[Any, Any]:
    """(model, tokenizer) after stage `upto` (0: the initialised model); `extra` is one more stage
    folder to apply (a stage's own output before it is sealed)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from kormedgemma.artifacts import require
    from kormedgemma.base_model import check_tokenizer_matches_model

    folders = [require(config, f"stage{k}") for k in range(1, upto + 1)] + ([Path(extra)] if extra else [])
    initialized = require(config, "initialized_model")
    tokenizer = AutoTokenizer.from_pretrained(initialized)
    dtype = getattr(torch, config.base.torch_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize_4bit:
        kwargs.update(quantization_config=_bnb_config(dtype), device_map={"": device or torch.device("cuda", 0)})
    model = AutoModelForImageTextToText.from_pretrained(initialized, **kwargs)
    if device is not None and not quantize_4bit:
        model.to(device)
    for folder in folders:
        model = apply_trained(model, folder)
    check_tokenizer_matches_model(tokenizer, model)
    return model, tokenizer


def apply_trained(model: Any, folder: Path) -> Any:
    """Write a stage's trained rows into `model` and merge its LoRA adapter, if any."""
    from safetensors import safe_open

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
    adapter = Path(folder) / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        if getattr(model, "is_loaded_in_4bit", False):
            raise ValueError(f"{adapter}: merging LoRA into a 4-bit model loses precision; load it in bf16")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model


def trained_tensors(model: Any, spec: StageSpec, first: int, count: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The rows a stage trained, deltas folded in, as (tensors, safetensors metadata)."""
    from kormedgemma.rows import merge_row_deltas

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    merge_row_deltas(inner)
    tensors, meta = {}, {"stage": str(spec.number)}
    for key, rows, module in (("input_embeddings", spec.input_rows, inner.get_input_embeddings()),
                              ("output_embeddings", spec.output_rows, inner.get_output_embeddings())):
        if rows is None:
            continue
        start, stop = (first, first + count) if rows == "new" else (0, module.weight.shape[0])
        tensors[key] = module.weight.detach()[start:stop].to("cpu").contiguous()
        meta[f"{key}.first_row"] = str(start)
    return tensors, meta


# --------------------------------------------------------------------------- data
@dataclass
class StageData:
    train: Any  # PackedBlocks: indexed by a list of block numbers, gives [k, seq_len] ids
    english_share: float
    valid: dict[str, torch.Tensor]  # language → [m, ≤seq_len] blocks


def stage_data(config: ProjectConfig, tokenizer: Any, spec: StageConfig, seed: int) -> StageData:
    """Blocks from the token store (step 1.04): views over memory maps, never the corpus in RAM."""
    from kormedgemma.artifacts import require
    from kormedgemma.corpus.batching import PackedBlocks, leading_blocks
    from kormedgemma.corpus.token_store import TokenStore

    store = TokenStore(require(config, "token_store"))
    store.check_tokenizer(tokenizer)
    train = PackedBlocks.build(store.stream("korean", "train"), store.stream("english", "train"), spec.seq_len,
                               spec.english_replay_fraction, seed)
    valid = {}
    for language in ("korean", "english"):
        blocks = leading_blocks(store.stream(language, "valid"), spec.seq_len, spec.eval_blocks)
        if blocks is not None:
            valid[language] = blocks
    return StageData(train, train.english_share, valid)


# --------------------------------------------------------------------------- progress (checkpointed)
@dataclass
class Progress:
    """What a checkpoint must remember besides optimizer and RNG: where the run is and its curve."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                "history": self.history, "evals": self.evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self.history, self.evals = list(state["history"]), list(state["evals"])


# --------------------------------------------------------------------------- hardware choices
def _bnb_config(dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])


def _bitsandbytes_ready(what: str, instead: str, notices: list[str]) -> bool:
    """True when bitsandbytes can run here; otherwise a notice says what runs instead."""
    if not torch.cuda.is_available():
        notices.append(f"{what} needs a CUDA GPU with bitsandbytes; no GPU here, so this stage uses {instead}.")
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} needs bitsandbytes: pip install -r requirements-gpu.txt ({error})") from error
    return True


def _optimizer(spec: StageConfig, parameters: list[torch.nn.Parameter], notices: list[str]) -> torch.optim.Optimizer:
    if spec.optimizer in ("adamw_8bit", "paged_adamw_8bit") and _bitsandbytes_ready(
            f"optimizer {spec.optimizer}", "torch-optimi AdamW (Kahan-compensated)", notices):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if spec.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    kind = spec.optimizer if spec.optimizer in ("adamw", "adamw_kahan", "adamw_8bit_sr") else "adamw_kahan"
    return make_optimizer(kind, parameters, spec.learning_rate, spec.weight_decay)


def make_optimizer(kind: str, parameters: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over `parameters`; `adamw_kahan` compensates the rounding of bf16 weight updates.

    A bf16 weight of ~0.03 moves in steps of 1.2e-4 (its ulp), so an Adam update of ~lr = 2e-5 is
    rounded to nothing most steps: plain AdamW on bf16 weights keeps under half of the fp32 run's
    movement. Kahan summation carries the rounded-off part in a bf16 buffer to the next step
    (torch-optimi; one extra bf16 tensor per bf16 weight, none for fp32 ones), which tracks the
    fp32 trajectory (cosine 0.999 over 100 steps, tests/test_optimizers.py) without fp32 master
    weights (+4 bytes a parameter). Betas and eps are torch's, so both kinds optimise the same
    objective the same way."""
    if kind == "adamw_8bit_sr":
        # 8-bit states; each bf16 update rounded up or down at random in proportion to the
        # remainder, so small updates survive in expectation (no extra buffer, unlike Kahan).
        from torchao.optim import AdamW8bit

        return AdamW8bit(parameters, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                         bf16_stochastic_round=True)
    if kind == "adamw_kahan":
        import optimi

        # On CUDA optimi picks its fused Triton kernel by itself (no full-size temporaries of a
        # 697M-row matrix); on the CPU its for-loop implementation.
        return optimi.AdamW(parameters, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                            kahan_sum=True)
    fused = bool(parameters) and parameters[0].is_cuda
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused)


def _accelerator(spec: StageConfig) -> Any:
    from accelerate import Accelerator

    # cpu=True on a machine without CUDA is what makes `torchrun` there run gloo DDP, not N copies
    accelerator = Accelerator(gradient_accumulation_steps=spec.grad_accum, cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}: "
                           "use `accelerate launch` or `torchrun` with a matching accelerate config")
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # "auto" entries of config/ds_config_zero2.json take the stage's values
        plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": spec.micro_batch_size,
                                        "gradient_accumulation_steps": spec.grad_accum,
                                        "gradient_clipping": spec.max_grad_norm})
    return accelerator


def _peak_memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
                "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 2)}
    import resource

    return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


# --------------------------------------------------------------------------- checkpoints
def checkpoint_root(config: ProjectConfig, number: int) -> Path:
    from kormedgemma.config import resolve_path

    return resolve_path(config, f"{CHECKPOINTS}/stage{number}")


def _fingerprint(config: ProjectConfig, number: int, inputs: dict[str, Path]) -> str:
    from kormedgemma.manifest import hash_path

    return config_hash({"stage": config_to_dict(stage_config(config, number)), "seed": config.staged.seed,
                        "inputs": {name: hash_path(path) for name, path in inputs.items()}})


def latest_checkpoint(folder: Path) -> Optional[Path]:
    done = sorted(p for p in folder.glob("step-*") if (p / "progress.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def _keep_trainable(models: list[Any], weights: list[dict[str, torch.Tensor]], _output_dir: str) -> None:
    """accelerate's save_state pre-hook: keep only the tensors that train (not 8.6 GB of frozen ones)."""
    for model, state in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in list(state):
            if key not in trainable:
                del state[key]


def _save_checkpoint(accelerator: Any, folder: Path, progress: Progress, fingerprint: str, keep: int) -> None:
    target = folder / f"step-{progress.step:06d}"
    partial = folder / f".partial-step-{progress.step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "progress.json").write_text(json.dumps({"step": progress.step, "fingerprint": fingerprint}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)  # a checkpoint exists whole or not at all
        for old in sorted(p for p in folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- the stage
def stage_inputs(config: ProjectConfig, number: int) -> dict[str, Path]:
    """Artifacts stage `number` reads; a missing one fails naming the notebook that makes it."""
    from kormedgemma.artifacts import require

    if number > 1:
        require(config, f"stage{number - 1}")  # the predecessor first: its notebook is the one to name
    inputs = {f"stage{k}": require(config, f"stage{k}") for k in range(1, number)}
    for key in ("initialized_model", "token_store"):
        inputs[key] = require(config, key)
    return inputs


def train_stage(config: ProjectConfig, number: int, progress_bar: bool = True) -> dict[str, Any]:
    """Train stage `number` (resuming from its newest checkpoint) and write its folder. Returns metrics."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from kormedgemma.environment import prefer_expandable_segments

    spec, hyper = STAGES[number], stage_config(config, number)
    inputs = stage_inputs(config, number)
    prefer_expandable_segments()  # before anything here touches CUDA
    accelerator = _accelerator(hyper)
    device = accelerator.device
    notices: list[str] = []
    quantize = hyper.load_in_4bit and _bitsandbytes_ready(
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
        inner = trained.get_base_model() if hasattr(trained, "get_base_model") else trained
        for layer in inner.model.language_model.layers:
            layer.compile()
    data = stage_data(config, tokenizer, hyper, seed)
    from kormedgemma.loss import CausalLMLoss

    parameters = [p for p in trained.parameters() if p.requires_grad]
    module = CausalLMLoss(trained)
    optimizer = _optimizer(hyper, parameters, notices)
    scheduler = get_scheduler(hyper.lr_scheduler, optimizer, num_warmup_steps=math.ceil(hyper.warmup_ratio * hyper.max_steps),
                              num_training_steps=hyper.max_steps)
    module, optimizer = accelerator.prepare(module, optimizer, device_placement=[False, True])
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    accelerator.register_save_state_pre_hook(_keep_trainable)
    for notice in notices:
        accelerator.print(f"notice: {notice}")

    folder = checkpoint_root(config, number)
    fingerprint = _fingerprint(config, number, inputs)
    resumed_from = _resume(accelerator, module, folder, fingerprint, config, number)
    world = accelerator.num_processes
    order = BlockOrder(len(data.train), hyper.micro_batch_size, seed)
    tokens_per_step = hyper.micro_batch_size * hyper.seq_len * hyper.grad_accum * world
    crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
    if progress.step == 0 and data.valid:
        progress.evals.append({"step": 0, **_evaluate(module, data.valid, accelerator, hyper.micro_batch_size)})
    bar = tqdm(total=hyper.max_steps, initial=progress.step, desc=f"stage {number}", unit="step",
               disable=not (progress_bar and accelerator.is_local_main_process), mininterval=2.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    module.train()
    try:
        while progress.step < hyper.max_steps:
            started = time.perf_counter()
            losses, grad_norm = [], None
            for micro in range(hyper.grad_accum):
                index = (progress.step * hyper.grad_accum + micro) * world + accelerator.process_index
                batch = data.train[order.blocks(index)].to(device)
                with accelerator.accumulate(module):
                    loss = module(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(parameters, hyper.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
            scheduler.step()
            mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            progress.step += 1
            progress.tokens += tokens_per_step
            progress.train_seconds += seconds
            progress.history.append({"step": progress.step, "loss": round(mean_loss, 5),
                                     "lr": scheduler.get_last_lr()[0], "seconds": round(seconds, 4),
                                     "grad_norm": None if grad_norm is None else round(float(grad_norm), 4)})
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}", refresh=False)
            bar.update(1)
            if data.valid and (progress.step % hyper.eval_every == 0 or progress.step == hyper.max_steps):
                progress.evals.append({"step": progress.step,
                                       **_evaluate(module, data.valid, accelerator, hyper.micro_batch_size)})
            if progress.step % hyper.save_every == 0 and progress.step < hyper.max_steps:
                _save_checkpoint(accelerator, folder, progress, fingerprint, hyper.keep_checkpoints)
            if crash_at and progress.step == crash_at:
                os._exit(137)
    except torch.OutOfMemoryError as error:
        raise MemoryError(
            f"stage {number} ran out of GPU memory at micro_batch_size={hyper.micro_batch_size}, "
            f"seq_len={hyper.seq_len}: lower staged.stage{number}.micro_batch_size (raise grad_accum to keep the "
            f"batch), keep gradient_checkpointing on, or for stage 6 keep load_in_4bit and an 8-bit optimizer. "
            f"Re-running resumes from {latest_checkpoint(folder) or 'the start'}.") from error
    finally:
        bar.close()
    metrics = _metrics(config, number, hyper, data, progress, accelerator, device, resumed_from, notices, trained)
    unwrapped = accelerator.unwrap_model(module).model
    _write_stage(config, number, unwrapped, spec, first, count, tokenizer, inputs, metrics, accelerator)
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)  # the stage is sealed: its resume points are spent
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # only when no other stage has checkpoints
    accelerator.wait_for_everyone()
    return metrics


def check_checkpoint_keys(module: Any, checkpoint: Path) -> None:
    """Refuse a checkpoint whose model tensors are not exactly the trainable set.

    Checkpoints hold only the trainable tensors (`_keep_trainable`), so they load with
    `strict=False`, which alone would also accept a checkpoint whose names drifted (another peft or
    transformers version, another stage) and load nothing from it, silently."""
    from safetensors import safe_open

    file = Path(checkpoint) / "model.safetensors"
    if not file.is_file():
        return  # DeepSpeed writes its own layout and checks its own keys
    with safe_open(str(file), framework="pt") as handle:
        saved = set(handle.keys())
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    if saved != trainable:
        missing, unexpected = sorted(trainable - saved), sorted(saved - trainable)
        raise ValueError(
            f"{checkpoint} does not hold this stage's trainable tensors ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}), so resuming would load "
            f"nothing into them: delete {Path(checkpoint).parent} (or run with --set staged.resume=false) "
            "to start the stage afresh, or resume with the library versions that wrote it")


def _resume(accelerator: Any, module: Any, folder: Path, fingerprint: str, config: ProjectConfig,
            number: int) -> Optional[str]:
    latest = latest_checkpoint(folder)
    if latest is None:
        return None
    if not config.staged.resume:
        accelerator.print(f"staged.resume=false: discarding checkpoints in {folder}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        return None
    saved = json.loads((latest / "progress.json").read_text())
    if saved["fingerprint"] != fingerprint:
        raise ValueError(
            f"{latest} was made with another stage {number} config or other inputs, so resuming it would mix two "
            f"runs: delete {folder} (or run with --set staged.resume=false) to start the stage afresh")
    check_checkpoint_keys(module, latest)
    accelerator.load_state(str(latest), strict=False)
    accelerator.print(f"resumed stage {number} from {latest.name}")
    return latest.name


@torch.no_grad()
def _evaluate(module: Any, valid: dict[str, torch.Tensor], accelerator: Any, batch_size: int) -> dict[str, float]:
    """Mean token loss on each language's valid blocks, split across processes."""
    was_training = module.training
    module.eval()
    figures = {}
    for language, blocks in valid.items():
        total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
        mine = list(range(accelerator.process_index, len(blocks), accelerator.num_processes))
        for start in range(0, len(mine), batch_size):
            batch = blocks[mine[start:start + batch_size]].to(accelerator.device)
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            total += torch.tensor([module(batch).item() * tokens, tokens], device=accelerator.device, dtype=torch.float64)
        total = accelerator.reduce(total, reduction="sum")
        figures[f"{language}_valid_loss"] = round(float(total[0] / total[1]), 5)
    module.train(was_training)
    return figures


def _metrics(config: ProjectConfig, number: int, hyper: StageConfig, data: StageData, progress: Progress, accelerator: Any,
             device: torch.device, resumed_from: Optional[str], notices: list[str], trained: Any) -> dict[str, Any]:
    from kormedgemma.stages import trainable_parameters

    timed = [h["seconds"] for h in progress.history[1:]] or [h["seconds"] for h in progress.history]
    tokens_per_step = progress.tokens // max(progress.step, 1)
    return {
        "stage": number, "name": STAGES[number].name, "steps": progress.step, "tokens": progress.tokens,
        "train_blocks": len(data.train), "english_share": round(data.english_share, 4),
        "epochs": round(progress.step * hyper.micro_batch_size * hyper.grad_accum * accelerator.num_processes / len(data.train), 3),
        "trainable_parameters": sum(trainable_parameters(trained).values()),
        "first_loss": progress.history[0]["loss"] if progress.history else None,
        "last_loss": progress.history[-1]["loss"] if progress.history else None,
        # the first step (compilation, allocator warm-up) is left out of the rate
        "tokens_per_second": round(tokens_per_step * len(timed) / sum(timed), 1) if timed else None,
        "train_seconds": round(progress.train_seconds, 2), "processes": accelerator.num_processes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **_peak_memory_gb(device), "resumed_from": resumed_from, "notices": notices,
        "history": progress.history, "evals": progress.evals,
    }


def _write_stage(config: ProjectConfig, number: int, model: Any, spec: StageSpec, first: int, count: int, tokenizer: Any,
                 inputs: dict[str, Path], metrics: dict[str, Any], accelerator: Any) -> None:
    from safetensors.torch import save_file

    from kormedgemma.artifacts import artifact_path
    from kormedgemma.base_model import save_tokenizer
    from kormedgemma.curves import save_stage_plot
    from kormedgemma.environment import free_memory
    from kormedgemma.manifest import write_artifact

    tensors, meta = trained_tensors(model, spec, first, count)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    keys = [f"staged.stage{number}", "staged.seed", "staged.save_full_model"]
    with write_artifact(artifact_path(config, f"stage{number}"), f"3.0{number}", config, keys, inputs) as out:
        if tensors:
            save_file(tensors, str(out.path / TRAINED_FILE), metadata=meta)
        if spec.lora:
            model.save_pretrained(str(out.path / ADAPTER_DIR), save_embedding_layers=False)
        save_tokenizer(tokenizer, out.path)
        (out.path / METRICS_FILE).write_text(json.dumps(metrics, ensure_ascii=False, indent=1), encoding="utf-8")
        save_stage_plot(metrics, out.path / "loss.png")
        if config.staged.save_full_model:
            del model
            free_memory()
            full, _ = load_stage_model(config, number - 1, extra=out.path)
            full.save_pretrained(out.path)
            del full
        out.metrics.update({k: metrics[k] for k in ("steps", "tokens", "first_loss", "last_loss", "tokens_per_second",
                                                    "trainable_parameters", "resumed_from")})
        out.metrics["final_eval"] = metrics["evals"][-1] if metrics["evals"] else None
    accelerator.wait_for_everyone()


def merge_stages(config: ProjectConfig) -> Path:
    """3.07: models/staged_training/merged/: the full model after stage 7, every LoRA merged."""
    from kormedgemma.artifacts import artifact_path, require
    from kormedgemma.base_model import save_tokenizer
    from kormedgemma.manifest import write_artifact

    inputs = {f"stage{k}": require(config, f"stage{k}") for k in range(1, 8)}
    inputs["initialized_model"] = require(config, "initialized_model")
    with write_artifact(artifact_path(config, "merged_model"), "3.07", config, ["staged"], inputs) as out:
        model, tokenizer = load_stage_model(config, 7)
        model.save_pretrained(out.path)
        save_tokenizer(tokenizer, out.path)
        out.metrics["parameters"] = sum(p.numel() for p in model.parameters())
    return artifact_path(config, "merged_model")


def read_metrics(config: ProjectConfig, number: int) -> dict[str, Any]:
    from kormedgemma.artifacts import require

    return json.loads((require(config, f"stage{number}") / METRICS_FILE).read_text(encoding="utf-8"))
