"""PubMedQA's labelled set (the authors' `ori_pqal.json`) as this project's local English data.

The 1,000 expert-labelled questions carry real English biomedical abstracts. Its official 500 test
ids (`test_ground_truth.json`) become the English retention benchmark (`pubmedqa.jsonl`, the rows
`english.load_benchmark` reads, as the Hub's `qiaojin/PubMedQA` gives them); the other 500
abstracts become English text for replay and held-out bits per character. Split by id, so no
abstract the benchmark asks about is ever trained on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kormedgemma.core.io import write_jsonl

LABELS = ["yes", "no", "maybe"]
ABSTRACTS_FILE = "pubmedqa_abstracts.jsonl"
BENCHMARK_FILE = "pubmedqa.jsonl"


def read_pqal(folder: Path) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(id → row, the official test ids) from the authors' files; a missing file says which."""
    folder = Path(folder)
    rows_file, test_file = folder / "ori_pqal.json", folder / "test_ground_truth.json"
    for file in (rows_file, test_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: point at a folder with PubMedQA's ori_pqal.json and "
                                    "test_ground_truth.json (the authors' repository, data/)")
    rows = json.loads(rows_file.read_text(encoding="utf-8"))
    test_ids = set(json.loads(test_file.read_text(encoding="utf-8")))
    if not test_ids <= set(rows):
        raise ValueError(f"{test_file}: {len(test_ids - set(rows))} test ids are not in {rows_file}")
    return rows, test_ids


def abstract_text(row: dict[str, Any]) -> str:
    """The abstract as prose: its sections, then its conclusion (the long answer)."""
    return " ".join([*row["CONTEXTS"], row.get("LONG_ANSWER", "")]).strip()


def benchmark_row(pmid: str, row: dict[str, Any]) -> dict[str, Any]:
    return {"id": pmid, "question": row["QUESTION"], "context": "\n".join(row["CONTEXTS"]), "choices": list(LABELS),
            "answer": LABELS.index(row["final_decision"])}


def write_local_pubmedqa(folder: Path, out: Path) -> dict[str, int]:
    """`out/english/pubmedqa_abstracts.jsonl` (the non-test abstracts, {"text"}) and
    `out/english_mcqa/pubmedqa.jsonl` (the 500 test questions); returns the counts."""

    rows, test_ids = read_pqal(folder)
    train = [{"text": abstract_text(row), "id": pmid} for pmid, row in sorted(rows.items()) if pmid not in test_ids]
    test = [benchmark_row(pmid, rows[pmid]) for pmid in sorted(test_ids)]
    write_jsonl(Path(out) / "english" / ABSTRACTS_FILE, train)
    write_jsonl(Path(out) / "english_mcqa" / BENCHMARK_FILE, test)
    return {"abstracts": len(train), "test_questions": len(test)}
