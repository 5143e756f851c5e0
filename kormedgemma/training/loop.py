"""The training machinery phases 3 and 4 share: accelerator, optimizer, weighted steps, resume,
and the one loop (`train_loop`) both recipes run, each bringing a `Recipe` for what differs.

Both phases run on `accelerate` (one process, DDP under `torchrun`/`accelerate launch`, DeepSpeed
ZeRO-2 with `config/accelerate_zero2.yaml`), and both must survive a kill during a days-long run
on a workstation. Resume state is accelerate's own `save_state` (optimizer, scheduler, RNG of
every process, the accumulation counter) with the weights cut to the trainable tensors, plus a
`Progress` object and the data position: micro-batch k of a run is a pure function of (k, seed),
so a resumed run reads exactly what an uninterrupted one would have read.

One optimizer step weights every predicted token equally, across the step's micro-batches and
processes (the weighting transformers fixed with `num_items_in_batch`): averaging per-micro-batch
mean losses would make an answer token in a short padded batch count more than one in a long
batch. For packed pre-training blocks, where every micro-batch predicts the same number of
tokens, both weightings are the same.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kormedgemma.core.config import config_hash
from kormedgemma.core.environment import cap_gpu_memory, free_memory, prefer_expandable_segments
from kormedgemma.core.manifest import hash_path
from kormedgemma.core.resources import reset_peak_gpu_memory
from kormedgemma.modeling.loss import IGNORE

# Test hook: the process dies (os._exit, no clean-up) right after this optimizer step, like `kill -9`.
CRASH_ENV = "KORMEDGEMMA_CRASH_AT_STEP"
EXTRA_FILE = "extra.safetensors"


Result = TypeVar("Result")


def releases_memory(recipe: Callable[..., Result]) -> Callable[..., Result]:
    """Run a training recipe, then hand back what its model, optimizer and accelerator held once
    they are gone: cached GPU blocks and torch's pinned host blocks. A notebook kernel lives on
    after the recipe returns, and in the a5000 rehearsal stage 6 left 8.9 GB of pinned host memory
    (shared memory: the kernel cannot page it out) cached into 3.06's merge-gap cell; a probe
    released 8.6 GB of it this way (benchmarks/results/stage6_shmem_probe_h200.json)."""

    @functools.wraps(recipe)
    def run(*args: Any, **kwargs: Any) -> Result:
        result = recipe(*args, **kwargs)  # the recipe's frame, and every tensor it held, ends here
        free_memory()
        return result

    return run


# --------------------------------------------------------------------------- progress (checkpointed)
@dataclass
class Progress:
    """What a checkpoint must remember besides optimizer and RNG: where the run is and its curve.

    `extra` holds a phase's own JSON-able state (phase 4: the best dev step so far)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # Seconds besides the optimizer steps (setup_seconds, eval_seconds, checkpoint_seconds), summed
    # over every process that ran like train_seconds: a resumed run's figures cover the whole run
    # (up to the checkpoint it resumed from, whose own write is not in it).
    overhead: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                "history": self.history, "evals": self.evals, "extra": self.extra, "overhead": self.overhead}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self.history, self.evals = list(state["history"]), list(state["evals"])
        self.extra = dict(state.get("extra", {}))
        self.overhead = dict(state.get("overhead", {}))  # checkpoints written before it existed have none

    def spent(self, what: str, seconds: float) -> None:
        self.overhead[what] = self.overhead.get(what, 0.0) + seconds

    @contextlib.contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Add the seconds of the `with` body to `overhead[what]`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent(what, time.perf_counter() - started)


def crash_if_asked(step: int) -> None:
    """Die like `kill -9` after optimizer step `step` when CRASH_ENV asks for it (resume tests)."""
    crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
    if crash_at and step == crash_at:
        os._exit(137)


# --------------------------------------------------------------------------- hardware choices
def bitsandbytes_ready(what: str, instead: str, notices: list[str]) -> bool:
    """True when bitsandbytes can run here; otherwise a notice says what runs instead."""
    if not torch.cuda.is_available():
        notices.append(f"{what} needs a CUDA GPU with bitsandbytes; no GPU here, so this run uses {instead}.")
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} needs bitsandbytes: pip install -r requirements-gpu.txt ({error})") from error
    return True


