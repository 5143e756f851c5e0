"""Perplexity windows cover every token once; bits per character follow from the same loss."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from kormedgemma.perplexity import document_windows, perplexity


class CharTokenizer(SimpleNamespace):
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(c) % 50) for c in text]


def test_windows_predict_every_token_exactly_once():
    tokenizer = CharTokenizer()
    texts = ["가나다라마바사아자차카타파하" * 2, "짧음"]
    windows = document_windows(tokenizer, texts, seq_len=8)
    assert all(2 <= len(w) <= 8 for w in windows)
    predicted = sum(len(w) - 1 for w in windows)
    assert predicted == sum(len(t) + 1 for t in texts)  # each text's tokens plus its <eos>


def test_bits_per_char_is_total_loss_over_characters(tiny_phase3):
    from kormedgemma.artifacts import artifact_path
    from kormedgemma.evaluate import load_for_eval

    config, _ = tiny_phase3
    model, tokenizer = load_for_eval(artifact_path(config, "merged_model"))
    text = "고혈압 환자는 염분 섭취를 줄여야 한다."
    figures = perplexity(model, tokenizer, [text], seq_len=256, progress=False)
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    nats = float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    assert figures["tokens"] == len(ids) - 1
    assert math.isclose(figures["bits_per_char"], nats / math.log(2) / len(text), rel_tol=1e-3)
    assert math.isclose(figures["perplexity"], math.exp(nats / (len(ids) - 1)), rel_tol=1e-3)
