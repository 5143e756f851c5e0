"""The base model and tokenizer: MedGemma from the Hub or a folder, or the tiny embedded default.

The tiny default is built with the same classes as MedGemma-4B (`Gemma3ForConditionalGeneration`
with a small SigLIP vision tower, tied and sqrt(hidden)-scaled embeddings) and a tokenizer in
Gemma's SentencePiece form (BPE with byte fallback, Gemma 3's special and chat tokens, an added
`<image_soft_token>` beyond the SentencePiece pieces, embedding rows padded past the tokenizer).
Every later phase therefore meets the same quirks on CPU that it meets on the real model.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from config.training_config import ProjectConfig, TinyModelConfig
from kormedgemma.core.artifacts import artifact_path
from kormedgemma.core.config import resolve_input, resolve_path
from kormedgemma.core.environment import cap_gpu_memory
from kormedgemma.core.hub import hub_access, is_hub_id, model_ref
from kormedgemma.core.manifest import write_artifact
from kormedgemma.modeling.gguf_base import is_gguf_ref, materialise_gguf, resolve_gguf

# Gemma 3's fixed low ids, in its order: pad 0, eos 1, bos 2, unk 3, mask 4, [multimodal] 5.
SPECIAL_PIECES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
CONTROL_SYMBOLS = ["<mask>", "[multimodal]"]
CHAT_SYMBOLS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
IMAGE_SOFT_TOKEN = "<image_soft_token>"
# Model folders are written in shards of this size: `save_pretrained` turns a shard into bytes on the
# CPU before writing it, so a one-shard 10 GB MedGemma-4B folder would need 10 GB more RAM, a 2 GB
# shard 2 GB. A folder of shards loads with `from_pretrained` like one file does.
SHARD_SIZE = "2GB"
TEMPLATE = Path(__file__).parent / "templates" / "gemma3_chat.jinja"


# Gemma keeps text verbatim: no normalisation, no dummy prefix, whitespace pieces allowed, digits
# split one by one. Every Gemma-form SentencePiece model this project trains uses these.
GEMMA_TEXT_RULES = dict(normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                        allow_whitespace_only_pieces=True, split_digits=True)


def chat_template() -> str:
    return TEMPLATE.read_text(encoding="utf-8")


def train_base_sentencepiece(corpus: Path, out_prefix: Path, vocab_size: int) -> Path:
    """Train a Gemma-form SentencePiece BPE model on English text; returns the .model path."""
    import sentencepiece as spm

    lines = [line.strip() for line in Path(corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{corpus} holds no text to train the tiny base tokenizer on")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out_prefix), model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece=SPECIAL_PIECES["pad"], eos_piece=SPECIAL_PIECES["eos"],
        bos_piece=SPECIAL_PIECES["bos"], unk_piece=SPECIAL_PIECES["unk"],
        control_symbols=CONTROL_SYMBOLS, user_defined_symbols=CHAT_SYMBOLS, minloglevel=2, **GEMMA_TEXT_RULES,
    )
    return Path(f"{out_prefix}.model")


def hf_tokenizer_from_sentencepiece(sp_model: Path, image_token: bool = True) -> Any:
    """Convert a SentencePiece model to the HF (fast) Gemma tokenizer and check they agree.
    `image_token`: add `<image_soft_token>` past the pieces, as the multimodal Gemma 3 does.

    `GemmaTokenizer(vocab_file=...)` silently builds a 5-token tokenizer in transformers 5;
    `from_pretrained(folder, vocab_file=...)` runs the real conversion, so use that and verify.
    """
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sp_model, Path(tmp) / "tokenizer.model")
        tokenizer = GemmaTokenizer.from_pretrained(tmp, vocab_file=str(Path(tmp) / "tokenizer.model"),
                                                   add_bos_token=True, add_eos_token=False)
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    if len(tokenizer) != processor.get_piece_size():
        raise RuntimeError(f"converted tokenizer has {len(tokenizer)} tokens, SentencePiece model "
                           f"{processor.get_piece_size()}: conversion went wrong")
    _match_whitespace_runs_after_normalising(tokenizer)
    for probe in ("The patient's BP was 120/80 mmHg.  환자 혈압", "def f():\n    return 1\n\n\n" + " " * 42 + "x\t\ty"):
        if tokenizer.encode(probe, add_special_tokens=False) != processor.encode(probe):
            raise RuntimeError(f"converted tokenizer and SentencePiece model segment {probe!r} differently")
    if image_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_SOFT_TOKEN]})
    tokenizer.chat_template = chat_template()
    tokenizer.init_kwargs.pop("vocab_file", None)  # a temporary path: never saved into the folder
    return tokenizer


def _match_whitespace_runs_after_normalising(tokenizer: Any) -> None:
    """SentencePiece matches its user-defined pieces (Gemma 3's '▁▁' … '▁' × 31, ids 138-167) in the
    normalised text, spaces already turned into '▁', longest first. The converted tokenizer lists them
    as added tokens matched in the raw text, where no '▁' occurs, so runs of spaces fell to BPE merges
    instead: 42 spaces became 16 + 26 where SentencePiece gives 31 + 11. Matched after the
    normaliser, the two agree (the Gemma 3 270M was trained on SentencePiece's: gguf_base)."""

    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    runs = [token for token in state["added_tokens"]
            if not token["special"] and token["content"] and not token["content"].strip("\u2581")]
    if not runs:
        return
    for token in runs:
        token["normalized"] = True
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))


