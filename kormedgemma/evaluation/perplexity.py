"""Perplexity on held-out text, comparable across tokenizers.

Per-token perplexity cannot compare the base model with the expanded one: the expanded
tokenizer cuts Korean into fewer, harder tokens, so its per-token loss rises while the model
gets better. Bits per character divide the same total log-loss by the text's characters, which
both tokenizers share; that is the figure to compare. Per-token perplexity is reported beside it.

The held-out documents are sampled across the valid split and read once as text (every tokenizer
needs them: the base model's too) and, for a model with the merged tokenizer, as ids from the
token store (1.04) rather than tokenized again: the same documents, by their positions in the
split, checked by their character counts.
"""
from __future__ import annotations

# The project modules this one uses are imported inside the functions that need them: at the top
# they would take its import from 2.2 s to 2.6 s (measured; docs/ARCHITECTURE.md).
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from config.training_config import ProjectConfig
from kormedgemma.modeling.loss import IGNORE, bits_per_char


@dataclass
class Heldout:
    """Texts sampled from a corpus's valid split, their positions in it, and the token store that
    holds the split tokenized (None: every tokenizer tokenizes the texts)."""

    texts: list[str]
    indices: Optional[list[int]] = None
    store: Any = None          # kormedgemma.data.token_store.TokenStore
    corpus: str = "korean"

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)

    def documents(self, tokenizer: Any) -> tuple[list[np.ndarray], str]:
        """Each text as `<bos> ids <eos>`, read from the token store when it was made with
        `tokenizer`, tokenized otherwise; and which of the two it was."""
        if self.store is not None and self.indices is not None and self.store.matches(tokenizer):
            documents = [np.asarray(d, dtype=np.int64)
                         for d in self.store.documents(self.corpus, "valid", indices=self.indices)]
            stored_chars = self.store.chars(self.corpus, "valid")[self.indices]
            if [len(t) for t in self.texts] != stored_chars.tolist():
                raise ValueError(f"{self.store.folder} does not hold the {self.corpus} valid texts read from the "
                                 "processed corpus (it predates them): rebuild it with "
                                 "phase1_tokenizer/04_tokenize_corpus.ipynb (`python -m kormedgemma run --from 1.04`)")
            return documents, "token store"
        return [np.asarray([tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False),
                            tokenizer.eos_token_id], dtype=np.int64) for t in self.texts], "tokenized"


def read_heldout(corpus: Path, max_texts: int, store: Optional[Path] = None, name: str = "korean",
                 seed: int = 0) -> Heldout:
    """`max_texts` texts sampled across a processed corpus's valid split (one streamed pass, never
    all of it in memory), with the token store folder that holds them under the merged tokenizer."""
    from kormedgemma.data.readers import sample_split
    from kormedgemma.data.token_store import TokenStore

    indices, texts = sample_split(Path(corpus), "valid", max_texts, seed)
    if not texts:
        raise ValueError(f"{corpus} holds no valid text to measure perplexity on")
    return Heldout(texts, indices, TokenStore(store) if store is not None else None, name)


def document_windows(documents: Sequence[Sequence[int]], seq_len: int,
                     stride: Optional[int] = None) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) windows of at most seq_len tokens over `<bos> … <eos>` documents; each token
    after `<bos>` carries a label in exactly one window.

    A document that fits is one window. A longer one is scored `stride` new tokens at a time
    (default seq_len // 2), each window reaching back to give them seq_len - stride tokens or more
    of context (labels -100 on the context), so every scored token sees either its document's
    `<bos>` or that much context, whatever the tokenizer. Windows that restarted cold would charge
    a tokenizer that needs more of them (the base one, on Korean) for contexts it never had."""
    stride = stride or max(1, seq_len // 2)
    if not 1 <= stride <= seq_len - 1:
        raise ValueError(f"stride must be in [1, seq_len - 1] (got {stride} for seq_len {seq_len})")
    windows = []
    for document in documents:
        ids = np.asarray(document).tolist()
        if len(ids) < 2:
            continue
        if len(ids) <= seq_len:
            windows.append((ids, ids))
            continue
        scored = 0  # targets 1..scored are done
        while scored < len(ids) - 1:
            last = min(scored + (seq_len - 1 if scored == 0 else stride), len(ids) - 1)
            first = max(0, last + 1 - seq_len)
            window = ids[first:last + 1]
            labels = [t if first + j > scored else IGNORE for j, t in enumerate(window)]
            windows.append((window, labels))
            scored = last
    return windows


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, heldout: Heldout, seq_len: int = 1024, batch_size: int = 8,
               progress: bool = True, desc: str = "perplexity", stride: Optional[int] = None) -> dict[str, Any]:
    """Total log-loss of every token after each document's `<bos>`, per token and per character
    (windows as `document_windows` cuts them)."""
    from tqdm.auto import tqdm

    from kormedgemma.data.batching import collate
    from kormedgemma.modeling.loss import chunked_causal_lm_loss

    device = next(model.parameters()).device
    documents, ids_from = heldout.documents(tokenizer)
    windows = sorted(document_windows(documents, seq_len, stride), key=lambda w: len(w[0]), reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nats, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = collate(windows[start:start + batch_size], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = chunked_causal_lm_loss(model, batch["input_ids"], labels=batch["labels"],
                                      attention_mask=batch["attention_mask"])
        count = int((batch["labels"][:, 1:] != IGNORE).sum())
        nats += float(loss) * count
        tokens += count
    model.train(was_training)
    chars = heldout.chars
    return {"texts": len(heldout.texts), "chars": chars, "tokens": tokens, "ids_from": ids_from,
            "windows": len(windows), "stride": stride or max(1, seq_len // 2),
            "nll_per_token": round(nats / tokens, 5), "perplexity": round(math.exp(nats / tokens), 3),
            "bits_per_char": bits_per_char(nats, chars)}


def heldout_bits_per_char(model: Any, tokenizer: Any, heldout: dict[str, Heldout], seq_len: int, batch_size: int,
                          progress: bool = True, label: str = "") -> dict[str, float]:
    """`<language>_bits_per_char` of one model on each held-out set (the ablation's and the comparison's row)."""
    return {f"{name}_bits_per_char": perplexity(model, tokenizer, texts, seq_len, batch_size, progress,
                                                 desc=f"{label} {name}".strip())["bits_per_char"]
            for name, texts in heldout.items()}


def read_run_heldout(config: ProjectConfig, max_texts: Optional[int] = None) -> dict[str, Any]:
    """One run's held-out Korean and English texts, as its token store holds them."""
    from kormedgemma.core.artifacts import require

    max_texts = max_texts or config.evaluation.perplexity_max_texts
    store = require(config, "token_store")
    return {language: read_heldout(require(config, language), max_texts, store, language)
            for language in ("korean", "english")}
