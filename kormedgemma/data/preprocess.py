"""Phase 0.04 preprocessing on datatrove: normalise, split, filter, deduplicate, decontaminate, split.

A real run cleans ~8 billion characters, more than a workstation's RAM. datatrove runs the steps
(`kormedgemma.data.cleaning`) over the raw shards on every local core, one document at a time, and
the MinHash near-duplicate search as its four sharded stages (signatures → buckets → clusters →
filter) that spill to disk instead of holding an LSH index of the corpus in memory. The same
pipeline runs on Slurm or Ray by swapping `LocalPipelineExecutor` for datatrove's
`SlurmPipelineExecutor`/`RayPipelineExecutor` (see README, "Phase 0 on a cluster").

Order matters: normalisation first (so duplicates that differ only in Unicode form or spacing
collide), long documents split before the length filter (so they are kept, in pieces), cheap
filters before MinHash, and the KorMedMCQA leakage guard after deduplication so the count it
reports is the number of real overlaps rather than overlaps of texts dropped anyway.

Output: `data/processed/<corpus>/{train,valid}/<shard>.jsonl` of `{"text", "source"}`, read by
later phases through `kormedgemma.data.readers`.
"""
from __future__ import annotations

# The project modules this one uses are imported inside the functions that need them: at the top
# they would take its import from 0.30 s to 0.74 s (each datatrove worker imports it) (measured; docs/ARCHITECTURE.md).
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from config.training_config import PreprocessConfig, ProjectConfig
from kormedgemma.core.io import read_jsonl, write_jsonl
from kormedgemma.data.readers import SPLITS
from kormedgemma.data.sources import validate_mcqa_row

WORK_DIR = "data/processed/.work"
LEAKS_FILE = "leaks.jsonl"


@dataclass
class CleanResult:
    """Counts per filter, length statistics per split, and the documents the leakage guard removed."""

    counts: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    leaks: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def stats(self, split: str) -> dict[str, float]:
        return length_stats(self.lengths.get(split, np.zeros(0, dtype=np.uint32)))


