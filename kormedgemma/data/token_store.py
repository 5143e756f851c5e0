"""The token store: the processed corpora as token ids under the merged tokenizer, made once.

Seven stages, their resumes, every DDP rank, the evaluation loss and AWQ calibration all read the
same corpus under the same tokenizer; tokenizing it for each of them would cost hours of CPU and
tens of GB of Python ints each time (nanoGPT's `prepare.py` lesson). Step 1.04 tokenizes every
processed split once, in batches through the fast tokenizer (Rust, on every core), and writes
per corpus and split:

- `<corpus>/<split>.ids`: uint32, every document as `<bos> … <eos>`, back to back (exactly the
  stream packing cuts into blocks, so a block is a slice of a memory map);
- `<corpus>/<split>.offsets`: uint64, where each document starts (documents + 1 entries);
- `<corpus>/<split>.chars`: uint32, each document's characters (bits per character need them);
- `store.json`: the tokenizer's fingerprint, `bos`/`eos`, and counts per part.

A reader checks the fingerprint against the tokenizer it will feed the model, so a store made
under another tokenizer is never read silently.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.manifest import write_artifact
from kormedgemma.data.readers import SPLITS, iter_split

STORE_FILE = "store.json"
ID_DTYPE = np.uint32


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's serialised pipeline (vocabulary, merges, normaliser) and specials."""
    backend = tokenizer.backend_tokenizer
    digest = hashlib.sha256(backend.to_str().encode("utf-8"))
    digest.update(f"{tokenizer.bos_token_id},{tokenizer.eos_token_id}".encode())
    return digest.hexdigest()


@dataclass
class PartStats:
    docs: int = 0
    tokens: int = 0
    chars: int = 0
    megabytes: float = 0.0


def _batches(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Batches of at most `max_docs` texts and about `max_chars` characters: enough texts for the
    fast tokenizer to use every core, few enough that a batch of long documents and its encodings
    stay a few hundred MB."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def write_part(tokenizer: Any, texts: Iterable[str], out_prefix: Path, batch_docs: int = 1024,
               progress: Any = None, batch_chars: int = 2_000_000) -> PartStats:
    """Tokenize `texts` into `<prefix>.ids/.offsets/.chars`, a batch at a time (memory flat)."""
    backend = tokenizer.backend_tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stats = PartStats()
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out_prefix}.ids", "wb") as ids_file, open(f"{out_prefix}.offsets", "wb") as offsets_file, \
            open(f"{out_prefix}.chars", "wb") as chars_file:
        np.zeros(1, dtype=np.uint64).tofile(offsets_file)
        for batch in _batches(texts, batch_docs, batch_chars):
            encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) + 2 for e in encodings), dtype=np.uint64, count=len(encodings))
            total = int(lengths.sum())
            flat = np.fromiter(itertools.chain.from_iterable(itertools.chain((bos,), e.ids, (eos,)) for e in encodings),
                               dtype=ID_DTYPE, count=total)
            flat.tofile(ids_file)
            (stats.tokens + np.cumsum(lengths)).astype(np.uint64).tofile(offsets_file)
            chars = np.fromiter((len(t) for t in batch), dtype=np.uint32, count=len(batch))
            chars.tofile(chars_file)
            stats.docs += len(batch)
            stats.tokens += total
            stats.chars += int(chars.sum(dtype=np.int64))
            stats.megabytes += sum(len(t.encode("utf-8")) for t in batch) / 1e6
            if progress is not None:
                progress.update(len(batch))
    return stats


def build_token_store(tokenizer: Any, corpora: dict[str, Path], out_dir: Path, batch_docs: int = 1024,
                      progress: bool = True) -> dict[str, Any]:
    """Tokenize every split of every corpus folder (`kormedgemma.data.readers` layout) into `out_dir`."""
    from tqdm.auto import tqdm


    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no <bos>/<eos> token: the token store frames every document with them")
    parts: dict[str, Any] = {}
    started = time.perf_counter()
    for name, folder in corpora.items():
        for split in SPLITS:
            with tqdm(desc=f"tokenize {name}/{split}", unit="doc", disable=not progress, mininterval=2.0) as bar:
                part_started = time.perf_counter()
                stats = write_part(tokenizer, iter_split(folder, split), out_dir / name / split, batch_docs, bar)
            if stats.docs == 0:
                raise ValueError(f"{folder}: the {split} split holds no text to tokenize (re-run phase 0.04)")
            seconds = time.perf_counter() - part_started
            parts[f"{name}/{split}"] = {**stats.__dict__, "megabytes": round(stats.megabytes, 3),
                                        "seconds": round(seconds, 2),
                                        "mb_per_second": round(stats.megabytes / seconds, 2) if seconds else None}
    store = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
             "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "dtype": "uint32",
             "framing": "<bos> document <eos>, concatenated", "parts": parts,
             "seconds": round(time.perf_counter() - started, 2)}
    (out_dir / STORE_FILE).write_text(json.dumps(store, indent=1), encoding="utf-8")
    return store


