"""Phase 0's cleaning steps as datatrove pipeline steps.

datatrove runs a list of steps over sharded input on a local process pool, or unchanged on
Slurm/Ray for a corpus that outgrows one machine; every step here sees one document at a time,
so a worker's memory does not grow with the corpus. `preprocess.py` assembles these into the
reader → clean → MinHash → leakage → split → writer pipeline.

Steps are plain classes at module level so the executor can pickle them into its workers.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Optional

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.word_tokenizers import WordTokenizer

from kormedgemma.data.readers import SPLITS
from kormedgemma.data.text import hangul_ratio, normalize_text, split_document


class Normalize(PipelineStep):
    """NFC, control/zero-width characters out, spaces collapsed; documents left empty are dropped."""

    name = "normalise"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                self.stat_update("total")
                doc.text = normalize_text(doc.text)
                if not doc.text:
                    self.stat_update("dropped_empty")
                    continue
            yield doc


class SplitLong(PipelineStep):
    """Documents longer than `max_chars` become several (paragraph, then sentence boundaries)."""

    name = "split long documents"
    type = "✂️ - FORMAT"

    def __init__(self, max_chars: int, min_chars: int) -> None:
        super().__init__()
        self.max_chars, self.min_chars = max_chars, min_chars

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            if len(doc.text) <= self.max_chars:
                yield doc
                continue
            with self.track_time():
                pieces = split_document(doc.text, self.max_chars, self.min_chars)
            self.stat_update("split_documents")
            self.stat_update("pieces", value=len(pieces))
            for index, piece in enumerate(pieces):
                yield Document(text=piece, id=f"{doc.id}#{index}", metadata=dict(doc.metadata))


class MinLength(BaseFilter):
    name = "min length"

    def __init__(self, min_chars: int, exclusion_writer: Optional[DiskWriter] = None) -> None:
        super().__init__(exclusion_writer)
        self.min_chars = min_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return len(doc.text) >= self.min_chars or (False, "length")


class HangulShare(BaseFilter):
    """Korean corpora only: drops English or code pages that slipped into a Korean source."""

    name = "hangul share"

    def __init__(self, min_ratio: float, exclusion_writer: Optional[DiskWriter] = None) -> None:
        super().__init__(exclusion_writer)
        self.min_ratio = min_ratio

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return hangul_ratio(doc.text) >= self.min_ratio or (False, "hangul_ratio")


class Leakage(BaseFilter):
    """Drops documents that hold a KorMedMCQA held-out question; the dropped ones, with the
    question they matched, go to the exclusion writer so a person can read what was removed."""

    name = "kormedmcqa leakage"

    def __init__(self, index, exclusion_writer: Optional[DiskWriter] = None) -> None:
        super().__init__(exclusion_writer)
        self.index = index

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        match = self.index.match(doc.text)
        if match is None:
            return True
        doc.metadata.update({"question": match.question.text, "question_source": match.question.source,
                             "share": round(match.share, 3), "excerpt": match.excerpt})
        return False, "kormedmcqa_overlap"


class TagSplit(PipelineStep):
    """Marks each document train or valid from a hash of its text.

    A hash, not a shuffle: the split of a document never depends on how many workers ran, on the
    order shards finished, or on the rest of the corpus, so it needs no global state at all."""

    name = "train/valid split"
    type = "🔀 - SPLIT"

    def __init__(self, valid_fraction: float, seed: int, train_share: float = 1.0) -> None:
        super().__init__()
        self.valid_fraction, self.seed, self.train_share = valid_fraction, seed, train_share

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            split = split_of(doc.text, self.valid_fraction, self.seed, self.train_share)
            self.stat_update(split or "unused")
            if split is None:
                continue
            doc.metadata["split"] = split
            yield doc


def split_of(text: str, valid_fraction: float, seed: int, train_share: float = 1.0) -> Optional[str]:
    """'valid' or 'train' from the text's hash; None for a train document beyond `train_share` of
    the train split. The hash decides all three, so a smaller share keeps the same held-out
    documents and a subset of the larger share's training documents: a corpus-size sweep whose
    runs differ only in how much they train on."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=seed.to_bytes(8, "little")).digest()
    position = int.from_bytes(digest, "little") / 2 ** 64
    if position < valid_fraction:
        return "valid"
    return "train" if (position - valid_fraction) / (1 - valid_fraction) < train_share else None


class RecordLengths(PipelineStep):
    """Writes each task's document lengths (characters, uint32, per split) for the statistics
    table and histogram: 4 bytes a document instead of a second pass over the text."""

    name = "record lengths"
    type = "📊 - STATS"

    def __init__(self, output_folder: DataFolderLike) -> None:
        super().__init__()
        self.output_folder = get_datafolder(output_folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        lengths = {split: array("I") for split in SPLITS}
        for doc in data:
            lengths[doc.metadata.get("split", "train")].append(len(doc.text))
            yield doc
        for split, values in lengths.items():
            with self.output_folder.open(f"{split}_{rank:05d}.u32", "wb") as handle:
                handle.write(values.tobytes())


class WhitespaceWords(WordTokenizer):
    """Words = runs between whitespace. Korean writes spaces between eojeol, so word n-grams
    work for it as for English, without the morphological analyser (kiwipiepy) datatrove would
    otherwise load for Korean."""

    def __init__(self) -> None:
        super().__init__("multilingual")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [line for line in text.split("\n") if line.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, position = [], 0
        for word in text.split():
            start = text.index(word, position)
            spans.append((start, start + len(word)))
            position = start + len(word)
        return spans


def row_adapter(_self, document: Document) -> dict:
    """What the processed JSONL holds: the schema later phases read."""
    return {"text": document.text, "source": document.metadata.get("source", "unknown")}


def leak_adapter(_self, document: Document) -> dict:
    return {"text": document.text[:500], "source": document.metadata.get("source", "unknown"),
            **{k: document.metadata.get(k) for k in ("question", "question_source", "share", "excerpt")}}
