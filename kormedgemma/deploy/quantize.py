"""Phase 6.01: W4A16 AWQ quantisation of the merged instruct model, and what it costs.

The default backend is llm-compressor (`AWQModifier` + `QuantizationModifier`), because it writes
the compressed-tensors format that vLLM loads natively and it is maintained by the vLLM project.
AutoAWQ is optional (`deploy.backend: autoawq`): it is archived upstream and pins an old torch, so
it is imported only when chosen.

Calibration uses the project's own Korean medical corpus (`data/processed/korean/train.jsonl`),
packed into full-length blocks: AWQ picks its per-channel scales from the activations it sees, and
activations on Korean text are what the served model will meet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from config.training_config import DeployConfig
from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.environment import free_memory, in_child_process
from kormedgemma.core.errors import UserError
from kormedgemma.core.io import write_json, write_text
from kormedgemma.core.manifest import write_artifact
from kormedgemma.core.plots import new_figure, saved
from kormedgemma.core.resources import reset_peak_gpu_memory
from kormedgemma.data.kormedmcqa import read_mcqa_folder
from kormedgemma.data.token_store import TokenStore
from kormedgemma.evaluation.korean import chance_warning, check_shots, evaluate_with, write_results
from kormedgemma.evaluation.perplexity import document_windows, perplexity, read_heldout
from kormedgemma.modeling.base_model import SHARD_SIZE, load_for_eval

# DeployConfig fields that only the running server reads (6.02 and `serve`), not 6.01's checkpoint or report.
SERVER_ONLY_KEYS = {"serve_backend", "host", "port", "api_key_env", "served_model_name", "startup_timeout_s",
                    "check_question", "check_max_tokens"}


# Gemma 3 decoder layers, as llm-compressor's own Gemma 3 mappings have them (v_proj→o_proj,
# pre-feedforward norm→gate/up, up→down; the q/k-norm layers are left alone because smoothing
# into them degrades accuracy). Scoped to the language model: the SigLIP vision tower also has
# `v_proj` layers, and unscoped patterns match both towers and stop AWQ.
_GEMMA3_MAPPINGS = (
    ("v_proj$", ("o_proj$",)),
    ("pre_feedforward_layernorm$", ("gate_proj$", "up_proj$")),
    ("up_proj$", ("down_proj$",)),
)


class QuantizationError(UserError, RuntimeError):
    """A quantisation run that cannot start or cannot finish, with the fix in the message."""


# --------------------------------------------------------------------------- calibration

def calibration_blocks(stream: np.ndarray, samples: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """`samples` blocks of exactly `seq_len` token ids, drawn at random from a packed token stream.

    The stream is the token store's (`<bos> doc <eos> <bos> doc …`), so every calibration sample is
    full length and a corpus of short Korean paragraphs still shows AWQ activations at every
    position; only the chosen blocks are read from the memory map. Fewer blocks than asked come
    back when the corpus is too small; the caller records it.
    """
    if len(stream) < 2:
        raise ValueError("the calibration corpus is empty: run phase 0 (04_preprocess_data) and the token store "
                         "(phase1_tokenizer/04_tokenize_corpus) first")
    available = len(stream) // seq_len
    if available == 0:
        return [[int(t) for t in stream]]  # a corpus shorter than one block still calibrates
    chosen = random.Random(seed).sample(range(available), min(samples, available))
    return [np.asarray(stream[i * seq_len:(i + 1) * seq_len], dtype=np.int64).tolist() for i in chosen]


# --------------------------------------------------------------------------- llm-compressor

def quantization_scheme(deploy: DeployConfig) -> Any:
    """The preset named by `deploy.scheme` (W4A16, W4A16_ASYM, …) with `deploy.group_size`."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    name = deploy.scheme.upper()
    if name not in PRESET_SCHEMES:
        raise QuantizationError(f"deploy.scheme {deploy.scheme!r} is not a compressed-tensors preset; "
                                f"use one of {', '.join(sorted(k for k in PRESET_SCHEMES if k.startswith('W')))}")
    preset = dict(PRESET_SCHEMES[name])
    weights = preset.get("weights")
    if weights is not None and weights.strategy == "group":
        preset["weights"] = weights.model_copy(update={"group_size": deploy.group_size})
    return QuantizationScheme(targets=["Linear"], **preset)


