"""PubMedQA's labelled set as local English data: split by the official test ids."""
import json
from pathlib import Path

import pytest

from kormedgemma.data.pubmedqa import LABELS, write_local_pubmedqa

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "pubmedqa"


def fake_pqal(folder: Path) -> None:
    rows = {str(100 + i): {"QUESTION": f"Does drug {i} work?", "CONTEXTS": [f"Background {i}.", f"Results {i}."],
                           "LONG_ANSWER": f"Drug {i} works.", "final_decision": LABELS[i % 3]} for i in range(6)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ori_pqal.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "test_ground_truth.json").write_text(json.dumps({"101": "no", "104": "no"}), encoding="utf-8")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]  # not splitlines: U+2028 in text


def test_test_questions_become_the_benchmark_and_every_other_abstract_english_text(tmp_path):
    fake_pqal(tmp_path / "src")
    counts = write_local_pubmedqa(tmp_path / "src", tmp_path / "out")
    abstracts = read(tmp_path / "out" / "english" / "pubmedqa_abstracts.jsonl")
    questions = read(tmp_path / "out" / "english_mcqa" / "pubmedqa.jsonl")
    assert counts == {"abstracts": 4, "test_questions": 2}
    assert [row["id"] for row in abstracts] == ["100", "102", "103", "105"]
    assert abstracts[0]["text"] == "Background 0. Results 0. Drug 0 works."
    assert questions[0] == {"id": "101", "question": "Does drug 1 work?", "context": "Background 1.\nResults 1.",
                            "choices": ["yes", "no", "maybe"], "answer": 1}
    assert questions[1]["answer"] == LABELS.index("no") == 1


def test_a_missing_file_names_it_and_what_the_folder_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="ori_pqal.json not found"):
        write_local_pubmedqa(tmp_path, tmp_path / "out")


@pytest.mark.skipif(not REAL.is_dir(), reason=f"PubMedQA's labelled set ({REAL}) is not beside this checkout")
def test_the_real_set_splits_500_and_500_with_no_abstract_in_both(tmp_path):
    from kormedgemma.evaluation.english import _valid

    counts = write_local_pubmedqa(REAL, tmp_path)
    abstracts = read(tmp_path / "english" / "pubmedqa_abstracts.jsonl")
    questions = read(tmp_path / "english_mcqa" / "pubmedqa.jsonl")
    assert counts == {"abstracts": 500, "test_questions": 500}
    assert not {row["id"] for row in abstracts} & {row["id"] for row in questions}
    assert all(_valid(row) is None for row in questions)
