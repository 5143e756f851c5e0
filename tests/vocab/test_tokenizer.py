"""Phase 1: the merged tokenizer keeps every base behaviour and makes Korean cheaper."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from config.training_config import TokenizerConfig
from kormedgemma.core.artifacts import artifact_path
from kormedgemma.vocab.tokenizer import (
    INVARIANT_PROBES,
    NORMAL,
    Candidate,
    NewPiece,
    count_piece_frequencies,
    frequent_new_pieces,
    load_new_pieces,
    load_sp_proto,
    merge_tokenizers,
    plan_new_pieces,
    sentencepiece_agrees,
    verify_merge,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizers(tiny_phase1):
    config, _, _ = tiny_phase1
    base = AutoTokenizer.from_pretrained(artifact_path(config, "base_model"))
    merged = AutoTokenizer.from_pretrained(artifact_path(config, "merged_tokenizer"))
    return config, base, merged


def _valid_korean(config):
    from kormedgemma.data.readers import read_split

    return read_split(artifact_path(config, "korean"), "valid")


def test_every_base_token_keeps_its_id_and_new_ids_follow_the_image_token(tokenizers):
    _, base, merged = tokenizers
    base_vocab, merged_vocab = base.get_vocab(), merged.get_vocab()
    assert all(merged_vocab[token] == i for token, i in base_vocab.items())
    assert merged.convert_tokens_to_ids("<image_soft_token>") == 1024 == len(base) - 1
    new_ids = sorted(i for t, i in merged_vocab.items() if t not in base_vocab)
    assert new_ids == list(range(len(base), len(merged)))
    assert len(set(merged_vocab)) == len(merged_vocab) == len(set(merged_vocab.values()))


def test_special_tokens_and_chat_template_are_unchanged(tokenizers):
    _, base, merged = tokenizers
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(base, name) == getattr(merged, name)
    messages = [{"role": "user", "content": "고혈압 환자의 목표 혈압은?"}]
    assert base.apply_chat_template(messages, tokenize=False) == merged.apply_chat_template(messages, tokenize=False)
    assert merged.convert_tokens_to_ids("<start_of_turn>") == base.convert_tokens_to_ids("<start_of_turn>")


@pytest.mark.parametrize("text", [*INVARIANT_PROBES, "", " ", "\n\n\n", "x" * 200, "🙂" * 5, "COVID-19 PCR (+)"])
def test_text_without_new_pieces_tokenizes_exactly_as_before(tokenizers, text):
    _, base, merged = tokenizers
    assert merged.encode(text) == base.encode(text)


def test_korean_round_trips_and_uses_new_pieces(tokenizers):
    config, base, merged = tokenizers
    texts = _valid_korean(config) + ["  고혈압   환자\t당뇨병\n", "환자들이 환자를", "뷁 똠 (드문 글자)"]
    for text in texts:
        ids = merged.encode(text, add_special_tokens=False)
        assert merged.decode(ids) == text
    used = {i for t in texts for i in merged.encode(t, add_special_tokens=False) if i >= len(base)}
    assert len(used) > 50


def test_new_pieces_are_real_vocabulary_not_added_tokens(tokenizers):
    config, base, merged = tokenizers
    added = {str(t) for t in merged.added_tokens_decoder.values()}
    assert added == {str(t) for t in base.added_tokens_decoder.values()}
    folder = artifact_path(config, "merged_tokenizer")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    proto = load_sp_proto(folder / "tokenizer.model")
    for piece in load_new_pieces(artifact_path(config, "new_tokens"))[:50]:
        token_id = data["model"]["vocab"][piece.piece]
        assert proto.pieces[token_id].piece == piece.piece and proto.pieces[token_id].type == NORMAL
        assert proto.pieces[token_id].score < min(p.score for p in proto.pieces[:1024] if p.type == NORMAL)


def test_sentencepiece_model_and_fast_tokenizer_agree(tokenizers):
    config, _, merged = tokenizers
    folder = artifact_path(config, "merged_tokenizer")
    assert sentencepiece_agrees(folder / "tokenizer.model", merged, _valid_korean(config)) == 1.0


def test_korean_tokens_per_character_fall_at_least_20_percent(tiny_phase1):
    _, _, figures = tiny_phase1
    assert figures["korean_reduction"] >= 0.20
    english = [r for r in figures["efficiency"] if r["corpus"] == "english_valid"]
    assert english[0]["tokens"] == english[1]["tokens"]


def test_selected_pieces_form_in_segmentation(tokenizers):
    """Each chosen piece, seen as text on its own, comes out as that one new id (merge path exists)."""
    config, base, merged = tokenizers
    pieces = [p for p in load_new_pieces(artifact_path(config, "new_tokens")) if p.role == "selected"]
    formed = sum(merged.encode(p.piece.replace("▁", " "), add_special_tokens=False) ==
                 [merged.convert_tokens_to_ids(p.piece)] for p in pieces)
    assert formed / len(pieces) >= 0.9


def test_frequencies_equal_a_manual_count(tiny_phase1, tmp_path):
    config, _, _ = tiny_phase1
    model = artifact_path(config, "korean_sp") / "korean_sp.model"
    texts = _valid_korean(config)
    result = count_piece_frequencies(model, iter(texts), num_threads=2, batch_size=7)
    processor = spm.SentencePieceProcessor(model_file=str(model))
    manual = np.zeros(processor.get_piece_size(), dtype=np.int64)
    for text in texts:
        for piece_id in processor.encode(text):
            manual[piece_id] += 1
    assert np.array_equal(result.counts, manual)
    assert result.texts == len(texts) and result.megabytes > 0


def test_filter_applies_threshold_hangul_base_and_ranking(tiny_phase1):
    config, _, _ = tiny_phase1
    model = artifact_path(config, "korean_sp") / "korean_sp.model"
    proto = load_sp_proto(model)
    counts = np.zeros(len(proto.pieces), dtype=np.int64)
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    hangul = [p.piece for p in proto.pieces if p.type == NORMAL and any("가" <= ch <= "힣" for ch in p.piece)][:4]
    latin = next(p.piece for p in proto.pieces if p.type == NORMAL and p.piece.isascii() and p.piece.isalpha())
    for piece, count in zip(hangul, (50, 9, 2, 30)):
        counts[ids[piece]] = count
    counts[ids[latin]] = 100
    spec = TokenizerConfig(vocab_size=3000, min_frequency=5, max_new_tokens=10)
    found = frequent_new_pieces(model, counts, base_vocab={hangul[3]}, spec=spec)
    assert [(c.piece, c.frequency) for c in found] == [(hangul[0], 50), (hangul[1], 9)]


def test_cap_counts_the_parents_too(tiny_phase1):
    config, _, _ = tiny_phase1
    model = artifact_path(config, "korean_sp") / "korean_sp.model"
    proto = load_sp_proto(model)
    long_piece = next(p.piece for p in proto.pieces if p.type == NORMAL and len(p.piece) >= 3
                      and all("가" <= ch <= "힣" for ch in p.piece))
    base_vocab = {p.piece for p in proto.pieces[:0]} | {"▁"}
    plan = plan_new_pieces([Candidate(long_piece, 10, 0)], model, base_vocab, max_new_tokens=100)
    assert plan[-1].piece == long_piece and plan[-1].role == "selected"
    assert {p.role for p in plan[:-1]} == {"parent"} and all(ch in {p.piece for p in plan} for ch in long_piece)
    assert plan_new_pieces([Candidate(long_piece, 10, 0)], model, base_vocab, max_new_tokens=len(plan) - 1) == []


def test_merge_refuses_a_piece_the_base_already_has(tiny_phase0, tmp_path):
    config, _ = tiny_phase0
    with pytest.raises(ValueError, match="already in the vocabulary"):
        merge_tokenizers(artifact_path(config, "base_model"), [NewPiece("▁the", 5, "selected")], tmp_path / "m")


def test_a_new_piece_built_from_a_later_new_piece_segments_as_in_sentencepiece(tiny_phase0, tmp_path):
    """`▁이루어진다` listed before its half `▁이루어진`: the fast tokenizer still gets the merge."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    config, _ = tiny_phase0
    base = artifact_path(config, "base_model")
    vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    head, tail = next((h, t) for h in sorted(vocab) for t in sorted(vocab)
                      if h.startswith("▁") and len(h) > 2 and t.isalpha() and len(t) > 1
                      and h + t not in vocab and h + t + t not in vocab and t + t not in vocab)
    longer, shorter = head + tail + tail, head + tail
    merge_tokenizers(base, [NewPiece(longer, 9, "selected"), NewPiece(shorter, 5, "parent")], tmp_path / "m")
    fast = AutoTokenizer.from_pretrained(tmp_path / "m")
    slow = spm.SentencePieceProcessor(model_file=str(tmp_path / "m" / "tokenizer.model"))
    text = longer.replace("▁", " ")  # " word": no dummy prefix, the space is the piece's ▁
    assert slow.encode(text) == fast.encode(text, add_special_tokens=False) == [fast.convert_tokens_to_ids(longer)]


