"""The ordered notebooks of the pipeline, with what each reads and writes.

The runner uses this table to select steps (`--from`/`--to`), to decide whether a step is fresh
(every output's manifest matches), and to fail before starting a step whose inputs are missing.
Later phases append their notebooks here as they are built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from config.training_config import ConfigError
from kormedgemma.core.artifacts import NOTEBOOKS
from kormedgemma.core.config import ProjectConfig
from kormedgemma.modeling.base_model import builds_base
from kormedgemma.training.stages import STAGES


@dataclass(frozen=True)
class Step:
    id: str
    notebook: str  # path from the repo root
    title: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    # Outputs/inputs that exist only on profiles that build a local base model (models/base).
    tiny_only_outputs: tuple[str, ...] = field(default=())
    tiny_only_inputs: tuple[str, ...] = field(default=())

    def outputs_for(self, config: ProjectConfig) -> tuple[str, ...]:
        return self.outputs + (self.tiny_only_outputs if builds_base(config) else ())

    def inputs_for(self, config: ProjectConfig) -> tuple[str, ...]:
        return self.inputs + (self.tiny_only_inputs if builds_base(config) else ())


STEPS: tuple[Step, ...] = (
    Step("0.00", NOTEBOOKS["0.00"],
         "environment check; builds the base model where the profile does", tiny_only_outputs=("base_model",)),
    Step("0.01", NOTEBOOKS["0.01"], "data sources and licences"),
    Step("0.02", NOTEBOOKS["0.02"],
         "collect Korean, English and KorMedMCQA", outputs=("raw_korean", "raw_english", "raw_kormedmcqa")),
    Step("0.03", NOTEBOOKS["0.03"],
         "Korean-English medical dictionary", outputs=("dictionary",)),
    Step("0.04", NOTEBOOKS["0.04"], "clean, deduplicate, split",
         inputs=("raw_korean", "raw_english", "raw_kormedmcqa"), outputs=("korean", "english", "kormedmcqa")),
    Step("1.01", NOTEBOOKS["1.01"], "train the Korean SentencePiece model",
         inputs=("korean",), outputs=("korean_sp",)),
    Step("1.02", NOTEBOOKS["1.02"], "count and filter new Korean pieces",
         inputs=("korean", "korean_sp"), outputs=("new_tokens",), tiny_only_inputs=("base_model",)),
    Step("1.03", NOTEBOOKS["1.03"], "merge the pieces into the Gemma 3 tokenizer",
         inputs=("korean", "english", "korean_sp", "new_tokens"), outputs=("merged_tokenizer",),
         tiny_only_inputs=("base_model",)),
    Step("1.04", NOTEBOOKS["1.04"], "tokenize the corpora once (the token store)",
         inputs=("merged_tokenizer", "korean", "english"), outputs=("token_store",)),
    Step("2.01", NOTEBOOKS["2.01"], "untie lm_head and resize the embeddings",
         inputs=("merged_tokenizer",), outputs=("resized_model",), tiny_only_inputs=("base_model",)),
    Step("2.02", NOTEBOOKS["2.02"], "initialise the new rows (EEVE/WECHSEL)",
         inputs=("resized_model", "korean", "english", "dictionary"), outputs=("initialized_model",)),
    *(Step(f"3.0{n}", NOTEBOOKS[f"3.0{n}"], f"EEVE stage {n}: {STAGES[n].name}",
           inputs=("initialized_model", "token_store", *(f"stage{k}" for k in range(1, n))),
           outputs=(f"stage{n}",) + (("merged_model",) if n == 7 else ()))
      for n in range(1, 8)),
    Step("4.01", NOTEBOOKS["4.01"], "instruction tuning on KorMedMCQA",
         inputs=("merged_model", "kormedmcqa"), outputs=("instruct_model",)),
    Step("5.01", NOTEBOOKS["5.01"], "KorMedMCQA, perplexity, tokenizer efficiency",
         inputs=("merged_model", "instruct_model", "kormedmcqa", "korean", "token_store"), outputs=("eval_korean",),
         tiny_only_inputs=("base_model",)),
    Step("5.02", NOTEBOOKS["5.02"], "English medical retention",
         inputs=("instruct_model", "english", "token_store"), outputs=("eval_english",), tiny_only_inputs=("base_model",)),
    Step("6.01", NOTEBOOKS["6.01"], "W4A16 AWQ quantisation, bf16 vs 4-bit, memory plan",
         inputs=("instruct_model", "token_store", "korean", "kormedmcqa"), outputs=("awq_model",)),
    Step("6.02", NOTEBOOKS["6.02"], "serve the 4-bit model and ask it a question",
         inputs=("awq_model",), outputs=("serve_check",)),
)


def step_by_id(step_id: str) -> Step:
    for step in STEPS:
        if step.id == step_id:
            return step
    raise ConfigError(f"unknown notebook id {step_id!r}; known: {', '.join(s.id for s in STEPS)}")


def select_steps(start: str | None = None, stop: str | None = None) -> list[Step]:
    """Steps from `start` to `stop` inclusive, in pipeline order."""
    ids = [s.id for s in STEPS]
    first = ids.index(step_by_id(start).id) if start else 0
    last = ids.index(step_by_id(stop).id) if stop else len(ids) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    return list(STEPS[first:last + 1])
