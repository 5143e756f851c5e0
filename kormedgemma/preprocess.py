"""Phase 0 preprocessing: normalise, filter, deduplicate, decontaminate, split.

Order matters: normalisation first (so duplicates that differ only in Unicode form or spacing
collide), cheap filters before MinHash, and the KorMedMCQA leakage guard last so the count it
reports is the number of real overlaps rather than overlaps of texts that would have been
dropped anyway.
"""
from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm

from config.training_config import PreprocessConfig, ProjectConfig
from kormedgemma.io import read_jsonl, write_jsonl
from kormedgemma.sources import validate_mcqa_row

_CONTROL = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_NO_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFC, no control or zero-width characters, single spaces, trimmed lines, ≤ 2 newlines."""
    text = unicodedata.normalize("NFC", text)
    text = _ZERO_WIDTH.sub("", _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n")))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def hangul_ratio(text: str) -> float:
    """Share of non-space characters that are Hangul (syllables or jamo)."""
    chars = _NO_SPACE.sub("", text)
    return len(_HANGUL.findall(chars)) / len(chars) if chars else 0.0


def _dedup_key(text: str) -> str:
    return hashlib.sha1(_NO_SPACE.sub(" ", text).strip().lower().encode("utf-8")).hexdigest()


def _shingles(text: str, size: int) -> set[bytes]:
    compact = _NO_SPACE.sub(" ", text.lower())
    if len(compact) <= size:
        return {compact.encode("utf-8")}
    return {compact[i:i + size].encode("utf-8") for i in range(len(compact) - size + 1)}


def near_duplicate_flags(texts: list[str], threshold: float, num_perm: int, shingle_chars: int,
                         seed: int = 1) -> list[bool]:
    """True for each text whose MinHash Jaccard estimate with an earlier kept text ≥ threshold."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    flags = []
    for index, text in enumerate(tqdm(texts, desc="near-dup (MinHash)", unit="doc", mininterval=2.0)):
        signature = MinHash(num_perm=num_perm, seed=seed)
        signature.update_batch(list(_shingles(text, shingle_chars)))
        if lsh.query(signature):
            flags.append(True)
            continue
        lsh.insert(str(index), signature)
        flags.append(False)
    return flags


class LeakageIndex:
    """Flags text sharing a long character n-gram with any held-out question (spaces ignored).

    Korean spacing varies between sources, so comparison is on whitespace-free text; questions
    shorter than n must appear whole.
    """

    def __init__(self, questions: Iterable[str], ngram_chars: int) -> None:
        self.n = ngram_chars
        self.grams: set[str] = set()
        self.short: list[str] = []
        for question in questions:
            compact = _NO_SPACE.sub("", normalize_text(question))
            if not compact:
                continue
            if len(compact) < self.n:
                self.short.append(compact)
            else:
                self.grams.update(compact[i:i + self.n] for i in range(len(compact) - self.n + 1))

    def __len__(self) -> int:
        return len(self.grams) + len(self.short)

    def overlaps(self, text: str) -> bool:
        compact = _NO_SPACE.sub("", text)
        if any(q in compact for q in self.short):
            return True
        return any(compact[i:i + self.n] in self.grams for i in range(len(compact) - self.n + 1))


@dataclass
class CleanResult:
    rows: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    examples_dropped: dict[str, list[str]] = field(default_factory=dict)


def clean_corpus(rows: Iterable[dict[str, Any]], spec: PreprocessConfig, korean: bool,
                 leakage: Optional[LeakageIndex] = None) -> CleanResult:
    """Run the filters in order; counts record how many texts survive each stage."""
    result = CleanResult(rows=[])
    stage_counts: dict[str, int] = {}
    dropped: dict[str, list[str]] = {}

    def drop(reason: str, text: str) -> None:
        stage_counts[reason] = stage_counts.get(reason, 0) + 1
        if len(dropped.setdefault(reason, [])) < 3:
            dropped[reason].append(text[:120])

    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    total = 0
    for row in rows:
        total += 1
        text = normalize_text(str(row.get("text", "")))
        if not text:
            drop("empty", text)
            continue
        if not spec.min_chars <= len(text) <= spec.max_chars:
            drop("length", text)
            continue
        if korean and hangul_ratio(text) < spec.min_hangul_ratio:
            drop("hangul_ratio", text)
            continue
        key = _dedup_key(text)
        if key in seen:
            drop("exact_duplicate", text)
            continue
        seen.add(key)
        kept.append({"text": text, "source": row.get("source", "unknown")})
    flags = near_duplicate_flags([r["text"] for r in kept], spec.minhash_threshold, spec.minhash_num_perm,
                                 spec.shingle_chars)
    survivors = []
    for row, is_duplicate in zip(kept, flags):
        if is_duplicate:
            drop("near_duplicate", row["text"])
        elif leakage is not None and leakage.overlaps(row["text"]):
            drop("kormedmcqa_overlap", row["text"])
        else:
            survivors.append(row)
    result.rows = survivors
    result.counts = {"input": total, **{f"dropped_{k}": v for k, v in stage_counts.items()},
                     "kept": len(survivors)}
    result.examples_dropped = dropped
    return result


