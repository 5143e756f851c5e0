"""What a training recipe returns and writes as `metrics.json`, as typed records.

A stage's and the instruction tuning's metrics are read back by the report's headlines, the loss
plots, `compare`'s curves, the notebooks and the benchmark collectors, long after the process that
wrote them: these records name every key they may hold, so a reader (and a type checker) sees
what a metrics file is without finding the code that wrote it. They are `TypedDict`s, not
dataclasses, because the same objects are JSON on disk and in the manifests: reading one back is
`json.loads`, and older files (a key added since) stay readable.
"""
from __future__ import annotations

from typing import Optional, TypedDict


class StepRecord(TypedDict, total=False):
    """One optimizer step of the curve (`Progress.history`)."""

    step: int
    loss: float  # mean loss per predicted token of the step
    tokens: int  # instruction tuning: prompt and answer tokens, padding excluded
    answer_tokens: int  # instruction tuning: the tokens the loss scored
    lr: float
    seconds: float  # the step's wall time, the GPU synchronised (the first includes compilation)
    grad_norm: Optional[float]


class EvalRecord(TypedDict, total=False):
    """One evaluation (`Progress.evals`): a stage's valid blocks, or phase 4's dev loss."""

    step: int
    korean_valid_loss: Optional[float]  # nats per token of the run's own tokenizer
    english_valid_loss: Optional[float]
    korean_valid_bits_per_char: float  # the same, per character: comparable across tokenizers
    english_valid_bits_per_char: float
    dev_loss: Optional[float]


class TrainingMetrics(TypedDict, total=False):
    """What both recipes record of their run."""

    steps: int
    tokens: int
    epochs: float
    first_loss: Optional[float]
    last_loss: Optional[float]
    tokens_per_second: Optional[float]  # the first step (warm-up, compilation) left out
    train_seconds: float
    # seconds besides the optimizer steps, summed over a resumed run's processes like train_seconds
    eval_seconds: float
    checkpoint_seconds: float
    trainable_parameters: int
    processes: int
    distributed: str  # single, ddp or deepspeed-zero<stage>
    device: str
    peak_gpu_allocated_gb: float
    peak_gpu_reserved_gb: float
    peak_rss_gb: float  # on the CPU, instead of the GPU's
    resumed_from: Optional[str]  # the checkpoint folder the run continued from
    history: list[StepRecord]
    evals: list[EvalRecord]


class StageMetrics(TrainingMetrics, total=False):
    """A phase-3 stage's `metrics.json` (`training.stage.train_stage`, `read_metrics`)."""

    stage: int
    name: str
    skipped: str  # why a stage did not train (no new rows without expansion); steps is then 0
    train_blocks: int
    english_share: float
    valid_tokens_per_char: dict[str, float]  # per language, of the valid blocks' predicted tokens
    setup_seconds: float  # load, earlier stages' rows, data, resume: before the first evaluation
    notices: list[str]


class InstructMetrics(TrainingMetrics, total=False):
    """Phase 4's `metrics.json` (`training.instruct.train_instruct`, `read_instruct_metrics`)."""

    examples: int
    examples_per_source: dict[str, int]
    dev_examples: int
    refused_leakage: list[dict[str, object]]  # each refused example: source, row, its text's start
    too_long: int
    planned_steps: int
    stopped_early: bool
    best_step: int
    best_dev_loss: Optional[float]
