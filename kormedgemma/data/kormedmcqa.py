"""KorMedMCQA the way lm-evaluation-harness asks and scores it, without importing the harness.

The harness's `kormedmcqa` task (version 3.0 in lm_eval 0.4.13) defines the numbers people compare:
- prompt ``{question.strip()}\\nA. {A}\\n…\\nE. {E}\\n정답：`` (full-width colon, no space;
  options as written);
- k-shot context: the first k rows of the `fewshot` split, each rendered as the prompt plus
  ``" {letter}\\n\\n"``, concatenated in front of the question (the `first_n` sampler);
- greedy generation of up to 1,024 tokens cut at the first of ``Q:``, ``</s>``, ``<|im_end|>``,
  ``.``, ``\\n\\n`` (and the tokenizer's end-of-sequence);
- v3.0: the answer extracted by the KorMedMCQA paper's cascade (Appendix B: the last match of
  the first pattern that matches, `extract_choice`), exact-matched with the gold letter;
- v2.0 (reported beside it): exact match of the whole cut output after deleting spaces and
  newlines, lower-casing and deleting ASCII punctuation (`string.punctuation`: the full-width
  ``：`` survives, so ``정답： C`` scores 0).

Keeping these rules in one pure module (no torch) is what lets the tests pin them on planted
outputs, and `kormedgemma.evaluation.parity` check them against the installed harness itself.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from kormedgemma.core.io import MissingArtifactError, numbered_rows
from kormedgemma.data.sources import find_mcqa_file, mcqa_looked_for, validate_mcqa_row

LETTERS = "ABCDE"
ANSWER_CUE = "정답："
STOP_SEQUENCES = ("Q:", "</s>", "<|im_end|>", ".", "\n\n")
IGNORED_REGEXES = (" ", "\n")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# KorMedMCQA paper, Appendix B: the first pattern that matches wins; its last match is the answer.
CHOICE_PATTERNS = (
    re.compile(r"정답[:\s]*([ABCDE])", re.IGNORECASE),
    re.compile(r"정답은\s*([ABCDE])\s*입니다", re.IGNORECASE),
    re.compile(r"\b([ABCDE])\.", re.IGNORECASE),
    re.compile(r"\b([ABCDE])\b", re.IGNORECASE),
)


def letter(answer: int) -> str:
    """KorMedMCQA answers are 1–5; the harness target is the letter."""
    return LETTERS[answer - 1]


def doc_to_text(row: dict[str, Any]) -> str:
    options = "".join(f"\n{key}. {row[key]}" for key in LETTERS)
    return f"{str(row['question']).strip()}{options}\n{ANSWER_CUE}"


def fewshot_example(row: dict[str, Any]) -> str:
    return f"{doc_to_text(row)} {letter(row['answer'])}\n\n"


def build_prompt(row: dict[str, Any], fewshot: Sequence[dict[str, Any]] = (), shots: int = 0) -> str:
    """The harness context for `row`: the first `shots` fewshot rows, then the question."""
    if shots > len(fewshot):
        raise ValueError(f"{shots}-shot needs {shots} fewshot rows, the fewshot split has {len(fewshot)}")
    examples = [r for r in fewshot[:shots] if r != row]  # the harness drops the doc itself
    return "".join(fewshot_example(r) for r in examples) + doc_to_text(row)


def cut_at_stops(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """What the harness keeps of a generation: the text before the first stop sequence."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def normalize(text: str) -> str:
    """The harness's exact_match normalisation: regexes, then case, then ASCII punctuation, and
    trailing NULs dropped — the harness compares numpy fixed-width strings, which lose them."""
    for pattern in IGNORED_REGEXES:
        text = re.sub(pattern, "", text)
    return text.lower().translate(_PUNCTUATION).rstrip("\x00")


def exact_match(output: str, gold: str) -> bool:
    return normalize(output) == normalize(gold)


def harness_choice(output: str) -> str:
    """The letter an output counts as under exact match, or "" when it equals none of A–E."""
    normalized = normalize(output)
    return normalized.upper() if len(normalized) == 1 and normalized.upper() in LETTERS else ""


def extract_choice(output: str) -> str:
    """The KorMedMCQA paper's answer-extraction cascade; "" when nothing looks like an answer."""
    for pattern in CHOICE_PATTERNS:
        found = pattern.findall(output)
        if found:
            return found[-1].upper()
    return ""


# --------------------------------------------------------------------------- a folder of questions
@dataclass
class McqaSet:
    """A folder in the KorMedMCQA schema: test rows and fewshot rows per subset, bad rows listed."""

    root: Path
    test: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fewshot: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bad_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def questions(self) -> int:
        return sum(len(rows) for rows in self.test.values())


def read_mcqa_folder(root: Path, split: str = "test", subsets: Optional[Sequence[str]] = None,
                     max_questions: Optional[int] = None) -> McqaSet:
    """Read `<subset>/<split>` (and `<subset>/fewshot` when present) under `root`.

    Each file is `.jsonl` or `.csv` (pandas export, answers 1–5 or A–E), and `dev` may be named
    `valid`: the folders of KorMedMCQA as its GitHub copies have them are read as they are.
    A row with no question, a missing option, a bad answer or a line that cannot be parsed is
    counted and listed, never fatal: one bad line must not cost a night's evaluation.
    """

    root = Path(root)
    layout = f"<subset>/{split}.jsonl or .csv"
    if not root.is_dir():
        raise MissingArtifactError(f"{root} is not a folder: --data needs a folder of {layout} files")
    files = {folder.name: find_mcqa_file(folder, split) for folder in sorted(root.iterdir()) if folder.is_dir()}
    found = [subset for subset, path in files.items() if path is not None]
    chosen = list(subsets) if subsets else found
    missing = [s for s in chosen if s not in found]
    if missing or not chosen:
        raise MissingArtifactError(
            f"{root}: no {' and no '.join(f'{s}/{split}' for s in missing) or layout} "
            f"({mcqa_looked_for(split)}; found subsets: {', '.join(found) or 'none'}); "
            f"the folder must follow the KorMedMCQA layout")
    result = McqaSet(root=root)
    for subset in chosen:
        rows = _read_rows(files[subset], subset, result.bad_rows)
        result.test[subset] = rows[:max_questions] if max_questions else rows
        shots = find_mcqa_file(root / subset, "fewshot")
        if shots is not None:
            result.fewshot[subset] = _read_rows(shots, subset, result.bad_rows)
    if result.questions == 0:
        raise ValueError(f"{root}: no usable {split} question ({len(result.bad_rows)} bad rows): "
                         f"{result.bad_rows[:3]}")
    return result


def _read_rows(path: Path, subset: str, bad: list[dict[str, Any]]) -> list[dict[str, Any]]:

    rows, skipped = [], []
    for number, raw in numbered_rows(path, skipped):
        clean, reason = validate_mcqa_row(raw, subset)
        if clean is None:
            bad.append({"file": f"{subset}/{path.name}", "row": number, "reason": reason})
        else:
            rows.append(clean)
    bad.extend({"file": f"{subset}/{path.name}", "row": line, "reason": reason} for line, reason in skipped)
    return rows
