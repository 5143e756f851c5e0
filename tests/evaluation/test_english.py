"""English retention: harness prompts, bundled samples, the forgetting flag."""
from __future__ import annotations

import json
import shutil

import pytest

from kormedgemma.evaluation.english import load_benchmark, prompt_and_choices, retention_table, retention_warnings, text_retention


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
    from kormedgemma.core.config import load_config

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


def test_english_bits_per_char_rising_beyond_the_tolerance_is_flagged_and_warned():
    # the real 270M's no-expansion run: PubMedQA accuracy rose, held-out English bits/char more than doubled
    ppl = {"base": {"bits_per_char": 0.75686}, "adapted": {"bits_per_char": 1.74264}}
    text = text_retention(ppl, tolerance=0.02)
    assert (text["rise"], text["flagged"]) == (1.3025, True)
    summary = {"tolerance": 0.02, "retention": [{"benchmark": "pubmedqa", "n": 500, "base": 0.396, "adapted": 0.448,
                                                 "drop": -0.052, "flagged": False}], "text_retention": text}
    assert retention_warnings(summary) == [
        "WARNING: English bits per character rose 130.2% (0.75686 → 1.74264 on held-out English text), more than the "
        "tolerated 2.0%: the model is forgetting English (more English replay, or shorter stages 6-7)"]
    within = text_retention({"base": {"bits_per_char": 1.0}, "adapted": {"bits_per_char": 1.015}}, tolerance=0.02)
    assert (within["rise"], within["flagged"]) == (0.015, False)
    assert text_retention({"base": {"bits_per_char": 1.0}, "adapted": {"bits_per_char": 0.9}}, 0.02)["rise"] == -0.1


def test_hub_benchmarks_fail_clearly_offline():
    from kormedgemma.core.config import load_config
    from kormedgemma.core.hub import HubUnavailableError

    config = load_config("tiny", overrides={"evaluation.english_local_path": None})
    with pytest.raises(HubUnavailableError, match="english_local_path"):
        load_benchmark(config, "medqa")


def test_retention_drop_is_measured_on_two_models_whose_answers_are_known(tiny_phase4, tmp_path):
    """Each row's answer is set to the base model's own pick, so base scores 100 % and the adapted model
    scores exactly its agreement with base: the drop the artifact reports is known in advance."""
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.config import apply_overrides
    from kormedgemma.core.hub import model_ref
    from kormedgemma.evaluation.english import evaluate_english, plot_retention, score_benchmark
    from kormedgemma.modeling.base_model import load_for_eval

    config, instruct, _ = tiny_phase4
    names = list(config.evaluation.english_benchmarks)
    rows = {name: load_benchmark(config, name)[0] for name in names}
    base_model, base_tokenizer = load_for_eval(model_ref(config, config.base.model, "base.model"))
    adapted_model, adapted_tokenizer = load_for_eval(str(instruct))
    base_picks = {n: score_benchmark(base_model, base_tokenizer, n, rows[n], progress=False)["predictions"] for n in names}
    adapted_picks = {n: score_benchmark(adapted_model, adapted_tokenizer, n, rows[n], progress=False)["predictions"]
                     for n in names}
    planted = tmp_path / "english"
    planted.mkdir()
    for name in names:
        with open(planted / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row, pick in zip(rows[name], base_picks[name]):
                handle.write(json.dumps(dict(row, answer=pick), ensure_ascii=False) + "\n")
    private = apply_overrides(config, {"paths.root": str(tmp_path / "root"), "evaluation.english_local_path": str(planted)})
    for key in ("instruct_model", "english", "token_store", "base_model"):
        shutil.copytree(artifact_path(config, key), artifact_path(private, key))
    out = evaluate_english(private, progress=False)
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["benchmark"] for r in summary["retention"]] == names
    tolerance = private.evaluation.retention_tolerance
    for row in summary["retention"]:
        name = row["benchmark"]
        agree = sum(a == b for a, b in zip(adapted_picks[name], base_picks[name])) / len(rows[name])
        assert row["n"] == len(rows[name]) and row["base"] == 1.0
        assert row["adapted"] == pytest.approx(agree, abs=1e-4) and row["drop"] == pytest.approx(1 - agree, abs=1e-4)
        assert row["flagged"] == (1 - agree > tolerance)
    text = summary["text_retention"]
    assert text["rise"] == pytest.approx(summary["perplexity"]["adapted"]["bits_per_char"]
                                         / summary["perplexity"]["base"]["bits_per_char"] - 1, abs=1e-4)
    assert summary["flagged"] == ([r["benchmark"] for r in summary["retention"] if r["flagged"]]
                                  + (["English bits/char"] if text["flagged"] else []))
    assert set(summary["perplexity"]) == {"base", "adapted"}
    assert all(0 < v["bits_per_char"] < 100 for v in summary["perplexity"].values())
    # the plot draws those accuracies: base bars, then adapted bars, in benchmark order
    heights = [patch.get_height() for patch in plot_retention(summary).axes[0].patches]
    assert heights == [r["base"] for r in summary["retention"]] + [r["adapted"] for r in summary["retention"]]
    assert (out / "retention.png").is_file()