def split_train_valid(rows: list[dict[str, Any]], valid_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle with a fixed seed and hold out `valid_fraction` (at least one row for valid)."""
    if len(rows) < 2:
        raise ValueError(f"only {len(rows)} text(s) left after cleaning: too few to split into "
                         "train/valid; add data or relax data.preprocess filters")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(len(rows) * valid_fraction))
    valid = [rows[i] for i in sorted(order[:n_valid])]
    train = [rows[i] for i in sorted(order[n_valid:])]
    return train, valid


def read_raw_folder(folder: Path) -> list[dict[str, Any]]:
    files = sorted(Path(folder).glob("*.jsonl"))
    rows = [row for file in files for row in read_jsonl(file)]
    if not rows:
        raise ValueError(f"{folder} holds no text (empty corpus): re-run the collection notebook "
                         "or check data.sources")
    return rows


def length_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    lengths = sorted(len(r["text"]) for r in rows)
    if not lengths:
        return {"docs": 0, "chars": 0}
    return {"docs": len(lengths), "chars": sum(lengths), "mean_chars": round(sum(lengths) / len(lengths), 1),
            "median_chars": lengths[len(lengths) // 2], "p95_chars": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
            "max_chars": lengths[-1]}


def write_split(out_dir: Path, train: list, valid: list) -> None:
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "valid.jsonl", valid)


def heldout_questions(raw_mcqa: Path, splits: Iterable[str] = ("dev", "test")) -> list[str]:
    """Questions (with options) that must never appear in training text."""
    questions = []
    for split in splits:
        for file in sorted(Path(raw_mcqa).glob(f"*/{split}.jsonl")):
            questions.extend(str(row.get("question", "")) for row in read_jsonl(file))
    return [q for q in questions if q.strip()]


def clean_kormedmcqa(raw_mcqa: Path, out_dir: Path, subsets: list[str], splits: list[str]) -> dict[str, Any]:
    """Validate every row; bad ones are counted and listed, never fatal."""
    counts: dict[str, dict[str, int]] = {}
    bad: list[dict[str, Any]] = []
    for subset in subsets:
        counts[subset] = {}
        for split in splits:
            source = Path(raw_mcqa) / subset / f"{split}.jsonl"
            good = []
            for number, row in enumerate(read_jsonl(source), start=1):
                clean, reason = validate_mcqa_row(row, subset)
                if clean is None:
                    bad.append({"file": f"{subset}/{split}.jsonl", "row": number, "reason": reason})
                else:
                    good.append(clean)
            counts[subset][split] = write_jsonl(out_dir / subset / f"{split}.jsonl", good)
    return {"rows": counts, "bad_rows": bad, "total": sum(sum(c.values()) for c in counts.values())}


def plot_length_histogram(corpora: dict[str, list[dict[str, Any]]], path: Optional[Path] = None) -> Any:
    """Histogram of text lengths (characters, log scale) per corpus; saved to `path` if given."""
    import matplotlib

    if path is not None and not _in_notebook():
        matplotlib.use("Agg")  # headless library call: draw to file, never open a window
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import ScalarFormatter

    figure, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 3.2), squeeze=False)
    for axis, (name, rows) in zip(axes[0], corpora.items()):
        lengths = [len(r["text"]) for r in rows] or [1]
        if max(lengths) / min(lengths) > 20:  # web documents span 20 to 20,000 characters: log bins
            axis.hist(lengths, bins=np.geomspace(min(lengths), max(lengths) + 1, 30), color="#4C72B0")
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(ScalarFormatter())
        else:
            axis.hist(lengths, bins=min(30, max(lengths) - min(lengths) + 1), color="#4C72B0")
        axis.set_title(f"{name}: {len(rows):,} texts")
        axis.set_xlabel("characters")
        axis.set_ylabel("texts")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def preprocess_all(config: ProjectConfig) -> dict[str, Any]:
    """Phase 0.04: processed Korean, English and KorMedMCQA artifacts; returns their statistics."""
    from kormedgemma.artifacts import artifact_path, require
    from kormedgemma.manifest import write_artifact

    spec = config.data.preprocess
    raw_korean, raw_english, raw_mcqa = (require(config, k) for k in ("raw_korean", "raw_english", "raw_kormedmcqa"))
    figures: dict[str, Any] = {}

    leakage = LeakageIndex(heldout_questions(raw_mcqa), spec.leakage_ngram_chars)
    for key, raw, korean in (("korean", raw_korean, True), ("english", raw_english, False)):
        inputs = {"raw": raw} if not korean else {"raw": raw, "kormedmcqa_heldout": raw_mcqa}
        with write_artifact(artifact_path(config, key), "0.04", config, ["data.preprocess"], inputs) as out:
            result = clean_corpus(read_raw_folder(raw), spec, korean=korean, leakage=leakage if korean else None)
            train, valid = split_train_valid(result.rows, spec.valid_fraction, spec.seed)
            write_split(out.path, train, valid)
            plot_length_histogram({f"{key} train": train}, out.path / "length_histogram.png")
            out.metrics.update({"filters": result.counts, "train": length_stats(train),
                                "valid": length_stats(valid), "dropped_examples": result.examples_dropped})
        figures[key] = out.metrics

    mcqa = config.data.kormedmcqa
    with write_artifact(artifact_path(config, "kormedmcqa"), "0.04", config, ["data.kormedmcqa"],
                        {"raw": raw_mcqa}) as out:
        out.metrics.update(clean_kormedmcqa(raw_mcqa, out.path, mcqa.subsets, mcqa.splits))
    figures["kormedmcqa"] = out.metrics
    return figures


def statistics_table(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per corpus: how many texts each filter removed and what is left."""
    rows = []
    for key in ("korean", "english"):
        counts = figures[key]["filters"]
        rows.append({"corpus": key, **counts, "train docs": figures[key]["train"]["docs"],
                     "valid docs": figures[key]["valid"]["docs"], "train chars": figures[key]["train"]["chars"],
                     "median chars": figures[key]["train"].get("median_chars")})
    return rows
