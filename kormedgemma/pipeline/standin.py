"""Stand-ins with MedGemma-4B's shapes and Gemma 3's tokenizer layout, for rehearsing the a5000 run.

The real checkpoint and tokenizer need the Hugging Face Hub. What breaks at 4B scale — 8.6 GB
checkpoints loaded and saved in every step, a 262,144-piece SentencePiece model merged with new
Korean pieces, 272K embedding rows in every phase — depends on shapes and layout, not on trained
weights, so a rehearsal can run on stand-ins built here:

- a tokenizer with Gemma 3's layout: 262,144 SentencePiece pieces (BPE, byte fallback, no dummy
  prefix, text kept verbatim), the 6,415 special and added tokens at Gemma 3's exact ids (read
  from the tokenizer side files), byte pieces after the low block of added tokens (where Gemma 2
  puts them, ids 238..493), and ordinary pieces that include Korean: a BPE trained on the given
  Korean and English text, then every Hangul syllable, then filler (CJK pieces) up to the size.
  So phase 1's "new to the base" filter meets a base that already knows many Korean syllables and
  words, as Gemma 3 does. `tokenizer.model` and `tokenizer.json` agree, and the HF side carries
  Gemma 3's own tokenizer config, special-token map and chat template;
- a random-weight `Gemma3ForConditionalGeneration` of MedGemma-4B's exact configuration (vision
  tower included, tied embeddings, 262,208 rows), saved in bf16 with that tokenizer.

Random weights mean losses and accuracies say nothing about Korean; times, memory, disk and
whether each phase survives the shapes do.
"""
from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from kormedgemma.core.io import atomic_dir, numbered_rows
from kormedgemma.modeling.base_model import (
    GEMMA_TEXT_RULES,
    check_tokenizer_matches_model,
    hf_tokenizer_from_sentencepiece,
    medgemma_4b_config,
)
from kormedgemma.vocab.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, load_sp_proto, new_sp_proto

GEMMA3_PIECES = 262_144
# Gemma 3's added tokens fill ids 0..237 and 255968..262144; bytes follow the low block as in
# Gemma 2 (whose added tokens end at 216 and whose <0x00> is 217).
BYTE_FIRST_ID = 238
SIDE_FILES = ("tokenizer_config.gemma3_base.json", "special_tokens_map.json", "chat_template.jinja",
              "special_tokens.tsv")
HANGUL_SYLLABLES = range(0xAC00, 0xD7A4)
CJK_IDEOGRAPHS = range(0x4E00, 0xA000)

_CONTROL = {"<pad>", "<eos>", "<bos>", "<mask>", "[multimodal]"}


