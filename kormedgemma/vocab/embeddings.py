"""Phase 2: give the new Korean tokens embedding rows that start close to where they belong.

MedGemma ties `lm_head` to the input embeddings; EEVE's stages train the two apart, so the
matrix is copied into a real `lm_head` first (untying) and the saved config says so. Every row
a base token owns is copied bit for bit; only rows at ids ≥ len(base tokenizer) are written.
Those rows are padding in the base checkpoint (Gemma 3 has 262,208 rows for 262,145 tokens), so
new tokens first take the free padding rows, then rows appended up to a multiple of 64.

Initialisations, all in the stored (unscaled) space: Gemma multiplies input embeddings by
sqrt(hidden) in the forward pass, and a mean of stored rows is a stored row.

- EEVE: input row = mean of the base input rows of the pieces the *base* tokenizer splits the
  new token's text into; output row = the base output row of the first of those pieces.
- WECHSEL: static word vectors of both languages aligned by orthogonal Procrustes on the
  bilingual dictionary; the new token's k nearest base tokens (cosine, aligned space) weighted
  by softmax(similarity / temperature). A token that is itself a dictionary term draws on its
  English translation's pieces directly.
- hybrid: (1 − w) · EEVE + w · WECHSEL where WECHSEL covers the token, EEVE elsewhere.
- mean / random: transformers' mean-resizing and a plain normal draw, as baselines for phase 5.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from config.training_config import EmbeddingConfig, ProjectConfig
from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.config import resolve_input
from kormedgemma.core.hub import hub_access
from kormedgemma.core.manifest import write_artifact
from kormedgemma.data.dictionary import DICTIONARY_FILE, load_dictionary
from kormedgemma.data.readers import sample_split
from kormedgemma.modeling.base_model import (
    SHARD_SIZE,
    builds_base,
    check_tokenizer_matches_model,
    load_model,
    load_tokenizer,
    model_class,
    save_tokenizer,
)

# The rows `resize_for_tokenizer` appends are one fixed draw (see there).
RESIZE_SEED = 0
_WORD = re.compile(r"[\w\uac00-\ud7a3]+", re.UNICODE)


# --------------------------------------------------------------------------- resize + untie
def untie_lm_head(model: Any) -> bool:
    """Give the model its own `lm_head` (a copy of the input matrix); returns True if it was tied."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs.weight is inputs.weight or outputs.weight.data_ptr() == inputs.weight.data_ptr()
    if tied:
        outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None and text_config is not model.config:
        text_config.tie_word_embeddings = False
    return tied


def is_untied(model: Any) -> bool:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs.weight.data_ptr() != inputs.weight.data_ptr() and not model.config.tie_word_embeddings


def rows_digest(rows: torch.Tensor) -> str:
    """sha256 of a block of rows' bytes: an exact "unchanged" check without a multi-GB copy."""

    data = rows.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy()).hexdigest()


def padded_rows(tokens: int, multiple: int) -> int:
    return int(math.ceil(tokens / multiple) * multiple)


def resize_for_tokenizer(model: Any, merged_size: int, multiple: int, mean_resizing: bool = False,
                         seed: int = RESIZE_SEED) -> dict[str, int]:
    """Untie, then grow the matrices to hold `merged_size` tokens (rows a multiple of `multiple`).

    transformers fills the appended rows from torch's global generator. 2.02 overwrites the new
    tokens' rows, but the padding rows past the last token keep that draw, and the lm_head's padding
    rows take part in every softmax: unseeded, two runs of the same config trained and scored
    differently from stage 1 on. So the draw comes from a fixed seed, and the caller's generator
    state is left as it was."""
    before = model.get_input_embeddings().weight.shape[0]
    was_tied = untie_lm_head(model)
    rows = max(before, padded_rows(merged_size, multiple))
    if rows != before:
        # the generators the draw uses: the CPU's, and those of the GPUs the two matrices live on
        # (forked and seeded alone, so no other device's generator is touched)
        gpus = sorted({w.device.index if w.device.index is not None else torch.cuda.current_device()
                       for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
                       if w.device.type == "cuda"})
        with torch.random.fork_rng(devices=gpus):
            torch.default_generator.manual_seed(seed)
            for gpu in gpus:
                with torch.cuda.device(gpu):
                    torch.cuda.manual_seed(seed)
            model.resize_token_embeddings(rows, mean_resizing=mean_resizing)
    return {"rows_before": before, "rows_after": rows, "tokens": merged_size, "was_tied": int(was_tied)}