def awq_mappings(model: Any) -> list[Any]:
    """AWQ smoothing pairs for the model's decoder layers, never the vision tower's."""
    from llmcompressor.modifiers.transform.awq import AWQMapping

    names = [name for name, _ in model.named_modules()]
    prefix = "re:.*language_model.*" if any(".language_model." in f".{n}." for n in names) else "re:.*"
    return [AWQMapping(prefix + smooth, [prefix + b for b in balance]) for smooth, balance in _GEMMA3_MAPPINGS]


def awq_recipe(deploy: DeployConfig, model: Any) -> list[Any]:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(mappings=awq_mappings(model), duo_scaling="both"),
            QuantizationModifier(config_groups={"group_0": quantization_scheme(deploy)}, ignore=list(deploy.ignore))]


def _library_patches() -> contextlib.ExitStack:
    """Two llm-compressor 0.14 behaviours changed for the duration of one `oneshot` call:

    - It pins its cached calibration activations in page-locked memory before each AWQ grid search,
      unconditionally; without an accelerator torch refuses (`Cannot access accelerator device`).
      Pinning only speeds host→GPU copies, so on a CPU-only machine (the tiny profile, CI) it is
      skipped. With a GPU nothing changes.
    - AWQ opens a progress bar per mapping per layer for its 20-point scale search; in a notebook
      each redraw is a new output (thousands for 34 layers). Those are silenced; the per-layer
      calibration bars stay.
    """
    from unittest import mock

    from llmcompressor.modifiers.transform.awq import base
    from llmcompressor.pipelines.cache import IntermediatesCache
    from tqdm import tqdm

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(base, "tqdm", functools.partial(tqdm, disable=True)))
    if not torch.accelerator.is_available():
        stack.enter_context(mock.patch.object(IntermediatesCache, "_pin_intermediate",
                                              classmethod(lambda cls, intermediate: None)))
    return stack