def make_optimizer(kind: str, parameters: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over `parameters`; `adamw_kahan` compensates the rounding of bf16 weight updates.

    A bf16 weight of ~0.03 moves in steps of 1.2e-4 (its ulp), so an Adam update of ~lr = 2e-5 is
    rounded to nothing most steps: plain AdamW on bf16 weights keeps under half of the fp32 run's
    movement. Kahan summation carries the rounded-off part in a bf16 buffer to the next step
    (torch-optimi; one extra bf16 tensor per bf16 weight, none for fp32 ones), which tracks the
    fp32 trajectory (cosine 0.999 over 100 steps, tests/training/test_optimizers.py) without fp32 master
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
    if kind != "adamw":
        raise ValueError(f"unknown optimizer kind {kind!r}: adamw, adamw_kahan or adamw_8bit_sr")
    fused = bool(parameters) and parameters[0].is_cuda
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused)


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config (config/accelerate_zero2.yaml) says so here."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def make_accelerator(grad_accum: int, micro_batch_size: int, max_grad_norm: float, dtype: str = "float32") -> Any:
    """The run's accelerator. Under DeepSpeed its config's batch sizes and clipping are the stage's,
    and its precision is the model's (`base.torch_dtype`): the engine casts the module to bf16 when
    told to, so a bf16 flag on an fp32 model (the tiny profile) would quietly train another model."""

    deepspeed, cuda = deepspeed_requested(), torch.cuda.is_available()
    # cpu=True on a machine without CUDA is what makes `torchrun` there run gloo DDP, not N copies.
    # Under DeepSpeed it would quietly run DDP instead: there DeepSpeed's own CPU accelerator runs
    # ZeRO-2 over gloo (how the tests exercise the path a multi-GPU user takes), and accelerate
    # must be told gloo, or it counts one process while DeepSpeed counts all of them.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=not cuda and not deepspeed,
                              kwargs_handlers=handlers)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}: "
                           "use `accelerate launch` or `torchrun` with a matching accelerate config")
    if deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError(f"launched with a DeepSpeed config but accelerate set up {accelerator.distributed_type}: "
                           "is deepspeed installed (`pip install -r requirements.txt`)?")
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # "auto" entries of config/ds_config_zero2.json take the run's values
        plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": micro_batch_size,
                                        "gradient_accumulation_steps": grad_accum,
                                        "train_batch_size": micro_batch_size * grad_accum * accelerator.num_processes,
                                        "gradient_clipping": max_grad_norm})
        plugin.deepspeed_config.setdefault("bf16", {})["enabled"] = dtype == "bfloat16"
        plugin.deepspeed_config.setdefault("fp16", {})["enabled"] = dtype == "float16"
    return accelerator


def prepare_module(accelerator: Any, module: Any, optimizer: Any) -> tuple[Any, Any]:
    """accelerate's prepare, leaving the module where it was loaded (a 4-bit base cannot move).

    DeepSpeed refuses custom placement and moves the module to its device itself, which it is
    already on."""
    if _is_deepspeed(accelerator):
        return accelerator.prepare(module, optimizer)
    return accelerator.prepare(module, optimizer, device_placement=[False, True])


def deepspeed_notice(accelerator: Any, dtype: str) -> Optional[str]:
    """What ZeRO changes about the optimizer, said in the metrics where it applies."""
    if not _is_deepspeed(accelerator) or dtype == "float32":
        return None
    return ("DeepSpeed ZeRO keeps fp32 master weights and fp32 gradient partitions of the trainable tensors (8 bytes "
            "a parameter, split across processes) and the optimizer updates those: Kahan compensation and stochastic "
            "rounding have nothing to do there")


def launch_of(accelerator: Any) -> str:
    """`ddp x 2`: what a checkpoint records of the launch that wrote it."""
    return f"{distributed_kind(accelerator)} x {accelerator.num_processes}"


def distributed_kind(accelerator: Any) -> str:
    """What the metrics say ran: `single`, `ddp` or `deepspeed-zero<stage>`."""
    if _is_deepspeed(accelerator):
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
                "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 2)}

    return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


