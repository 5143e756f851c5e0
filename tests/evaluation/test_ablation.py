"""The embedding-init ablation at step 0: every combination measured on one resized model."""
import json

import pytest


def test_every_combination_is_measured_and_new_rows_only_take_probability_from_english(tiny_phase2, tmp_path,
                                                                                       capsys):
    from kormedgemma.cli import main

    config, _, _ = tiny_phase2
    assert main(["init-ablation", "--set", f"paths.root={config.paths.root}", "--methods", "eeve", "plain_mean",
                 "--outputs", "method", "base_mean", "--max-texts", "4", "--seq-len", "64",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "init_ablation.json").read_text(encoding="utf-8"))
    rows = result["rows"]
    assert [(r["method"], r["output_rows"]) for r in rows] == [
        ("base model", "—"), ("eeve", "method"), ("eeve", "base_mean"), ("plain_mean", "method"), ("plain_mean", "base_mean")]
    base = rows[0]
    for row in rows[1:]:
        # English is tokenized as before: more rows in the softmax can only take probability away
        assert row["english_bits_per_char"] >= base["english_bits_per_char"] - 1e-6, row
        assert row["english_vs_base"] == pytest.approx(row["english_bits_per_char"] / base["english_bits_per_char"] - 1,
                                                       abs=1e-4)
    # the same input rows with another lm_head choice: the Korean figure moves
    assert rows[1]["korean_bits_per_char"] != rows[2]["korean_bits_per_char"]
    assert result["new_tokens"] > 0 and (tmp_path / "init_ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert len(capsys.readouterr().out.strip().splitlines()) == len(rows)


def test_an_unknown_method_is_refused_naming_the_known_ones(tiny_phase2):
    from kormedgemma.evaluation.ablation import init_ablation

    config, _, _ = tiny_phase2
    with pytest.raises(ValueError, match="unknown method or output rows"):
        init_ablation(config, methods=["fancy"])


def test_trained_ablation_trains_each_combination_under_its_own_root_and_leaves_the_run_alone(tiny_phase2, tmp_path,
                                                                                             capsys):
    from plotdata import line_data

    from kormedgemma.cli import main
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.config import load_config
    from kormedgemma.evaluation.ablation import plot_trained_ablation

    config, _, _ = tiny_phase2
    initialized = artifact_path(config, "initialized_model") / "manifest.json"
    before = initialized.read_bytes()
    assert main(["init-ablation", "--set", f"paths.root={config.paths.root}", "--methods", "eeve", "--outputs", "method",
                 "subword_mean", "--max-texts", "4", "--seq-len", "64", "--stages", "2", "--keep-models",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "init_ablation.json").read_text(encoding="utf-8"))
    trained = result["trained"]
    assert [(r["method"], r["output_rows"], r["stage"]) for r in trained] == [
        ("eeve", "method", 1), ("eeve", "method", 2), ("eeve", "subword_mean", 1), ("eeve", "subword_mean", 2)]
    steps = [r["steps"] for r in trained]
    assert steps[:2] == steps[2:] and min(steps) > 0  # the same stage settings and data for every variant
    step0 = {r["output_rows"]: r for r in result["rows"][1:]}
    for row in trained:
        assert row["korean_bits_per_char"] != step0[row["output_rows"]]["korean_bits_per_char"]  # it trained
    # each variant initialised with its own lm_head rows, from the run's resized model, linked not copied
    for output in ("method", "subword_mean"):
        variant = load_config("tiny", overrides={"paths.root": str(tmp_path / "variants" / f"eeve-{output}")})
        assert artifact_path(variant, "resized_model").is_symlink()
        assert artifact_path(variant, "resized_model").resolve() == artifact_path(config, "resized_model").resolve()
        manifest = json.loads((artifact_path(variant, "initialized_model") / "manifest.json").read_text())
        assert manifest["metrics"]["method"] == "eeve"
        assert manifest["config"]["embeddings"]["output_rows"] == output
    assert initialized.read_bytes() == before  # the run's own 2.02 was neither rewritten nor touched
    # the plot's lines start at the step-0 figure and follow the stages
    curves = line_data(plot_trained_ablation(result).axes[0])
    assert curves["eeve / method"] == [step0["method"]["korean_bits_per_char"],
                                       *(r["korean_bits_per_char"] for r in trained[:2])]
    assert (tmp_path / "init_ablation_trained.png").read_bytes()[:4] == b"\x89PNG"
    assert len(capsys.readouterr().out.strip().splitlines()) == len(result["rows"]) + len(trained)


def test_trained_ablation_drops_each_variants_models_once_measured(tiny_phase2, tmp_path):
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.config import load_config
    from kormedgemma.evaluation.ablation import trained_ablation

    config, _, _ = tiny_phase2
    rows = trained_ablation(config, ["plain_mean"], ["base_mean"], 1, tmp_path, max_texts=2, seq_len=32, progress=False)
    assert len(rows) == 1 and rows[0]["steps"] > 0
    variant = load_config("tiny", overrides={"paths.root": str(tmp_path / "plain_mean-base_mean")})
    assert not artifact_path(variant, "initialized_model").exists() and not artifact_path(variant, "stage1").exists()
    assert artifact_path(config, "resized_model").is_dir()  # only the link went, never what it points at
    # the same command again: the recorded variant is reused, nothing is trained or written again
    assert trained_ablation(config, ["plain_mean"], ["base_mean"], 1, tmp_path, max_texts=2, seq_len=32,
                            progress=False) == rows
    assert not artifact_path(variant, "initialized_model").exists()
    assert json.loads((tmp_path / "trained.json").read_text(encoding="utf-8"))["rows"] == rows
    with pytest.raises(ValueError, match="rows-only stages 1-3"):
        trained_ablation(config, ["eeve"], ["method"], 4, tmp_path)
