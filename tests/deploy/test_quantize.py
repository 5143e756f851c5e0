"""Phase 6.01: AWQ W4A16 on the tiny instruct model, what stays full precision, and the memory plan."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from config.training_config import DeployConfig
from kormedgemma.deploy.quantize import QuantizationError, calibration_blocks, memory_plan, memory_plan_table, quantization_scheme, quantize


def test_calibration_blocks_are_full_length_slices_of_the_token_stream():
    stream = np.arange(100, 140, dtype=np.uint32)  # 40 ids → 10 blocks of 4
    blocks = calibration_blocks(stream, samples=3, seq_len=4, seed=0)
    assert len(blocks) == 3 and all(len(b) == 4 for b in blocks)
    for block in blocks:  # each one is an aligned block of the stream, read as it is
        assert (block[0] - 100) % 4 == 0 and block == list(range(block[0], block[0] + 4))
    assert len({b[0] for b in blocks}) == 3  # distinct blocks
    assert calibration_blocks(stream, samples=3, seq_len=4, seed=0) == blocks  # the seed fixes the sample
    assert calibration_blocks(stream, samples=3, seq_len=4, seed=1) != blocks


def test_calibration_returns_fewer_blocks_when_the_corpus_is_small_and_refuses_an_empty_one():
    assert len(calibration_blocks(np.arange(12, dtype=np.uint32), samples=50, seq_len=4)) == 3  # 12 ids → 3 blocks
    assert calibration_blocks(np.array([2, 10, 11, 1], dtype=np.uint32), samples=5, seq_len=64) == [[2, 10, 11, 1]]
    with pytest.raises(ValueError, match="calibration corpus is empty"):
        calibration_blocks(np.zeros(0, dtype=np.uint32), samples=5, seq_len=4)


def test_scheme_takes_the_configured_group_size_and_rejects_unknown_presets():
    scheme = quantization_scheme(DeployConfig(scheme="W4A16", group_size=32))
    assert (scheme.weights.num_bits, scheme.weights.group_size, scheme.weights.strategy) == (4, 32, "group")
    assert scheme.input_activations is None  # A16: activations stay 16-bit
    with pytest.raises(QuantizationError, match="not a compressed-tensors preset"):
        quantization_scheme(DeployConfig(scheme="W3A5"))


def test_unknown_or_missing_backend_fails_with_the_fix(tmp_path):
    with pytest.raises(QuantizationError, match="unknown"):
        quantize(tmp_path, tmp_path / "out", [[2, 3]], replace(DeployConfig(), backend="gptq"))
    try:
        import awq  # noqa: F401
        pytest.skip("AutoAWQ is installed here")
    except ImportError:
        pass
    with pytest.raises(QuantizationError, match="pip install autoawq"):
        quantize(tmp_path, tmp_path / "out", [[2, 3]], replace(DeployConfig(), backend="autoawq"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def test_awq_packs_every_decoder_linear_and_leaves_embeddings_head_and_vision_untouched(tiny_phase6, tiny_phase4):
    config, out, summary = tiny_phase6
    _, instruct, _ = tiny_phase4
    source, packed = _tensors(instruct), _tensors(out)
    layers = config.base.tiny.num_hidden_layers
    names = [k[: -len(".weight_packed")] for k in packed if k.endswith(".weight_packed")]
    assert len(names) == 7 * layers == summary["quantization"]["quantized_linear_layers"]
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("vision_tower" in n for n in names)
    for name in names:  # eight 4-bit values per int32, one scale per group of `group_size`
        rows, cols = packed[f"{name}.weight_shape"].tolist()
        assert packed[f"{name}.weight_packed"].dtype == torch.int32
        assert tuple(packed[f"{name}.weight_packed"].shape) == (rows, cols // 8)
        assert tuple(packed[f"{name}.weight_scale"].shape) == (rows, cols // config.deploy.group_size)
    kept = [k for k in source if "vision_tower" in k or "embed_tokens" in k or k == "lm_head.weight"]
    assert any("embed_tokens" in k for k in kept) and "lm_head.weight" in kept
    for key in kept:  # the expanded embedding, lm_head and the vision tower are bit-identical
        assert torch.equal(source[key], packed[key]), key


def test_quantized_model_loads_and_stays_close_to_the_source(tiny_phase6, tiny_phase4):
    from kormedgemma.evaluation.korean import load_for_eval

    _, out, summary = tiny_phase6
    _, instruct, _ = tiny_phase4
    quantized, tokenizer = load_for_eval(out, device="cpu")
    source, _ = load_for_eval(instruct, device="cpu")
    ids = torch.tensor([tokenizer.encode("고혈압 환자의 혈압을 측정하였다.")])
    with torch.no_grad():
        a, b = source(input_ids=ids).logits, quantized(input_ids=ids).logits
    error = float((b - a).norm() / a.norm())
    assert 0.0 < error < 0.5  # 4 bits moved the logits, but not far
    assert 0.0 < summary["logits_relative_error"] < 0.5
    q = source.model.language_model.layers[0].self_attn.q_proj.weight  # q_proj is in no AWQ mapping:
    q4 = quantized.model.language_model.layers[0].self_attn.q_proj.weight  # only rounding changed it
    assert 0.0 < float((q4 - q).detach().norm() / q.detach().norm()) < 0.3
    assert summary["compare"]["quantized"]["bytes"] < summary["compare"]["source"]["bytes"] / 2


def test_report_accuracy_is_recomputed_from_its_predictions(tiny_phase6):
    from kormedgemma.core.io import read_jsonl

    config, out, summary = tiny_phase6
    for label in ("source", "quantized"):
        run = out / "eval" / f"{label}_{config.evaluation.mode}_{config.deploy.eval_shots}shot"
        rows = list(read_jsonl(run / "predictions.jsonl"))
        overall = summary["compare"][label]["kormedmcqa"]["overall"]
        assert rows and len(rows) == overall["n"]
        correct = sum(r["prediction"] == r["gold"] for r in rows)
        assert overall["correct"] == correct
        assert overall["accuracy"] == pytest.approx(correct / len(rows))
        assert overall["unanswered"] == sum(r["prediction"] == "" for r in rows)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["metrics"]["quantized_gb"] < manifest["metrics"]["source_gb"]
    assert "Memory plan" in (out / "report.md").read_text(encoding="utf-8")
    # left: the two sizes on disk; right: weights, overhead and KV cache stacked, against the budget
    from plotdata import bar_heights, png_size

    from kormedgemma.deploy.quantize import plot_deployment

    left, right = plot_deployment(summary).axes
    assert bar_heights(left) == [round(summary["compare"][k]["bytes"] / 1e9, 6) for k in ("source", "quantized")]
    plan = summary["memory_plan"]
    assert bar_heights(right) == [round(plan[k], 6) for k in ("weights_gb", "overhead_gb", "kv_needed_gb")]
    assert [float(y) for y in right.get_lines()[0].get_ydata()] == [plan["budget_gb"]] * 2
    assert min(png_size(out / "deployment.png")) >= 200
    from kormedgemma.pipeline.report import headline

    line = headline("awq_model", manifest["metrics"])
    assert f"{manifest['metrics']['source_gb']} → {manifest['metrics']['quantized_gb']} GB" in line
    # a random-weight model answers nothing: both runs are flagged, in the manifest and the headline
    assert len(manifest["metrics"]["warnings"]) == 2 and "⚠ 2 run(s) at or below chance" in line


def test_failed_quantisation_leaves_the_previous_checkpoint_intact(tiny_phase6):
    from kormedgemma.deploy.quantize import quantize_step

    config, out, _ = tiny_phase6
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    broken = replace(config, deploy=replace(config.deploy, scheme="W3A5"))
    with pytest.raises(QuantizationError):
        quantize_step(broken, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not list(out.parent.glob(".tmp-korean_medgemma_awq-*"))


def _write_config(folder: Path, text: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"text_config": text}), encoding="utf-8")
    return folder


def test_memory_plan_counts_sliding_window_layers_exactly(tmp_path):
    # MedGemma-4B: 34 layers (5 global, 29 sliding at 1024), 4 KV heads of 256, bf16 KV.
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)]
    folder = _write_config(tmp_path / "m", {"num_hidden_layers": 34, "num_key_value_heads": 4, "head_dim": 256,
                                            "num_attention_heads": 8, "hidden_size": 2560, "sliding_window": 1024,
                                            "layer_types": types})
    with open(folder / "model.safetensors", "wb") as handle:  # 5.0 GB of "weights", sparse on disk
        handle.truncate(5 * 10**9)
    plan = memory_plan(folder, DeployConfig(max_model_len=8192, max_num_seqs=16, gpu_memory_utilization=0.9),
                       gpu_gb=24.0, overhead_gb=2.0)
    per_token = 2 * 4 * 256 * 2
    per_seq = 29 * 1024 * per_token + 5 * 8192 * per_token
    assert plan["kv_per_sequence_gb"] == round(per_seq / 1e9, 3) == 0.289
    assert plan["kv_per_sequence_all_full_gb"] == round(34 * 8192 * per_token / 1e9, 3)
    assert plan["kv_pool_gb"] == round(21.6 - 5.0 - 2.0, 2)
    assert plan["sequences_that_fit"] == round(14.6e9 / per_seq, 1)
    assert plan["fits_full_concurrency"] and plan["starts"]
    tight = memory_plan(folder, DeployConfig(max_model_len=131072, max_num_seqs=16), gpu_gb=24.0)
    assert not tight["fits_full_concurrency"]
    table = memory_plan_table(folder, DeployConfig(max_model_len=8192, max_num_seqs=16, serve_overhead_gb=2.0))
    assert [r["max_model_len"] for r in table] == [2048, 4096, 8192, 16384]
    assert table[2]["full-length sequences that fit"] == plan["sequences_that_fit"]
    # sliding layers cap at 1,024 tokens, so KV per sequence grows slower than the length
    assert table[3]["KV GB / sequence"] < 2 * table[2]["KV GB / sequence"]


def test_calibration_leaves_no_model_behind_in_this_process(tiny_phase4, tmp_path):
    # 6.01 evaluates the source and the 4-bit model after calibrating; at MedGemma-4B shape the
    # kernel still held the calibrated CPU model through both (llm-compressor's session kept it),
    # so calibration runs in a child process
    import gc

    from transformers import PreTrainedModel

    def models() -> int:
        gc.collect()
        return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())

    _, instruct, _ = tiny_phase4
    before = models()
    info = quantize(Path(instruct), tmp_path / "awq", [[5, 6, 7, 8] * 4] * 2, replace(DeployConfig(), calibration_seq_len=16))
    assert info["calibration_blocks"] == 2 and (tmp_path / "awq" / "config.json").is_file()
    assert models() == before
