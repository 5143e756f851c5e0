"""Phase 2 at MedGemma-4B shape on the CPU: time and peak memory of untie + resize + initialisation.

A random-weight `Gemma3ForConditionalGeneration` of MedGemma-4B's exact configuration (text:
hidden 2560, 34 layers, 262,208 embedding rows; SigLIP vision tower) in bfloat16 gets 10,000 new
tokens. No Gemma 3 tokenizer or fastText vectors are available offline, so the library's own
functions run on stand-ins of the real sizes: a tokenizer whose 262,145 base tokens and 10,000
new tokens split into 2–5 base pieces, and random 300-dimensional word vectors for every token.
The figures measure the library's work (row arithmetic, batched k-NN over 262K base tokens), not
SentencePiece segmentation. Peak RSS includes a 1.3 GB copy of the base rows that the script keeps
to check they stay bit-identical. Writes benchmarks/results/embedding_init_4b.json.

    .venv/bin/python benchmarks/embedding_init_4b.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from config.training_config import EmbeddingConfig
from kormedgemma.core.config import repo_root
from kormedgemma.modeling.base_model import medgemma_4b_config
from kormedgemma.vocab.embeddings import Alignment, initialize_new_rows, is_untied, resize_for_tokenizer

BASE_TOKENS = 262_145  # 262,144 SentencePiece pieces + <image_soft_token>


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class SyntheticTokenizer:
    """Stands in for Gemma's tokenizer where only ids, texts and splits matter."""

    def __init__(self, size: int, new: int, seed: int = 0) -> None:
        self.size = size
        rng = np.random.default_rng(seed)
        self.splits = {BASE_TOKENS + i: rng.integers(300, BASE_TOKENS - 1, size=rng.integers(2, 6)).tolist()
                       for i in range(new)}
        self.all_special_ids = [0, 1, 2, 3]

    def __len__(self) -> int:
        return self.size

    def convert_ids_to_tokens(self, token_id):
        if isinstance(token_id, list):
            return [self.convert_ids_to_tokens(i) for i in token_id]
        return f"tok{token_id}"

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def encode(self, text: str, add_special_tokens: bool = False):
        token_id = int(text[3:]) if text.startswith("tok") else 100
        return self.splits.get(token_id, [token_id])

    def get_vocab(self):
        return {f"tok{i}": i for i in range(min(self.size, BASE_TOKENS))}


class RandomVectors:
    """Word vectors of a fixed dimension for any string (deterministic per string)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vectors = np.random.default_rng(1).normal(size=(1000, dim))

    def __getitem__(self, word: str) -> np.ndarray:
        seed = int.from_bytes(word.encode("utf-8")[-8:].rjust(8, b"\0"), "little") % (2**32)
        return np.random.default_rng(seed).normal(size=self.dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=10_000)
    parser.add_argument("--method", default="hybrid", choices=["eeve", "hybrid", "wechsel", "mean", "random"])
    parser.add_argument("--out", default=str(repo_root() / "benchmarks/results/embedding_init_4b.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers import Gemma3ForConditionalGeneration

    figures: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                  "torch_threads": torch.get_num_threads(), "method": args.method,
                                  "new_tokens": args.new_tokens, "dtype": "bfloat16"}
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    model = Gemma3ForConditionalGeneration(medgemma_4b_config())
    torch.set_default_dtype(torch.float32)
    figures["build_model_seconds"] = round(time.perf_counter() - started, 1)
    figures["parameters"] = sum(p.numel() for p in model.parameters())
    figures["peak_rss_gb_after_build"] = round(peak_rss_gb(), 2)

    base = SyntheticTokenizer(BASE_TOKENS, args.new_tokens)  # splits: how the base cuts each new text
    merged = SyntheticTokenizer(BASE_TOKENS + args.new_tokens, args.new_tokens)
    reference = model.get_input_embeddings().weight[:BASE_TOKENS].clone()

    started = time.perf_counter()
    resized = resize_for_tokenizer(model, len(merged), 64)
    figures["untie_and_resize_seconds"] = round(time.perf_counter() - started, 1)
    figures.update({f"resize_{k}": v for k, v in resized.items()})
    figures["peak_rss_gb_after_resize"] = round(peak_rss_gb(), 2)

    wechsel_inputs = None
    if args.method in ("wechsel", "hybrid"):
        vectors = RandomVectors(300)
        wechsel_inputs = {"korean_vectors": vectors, "english_vectors": vectors,
                          "alignment": Alignment(np.linalg.qr(np.random.default_rng(2).normal(size=(300, 300)))[0],
                                                 10_000, 10_000, 0.0), "dictionary": {}}
    started = time.perf_counter()
    report = initialize_new_rows(model, base, merged, EmbeddingConfig(method=args.method), wechsel_inputs)
    figures["initialize_seconds"] = round(time.perf_counter() - started, 1)
    figures["coverage"] = report.coverage
    figures["peak_rss_gb_after_initialize"] = round(peak_rss_gb(), 2)
    figures["base_rows_bit_identical"] = bool(torch.equal(model.get_input_embeddings().weight[:BASE_TOKENS], reference)
                                              and torch.equal(model.get_output_embeddings().weight[:BASE_TOKENS], reference))
    figures["untied"] = is_untied(model)
    print(json.dumps(figures, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
