"""KorMedMCQA prompts and scoring pinned to lm-evaluation-harness's kormedmcqa tasks (v2.0)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kormedgemma.data.kormedmcqa import (
    build_prompt,
    cut_at_stops,
    doc_to_text,
    exact_match,
    extract_choice,
    harness_choice,
    normalize,
    read_mcqa_folder,
)

ROW = {"question": "  아세트아미노펜 과량 복용의 해독제는? ", "A": "아세틸시스테인", "B": "플루마제닐", "C": "아트로핀",
       "D": "비타민 K", "E": "날록손", "answer": 1, "subject": "doctor"}


def _row(n: int, answer: int) -> dict:
    return {"question": f"질문 {n}", "A": "가", "B": "나", "C": "다", "D": "라", "E": "마", "answer": answer, "subject": "doctor"}


def test_prompt_equals_the_harness_template_for_a_known_row():
    # doc_to_text: "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nE. {{E}}\n정답："
    expected = ("아세트아미노펜 과량 복용의 해독제는?\nA. 아세틸시스테인\nB. 플루마제닐\nC. 아트로핀\nD. 비타민 K\nE. 날록손\n정답：")
    assert doc_to_text(ROW) == expected
    assert build_prompt(ROW) == expected


def test_five_shot_context_is_the_first_five_fewshot_rows_with_their_letters():
    fewshot = [_row(n, n % 5 + 1) for n in range(7)]
    prompt = build_prompt(ROW, fewshot, 5)
    shots = prompt.split("\n\n")
    assert len(shots) == 6 and shots[-1] == doc_to_text(ROW)
    for n, shot in enumerate(shots[:5]):
        # fewshot doc_to_text: "...\n정답： {{letter}}\n\n", target "" (nothing else appended)
        assert shot == f"질문 {n}\nA. 가\nB. 나\nC. 다\nD. 라\nE. 마\n정답： {'ABCDE'[n % 5]}"
    assert "질문 5" not in prompt and "질문 6" not in prompt


def test_fewshot_drops_the_question_itself_and_refuses_too_few_rows():
    fewshot = [ROW] + [_row(n, 1) for n in range(4)]
    assert build_prompt(ROW, fewshot, 5).count("해독제") == 1  # the harness filters the doc out: 4 shots remain
    with pytest.raises(ValueError, match="5-shot needs 5 fewshot rows"):
        build_prompt(ROW, fewshot[:3], 5)


@pytest.mark.parametrize("output, kept, letter, extracted", [
    ("정답： C.", "정답： C", "", "C"),   # "：" is not ASCII punctuation: exact match fails, as in the harness
    ("c", "c", "C", "C"),
    (" C\n", " C\n", "C", "C"),
    (" C. 아트로핀은 항콜린제", " C", "C", "C"),  # cut at the first "."
    (" B\n\nQ: 다음", " B", "B", "B"),
    ("정답: E", "정답: E", "", "E"),         # ASCII ":" is removed, but "정답" stays
    ("모르겠다", "모르겠다", "", ""),
    ("C\x00", "C\x00", "C", "C"),       # the harness compares numpy strings, which drop trailing NULs
    ("A와 B 중 C", "A와 B 중 C", "", "C"),  # v3.0 takes the last match
])
def test_planted_outputs_score_as_the_harness_scores_them(output, kept, letter, extracted):
    assert cut_at_stops(output) == kept
    assert harness_choice(kept) == letter
    assert exact_match(kept, "C") == (letter == "C")
    assert extract_choice(kept) == extracted


def test_normalisation_removes_spaces_newlines_case_and_ascii_punctuation_only():
    assert normalize(" A,\n b!") == "ab"
    assert normalize("정답：C") == "정답：c"
    assert normalize("C \x00") == "c" and normalize("C\x00D") == "c\x00d"  # only trailing NULs go, as in numpy


def test_bad_rows_are_counted_and_listed_not_fatal(tmp_path: Path):
    folder = tmp_path / "cardio"
    folder.mkdir()
    good = dict(_row(1, 3), question="심방세동 환자의 뇌졸중 예방약은?")
    lines = [json.dumps(good, ensure_ascii=False),
             json.dumps({k: v for k, v in _row(2, 1).items() if k != "E"}, ensure_ascii=False),
             json.dumps(_row(3, 7), ensure_ascii=False),
             json.dumps(dict(_row(4, 2), question="  "), ensure_ascii=False),
             "{not json", json.dumps(_row(5, 2), ensure_ascii=False)]
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = read_mcqa_folder(tmp_path)
    assert data.questions == 2
    reasons = {b["row"]: b["reason"] for b in data.bad_rows}
    assert reasons[2] == "missing option E" and reasons[3] == "answer 7 outside 1-5"
    assert reasons[4] == "empty question" and reasons[5].startswith("not valid JSON")
    assert data.fewshot == {}


def test_a_folder_without_test_files_names_the_layout(tmp_path: Path):
    from kormedgemma.core.io import MissingArtifactError

    with pytest.raises(MissingArtifactError, match="KorMedMCQA layout"):
        read_mcqa_folder(tmp_path)


KORMEDMCQA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kormedmcqa"


def test_a_pandas_csv_folder_is_read_as_written(tmp_path: Path):
    import pandas as pd

    columns = ["subject", "year", "period", "q_number", "question", "A", "B", "C", "D", "E", "answer", "cot"]
    folder = tmp_path / "doctor"
    folder.mkdir()
    pd.DataFrame([
        ["doctor", 2021, 1, 1, "심방세동 환자의\n뇌졸중 예방약은? ", "와파린 ", "아스피린", "헤파린", "디곡신", "아미오다론", "a", None],
        ["doctor", 2021, 1, 2, "질문 2", "가", "나", "다", "라", "마", "F", None],      # bad answer
        ["doctor", 2021, 1, 3, "질문 3", "가", "나", " ", "라", "마", "C", None],      # blank option
        ["doctor", 2021, 1, 4, "질문 4", "가", "나", "다", "라", "마", " e", None],
    ], columns=columns).to_csv(folder / "valid.csv")
    pd.DataFrame([["doctor", 2019, 1, 9, "질문 9", "가", "나", "다", "라", "마", 3, "풀이"]] * 5,
                 columns=columns).to_csv(folder / "fewshot.csv")
    data = read_mcqa_folder(tmp_path, split="dev")
    assert data.questions == 2 and [r["answer"] for r in data.test["doctor"]] == [1, 5]
    # line numbers: header is line 1, the first question spans lines 2-3
    assert data.bad_rows == [{"file": "doctor/valid.csv", "row": 4, "reason": "answer 'F' is not 1-5 or a letter A-E"},
                             {"file": "doctor/valid.csv", "row": 5, "reason": "missing option C"}]
    assert [r["answer"] for r in data.fewshot["doctor"]] == [3] * 5
    assert doc_to_text(data.test["doctor"][0]) == (
        "심방세동 환자의\n뇌졸중 예방약은?\nA. 와파린 \nB. 아스피린\nC. 헤파린\nD. 디곡신\nE. 아미오다론\n정답：")
    assert build_prompt(data.test["doctor"][1], data.fewshot["doctor"], 1).startswith(
        "질문 9\nA. 가\nB. 나\nC. 다\nD. 라\nE. 마\n정답： C\n\n질문 4\n")


def test_a_folder_without_the_split_lists_what_was_looked_for(tmp_path: Path):
    from kormedgemma.core.io import MissingArtifactError

    (tmp_path / "doctor").mkdir()
    (tmp_path / "doctor" / "test.jsonl").write_text(json.dumps(_row(1, 2)) + "\n", encoding="utf-8")
    with pytest.raises(MissingArtifactError, match=r"no nurse/test \(looked for test\.jsonl, test\.csv; "
                                                   r"found subsets: doctor\)"):
        read_mcqa_folder(tmp_path, subsets=["doctor", "nurse"])
    with pytest.raises(MissingArtifactError, match=r"looked for dev\.jsonl, dev\.csv, valid\.jsonl, valid\.csv; "
                                                   r"'valid' is accepted as another name of the 'dev' split"):
        read_mcqa_folder(tmp_path, split="dev")


@pytest.mark.skipif(not KORMEDMCQA.is_dir(), reason=f"the real KorMedMCQA copy ({KORMEDMCQA}) is not on this machine")
def test_the_real_kormedmcqa_folder_gives_the_harness_prompts():
    import csv

    test = read_mcqa_folder(KORMEDMCQA)
    assert {s: len(rows) for s, rows in test.test.items()} == {"dentist": 811, "doctor": 435, "nurse": 878, "pharm": 885}
    assert {s: len(rows) for s, rows in test.fewshot.items()} == {s: 5 for s in ("dentist", "doctor", "nurse", "pharm")}
    assert test.bad_rows == []
    dev = read_mcqa_folder(KORMEDMCQA, split="dev")
    assert {s: len(rows) for s, rows in dev.test.items()} == {"dentist": 304, "doctor": 164, "nurse": 291, "pharm": 300}
    assert dev.bad_rows == []

    with open(KORMEDMCQA / "doctor" / "test.csv", encoding="utf-8", newline="") as handle:
        first = next(csv.DictReader(handle))
    expected = (f"{first['question'].strip()}\nA. {first['A']}\nB. {first['B']}\nC. {first['C']}\n"
                f"D. {first['D']}\nE. {first['E']}\n정답：")
    row = test.test["doctor"][0]
    assert doc_to_text(row) == build_prompt(row) == expected
    assert row["answer"] == "ABCDE".index(first["answer"]) + 1
    # Options are kept as written: the real test split has options ending in a space.
    spaced = [(s, r[k]) for s, rows in test.test.items() for r in rows for k in "ABCDE" if r[k] != r[k].strip()]
    assert len(spaced) == 2 and all(option.endswith(" ") for _, option in spaced)
    assert all(f"\n{k}. {r[k]}\n" in doc_to_text(r) for rows in test.test.values() for r in rows for k in "ABCD")