def test_merge_refuses_mismatched_base_files(tiny_phase0, tmp_path):
    config, _ = tiny_phase0
    base = artifact_path(config, "base_model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.model").write_bytes((base / "tokenizer.model").read_bytes())
    data = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["vocab"]["<0x00>"], data["model"]["vocab"]["<0x01>"] = (data["model"]["vocab"]["<0x01>"],
                                                                          data["model"]["vocab"]["<0x00>"])
    (broken / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="disagree on pieces/ids"):
        merge_tokenizers(broken, [NewPiece("환", 5, "selected")], tmp_path / "m")
    (broken / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.model"):
        merge_tokenizers(broken, [], tmp_path / "m")


def test_verify_merge_catches_a_changed_probe(tokenizers):
    config, base, merged = tokenizers
    with pytest.raises(AssertionError, match="tokenised differently"):
        verify_merge(base, merged, [], len(base), probes=["고혈압"])  # Korean does change, by design


def test_tokenizer_stats_cli_prints_the_figures(tiny_phase1, tmp_path, capsys):
    from kormedgemma.cli import main

    config, _, figures = tiny_phase1
    from kormedgemma.data.readers import split_files

    valid, = split_files(artifact_path(config, "korean"), "valid")
    assert main(["tokenizer-stats", "--tokenizer", str(artifact_path(config, "base_model")),
                 "--tokenizer", str(artifact_path(config, "merged_tokenizer")), "--text", str(valid)]) == 0
    rows = json.loads(capsys.readouterr().out)["tokenizers"]
    assert rows[0]["tokens_per_char"] == figures["korean_tokens_per_char_before"]
    assert rows[1]["tokens_per_char"] == figures["korean_tokens_per_char_after"]
    assert main(["tokenizer-stats", "--tokenizer", str(tmp_path / "nope"), "--text", str(valid)]) == 2


@pytest.mark.skipif(not (SHARED / "ko_medical_terms" / "dictionary_terms.txt").is_file(),
                    reason="../shared/data/ko_medical_terms is not on this machine")
def test_real_medical_terms_get_cheaper(tokenizers):
    _, base, merged = tokenizers
    terms = (SHARED / "ko_medical_terms" / "dictionary_terms.txt").read_text(encoding="utf-8").splitlines()
    before = sum(len(base.encode(t, add_special_tokens=False)) for t in terms)
    after = sum(len(merged.encode(t, add_special_tokens=False)) for t in terms)
    assert after < 0.8 * before
    assert all(merged.decode(merged.encode(t, add_special_tokens=False)) == t for t in terms)


GEMMA3 = Path(os.environ.get("KORMEDGEMMA_GEMMA3_TOKENIZER", SHARED / "gemma3_tokenizer"))


@pytest.mark.skipif(not (GEMMA3 / "tokenizer.model").is_file(),
                    reason="no real Gemma 3 tokenizer here (../shared/data lists none); set "
                           "KORMEDGEMMA_GEMMA3_TOKENIZER to a folder with tokenizer.model + tokenizer.json")
def test_merge_into_the_real_gemma3_tokenizer(tiny_phase1, tmp_path):
    config, _, _ = tiny_phase1
    pieces = [p for p in load_new_pieces(artifact_path(config, "new_tokens"))
              if p.piece not in {q.piece for q in load_sp_proto(GEMMA3 / "tokenizer.model").pieces}]
    info = merge_tokenizers(GEMMA3, pieces, tmp_path / "merged")
    base, merged = AutoTokenizer.from_pretrained(GEMMA3), AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert info["first_new_id"] == len(base) and len(merged) == len(base) + len(pieces)
    verify_merge(base, merged, _valid_korean(config), info["first_new_id"])


def test_sentencepiece_vocabulary_errors_name_the_right_fix(tmp_path, monkeypatch):
    import re

    from kormedgemma.core.config import load_config
    from kormedgemma.vocab import tokenizer as tokenizer_module
    from kormedgemma.vocab.tokenizer import sentencepiece_vocab_error, train_korean_sentencepiece, train_tokenizer_artifact

    # 3,000 distinct Hangul syllables, all kept (coverage 1.0): SentencePiece needs one piece per
    # character plus 256 byte pieces and <unk> = 3,257, more than vocab_size=1000.
    syllables = [chr(code) for code in range(0xAC00, 0xAC00 + 3000)]
    korean = tmp_path / "korean"
    korean.mkdir()
    (korean / "train.jsonl").write_text("".join(json.dumps({"text": "".join(syllables[i:i + 10])}) + "\n"
                                                for i in range(0, 3000, 10)), encoding="utf-8")
    config = load_config("tiny", overrides={"paths.root": str(tmp_path / "root"), "tokenizer.vocab_size": 1000,
                                            "tokenizer.character_coverage": 1.0, "tokenizer.num_threads": 1})
    monkeypatch.setattr(tokenizer_module, "require", lambda _config, key: korean)  # the corpus it trains on
    with pytest.raises(ValueError) as small:
        train_tokenizer_artifact(config)
    message = str(small.value)
    assert "Vocabulary size is smaller than required_chars. 1000 vs 3257." in message  # SentencePiece's own words
    assert message.startswith("tokenizer.vocab_size=1000 is too small for the characters of this corpus: "
                              "with tokenizer.character_coverage=1.0 SentencePiece needs 3257 pieces")
    assert "Raise tokenizer.vocab_size to at least 3257 or lower tokenizer.character_coverage" in message
    assert "too large" not in message and "Lower tokenizer.vocab_size" not in message
    assert not tokenizer_module.artifact_path(config, "korean_sp").exists()

    # The opposite failure: a handful of lines cannot fill 5,000 pieces.
    with pytest.raises(RuntimeError) as high:
        train_korean_sentencepiece(["고혈압 환자의 치료", "당뇨병 증상과 진단", "감염 환자의 치료"] * 3, tmp_path / "sp",
                                   TokenizerConfig(vocab_size=5000, num_threads=1))
    raw = str(high.value)
    most = int(re.search(r"Vocabulary size too high \(5000\)\. Please set it to a value <= (\d+)\.", raw).group(1))
    assert 100 < most < 1000
    advice = sentencepiece_vocab_error(raw, TokenizerConfig(vocab_size=5000))
    assert advice.startswith(f"tokenizer.vocab_size=5000 is too large for this corpus: SentencePiece can make at "
                             f"most {most} pieces from it. Lower tokenizer.vocab_size to {most} or less or add "
                             f"Korean text")
    assert "Raise" not in advice
    assert sentencepiece_vocab_error("INTERNAL: unrelated failure", TokenizerConfig()) is None
