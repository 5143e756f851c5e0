"""English retention: harness prompts, bundled samples, the forgetting flag."""
from __future__ import annotations

import json

import pytest

from kormedgemma.english import load_benchmark, prompt_and_choices, retention_table


def test_prompts_follow_the_harness_tasks():
    row = {"question": "Which nerve innervates the diaphragm?", "choices": ["Vagus", "Phrenic", "Intercostal", "Accessory"],
           "answer": 1, "subject": "anatomy"}
    prompt, choices = prompt_and_choices("mmlu_medical", row)
    assert prompt == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                      "Which nerve innervates the diaphragm?\nA. Vagus\nB. Phrenic\nC. Intercostal\nD. Accessory\nAnswer:")
    assert choices == [" A", " B", " C", " D"]
    assert prompt_and_choices("medqa", row)[0].startswith("Question: Which nerve")
    pubmed = {"question": "Does it work?", "context": "It worked.", "choices": ["yes", "no", "maybe"], "answer": 0}
    assert prompt_and_choices("pubmedqa", pubmed) == ("Abstract: It worked.\nQuestion: Does it work?\nAnswer:",
                                                      [" yes", " no", " maybe"])


def test_bundled_samples_load_and_bad_rows_are_listed(tmp_path):
    from kormedgemma.config import load_config

    config = load_config("tiny")
    sizes = {name: len(load_benchmark(config, name)[0]) for name in ("medqa", "mmlu_medical", "pubmedqa")}
    assert sizes == {"medqa": 8, "mmlu_medical": 8, "pubmedqa": 6}
    rows = [{"question": "q", "choices": ["a", "b"], "answer": 1}, {"question": "q", "choices": ["a", "b"], "answer": 2},
            {"question": "", "choices": ["a", "b"], "answer": 0}]
    (tmp_path / "medqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mine = load_config("tiny", overrides={"evaluation.english_local_path": str(tmp_path)})
    good, bad = load_benchmark(mine, "medqa")
    assert len(good) == 1 and [b["row"] for b in bad] == [2, 3]
    with pytest.raises(FileNotFoundError, match="pubmedqa.jsonl"):
        load_benchmark(mine, "pubmedqa")


def test_a_drop_beyond_the_tolerance_is_flagged():
    results = {"medqa": {"base": {"n": 100, "accuracy": 0.60}, "adapted": {"n": 100, "accuracy": 0.57}},
               "pubmedqa": {"base": {"n": 100, "accuracy": 0.70}, "adapted": {"n": 100, "accuracy": 0.69}}}
    table = retention_table(results, tolerance=0.02)
    assert [(r["benchmark"], r["drop"], r["flagged"]) for r in table] == [("medqa", 0.03, True), ("pubmedqa", 0.01, False)]


def test_hub_benchmarks_fail_clearly_offline():
    from kormedgemma.config import load_config
    from kormedgemma.hub import HubUnavailableError

    config = load_config("tiny", overrides={"evaluation.english_local_path": None})
    with pytest.raises(HubUnavailableError, match="english_local_path"):
        load_benchmark(config, "medqa")


def test_english_evaluation_scores_both_models(tiny_phase4):
    from kormedgemma.english import evaluate_english

    config, _, _ = tiny_phase4
    out = evaluate_english(config, progress=False)
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["benchmark"] for r in summary["retention"]] == ["medqa", "mmlu_medical", "pubmedqa"]
    for row in summary["retention"]:
        by = summary["benchmarks"][row["benchmark"]]
        assert row["drop"] == round(by["base"]["accuracy"] - by["adapted"]["accuracy"], 4)
        assert by["base"]["n"] == by["adapted"]["n"] == row["n"]
    assert set(summary["perplexity"]) == {"base", "adapted"}
    assert (out / "retention.png").stat().st_size > 0