# --------------------------------------------------------------------------- EEVE
def token_text(tokenizer: Any, token_id: int) -> str:
    """The text a token stands for (`▁` → space), as the base tokenizer would see it."""
    return tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])


def eeve_rows(base_tokenizer: Any, merged_tokenizer: Any, new_ids: Sequence[int], base_input: torch.Tensor,
              base_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """EEVE rows for `new_ids` and the base pieces each was built from."""
    hidden = base_input.shape[1]
    inputs = torch.empty(len(new_ids), hidden, dtype=torch.float32)
    outputs = torch.empty(len(new_ids), hidden, dtype=torch.float32)
    splits: list[list[int]] = []
    for row, token_id in enumerate(new_ids):
        pieces = base_tokenizer.encode(token_text(merged_tokenizer, token_id), add_special_tokens=False)
        if not pieces:
            raise ValueError(f"token {token_id} ({merged_tokenizer.convert_ids_to_tokens(token_id)!r}) has no base pieces")
        splits.append(pieces)
        inputs[row] = base_input[pieces].float().mean(dim=0)
        outputs[row] = base_output[pieces[0]].float()
    return inputs, outputs, splits


# --------------------------------------------------------------------------- WECHSEL
def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


def train_word_vectors(texts: Sequence[str], dim: int, epochs: int, seed: int, workers: int = 1) -> Any:
    """fastText vectors (char n-grams, so any token string gets a vector) on a local corpus.
    `workers` > 1 trains in threads: faster, but no longer the same vectors on every run."""
    from gensim.models import FastText

    sentences = [words(t) for t in texts]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("no words to train word vectors on (empty corpus)")
    model = FastText(vector_size=dim, window=5, min_count=1, min_n=1, max_n=4, epochs=epochs, seed=seed,
                     workers=workers, sg=1)
    model.build_vocab(corpus_iterable=sentences)
    model.train(corpus_iterable=sentences, total_examples=len(sentences), epochs=epochs)
    return model.wv


def load_word_vectors(ref: str, config: ProjectConfig) -> Any:
    """fastText vectors from a local .bin/.vec file or a Hub repo (`facebook/fasttext-ko-vectors`)."""
    from gensim.models import KeyedVectors
    from gensim.models.fasttext import load_facebook_vectors


    path = resolve_input(config, ref)
    if not path.exists():
        with hub_access(f"word vectors {ref}", "Download a fastText .bin and set "
                                                "embeddings.word_vectors.korean/english to it."):
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(ref, "model.bin"))
    return load_facebook_vectors(str(path)) if path.suffix == ".bin" else KeyedVectors.load_word2vec_format(str(path))


class CenteredVectors:
    """Word vectors minus their vocabulary mean.

    Vectors trained on small corpora share one dominant direction (every cosine near 1), which
    would make WECHSEL's softmax uniform; centring removes it before alignment and similarity.
    """

    def __init__(self, vectors: Any) -> None:
        self.vectors = vectors
        self.mean = np.asarray(vectors.vectors, dtype=np.float64).mean(axis=0)

    def __getitem__(self, word: str) -> np.ndarray:
        return np.asarray(self.vectors[word], dtype=np.float64) - self.mean


