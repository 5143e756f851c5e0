"""Phase 0.04 at scale: throughput, peak memory and MinHash recall/precision on ≥ 1 GB of Korean.

The corpus is built from the real Korean Wikipedia medical articles in ../shared/data: their
paragraphs recombined at random into documents of 5,000–60,000 characters (the shape of web and
wiki documents; those over `max_chars` are split by phase 0), written as 64 MB raw shards as
0.02 writes them. Near-duplicates are planted at a known rate: a fresh document of 5,000–18,000
characters (short enough never to be split) followed, a few documents later, by a copy with 1 %
of its words replaced and 0.5 % deleted (word 5-gram Jaccard ≈ 0.85, above the 0.72 band of the
default 14 × 8 MinHash). Each size is a prefix of the same shards (2, 8, 16 shards = ~128 MB,
~512 MB, ~1 GB), so the figures differ in size only.

Each measurement runs `kormedgemma.data.preprocess.clean_corpus` (the project's own code path, with the
default `PreprocessConfig` and the real KorMedMCQA leakage index) in a fresh subprocess; this
process samples the resident memory of that subprocess and all its workers every 0.25 s (RSS
summed over the tree, and PSS, which counts shared pages once).

    .venv/bin/python benchmarks/phase0_preprocess.py                    # ~1 GB, the full set
    .venv/bin/python benchmarks/phase0_preprocess.py --shards 2 --runs 2:1,2:2   # quick look

Writes benchmarks/results/phase0_preprocess.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared/data"
KOWIKI = SHARED / "kowiki_medical/kowiki_medical.jsonl"
SHARD_BYTES = 64_000_000
PLANT_EVERY = 50          # one planted pair per 50 documents (2 % of documents are planted copies)
WORD_REPLACE, WORD_DELETE = 0.01, 0.005


def text_key(text: str) -> str:
    from kormedgemma.data.text import normalize_text

    return digest(normalize_text(text))


def build_corpus(folder: Path, shards: int, seed: int = 0) -> dict:
    """Write `shards` raw shards; return the planted pairs (by normalised-text hash, per shard)."""
    paragraphs = [p for line in KOWIKI.open(encoding="utf-8") for p in json.loads(line)["text"].split("\n")
                  if p.strip()]
    words = [w for p in paragraphs[:5000] for w in p.split()]
    rng = random.Random(seed)

    def document(low: int, high: int) -> str:
        target, parts, size = rng.randint(low, high), [], 0
        while size < target:
            parts.append(rng.choice(paragraphs))
            size += len(parts[-1]) + 1
        return "\n".join(parts)[:high]

    def near_copy(text: str) -> str:
        lines = []
        for line in text.split("\n"):
            out = []
            for word in line.split(" "):
                roll = rng.random()
                if roll < WORD_DELETE:
                    continue
                out.append(rng.choice(words) if roll < WORD_DELETE + WORD_REPLACE else word)
            lines.append(" ".join(out))
        return "\n".join(lines)

    folder.mkdir(parents=True, exist_ok=True)
    pairs, docs, pending = [], 0, []
    for shard in range(shards):
        written = 0
        with open(folder / f"{shard:05d}.jsonl", "wb") as handle:
            while written < SHARD_BYTES or pending:
                if pending and (written >= SHARD_BYTES or rng.random() < 0.2):
                    original = pending.pop(0)
                    text = near_copy(original)
                    pairs.append({"shard": shard, "original": text_key(original), "copy": text_key(text)})
                elif docs % PLANT_EVERY == 0:
                    text = document(5000, 18000)
                    pending.append(text)
                else:
                    text = document(5000, 60000)
                line = json.dumps({"text": text, "source": "kowiki-recombined"}, ensure_ascii=False).encode() + b"\n"
                handle.write(line)
                written += len(line)
                docs += 1
    return {"pairs": pairs, "documents": docs}


def measure(raw: Path, workers: int, scratch: Path) -> dict:
    """clean_corpus on `raw` in a subprocess; this process samples the tree's memory meanwhile."""
    import psutil

    out, work = scratch / "out", scratch / "work"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    command = [sys.executable, __file__, "--clean", str(raw), str(out), str(work), str(workers),
               str(scratch / "duplicates")]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, text=True)
    parent = psutil.Process(child.pid)
    peak_rss = peak_pss = peak_single = 0
    while child.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
            rss = pss = single = 0
            for process in tree:
                try:
                    info = process.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss, single = rss + info.rss, pss + info.pss, max(single, info.rss)
            peak_rss, peak_pss, peak_single = max(peak_rss, rss), max(peak_pss, pss), max(peak_single, single)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.25)
    output = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"clean_corpus failed on {raw} (exit {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_tree_mb"] = round(peak_rss / 2**20, 1)
    result["peak_pss_tree_mb"] = round(peak_pss / 2**20, 1)
    result["peak_rss_largest_process_mb"] = round(peak_single / 2**20, 1)
    result["kept_keys"] = text_key_file(out)
    result["removed"] = [json.loads(line)["text"] for file in sorted((scratch / "duplicates").glob("*.jsonl"))
                         for line in open(file, encoding="utf-8")]
    return result