def quantize_llmcompressor(model_dir: Path, out_dir: Path, blocks: Sequence[Sequence[int]],
                           deploy: DeployConfig) -> dict[str, Any]:
    """AWQ-calibrate and compress `model_dir` into `out_dir` (a folder vLLM and transformers load)."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
    except ImportError as err:
        raise QuantizationError(f"llm-compressor is not installed ({err}); `pip install -r requirements.txt` "
                                "installs it (llmcompressor==0.14.0.1)") from err

    from llmcompressor import LoggerConfig, configure_logger

    # One line per module at INFO buries the notebook; without a GPU every layer also warns "No
    # accelerator available", so there only errors show. LLM_COMPRESSOR_LOG_LEVEL still overrides.
    configure_logger(LoggerConfig(console_log_level="WARNING" if torch.accelerator.is_available() else "ERROR"))

    # On the CPU (in bf16 where a GPU exists): llm-compressor moves one decoder layer at a time to
    # the GPU, so the whole model never has to fit there beside the calibration activations.
    model, tokenizer = load_for_eval(model_dir, device="cpu",
                                     dtype="bfloat16" if torch.cuda.is_available() else "float32")
    dataset = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]})
    if torch.cuda.is_available():
        reset_peak_gpu_memory()
    started = time.perf_counter()
    with _library_patches():
        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=awq_recipe(deploy, model),
                num_calibration_samples=len(blocks), max_seq_length=deploy.calibration_seq_len,
                shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    model.save_pretrained(out_dir, save_compressed=True, max_shard_size=SHARD_SIZE)  # one shard in RAM at a time
    tokenizer.save_pretrained(out_dir)
    _copy_side_files(Path(model_dir), Path(out_dir))
    _restore_ignore_patterns(Path(out_dir), deploy.ignore)
    return {"backend": "llmcompressor", "scheme": deploy.scheme, "group_size": deploy.group_size,
            "calibration_blocks": len(blocks), "calibration_seq_len": deploy.calibration_seq_len,
            "seconds": round(seconds, 2), "peak_gpu_gb": _peak_gpu_gb()}


def _restore_ignore_patterns(out_dir: Path, patterns: Sequence[str]) -> None:
    """llm-compressor writes `ignore` as the module names it skipped, in checkpoint spelling
    (`vision_tower.…`), while transformers names the same modules `model.vision_tower.…` when it
    loads; unmatched, it would swap the vision tower's layers for 4-bit ones that have no weights.
    The configured patterns (`re:.*vision_tower.*`) match both spellings, and vLLM reads them too."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    ignore = config["quantization_config"].setdefault("ignore", [])
    ignore.extend(p for p in patterns if p not in ignore)

    write_json(path, config)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Chat template, generation and processor settings the serving engines read."""
    for name in ("chat_template.jinja", "chat_template.json", "generation_config.json",
                 "preprocessor_config.json", "processor_config.json", "special_tokens_map.json"):
        if (src / name).is_file() and not (dst / name).is_file():
            shutil.copy2(src / name, dst / name)


# --------------------------------------------------------------------------- AutoAWQ (optional)

def quantize_autoawq(model_dir: Path, out_dir: Path, blocks: Sequence[Sequence[int]],
                     deploy: DeployConfig) -> dict[str, Any]:
    """AutoAWQ's GEMM kernels format (vLLM `--quantization awq`). Text-only: AutoAWQ does not
    quantise Gemma 3's vision tower and drops it."""
    try:
        from awq import AutoAWQForCausalLM
    except ImportError as err:
        raise QuantizationError(
            "deploy.backend is 'autoawq' but AutoAWQ is not installed. It is optional (archived upstream, "
            "needs an older torch): `pip install autoawq` in a separate environment, or set "
            "deploy.backend: llmcompressor (the default).") from err
    if deploy.scheme.upper() not in ("W4A16", "W4A16_ASYM"):
        raise QuantizationError(f"AutoAWQ writes 4-bit weights only; deploy.scheme {deploy.scheme!r} needs llmcompressor")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    model = AutoAWQForCausalLM.from_pretrained(str(model_dir))
    model.quantize(tokenizer, quant_config={"w_bit": 4, "q_group_size": deploy.group_size, "zero_point": True,
                                            "version": "GEMM"},
                   calib_data=[tokenizer.decode(b) for b in blocks], max_calib_seq_len=deploy.calibration_seq_len,
                   n_parallel_calib_samples=1)
    model.save_quantized(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    _copy_side_files(Path(model_dir), Path(out_dir))
    return {"backend": "autoawq", "scheme": "W4A16_ASYM", "group_size": deploy.group_size,
            "calibration_blocks": len(blocks), "calibration_seq_len": deploy.calibration_seq_len,
            "seconds": round(time.perf_counter() - started, 2), "peak_gpu_gb": _peak_gpu_gb()}


def quantize(model_dir: Path, out_dir: Path, blocks: Sequence[Sequence[int]], deploy: DeployConfig) -> dict[str, Any]:
    """Run the configured backend on calibration `blocks` (token ids) into `out_dir` (empty or new)."""
    backend = {"llmcompressor": quantize_llmcompressor, "autoawq": quantize_autoawq}.get(deploy.backend)
    if backend is None:
        raise QuantizationError(f"deploy.backend {deploy.backend!r} is unknown; use llmcompressor or autoawq")
    try:
        # in a child process: what the backend keeps after calibrating goes back to the system
        # before 6.01 loads the source and the 4-bit model to evaluate them
        return in_child_process(backend, Path(model_dir), Path(out_dir), [list(b) for b in blocks], deploy)
    except torch.OutOfMemoryError as err:
        raise QuantizationError(
            "out of GPU memory while quantising: lower deploy.calibration_samples or "
            f"deploy.calibration_seq_len (now {deploy.calibration_samples} × {deploy.calibration_seq_len})") from err


def _peak_gpu_gb() -> Optional[float]:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None


# --------------------------------------------------------------------------- what it costs

def folder_bytes(path: Path) -> int:
    """Bytes of the weight files (`*.safetensors`, `*.bin`) in a model folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


def quantized_linear_count(model_dir: Path) -> int:
    """Layers stored packed (a `weight_packed` tensor each) in a compressed-tensors checkpoint."""
    from safetensors import safe_open

    count = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            count += sum(1 for key in handle.keys() if key.endswith(".weight_packed"))
    return count


@torch.no_grad()
def last_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of one batch, on the CPU in float32 (kept while the other model is loaded)."""
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """‖z_q − z‖ / ‖z‖: how far 4-bit weights moved the logits (0 = identical)."""
    return float((candidate.float() - reference.float()).norm() / reference.float().norm())


def memory_plan(model_dir: Path, deploy: DeployConfig, gpu_gb: float = 24.0,
                overhead_gb: float = 2.0, kv_bytes: int = 2) -> dict[str, Any]:
    """Will the 4-bit model serve `max_num_seqs` sequences of `max_model_len` tokens on one GPU?

    vLLM reserves `gpu_memory_utilization × gpu_gb`; from that it takes the weights, activations
    and CUDA graphs (`overhead_gb`, an estimate: vLLM profiles it at start-up), and the rest is the
    KV-cache pool. Gemma 3's sliding-window layers keep at most `sliding_window` tokens each, which
    vLLM's hybrid KV-cache manager exploits; the all-layers-full figure is shown as the worst case.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    layers = text["num_hidden_layers"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    per_layer_token = 2 * text["num_key_value_heads"] * head_dim * kv_bytes  # K and V
    types = text.get("layer_types") or ["full_attention"] * layers
    window = text.get("sliding_window") or deploy.max_model_len
    length = deploy.max_model_len
    per_seq = sum(per_layer_token * (min(length, window) if t == "sliding_attention" else length) for t in types)
    per_seq_full = per_layer_token * layers * length
    weights = folder_bytes(Path(model_dir))
    budget = gpu_gb * deploy.gpu_memory_utilization * 1e9
    pool = budget - weights - overhead_gb * 1e9
    fit = max(0.0, pool / per_seq)
    return {
        "gpu_gb": gpu_gb, "gpu_memory_utilization": deploy.gpu_memory_utilization,
        "budget_gb": round(budget / 1e9, 2), "weights_gb": round(weights / 1e9, 3), "overhead_gb": overhead_gb,
        "kv_pool_gb": round(pool / 1e9, 2), "max_model_len": length, "max_num_seqs": deploy.max_num_seqs,
        "kv_per_token_all_layers_kb": round(per_layer_token * layers / 1e3, 1),
        "kv_per_sequence_gb": round(per_seq / 1e9, 3), "kv_per_sequence_all_full_gb": round(per_seq_full / 1e9, 3),
        "sequences_that_fit": round(fit, 1), "sequences_that_fit_all_full": round(max(0.0, pool / per_seq_full), 1),
        "kv_needed_gb": round(per_seq * deploy.max_num_seqs / 1e9, 2),
        "total_at_full_concurrency_gb": round((weights + overhead_gb * 1e9 + per_seq * deploy.max_num_seqs) / 1e9, 2),
        "starts": pool >= per_seq,
        "fits_full_concurrency": fit >= deploy.max_num_seqs,
    }


def memory_plan_table(model_dir: Path, deploy: DeployConfig, lengths: Sequence[int] = (2048, 4096, 8192, 16384),
                      ) -> list[dict[str, Any]]:
    """The plan at several context lengths (and the configured one): where `max_model_len` can go."""
    from dataclasses import replace

    rows = []
    for length in sorted({*lengths, deploy.max_model_len}):
        plan = memory_plan(model_dir, replace(deploy, max_model_len=length), deploy.serve_gpu_gb,
                           deploy.serve_overhead_gb)
        rows.append({"max_model_len": length, "KV GB / sequence": plan["kv_per_sequence_gb"],
                     "full-length sequences that fit": plan["sequences_that_fit"],
                     "worst case": plan["sequences_that_fit_all_full"],
                     f"fits {deploy.max_num_seqs} at once": plan["fits_full_concurrency"]})
    return rows


def memory_plan_lines(plan: dict[str, Any]) -> list[str]:
    """The plan as sentences, for the notebook and report.md."""
    verdict = ("fits" if plan["fits_full_concurrency"] else
               "starts, but not every sequence can be at full length at once" if plan["starts"] else "does NOT fit")
    return [
        f"GPU {plan['gpu_gb']:.0f} GB × {plan['gpu_memory_utilization']:.2f} = {plan['budget_gb']:.1f} GB for vLLM",
        f"weights {plan['weights_gb']:.2f} GB + activations/CUDA graphs ≈{plan['overhead_gb']:.1f} GB "
        f"→ KV-cache pool {plan['kv_pool_gb']:.2f} GB",
        f"KV per {plan['max_model_len']}-token sequence: {plan['kv_per_sequence_gb']:.3f} GB "
        f"(sliding-window aware; {plan['kv_per_sequence_all_full_gb']:.3f} GB if every layer kept every token)",
        f"{plan['max_num_seqs']} × {plan['max_model_len']} tokens need {plan['kv_needed_gb']:.2f} GB: "
        f"{plan['sequences_that_fit']:.1f} full-length sequences fit ({plan['sequences_that_fit_all_full']:.1f} worst case)"
        f" — {verdict}",
    ]


# --------------------------------------------------------------------------- pipeline step 6.01

def quantize_step(config: Any, progress: bool = True) -> Path:
    """6.01: quantise the instruct model into models/final/korean_medgemma_awq/, then measure what
    4 bits cost against the source model: size on disk, Korean bits per character, KorMedMCQA
    accuracy (the phase-5 evaluator) and logits error, plus the serving card's memory plan."""
    from transformers import AutoTokenizer


    deploy, spec = config.deploy, config.evaluation
    inputs = {key: require(config, key) for key in ("instruct_model", "token_store", "korean", "kormedmcqa")}
    store = TokenStore(inputs["token_store"])
    store.check_tokenizer(AutoTokenizer.from_pretrained(inputs["instruct_model"]))
    calibration = calibration_blocks(store.stream("korean", "train"), deploy.calibration_samples,
                                     deploy.calibration_seq_len, deploy.calibration_seed)
    heldout = read_heldout(inputs["korean"], spec.perplexity_max_texts, inputs["token_store"], "korean")
    data = read_mcqa_folder(inputs["kormedmcqa"], subsets=config.data.kormedmcqa.subsets,
                            max_questions=spec.max_questions)
    check_mcqa = deploy.eval_shots
    check_shots(data, check_mcqa)  # before a long calibration, not after it
    # every deploy key but those of the running server: a new host, port or key re-quantises nothing
    keys = [f"deploy.{f.name}" for f in dataclasses.fields(DeployConfig) if f.name not in SERVER_ONLY_KEYS]
    keys += ["evaluation", "data.kormedmcqa.subsets"]
    with write_artifact(artifact_path(config, "awq_model"), "6.01", config, keys, inputs) as out:
        info = quantize(inputs["instruct_model"], out.path, calibration, deploy)
        compare: dict[str, Any] = {}
        probe: Optional[torch.Tensor] = None
        reference: Optional[torch.Tensor] = None
        for label, ref in (("source", inputs["instruct_model"]), ("quantized", out.path)):
            model, tokenizer = load_for_eval(ref)
            if probe is None:
                window, _ = document_windows(heldout.documents(tokenizer)[0][:1], spec.perplexity_seq_len)[0]
                probe = torch.tensor([window])
            logits = last_logits(model, probe)
            if reference is None:
                reference = logits
            results, predictions = evaluate_with(model, tokenizer, data, spec, check_mcqa, spec.mode, progress)
            write_results(out.path / "eval" / f"{label}_{spec.mode}_{check_mcqa}shot", results, predictions)
            compare[label] = {
                "model": str(ref if label == "source" else artifact_path(config, "awq_model")),
                "bytes": folder_bytes(Path(ref)),
                "perplexity": perplexity(model, tokenizer, heldout, spec.perplexity_seq_len, spec.batch_size,
                                         progress, desc=f"{label} Korean perplexity"),
                "kormedmcqa": {"overall": results["overall"], "subsets": results["subsets"],
                               "at_or_below_chance": results["at_or_below_chance"]},
                "warning": chance_warning(results, f"{label} {spec.mode} {check_mcqa}-shot"),
            }
            del model
            free_memory()
        plan = memory_plan(out.path, deploy, deploy.serve_gpu_gb, deploy.serve_overhead_gb)
        summary = {"quantization": {**info, "ignore": list(deploy.ignore),
                                    "quantized_linear_layers": quantized_linear_count(out.path)},
                   "compare": compare,
                   "logits_relative_error": relative_error(reference, logits),
                   "memory_plan": plan, "kormedmcqa_shots": check_mcqa, "kormedmcqa_mode": spec.mode}
        write_json(out.path / "quantization.json", summary)
        write_text(out.path / "report.md", deployment_report(summary))
        plot_deployment(summary, out.path / "deployment.png")
        src, q = compare["source"], compare["quantized"]
        out.metrics.update({
            "backend": info["backend"], "scheme": info["scheme"], "seconds": info["seconds"],
            "peak_gpu_gb": info["peak_gpu_gb"], "source_gb": round(src["bytes"] / 1e9, 3),
            "quantized_gb": round(q["bytes"] / 1e9, 3),
            "bits_per_char": {"source": src["perplexity"]["bits_per_char"], "quantized": q["perplexity"]["bits_per_char"]},
            "accuracy": {"source": src["kormedmcqa"]["overall"]["accuracy"],
                         "quantized": q["kormedmcqa"]["overall"]["accuracy"]},
            "logits_relative_error": round(summary["logits_relative_error"], 4),
            "serve_gpu_gb": plan["gpu_gb"], "fits_full_concurrency": plan["fits_full_concurrency"],
            "warnings": [w for w in (src["warning"], q["warning"]) if w]})
    return artifact_path(config, "awq_model")


def comparison_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Source vs 4-bit, one row each: what the notebook and report.md show."""
    rows = []
    for label, entry in summary["compare"].items():
        overall = entry["kormedmcqa"]["overall"]
        rows.append({"model": label, "size GB": round(entry["bytes"] / 1e9, 3),
                     "Korean bits/char": entry["perplexity"]["bits_per_char"],
                     "Korean ppl/token": entry["perplexity"]["perplexity"],
                     "KorMedMCQA": overall["accuracy"], "v2.0 EM": overall["exact_match_v2"],
                     "unanswered": overall["unanswered"]})
    return rows


def deployment_report(summary: dict[str, Any]) -> str:
    info = summary["quantization"]
    lines = ["# 6.01 — 4-bit AWQ model", "",
             f"{info['backend']} {info['scheme']}, group size {info['group_size']}, "
             f"{info['quantized_linear_layers']} linear layers packed; calibrated on {info['calibration_blocks']} "
             f"Korean blocks of {info['calibration_seq_len']} tokens in {info['seconds']} s"
             + (f", peak GPU {info['peak_gpu_gb']} GB" if info.get("peak_gpu_gb") is not None else "") + ".",
             f"Kept in full precision: {', '.join(info['ignore'])}.", "",
             "| model | size GB | Korean bits/char | KorMedMCQA | v2.0 EM | unanswered |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in comparison_rows(summary):
        lines.append(f"| {row['model']} | {row['size GB']} | {row['Korean bits/char']:.4f} | {row['KorMedMCQA']:.1%} "
                     f"| {'-' if row['v2.0 EM'] is None else format(row['v2.0 EM'], '.1%')} | {row['unanswered']} |")
    lines += ["", f"KorMedMCQA: {summary['kormedmcqa_mode']}, {summary['kormedmcqa_shots']}-shot. "
              f"Logits relative error on one held-out window: {summary['logits_relative_error']:.4f}.", "",
              "## Memory plan", ""]
    lines += [f"- {line}" for line in memory_plan_lines(summary["memory_plan"])]
    warnings = [e["warning"] for e in summary["compare"].values() if e.get("warning")]
    if warnings:
        lines += ["", *[f"**{w}**" for w in warnings]]
    return "\n".join(lines) + "\n"


def plot_deployment(summary: dict[str, Any], path: Optional[Path] = None) -> Any:
    """Left: size on disk, source vs 4-bit. Right: the serving card's memory, stacked, against
    vLLM's budget (dashed) at full concurrency."""

    figure = new_figure((10, 3.8))
    left, right = figure.subplots(1, 2)
    labels = list(summary["compare"])
    sizes = [summary["compare"][k]["bytes"] / 1e9 for k in labels]
    left.bar(labels, sizes, color=["#888888", "#1f77b4"])
    for x, value in enumerate(sizes):
        left.annotate(f"{value:.3g} GB", (x, value), ha="center", va="bottom")
    left.set_ylabel("GB on disk")
    left.set_title("model size")
    plan = summary["memory_plan"]
    bottom = 0.0
    for name, value, colour in (("weights", plan["weights_gb"], "#1f77b4"), ("activations + graphs", plan["overhead_gb"], "#ff7f0e"),
                                (f"KV, {plan['max_num_seqs']}×{plan['max_model_len']} tok", plan["kv_needed_gb"], "#2ca02c")):
        right.bar(["at full concurrency"], [value], bottom=bottom, label=name, color=colour)
        bottom += value
    right.axhline(plan["budget_gb"], ls="--", color="red", label=f"vLLM budget {plan['budget_gb']:.1f} GB")
    right.set_ylabel("GB")
    right.set_title(f"{plan['gpu_gb']:.0f} GB serving card")
    right.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    return saved(figure, path)


def awq_headline(metrics: dict[str, Any]) -> str:
    """6.01's line: size, time, source vs 4-bit quality, whether it fits the serving card."""
    def pct(value: Any) -> str:
        return f"{value:.1%}" if isinstance(value, (int, float)) else "n/a"

    acc = metrics.get("accuracy") or {}
    bpc = metrics.get("bits_per_char") or {}
    fits = "fits" if metrics.get("fits_full_concurrency") else "⚠ does not fit full concurrency"
    return (f"{metrics.get('backend')} {metrics.get('scheme')}: {metrics.get('source_gb')} → "
            f"{metrics.get('quantized_gb')} GB in {metrics.get('seconds')} s; Korean bits/char "
            f"{bpc.get('source')} → {bpc.get('quantized')}; KorMedMCQA {pct(acc.get('source'))} → "
            f"{pct(acc.get('quantized'))}; {metrics.get('serve_gpu_gb')} GB card: {fits}"
            + (f"; ⚠ {len(metrics['warnings'])} run(s) at or below chance" if metrics.get("warnings") else ""))
