"""The parity tool: the harness's task pointed at local files, and the per-question comparison."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kormedgemma.evaluation.parity import GROUP, TASK_PREFIX, build_local_task, compare, hub_rows, planted_check

LMEVAL_PYTHON = Path(__file__).resolve().parents[2] / ".venv-lmeval" / "bin" / "python"
HEADER = ",subject,year,question,A,B,C,D,E,answer,cot\n"


def _harness_task(folder: Path) -> Path:
    """A stand-in for the installed task folder, in the layout lm_eval 0.4.13 ships."""
    folder.mkdir(parents=True)
    (folder / "_template_yaml").write_text("dataset_path : sean0042/KorMedMCQA\ntest_split : test\n", encoding="utf-8")
    (folder / "utils.py").write_text("# filter\n", encoding="utf-8")
    (folder / "_kormedmcqa.yaml").write_text(
        "group: kormedmcqa\ntask:\n  - kormedmcqa_doctor\n  - kormedmcqa_nurse\naggregate_metric_list:\n"
        "  - metric: exact_match\nmetadata:\n  version: 3.0\n", encoding="utf-8")
    return folder


def test_csv_rows_reach_the_harness_in_the_hub_schema_with_text_as_written(tmp_path: Path):
    path = tmp_path / "test.csv"
    path.write_text(HEADER + '0,doctor,2022,"질문 ",가 ,NA,3,"D, d",E,C,\n1,doctor,2022,둘째,a,b,c,d,e,5,\n',
                    encoding="utf-8")
    rows = hub_rows(path)
    assert rows[0] == {"question": "질문 ", "A": "가 ", "B": "NA", "C": "3", "D": "D, d", "E": "E", "answer": 3}
    assert rows[1]["answer"] == 5


def test_the_local_task_is_the_harness_template_pointed_at_each_subset(tmp_path: Path):
    source = _harness_task(tmp_path / "installed")
    data = tmp_path / "data"
    for subset in ("doctor", "nurse"):
        (data / subset).mkdir(parents=True)
        (data / subset / "test.csv").write_text(HEADER + "0,s,1,q,a,b,c,d,e,B,\n", encoding="utf-8")
        (data / subset / "fewshot.jsonl").write_text(json.dumps({"question": "f", "A": "a", "B": "b", "C": "c",
                                                                 "D": "d", "E": "e", "answer": 2}) + "\n")
    tasks = build_local_task(source, data, tmp_path / "task", ["doctor", "nurse"])
    assert tasks == [TASK_PREFIX + "doctor", TASK_PREFIX + "nurse"]
    out = tmp_path / "task"
    assert (out / "_template_yaml").read_text() == (source / "_template_yaml").read_text()  # unchanged
    doctor = (out / "doctor.yaml").read_text()
    assert "include: _template_yaml" in doctor and "dataset_path: json" in doctor
    assert str((out / "data" / "doctor" / "test.jsonl").resolve()) in doctor
    assert json.loads((out / "data" / "doctor" / "test.jsonl").read_text())["answer"] == 2
    group = (out / "_group.yaml").read_text()
    assert f"group: {GROUP}" in group and f"  - {TASK_PREFIX}nurse\n" in group and "kormedmcqa_doctor" not in group
    shutil.rmtree(data / "nurse")
    with pytest.raises(FileNotFoundError, match="nurse"):
        build_local_task(source, data, tmp_path / "task2", ["doctor", "nurse"])


def test_every_field_that_differs_is_counted_and_listed():
    harness = {"results": {GROUP: {"exact_match,extract_answer": 0.5}}, "samples": {TASK_PREFIX + "s": [
        {"doc_id": 1, "question": "q2", "prompt": "p2", "raw": " B", "parsed": "B", "exact_match": 0.0},
        {"doc_id": 0, "question": "q1", "prompt": "p1", "raw": " A", "parsed": "A", "exact_match": 1.0}]}}
    predictions = [{"subject": "s", "question": "q1", "gold": "A", "prediction": "A", "raw_output": " A"},
                   {"subject": "s", "question": "q2", "gold": "C", "prediction": "C", "raw_output": " C"}]
    result = compare(harness, {"s": ["p1", "p2 "]}, predictions, ["s"])
    assert result["differing"] == {"question": 0, "prompt": 1, "raw_output": 1, "parsed": 1, "correct": 1}
    assert [d["field"] for d in result["differences"]] == ["prompt", "raw_output", "parsed", "correct"]
    assert result["differences"][1] == {"subset": "s", "index": 1, "field": "raw_output", "harness": " B",
                                        "project": " C"}
    assert result["overall"] == {"n": 2, "harness": 0.5, "project": 1.0} and result["harness_group_score"] == 0.5


@pytest.mark.skipif(not LMEVAL_PYTHON.exists(), reason="lm_eval's own environment (.venv-lmeval, `make parity`) "
                                                       "is not built here")
def test_planted_outputs_score_as_the_installed_harness_scores_them(tmp_path: Path):
    from kormedgemma.evaluation.parity import harness_task_source

    source = harness_task_source(str(LMEVAL_PYTHON))
    data = tmp_path / "data" / "doctor"
    data.mkdir(parents=True)
    for split in ("test", "fewshot"):
        (data / f"{split}.csv").write_text(HEADER + "0,s,1,q,a,b,c,d,e,B,\n", encoding="utf-8")
    build_local_task(source, tmp_path / "data", tmp_path / "task", ["doctor"])
    result = planted_check(str(LMEVAL_PYTHON), tmp_path / "task", TASK_PREFIX + "doctor", tmp_path)
    assert result["outputs"] >= 20 and result["differing"] == 0, [r for r in result["rows"] if not r["equal"]]
