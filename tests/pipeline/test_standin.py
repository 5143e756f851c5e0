"""The rehearsal's stand-in tokenizer has Gemma 3's exact layout, and phase 1 merges into it."""
import json
from pathlib import Path

import pytest

from kormedgemma.pipeline.standin import BYTE, BYTE_FIRST_ID, GEMMA3_PIECES, build_standin_tokenizer, read_layout, standin_texts

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "gemma3_tokenizer_side_files" / "special_tokens.tsv").is_file(),
                                reason="../shared/data (Gemma 3 tokenizer side files, Korean Wikipedia) is not beside this checkout")
KOREAN = ["당뇨병성 신증은 만성 신장병의 주요 원인이다.", "고혈압 환자에게 메트포르민을 처방할 때 주의해야 할 점은?",
          "The patient's BP was 120/80 mmHg.\n\n  <table> 환자 혈압 🩺"]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    texts = standin_texts(SHARED / "kowiki_medical/kowiki_medical.jsonl", SHARED / "ko_en_medical_terms_kcd/kcd_ko_en.tsv",
                          korean_every=20)
    out = tmp_path_factory.mktemp("standin") / "tokenizer"
    figures = build_standin_tokenizer(SHARED / "gemma3_tokenizer_side_files", texts, out, trained_pieces=8000,
                                      check_texts=texts[:300] + KOREAN)
    return out, figures


def test_standin_tokenizer_has_gemma3_ids_for_every_special_and_added_token(standin):
    from transformers import AutoTokenizer

    out, figures = standin
    tokenizer = AutoTokenizer.from_pretrained(out)
    layout = read_layout(SHARED / "gemma3_tokenizer_side_files")
    assert len(layout) == 6415 and len(tokenizer) == GEMMA3_PIECES + 1 == figures["tokenizer_size"]
    for token in layout:
        assert tokenizer.convert_tokens_to_ids(token.content) == token.id, token
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>", "<image_soft_token>"]) == [105, 106, 262144]
    assert tokenizer.convert_tokens_to_ids("\n\n") == 108 and tokenizer.convert_tokens_to_ids("<table>") == 168
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "안녕"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\n안녕<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer("안녕")["input_ids"][0] == 2  # add_bos_token from Gemma 3's tokenizer config


def test_standin_sentencepiece_and_fast_tokenizer_agree_and_know_korean(standin):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    out, figures = standin
    assert figures["sentencepiece_agreement"] == 1.0 and figures["agreement_texts"] == 303
    assert figures["trained_pieces_with_hangul"] > 1000
    proto = pb.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    assert len(proto.pieces) == GEMMA3_PIECES
    assert proto.normalizer_spec.add_dummy_prefix is False and proto.trainer_spec.byte_fallback is True
    assert [p.piece for p in proto.pieces[BYTE_FIRST_ID:BYTE_FIRST_ID + 2]] == ["<0x00>", "<0x01>"]
    assert all(p.type == BYTE for p in proto.pieces[BYTE_FIRST_ID:BYTE_FIRST_ID + 256])
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in KOREAN:
        ids = processor.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False) == ids
        assert tokenizer.decode(ids) == text
    # Every Hangul syllable is a piece of the base (Gemma 3 knows them), so Korean needs no bytes.
    assert all(processor.piece_to_id(ch) not in (0, 3) for ch in "당뇨병성신증")


def test_phase1_merge_appends_new_korean_pieces_after_image_soft_token(standin, tmp_path):
    from transformers import AutoTokenizer

    from kormedgemma.vocab.tokenizer import NewPiece, base_vocabulary, merge_tokenizers, verify_merge

    out, _ = standin
    base_vocab = base_vocabulary(out)
    base = AutoTokenizer.from_pretrained(out)
    # New pieces as phase 1 makes them: joins of two base pieces the text already splits into.
    new = []
    for word in " ".join(KOREAN[:2]).split():
        pieces = base.convert_ids_to_tokens(base.encode(word, add_special_tokens=False))
        if len(pieces) >= 2 and pieces[0] + pieces[1] not in base_vocab and pieces[0] + pieces[1] not in new:
            new.append(pieces[0] + pieces[1])
    assert len(new) >= 3, "the stand-in already knows the probe words whole"
    figures = merge_tokenizers(out, [NewPiece(w, 10, "selected") for w in new], tmp_path / "merged")
    assert figures["first_new_id"] == 262_145 and figures["vocab_size"] == 262_145 + len(new)
    merged = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert [merged.convert_tokens_to_ids(w) for w in new] == list(range(262_145, 262_145 + len(new)))
    checks = verify_merge(base, merged, KOREAN, figures["first_new_id"])
    assert checks["new_ids_used_on_texts"] >= 1
    assert json.loads((tmp_path / "merged" / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"][-1]["id"] == 262144
