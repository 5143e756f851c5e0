"""Perplexity windows cover every token once; bits per character follow from the same loss; a
merged-tokenizer model reads its held-out ids from the token store, not by tokenizing again."""
from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kormedgemma.perplexity import Heldout, document_windows, perplexity, read_heldout


class CharTokenizer(SimpleNamespace):
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(c) % 50) for c in text]


def test_windows_predict_every_token_exactly_once():
    tokenizer = CharTokenizer()
    texts = ["가나다라마바사아자차카타파하" * 2, "짧음"]
    documents, ids_from = Heldout(texts).documents(tokenizer)
    assert ids_from == "tokenized"
    windows = document_windows(documents, seq_len=8)
    assert all(2 <= len(w) <= 8 for w in windows)
    predicted = sum(len(w) - 1 for w in windows)
    assert predicted == sum(len(t) + 1 for t in texts)  # each text's tokens plus its <eos>


def test_bits_per_char_is_total_loss_over_characters(tiny_phase3):
    from kormedgemma.artifacts import artifact_path
    from kormedgemma.evaluate import load_for_eval

    config, _ = tiny_phase3
    model, tokenizer = load_for_eval(artifact_path(config, "merged_model"))
    text = "고혈압 환자는 염분 섭취를 줄여야 한다."
    figures = perplexity(model, tokenizer, Heldout([text]), seq_len=256, progress=False)
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    nats = float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    assert figures["tokens"] == len(ids) - 1
    assert math.isclose(figures["bits_per_char"], nats / math.log(2) / len(text), rel_tol=1e-3)
    assert math.isclose(figures["perplexity"], math.exp(nats / (len(ids) - 1)), rel_tol=1e-3)


def test_merged_tokenizer_reads_heldout_ids_from_the_token_store(tiny_phase3):
    from kormedgemma.artifacts import artifact_path
    from kormedgemma.evaluate import load_for_eval

    config, _ = tiny_phase3
    model, tokenizer = load_for_eval(artifact_path(config, "merged_model"))
    stored = read_heldout(artifact_path(config, "korean"), 6, artifact_path(config, "token_store"), "korean")
    documents, ids_from = stored.documents(tokenizer)
    assert ids_from == "token store"
    assert len(documents) == len(stored.texts) == 6
    for document, text in zip(documents, stored.texts):  # the same ids a fresh tokenization gives
        expected = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
        assert document.tolist() == expected
    from_store = perplexity(model, tokenizer, stored, seq_len=64, progress=False)
    tokenized = perplexity(model, tokenizer, Heldout(stored.texts), seq_len=64, progress=False)
    assert (from_store["ids_from"], tokenized["ids_from"]) == ("token store", "tokenized")
    assert from_store["tokens"] == tokenized["tokens"]
    assert math.isclose(from_store["bits_per_char"], tokenized["bits_per_char"], rel_tol=1e-6)


def test_other_tokenizer_tokenizes_and_stale_store_is_refused(tiny_phase3, tmp_path):
    from kormedgemma.artifacts import artifact_path

    config, _ = tiny_phase3
    store = tmp_path / "tokens"
    shutil.copytree(artifact_path(config, "token_store"), store)
    heldout = read_heldout(artifact_path(config, "korean"), 4, store, "korean")
    documents, ids_from = heldout.documents(CharTokenizer())  # not the store's tokenizer (the base model's case)
    assert ids_from == "tokenized" and documents[0][0] == 1

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifact_path(config, "merged_tokenizer"))
    chars = np.memmap(store / "korean" / "valid.chars", dtype=np.uint32, mode="r+")
    chars[heldout.indices[0]] += 1  # the store no longer describes one of the sampled valid texts
    chars.flush()
    del chars
    with pytest.raises(ValueError, match="rebuild it with phase1_tokenizer/04_tokenize_corpus"):
        heldout.documents(tokenizer)
