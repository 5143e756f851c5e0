"""EEVE's seven stages as trainable sets, applied to a Gemma 3 model tensor by tensor.

| stage | trainable                                   | frozen                          |
|-------|---------------------------------------------|---------------------------------|
| 1     | input rows of new tokens                    | everything else                 |
| 2     | output (lm_head) rows of new tokens         | everything else                 |
| 3     | input and output rows of new tokens         | everything else                 |
| 4     | all output rows                             | input embeddings, transformer   |
| 5     | new input rows + all output rows            | transformer                     |
| 6     | LoRA on the language model + all embeddings | vision tower, base weights      |
| 7     | LoRA only (cooldown)                        | embeddings, vision tower        |

The vision tower and the multimodal projector never train. New rows train through row deltas
(`kormedgemma.modeling.rows`), so stages 1–3 keep optimizer state for ~10K rows only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from config.training_config import LoraConfig
from kormedgemma.modeling.rows import RowDeltaEmbedding, RowDeltaLinear

Rows = Optional[Literal["new", "all"]]

NEVER_TRAINED = re.compile(r"(vision_tower|multi_modal_projector)")


@dataclass(frozen=True)
class StageSpec:
    number: int
    name: str
    input_rows: Rows
    output_rows: Rows
    lora: bool


STAGES: dict[int, StageSpec] = {s.number: s for s in [
    StageSpec(1, "new input embeddings", "new", None, False),
    StageSpec(2, "new output embeddings", None, "new", False),
    StageSpec(3, "new input and output embeddings", "new", "new", False),
    StageSpec(4, "all output embeddings", None, "all", False),
    StageSpec(5, "new input + all output embeddings", "new", "all", False),
    StageSpec(6, "LoRA + all embeddings", "all", "all", True),
    StageSpec(7, "LoRA only (cooldown)", None, None, True),
]}


def lora_target_modules(model: Any, lora: LoraConfig) -> list[str]:
    """Full names of the language model's linear layers LoRA should wrap (never the vision tower)."""
    import torch

    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules
             and not NEVER_TRAINED.search(name)]
    if not names:
        raise ValueError(f"no linear layer named {lora.target_modules} in the language model")
    return names


def apply_stage(model: Any, spec: StageSpec, first_new_id: int, new_count: int,
                lora: Optional[LoraConfig] = None) -> Any:
    """Freeze everything, then open exactly the stage's set. Returns the model to train
    (a PeftModel for the LoRA stages)."""
    if new_count < 1 and "new" in (spec.input_rows, spec.output_rows):
        raise ValueError("no new tokens: the stage has nothing to train (check phase 1's output)")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if spec.lora:
        if lora is None:
            raise ValueError(f"stage {spec.number} trains LoRA: its config needs a lora block")
        model = with_lora(model, lora)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if spec.input_rows == "new":
        inner.set_input_embeddings(RowDeltaEmbedding(inner.get_input_embeddings(), first_new_id, new_count))
    elif spec.input_rows == "all":
        inner.get_input_embeddings().weight.requires_grad_(True)
    if spec.output_rows == "new":
        inner.set_output_embeddings(RowDeltaLinear(inner.get_output_embeddings(), first_new_id, new_count))
    elif spec.output_rows == "all":
        inner.get_output_embeddings().weight.requires_grad_(True)
    inputs, outputs = inner.get_input_embeddings(), inner.get_output_embeddings()
    # A tied matrix is one tensor: a stage that trains all of both sides trains it once (the
    # baseline without expansion); any other stage would move the side it leaves frozen.
    if outputs.weight.data_ptr() == inputs.weight.data_ptr() and not (spec.input_rows == spec.output_rows == "all"
                                                                      or spec.input_rows == spec.output_rows is None):
        raise ValueError("input embeddings and lm_head share one tensor: run phase 2 (it unties them) — "
                         "training a tied matrix would move both in every stage")
    return model


def with_lora(model: Any, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):  # an adapter already in place (direct API use) keeps training
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        return model
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora_target_modules(model, lora), bias="none")
    return get_peft_model(model, config)


def trainable_parameters(model: Any) -> dict[str, int]:
    """name → element count of every parameter that will receive gradients."""
    return {name: parameter.numel() for name, parameter in model.named_parameters() if parameter.requires_grad}
