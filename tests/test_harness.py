"""KorMedMCQA prompts and scoring pinned to lm-evaluation-harness's kormedmcqa tasks (v2.0)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kormedgemma.harness import (build_prompt, cut_at_stops, doc_to_text, exact_match, extract_choice,
                                 harness_choice, normalize, read_mcqa_folder)

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
])
def test_planted_outputs_score_as_the_harness_scores_them(output, kept, letter, extracted):
    assert cut_at_stops(output) == kept
    assert harness_choice(kept) == letter
    assert exact_match(kept, "C") == (letter == "C")
    assert extract_choice(kept) == extracted


def test_normalisation_removes_spaces_newlines_case_and_ascii_punctuation_only():
    assert normalize(" A,\n b!") == "ab"
    assert normalize("정답：C") == "정답：c"


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
    from kormedgemma.io import MissingArtifactError

    with pytest.raises(MissingArtifactError, match="KorMedMCQA layout"):
        read_mcqa_folder(tmp_path)
