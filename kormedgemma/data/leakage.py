"""KorMedMCQA leakage guard: find documents that hold a held-out question, not ones that share a term.

The earlier rule (`preprocess.LeakageIndex` before this module) called a text contaminated when it
shared ANY whitespace-free 25-character n-gram with a held-out question. Korean medical questions are
full of long names ("호흡기 세포융합 바이러스(respiratory syncytial virus)", "「감염병의 예방 및 관리에
관한 법률」"), so that rule flagged 24 of the 1,044 real Korean Wikipedia medical articles (and 551 of
the 3,401 real KorMedMCQA train questions); not one of the 24 articles holds a question, each merely
names a term, a law or a list of diseases that a question also names.

Here a document is contaminated when it holds most of one question:

* Both sides are compared in `compact_text` form: NFKC, lower case, whitespace and punctuation
  removed, so re-spacing, line breaks, quote styles and full-width forms cannot hide a copy.
* A question's evidence is the set of distinct character n-grams (`ngram_chars`) of its compact stem
  that contain Hangul (a Latin-only gram is a term name such as "catecholomethyltransferase"), are
  not wholly inside a 「…」 law title (a law's name is a term too), and occur in at most
  `max_gram_questions` held-out questions (exam boilerplate is evidence of no question in particular).
* A document matches a question when it holds at least `min_share` of those grams AND they cover at
  least `min_span_chars` characters of the question. The share says "most of this question", the
  span "a sentence, not a term": a term can be a large share of a short stem but covers only its own
  length; two drug names with their English names cover 38 characters of a long case but are 8% of it.
* A question whose evidence can never cover `min_span_chars` (a short stem, or one that is mostly Latin,
  law title or boilerplate; 1,453 of the 4,088 real held-out stems) cannot be told from a term by
  a fragment, so it matches only when its whole compact stem is in the document.
* Options are not used to match: the stem alone is a leak, so options listed in another order, with
  other numbering or not at all change nothing. They are kept in `HeldoutQuestion` for the report.

Measured at the defaults (13, 0.5, 35, 4) on the real data (the 4,088 valid+test+fewshot stems):
0 of the 1,044 Wikipedia articles are flagged; 13 of the 3,401 train questions are, and every one
is a near-copy of a test/valid question (same stem re-spaced, with other quote marks, or with a word
or two changed). 600 real test questions planted into real articles are all found whole, re-spaced and
re-lined, followed by shuffled "1) … 2) …" options, and with quote/dot/bracket styles swapped.

Speed (Phase 0 scans ~8 billion characters): a document's n-grams are built once as a set and
intersected with the index's key set in C; only the grams that hit are counted per question. On the
real articles that is 6-8 MB/s of UTF-8 (2.8-3.5 M characters/s) per core.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from kormedgemma.core.io import read_jsonl

__all__ = ["HeldoutQuestion", "LeakMatch", "LeakageIndex", "heldout_questions", "compact_text"]

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_LAW_TITLE = re.compile(r"「[^「」]*」")
_DROPPED = re.compile(r"[^\w「」]+")  # not a letter, digit or law-title bracket: dropped
_OPTION_KEYS = ("A", "B", "C", "D", "E")
_EXCERPT_CHARS = 200
_WINDOW_CHARS = 100_000  # whitespace-free characters per window of a long text (see `match`)


@dataclass(frozen=True)
class HeldoutQuestion:
    text: str  # the question stem as written
    options: tuple[str, ...] = ()
    source: str = ""  # e.g. "doctor/test:12" (subset/split:row number)


@dataclass(frozen=True)
class LeakMatch:
    question: HeldoutQuestion
    share: float  # share of the question's counted grams found in the document
    span_chars: int  # characters of the question covered by matched grams
    excerpt: str  # a short excerpt of the document around the match (≤ 200 chars)


def compact_text(text: str) -> str:
    """The form both sides are compared in: NFKC, lower case, only letters, digits and 「」.

    * NFKC rather than plain NFC: it composes Hangul exactly as NFC does and also folds the
      compatibility forms that copies of KorMedMCQA differ in (upstream later replaced the full-width
      tilde '～' by '~'); 341 of the 4,088 held-out stems hold such a character ('～' 407 times,
      '℃' 244). It costs ~4% of the scan (NFC, which mostly only checks, ~1%).
    * Whitespace goes because Korean spacing varies between sources; `str.split()` first, because it
      is ~3x faster than a regex over every space.
    * Punctuation and symbols go too (everything `\\W`: quotes, brackets, middle dots, '?', zero-width
      characters). Copies of the same question differ in exactly these: the real train split repeats
      pharm/test:865 with “약사(藥事)” where the test has ‘약사(藥事)’, and nurse/test:294 writes the
      law title with '∙' where dentist/test:301 has '·'. With punctuation kept, swapping quote marks,
      dots and brackets hides 37% of planted real questions; without it none. The pass costs ~7%.
    * 「」 are kept: they mark law titles, whose inside is not evidence (see `LeakageIndex`).
    """
    return _compact_normalized(unicodedata.normalize("NFKC", text))


def _compact_normalized(text: str) -> str:
    """`compact_text` of text already in NFKC; character by character, so it can be applied to pieces."""
    return _DROPPED.sub("", "".join(text.lower().split()))


def _law_title_mask(compact: str) -> bytearray:
    """1 for each character strictly inside a 「…」 title (the brackets themselves stay evidence)."""
    mask = bytearray(len(compact))
    for found in _LAW_TITLE.finditer(compact):
        mask[found.start() + 1:found.end() - 1] = b"\x01" * (found.end() - found.start() - 2)
    return mask


class LeakageIndex:
    """Held-out questions indexed by n-gram; `match` finds a document that holds one.

    The defaults were chosen on the real data: 4,088 valid+test+fewshot stems; as negatives the 1,044
    Korean Wikipedia medical articles (none holds a question); as positives 600 random test questions
    planted into articles (whole, cut, or with random characters replaced) and the train split, which
    repeats some test questions nearly verbatim. Over all (article, question) pairs the largest share
    is 0.35 (복부대동맥류 / pharm/test:83, only the term "복부대동맥류(abdominal aortic aneurysm)",
    span 18), the largest span 38 (주사 (질병) / pharm/test:776: two drug names, share 0.08).

    * ``ngram_chars=13``: a gram is a phrase, not a word. Shorter grams survive edits better (one random
      character changed every 40: 95/93/86/79% of gram-matched questions still found at n = 8/10/13/15)
      but also match rewrites: a train case re-written from doctor/test:117 (other ages, other wording)
      has share 0.51/0.46/0.41/0.38 of it, so n = 8 flags it; 8-grams are also boilerplate more often,
      which leaves more questions whole-only (1,533 at 8, 1,453 at 13).
    * ``min_share=0.5``: no article reaches 0.36 of any question; a copy has 1.0, the first 70% of a
      question of 50+ compact characters is found 96-100%. At 0.6 the first 60% is almost never found;
      at 0.4 the margin over the rewritten case above (0.41) is gone.
    * ``min_span_chars=35`` (compact characters, about 45 as written): above every single shared term
      (the longest span at share ≥ 0.25 is 26, "지질다당류(lipopolysaccharide)에"; a law title, were it
      counted, 30), below the real near-copies in the train split (nurse/train:477 covers 38 of
      nurse/test:482, pharm/train:46 39 of pharm/test:350), which 40 would miss.
    * ``max_gram_questions=4``: a gram in 5+ questions is boilerplate ("다음 사례를 읽고 각 문제에
      적합한 답을 고르시오", "[활력징후] 혈압 …, 심박수 …회/분", "검사 결과는 다음과 같다"): up to 39% of a
      case question's grams (pharm/test:785), covering 171 characters, so without the cap a document of
      the same boilerplate would pass span alone and be most of the way to share. 4, not 1, because one
      question can recur: the 호스피스 law question is in dentist/test 301, 558, 810 and nurse/test 294.
      The law-title rule and this cap each remove the one article that would otherwise pass share:
      안락사 holds the 호스피스 law's title, 0.51 of dentist/test:558 (span 30).
    """

    def __init__(self, questions: Iterable[HeldoutQuestion | str], ngram_chars: int = 13,
                 min_share: float = 0.5, min_span_chars: int = 35, max_gram_questions: int = 4) -> None:
        _check_int("ngram_chars", ngram_chars, 5)
        _check_int("min_span_chars", min_span_chars, 1)
        _check_int("max_gram_questions", max_gram_questions, 1)
        if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) or not 0 < min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {min_share!r}")
        self.ngram_chars = ngram_chars
        self.min_share = float(min_share)
        self.min_span_chars = min_span_chars
        self.max_gram_questions = max_gram_questions

        n = ngram_chars
        self._questions: list[HeldoutQuestion] = []
        self._compact: list[str] = []
        per_question: list[set[str]] = []
        document_frequency: dict[str, int] = {}
        for item in questions:
            question = item if isinstance(item, HeldoutQuestion) else HeldoutQuestion(text=str(item))
            compact = compact_text(question.text)
            if not compact:
                continue
            inside_title = _law_title_mask(compact)
            grams = {compact[i:i + n] for i in range(len(compact) - n + 1)
                     if not all(inside_title[i:i + n]) and _HANGUL.search(compact, i, i + n)}
            for gram in grams:
                document_frequency[gram] = document_frequency.get(gram, 0) + 1
            self._questions.append(question)
            self._compact.append(compact)
            per_question.append(grams)

        # Counted grams per question, and whether they could ever cover min_span_chars of it.
        index: dict[str, tuple[int, ...]] = {}
        self._needed: list[int] = []  # grams a document must hold (0: whole stem required)
        self._total: list[int] = []  # distinct counted grams of each question
        whole: dict[str, list[int]] = {}  # anchor -> questions that must appear whole
        for number, (compact, grams) in enumerate(zip(self._compact, per_question)):
            counted = {g for g in grams if document_frequency[g] <= max_gram_questions}
            self._total.append(len(counted))
            if _coverage(compact, n, counted) >= min_span_chars:
                self._needed.append(max(1, math.ceil(min_share * len(counted) - 1e-9)))
                own = (number,)  # one shared tuple per question keeps RAM and pickle small
                for gram in counted:
                    index[gram] = own if gram not in index else index[gram] + own
            else:
                self._needed.append(0)
                whole.setdefault(compact[:n], []).append(number)
        # Questions that must appear whole are found through their first n characters (stored as
        # ~id, negative, in the same dict, so one lookup serves both kinds) and confirmed with `in`.
        # Stems shorter than n (43 of the 4,088 real ones) have no n-gram: each is looked for with
        # `in`, a C substring search (~150 MB/s for all 43 together, ~5% of the scan's time; a set of
        # the 7-character prefixes of the document's grams instead would add ~60%).
        self._tiny: list[int] = []
        for anchor, numbers in whole.items():
            if len(anchor) == n:
                index[anchor] = index.get(anchor, ()) + tuple(~k for k in numbers)
            else:
                self._tiny.extend(numbers)
        self._index = index
        self._keys = frozenset(index)
        self._overlap = max((len(c) for c in self._compact), default=0) + n
        # No match is possible in a text shorter than one gram or than the shortest whole-only stem.
        self._min_len = min([n] + [len(c) for c, k in zip(self._compact, self._needed) if k == 0])

    def __len__(self) -> int:
        return len(self._questions)

    def __repr__(self) -> str:
        whole = sum(1 for k in self._needed if k == 0)
        return (f"LeakageIndex({len(self)} questions, {whole} matched whole, {len(self._index):,} grams, "
                f"ngram_chars={self.ngram_chars}, min_share={self.min_share}, "
                f"min_span_chars={self.min_span_chars}, max_gram_questions={self.max_gram_questions})")

    def overlaps(self, text: str) -> bool:
        return self.match(text) is not None

    def match(self, text: str) -> Optional[LeakMatch]:
        """The held-out question this text holds (highest share, then longest span), or None.

        A long text is read in windows of `_WINDOW_CHARS` whitespace-free characters that overlap by
        the longest question, so a copy always lies whole inside one window. This bounds memory (a
        window's gram set is ~10 MB whatever the document's size) and keeps the evidence local: in a
        book-length text, the grams of one question scattered over a million characters are not a copy.
        """
        compact = compact_text(text)
        if not self._questions or len(compact) < self._min_len:
            return None
        step = max(_WINDOW_CHARS - self._overlap, 1)
        best: Optional[tuple[float, int, int, set[str], int]] = None
        start = 0
        while True:
            found = self._match_window(compact[start:start + _WINDOW_CHARS])
            if found is not None and (best is None or _rank(found) > _rank(best)):
                best = (*found, start)
            if start + _WINDOW_CHARS >= len(compact):
                break
            start += step
        if best is None:
            return None
        share, span, number, matched, start = best
        return LeakMatch(question=self._questions[number], share=round(share, 4), span_chars=span,
                         excerpt=_excerpt(text, compact, matched, len(self._compact[number]), start))

    def _match_window(self, compact: str) -> Optional[tuple[float, int, int, set[str]]]:
        """(share, span, question number, matched grams) of the best question in one window."""
        n = self.ngram_chars
        length = len(compact)
        grams = {compact[i:i + n] for i in range(length - n + 1)}
        hits = grams & self._keys  # set & set in C, reusing the hashes computed while building
        index = self._index

        counts: dict[int, int] = {}
        whole: set[int] = set()
        for gram in hits:
            for number in index[gram]:
                if number >= 0:
                    counts[number] = counts.get(number, 0) + 1
                else:
                    whole.add(~number)
        whole.update(k for k in self._tiny if self._compact[k] in compact)

        best: Optional[tuple[float, int, int, set[str]]] = None
        for number, count in counts.items():
            if count < self._needed[number]:
                continue
            stem = self._compact[number]
            matched = {g for g in _grams(stem, n) if g in hits and number in index[g]}
            span = _coverage(stem, n, matched)
            if span < self.min_span_chars:
                continue
            share = count / self._total[number]
            if best is None or _rank((share, span, number)) > _rank(best):
                best = (share, span, number, matched)
        for number in whole:
            stem = self._compact[number]
            if stem in compact and (best is None or _rank((1.0, len(stem), number)) > _rank(best)):
                best = (1.0, len(stem), number, {stem})
        return best

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_keys"]  # rebuilt from the index on unpickling: half the pickle, same speed
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._keys = frozenset(self._index)


def _rank(found: tuple) -> tuple[float, int, int]:
    """Highest share, then longest span, then the earliest question: the same answer in every process."""
    return found[0], found[1], -found[2]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def _grams(compact: str, n: int) -> list[str]:
    return [compact[i:i + n] for i in range(len(compact) - n + 1)]


def _coverage(compact: str, n: int, grams: set[str]) -> int:
    """Characters of `compact` covered by occurrences of the given n-grams."""
    covered = 0
    reach = 0  # first position not yet covered
    for i in range(len(compact) - n + 1):
        if compact[i:i + n] in grams:
            covered += i + n - max(i, reach)
            reach = i + n
    return covered


def _excerpt(text: str, compact: str, matched: set[str], stem_chars: int, start: int) -> str:
    """Up to 200 characters of the text (in NFKC) from just before the densest cluster of matched grams."""
    end = start + _WINDOW_CHARS
    positions = sorted(p for p in (compact.find(g, start, end) for g in matched) if p >= 0)
    if not positions:
        return ""
    width = max(stem_chars, _EXCERPT_CHARS)  # the question's own length, or the excerpt length
    best_start, best_count, j = positions[0], 0, 0
    for i, position in enumerate(positions):  # window with the most matched grams
        while positions[j] < position - width:
            j += 1
        if i - j + 1 > best_count:
            best_count, best_start = i - j + 1, positions[j]
    # Map the compact offset back to the NFKC text: skip whole blocks, then walk characters.
    original = unicodedata.normalize("NFKC", text)
    seen = offset = 0
    while offset < len(original):
        size = len(_compact_normalized(original[offset:offset + 4096]))
        if seen + size > best_start:
            break
        seen, offset = seen + size, offset + 4096
    while offset < len(original) and seen < best_start:
        seen += len(_compact_normalized(original[offset]))
        offset += 1
    begin = max(0, offset - 20)
    return " ".join(original[begin:begin + _EXCERPT_CHARS].split())[:_EXCERPT_CHARS]


def heldout_questions(mcqa_root: Path, splits: Iterable[str] = ("dev", "test", "fewshot")) -> list[HeldoutQuestion]:
    """Reads <mcqa_root>/<subset>/<split>.jsonl (rows with `question`, `A`..`E`) with kormedgemma.core.io.read_jsonl.

    Every subset folder under `mcqa_root` is read, in sorted order; a split file a subset lacks is
    skipped (fewshot is often absent); rows with an empty question are skipped. `source` is
    "<subset>/<split>:<row number>", the row number counted from 0 over the file's rows.
    """
    root = Path(mcqa_root)
    questions: list[HeldoutQuestion] = []
    splits = list(splits)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for split in splits:
            path = folder / f"{split}.jsonl"
            if not path.is_file():
                continue
            for number, row in enumerate(read_jsonl(path)):
                text = str(row.get("question") or "").strip()
                if not text:
                    continue
                options = tuple(str(row[key]) for key in _OPTION_KEYS if row.get(key) not in (None, ""))
                questions.append(HeldoutQuestion(text=text, options=options,
                                                 source=f"{folder.name}/{split}:{number}"))
    return questions
