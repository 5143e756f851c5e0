"""Packed causal-LM blocks from Korean text, with an English replay share against forgetting.

Every document becomes `<bos> … <eos>`, documents are concatenated and cut into blocks of
`seq_len` tokens (the tail shorter than a block is dropped), so no step is spent on padding.
English blocks are mixed in at `english_fraction` of the result; when the English corpus is
smaller than that share needs, its blocks repeat (deterministically, from `seed`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch


def pack(documents: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int,
         keep_short: bool = False) -> list[list[int]]:
    """Full blocks; with `keep_short`, a stream shorter than one block still gives one (shorter)
    block — an evaluation set smaller than a block is still worth a number."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2 (got {seq_len})")
    stream: list[int] = []
    for ids in documents:
        stream.extend([bos_id, *ids, eos_id])
    blocks = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return [stream] if keep_short and not blocks and len(stream) >= 2 else blocks


@dataclass
class PackedData:
    blocks: torch.Tensor  # [n, seq_len] token ids
    is_english: torch.Tensor  # [n] bool

    def __len__(self) -> int:
        return self.blocks.shape[0]


def build_blocks(tokenizer: Any, korean: Sequence[str], english: Sequence[str], seq_len: int,
                 english_fraction: float, seed: int) -> PackedData:
    """Shuffled blocks: Korean ones, plus English ones making up `english_fraction` of the total."""
    encode = lambda texts: [tokenizer.encode(t, add_special_tokens=False) for t in texts]  # noqa: E731
    korean_blocks = pack(encode(korean), seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if not korean_blocks:
        raise ValueError(f"the Korean corpus holds fewer than {seq_len} tokens: no training block can be made; "
                         "lower seq_len or add text")
    english_blocks: list[list[int]] = []
    wanted = round(len(korean_blocks) * english_fraction / (1 - english_fraction)) if english_fraction > 0 else 0
    if wanted:
        available = pack(encode(english), seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
        if not available:
            raise ValueError(f"english_replay_fraction={english_fraction} but the English corpus holds fewer "
                             f"than {seq_len} tokens")
        rng = random.Random(seed)
        english_blocks = [available[i % len(available)] for i in rng.sample(range(max(wanted, len(available))), wanted)]
    blocks = [(b, False) for b in korean_blocks] + [(b, True) for b in english_blocks]
    random.Random(seed + 1).shuffle(blocks)
    return PackedData(torch.tensor([b for b, _ in blocks], dtype=torch.long),
                      torch.tensor([e for _, e in blocks], dtype=torch.bool))
