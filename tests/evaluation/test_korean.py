"""The evaluator on the tiny model: padding-proof scoring, planted outputs, CLI, results = predictions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kormedgemma.data.kormedmcqa import McqaSet
from kormedgemma.evaluation import korean as ev

ROWS = [{"question": f"문항 {n}: 고혈압 1차 약제는?", "A": "이뇨제", "B": "항생제", "C": "스테로이드", "D": "인슐린",
         "E": "철분제", "answer": n % 5 + 1, "subject": "cardio"} for n in range(6)]


@pytest.fixture(scope="module")
def merged(tiny_phase3):
    from kormedgemma.core.artifacts import artifact_path

    config, _ = tiny_phase3
    path = artifact_path(config, "merged_model")
    model, tokenizer = ev.load_for_eval(path)
    return path, model, tokenizer


def test_choice_logprobs_do_not_depend_on_batching_or_padding(merged):
    _, model, tokenizer = merged
    contexts = ["고혈압의 치료는", "당뇨병 환자에게 메트포르민을 처방할 때 확인할 검사는 무엇인가? 정답：", "A"]
    choices = [[" A", " 이뇨제"], [" B", " 신장 기능 검사"], [" C", " D"]]
    alone = ev.choice_logprobs(model, tokenizer, contexts, choices, batch_size=1, progress=False)
    batched = ev.choice_logprobs(model, tokenizer, contexts, choices, batch_size=8, progress=False)
    assert torch.allclose(torch.tensor(alone), torch.tensor(batched), atol=1e-4)
    # and equal to a plain forward over one unpadded sequence
    head, tail = ev.encode_pair(tokenizer, contexts[1], choices[1][1])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([head + tail])).logits[0].float().log_softmax(-1)
    direct = sum(float(logits[len(head) - 1 + k, token]) for k, token in enumerate(tail))
    assert math.isclose(alone[1][1], direct, abs_tol=1e-4)


def test_planted_outputs_score_v3_extraction_as_headline_and_v2_exact_match_beside(monkeypatch, merged):
    from kormedgemma.evaluation.decoding import Generated

    _, model, tokenizer = merged
    rows = [dict(r, answer=3) for r in ROWS[:3]] + [dict(ROWS[3], answer=1), dict(ROWS[4], answer=2)]
    data = McqaSet(root=Path("planted"), test={"cardio": rows}, fewshot={})
    # generated text before the harness's cut: "." and "\n\n" end what is scored
    planted = ["정답： C. 이뇨제가", "c", " C\n\nB", " B", "설명이 길다\n\nB"]
    seen = {}

    def fake(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs)
        return Generated(texts=list(planted), tokens=[[5]] * 5, truncated=[4])

    monkeypatch.setattr(ev, "greedy_generate", fake)
    results, predictions = ev.evaluate_mcqa(model, tokenizer, data, progress=False)
    assert seen["max_new_tokens"] == 1024 and "." in seen["stop_strings"]  # the harness's max_gen_toks and stops
    assert [p["raw_output"] for p in predictions] == ["정답： C", "c", " C", " B", "설명이 길다"]
    assert [p["gold"] for p in predictions] == ["C", "C", "C", "A", "B"]
    assert [p["prediction"] for p in predictions] == ["C", "C", "C", "B", ""]  # v3.0: extracted
    assert [p["exact_match_v2"] for p in predictions] == ["", "C", "C", "B", ""]  # v2.0: "정답： C" is no letter
    overall = results["overall"]
    assert (overall["correct"], overall["accuracy"], overall["exact_match_v2"]) == (3, 0.6, 0.4)
    assert overall["unanswered"] == 1 and overall["truncated"] == 1 and predictions[4]["truncated"]
    assert results["task"] == "lm-evaluation-harness kormedmcqa v3.0" and "1 of 5 prompts" in results["warnings"][0]
    assert ev.summarize(predictions) | {} == {k: results[k] for k in ("subsets", "overall", "chance",
                                                                         "at_or_below_chance")}


def test_chance_level_is_flagged():
    predictions = [{"subject": "s", "gold": "A", "prediction": "", "exact_match_v2": ""}] * 5
    results = ev.summarize(predictions)
    assert results["at_or_below_chance"] and "at or below chance" in ev.chance_warning(results)
    good = ev.summarize([{"subject": "s", "gold": "A", "prediction": "A", "exact_match_v2": None}] * 5)
    assert ev.chance_warning(good) is None


def test_evaluate_cli_on_a_folder_the_project_never_saw(merged, tmp_path: Path, capsys):
    from kormedgemma.cli import main

    path, _, _ = merged
    data = tmp_path / "unseen"
    for subset, rows in (("cardio", ROWS[:4]), ("derm", ROWS[4:])):
        (data / subset).mkdir(parents=True)
        lines = [json.dumps(r, ensure_ascii=False) for r in rows] + ['{"question": "옵션 없음", "answer": 2}']
        (data / subset / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (data / subset / "fewshot.jsonl").write_text(
            "\n".join(json.dumps(dict(r, question=r["question"] + " (예시)"), ensure_ascii=False) for r in ROWS[:5]) + "\n",
            encoding="utf-8")
    out = tmp_path / "out"
    for mode in ("generate", "loglikelihood"):
        assert main(["evaluate", "--model", str(path), "--data", str(data), "--out", str(out), "--shots", "5",
                     "--mode", mode, "--batch-size", "3"]) == 0
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [p["subject"] for p in predictions] == ["cardio"] * 4 + ["derm"] * 2
        assert {p["prediction"] for p in predictions} <= set("ABCDE") | {""}
        assert set(predictions[0]) >= {"subject", "question", "gold", "prediction", "raw_output"}
        for subset in ("cardio", "derm"):
            mine = [p for p in predictions if p["subject"] == subset]
            assert results["subsets"][subset]["n"] == len(mine)
            assert results["subsets"][subset]["accuracy"] == round(sum(p["prediction"] == p["gold"] for p in mine) / len(mine), 4)
        assert results["overall"]["accuracy"] == round(sum(p["prediction"] == p["gold"] for p in predictions) / 6, 4)
        assert results["bad_row_count"] == 2 and results["mode"] == mode and results["shots"] == 5
    assert all(p["prediction"] in "ABCDE" and p["prediction"] for p in predictions)  # log-likelihood always answers


def test_evaluate_cli_errors_are_one_line(merged, tmp_path: Path, capsys):
    from kormedgemma.cli import main

    path, _, _ = merged
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "test.jsonl").write_text(json.dumps(ROWS[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["evaluate", "--model", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--shots", "5"]) == 2
    assert "5-shot needs 5 usable rows" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "nothing"), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_korean_evaluation_artifact_agrees_with_its_predictions(tiny_phase4):
    from kormedgemma.core.io import read_jsonl

    config, _, _ = tiny_phase4
    out = ev.evaluate_korean(config, progress=False)
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    names = [r["name"] for r in summary["runs"]]
    assert names == [f"{model}_{run}" for model in ("base", "stage7", "instruct")
                     for run in ("generate_0shot", "generate_5shot", "loglikelihood_0shot")] + ["instruct_chat_0shot"]
    for run in summary["runs"]:
        predictions = list(read_jsonl(out / "runs" / run["name"] / "predictions.jsonl"))
        assert len(predictions) == 12
        assert run["overall"]["accuracy"] == round(sum(p["prediction"] == p["gold"] for p in predictions) / 12, 4)
    # the expanded tokenizer spends fewer tokens on Korean, and bits/char is what compares across them
    base, expanded = summary["tokenizer_efficiency"]
    assert expanded["tokens_per_char"] < base["tokens_per_char"]
    assert summary["perplexity"]["stage7"]["bits_per_char"] < summary["perplexity"]["base"]["bits_per_char"]
    assert "KorMedMCQA accuracy" in (out / "report.md").read_text()
    # the plot's bars are each run's accuracy per subset, then overall, run after run
    from plotdata import bar_heights, png_size

    groups = list(summary["runs"][0]["subsets"])
    expected = [round(v or 0, 6) for r in summary["runs"]
                for v in [r["subsets"][g]["accuracy"] for g in groups] + [r["overall"]["accuracy"]]]
    assert bar_heights(ev.plot_accuracy(summary).axes[0]) == expected
    assert min(png_size(out / "accuracy.png")) >= 200
    assert "`kormedmcqa` task v3.0" in (out / "report.md").read_text()
    # the pipeline report names the task version and carries the v2.0 exact match beside the headline
    from kormedgemma.pipeline.report import headline

    metrics = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["metrics"]
    line = headline("eval_korean", metrics)
    assert "(lm-evaluation-harness kormedmcqa v3.0) base_generate_0shot " in line
    assert "; v2.0 exact match base_generate_0shot " in line
    assert set(metrics["exact_match_v2"]) == {r["name"] for r in summary["runs"] if r["mode"] == "generate"}
