"""The GPU benchmark scripts' own logic, on the CPU: which variant shares what, in what order, how a
failed source releases the variants waiting for it, and how the collector reads the runner's lines."""
import importlib.util
import sys
import threading
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def variants():
    return _script("gemma3_270m_variants")


def test_variants_share_phases_0_to_2_only_with_an_earlier_run_of_the_same_upstream_settings(variants):
    runs = [variants.parse_variant(text) for text in (
        "method", "baseline:tokenizer.expand=false,staged.stage6.max_steps=300",
        "method_short:staged.stage1.max_steps=50,staged.stage2.max_steps=50",
        "baseline_150:tokenizer.expand=false,staged.stage6.max_steps=150",
        "method_k25:data.preprocess.korean_train_share=0.25",
        "method_k25_short:data.preprocess.korean_train_share=0.25,staged.stage1.max_steps=50",
        "other_base:base.model=/elsewhere.gguf")]
    variants.plan(runs)
    shares = {v.name: (v.source.name if v.source else None, v.before) for v in runs}
    assert shares == {"method": (None, ""), "baseline": ("method", "0.01"), "method_short": ("method", "3.01"),
                      "baseline_150": ("baseline", "3.01"), "method_k25": ("method", "0.01"),
                      "method_k25_short": ("method_k25", "3.01"), "other_base": (None, "")}
    assert runs[1].settings == {"tokenizer.expand": "false", "staged.stage6.max_steps": "300"}
    # sources run before what waits on them, so a worker never waits behind its own dependant
    order = [v.name for v in sorted(runs, key=variants.depth)]
    for v in runs:
        if v.source is not None:
            assert order.index(v.source.name) < order.index(v.name)
    with pytest.raises(SystemExit, match="NAME"):
        variants.parse_variant("a/b:x=1")
    # a variant stopped before 2.02 makes no initialised model to share: the next links only 0.00
    stops = [variants.parse_variant(t) for t in ("a@1.04", "b", "c@2.02", "d:staged.stage1.max_steps=5")]
    variants.plan(stops, "3.07")
    assert [(v.name, v.source.name if v.source else None, v.before) for v in stops] == [
        ("a", None, ""), ("b", "a", "0.01"), ("c", "b", "3.01"), ("d", "b", "3.01")]
    variants.plan(shallow := [variants.parse_variant("x"), variants.parse_variant("y")], "1.04")
    assert shallow[1].before == "0.01"
    early = variants.parse_variant("method@2.02:embeddings.method=eeve")
    assert (early.name, early.to, early.settings) == ("method", "2.02", {"embeddings.method": "eeve"})
    assert variants.parse_variant("method").to == ""
    with pytest.raises(SystemExit, match="9.99"):
        variants.parse_variant("method@9.99")


def test_branches_run_side_by_side_only_where_neither_reads_the_others_outputs(variants):
    assert variants.parse_branches("4.01", ["5.01:5.02", "6.01:6.02"]) == [("5.01", "5.02"), ("6.01", "6.02")]
    assert variants.parse_branches("5.02", ["6.01:6.02"]) == [("6.01", "6.02")]
    with pytest.raises(SystemExit, match="6.02 reads awq_model, made by 6.01, which another branch"):
        variants.parse_branches("4.01", ["5.01:5.02", "6.01:6.01", "6.02:6.02"])
    with pytest.raises(SystemExit, match="5.01 reads instruct_model, made by 4.01, which no branch"):
        variants.parse_branches("3.07", ["5.01:5.02", "6.01:6.02"])
    with pytest.raises(SystemExit, match="starts at or before --to"):
        variants.parse_branches("5.01", ["5.01:5.02"])
    with pytest.raises(SystemExit, match="overlaps"):
        variants.parse_branches("4.01", ["5.01:6.01", "6.01:6.02"])
    with pytest.raises(SystemExit, match="FROM:TO"):
        variants.parse_branches("4.01", ["5.01"])
    with pytest.raises(SystemExit, match="--to '4.1'"):
        variants.parse_branches("4.1", ["5.01:5.02"])


def test_a_variant_runs_its_branches_at_once_after_reaching_to(variants, tmp_path, monkeypatch):
    import argparse
    import time

    started, ended = {}, {}

    class Sleeper:  # a `kormedgemma run` that takes 1 s, recording when it ran
        def __init__(self, command, **kwargs):
            self.selection = tuple(command[command.index("--from") + 1:command.index("--from") + 4:2])
            started[self.selection] = time.time()

        def wait(self):
            time.sleep(1)
            ended[self.selection] = time.time()
            return 0 if self.selection[0] == "5.01" else 2

    monkeypatch.setattr(variants.subprocess, "Popen", Sleeper)
    stops = []
    monkeypatch.setattr(variants.subprocess, "run", lambda command, **kwargs: (
        stops.append(command[command.index("--to") + 1]), argparse.Namespace(returncode=0))[1])
    args = argparse.Namespace(root=tmp_path, profile="tiny", config_file=None, overrides=[], to="4.01",
                              branches=[("5.01", "5.02"), ("6.01", "6.02")])
    early = variants.run_variant(args, variants.parse_variant("early@2.02"))
    assert early["rc"] == 0 and stops == ["2.02"] and not started  # a variant stopped before --to runs no branch
    result = variants.run_variant(args, variants.parse_variant("method"))
    assert stops == ["2.02", "4.01"] and set(started) == {("5.01", "5.02"), ("6.01", "6.02")}
    assert max(started.values()) < min(ended.values())  # both were running at once
    assert result["rc"] == 2  # the failed branch's status is the variant's
    assert (tmp_path / "method.5.01.log").is_file() and (tmp_path / "method.6.01.log").is_file()


