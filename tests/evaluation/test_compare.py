"""`compare --recorded`: the method against the baseline from what each run's stages recorded on
their evaluation blocks, without loading a model (a GPU session that ends before the comparison
still leaves one). Two small runs are written here artifact by artifact, with known figures."""
import json

import pytest


def _seal(config, key, files, metrics=None, keys=()):
    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.manifest import write_artifact

    with write_artifact(artifact_path(config, key), "test", config, list(keys), {}) as out:
        for name, content in files.items():
            (out.path / name).write_text(json.dumps(content), encoding="utf-8")
        out.metrics.update(metrics or {})


def _run(root, expand, stages, eval_chars=60_000, new_pieces=None):
    """One run's merged tokenizer and seven stage artifacts; `stages` maps a stage number to its
    evaluations [(step, Korean bits/char, English bits/char)], stages not named skipped."""
    from kormedgemma.core.config import load_config

    overrides = {"paths.root": str(root), "tokenizer.expand": expand,
                 **{f"staged.stage{k}.eval_chars": eval_chars for k in range(1, 8)}}
    config = load_config("tiny", overrides=overrides)
    pieces = (6347 if expand else 0) if new_pieces is None else new_pieces
    _seal(config, "merged_tokenizer", {"tokenizer_config.json": {}},
          {"new_pieces": pieces, "korean_tokens_per_char_after": 0.43 if expand else 0.575})
    for number in range(1, 8):
        evals = stages.get(number)
        metrics = ({"stage": number, "steps": 0, "skipped": "not trained"} if evals is None else
                   {"stage": number, "steps": 100, "tokens": 1_638_400, "train_seconds": 10.0, "history": [],
                    "evals": [{"step": s, "korean_valid_bits_per_char": ko, "english_valid_bits_per_char": en}
                              for s, ko, en in evals]})
        _seal(config, f"stage{number}", {"metrics.json": metrics}, keys=[f"staged.stage{number}"])
    return config


@pytest.fixture
def runs(tmp_path):
    method = _run(tmp_path / "method", True, {
        1: [(0, 4.40, 1.024), (100, 3.40, 1.024)], 2: [(0, 3.40, 1.024), (100, 2.97, 1.024)],
        3: [(0, 2.97, 1.024), (100, 2.81, 1.024)], 4: [(0, 2.81, 1.024), (100, 2.73, 1.002)],
        5: [(0, 2.73, 1.002), (100, 2.70, 1.001)], 6: [(0, 2.70, 1.001), (50, 2.38, 0.85), (100, 2.39, 0.85)],
        7: [(0, 2.39, 0.85), (100, 2.392, 0.855)]})
    baseline = _run(tmp_path / "baseline", False, {
        6: [(0, 3.189, 1.024), (100, 2.30, 0.82), (200, 2.26, 0.867)], 7: [(0, 2.26, 0.867), (100, 2.262, 0.875)]})
    return method, baseline


def test_recorded_trajectories_read_each_stages_last_evaluation_and_the_base_from_the_plain_run(runs):
    from kormedgemma.evaluation.compare import compare, report_lines

    method, baseline = runs
    result = compare(method, baseline, recorded=True)
    ko = {label: [r["korean_bits_per_char"] for r in result[label]["trajectory"]] for label in ("method", "baseline")}
    assert [r["model"] for r in result["method"]["trajectory"]] == [
        "base", "initialised", *(f"stage {k}" for k in range(1, 8)), "instruct"]
    # the method's base is the plain run's step 0 (the same model on the same characters)
    assert ko["method"] == [3.189, 4.40, 3.40, 2.97, 2.81, 2.73, 2.70, 2.39, 2.392, None]
    assert ko["baseline"] == [3.189, 3.189, 3.189, 3.189, 3.189, 3.189, 3.189, 2.26, 2.262, None]
    assert [r.get("skipped", False) for r in result["baseline"]["trajectory"]][2:9] == [True] * 5 + [False] * 2
    assert result["korean_stage7_gap"] == pytest.approx(2.392 - 2.262)
    assert result["english_stage7_gap"] == pytest.approx(0.855 - 0.875)
    assert result["measured"].startswith("recorded")
    lines = report_lines(result)
    assert "| stage 7 | 2.3920 | 2.2620 | 0.8550 | 0.8750 |" in lines
    assert "| instruct | — | — | — | — |" in lines  # not evaluated on the stages' blocks: no figure, not a zero
    assert "| new tokens | 6347 | 0 |" in lines


def test_recorded_comparison_refuses_runs_whose_stage_evaluations_covered_different_text(runs, tmp_path):
    from kormedgemma.evaluation.compare import compare

    method, _ = runs
    other = _run(tmp_path / "other", False, {6: [(0, 3.0, 1.0), (100, 2.3, 0.8)], 7: [(0, 2.3, 0.8), (100, 2.3, 0.8)]},
                 eval_chars=30_000)
    with pytest.raises(ValueError, match="covered different text"):
        compare(method, other, recorded=True)
    unset = _run(tmp_path / "unset", False, {6: [(0, 3.0, 1.0)], 7: [(0, 3.0, 1.0)]}, eval_chars=None)
    unset_method = _run(tmp_path / "unset_method", True, {k: [(0, 3.0, 1.0)] for k in range(1, 8)}, eval_chars=None)
    with pytest.raises(ValueError, match="eval_chars"):  # first blocks of each tokenizer: not the same characters
        compare(unset_method, unset, recorded=True)


def test_the_cli_compares_returned_runs_without_their_weights(runs, tmp_path, capsys):
    from kormedgemma.cli import main

    method, baseline = runs
    out = tmp_path / "comparison"
    # the evaluation blocks' settings come from the stages' manifests, not from today's profile
    assert main(["compare", "--recorded", "--method-root", str(method.paths.root), "--baseline-root",
                 str(baseline.paths.root), "--out", str(out)]) == 0
    assert "| stage 6 | 2.3900 | 2.2600 |" in capsys.readouterr().out
    written = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert written["method"]["trajectory"][-1] == {"model": "instruct", "korean_bits_per_char": None,
                                                   "english_bits_per_char": None, "unmeasured": True}
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
