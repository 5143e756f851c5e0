"""Phase 1: a Korean SentencePiece model, frequency filtering, and a true merge into Gemma 3's tokenizer.

New pieces become *real vocabulary pieces* in both files a Gemma tokenizer folder holds:
`tokenizer.model` (SentencePiece proto: appended NORMAL pieces with scores below every base
piece) and `tokenizer.json` (HF BPE: appended vocab entries and merges ranked after every base
merge). Nothing is an "added token": added tokens are matched in raw text before segmentation,
so `환자` added that way would also be cut out of `환자들` and break the subwords around it.

Because every new merge ranks after every base merge, base segmentation runs first and new
pieces only join symbols it leaves behind: text whose segmentation involves no new piece
(English, code, numbers, emoji) gets exactly the ids it got before, and every base id keeps its
meaning. A BPE piece only forms if a pair of pieces that exist can merge into it, so selecting a
frequent piece also brings in the pieces it is built from in the Korean model's merge tree
(and any Hangul syllable the base lacks, which the base would otherwise spell in bytes).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from config.training_config import ProjectConfig, TokenizerConfig
from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.manifest import write_artifact
from kormedgemma.core.plots import new_figure, saved
from kormedgemma.data.readers import iter_split, sample_split, split_path
from kormedgemma.modeling.base_model import base_tokenizer_folder

HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _proto():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def new_sp_proto() -> Any:
    """An empty SentencePiece ModelProto (the file format of `tokenizer.model`)."""
    return _proto().ModelProto()


def load_sp_proto(path: Path) -> Any:
    proto = new_sp_proto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


# --------------------------------------------------------------------------- 1.01 train
def train_korean_sentencepiece(texts: Iterable[str], out_dir: Path, spec: TokenizerConfig) -> Path:
    """Train BPE on Korean text with Gemma's conventions, so its pieces look like Gemma's (`▁고혈압`)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(out_dir / "korean_sp"), model_type=spec.model_type,
        vocab_size=spec.vocab_size, character_coverage=spec.character_coverage,
        input_sentence_size=spec.input_sentence_size, shuffle_input_sentence=True,
        num_threads=spec.num_threads, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, max_sentence_length=16384, minloglevel=2,
        # Only Korean content pieces matter here; Gemma's specials come from the base.
        pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0,
    )
    return out_dir / "korean_sp.model"


# --------------------------------------------------------------------------- 1.02 count + filter
@dataclass
class CountResult:
    counts: np.ndarray  # occurrences of each Korean-model piece id in the segmented corpus
    texts: int
    megabytes: float
    seconds: float

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds if self.seconds > 0 else float("inf")


def count_piece_frequencies(sp_model: Path, texts: Iterable[str], num_threads: int,
                            batch_size: int = 2048) -> CountResult:
    """Segment the corpus with the model and count each piece, in batches on `num_threads` threads.

    SentencePiece's batch `encode` runs its C++ segmentation on several threads without the GIL,
    which is what makes a 100 MB corpus a matter of seconds rather than hours.
    """
    import sentencepiece as spm
    from tqdm.auto import tqdm

    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    counts = np.zeros(processor.get_piece_size(), dtype=np.int64)
    total_bytes = 0
    total_texts = 0
    started = time.perf_counter()
    batch: list[str] = []
    progress = tqdm(desc="count pieces", unit="text", mininterval=2.0)

    def flush() -> None:
        nonlocal total_bytes, total_texts
        if not batch:
            return
        encoded = processor.encode(batch, out_type=int, num_threads=num_threads)
        flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64)
        counts[:] += np.bincount(flat, minlength=counts.size)
        total_bytes += sum(len(t.encode("utf-8")) for t in batch)
        total_texts += len(batch)
        progress.update(len(batch))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    flush()
    progress.close()
    return CountResult(counts, total_texts, total_bytes / 1e6, time.perf_counter() - started)


@dataclass
class Candidate:
    piece: str
    frequency: int
    korean_id: int


