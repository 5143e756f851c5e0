"""Phase 1 throughput on a large Korean corpus: counting (MB/s), filtering and merging.

The corpus is synthetic but Korean: sentences of the bundled sample and the real medical terms
in ../shared/data (when present), shuffled into paragraphs until it reaches --mb megabytes.
Prints the figures and writes them to benchmarks/results/tokenizer_throughput.json.

    .venv/bin/python benchmarks/tokenizer_throughput.py --mb 100
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from config.training_config import TokenizerConfig
from kormedgemma.core.config import repo_root
from kormedgemma.core.io import write_jsonl
from kormedgemma.data.readers import iter_corpus
from kormedgemma.vocab.tokenizer import (
    base_vocabulary,
    count_piece_frequencies,
    frequent_new_pieces,
    merge_tokenizers,
    plan_new_pieces,
    train_korean_sentencepiece,
)


def build_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    sentences = [line for line in (repo_root() / "data/samples/korean_medical.txt").read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
    terms_file = repo_root().parent / "shared/data/ko_medical_terms/dictionary_terms.txt"
    terms = terms_file.read_text(encoding="utf-8").splitlines() if terms_file.is_file() else []
    rng = random.Random(seed)
    target = int(megabytes * 1e6)

    def rows():
        written = 0
        while written < target:
            parts = rng.sample(sentences, 6) + ([f"{rng.choice(terms)}의 정의와 임상적 의미." for _ in range(2)] if terms else [])
            rng.shuffle(parts)
            text = " ".join(parts)
            written += len(text.encode("utf-8"))
            yield {"text": text, "source": "benchmark"}

    return write_jsonl(path, rows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--base", default=str(repo_root() / "models/base"),
                        help="base tokenizer folder (default: the tiny base from phase 0.00)")
    parser.add_argument("--out", default=str(repo_root() / "benchmarks/results/tokenizer_throughput.json"))
    args = parser.parse_args()
    spec = TokenizerConfig(vocab_size=8000, input_sentence_size=200_000, num_threads=args.threads,
                           min_frequency=6000, max_new_tokens=10000)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "train.jsonl"
        started = time.perf_counter()
        texts = build_corpus(corpus, args.mb)
        build_seconds = time.perf_counter() - started

        started = time.perf_counter()
        model = train_korean_sentencepiece(iter_corpus(corpus), Path(tmp) / "sp", spec)
        train_seconds = time.perf_counter() - started

        counted = count_piece_frequencies(model, iter_corpus(corpus), spec.num_threads)

        started = time.perf_counter()
        base_vocab = base_vocabulary(Path(args.base))
        candidates = frequent_new_pieces(model, counted.counts, base_vocab, spec)
        plan = plan_new_pieces(candidates, model, base_vocab, spec.max_new_tokens)
        filter_seconds = time.perf_counter() - started

        started = time.perf_counter()
        merge_tokenizers(Path(args.base), plan, Path(tmp) / "merged")
        merge_seconds = time.perf_counter() - started

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "corpus_mb": round(counted.megabytes, 1), "corpus_texts": texts, "threads": args.threads,
        "build_corpus_seconds": round(build_seconds, 1),
        "train_sentencepiece_seconds": round(train_seconds, 1),
        "train_sentencepiece_sentences_sampled": spec.input_sentence_size,
        "count_seconds": round(counted.seconds, 1), "count_mb_per_second": round(counted.mb_per_second, 2),
        "filter_and_plan_seconds": round(filter_seconds, 2), "merge_seconds": round(merge_seconds, 2),
        "candidates": len(candidates), "new_pieces": len(plan), "min_frequency": spec.min_frequency,
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
