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
    from kormedgemma.ablation import init_ablation

    config, _, _ = tiny_phase2
    with pytest.raises(ValueError, match="unknown method or output rows"):
        init_ablation(config, methods=["fancy"])
