"""Readers of the processed corpora: `data/processed/<corpus>/<split>/<shard>.jsonl`.

Phase 0 writes each split as shards (one per datatrove task), so readers take a corpus folder
and a split name and stream the shards in order. A single `<split>.jsonl` file (the layout of
earlier versions, and of small hand-made test folders) is read the same way.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Iterator, Optional

from kormedgemma.core.io import MissingArtifactError, read_jsonl

# The processed corpora's splits, as phase 0 writes them and every later reader expects them.
SPLITS = ("train", "valid")


def split_files(folder: Path, split: str) -> list[Path]:
    """The JSONL shards of one split, in order; an error names what was looked for."""
    folder = Path(folder)
    single = folder / f"{split}.jsonl"
    if single.is_file():
        return [single]
    shards = sorted((folder / split).glob("*.jsonl")) if (folder / split).is_dir() else []
    if not shards:
        raise MissingArtifactError(f"{folder} has no {split} text ({folder / split}/*.jsonl or {single}): "
                                   "re-run phase0_data_preparation/04_preprocess_data.ipynb")
    return shards


def split_path(folder: Path, split: str) -> Path:
    """The file or folder holding one split: what a manifest hashes as that input."""
    files = split_files(folder, split)
    return files[0] if files[0].name == f"{split}.jsonl" else files[0].parent


def iter_split(folder: Path, split: str, field: str = "text") -> Iterator[str]:
    """The non-empty texts of one split, streamed shard by shard."""
    for file in split_files(folder, split):
        yield from iter_corpus(file, field)


def read_split(folder: Path, split: str, limit: Optional[int] = None, field: str = "text") -> list[str]:
    """The first `limit` texts of a split (all when None) as a list: for small held-out sets only."""
    return list(itertools.islice(iter_split(folder, split, field), limit))


def sample_split(folder: Path, split: str, count: int, seed: int = 0,
                 field: str = "text") -> tuple[list[int], list[str]]:
    """`count` texts drawn uniformly from the whole split (reservoir sampling, one pass, memory of
    `count` texts), returned in corpus order with their positions in the split.

    The first texts of a split are not a sample: phase 0 writes one shard per raw shard, so they
    all come from the first source (at `a5000`, one web crawl out of three sources)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for index, text in enumerate(iter_split(folder, split, field)):
        if index < count:
            reservoir.append((index, text))
        else:
            slot = rng.randint(0, index)
            if slot < count:
                reservoir[slot] = (index, text)
    reservoir.sort()
    return [i for i, _ in reservoir], [t for _, t in reservoir]


def iter_corpus(path: Path, field: str = "text") -> Iterator[str]:
    """The non-empty texts of one JSONL file, streamed."""
    for row in read_jsonl(path):
        text = row.get(field)
        if isinstance(text, str) and text.strip():
            yield text


def read_texts(path: Path, field: str = "text") -> list[str]:
    """Texts of a .jsonl (field `text`) or a plain text file (one text a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    if path.suffix == ".jsonl":
        return list(iter_corpus(path, field))
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