def frequent_new_pieces(sp_model: Path, counts: np.ndarray, base_vocab: set[str], spec: TokenizerConfig,
                        min_frequency: Optional[int] = None) -> list[Candidate]:
    """Korean pieces with frequency ≥ threshold, holding Hangul (if required), absent from the base."""
    proto = load_sp_proto(sp_model)
    threshold = spec.min_frequency if min_frequency is None else min_frequency
    found = []
    for index, piece in enumerate(proto.pieces):
        if piece.type != NORMAL or counts[index] < threshold or piece.piece in base_vocab:
            continue
        if spec.require_hangul and not HANGUL.search(piece.piece):
            continue
        found.append(Candidate(piece.piece, int(counts[index]), index))
    found.sort(key=lambda c: (-c.frequency, c.korean_id))
    return found


@dataclass
class NewPiece:
    piece: str
    frequency: int  # occurrences in the segmented corpus (0 for a piece needed only as a parent)
    role: str  # "selected": passed the filter; "parent": needed so a selected piece can form


def plan_new_pieces(candidates: Sequence[Candidate], sp_model: Path, base_vocab: set[str],
                    max_new_tokens: int) -> list[NewPiece]:
    """Choose pieces in frequency order, each with the parents it needs, until the cap.

    A piece is added only with a merge path to it: it splits into two pieces that are in the
    base, already chosen, or themselves planned (recursively, in the Korean model's merge order:
    a BPE piece's parents score higher than it). Single characters are their own leaves.
    """
    proto = load_sp_proto(sp_model)
    korean_score = {p.piece: p.score for p in proto.pieces if p.type == NORMAL}
    frequency = {c.piece: c.frequency for c in candidates}
    chosen: dict[str, NewPiece] = {}

    @lru_cache(maxsize=None)
    def cost(piece: str) -> tuple[int, tuple[str, ...]]:
        """(number of new pieces needed, the new pieces in parent-first order) to make `piece`."""
        if piece in base_vocab:
            return 0, ()
        if len(piece) == 1:
            return 1, (piece,)
        best: Optional[tuple[int, tuple[str, ...]]] = None
        score = korean_score.get(piece, float("-inf"))
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            # Single characters are leaves (BPE starts from them); longer parts must be earlier merges.
            if not all(part in base_vocab or len(part) == 1 or korean_score.get(part, float("-inf")) > score
                       for part in (left, right)):
                continue
            left_cost, left_plan = cost(left)
            right_cost, right_plan = cost(right)
            plan = tuple(dict.fromkeys(left_plan + right_plan + (piece,)))
            if best is None or len(plan) < best[0]:
                best = (len(plan), plan)
        return best if best is not None else (10**9, ())

    for candidate in candidates:
        needed, plan = cost(candidate.piece)
        if needed >= 10**9:
            continue
        missing = [p for p in plan if p not in chosen]
        if len(chosen) + len(missing) > max_new_tokens:
            continue
        for piece in missing:
            chosen[piece] = NewPiece(piece, frequency.get(piece, 0),
                                     "selected" if piece in frequency else "parent")
    # Final order = merge priority among new pieces: single characters first, then the Korean
    # model's own order (its scores), which puts every parent before the pieces built from it.
    return sorted(chosen.values(), key=lambda p: (len(p.piece) > 1, -korean_score.get(p.piece, 0.0), p.piece))


# --------------------------------------------------------------------------- 1.03 merge
def base_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """The SentencePiece model and HF tokenizer.json of a base tokenizer folder."""
    sp_model, hf_json = Path(folder) / "tokenizer.model", Path(folder) / "tokenizer.json"
    missing = [p.name for p in (sp_model, hf_json) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"base tokenizer folder {folder} lacks {', '.join(missing)}: the merge needs "
                                "both the SentencePiece model and the fast tokenizer (Gemma 3 ships both)")
    return sp_model, hf_json


