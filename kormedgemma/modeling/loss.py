"""Causal-LM loss without a vocabulary-sized logits tensor for the whole batch.

At MedGemma's expanded vocabulary a micro-batch of 2 × 2048 tokens has 1.1 G logits: 2.2 GB in
bf16 and 4.5 GB once upcast for the loss, which alone breaks a 24 GB budget. The decoder runs
once for hidden states; `lm_head` and the cross-entropy then run over chunks of tokens, each
under activation checkpointing, so at most one chunk's logits exist at a time (forward and
backward). The mean equals the model's own loss (over predicted tokens, labels shifted); the
training loops take the sum, so one optimizer step can weight every token of all its
micro-batches equally (`training.loop.optimizer_step`).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kormedgemma.data.batching import IGNORE


def bits_per_char(nats: float, chars: float) -> float:
    """`nats` of loss spent on `chars` characters of text, in bits per character (5 decimals): the
    one loss figure that compares models with different tokenizers."""
    return round(nats / math.log(2) / chars, 5)


def _inner(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _logits(inner: Any, head: Any, states: torch.Tensor) -> torch.Tensor:
    """fp32 logits of some hidden states, soft-capped where the model caps them."""
    logits = head(states).float()
    cap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def chunked_causal_lm_loss(model: Any, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                           attention_mask: Optional[torch.Tensor] = None, chunk_tokens: int = 1024,
                           reduction: str = "mean") -> torch.Tensor:
    inner = _inner(model)
    labels = input_ids if labels is None else labels
    head = inner.get_output_embeddings()
    head_parameters = {id(p) for p in head.parameters()}
    # Stages 2 and 4 train only lm_head rows: nothing upstream needs gradients, so the decoder runs
    # without building a graph (gradient checkpointing hooks would otherwise make its output
    # require grad and pay a full backward for nothing).
    upstream_trains = any(p.requires_grad for p in inner.parameters() if id(p) not in head_parameters)
    with torch.set_grad_enabled(torch.is_grad_enabled() and upstream_trains):
        hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def chunk_loss(states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_logits(inner, head, states), targets, ignore_index=IGNORE, reduction="sum")

    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:].reshape(-1) == 0, IGNORE)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk_tokens):
        piece = states[start:start + chunk_tokens]
        target = targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and piece.requires_grad:
            total = total + checkpoint(chunk_loss, piece, target, use_reentrant=False)
        else:
            total = total + chunk_loss(piece, target)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE).sum().clamp(min=1)


def logit_chunks(model: Any, input_ids: torch.Tensor, chunk_tokens: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, next-token targets) of one sequence, `chunk_tokens` positions at a time: two
    models can be compared token by token without either's full [seq, vocab] logits."""
    inner = _inner(model)
    hidden = inner.model(input_ids=input_ids).last_hidden_state
    head = inner.get_output_embeddings()
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    for start in range(0, states.shape[0], chunk_tokens):
        yield _logits(inner, head, states[start:start + chunk_tokens]), targets[start:start + chunk_tokens]


class CausalLMLoss(torch.nn.Module):
    """The model and its chunked loss (summed over predicted tokens) as one module, so DDP and
    DeepSpeed see the loss computed in their wrapper's forward (gradient hooks and reducer set-up
    depend on it)."""

    def __init__(self, model: Any, chunk_tokens: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return chunked_causal_lm_loss(self.model, input_ids, labels=labels, attention_mask=attention_mask,
                                      chunk_tokens=self.chunk_tokens, reduction="sum")