def phrase_vector(vectors: Any, text: str) -> Optional[np.ndarray]:
    """Mean vector of a phrase's words; None when no word has a vector."""
    found = []
    for word in words(text) or [text.strip().lower()]:
        try:
            found.append(np.asarray(vectors[word], dtype=np.float64))
        except KeyError:
            continue
    return np.mean(found, axis=0) if found else None


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orthogonal W minimising ||source @ W − target||_F (rows are paired words)."""
    u, _, vt = np.linalg.svd(source.T @ target)
    return u @ vt


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


@dataclass
class Alignment:
    rotation: np.ndarray
    pairs_used: int
    pairs_total: int
    train_cosine: float  # mean cosine of aligned Korean vs English dictionary vectors


def align(korean_vectors: Any, english_vectors: Any, pairs: Sequence[tuple[str, str]]) -> Alignment:
    source, target = [], []
    for ko, en in pairs:
        ko_vec, en_vec = phrase_vector(korean_vectors, ko), phrase_vector(english_vectors, en)
        if ko_vec is not None and en_vec is not None:
            source.append(ko_vec)
            target.append(en_vec)
    if len(source) < 2:
        raise ValueError(f"only {len(source)} dictionary pair(s) have word vectors on both sides: "
                         "cannot align (check the bilingual dictionary and word vectors)")
    source_m, target_m = _unit(np.stack(source)), _unit(np.stack(target))
    rotation = procrustes(source_m, target_m)
    cosine = float(np.mean(np.sum(_unit(source_m @ rotation) * target_m, axis=1)))
    return Alignment(rotation, len(source), len(pairs), cosine)


@dataclass
class WechselResult:
    rows_input: dict[int, torch.Tensor] = field(default_factory=dict)
    rows_output: dict[int, torch.Tensor] = field(default_factory=dict)
    route: dict[int, str] = field(default_factory=dict)  # "dictionary" or "knn"
    neighbours: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # (base id, weight)


def softmax_weights(similarities: np.ndarray, temperature: float) -> np.ndarray:
    scaled = similarities / temperature
    scaled = scaled - scaled.max()
    weights = np.exp(scaled)
    return weights / weights.sum()


def wechsel_rows(base_tokenizer: Any, merged_tokenizer: Any, new_ids: Sequence[int], base_input: torch.Tensor,
                 base_output: torch.Tensor, korean_vectors: Any, english_vectors: Any, alignment: Alignment,
                 dictionary: dict[str, str], spec: EmbeddingConfig) -> WechselResult:
    """WECHSEL rows for the new tokens it can place; the rest are left to EEVE."""
    result = WechselResult()
    candidates = _base_candidates(base_tokenizer)
    base_matrix = []
    base_ids = []
    for token_id in candidates:
        vector = phrase_vector(english_vectors, token_text(base_tokenizer, token_id))
        if vector is not None:
            base_matrix.append(vector.astype(np.float32))
            base_ids.append(token_id)
    if not base_ids:
        raise ValueError("no base token has an English word vector: cannot run WECHSEL")
    base_unit = _unit(np.stack(base_matrix))
    del base_matrix
    base_ids_array = np.asarray(base_ids)
    knn_ids, knn_vectors = [], []
    for token_id in new_ids:
        text = token_text(merged_tokenizer, token_id).strip()
        english = dictionary.get(unicodedata.normalize("NFC", text))
        pieces = base_tokenizer.encode(english, add_special_tokens=False) if english else []
        if pieces:
            result.rows_input[token_id] = base_input[pieces].float().mean(dim=0)
            result.rows_output[token_id] = base_output[pieces].float().mean(dim=0)
            result.route[token_id] = "dictionary"
            result.neighbours[token_id] = [(p, 1.0 / len(pieces)) for p in pieces]
            continue
        vector = phrase_vector(korean_vectors, text)
        if vector is not None:
            knn_ids.append(token_id)
            knn_vectors.append(vector)
    k = min(spec.wechsel_k, len(base_ids))
    # Similarities of `batch` new tokens against every base token at once: 256 × 262K float32
    # is ~270 MB at MedGemma's vocabulary size.
    batch = 256
    for start in range(0, len(knn_ids), batch):
        aligned = _unit(_unit(np.stack(knn_vectors[start:start + batch])) @ alignment.rotation).astype(np.float32)
        similarities = aligned @ base_unit.T
        top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        for row, token_id in enumerate(knn_ids[start:start + batch]):
            order = top[row][np.argsort(-similarities[row, top[row]])]
            weights = softmax_weights(similarities[row, order], spec.wechsel_temperature)
            chosen = base_ids_array[order]
            # on the matrices' device: the init ablation holds the model on the GPU
            weight_tensor = torch.tensor(weights, dtype=torch.float32, device=base_input.device)[:, None]
            result.rows_input[token_id] = (weight_tensor * base_input[chosen].float()).sum(dim=0)
            result.rows_output[token_id] = (weight_tensor * base_output[chosen].float()).sum(dim=0)
            result.route[token_id] = "knn"
            result.neighbours[token_id] = [(int(i), float(w)) for i, w in zip(chosen, weights)]
    return result


def _base_candidates(tokenizer: Any) -> list[int]:
    """Base tokens WECHSEL may borrow from: real text pieces, not specials, bytes or unused slots."""
    special = set(tokenizer.all_special_ids)
    keep = []
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special or token.startswith("<") and token.endswith(">") or token.startswith("[") and token.endswith("]"):
            continue
        if token.replace("▁", "").strip():
            keep.append(token_id)
    return sorted(keep)


# --------------------------------------------------------------------------- putting it together
@dataclass
class InitReport:
    method: str
    new_ids: list[int]
    coverage: dict[str, int]
    neighbours: list[dict[str, Any]]
    alignment: Optional[dict[str, float]] = None


def initialize_new_rows(model: Any, base_tokenizer: Any, merged_tokenizer: Any, spec: EmbeddingConfig,
                        wechsel_inputs: Optional[dict[str, Any]] = None) -> InitReport:
    """Write the rows of every new token id in place; base rows are never touched."""
    first_new, last = len(base_tokenizer), len(merged_tokenizer)
    new_ids = list(range(first_new, last))
    if not new_ids:  # tokenizer.expand: false: the base passes through
        return InitReport(spec.method, [], {}, [], None)
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings().weight
    if inputs.shape[0] < last:
        raise ValueError(f"model has {inputs.shape[0]} rows for {last} tokens: resize first")
    # Views, not copies (2.7 GB at MedGemma-4B shape): only rows from `first_new` on are written.
    base_input = inputs.detach()[:first_new]
    base_output = outputs.detach()[:first_new]
    coverage: dict[str, int] = {}
    neighbours: list[dict[str, Any]] = []
    alignment_info = None
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        if spec.method == "random":
            std = float(getattr(model.config.get_text_config(), "initializer_range", 0.02))
            for matrix in (inputs, outputs):
                matrix[first_new:last] = torch.randn(len(new_ids), matrix.shape[1], generator=generator).to(matrix.dtype) * std
            coverage["random"] = len(new_ids)
        elif spec.method == "plain_mean":
            for matrix, base in ((inputs, base_input), (outputs, base_output)):
                matrix[first_new:last] = base.float().mean(dim=0).to(matrix.dtype)
            coverage["plain_mean"] = len(new_ids)
        elif spec.method == "mean":
            # transformers' mean-resizing: a draw from N(mean, cov) of the base rows, per matrix.
            for matrix, base in ((inputs, base_input), (outputs, base_output)):
                matrix[first_new:last] = _mean_resize_rows(base.float(), len(new_ids), generator).to(matrix.dtype)
            coverage["mean"] = len(new_ids)
        else:
            eeve_in, eeve_out, splits = eeve_rows(base_tokenizer, merged_tokenizer, new_ids, base_input, base_output)
            final_in, final_out = eeve_in.clone(), eeve_out.clone()
            routes = {token_id: "eeve" for token_id in new_ids}
            wechsel = None
            if spec.method in ("wechsel", "hybrid"):
                if wechsel_inputs is None:
                    raise ValueError(f"embeddings.method={spec.method!r} needs word vectors and the dictionary")
                wechsel = wechsel_rows(base_tokenizer, merged_tokenizer, new_ids, base_input, base_output,
                                       spec=spec, **wechsel_inputs)
                alignment = wechsel_inputs["alignment"]
                alignment_info = {"pairs_used": alignment.pairs_used, "pairs_total": alignment.pairs_total,
                                  "train_cosine": round(alignment.train_cosine, 4)}
                weight = 1.0 if spec.method == "wechsel" else spec.hybrid_wechsel_weight
                for row, token_id in enumerate(new_ids):
                    if token_id in wechsel.route:
                        final_in[row] = (1 - weight) * eeve_in[row] + weight * wechsel.rows_input[token_id]
                        final_out[row] = (1 - weight) * eeve_out[row] + weight * wechsel.rows_output[token_id]
                        routes[token_id] = f"wechsel_{wechsel.route[token_id]}"
            inputs[first_new:last] = final_in.to(inputs.dtype)
            outputs[first_new:last] = final_out.to(outputs.dtype)
            for route in routes.values():
                coverage[route] = coverage.get(route, 0) + 1
            neighbours = _neighbour_table(base_tokenizer, merged_tokenizer, new_ids, splits, wechsel)
        if spec.output_rows != "method":
            outputs[first_new:last] = output_rows(spec.output_rows, base_tokenizer, merged_tokenizer, new_ids,
                                                  base_output).to(outputs.dtype)
    return InitReport(spec.method, new_ids, coverage, neighbours, alignment_info)


def output_rows(kind: str, base_tokenizer: Any, merged_tokenizer: Any, new_ids: Sequence[int],
                base_output: torch.Tensor) -> torch.Tensor:
    """The new tokens' lm_head rows by `embeddings.output_rows` ("subword_mean" or "base_mean")."""
    if kind == "base_mean":
        return base_output.float().mean(dim=0).expand(len(new_ids), -1).clone()
    if kind != "subword_mean":
        raise ValueError(f"unknown output_rows {kind!r}: method, subword_mean or base_mean")
    rows = torch.empty(len(new_ids), base_output.shape[1], dtype=torch.float32)
    for row, token_id in enumerate(new_ids):
        pieces = base_tokenizer.encode(token_text(merged_tokenizer, token_id), add_special_tokens=False)
        rows[row] = base_output[pieces].float().mean(dim=0)
    return rows