# --------------------------------------------------------------------------- one optimizer step
def predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens whose next token the loss scores: shifted labels that are not IGNORE or padding."""
    labels = batch.get("labels", batch["input_ids"])[:, 1:]
    keep = labels != IGNORE
    if "attention_mask" in batch:
        keep &= batch["attention_mask"][:, 1:] != 0
    return int(keep.sum())


def optimizer_step(accelerator: Any, module: Any, optimizer: Any, micro_batches: Sequence[dict[str, torch.Tensor]],
                   parameters: list[torch.nn.Parameter], max_grad_norm: float) -> tuple[float, Optional[float], int]:
    """One optimizer step over this process's `micro_batches` (exactly grad_accum of them).

    `module(**batch)` returns the summed loss of its predicted tokens. Each backward is scaled by
    processes × grad_accum / (tokens of the whole step on every process): DDP averages gradients
    over processes and accelerate divides by grad_accum, so the applied gradient is the mean over
    every token of the step, as one large batch would give. Returns (mean loss, grad norm, tokens)."""
    if len(micro_batches) != accelerator.gradient_accumulation_steps:
        raise ValueError(f"{len(micro_batches)} micro-batches for grad_accum={accelerator.gradient_accumulation_steps}")
    device = accelerator.device
    counts = torch.tensor([float(sum(predicted_tokens(b) for b in micro_batches))], device=device, dtype=torch.float64)
    total = float(accelerator.reduce(counts, reduction="sum")[0])
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / max(total, 1.0)
    summed = torch.zeros((), device=device, dtype=torch.float64)
    grad_norm = None
    for batch in micro_batches:
        with accelerator.accumulate(module):
            loss = module(**{k: v.to(device) for k, v in batch.items()})
            accelerator.backward(loss * scale)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        summed += loss.detach().double()
    mean = float(accelerator.reduce(summed.reshape(1), reduction="sum")[0]) / max(total, 1.0)
    return mean, None if grad_norm is None else float(grad_norm), int(total)


@torch.no_grad()
def mean_loss(module: Any, batches: Sequence[dict[str, torch.Tensor]], accelerator: Any) -> Optional[float]:
    """Mean loss per predicted token over `batches`, split across processes (each takes every
    n-th batch); None when there is nothing to score."""
    if not batches:
        return None
    was_training = module.training
    module.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in batches[accelerator.process_index::accelerator.num_processes]:
        loss = module(**{k: v.to(accelerator.device) for k, v in batch.items()})
        total += torch.tensor([float(loss), predicted_tokens(batch)], device=accelerator.device, dtype=torch.float64)
    total = accelerator.reduce(total, reduction="sum")
    module.train(was_training)
    return round(float(total[0] / total[1].clamp(min=1)), 5)


# --------------------------------------------------------------------------- checkpoints
def run_fingerprint(settings: dict[str, Any], inputs: dict[str, Path]) -> str:
    """What a checkpoint must match to be resumed: the run's settings and its inputs' hashes."""

    return config_hash({**settings, "inputs": {name: hash_path(path) for name, path in inputs.items()}})


def latest_checkpoint(folder: Path) -> Optional[Path]:
    done = sorted(p for p in folder.glob("step-*") if (p / "progress.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def keep_trainable(models: list[Any], weights: list[dict[str, torch.Tensor]], _output_dir: str) -> None:
    """accelerate's save_state pre-hook: keep only the tensors that train (not 8.6 GB of frozen ones)."""
    for model, state in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in list(state):
            if key not in trainable:
                del state[key]