def merge_tokenizers(base_folder: Path, new_pieces: Sequence[NewPiece], out_dir: Path) -> dict[str, Any]:
    """Write base + new pieces into `out_dir` (tokenizer.model, tokenizer.json, configs, template)."""
    sp_path, json_path = base_tokenizer_files(base_folder)
    proto = load_sp_proto(sp_path)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{json_path}: expected a BPE model (Gemma), found {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    pair_style = bool(merges) and isinstance(merges[0], list)
    added = {token["id"]: token["content"] for token in data.get("added_tokens", [])}
    disagree = [p.piece for i, p in enumerate(proto.pieces) if vocab.get(p.piece) != i]
    beyond = [t for t, i in vocab.items() if i >= len(proto.pieces) and i not in added]
    if disagree or beyond:
        raise ValueError(f"{base_folder}: tokenizer.model and tokenizer.json disagree on pieces/ids "
                         f"(e.g. {(disagree or beyond)[:3]}); they must come from the same tokenizer")
    # Added tokens past the last SentencePiece piece (Gemma 3: <image_soft_token> = 262144) keep
    # their ids; the SentencePiece model gets a matching user-defined piece so ids stay aligned.
    first_new_id = max([len(proto.pieces) - 1, *added, *vocab.values()]) + 1
    for token_id in range(len(proto.pieces), first_new_id):
        content = added.get(token_id)
        if content is None:
            raise ValueError(f"gap at id {token_id} in {json_path}: cannot align SentencePiece and HF ids")
        proto.pieces.append(_proto().ModelProto.SentencePiece(piece=content, score=0.0, type=USER_DEFINED))
        # In the BPE vocab too: `tokenizers` gives an added token missing from the model's vocab
        # the next free id after the vocab, which would move it once new pieces are appended.
        vocab.setdefault(content, token_id)

    lowest = min((p.score for p in proto.pieces if p.type == NORMAL), default=0.0)
    new_ids: dict[str, int] = {}
    for offset, new in enumerate(new_pieces):
        if new.piece in vocab or new.piece in new_ids:
            raise ValueError(f"piece {new.piece!r} is already in the vocabulary: duplicates are not allowed")
        token_id = first_new_id + offset
        proto.pieces.append(_proto().ModelProto.SentencePiece(piece=new.piece, score=lowest - 1.0 - offset,
                                                                 type=NORMAL))
        new_ids[new.piece] = token_id
    # Every split of a new piece whose halves are pieces becomes a merge, ranked after all earlier
    # ones: HF BPE needs the exact pair, SentencePiece merges any pair that forms a known piece. The
    # halves may be new pieces listed later (`▁이루어진` + `다` for `▁이루어진다`), so all new pieces
    # are known first: merging as they were appended missed those, and 29 of 200 real Korean
    # Wikipedia texts segmented differently from SentencePiece on the real Gemma 3 tokenizer.
    for new in new_pieces:
        for cut in range(1, len(new.piece)):
            left, right = new.piece[:cut], new.piece[cut:]
            if (left in vocab or left in new_ids) and (right in vocab or right in new_ids):
                merges.append([left, right] if pair_style else f"{left} {right}")
    vocab.update(new_ids)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json", "generation_config.json"):
        if (Path(base_folder) / name).is_file():
            shutil.copyfile(Path(base_folder) / name, out_dir / name)
    return {"first_new_id": first_new_id, "new_pieces": len(new_ids),
            "vocab_size": first_new_id + len(new_ids), "base_size": first_new_id}


# --------------------------------------------------------------------------- checks + figures
def base_vocabulary(folder: Path) -> set[str]:
    sp_model, _ = base_tokenizer_files(folder)
    return {p.piece for p in load_sp_proto(sp_model).pieces}


INVARIANT_PROBES = (
    "The patient was given 5 mg of amlodipine at 08:30.",
    "def f(x):\n    return x ** 2  # squares",
    "   leading spaces, tabs\tand  double  spaces   ",
    "Emoji 🙂🩺 and symbols ±µ°C → ≥ 90%",
    "1234567890 3.14159 -42 1e-5",
    "<start_of_turn>user\nHello<end_of_turn>\n",
)


def verify_merge(base: Any, merged: Any, korean_texts: Sequence[str], first_new_id: int,
                 probes: Sequence[str] = INVARIANT_PROBES) -> dict[str, Any]:
    """Check the merge invariants; raise with the first violation, else return the figures."""
    base_vocab = base.get_vocab()
    merged_vocab = merged.get_vocab()
    moved = [t for t, i in base_vocab.items() if merged_vocab.get(t) != i]
    if moved:
        raise AssertionError(f"{len(moved)} base token(s) changed id, e.g. {moved[:3]}")
    if len(set(merged_vocab.values())) != len(merged_vocab):
        raise AssertionError("duplicate ids in the merged vocabulary")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(base, name) != getattr(merged, name):
            raise AssertionError(f"{name} changed: {getattr(base, name)!r} → {getattr(merged, name)!r}")
    if base.chat_template != merged.chat_template:
        raise AssertionError("chat template changed")
    for text in probes:
        before = base.encode(text, add_special_tokens=False)
        after = merged.encode(text, add_special_tokens=False)
        if before != after:
            raise AssertionError(f"text without new pieces tokenised differently: {text!r}")
    for text in korean_texts:
        ids = merged.encode(text, add_special_tokens=False)
        if merged.decode(ids) != text:
            raise AssertionError(f"decode(encode(x)) != x for {text[:60]!r}")
    used = {i for text in korean_texts for i in merged.encode(text, add_special_tokens=False) if i >= first_new_id}
    return {"base_ids_unchanged": len(base_vocab), "probes_unchanged": len(probes),
            "roundtrip_texts": len(korean_texts), "new_ids_used_on_texts": len(used)}


def sentencepiece_agrees(sp_model: Path, hf_tokenizer: Any, texts: Sequence[str]) -> float:
    """Share of texts the merged SentencePiece model and HF tokenizer segment identically."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    same = sum(processor.encode(t) == hf_tokenizer.encode(t, add_special_tokens=False) for t in texts)
    return same / len(texts) if texts else 1.0


def tokens_per_char(tokenizer: Any, texts: Sequence[str]) -> dict[str, float]:
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    chars = sum(len(t) for t in texts)
    return {"texts": len(texts), "chars": chars, "tokens": tokens,
            "tokens_per_char": round(tokens / chars, 4) if chars else 0.0}


def efficiency_table(tokenizers: dict[str, Any], corpora: dict[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Tokens per character of each tokenizer on each corpus, with the change against the first."""
    rows = []
    for corpus, texts in corpora.items():
        reference = None
        for name, tokenizer in tokenizers.items():
            figures = tokens_per_char(tokenizer, texts)
            reference = reference or figures["tokens_per_char"]
            change = (figures["tokens_per_char"] / reference - 1) if reference else 0.0
            rows.append({"corpus": corpus, "tokenizer": name, **figures, "change": round(change, 4)})
    return rows


def examples_table(base: Any, merged: Any, words: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for word in words:
        before = base.convert_ids_to_tokens(base.encode(word, add_special_tokens=False))
        after = merged.convert_ids_to_tokens(merged.encode(word, add_special_tokens=False))
        rows.append({"text": word, "base": " ".join(before), "merged": " ".join(after),
                     "base tokens": len(before), "merged tokens": len(after)})
    return rows


def plot_frequencies(counts: np.ndarray, threshold: int, kept: int, path: Optional[Path] = None) -> Any:
    """Rank-frequency curve of the Korean pieces with the threshold marked."""

    ordered = np.sort(counts[counts > 0])[::-1]
    figure = new_figure((6.5, 3.6))
    axis = figure.subplots()
    axis.loglog(np.arange(1, ordered.size + 1), ordered, color="#4C72B0", label="Korean pieces")
    axis.axhline(threshold, color="#C44E52", linestyle="--", label=f"min_frequency = {threshold:,}")
    axis.set_xlabel("rank")
    axis.set_ylabel("occurrences in corpus")
    axis.set_title(f"{int((ordered >= threshold).sum()):,} pieces ≥ threshold; {kept:,} new after filters and cap")
    axis.legend()
    figure.tight_layout()
    return saved(figure, path)


# --------------------------------------------------------------------------- pipeline steps
def sentencepiece_vocab_error(message: str, spec: TokenizerConfig) -> Optional[str]:
    """The fix for a SentencePiece training failure about the vocabulary size, or None.

    SentencePiece fails both ways and the fixes are opposite:
    "Vocabulary size too high (5000). Please set it to a value <= 299." (the corpus cannot fill
    the vocabulary) and "Vocabulary size is smaller than required_chars. 1000 vs 3257. Increase
    vocab_size or decrease character_coverage ..." (every kept character, plus the byte and
    <unk> pieces, needs a slot).
    """
    too_high = re.search(r"Vocabulary size too high \((\d+)\)(?:.*?<=\s*(\d+))?", message)
    if too_high:
        most = f": SentencePiece can make at most {too_high.group(2)} pieces from it" if too_high.group(2) else ""
        return (f"tokenizer.vocab_size={spec.vocab_size} is too large for this corpus{most}. "
                f"Lower tokenizer.vocab_size{f' to {too_high.group(2)} or less' if too_high.group(2) else ''} "
                f"or add Korean text (SentencePiece: {message})")
    too_small = re.search(r"smaller than required_chars\.?(?:\s*(\d+)\s*vs\s*(\d+))?", message)
    if too_small:
        needed = too_small.group(2)
        return (f"tokenizer.vocab_size={spec.vocab_size} is too small for the characters of this corpus: with "
                f"tokenizer.character_coverage={spec.character_coverage} SentencePiece needs "
                f"{needed or 'more'} pieces for the characters it must keep plus its byte and <unk> pieces. "
                f"Raise tokenizer.vocab_size{f' to at least {needed}' if needed else ''} "
                f"or lower tokenizer.character_coverage "
                f"(SentencePiece: {message})")
    return None


def train_tokenizer_artifact(config: ProjectConfig) -> Path:
    """1.01: models/tokenizer/korean_sp/ from the processed Korean train split."""

    korean = require(config, "korean")
    train = split_path(korean, "train")
    if not any(True for _ in iter_split(korean, "train")):
        raise ValueError(f"{train} is empty: nothing to train the Korean tokenizer on (re-run phase 0.04)")
    final = artifact_path(config, "korean_sp")
    with write_artifact(final, "1.01", config, ["tokenizer"], {"korean_train": train}) as out:
        started = time.perf_counter()
        try:
            model = train_korean_sentencepiece(iter_split(korean, "train"), out.path, config.tokenizer)
        except RuntimeError as exc:
            advice = sentencepiece_vocab_error(str(exc), config.tokenizer)
            if advice is not None:
                raise ValueError(advice) from None
            raise
        import sentencepiece as spm

        out.metrics.update({"pieces": spm.SentencePieceProcessor(model_file=str(model)).get_piece_size(),
                            "seconds_training": round(time.perf_counter() - started, 2)})
    return final


def filter_tokens_artifact(config: ProjectConfig) -> dict[str, Any]:
    """1.02: models/tokenizer/new_tokens.json: chosen pieces (with parents) and their frequencies."""

    korean = require(config, "korean")
    train = split_path(korean, "train")
    sp_model = require(config, "korean_sp") / "korean_sp.model"
    base_folder = base_tokenizer_folder(config)
    base_vocab = base_vocabulary(base_folder)
    spec = config.tokenizer
    final = artifact_path(config, "new_tokens")
    with write_artifact(final, "1.02", config, ["tokenizer"], {"korean_train": train, "korean_sp": sp_model,
                                                               "base_tokenizer": base_folder / "tokenizer.model"}) as out:
        counted = count_piece_frequencies(sp_model, iter_split(korean, "train"), spec.num_threads)
        candidates = frequent_new_pieces(sp_model, counted.counts, base_vocab, spec)
        if not candidates:
            raise ValueError(f"no Korean piece reaches min_frequency={spec.min_frequency} that the base lacks: "
                             "lower tokenizer.min_frequency or add Korean text")
        plan = plan_new_pieces(candidates, sp_model, base_vocab, spec.max_new_tokens)
        (out.path / final.name).write_text(json.dumps(
            {"min_frequency": spec.min_frequency, "max_new_tokens": spec.max_new_tokens,
             "pieces": [p.__dict__ for p in plan]}, ensure_ascii=False, indent=1), encoding="utf-8")
        plot_frequencies(counted.counts, spec.min_frequency, len(plan), final.parent / "frequency_distribution.png")
        out.metrics.update({
            "corpus_texts": counted.texts, "corpus_mb": round(counted.megabytes, 3),
            "count_seconds": round(counted.seconds, 3), "count_mb_per_second": round(counted.mb_per_second, 2),
            "korean_pieces": int(counted.counts.size), "pieces_over_threshold": int((counted.counts >= spec.min_frequency).sum()),
            "candidates_new_to_base": len(candidates), "new_pieces": len(plan),
            "selected": sum(p.role == "selected" for p in plan), "parents": sum(p.role == "parent" for p in plan),
        })
        figures = dict(out.metrics)
    return figures


def load_new_pieces(path: Path) -> list[NewPiece]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [NewPiece(**row) for row in data["pieces"]]


def merge_artifact(config: ProjectConfig) -> dict[str, Any]:
    """1.03: models/tokenizer/merged/, verified, with tokens-per-character before and after."""
    from transformers import AutoTokenizer


    korean, english = require(config, "korean"), require(config, "english")
    new_tokens = require(config, "new_tokens")
    base_folder = base_tokenizer_folder(config)
    pieces = load_new_pieces(new_tokens) if config.tokenizer.expand else []
    _, korean_valid = sample_split(korean, "valid", config.tokenizer.check_texts)
    _, english_valid = sample_split(english, "valid", config.tokenizer.check_texts)
    final = artifact_path(config, "merged_tokenizer")
    with write_artifact(final, "1.03", config, ["tokenizer"], {"new_tokens": new_tokens,
                        "base_tokenizer": base_folder / "tokenizer.json", "korean_valid": split_path(korean, "valid"),
                        "english_valid": split_path(english, "valid")}) as out:
        merged_info = merge_tokenizers(base_folder, pieces, out.path)
        base = AutoTokenizer.from_pretrained(base_folder)
        merged = AutoTokenizer.from_pretrained(out.path)
        if len(merged) != merged_info["vocab_size"]:
            raise AssertionError(f"merged tokenizer loads with {len(merged)} tokens, expected {merged_info['vocab_size']}")
        checks = verify_merge(base, merged, korean_valid, merged_info["first_new_id"])
        table = efficiency_table({"base": base, "merged": merged},
                                 {"korean_valid": korean_valid, "english_valid": english_valid})
        before, after = (row["tokens_per_char"] for row in table if row["corpus"] == "korean_valid")
        out.metrics.update({**merged_info, **checks, "efficiency": table,
                            "korean_tokens_per_char_before": before, "korean_tokens_per_char_after": after,
                            "korean_reduction": round(1 - after / before, 4),
                            "sentencepiece_agreement": sentencepiece_agrees(out.path / "tokenizer.model", merged,
                                                                            korean_valid)})
        figures = dict(out.metrics)
    return figures


def korean_sp_headline(metrics: dict[str, Any]) -> str:
    """1.01's line in the run report."""
    return f"{metrics.get('pieces', 0):,} Korean pieces"


def new_tokens_headline(metrics: dict[str, Any]) -> str:
    """1.02's line: the pieces chosen, parents counted apart."""
    return (f"{metrics.get('new_pieces', 0):,} new pieces ({metrics.get('selected', 0):,} ≥ min_frequency, "
            f"{metrics.get('parents', 0):,} parents); counted {metrics.get('corpus_mb', 0)} MB at "
            f"{metrics.get('count_mb_per_second', 0)} MB/s")


def merged_tokenizer_headline(metrics: dict[str, Any]) -> str:
    """1.03's line: the vocabulary's growth and what it saves on Korean."""
    return (f"vocab {metrics.get('base_size', 0):,} → {metrics.get('vocab_size', 0):,}; Korean tokens/char "
            f"{metrics.get('korean_tokens_per_char_before')} → {metrics.get('korean_tokens_per_char_after')} "
            f"(−{metrics.get('korean_reduction', 0):.1%}); SentencePiece/fast agreement "
            f"{metrics.get('sentencepiece_agreement', 0):.0%}")