def _mean_resize_rows(base: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    mean = base.mean(dim=0)
    centred = base - mean
    covariance = centred.T @ centred / max(1, base.shape[0] - 1)
    # A small ridge keeps the factorisation defined when rows < hidden (tiny models).
    covariance = covariance + 1e-6 * torch.eye(covariance.shape[0])
    factor = torch.linalg.cholesky(covariance)
    noise = torch.randn(count, base.shape[1], generator=generator)
    return mean + math.sqrt(1e-9) * noise @ factor.T  # transformers scales the covariance by 1e-9


def _neighbour_table(base_tokenizer: Any, merged_tokenizer: Any, new_ids: Sequence[int], splits: list[list[int]],
                     wechsel: Optional[WechselResult], sample: int = 40) -> list[dict[str, Any]]:
    step = max(1, len(new_ids) // sample)
    rows = []
    for index in range(0, len(new_ids), step):
        token_id = new_ids[index]
        row = {"id": token_id, "token": merged_tokenizer.convert_ids_to_tokens(token_id),
               "eeve pieces": " ".join(base_tokenizer.convert_ids_to_tokens(splits[index]))}
        if wechsel is not None and token_id in wechsel.neighbours:
            row["route"] = wechsel.route[token_id]
            row["wechsel neighbours"] = ", ".join(
                f"{base_tokenizer.convert_ids_to_tokens(i)} ({w:.2f})" for i, w in wechsel.neighbours[token_id][:5])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- pipeline steps
def _save_model_and_tokenizer(model: Any, tokenizer: Any, out_dir: Path) -> None:

    model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    save_tokenizer(tokenizer, out_dir)


def resize_artifact(config: ProjectConfig) -> dict[str, Any]:
    """2.01: models/resized/: base model untied and grown to the merged vocabulary (rows not yet set)."""
    from transformers import AutoTokenizer


    merged_dir = require(config, "merged_tokenizer")
    inputs = {"merged_tokenizer": merged_dir}
    if builds_base(config):
        inputs["base_model"] = require(config, "base_model")
    base_tokenizer = load_tokenizer(config)
    merged = AutoTokenizer.from_pretrained(merged_dir)
    model = load_model(config)
    check_tokenizer_matches_model(base_tokenizer, model)
    base_rows = rows_digest(model.get_input_embeddings().weight[: len(base_tokenizer)])
    keys = ["embeddings.pad_to_multiple_of", "tokenizer.expand"]
    with write_artifact(artifact_path(config, "resized_model"), "2.01", config, keys, inputs) as out:
        if config.tokenizer.expand:
            figures = resize_for_tokenizer(model, len(merged), config.embeddings.pad_to_multiple_of)
        else:  # the base as it is: no new rows, embeddings still tied (plain continued pretraining)
            rows = model.get_input_embeddings().weight.shape[0]
            figures = {"rows_before": rows, "rows_after": rows, "tokens": len(merged), "was_tied": int(not is_untied(model))}
        if rows_digest(model.get_input_embeddings().weight[: len(base_tokenizer)]) != base_rows:
            raise AssertionError("resizing changed base input rows")
        if rows_digest(model.get_output_embeddings().weight[: len(base_tokenizer)]) != base_rows:
            raise AssertionError("the untied lm_head is not a copy of the base input rows")
        _save_model_and_tokenizer(model, merged, out.path)
        out.metrics.update({**figures, "base_tokens": len(base_tokenizer), "new_tokens": len(merged) - len(base_tokenizer),
                            "free_padding_rows_used": max(0, min(figures["rows_before"], len(merged)) - len(base_tokenizer)),
                            "untied": is_untied(model)})
        result = dict(out.metrics)
    return result


def wechsel_inputs_for(config: ProjectConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """What WECHSEL needs (word vectors on both sides, their alignment, the dictionary) and the
    artifacts it read: fastText vectors from `embeddings.word_vectors`, or trained on the project's
    own corpora, with the dictionary terms as extra sentences so every anchor word has a vector."""

    spec = config.embeddings
    korean, english, dictionary_dir = (require(config, k) for k in ("korean", "english", "dictionary"))
    pairs = [(ko, en) for ko, en, _ in load_dictionary(dictionary_dir / DICTIONARY_FILE)]
    vectors = spec.word_vectors
    if vectors.korean and vectors.english:
        korean_vectors, english_vectors = load_word_vectors(vectors.korean, config), load_word_vectors(vectors.english, config)
    else:
        korean_vectors = train_word_vectors(sample_split(korean, "train", vectors.max_texts, spec.seed)[1]
                                            + [ko for ko, _ in pairs], vectors.dim, vectors.epochs, spec.seed,
                                            vectors.workers)
        english_vectors = train_word_vectors(sample_split(english, "train", vectors.max_texts, spec.seed)[1]
                                             + [en for _, en in pairs], vectors.dim, vectors.epochs, spec.seed,
                                             vectors.workers)
    korean_vectors, english_vectors = CenteredVectors(korean_vectors), CenteredVectors(english_vectors)
    return ({"korean_vectors": korean_vectors, "english_vectors": english_vectors,
             "alignment": align(korean_vectors, english_vectors, pairs),
             "dictionary": {unicodedata.normalize("NFC", ko): en for ko, en in pairs}},
            {"korean": korean, "english": english, "dictionary": dictionary_dir})


def initialize_artifact(config: ProjectConfig,
                        wechsel: Optional[tuple[dict[str, Any], dict[str, Path]]] = None) -> dict[str, Any]:
    """2.02: models/initialized/: every new row initialised; report of coverage and neighbours.
    `wechsel`: `wechsel_inputs_for(config)` computed once by a caller that initialises many times
    (the trained ablation), instead of training the word vectors again for each."""

    from transformers import AutoTokenizer


    spec = config.embeddings
    resized = require(config, "resized_model")
    inputs = {"resized_model": resized}
    base_tokenizer = load_tokenizer(config)
    merged = AutoTokenizer.from_pretrained(resized)
    model = model_class(resized).from_pretrained(resized, dtype=getattr(torch, config.base.torch_dtype))
    check_tokenizer_matches_model(merged, model)
    wechsel_inputs = None
    if spec.method in ("wechsel", "hybrid") and len(merged) > len(base_tokenizer):  # no new rows: no vectors
        wechsel_inputs, read = wechsel or wechsel_inputs_for(config)
        inputs.update(read)
    reference_input = rows_digest(model.get_input_embeddings().weight[: len(base_tokenizer)])
    reference_output = rows_digest(model.get_output_embeddings().weight[: len(base_tokenizer)])
    with write_artifact(artifact_path(config, "initialized_model"), "2.02", config, ["embeddings"], inputs) as out:
        report = initialize_new_rows(model, base_tokenizer, merged, spec, wechsel_inputs)
        if (rows_digest(model.get_input_embeddings().weight[: len(base_tokenizer)]) != reference_input
                or rows_digest(model.get_output_embeddings().weight[: len(base_tokenizer)]) != reference_output):
            raise AssertionError("initialisation touched a base row")
        _save_model_and_tokenizer(model, merged, out.path)
        (out.path / "init_report.json").write_text(json.dumps(report.__dict__, ensure_ascii=False, indent=1),
                                                   encoding="utf-8")
        out.metrics.update({"method": report.method, "new_tokens": len(report.new_ids), "coverage": report.coverage,
                            "alignment": report.alignment, "untied": is_untied(model)})
        result = {**out.metrics, "neighbours": report.neighbours}
    return result


def resized_headline(metrics: dict[str, Any]) -> str:
    """2.01's line in the run report."""
    return (f"rows {metrics.get('rows_before', 0):,} → {metrics.get('rows_after', 0):,} for "
            f"{metrics.get('tokens', 0):,} tokens; untied={metrics.get('untied')}")


def initialized_headline(metrics: dict[str, Any]) -> str:
    """2.02's line: the method and where each new row came from."""
    alignment = metrics.get("alignment") or {}
    extra = f"; Procrustes cosine {alignment['train_cosine']}" if "train_cosine" in alignment else ""
    return f"{metrics.get('method')}: {metrics.get('coverage')}{extra}"