def test_a_failed_source_releases_the_variant_waiting_for_it(variants, tmp_path):
    import argparse

    args = argparse.Namespace(root=tmp_path, profile="tiny", config_file=None, overrides=[], to="3.07")
    source, waiting = variants.parse_variant("method"), variants.parse_variant("short:staged.stage1.max_steps=2")
    variants.plan([source, waiting])
    source.done.set()  # ended without sealing the initialised model
    finished = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: (result.update(variants.run_variant(args, waiting)), finished.set()))
    thread.start()
    assert finished.wait(30)
    assert result["rc"] == 3 and result["shares"] == {"from": "method", "before": "3.01"}
    assert "failed before making what short shares" in (tmp_path / "short.log").read_text(encoding="utf-8")


def test_the_collector_reads_each_notebooks_time_memory_and_gpu_from_the_runner_log(tmp_path):
    collect = _script("gemma3_270m_collect")
    log = tmp_path / "method.log"
    log.write_text(
        "run 20261203-132910: 23 notebook(s), profile gemma3_270m\n"
        "[1/23] 0.00 environment check; builds the base model where the profile does: done in 97.3s (peak RSS 4.0 GB "
        "(3.5 allocated), GPU 0.6 GB allocated / 0.6 reserved, wrote 0.6 GB)\n"
        "[2/23] 0.01 data sources and licences: done in 3.2s (peak RSS 0.1 GB (0.1 allocated), wrote 0.0 GB)\n"
        "[3/23] 0.02 collect Korean, English and KorMedMCQA: running phase0_data_preparation/02_collect_korean_medical.ipynb\n",
        encoding="utf-8")
    assert collect.notebook_seconds(log) == {"0.00": {"seconds": 97.3, "peak_rss_gb": 4.0, "gpu_allocated_gb": 0.6},
                                             "0.01": {"seconds": 3.2, "peak_rss_gb": 0.1}}


def test_the_collector_reads_a_variants_branch_logs_beside_its_own(tmp_path):
    collect = _script("gemma3_270m_collect")
    line = "[{i}/2] {step} title: done in {s}s (peak RSS 1.0 GB (0.9 allocated), wrote 0.0 GB)\n"
    (tmp_path / "method.log").write_text(line.format(i=1, step="4.01", s=193.1), encoding="utf-8")
    (tmp_path / "method.5.01.log").write_text(line.format(i=1, step="5.01", s=332.2), encoding="utf-8")
    (tmp_path / "method.6.01.log").write_text(line.format(i=2, step="6.02", s=40.0), encoding="utf-8")
    (tmp_path / "method_k25.5.01.log").write_text(line.format(i=1, step="5.01", s=1.0), encoding="utf-8")
    rows = collect.run_notebooks(tmp_path, "method")
    assert {k: v["seconds"] for k, v in rows.items()} == {"4.01": 193.1, "5.01": 332.2, "6.02": 40.0}


def test_the_collector_reads_the_4bit_comparison_and_the_serving_check(tmp_path):
    import json

    collect = _script("gemma3_270m_collect")
    final = tmp_path / "baseline/models/final"
    (final / "korean_medgemma_awq").mkdir(parents=True)
    (final / "serve_check").mkdir(parents=True)
    side = lambda size, bpc, acc, missing: {"bytes": size, "perplexity": {"bits_per_char": bpc},  # noqa: E731
                                            "kormedmcqa": {"overall": {"accuracy": acc, "unanswered": missing}}}
    (final / "korean_medgemma_awq/quantization.json").write_text(json.dumps({
        "quantization": {"seconds": 100.23, "scheme": "W4A16"}, "logits_relative_error": 0.2617,
        "compare": {"source": side(536223056, 2.5082, 0.2084, 2), "quantized": side(387000000, 3.0191, 0.21, 27)}}))
    (final / "serve_check/check.json").write_text(json.dumps({
        "backend": "transformers", "startup_s": 23.6, "question": "q", "answer": "정답: A", "latency_s": 2.4, "url": "x"}))
    assert collect.phase6(tmp_path, "baseline") == {
        "awq": {"seconds": 100.23, "scheme": "W4A16", "logits_relative_error": 0.2617,
                "source": {"bytes": 536223056, "korean_bits_per_char": 2.5082, "kormedmcqa": 0.2084, "unanswered": 2},
                "quantized": {"bytes": 387000000, "korean_bits_per_char": 3.0191, "kormedmcqa": 0.21, "unanswered": 27}},
        "serve": {"backend": "transformers", "startup_s": 23.6, "question": "q", "answer": "정답: A", "latency_s": 2.4}}
    assert collect.phase6(tmp_path, "method") == {}  # 6.01 never ran there


def test_the_collector_keeps_a_run_stopped_before_the_stages_and_survives_an_empty_card_name(tmp_path, monkeypatch):
    import json

    collect = _script("gemma3_270m_collect")
    run = tmp_path / "run"
    (run / "method/runs/20261208-010203").mkdir(parents=True)  # method@2.02: notebooks ran, no stage did
    (run / "method.log").write_text("[1/1] 0.00 env: done in 97.3s (peak RSS 4.0 GB (3.5 allocated), wrote 0.6 GB)\n",
                                    encoding="utf-8")
    (run / "gpu.log").write_text("", encoding="utf-8")  # nvidia-smi failed on the machine
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["collect", "--run", str(run), "--out", str(out)])
    collect.main()
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["what"].startswith("the real Gemma 3 270M on one H200")
    assert result["runs"] == {"method": {"valid_tokens_per_char": {}, "notebooks": {"0.00": {"seconds": 97.3, "peak_rss_gb": 4.0}},
                                         "stages": [], "phase5": {}, "phase6": {}, "curves": []}}
    assert not out.with_suffix(".png").exists()  # no stage ran: no empty plot