def raw_shards(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*.jsonl") if p.is_file())
    if not files or all(p.stat().st_size == 0 for p in files):
        raise ValueError(f"{folder} holds no text (empty corpus): re-run the collection notebook "
                         "(phase0_data_preparation/02_collect_korean_medical.ipynb) or check data.sources")
    return files


def worker_count(spec: PreprocessConfig, tasks: int) -> int:
    return max(1, min(spec.workers or os.cpu_count() or 1, tasks))


def minhash_config(spec: PreprocessConfig) -> Any:
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    # No NFD/diacritic folding: it would decompose every Hangul syllable into jamo for nothing.
    return MinhashConfig(n_grams=spec.minhash_ngram_words, num_buckets=spec.minhash_buckets,
                         hashes_per_bucket=spec.minhash_hashes_per_bucket, seed=spec.seed + 1,
                         norm_config=TextNormConfig(norm_unicode_diacritics=False),
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def clean_corpus(raw: Path, out: Path, spec: PreprocessConfig, *, korean: bool, work: Path,
                 leakage: Any = None, duplicates: Optional[Path] = None, progress: bool = True) -> CleanResult:
    """Clean every shard under `raw` into `out/{train,valid}/`; `work` keeps the MinHash stages'
    files, so a run killed after stage k restarts at stage k + 1 (datatrove skips finished tasks).
    With `duplicates`, the documents MinHash removes are written there (`<rank>.jsonl`) to audit."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from kormedgemma.data import cleaning

    files = raw_shards(raw)
    tasks = len(files)
    workers = worker_count(spec, tasks)
    config = minhash_config(spec)
    work = Path(work)

    def front() -> list:
        steps = [JsonlReader(str(raw), glob_pattern="**/*.jsonl", text_key="text", add_file_path=False),
                 cleaning.Normalize(), cleaning.SplitLong(spec.max_chars, spec.min_chars),
                 cleaning.MinLength(spec.min_chars)]
        return steps + ([cleaning.HangulShare(spec.min_hangul_ratio)] if korean else [])

    leaks_folder = work / "leaks"
    tail = [MinhashDedupFilter(str(work / "remove"), exclusion_writer=None if duplicates is None else JsonlWriter(
        str(duplicates), output_filename="${rank}.jsonl", compression=None, adapter=cleaning.row_adapter))]
    if leakage is not None:
        tail.append(cleaning.Leakage(leakage, exclusion_writer=JsonlWriter(
            str(leaks_folder), output_filename="${rank}.jsonl", compression=None, adapter=cleaning.leak_adapter)))
    tail += [cleaning.TagSplit(spec.valid_fraction, spec.seed, spec.korean_train_share if korean else 1.0),
             cleaning.RecordLengths(str(work / "lengths")),
             JsonlWriter(str(out), output_filename="${split}/${rank}.jsonl", compression=None,
                         adapter=cleaning.row_adapter)]
    stages = [
        ("MinHash signatures", LocalPipelineExecutor(
            front() + [MinhashDedupSignature(str(work / "signatures"), config=config,
                                             language=cleaning.WhitespaceWords())],
            tasks=tasks, workers=workers, logging_dir=str(work / "logs/1_signatures"))),
        ("MinHash buckets", LocalPipelineExecutor(
            [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)],
            tasks=config.num_buckets, workers=worker_count(spec, config.num_buckets),
            logging_dir=str(work / "logs/2_buckets"))),
        ("MinHash clusters", LocalPipelineExecutor(
            [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)],
            tasks=1, workers=1, logging_dir=str(work / "logs/3_clusters"))),
        # The final pass reads the raw shards again through the same steps: datatrove's MinHash
        # filter identifies documents by their position in a task's stream, so the stream must
        # be rebuilt exactly as stage 1 saw it. Its logs go to a fresh folder: it always reruns,
        # because its output folder is new each time.
        ("filter and write", LocalPipelineExecutor(
            front() + tail, tasks=tasks, workers=workers,
            logging_dir=str(work / f"logs/4_write-{time.time_ns()}"))),
    ]
    shutil.rmtree(work / "lengths", ignore_errors=True)
    shutil.rmtree(leaks_folder, ignore_errors=True)
    result = CleanResult()
    final_stats = None
    for number, (name, executor) in enumerate(stages, start=1):
        started = time.perf_counter()
        stats = run_executor(executor, f"{'korean' if korean else 'english'} {number}/4 {name}", progress)
        result.seconds[name] = round(time.perf_counter() - started, 2)
        final_stats = stats
    result.counts = _filter_counts(final_stats)
    result.lengths = _read_lengths(work / "lengths", tasks)
    result.leaks = [row for file in sorted(leaks_folder.glob("*.jsonl")) for row in read_jsonl(file)]
    result.counts["kept"] = int(sum(len(v) for v in result.lengths.values()))
    return result


def run_executor(executor: Any, desc: str, progress: bool = True) -> Any:
    """Run a datatrove executor with a progress bar over its finished tasks.

    The executor blocks until every task is done and reports through log lines only; a thread
    runs it while this one counts datatrove's completion markers for the bar."""
    from tqdm.auto import tqdm

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["stats"] = executor.run()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    completions = Path(executor.logging_dir.path) / "completions"
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    with tqdm(total=executor.world_size, desc=desc, unit="task", disable=not progress) as bar:
        while thread.is_alive():
            thread.join(timeout=1.0)
            done = len(list(completions.glob("*"))) if completions.is_dir() else 0
            bar.update(done - bar.n)
        done = len(list(completions.glob("*"))) if completions.is_dir() else 0
        bar.update(done - bar.n)
    if "error" in outcome:
        raise outcome["error"]
    failed = executor.world_size - done
    if failed:
        raise RuntimeError(f"{desc}: {failed} of {executor.world_size} datatrove task(s) did not finish; "
                           f"their logs are in {Path(executor.logging_dir.path) / 'logs'}")
    return outcome.get("stats")


def _filter_counts(stats: Any) -> dict[str, int]:
    """Documents in, and how many each step removed, from the final pass's merged statistics."""
    by_name = {}
    for step in stats.stats if stats is not None else []:
        by_name[step.name.split(": ", 1)[-1]] = {key: int(value.total) for key, value in step.stats.items()}
    counts: dict[str, int] = {}
    steps = stats.stats if stats is not None else []
    counts["input"] = int(steps[0].stats["documents"].total) if steps and "documents" in steps[0].stats else 0
    normalise = by_name.get("normalise", {})
    counts["dropped_empty"] = normalise.get("dropped_empty", 0)
    split = by_name.get("split long documents", {})
    counts["split_documents"] = split.get("split_documents", 0)
    counts["pieces_from_splits"] = split.get("pieces", 0)
    for name, reason in (("min length", "length"), ("hangul share", "hangul_ratio"),
                         ("kormedmcqa leakage", "kormedmcqa_overlap")):
        if name in by_name:
            counts[f"dropped_{reason}"] = by_name[name].get("dropped", 0)
    dedup = next((v for k, v in by_name.items() if "stage 4" in k), {})
    counts["dropped_near_duplicate"] = dedup.get("dropped", 0)
    unused = by_name.get("train/valid split", {}).get("unused", 0)
    if unused:
        counts["left_out_by_train_share"] = unused
    return counts


def _read_lengths(folder: Path, tasks: int) -> dict[str, np.ndarray]:
    lengths = {}
    for split in SPLITS:
        parts = [np.fromfile(folder / f"{split}_{rank:05d}.u32", dtype=np.uint32) for rank in range(tasks)
                 if (folder / f"{split}_{rank:05d}.u32").is_file()]
        lengths[split] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return lengths


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    if lengths.size == 0:
        return {"docs": 0, "chars": 0}
    ordered = np.sort(lengths)
    return {"docs": int(ordered.size), "chars": int(ordered.sum(dtype=np.int64)),
            "mean_chars": round(float(ordered.mean()), 1), "median_chars": int(ordered[ordered.size // 2]),
            "p95_chars": int(ordered[min(ordered.size - 1, int(0.95 * ordered.size))]),
            "max_chars": int(ordered[-1])}


def work_folder(config: ProjectConfig, key: str, raw: Path) -> Path:
    """Where the MinHash stages of one corpus keep their files until it is written; named by the
    config and the raw collection's manifest, so a changed input never reuses stale signatures."""
    from kormedgemma.core.config import config_hash, config_to_dict, resolve_path
    from kormedgemma.core.manifest import manifest_path

    manifest = manifest_path(raw)
    stamp = manifest.read_text(encoding="utf-8") if manifest.is_file() else str(sorted(p.name for p in raw.rglob("*")))
    return resolve_path(config, WORK_DIR) / f"{key}-{config_hash({'spec': config_to_dict(config.data.preprocess), 'raw': stamp})}"


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


def plot_length_histogram(corpora: dict[str, np.ndarray], path: Optional[Path] = None) -> Any:
    """Histogram of text lengths (characters, log scale) per corpus; saved to `path` if given."""
    from matplotlib.ticker import ScalarFormatter

    from kormedgemma.core.plots import new_figure, saved

    figure = new_figure((5 * len(corpora), 3.2))
    axes = figure.subplots(1, len(corpora), squeeze=False)
    for axis, (name, values) in zip(axes[0], corpora.items()):
        lengths = np.asarray(values, dtype=np.int64) if len(values) else np.ones(1, dtype=np.int64)
        if lengths.max() / max(lengths.min(), 1) > 20:  # web documents span 20 to 20,000 characters: log bins
            axis.hist(lengths, bins=np.geomspace(max(lengths.min(), 1), lengths.max() + 1, 30), color="#4C72B0")
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(ScalarFormatter())
        else:
            axis.hist(lengths, bins=int(min(30, lengths.max() - lengths.min() + 1)), color="#4C72B0")
        axis.set_title(f"{name}: {len(values):,} texts")
        axis.set_xlabel("characters")
        axis.set_ylabel("texts")
    figure.tight_layout()
    return saved(figure, path)


def preprocess_all(config: ProjectConfig, progress: bool = True) -> dict[str, Any]:
    """Phase 0.04: processed Korean, English and KorMedMCQA artifacts; returns their statistics."""
    from kormedgemma.core.artifacts import artifact_path, require
    from kormedgemma.core.manifest import write_artifact
    from kormedgemma.data.leakage import LeakageIndex, heldout_questions

    spec = config.data.preprocess
    raw_korean, raw_english, raw_mcqa = (require(config, k) for k in ("raw_korean", "raw_english", "raw_kormedmcqa"))
    figures: dict[str, Any] = {}

    leakage = LeakageIndex(heldout_questions(raw_mcqa), ngram_chars=spec.leakage_ngram_chars,
                           min_share=spec.leakage_min_share, min_span_chars=spec.leakage_min_span_chars)
    for key, raw, korean in (("korean", raw_korean, True), ("english", raw_english, False)):
        inputs = {"raw": raw} if not korean else {"raw": raw, "kormedmcqa_heldout": raw_mcqa}
        work = work_folder(config, key, raw)
        with write_artifact(artifact_path(config, key), "0.04", config, ["data.preprocess"], inputs) as out:
            result = clean_corpus(raw, out.path, spec, korean=korean, work=work,
                                  leakage=leakage if korean else None, progress=progress)
            for split in SPLITS:
                if result.lengths[split].size == 0:
                    raise ValueError(f"{key}: no {split} text left after cleaning ({result.counts}); add data, "
                                     f"relax data.preprocess filters or change valid_fraction={spec.valid_fraction}")
            if korean:
                write_jsonl(out.path / LEAKS_FILE, result.leaks)
            plot_length_histogram({f"{key} train": result.lengths["train"]}, out.path / "length_histogram.png")
            out.metrics.update({"filters": result.counts, "train": result.stats("train"),
                                "valid": result.stats("valid"), "seconds": result.seconds,
                                "leaks": len(result.leaks),
                                "leak_examples": [{k: row.get(k) for k in ("question_source", "question", "share",
                                                                           "excerpt")} for row in result.leaks[:5]]})
        shutil.rmtree(work, ignore_errors=True)  # the corpus is sealed: its MinHash files are spent
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


def corpus_headline(metrics: dict[str, Any]) -> str:
    """0.04's line for a cleaned corpus: what the filters kept, and the split."""
    filters = metrics.get("filters", {})
    return (f"{filters.get('input', 0):,} in → {filters.get('kept', 0):,} kept; train "
            f"{metrics.get('train', {}).get('docs', 0):,} / valid {metrics.get('valid', {}).get('docs', 0):,}")


def kormedmcqa_headline(metrics: dict[str, Any]) -> str:
    """0.04's line for the validated KorMedMCQA."""
    rows = metrics.get("rows", {})
    return (f"{sum(sum(v.values()) for v in rows.values()):,} questions in {len(rows)} subsets, "
            f"{len(metrics.get('bad_rows', []))} bad rows dropped")