def save_checkpoint(accelerator: Any, folder: Path, progress: Progress, fingerprint: str, keep: int,
                    extra: Optional[dict[str, torch.Tensor]] = None) -> None:
    """`folder/step-N`, whole or not at all; `extra` tensors (phase 4's best adapter) go beside it."""

    target = folder / f"step-{progress.step:06d}"
    partial = folder / f".partial-step-{progress.step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # DeepSpeed writes the module itself: without exclude_frozen_parameters every checkpoint would
    # hold the 8.6 GB frozen model (keep_trainable cuts only accelerate's own safetensors file).
    accelerator.save_state(str(partial), **({"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra:
            save_file({k: v.contiguous() for k, v in extra.items()}, str(partial / EXTRA_FILE))
        (partial / "progress.json").write_text(json.dumps({"step": progress.step, "fingerprint": fingerprint,
                                                           "launch": launch_of(accelerator)}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)  # a checkpoint exists whole or not at all
        for old in sorted(p for p in folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def check_checkpoint_keys(module: Any, checkpoint: Path, fresh_start: str) -> None:
    """Refuse a checkpoint whose model tensors are not exactly the trainable set.

    Checkpoints hold only the trainable tensors (`keep_trainable`), so they load with
    `strict=False`, which alone would also accept a checkpoint whose names drifted (another peft or
    transformers version, another stage) and load nothing from it, silently."""

    file = Path(checkpoint) / "model.safetensors"
    deepspeed = Path(checkpoint) / "pytorch_model" / "mp_rank_00_model_states.pt"
    if file.is_file():
        with safe_open(str(file), framework="pt") as handle:
            saved = set(handle.keys())
    elif deepspeed.is_file():  # loaded with load_module_strict=False, so it would not check either
        saved = set(torch.load(deepspeed, map_location="cpu", mmap=True, weights_only=False)["module"])
        module = getattr(module, "module", module)  # the engine's names carry a "module." prefix
    else:
        raise ValueError(f"{checkpoint} holds no model tensors (model.safetensors or DeepSpeed's pytorch_model/): "
                         f"{fresh_start}")
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    if saved != trainable:
        missing, unexpected = sorted(trainable - saved), sorted(saved - trainable)
        raise ValueError(
            f"{checkpoint} does not hold this run's trainable tensors ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}), so resuming would load "
            f"nothing into them: {fresh_start}, or resume with the library versions that wrote it")


def resume(accelerator: Any, module: Any, folder: Path, fingerprint: str, enabled: bool, what: str,
           resume_key: str) -> Optional[Path]:
    """Load the newest checkpoint in `folder` into the prepared objects; the checkpoint, or None.

    A checkpoint of another config or other inputs is refused, never mixed into this run."""
    latest = latest_checkpoint(folder)
    if latest is None:
        return None
    fresh_start = f"delete {folder} (or run with --set {resume_key}=false) to start {what} afresh"
    if not enabled:
        accelerator.print(f"{resume_key}=false: discarding checkpoints in {folder}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        return None
    saved = json.loads((latest / "progress.json").read_text())
    launch = launch_of(accelerator)
    if saved.get("launch", launch) != launch:
        # the data order folds in the process count, and ZeRO-2's optimizer partitions and
        # accelerate's per-process files exist only for the launch that wrote them
        raise ValueError(f"{latest} was written by a {saved['launch']} run and this is a {launch} run: resume with "
                         f"the launcher and process count that wrote it, or {fresh_start}")
    if saved["fingerprint"] != fingerprint:
        raise ValueError(f"{latest} was made with another {what} config or other inputs, so resuming it would "
                         f"mix two runs: {fresh_start}")
    check_checkpoint_keys(module, latest, fresh_start)
    if _is_deepspeed(accelerator):  # frozen tensors were left out of the checkpoint (save_checkpoint)
        accelerator.load_state(str(latest), load_module_strict=False)
    else:
        accelerator.load_state(str(latest), strict=False)
    accelerator.print(f"resumed {what} from {latest.name}")
    return latest


def _is_deepspeed(accelerator: Any) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def read_extra(checkpoint: Path) -> dict[str, torch.Tensor]:

    file = Path(checkpoint) / EXTRA_FILE
    return load_file(str(file)) if file.is_file() else {}


def seal(accelerator: Any, folder: Path) -> None:
    """The run is written: its resume points are spent."""

    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # only when no other run has checkpoints there
    accelerator.wait_for_everyone()



# --------------------------------------------------------------------------- the one loop
def open_accelerator(grad_accum: int, micro_batch_size: int, max_grad_norm: float, dtype: str) -> Any:
    """A recipe's first act: the allocator set before anything touches CUDA, the accelerator, and
    the memory cap a rehearsal of a smaller card asks for (KORMEDGEMMA_GPU_MEMORY_GB)."""
    prefer_expandable_segments()
    accelerator = make_accelerator(grad_accum, micro_batch_size, max_grad_norm, dtype)
    cap_gpu_memory(accelerator.device)
    return accelerator


def prepare_run(accelerator: Any, module: Any, optimizer: Any, scheduler: Any, folder: Path, fingerprint: str,
                enabled: bool, what: str, key: str) -> tuple[Any, Any, Progress, Optional[Path]]:
    """The module and optimizer prepared, the scheduler and a fresh `Progress` registered for
    checkpointing (trainable tensors only), and the newest matching checkpoint loaded: (module,
    optimizer, progress, the checkpoint resumed from or None)."""
    module, optimizer = prepare_module(accelerator, module, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress)
    accelerator.register_save_state_pre_hook(keep_trainable)
    checkpoint = resume(accelerator, module, folder, fingerprint, enabled, what, key)
    return module, optimizer, progress, checkpoint


class Recipe:
    """What a training recipe (a phase-3 stage, phase-4 instruction tuning) brings to `train_loop`;
    the loop does the rest, the same for both: optimizer steps, timing, the curve, evaluations every
    `eval_every` steps and at the end, checkpoints, the crash hook, out-of-memory advice."""

    name: str = "training"  # the progress bar's and the messages' name
    steps: int = 0  # optimizer steps in all
    eval_every: int = 1
    save_every: int = 1
    keep_checkpoints: int = 1
    max_grad_norm: float = 1.0
    show_speed: bool = False  # tokens per second in the progress bar

    def micro_batches(self, step: int, accelerator: Any) -> list[dict[str, torch.Tensor]]:
        """This process's grad_accum micro-batches of optimizer step `step` (0-based): a pure
        function of the step, so a resumed run reads what an uninterrupted one would have."""
        raise NotImplementedError

    def step_tokens(self, batches: Sequence[dict[str, torch.Tensor]], accelerator: Any) -> int:
        """Tokens the step trained on, every process's (`Progress.tokens` counts them)."""
        raise NotImplementedError

    def history_fields(self, step_tokens: int, answer_tokens: int) -> dict[str, Any]:
        """What the recipe adds to each step's curve entry."""
        return {}

    def evaluate(self, step: int) -> Optional[dict[str, Any]]:
        """Figures of the evaluation after `step` (None: nothing to evaluate on)."""
        return None

    def stopped(self) -> bool:
        """True once the recipe has decided to stop early."""
        return False

    def checkpoint_extra(self) -> Optional[dict[str, torch.Tensor]]:
        """Tensors saved beside a checkpoint (phase 4's best adapter so far)."""
        return None

    def out_of_memory(self) -> str:
        """What to change when a step runs out of GPU memory."""
        raise NotImplementedError


def train_loop(recipe: Recipe, accelerator: Any, module: Any, optimizer: Any, scheduler: Any,
               parameters: list[torch.nn.Parameter], progress: Progress, folder: Path, fingerprint: str,
               progress_bar: bool = True) -> None:
    """Optimizer steps from `progress.step` to `recipe.steps` (or the recipe's early stop), each
    timed (the GPU synchronised) and recorded in `progress`; an evaluation every `eval_every` steps
    and after the last; a checkpoint every `save_every` steps before the last, so a kill loses at
    most that many. Out of GPU memory becomes a MemoryError that says what to lower and where a
    re-run resumes. The seconds spent evaluating and checkpointing go to `progress.overhead`: on the
    270M a stage notebook took 30-66 s beyond its training seconds, and these say how much of that
    the loop spends (at 4B a checkpoint with optimizer state is gigabytes)."""
    device = accelerator.device
    bar = tqdm(total=recipe.steps, initial=progress.step, desc=recipe.name, unit="step", mininterval=2.0,
               disable=not (progress_bar and accelerator.is_local_main_process))
    if device.type == "cuda":
        reset_peak_gpu_memory(device)
    module.train()
    try:
        while progress.step < recipe.steps and not recipe.stopped():
            started = time.perf_counter()
            batches = recipe.micro_batches(progress.step, accelerator)
            loss, grad_norm, answer_tokens = optimizer_step(accelerator, module, optimizer, batches, parameters,
                                                            recipe.max_grad_norm)
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            tokens = recipe.step_tokens(batches, accelerator)
            progress.step += 1
            progress.tokens += tokens
            progress.train_seconds += seconds
            progress.history.append({"step": progress.step, "loss": round(loss, 5),
                                     **recipe.history_fields(tokens, answer_tokens),
                                     "lr": float(scheduler.get_last_lr()[0]), "seconds": round(seconds, 4),
                                     "grad_norm": None if grad_norm is None else round(grad_norm, 4)})
            postfix = {"loss": f"{loss:.3f}", **({"tok_s": f"{tokens / seconds:,.0f}"} if recipe.show_speed else {})}
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if progress.step % recipe.eval_every == 0 or progress.step == recipe.steps:
                with progress.timing("eval_seconds"):
                    figures = recipe.evaluate(progress.step)
                if figures is not None:
                    progress.evals.append({"step": progress.step, **figures})
            if progress.step % recipe.save_every == 0 and progress.step < recipe.steps and not recipe.stopped():
                with progress.timing("checkpoint_seconds"):
                    save_checkpoint(accelerator, folder, progress, fingerprint, recipe.keep_checkpoints,
                                    extra=recipe.checkpoint_extra())
            crash_if_asked(progress.step)
    except torch.OutOfMemoryError as error:
        raise MemoryError(f"{recipe.out_of_memory()} Re-running resumes from "
                          f"{latest_checkpoint(folder) or 'the start'}.") from error
    finally:
        bar.close()