def tiny_model_config(tokenizer: Any, shape: TinyModelConfig) -> Any:
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    # Like the real checkpoint, rows exist past the tokenizer's last id (262,208 rows for 262,145
    # tokens in MedGemma-4B): round up to a multiple of 64.
    rows = -(-len(tokenizer) // 64) * 64
    n = shape.num_hidden_layers
    text = Gemma3TextConfig(
        vocab_size=rows, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=n, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        sliding_window=shape.sliding_window, max_position_embeddings=shape.max_position_embeddings,
        # Gemma 3 interleaves five sliding-window layers with one global layer.
        layer_types=["full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention"
                     for i in range(n)],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if shape.text_only:
        text.tie_word_embeddings = True
        return text
    vision = SiglipVisionConfig(
        hidden_size=shape.vision_hidden_size, intermediate_size=2 * shape.vision_hidden_size,
        num_hidden_layers=shape.vision_layers, num_attention_heads=2,
        image_size=shape.vision_image_size, patch_size=shape.vision_patch_size)
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=shape.mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_SOFT_TOKEN),
        tie_word_embeddings=True,
    )


def medgemma_4b_config() -> Any:
    """MedGemma-4B's architecture (Gemma 3 4B: text + SigLIP tower), for random-weight benchmarks."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                            max_position_embeddings=131072, rope_theta=1_000_000.0, query_pre_attn_scalar=256,
                            pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=896, patch_size=14)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=255_999,
                        eoi_token_index=256_000, image_token_index=262_144, tie_word_embeddings=True)


def build_tiny_base(config: ProjectConfig, out_dir: Path) -> dict[str, Any]:
    """Write tokenizer + random-weight Gemma 3 model into `out_dir`; returns headline figures."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    shape = config.base.tiny
    corpus = resolve_input(config, config.base.tiny_tokenizer_corpus)
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = train_base_sentencepiece(corpus, Path(tmp) / "base", shape.sp_vocab_size)
        tokenizer = hf_tokenizer_from_sentencepiece(sp_model, image_token=not shape.text_only)
        tokenizer.save_pretrained(out_dir)
        # Keep the SentencePiece model too, as the real Gemma 3 folder does: phase 1 merges into it.
        shutil.copy(sp_model, Path(out_dir) / "tokenizer.model")
    torch.manual_seed(shape.seed)
    model = (Gemma3ForCausalLM if shape.text_only else Gemma3ForConditionalGeneration)(tiny_model_config(tokenizer, shape))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                            tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    model.save_pretrained(out_dir)
    embeddings = model.get_input_embeddings()
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_size": len(tokenizer),
        "embedding_rows": embeddings.weight.shape[0],
        "hidden_size": embeddings.weight.shape[1],
        "tied_embeddings": model.get_output_embeddings().weight is embeddings.weight,
        "embed_scale": float(embeddings.embed_scale),
    }


