"""Phase 6 on a GPU at MedGemma-4B shape: AWQ W4A16 time, peak memory, size, logits error.

A random-weight Gemma3ForConditionalGeneration of MedGemma-4B's configuration (vision tower
included), resized to 272,192 rows as after vocabulary expansion, is saved in bf16 and quantised
by the library's own `kormedgemma.deploy.quantize.quantize_llmcompressor` with the a5000 profile's
deploy settings (W4A16, group 128, 256 calibration blocks of 512 tokens) under a 24 GB cap as on
an RTX A5000. Calibration text is the tiny profile's processed Korean corpus, tokenized by the tiny
merged tokenizer (its ids cover only the first 1,600 rows; timing and memory do not depend on
which rows). Then both folders load through transformers (`modeling.base_model.load_for_eval`) and the
next-token logits of held-out windows are compared: ‖z_4bit − z_bf16‖ / ‖z_bf16‖. Finally the
memory plan for an RTX 4090 is computed from the quantised folder.

Random weights have no outlier channels for AWQ to protect, so the error figure says the
pipeline round-trips (packing, scales, ignore list, loading), not what 4 bits cost a trained
model; 6.01 measures that on the real model (bits/char and KorMedMCQA before and after).

    python benchmarks/quantize_gpu.py --root .gpu_root --work /tmp/qbench [--samples 256] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from config.training_config import a5000
from kormedgemma.data.readers import read_split
from kormedgemma.deploy.quantize import (
    calibration_blocks,
    folder_bytes,
    last_logits,
    memory_plan,
    memory_plan_lines,
    quantize_llmcompressor,
    quantized_linear_count,
    relative_error,
)
from kormedgemma.modeling.base_model import medgemma_4b_config
from kormedgemma.vocab.embeddings import resize_for_tokenizer

ROWS = 262_145 + 10_000
CAP_BYTES = 24 * 10**9


def build_source(tokenizer_dir: Path, target: Path) -> dict:
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    if (target / "config.json").is_file():
        return {"source": "reused"}
    torch.manual_seed(0)
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration(medgemma_4b_config())
    torch.set_default_dtype(torch.float32)
    resize_for_tokenizer(model, ROWS, 64)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return {"build_and_save_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".gpu_root", help="artifact root holding the tiny profile's outputs")
    parser.add_argument("--work", default="/tmp/qbench", help="where the bf16 and 4-bit folders go")
    parser.add_argument("--samples", type=int, default=None, help="calibration blocks (default: a5000 profile)")
    parser.add_argument("--seq-len", type=int, default=None, help="calibration block length (default: a5000)")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows for the logits comparison")
    parser.add_argument("--skip-quantize", action="store_true", help="reuse an existing 4-bit folder")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    from kormedgemma.evaluation.korean import load_for_eval

    root, work = Path(args.root), Path(args.work)
    source, quantized = work / "bf16", work / "w4a16"
    deploy = a5000().deploy
    deploy = replace(deploy, calibration_samples=args.samples or deploy.calibration_samples,
                     calibration_seq_len=args.seq_len or deploy.calibration_seq_len)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
    setup = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cap_gb": CAP_BYTES / 1e9,
             "rows": ROWS, "scheme": deploy.scheme, "group_size": deploy.group_size,
             "calibration_samples": deploy.calibration_samples, "calibration_seq_len": deploy.calibration_seq_len,
             **build_source(root / "models/initialized", source)}
    print(json.dumps(setup), flush=True)
    texts = read_split(root / "data/processed/korean", "train")
    # The tiny corpus packs into ~18 blocks of 512; repeated so calibration sees the profile's count.
    texts = texts * -(-deploy.calibration_samples * deploy.calibration_seq_len // max(1, sum(len(t) for t in texts)))
    result: dict = {"setup": setup}
    if not args.skip_quantize:
        tokenizer = AutoTokenizer.from_pretrained(source)
        blocks = calibration_blocks(_stream(tokenizer, texts), deploy.calibration_samples, deploy.calibration_seq_len,
                                    deploy.calibration_seed)
        info = quantize_llmcompressor(source, quantized, blocks, deploy)
        result["quantize"] = info
        print(json.dumps(info), flush=True)
    result["size"] = {"bf16_gb": round(folder_bytes(source) / 1e9, 3), "w4a16_gb": round(folder_bytes(quantized) / 1e9, 3),
                      "quantized_linear_layers": quantized_linear_count(quantized)}
    print(json.dumps(result["size"]), flush=True)

    heldout = read_split(root / "data/processed/korean", "valid")
    logits = {}
    for label, folder in (("bf16", source), ("w4a16", quantized)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        model, tokenizer = load_for_eval(folder, device="cuda", dtype="bfloat16")
        load_s = time.perf_counter() - started
        ids = torch.tensor(calibration_blocks(_stream(tokenizer, heldout), args.windows, 256), dtype=torch.long)
        logits[label] = last_logits(model, ids)
        # q_proj/k_proj are in no AWQ mapping (Gemma 3's q/k norms), so their only change is 4-bit
        # rounding: the weight-level error of the scheme itself.
        projections = {n: m.weight.detach().to("cpu", torch.float32) for n, m in model.named_modules()
                       if n.endswith(("self_attn.q_proj", "self_attn.k_proj")) and "language_model" in n}
        if label == "bf16":
            reference_weights = projections
        else:
            errors = [float((projections[n] - w).norm() / w.norm()) for n, w in reference_weights.items()]
            result["qk_weight_relative_error"] = {"mean": round(sum(errors) / len(errors), 4),
                                                  "max": round(max(errors), 4), "layers": len(errors)}
        result[f"load_{label}"] = {"seconds": round(load_s, 1), "allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
                                   "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                                   "linear_class": type(model.model.language_model.layers[0].mlp.up_proj).__name__}
        print(json.dumps({label: result[f"load_{label}"]}), flush=True)
        del model
        torch.cuda.empty_cache()
    result["logits_relative_error"] = round(relative_error(logits["bf16"], logits["w4a16"]), 5)
    top_same = (logits["bf16"].argmax(-1) == logits["w4a16"].argmax(-1)).float().mean().item()
    result["top1_agreement"] = round(top_same, 4)
    result["windows"] = f"{args.windows} × 256 tokens"
    plan = memory_plan(quantized, deploy, deploy.serve_gpu_gb, deploy.serve_overhead_gb)
    result["memory_plan_rtx4090"] = plan
    print(json.dumps({k: result[k] for k in ("logits_relative_error", "top1_agreement", "qk_weight_relative_error")}),
          flush=True)
    for line in memory_plan_lines(plan):
        print(line)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quantize_gpu.json").write_text(json.dumps(result, indent=2) + "\n")


def _stream(tokenizer, texts):
    """The token store's framing (`<bos> doc <eos>` back to back) for a few texts."""
    return np.array([t for text in texts for t in (tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False),
                                                   tokenizer.eos_token_id)], dtype=np.uint32)


if __name__ == "__main__":
    main()
