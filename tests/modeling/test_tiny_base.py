"""The embedded default must look like MedGemma-4B to every later phase."""
import copy
import math

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, Gemma3ForConditionalGeneration

from kormedgemma.core.artifacts import artifact_path
from kormedgemma.core.manifest import read_manifest
from kormedgemma.modeling.base_model import check_tokenizer_matches_model


@pytest.fixture(scope="module")
def base(tiny_phase0):
    config, _ = tiny_phase0
    folder = artifact_path(config, "base_model")
    return folder, AutoTokenizer.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder)


def test_loads_with_auto_classes_as_gemma3_conditional_generation(base):
    _, _, model = base
    assert isinstance(model, Gemma3ForConditionalGeneration)
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000


def test_embeddings_are_tied_and_scaled_by_sqrt_hidden(base):
    _, _, model = base
    embeddings = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is embeddings.weight
    assert model.config.tie_word_embeddings is True
    hidden = embeddings.weight.shape[1]
    assert float(embeddings.embed_scale) == pytest.approx(math.sqrt(hidden), rel=1e-3)


def test_gemma3_special_token_layout(base):
    _, tokenizer, model = base
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    sp = spm.SentencePieceProcessor(model_file=str(base[0] / "tokenizer.model"))
    # <image_soft_token> is an added token right after the last SentencePiece piece, like Gemma 3's 262144.
    assert tokenizer.convert_tokens_to_ids("<image_soft_token>") == sp.get_piece_size()
    assert len(tokenizer) == sp.get_piece_size() + 1
    assert model.config.image_token_index == sp.get_piece_size()
    for piece in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"):
        assert tokenizer.convert_tokens_to_ids(piece) == sp.piece_to_id(piece)
    # Rows past the tokenizer are padding, rounded to 64 as in the real checkpoint.
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows > len(tokenizer)


def test_huggingface_and_sentencepiece_ids_agree_with_byte_fallback(base):
    folder, tokenizer, _ = base
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in ["The patient's HbA1c was 7.2%.", "  two  spaces\tand tab", "고혈압 환자 🙂", "x = f(1) + 2"]:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    korean = tokenizer.convert_ids_to_tokens(tokenizer.encode("환", add_special_tokens=False))
    assert korean == ["<0xED>", "<0x99>", "<0x98>"]  # English-only base: Hangul falls back to bytes
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id


def test_chat_template_renders_gemma3_turns(base):
    _, tokenizer, _ = base
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "고혈압이란?"},
                {"role": "assistant", "content": "혈압이 높은 상태입니다."},
                {"role": "user", "content": "원인은?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nAnswer briefly.\n\n고혈압이란?<end_of_turn>\n"
                    "<start_of_turn>model\n혈압이 높은 상태입니다.<end_of_turn>\n"
                    "<start_of_turn>user\n원인은?<end_of_turn>\n<start_of_turn>model\n")


def test_generates_greedily_and_deterministically(base):
    _, tokenizer, model = base
    inputs = tokenizer("Hypertension is", return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert first.shape == (1, inputs.input_ids.shape[1] + 6)
    assert torch.equal(first, second)


def test_manifest_records_the_build(tiny_phase0, base):
    manifest = read_manifest(base[0])
    assert manifest["step"] == "0.00" and manifest["profile"] == "tiny"
    assert manifest["metrics"]["tied_embeddings"] is True
    assert manifest["inputs"]["tokenizer_corpus"]["sha256"]
    assert "model.safetensors" in manifest["outputs"]


def test_mismatched_tokenizer_and_model_is_a_clear_error(base):
    _, tokenizer, model = base
    check_tokenizer_matches_model(tokenizer, model)  # the matching pair passes
    too_small = copy.deepcopy(model)
    too_small.resize_token_embeddings(512)
    with pytest.raises(ValueError, match="tokenizer has 1025 tokens but the model only 512 embedding rows"):
        check_tokenizer_matches_model(tokenizer, too_small)
    other_family = copy.deepcopy(model)
    other_family.config.text_config.bos_token_id = 7
    with pytest.raises(ValueError, match="bos token id differs: tokenizer 2, model 7"):
        check_tokenizer_matches_model(tokenizer, other_family)
