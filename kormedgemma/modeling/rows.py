"""Train a block of embedding rows without gradients or optimizer state for the rest.

EEVE's first stages train only the ~10K new rows of 272K. Making the whole matrix trainable
would give AdamW 2 × 272K × 2560 fp32 states (5.6 GB) for rows that must not move, and PEFT's
trainable-token layer rebuilds the full matrix (`index_copy`) on every forward. Here the frozen
matrix stays as it is and a small `delta` parameter holds the trained rows' offsets:

- input rows: `embedding(ids) + embedding(ids − start, delta)` where ids fall in the block,
  then Gemma's sqrt(hidden) scale — the result equals an embedding whose rows are W + delta;
- output rows: a custom autograd function adds `h @ deltaᵀ` into the logits of the block in
  place, so no second vocabulary-sized logits tensor is made (2048 × 272K bf16 is 1.1 GB).

`merge_row_deltas` folds the deltas back into the weights and restores the original modules,
so every stage saves a plain checkpoint that `from_pretrained` loads.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _RowDelta(nn.Module):
    """Shared part: a frozen base module, and an fp32 delta for its rows [start, start + count)."""

    def __init__(self, base: nn.Module, start: int, count: int) -> None:
        super().__init__()
        rows = base.weight.shape[0]
        if not 0 <= start < start + count <= rows:
            raise ValueError(f"rows [{start}, {start + count}) outside a {rows}-row {type(base).__name__}")
        self.base = base
        self.start, self.count = start, count
        base.weight.requires_grad_(False)
        # fp32 even under a bf16 model: small Adam steps on ~0.03-sized rows vanish in bf16 rounding.
        self.delta = nn.Parameter(torch.zeros(count, base.weight.shape[1], dtype=torch.float32,
                                              device=base.weight.device))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def merged(self) -> nn.Module:
        """The base module with the delta folded into its rows."""
        with torch.no_grad():
            self.base.weight[self.start:self.start + self.count] += self.delta.to(self.base.weight.dtype)
        return self.base


class RowDeltaEmbedding(_RowDelta):
    """An embedding whose rows [start, start + n) train through `delta`; all other rows frozen."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        stored = F.embedding(input_ids, self.base.weight, self.base.padding_idx)
        offset = input_ids - self.start
        inside = (offset >= 0) & (offset < self.count)
        extra = F.embedding(offset.clamp(0, self.count - 1), self.delta.to(stored.dtype))
        extra = extra * inside.unsqueeze(-1).to(stored.dtype)
        scale = getattr(self.base, "embed_scale", None)  # Gemma scales after the lookup
        combined = stored + extra
        return combined * scale.to(combined.dtype) if scale is not None else combined


class _RowDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, start: int) -> torch.Tensor:
        logits = F.linear(hidden, weight)
        logits[..., start:start + delta.shape[0]] += F.linear(hidden, delta.to(hidden.dtype))
        ctx.save_for_backward(hidden, weight, delta)
        ctx.start = start
        return logits

    @staticmethod
    def backward(ctx: Any, grad_logits: torch.Tensor):
        hidden, weight, delta = ctx.saved_tensors
        block = grad_logits[..., ctx.start:ctx.start + delta.shape[0]]
        grad_hidden = None
        if ctx.needs_input_grad[0]:  # stages 2 and 4 train nothing upstream: skip the vocab-sized matmul
            grad_hidden = grad_logits @ weight.to(grad_logits.dtype) + block @ delta.to(grad_logits.dtype)
        grad_delta = block.reshape(-1, block.shape[-1]).transpose(0, 1) @ hidden.reshape(-1, hidden.shape[-1]).to(block.dtype)
        return grad_hidden, None, grad_delta.to(delta.dtype), None


class RowDeltaLinear(_RowDelta):
    """An `lm_head` whose rows [start, start + n) train through `delta`; all other rows frozen."""

    def __init__(self, base: nn.Linear, start: int, count: int) -> None:
        if base.bias is not None:
            raise ValueError("lm_head with a bias is not supported (Gemma has none)")
        super().__init__(base, start, count)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _RowDeltaLinear.apply(hidden, self.base.weight, self.delta, self.start)


def merge_row_deltas(model: Any) -> None:
    """Fold every row delta into its weight and put the plain modules back."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, RowDeltaEmbedding):
        model.set_input_embeddings(embedding.merged())
    head = model.get_output_embeddings()
    if isinstance(head, RowDeltaLinear):
        model.set_output_embeddings(head.merged())