class TokenStore:
    """Read access to a token store folder: memory-mapped streams, document offsets and lengths."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        meta = self.folder / STORE_FILE
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} not found: build the token store with "
                                    "phase1_tokenizer/04_tokenize_corpus.ipynb (or `python -m kormedgemma run --to 1.04`)")
        self.meta = json.loads(meta.read_text(encoding="utf-8"))
        self.bos_id, self.eos_id = int(self.meta["bos_id"]), int(self.meta["eos_id"])

    def matches(self, tokenizer: Any) -> bool:
        """Whether the store was made with this tokenizer (a slow tokenizer never matches)."""
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            return False
        return tokenizer_fingerprint(tokenizer) == self.meta["tokenizer_fingerprint"]

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the one the store was made with."""
        if not self.matches(tokenizer):
            raise ValueError(f"{self.folder} was tokenized with another tokenizer than the model's "
                             f"(vocabulary {self.meta['vocab_size']} vs {len(tokenizer)}): rebuild it with "
                             "phase1_tokenizer/04_tokenize_corpus.ipynb (`python -m kormedgemma run --from 1.04`)")

    def _file(self, corpus: str, split: str, suffix: str) -> Path:
        if f"{corpus}/{split}" not in self.meta["parts"]:
            raise KeyError(f"{self.folder} has no {corpus}/{split}; it holds {sorted(self.meta['parts'])}")
        return self.folder / corpus / f"{split}.{suffix}"

    def stream(self, corpus: str, split: str) -> np.ndarray:
        """The whole split as one flat uint32 memory map: `<bos> doc <eos> <bos> doc <eos> …`."""
        file = self._file(corpus, split, "ids")
        return np.memmap(file, dtype=ID_DTYPE, mode="r") if file.stat().st_size else np.zeros(0, dtype=ID_DTYPE)

    def offsets(self, corpus: str, split: str) -> np.ndarray:
        return np.memmap(self._file(corpus, split, "offsets"), dtype=np.uint64, mode="r")

    def chars(self, corpus: str, split: str) -> np.ndarray:
        file = self._file(corpus, split, "chars")
        return np.memmap(file, dtype=np.uint32, mode="r") if file.stat().st_size else np.zeros(0, dtype=np.uint32)

    def prefix_chars(self, corpus: str, split: str, tokens: int) -> float:
        """Characters of text in the stream's first `tokens` ids: whole documents exactly, the one
        the cut falls in by its share of tokens. The evaluation blocks are such a prefix
        (`batching.leading_blocks`), and their loss per token times tokens per character is bits
        per character, the one figure that compares across tokenizers."""
        offsets, chars = self.offsets(corpus, split), self.chars(corpus, split)
        if tokens <= 0 or not len(chars):
            return 0.0
        whole = int(np.searchsorted(offsets[1:], tokens, side="right"))  # documents ending within the prefix
        total = float(chars[:whole].sum(dtype=np.int64))
        if whole < len(chars):
            start, end = int(offsets[whole]), int(offsets[whole + 1])
            total += float(chars[whole]) * (tokens - start) / (end - start)
        return total

    def tokens_for_chars(self, corpus: str, split: str, chars: float) -> int:
        """The inverse of `prefix_chars`: how many leading ids hold the split's first `chars`
        characters (all of it when the split is shorter)."""
        offsets, lengths = self.offsets(corpus, split), self.chars(corpus, split)
        if chars <= 0 or not len(lengths):
            return 0
        ends = np.cumsum(lengths, dtype=np.int64)
        whole = int(np.searchsorted(ends, chars, side="right"))  # documents wholly within `chars`
        if whole >= len(lengths):
            return int(offsets[-1])
        done = float(ends[whole - 1]) if whole else 0.0
        start, end = int(offsets[whole]), int(offsets[whole + 1])
        return start + round((chars - done) / float(lengths[whole]) * (end - start))

    def documents(self, corpus: str, split: str, limit: Optional[int] = None,
                  indices: Optional[Sequence[int]] = None) -> Iterator[np.ndarray]:
        """Each document's ids, `<bos>` and `<eos>` included: the first `limit` in corpus order, or
        those at `indices` (positions in the split, as `readers.sample_split` returns them)."""
        stream, offsets = self.stream(corpus, split), self.offsets(corpus, split)
        total = len(offsets) - 1
        if indices is None:
            indices = range(total if limit is None else min(limit, total))
        for index in indices:
            if not 0 <= index < total:
                raise IndexError(f"{self.folder}: {corpus}/{split} holds {total} documents, not {index + 1}")
            yield stream[int(offsets[index]):int(offsets[index + 1])]

    def summary(self) -> list[dict[str, Any]]:
        """One row per corpus/split: documents, tokens, characters, MB, speed, tokens per character."""
        return [{"part": part, **figures,
                 "tokens_per_char": round(figures["tokens"] / figures["chars"], 3) if figures["chars"] else None}
                for part, figures in self.meta["parts"].items()]


def token_store_artifact(config: Any, progress: bool = True) -> dict[str, Any]:
    """1.04: data/tokens/ from the processed corpora and the merged tokenizer."""
    from transformers import AutoTokenizer


    tokenizer_dir = require(config, "merged_tokenizer")
    corpora = {"korean": require(config, "korean"), "english": require(config, "english")}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError(f"{tokenizer_dir} does not load as a fast tokenizer (tokenizer.json): re-run 1.03")
    with write_artifact(artifact_path(config, "token_store"), "1.04", config, [],
                        {"merged_tokenizer": tokenizer_dir, **corpora}) as out:
        store = build_token_store(tokenizer, corpora, out.path, progress=progress)
        out.metrics.update({"parts": store["parts"], "seconds": store["seconds"],
                            "tokenizer_fingerprint": store["tokenizer_fingerprint"]})
    return store


def token_store_headline(metrics: dict[str, Any]) -> str:
    """1.04's line: documents and tokens per part."""
    parts = metrics.get("parts", {})
    return "; ".join(f"{part}: {figures.get('docs', 0):,} docs, {figures.get('tokens', 0):,} tokens"
                     for part, figures in parts.items()) + f" (tokenized in {metrics.get('seconds')} s)"
