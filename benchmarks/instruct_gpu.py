"""Phase 4 at MedGemma-4B shape on a GPU under a 24 GB cap, through `kormedgemma.training.instruct.train_instruct`.

A random-weight Gemma3ForConditionalGeneration of MedGemma-4B's configuration (bf16, vision tower
included), untied and resized to 272,145 tokens, is written as the `merged_model` artifact (3.07)
beside a processed KorMedMCQA folder (the real train/dev splits), and `train_instruct` runs on
the `a5000` profile's instruct settings for a few optimizer steps with the process held to 24 GB
(`KORMEDGEMMA_GPU_MEMORY_GB`), sweeping micro-batch × accumulation at the same examples per step.
Figures are the run's own metrics: tokens/s (prompt and answer tokens, padding excluded, the first
step left out), peak allocated and reserved GPU memory, examples dropped as longer than seq_len.

The tokenizer is the one in --tokenizer (the tiny profile's merged tokenizer: a few thousand
pieces, so Korean takes more tokens per example than with MedGemma's 262K pieces and more examples
fill the 1,024-token window: a harder case for memory than the real one).

    python benchmarks/instruct_gpu.py --mcqa ROOT/data/processed/kormedmcqa --tokenizer DIR [--steps 4] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

BASE_TOKENS, NEW_TOKENS = 262_145, 10_000


def build_root(root: Path, mcqa: Path, tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    from kormedgemma.core.artifacts import artifact_path
    from kormedgemma.core.config import load_config
    from kormedgemma.core.manifest import write_artifact
    from kormedgemma.modeling.base_model import medgemma_4b_config, save_tokenizer
    from kormedgemma.vocab.embeddings import resize_for_tokenizer

    config = load_config("a5000", overrides={"paths.root": str(root)})
    shutil.copytree(mcqa, artifact_path(config, "kormedmcqa"))
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration(medgemma_4b_config())
    torch.set_default_dtype(torch.float32)
    resize_for_tokenizer(model, BASE_TOKENS + NEW_TOKENS, 64)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with write_artifact(artifact_path(config, "merged_model"), "3.07", config, [], {}) as out:
        model.save_pretrained(out.path)
        save_tokenizer(tokenizer, out.path)
    rows = model.get_input_embeddings().weight.shape[0]
    del model
    torch.cuda.empty_cache()
    return {"rows": rows, "build_and_save_seconds": round(time.perf_counter() - started, 1),
            "tokenizer_pieces": len(tokenizer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mcqa", required=True, help="a processed KorMedMCQA folder (with its manifest)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (Gemma 3 form, with chat template)")
    parser.add_argument("--root", default="/tmp/instruct_bench")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--sweep", default="8x2,4x4,16x1", help="micro-batch x grad_accum pairs")
    parser.add_argument("--cap-gb", default="24")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.environ["KORMEDGEMMA_GPU_MEMORY_GB"] = args.cap_gb
    from kormedgemma.core.config import load_config
    from kormedgemma.core.environment import prefer_expandable_segments
    from kormedgemma.training.instruct import read_instruct_metrics, train_instruct

    prefer_expandable_segments()  # as train_instruct would, before this process first touches CUDA
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    setup = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cap_gb": float(args.cap_gb),
             "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), **build_root(root, Path(args.mcqa), Path(args.tokenizer))}
    print(json.dumps(setup))
    runs = []
    out = Path(args.out) / "instruct_gpu_h100.json"
    for pair in args.sweep.split(","):
        micro, accum = (int(x) for x in pair.split("x"))
        config = load_config("a5000", overrides={"paths.root": str(root), "instruct.micro_batch_size": micro,
                                                 "instruct.grad_accum": accum, "instruct.max_steps": args.steps,
                                                 "instruct.eval_every": 10**6, "instruct.resume": False})
        spec = config.instruct
        row = {"micro_batch_size": micro, "grad_accum": accum, "seq_len": spec.seq_len, "lora_r": spec.lora.r,
               "gradient_checkpointing": spec.gradient_checkpointing}
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            train_instruct(config, progress_bar=False)
            metrics = read_instruct_metrics(config)
            row.update({k: metrics.get(k) for k in ("examples", "dev_examples", "too_long", "steps", "tokens_per_second",
                                                    "peak_gpu_allocated_gb", "peak_gpu_reserved_gb",
                                                    "trainable_parameters", "first_loss", "last_loss")})
            row["step_seconds"] = [h["seconds"] for h in metrics["history"]]
            rates = sorted(h["tokens"] / h["seconds"] for h in metrics["history"][1:])
            row["median_step_tokens_per_second"] = round(rates[len(rates) // 2], 1) if rates else None
            row["tokens_per_step"] = [h["tokens"] for h in metrics["history"]]
            row["answer_tokens_per_step"] = [h["answer_tokens"] for h in metrics["history"]]
        except MemoryError as error:
            row["error"] = str(error)[:300]
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        runs.append(row)
        print(json.dumps(row))
        out.write_text(json.dumps({"setup": setup, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