def model_class(folder_or_id: str | Path) -> Any:
    """The transformers class a Gemma 3 folder loads as: MedGemma-4B and the tiny default are
    image-text-to-text models (`Gemma3ForConditionalGeneration`), Gemma 3 270M/1B and
    MedGemma-27B-text plain causal LMs (`Gemma3ForCausalLM`); any other causal LM loads as one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    config = AutoConfig.from_pretrained(folder_or_id)
    return AutoModelForImageTextToText if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING else AutoModelForCausalLM


def decoder_layers(model: Any) -> Any:
    """The language model's decoder layers, text-only (`model.layers`) or multimodal
    (`model.language_model.layers`), under a PEFT wrapper or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = inner.model
    return body.language_model.layers if hasattr(body, "language_model") else body.layers


BASE_FOLDER = "models/base"  # what step 0.00 writes where it builds the base (the `base_model` artifact)


def builds_base(config: ProjectConfig) -> bool:
    """True where step 0.00 writes the base model folder itself: the tiny default, or a GGUF file
    (`base.model: …gguf` or its package's name) materialised once as an ordinary folder."""

    return config.base.build_tiny or is_gguf_ref(config.base.model)


def base_model_name(config: ProjectConfig) -> str:
    """`base.model` as every phase after 0.00 reads it: the folder 0.00 built, or the Hub id / folder."""
    return BASE_FOLDER if builds_base(config) else config.base.model


def base_model_ref(config: ProjectConfig) -> str:
    """The base model to load: a local folder if there is one, else the Hub id (evaluation's baseline)."""
    return model_ref(config, base_model_name(config), "base.model")


def load_tokenizer(config: ProjectConfig, ref: str | None = None) -> Any:
    from transformers import AutoTokenizer

    target = model_ref(config, ref or config.base.tokenizer or base_model_name(config), "base.tokenizer")
    return _from_pretrained(AutoTokenizer, target, config)


def load_model(config: ProjectConfig, ref: str | None = None) -> Any:
    import torch


    target = model_ref(config, ref, "base.model") if ref else base_model_ref(config)
    with hub_access(target, "Log in (`hf auth login`) on a machine with network, or download it and set "
                            "base.model (and base.tokenizer) to the local folder."):
        cls = model_class(target)
    return _from_pretrained(cls, target, config, dtype=getattr(torch, config.base.torch_dtype))


def _from_pretrained(cls: Any, target: str, config: ProjectConfig, **kwargs: Any) -> Any:

    with hub_access(target, "Log in (`hf auth login`) on a machine with network, or download it and set "
                            "base.model (and base.tokenizer) to the local folder."):
        return cls.from_pretrained(target, revision=config.base.revision, **kwargs)


