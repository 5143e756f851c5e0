"""Phase 3's GPU code path end to end on the tiny profile: the seven stages through
`kormedgemma.training.stage.train_stage` on CUDA — 4-bit QLoRA and 8-bit AdamW in stage 6 (bitsandbytes),
fused AdamW, gradient checkpointing, per-layer torch.compile — then a resume after a kill.

    python benchmarks/train_stages_gpu.py --root DIR_WITH_PHASE_0_TO_2_OUTPUTS [--out DIR]

The CPU test suite covers the same loop without CUDA; this script is how the CUDA-only branches
are exercised (on the device machine), and its JSON is kept in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="paths.root holding data/processed and models/initialized")
    parser.add_argument("--out", default=".")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile off (saves minutes of compiling)")
    args = parser.parse_args()
    from safetensors.torch import load_file

    from kormedgemma.core.config import load_config
    from kormedgemma.training.loop import CRASH_ENV
    from kormedgemma.training.stage import TRAINED_FILE, merge_stages, train_stage

    gpu = {f"staged.stage{n}.{key}": value for n in range(1, 8)
           for key, value in (("gradient_checkpointing", True), ("compile_layers", not args.no_compile))}
    config = load_config("tiny", overrides={"paths.root": args.root, "base.torch_dtype": "bfloat16", **gpu})
    rows = []
    for number in range(1, 8):
        started = time.perf_counter()
        metrics = train_stage(config, number, progress_bar=False)
        rows.append({k: metrics[k] for k in ("stage", "name", "first_loss", "last_loss", "tokens_per_second",
                                             "peak_gpu_allocated_gb", "notices", "device")}
                    | {"wall_seconds": round(time.perf_counter() - started, 1), "final_eval": metrics["evals"][-1]})
        print(json.dumps(rows[-1]), flush=True)
    merge_stages(config)
    # Stage 6 (QLoRA) three ways: the run above (A), a second uninterrupted run in a fresh process (B),
    # and a run killed at step 17 then resumed (C). A–B is what the GPU's own non-determinism gives;
    # a resume bug would show as B–C far above it.
    stage6 = Path(args.root) / "models/staged_training/stage6"
    command = [sys.executable, "-m", "kormedgemma", "train-stage", "--stage", "6", "--set", f"paths.root={args.root}",
               "--set", "base.torch_dtype=bfloat16", "--set", "staged.stage6.gradient_checkpointing=true",
               "--set", f"staged.stage6.compile_layers={str(not args.no_compile).lower()}"]

    def stage6_tensors() -> dict:
        tensors = {k: v.float() for k, v in load_file(stage6 / TRAINED_FILE).items()}
        tensors.update({f"adapter.{k}": v.float() for k, v in load_file(stage6 / "adapter/adapter_model.safetensors").items()})
        return tensors

    def difference(a: dict, b: dict) -> dict:
        return {"input_embeddings": float((a["input_embeddings"] - b["input_embeddings"]).abs().max()),
                "output_embeddings": float((a["output_embeddings"] - b["output_embeddings"]).abs().max()),
                "lora": max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("adapter."))}

    runs = {"A": stage6_tensors()}
    os.rename(stage6, Path(args.root) / "stage6_A")
    second = subprocess.run(command, capture_output=True, text=True)
    runs["B"] = stage6_tensors()
    os.rename(stage6, Path(args.root) / "stage6_B")
    crashed = subprocess.run(command, env={**os.environ, CRASH_ENV: "17"}, capture_output=True, text=True)
    resumed = subprocess.run(command, capture_output=True, text=True)
    runs["C"] = stage6_tensors()
    resume = {"second_run_returncode": second.returncode, "crash_returncode": crashed.returncode,
              "resume_returncode": resumed.returncode,
              "resume_stdout": resumed.stdout.strip().splitlines()[-1:] if resumed.stdout else resumed.stderr[-800:],
              "max_abs_difference": {"A-B (two uninterrupted runs)": difference(runs["A"], runs["B"]),
                                     "B-C (uninterrupted vs killed + resumed)": difference(runs["B"], runs["C"]),
                                     "A-C": difference(runs["A"], runs["C"])}}
    print(json.dumps(resume), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_stages_gpu.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "stages": rows, "resume_after_kill": resume},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