def digest(normalised_text: str) -> str:
    return hashlib.blake2b(normalised_text.encode("utf-8"), digest_size=12).hexdigest()


def text_key_file(out: Path) -> set[str]:
    keys = set()
    for file in sorted(out.rglob("*.jsonl")):
        with open(file, encoding="utf-8") as handle:
            keys.update(digest(json.loads(line)["text"]) for line in handle)
    return keys


def clean(raw: str, out: str, work: str, workers: str, duplicates: str) -> None:
    """The subprocess: the project's phase 0.04 on one raw folder, figures as one JSON line."""
    from config.training_config import PreprocessConfig
    from kormedgemma.data.leakage import LeakageIndex, heldout_questions
    from kormedgemma.data.preprocess import clean_corpus

    spec = PreprocessConfig(workers=int(workers))
    leakage = LeakageIndex(heldout_questions(SHARED / "kormedmcqa"), ngram_chars=spec.leakage_ngram_chars,
                           min_share=spec.leakage_min_share, min_span_chars=spec.leakage_min_span_chars)
    started = time.perf_counter()
    result = clean_corpus(Path(raw), Path(out), spec, korean=True, work=Path(work), leakage=leakage,
                          duplicates=Path(duplicates), progress=False)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 2), "stage_seconds": result.seconds,
                      "counts": result.counts, "train": result.stats("train"), "valid": result.stats("valid")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16, help="64 MB raw shards to build (16 = ~1 GB)")
    parser.add_argument("--runs", default="2:1,2:2,8:1,8:2,16:2",
                        help="comma-separated SHARDS:WORKERS measurements (each a prefix of the shards)")
    parser.add_argument("--scratch", default="/tmp/kormedgemma_phase0_bench")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/phase0_preprocess.json"))
    parser.add_argument("--clean", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clean:
        return clean(*args.clean)
    if not KOWIKI.is_file():
        raise SystemExit(f"{KOWIKI} not found: this benchmark builds its corpus from the real articles")

    scratch = Path(args.scratch)
    raw_all = scratch / "raw_all"
    shutil.rmtree(raw_all, ignore_errors=True)
    started = time.perf_counter()
    planted = build_corpus(raw_all, args.shards)
    print(f"built {args.shards} shards, {planted['documents']:,} documents, {len(planted['pairs'])} planted pairs "
          f"in {time.perf_counter() - started:.0f} s", flush=True)

    results = []
    for run in args.runs.split(","):
        shards, workers = (int(x) for x in run.split(":"))
        raw = scratch / f"raw_{shards}"
        shutil.rmtree(raw, ignore_errors=True)
        raw.mkdir(parents=True)
        for shard in range(shards):
            os.link(raw_all / f"{shard:05d}.jsonl", raw / f"{shard:05d}.jsonl")
        megabytes = sum(p.stat().st_size for p in raw.glob("*.jsonl")) / 1e6
        figures = measure(raw, workers, scratch / "run")
        kept = figures.pop("kept_keys")
        removed = figures.pop("removed")
        pairs = [p for p in planted["pairs"] if p["shard"] < shards]
        planted_keys = {key for p in pairs for key in (p["original"], p["copy"])}
        unplanted = [t for t in removed if digest(t) not in planted_keys]
        figures["removed_not_planted"] = {
            "count": len(unplanted),
            "exact_copy_of_a_kept_text": sum(digest(t) in kept for t in unplanted),
            "lengths": sorted(len(t) for t in unplanted),
            "examples": [t[:120] for t in unplanted[:5]]}
        one_removed = sum((p["original"] in kept) != (p["copy"] in kept) for p in pairs)
        both_removed = sum(p["original"] not in kept and p["copy"] not in kept for p in pairs)
        dropped = figures["counts"]["dropped_near_duplicate"]
        row = {"shards": shards, "workers": workers, "input_mb": round(megabytes, 1),
               "input_documents": figures["counts"]["input"],
               "mb_per_second": round(megabytes / figures["seconds"], 2),
               "documents_per_second": round(figures["counts"]["input"] / figures["seconds"], 1),
               "planted_pairs": len(pairs), "planted_found": one_removed, "planted_both_removed": both_removed,
               "recall": round(one_removed / len(pairs), 4) if pairs else None,
               "precision": round(one_removed / dropped, 4) if dropped else None, **figures}
        results.append(row)
        print(json.dumps({k: row[k] for k in ("input_mb", "workers", "seconds", "mb_per_second",
                                             "documents_per_second", "peak_pss_tree_mb", "peak_rss_tree_mb",
                                             "recall", "precision")}), flush=True)
        shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)

    import psutil

    report = {"benchmark": "phase0_preprocess", "command": "python benchmarks/phase0_preprocess.py "
              + " ".join(sys.argv[1:]), "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                                  "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)},
              "corpus": {"source": str(KOWIKI.relative_to(ROOT.parent)), "documents": "paragraphs recombined "
                         "into 5,000-60,000 characters", "planted": f"one near-copy per {PLANT_EVERY} documents, "
                         f"{WORD_REPLACE:.1%} words replaced, {WORD_DELETE:.1%} deleted"},
              "runs": results}
    Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
