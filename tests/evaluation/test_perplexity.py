"""Perplexity windows cover every token once; bits per character follow from the same loss; a
merged-tokenizer model reads its held-out ids from the token store, not by tokenizing again."""
from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kormedgemma.evaluation.perplexity import Heldout, document_windows, perplexity, read_heldout


class CharTokenizer(SimpleNamespace):
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(c) % 50) for c in text]


def test_windows_predict_every_token_exactly_once():
    tokenizer = CharTokenizer()
    texts = ["가나다라마바사아자차카타파하" * 2, "짧음"]
    documents, ids_from = Heldout(texts).documents(tokenizer)
    assert ids_from == "tokenized"
    for stride in (None, 1, 3, 7):
        windows = document_windows(documents, seq_len=8, stride=stride)
        assert all(2 <= len(ids) <= 8 and len(labels) == len(ids) for ids, labels in windows)
        targets = [t for ids, labels in windows for t in labels[1:] if t != -100]
        assert len(targets) == sum(len(t) + 1 for t in texts)  # each text's tokens plus its <eos>
        assert targets == [t for d in documents for t in d.tolist()[1:]]  # in order, each once
        # every scored token sees its document's <bos> or seq_len - stride tokens before it
        for ids, labels in windows:
            first_scored = next(j for j in range(1, len(ids)) if labels[j] != -100)
            assert ids[0] == tokenizer.bos_token_id or first_scored >= 8 - (stride or 4)
    with pytest.raises(ValueError, match="stride"):
        document_windows(documents, seq_len=8, stride=8)


class ContextByteModel(torch.nn.Module):
    """A causal LM that gives every UTF-8 byte of the text the same probability (0.5) once it has
    seen 12 bytes of context or its document's <bos>, and 0.05 before: a model that assigns the
    same probability to the same characters, whatever the tokenizer, if it is given context.
    Its "hidden state" is already the logits (the head is the identity)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace())
        self.model = lambda input_ids, attention_mask=None: self.decode(input_ids)  # the decoder
        self.vocab = len(tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(list(range(self.vocab)))
        special = set(tokenizer.all_special_ids)
        self.bytes = [0 if i in special else 1 if p.startswith("<0x") and p.endswith(">") and len(p) == 6
                      else len(p.replace("▁", " ").encode("utf-8")) for i, p in enumerate(pieces)]
        self.bos = tokenizer.bos_token_id

    def get_output_embeddings(self):
        return torch.nn.Identity()

    def decode(self, input_ids):
        """Logits per position, as the decoder's last hidden state."""
        rows = []
        for ids in input_ids.tolist():
            logits = torch.full((len(ids), self.vocab + 1), -1e4)
            seen = 0
            for j in range(len(ids) - 1):
                seen += self.bytes[ids[j]]
                target = ids[j + 1]
                warm = ids[0] == self.bos
                lp = sum(math.log(0.5 if warm or seen + k >= 12 else 0.05) for k in range(self.bytes[target]))
                logits[j, target] = 0.0
                if lp < 0:  # the rest of the mass on a sink token past the vocabulary
                    logits[j, self.vocab] = math.log(-math.expm1(lp)) - lp
            rows.append(logits)
        return SimpleNamespace(last_hidden_state=torch.stack(rows))


def test_bits_per_char_is_the_same_for_both_tokenizers_and_any_window(tiny_phase3):
    """The base tokenizer needs more windows for the same Korean text; with cold window starts
    it paid for them in context it never had. Every scored token now sees context."""
    from transformers import AutoTokenizer

    from kormedgemma.core.artifacts import artifact_path

    config, _ = tiny_phase3
    texts = ["고혈압 환자는 염분 섭취를 줄이고 매일 혈압을 재야 하며, 당뇨병 환자는 혈당을 꾸준히 관리해야 한다. " * 3,
             "폐렴사슬알균은 지역사회 획득 폐렴의 가장 흔한 원인균이다."]
    figures = {}
    for key in ("base_model", "initialized_model"):
        tokenizer = AutoTokenizer.from_pretrained(artifact_path(config, key))
        model = ContextByteModel(tokenizer)
        for seq_len in (24, 64, 4096):
            figures[key, seq_len] = perplexity(model, tokenizer, Heldout(texts), seq_len=seq_len, progress=False)
    ideal = sum(len(t.encode("utf-8")) for t in texts) * 1.0 / sum(len(t) for t in texts)  # 1 bit a byte
    assert figures["base_model", 24]["windows"] > figures["initialized_model", 24]["windows"] > 2
    assert figures["base_model", 24]["tokens"] > figures["initialized_model", 24]["tokens"]
    for key, seq_len in figures:
        assert figures[key, seq_len]["bits_per_char"] == pytest.approx(ideal, abs=1e-4), (key, seq_len)
    # cutting windows without context (stride = seq_len - 1 keeps one token of it) is the bias fixed
    tokenizer = AutoTokenizer.from_pretrained(artifact_path(config, "base_model"))
    cold = perplexity(ContextByteModel(tokenizer), tokenizer, Heldout(texts), seq_len=24, stride=23, progress=False)
    assert cold["bits_per_char"] > ideal + 0.05


def test_bits_per_char_is_total_loss_over_characters(tiny_phase3):
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.evaluation.korean import load_for_eval

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
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.evaluation.korean import load_for_eval

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
    from kormedgemma.core.artifacts import artifact_path

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