def base_tokenizer_folder(config: ProjectConfig) -> Path:
    """A local folder holding the base tokenizer's files (downloaded from the Hub if needed)."""

    ref = model_ref(config, config.base.tokenizer or base_model_name(config), "base.tokenizer")
    if Path(ref).is_dir():
        return Path(ref)
    with hub_access(f"tokenizer of {ref}", "Log in (`hf auth login`) on a machine with network, or set "
                    "base.tokenizer to a local folder holding tokenizer.model and tokenizer.json"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=config.base.revision, allow_patterns=[
            "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "chat_template.json"]))


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """save_pretrained, plus the SentencePiece `tokenizer.model` of the folder it came from: the fast
    tokenizer does not write it back, and slow-tokenizer users (and GGUF converters) need it."""

    tokenizer.save_pretrained(out_dir)
    source = Path(getattr(tokenizer, "name_or_path", "")) / "tokenizer.model"
    if source.is_file():
        shutil.copyfile(source, Path(out_dir) / "tokenizer.model")


def check_tokenizer_matches_model(tokenizer: Any, model: Any) -> None:
    """Fail loudly when a tokenizer from one folder meets a model from another."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows: they come "
            "from different folders (an expanded tokenizer needs the resized model of phase 2)")
    text_config = getattr(model.config, "text_config", model.config)
    for name in ("bos", "eos", "pad"):
        model_id = getattr(text_config, f"{name}_token_id", None)
        token_id = getattr(tokenizer, f"{name}_token_id")
        if model_id is not None and token_id is not None and model_id != token_id:
            raise ValueError(f"{name} token id differs: tokenizer {token_id}, model {model_id}; "
                             "tokenizer and model come from different families or folders")


def build_base_artifact(config: ProjectConfig) -> Path:
    """Phase 0.00 where the profile builds its base: models/base/ atomically, with its manifest —
    the tiny random-weight model, or a GGUF's weights and tokenizer as an ordinary folder."""

    if not builds_base(config):
        raise ValueError(f"profile {config.profile!r} uses {config.base.model}; only profiles with "
                         "base.build_tiny=true or a GGUF base.model build a local base model")
    final = artifact_path(config, "base_model")
    if is_gguf_ref(config.base.model):
        # a package's GGUF is assembled (sha256-checked) beside the artifact, read as its input
        gguf = resolve_gguf(str(resolve_path(config, config.base.model)) if config.base.model.endswith(".gguf")
                            else config.base.model, resolve_path(config, "models/gguf"))
        side_file = resolve_input(config, config.base.special_tokens) if config.base.special_tokens else None
        inputs = {"gguf": gguf, **({"special_tokens": side_file} if side_file else {})}
        with write_artifact(final, "0.00", config, ["base.model", "base.torch_dtype", "base.special_tokens"],
                            inputs) as out:
            out.metrics.update(materialise_gguf(gguf, out.path, config.base.torch_dtype, side_file))
        return final
    corpus = resolve_input(config, config.base.tiny_tokenizer_corpus)
    with write_artifact(final, "0.00", config, ["base.tiny", "base.tiny_tokenizer_corpus"],
                        {"tokenizer_corpus": corpus}) as out:
        out.metrics.update(build_tiny_base(config, out.path))
    return final


def load_for_eval(ref: str | Path, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder or a Hub id, in eval mode on `device`.

    Each loads as its own class (`model_class`), so the evaluators can score any causal LM as a
    baseline too. Every phase that reads a finished model folder (4, 5, 6) loads it here.
    """
    import torch
    from transformers import AutoTokenizer


    cap_gpu_memory()  # KORMEDGEMMA_GPU_MEMORY_GB: phases 4-6 rehearse a smaller card as training does
    local = Path(ref).expanduser()
    if not local.exists() and not is_hub_id(str(ref)):
        raise FileNotFoundError(f"model {ref}: no such folder, and not a Hub id (owner/name)")
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"model {ref}: the folder holds no config.json (is it a finished model folder?)")
    target = str(local) if local.exists() else str(ref)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    with hub_access(f"model {ref}", "Pass a local model folder, or log in (`hf auth login`) on a machine with network."):
        tokenizer = AutoTokenizer.from_pretrained(target)
        cls = model_class(target)
        # straight onto the device: loading on the CPU and moving would hold the whole model in RAM
        model = cls.from_pretrained(target, dtype=getattr(torch, dtype), device_map={"": device})
    model.eval()
    check_tokenizer_matches_model(tokenizer, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def base_headline(metrics: dict[str, Any]) -> str:
    """0.00's line in the run report."""
    return (f"{metrics.get('parameters', 0):,} parameters, {metrics.get('tokenizer_size')} tokens, "
            f"{metrics.get('embedding_rows')} embedding rows, tied={metrics.get('tied_embeddings')}")
