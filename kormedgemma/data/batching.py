"""Batches for every training and evaluation loop: packed blocks, their order, padded examples.

Continued pre-training packs documents into full blocks of `seq_len` tokens: every document is
`<bos> … <eos>`, documents follow each other, and the stream is cut into blocks (the tail
shorter than a block is dropped), so no step is spent on padding. The token store holds exactly
that stream, so a block is a slice of a memory map and the corpus never sits in RAM.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# The label of a position no loss is taken on (padding, a prompt): PyTorch's cross-entropy default.
IGNORE = -100


def pack(documents: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int,
         keep_short: bool = False) -> list[list[int]]:
    """Full blocks of a few tokenized documents; with `keep_short`, a stream shorter than one block
    still gives one (shorter) block: an evaluation set smaller than a block is still worth a number."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2 (got {seq_len})")
    stream: list[int] = []
    for ids in documents:
        stream.extend([bos_id, *ids, eos_id])
    blocks = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return [stream] if keep_short and not blocks and len(stream) >= 2 else blocks


def replay_plan(korean_blocks: int, english_blocks: int, english_fraction: float, seed: int) -> list[tuple[int, bool]]:
    """(block index, is English) in training order: every Korean block, plus English blocks making
    up `english_fraction` of the total; a small English corpus repeats, deterministically from `seed`."""
    if korean_blocks < 1:
        raise ValueError("the Korean corpus holds fewer tokens than one block: no training block can be made; "
                         "lower seq_len or add text")
    wanted = round(korean_blocks * english_fraction / (1 - english_fraction)) if english_fraction > 0 else 0
    english: list[int] = []
    if wanted:
        if english_blocks < 1:
            raise ValueError(f"english_replay_fraction={english_fraction} but the English corpus holds fewer "
                             "tokens than one block")
        rng = random.Random(seed)
        english = [i % english_blocks for i in rng.sample(range(max(wanted, english_blocks)), wanted)]
    plan = [(i, False) for i in range(korean_blocks)] + [(i, True) for i in english]
    random.Random(seed + 1).shuffle(plan)
    return plan


@dataclass
class PackedBlocks:
    """Training blocks as views over two token streams (Korean, English) in `replay_plan` order.

    Indexing with a list of block numbers reads just those blocks from the memory maps."""

    korean: np.ndarray  # flat token stream (uint32 memmap)
    english: np.ndarray
    seq_len: int
    order: np.ndarray  # [n] block index within its stream
    is_english: np.ndarray  # [n] bool

    @classmethod
    def build(cls, korean: np.ndarray, english: np.ndarray, seq_len: int, english_fraction: float,
              seed: int) -> "PackedBlocks":
        if seq_len < 2:
            raise ValueError(f"seq_len must be ≥ 2 (got {seq_len})")
        plan = replay_plan(len(korean) // seq_len, len(english) // seq_len, english_fraction, seed)
        return cls(korean, english, seq_len, np.fromiter((i for i, _ in plan), dtype=np.int64, count=len(plan)),
                   np.fromiter((e for _, e in plan), dtype=bool, count=len(plan)))

    def __len__(self) -> int:
        return int(self.order.shape[0])

    @property
    def english_share(self) -> float:
        return float(self.is_english.mean()) if len(self) else 0.0

    @property
    def english_repeats(self) -> float:
        """How often one pass over the blocks shows each English block: above 1, a small English
        corpus is replayed again and again, and held-out English over-fits."""
        shown = int(self.is_english.sum())
        unique = min(len(self.english) // self.seq_len, shown)  # a large English corpus lends only some blocks
        return shown / unique if unique else 0.0

    def __getitem__(self, indices: Sequence[int]) -> torch.Tensor:
        rows = []
        for index in indices:
            stream = self.english if self.is_english[index] else self.korean
            start = int(self.order[index]) * self.seq_len
            rows.append(np.asarray(stream[start:start + self.seq_len], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


def leading_blocks(stream: np.ndarray, seq_len: int, count: int) -> torch.Tensor | None:
    """The first `count` full blocks of a stream (evaluation); a stream shorter than one block gives
    one shorter block, an empty one None."""
    full = min(count, len(stream) // seq_len)
    if full:
        return torch.from_numpy(np.asarray(stream[:full * seq_len], dtype=np.int64).reshape(full, seq_len))
    return torch.from_numpy(np.asarray(stream, dtype=np.int64))[None] if len(stream) >= 2 else None


class BlockOrder:
    """Micro-batch k of a run → block ids. Each pass over the data is a fresh permutation from
    (seed, pass), so the order never depends on how often the process restarted."""

    def __init__(self, count: int, micro_batch: int, seed: int) -> None:
        self.count, self.micro_batch, self.seed = count, micro_batch, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _pass(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            self._cache = {index: torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed * 100_003 + index))}
        return self._cache[index]

    def blocks(self, micro_batch_index: int) -> list[int]:
        first = micro_batch_index * self.micro_batch
        return [int(self._pass(i // self.count)[i % self.count]) for i in range(first, first + self.micro_batch)]


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (-100 on padding) and attention mask."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (tokens, targets) in enumerate(examples):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(targets)] = torch.tensor(targets)
        mask[row, :len(tokens)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
