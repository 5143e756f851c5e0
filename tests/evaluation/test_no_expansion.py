"""`tokenizer.expand: false`: the simple alternative to the method (continued pretraining without new
tokens) through the same phases, so the two can be compared side by side."""
import base64
import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Phases 0-3 of tiny without expansion, through the library."""
    from kormedgemma.core.config import load_config
    from kormedgemma.data.dictionary import build_dictionary_artifact
    from kormedgemma.data.preprocess import preprocess_all
    from kormedgemma.data.sources import collect_all
    from kormedgemma.data.token_store import token_store_artifact
    from kormedgemma.modeling.base_model import build_base_artifact
    from kormedgemma.training.instruct import train_instruct
    from kormedgemma.training.stage import merge_stages, train_stage
    from kormedgemma.vocab.embeddings import initialize_artifact, resize_artifact
    from kormedgemma.vocab.tokenizer import filter_tokens_artifact, merge_artifact, train_tokenizer_artifact

    root = tmp_path_factory.mktemp("no_expansion")
    config = load_config("tiny", overrides={"paths.root": str(root), "tokenizer.expand": False})
    build_base_artifact(config)
    collect_all(config)
    build_dictionary_artifact(config)
    preprocess_all(config, progress=False)
    train_tokenizer_artifact(config)
    filtered = filter_tokens_artifact(config)
    merged = merge_artifact(config)
    token_store_artifact(config, progress=False)
    resized = resize_artifact(config)
    initialized = initialize_artifact(config)
    metrics = {n: train_stage(config, n, progress_bar=False) for n in range(1, 8)}
    final = merge_stages(config)
    train_instruct(config, progress_bar=False)
    return config, {"filtered": filtered, "merged": merged, "resized": resized, "initialized": initialized,
                    "stages": metrics, "final": final}


def test_phase_1_counts_what_expansion_would_save_but_merges_nothing(baseline):
    _, figures = baseline
    assert figures["filtered"]["selected"] > 0  # the candidates are still counted, for the report
    assert figures["merged"]["new_pieces"] == 0 and figures["merged"]["korean_reduction"] == 0
    assert figures["merged"]["vocab_size"] == figures["merged"]["base_size"]


def test_phase_2_passes_the_base_through_tied_and_unresized(baseline):
    from transformers import AutoModelForImageTextToText

    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.modeling.base_model import load_model

    config, figures = baseline
    assert figures["resized"]["rows_after"] == figures["resized"]["rows_before"] and not figures["resized"]["untied"]
    assert figures["initialized"]["new_tokens"] == 0
    base = load_model(config)
    initialized = AutoModelForImageTextToText.from_pretrained(artifact_path(config, "initialized_model"))
    assert initialized.get_output_embeddings().weight is initialized.get_input_embeddings().weight
    assert torch.equal(initialized.get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_stages_1_to_5_are_skipped_and_6_trains_the_tied_matrix_once(baseline):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from kormedgemma.core.artifacts import artifact_path, require
    from kormedgemma.modeling.base_model import load_model

    config, figures = baseline
    stages = figures["stages"]
    assert [stages[n]["steps"] for n in range(1, 6)] == [0] * 5 and all("skipped" in stages[n] for n in range(1, 6))
    assert not (require(config, "stage1") / "trained.safetensors").exists()
    assert stages[6]["steps"] == config.staged.stage6.max_steps and stages[6]["last_loss"] < stages[6]["first_loss"]
    with safe_open(str(require(config, "stage6") / "trained.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["input_embeddings"]  # the tied lm_head is the same matrix
    final = AutoModelForImageTextToText.from_pretrained(artifact_path(config, "merged_model"))
    base = load_model(config)
    assert final.get_output_embeddings().weight is final.get_input_embeddings().weight
    moved = (final.get_input_embeddings().weight - base.get_input_embeddings().weight).abs().amax(dim=1)
    assert (moved > 0).float().mean() > 0.5  # stage 6 moved the embedding rows (the text's tokens at least)
    report = json.loads((require(config, "stage1") / "metrics.json").read_text(encoding="utf-8"))
    assert report["skipped"].startswith("skipped: tokenizer.expand is false")


def test_the_method_and_the_baseline_side_by_side_on_the_same_held_out_text(baseline, tiny_phase4, tmp_path, capsys):
    from plotdata import line_data

    from kormedgemma.cli import main
    from kormedgemma.evaluation.compare import plot_comparison, report_lines

    method_config, _, _ = tiny_phase4
    baseline_config, _ = baseline
    out = tmp_path / "comparison"
    out.mkdir()
    (out / "notes.txt").write_text("a researcher's own file", encoding="utf-8")
    assert main(["compare", "--profile", "tiny", "--method-root", str(method_config.paths.root),
                 "--baseline-root", str(baseline_config.paths.root), "--max-texts", "4", "--seq-len", "64",
                 "--out", str(out)]) == 0
    assert "| stage 7 |" in capsys.readouterr().out
    assert (out / "notes.txt").read_text(encoding="utf-8") == "a researcher's own file"  # only its own files written
    result = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    method, plain = result["method"]["trajectory"], result["baseline"]["trajectory"]
    assert [r["model"] for r in method] == [r["model"] for r in plain] == [
        "base", "initialised", *(f"stage {k}" for k in range(1, 8)), "instruct"]
    for key in ("korean_bits_per_char", "english_bits_per_char"):
        assert method[0][key] == plain[0][key]  # one base, one held-out text
        assert plain[1][key] == plain[0][key]  # without expansion the initialised model is the base
        assert all(plain[k][key] == plain[1][key] for k in range(2, 7))  # stages 1-5 skipped
        assert plain[7][key] != plain[6][key]  # stage 6 trained
    assert method[1]["english_bits_per_char"] >= method[0]["english_bits_per_char"] - 1e-6  # new rows only take mass
    assert result["korean_stage7_gap"] == round(method[8]["korean_bits_per_char"] - plain[8]["korean_bits_per_char"], 5)
    assert result["method"]["new_tokens"] > 0 and result["baseline"]["new_tokens"] == 0
    assert result["baseline"]["stage_steps"][:5] == [0] * 5
    assert any(line.startswith("| stage 3 (the baseline skips it) |") for line in (out / "comparison.md").read_text().splitlines())
    # the plot's lines are the trajectories, Korean on the left, English on the right
    axes = plot_comparison(result).axes
    for ax, key in zip(axes, ("korean_bits_per_char", "english_bits_per_char")):
        assert line_data(ax) == {"method": [r[key] for r in method], "baseline": [r[key] for r in plain]}
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # along training: every stage evaluation, at the run's cumulative tokens, in bits per character
    import math

    from kormedgemma.evaluation.compare import plot_stage_curves
    from kormedgemma.training.stage import read_metrics

    for label, config in (("method", method_config), ("baseline", baseline_config)):
        stages = [read_metrics(config, k) for k in range(1, 8)]
        trained = [m for m in stages if m["steps"]]
        expected = [(m["stage"], sum(p["tokens"] for p in trained[:i]) + e["step"] * m["tokens"] // m["steps"],
                     round(e["korean_valid_loss"] * m["valid_tokens_per_char"]["korean"] / math.log(2), 5))
                    for i, m in enumerate(trained) for e in m["evals"] if i == 0 or e["step"]]
        curve = result[label]["curves"]
        assert [(r["stage"], r["tokens"]) for r in curve] == [e[:2] for e in expected]
        # (tokens per character is recorded to 5 decimals)
        assert [r["korean_bits_per_char"] for r in curve] == pytest.approx([e[2] for e in expected], rel=2e-5)
        assert [r["stage"] for r in curve][0] == (1 if label == "method" else 6)
        assert curve[-1]["train_seconds"] == pytest.approx(sum(m["train_seconds"] for m in trained), abs=0.1)
    drawn = line_data(plot_stage_curves({k: result[k]["curves"] for k in ("method", "baseline")}).axes[0])
    assert drawn["method"] == [r["korean_bits_per_char"] for r in result["method"]["curves"]]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # swapped roots are refused before anything is measured, and the folder already written stays
    assert main(["compare", "--method-root", str(baseline_config.paths.root), "--baseline-root",
                 str(method_config.paths.root), "--out", str(out)]) == 2
    assert "were the two roots swapped?" in capsys.readouterr().err
    assert json.loads((out / "comparison.json").read_text(encoding="utf-8")) == result
    # two runs measured on different held-out text are refused: bits per character would not compare
    from dataclasses import replace

    from kormedgemma.evaluation.compare import compare

    fewer = replace(baseline_config, evaluation=replace(baseline_config.evaluation, perplexity_max_texts=2))
    with pytest.raises(ValueError, match="held-out korean texts differ"):
        compare(method_config, fewer, progress=False)
    # phase 5's accuracies, side by side, from each run's results
    result["method"]["eval_korean"] = {"runs": [{"name": "instruct_loglikelihood_0shot", "overall": {"accuracy": 0.25}}]}
    result["baseline"]["eval_korean"] = {"runs": [{"name": "instruct_loglikelihood_0shot", "overall": {"accuracy": 0.5}},
                                                  {"name": "base_generate_0shot", "overall": {"accuracy": 0.125}}]}
    result["method"]["eval_english"] = {"retention": [{"benchmark": "pubmedqa", "base": 0.5, "adapted": 0.375}]}
    lines = report_lines(result)
    assert "| KorMedMCQA | instruct_loglikelihood_0shot | 25.0% | 50.0% |" in lines
    assert "| KorMedMCQA | base_generate_0shot | — | 12.5% |" in lines
    assert "| English | pubmedqa (adapted) | 37.5% | — |" in lines


@pytest.mark.notebooks
@pytest.mark.slow
def test_the_whole_tiny_pipeline_runs_without_expansion(tmp_path):
    from kormedgemma.pipeline.runner import run_pipeline
    from kormedgemma.pipeline.steps import STEPS

    outcomes = run_pipeline("tiny", overrides={"paths.root": str(tmp_path), "tokenizer.expand": False},
                            echo=lambda *_: None)
    assert [(o.id, o.status) for o in outcomes] == [(s.id, "ran") for s in STEPS]


@pytest.mark.notebooks
@pytest.mark.slow
def test_the_comparison_notebook_reads_both_runs_and_shows_its_plot(baseline, tiny_phase4, tmp_path):
    import papermill
    from plotdata import png_size

    root = Path(__file__).resolve().parents[2]
    method_config, _, _ = tiny_phase4
    baseline_config, _ = baseline
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(root / "phase5_evaluation/03_compare_with_baseline.ipynb"), str(executed), kernel_name="python3",
        parameters={"method_root": str(method_config.paths.root), "baseline_root": str(baseline_config.paths.root),
                    "max_texts": 2, "seq_len": 32, "out_dir": str(tmp_path / "cmp")}, progress_bar=False, cwd=str(root))
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))
    assert result["method"]["new_tokens"] > 0 and result["baseline"]["new_tokens"] == 0
    images = [output for cell in json.loads(executed.read_text(encoding="utf-8"))["cells"]
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(images) == 2  # plot_comparison's and plot_stage_curves' figures, shown as pictures
    assert png_size(base64.b64decode(images[0]["data"]["image/png"]))[0] >= 600
