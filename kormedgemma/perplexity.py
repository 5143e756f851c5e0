"""Perplexity on held-out text, comparable across tokenizers.

Per-token perplexity cannot compare the base model with the expanded one: the expanded
tokenizer cuts Korean into fewer, harder tokens, so its per-token loss rises while the model
gets better. Bits per character divide the same total log-loss by the text's characters, which
both tokenizers share; that is the figure to compare. Per-token perplexity is reported beside it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch


def heldout_texts(corpus: Path, max_texts: int) -> list[str]:
    """The first `max_texts` texts of a processed corpus's valid split (streamed, never all of it)."""
    from kormedgemma.corpus.readers import read_split

    texts = read_split(Path(corpus), "valid", limit=max_texts)
    if not texts:
        raise ValueError(f"{corpus} holds no valid text to measure perplexity on")
    return texts


def document_windows(tokenizer: Any, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """`<bos> text <eos>` per document, cut into windows of at most seq_len tokens."""
    windows = []
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
        windows.extend(ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len - 1) if len(ids[i:i + seq_len]) >= 2)
    return windows


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], seq_len: int = 1024, batch_size: int = 8,
               progress: bool = True, desc: str = "perplexity") -> dict[str, Any]:
    """Total log-loss of every token after the first of each window, per token and per character."""
    from tqdm.auto import tqdm

    from kormedgemma.corpus.batching import collate
    from kormedgemma.loss import IGNORE, chunked_causal_lm_loss

    device = next(model.parameters()).device
    windows = sorted(document_windows(tokenizer, texts, seq_len), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nats, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = collate([(w, w) for w in windows[start:start + batch_size]], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = chunked_causal_lm_loss(model, batch["input_ids"], labels=batch["labels"],
                                      attention_mask=batch["attention_mask"])
        count = int((batch["labels"][:, 1:] != IGNORE).sum())
        nats += float(loss) * count
        tokens += count
    model.train(was_training)
    chars = sum(len(t) for t in texts)
    return {"texts": len(texts), "chars": chars, "tokens": tokens,
            "nll_per_token": round(nats / tokens, 5), "perplexity": round(math.exp(nats / tokens), 3),
            "bits_per_char": round(nats / math.log(2) / chars, 5)}