@dataclass(frozen=True)
class LayoutToken:
    """One of Gemma 3's special or added tokens, with the flags its tokenizer config gives it."""

    id: int
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "ntr\\":
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def read_layout(side_files: Path) -> list[LayoutToken]:
    """Gemma 3's special and added tokens from `special_tokens.tsv`, sorted by id."""
    path = Path(side_files) / "special_tokens.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: point --side-files at the Gemma 3 tokenizer side files "
                                "(../shared/data/gemma3_tokenizer_side_files holds them)")
    flag = {"True": True, "False": False}
    tokens = []
    with open(path, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            tokens.append(LayoutToken(int(row["id"]), _unescape(row["content"]), flag[row["special"]],
                                      flag[row["lstrip"]], flag[row["rstrip"]], flag[row["normalized"]],
                                      flag[row["single_word"]]))
    ids = [t.id for t in tokens]
    if len(set(ids)) != len(ids) or len({t.content for t in tokens}) != len(tokens):
        raise ValueError(f"{path}: duplicate ids or contents")
    return sorted(tokens, key=lambda t: t.id)


def _piece_type(token: LayoutToken) -> int:
    if token.content == "<unk>":
        return UNKNOWN
    return CONTROL if token.content in _CONTROL else USER_DEFINED


def _filler(size: int, taken: set[str]) -> Iterable[str]:
    """Hangul syllables, then CJK ideographs, then CJK pairs: pieces no Korean text needs merged."""
    for code in (*HANGUL_SYLLABLES, *CJK_IDEOGRAPHS):
        if chr(code) not in taken:
            yield chr(code)
    cjk = [chr(c) for c in CJK_IDEOGRAPHS]
    for left in cjk:
        for right in cjk:
            if left + right not in taken:
                yield left + right


def build_sentencepiece(layout: Sequence[LayoutToken], texts: Sequence[str], out_path: Path,
                        size: int = GEMMA3_PIECES, trained_pieces: int = 16_000, threads: int = 8) -> dict[str, Any]:
    """Write a `size`-piece SentencePiece BPE model with the layout's tokens at their ids."""
    import sentencepiece as spm


    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no text to train the stand-in tokenizer's ordinary pieces on")
    in_range = [t for t in layout if t.id < size]
    fixed = {t.id: t for t in in_range}
    low_end = next(i for i in range(size) if i not in fixed)
    if low_end != BYTE_FIRST_ID and size == GEMMA3_PIECES:
        raise ValueError(f"the side files' low block of added tokens ends at {low_end - 1}, not "
                         f"{BYTE_FIRST_ID - 1}: they are not Gemma 3's")
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=f"{tmp}/sp", model_type="bpe",
            vocab_size=trained_pieces, byte_fallback=True, character_coverage=0.9995,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>", num_threads=threads, minloglevel=2, **GEMMA_TEXT_RULES)
        trained = load_sp_proto(Path(f"{tmp}/sp.model"))
    proto = new_sp_proto()
    proto.trainer_spec.CopyFrom(trained.trainer_spec)
    proto.normalizer_spec.CopyFrom(trained.normalizer_spec)
    proto.trainer_spec.vocab_size = size
    reserved = {t.content for t in in_range} | {f"<0x{b:02X}>" for b in range(256)}
    ordinary = [p.piece for p in trained.pieces if p.type == NORMAL and p.piece not in reserved]
    learned = len(ordinary)
    taken = reserved | set(ordinary)
    slots = size - len(fixed) - 256
    if slots < learned:
        raise ValueError(f"{learned} trained pieces do not fit the {slots} ordinary slots")
    filler = _filler(slots - learned, taken)
    ordinary.extend(next(filler) for _ in range(slots - learned))
    pieces = iter(ordinary)
    rank = 0
    for token_id in range(size):
        entry = proto.pieces.add()
        if token_id in fixed:
            entry.piece, entry.type, entry.score = fixed[token_id].content, _piece_type(fixed[token_id]), 0.0
        elif BYTE_FIRST_ID <= token_id < BYTE_FIRST_ID + 256:
            entry.piece, entry.type, entry.score = f"<0x{token_id - BYTE_FIRST_ID:02X}>", BYTE, 0.0
        else:
            # Merge priority follows position: the trained BPE's own order first, filler last.
            entry.piece, entry.type, entry.score = next(pieces), NORMAL, -float(rank)
            rank += 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(proto.SerializeToString())
    korean = sum(any("\uac00" <= ch <= "\ud7a3" for ch in piece) for piece in ordinary[:learned])
    return {"pieces": size, "layout_tokens": len(fixed), "byte_pieces": 256, "trained_pieces": learned,
            "trained_pieces_with_hangul": korean, "filler_pieces": slots - learned}


def build_standin_tokenizer(side_files: Path, texts: Sequence[str], out_dir: Path, size: int = GEMMA3_PIECES,
                            trained_pieces: int = 16_000, check_texts: Sequence[str] = ()) -> dict[str, Any]:
    """Write tokenizer.model + tokenizer.json + Gemma 3's side files into `out_dir`; returns figures.

    The HF side is converted from the SentencePiece model, then given Gemma 3's added-token list
    (the same 6,415 tokens, flags and ids as the real tokenizer.json) and its config files, so
    `AutoTokenizer.from_pretrained(out_dir)` sees what it sees for google/medgemma-4b-it.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer


    side_files = Path(side_files)
    missing = [name for name in SIDE_FILES if not (side_files / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{side_files} lacks {', '.join(missing)}: it must be the Gemma 3 tokenizer "
                                "side files folder (../shared/data/gemma3_tokenizer_side_files)")
    layout = read_layout(side_files)
    started = time.perf_counter()
    with atomic_dir(Path(out_dir)) as out_dir:  # in place only once it checks out
        sp_path = out_dir / "tokenizer.model"
        figures = build_sentencepiece(layout, texts, sp_path, size, trained_pieces)
        tokenizer = hf_tokenizer_from_sentencepiece(sp_path)
        tokenizer.save_pretrained(out_dir)
        # Gemma 3's added tokens, exactly: ids, contents and flags, including <image_soft_token> past
        # the SentencePiece pieces.
        data = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
        data["added_tokens"] = [{"id": t.id, "content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
                                 "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special}
                                for t in layout if t.id <= size]
        (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        # copyfile, not copy: the side files may be read-only, and later phases rewrite their copies.
        shutil.copyfile(side_files / "tokenizer_config.gemma3_base.json", out_dir / "tokenizer_config.json")
        for name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copyfile(side_files / name, out_dir / name)
        (out_dir / "chat_template.json").unlink(missing_ok=True)

        loaded = AutoTokenizer.from_pretrained(out_dir)
        wrong = [t.content for t in layout if t.id <= size and loaded.convert_tokens_to_ids(t.content) != t.id]
        if wrong:
            raise RuntimeError(f"{len(wrong)} layout token(s) at the wrong id after loading, e.g. {wrong[:3]}")
        processor = spm.SentencePieceProcessor(model_file=str(sp_path))
        probes = list(check_texts) or list(texts[:200])
        agree = sum(processor.encode(t) == loaded.encode(t, add_special_tokens=False) for t in probes)
        figures.update({
            "tokenizer_size": len(loaded), "image_soft_token_id": loaded.convert_tokens_to_ids("<image_soft_token>"),
            "bos_id": loaded.bos_token_id, "eos_id": loaded.eos_token_id, "pad_id": loaded.pad_token_id,
            "sentencepiece_agreement": round(agree / len(probes), 4) if probes else None,
            "agreement_texts": len(probes), "seconds": round(time.perf_counter() - started, 1),
            "tokenizer_json_mb": round((out_dir / "tokenizer.json").stat().st_size / 1e6, 1),
        })
    return figures


def standin_texts(korean_jsonl: Path, dictionary_tsv: Path | None = None,
                  english_txt: Sequence[Path] = (), korean_every: int = 10) -> list[str]:
    """Text for the stand-in's ordinary pieces: every `korean_every`-th Korean document, so the base
    knows the common Korean syllables and words (as Gemma 3 does) but not the domain's compounds;
    English from the dictionary's `en` column and plain-text files.

    Measured on the real Korean Wikipedia medical articles: with every second document (and 32,000
    trained pieces) the base already knew so much that phase 1 found 150 new pieces at
    min_frequency 20; every tenth (and 16,000) leaves 10,000 at min_frequency 5, the a5000 shape
    (272,145 tokens, Korean tokens/char 0.466 -> 0.407)."""

    korean = [row["text"] for _, row in numbered_rows(Path(korean_jsonl))][::korean_every]
    english: list[str] = []
    if dictionary_tsv is not None:
        with open(dictionary_tsv, encoding="utf-8", newline="") as handle:
            rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            if "en" not in (rows.fieldnames or []):
                raise ValueError(f"{dictionary_tsv}: expected a header row with an 'en' column")
            english += [row["en"] for row in rows if row.get("en")]
    for path in english_txt:
        english += [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return korean + english


def build_standin_model(tokenizer_dir: Path, out_dir: Path, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Save a random-weight MedGemma-4B-shaped model (bf16) with the stand-in tokenizer."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration


    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(medgemma_4b_config())
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = torch.bfloat16
    check_tokenizer_matches_model(tokenizer, model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging)
        # The tokenizer's files as built (a Hub folder holds them as published), not a re-save.
        for path in Path(tokenizer_dir).iterdir():
            shutil.copyfile(path, staging / path.name)
    embeddings = model.get_input_embeddings().weight
    figures = {"parameters": sum(p.numel() for p in model.parameters()),
               "embedding_rows": embeddings.shape[0], "hidden_size": embeddings.shape[1],
               "tied_embeddings": model.get_output_embeddings().weight is embeddings,
               "folder_gb": round(sum(p.stat().st_size for p in out_dir.iterdir()) / 1e9, 2),
               "seconds": round(time.perf_counter() - started, 1)}
    del model
    return figures
