"""DeepSpeed ZeRO-2 on a GPU through the project's own launch path, against one plain process.

Stages 1 and 6 of the tiny profile in bf16 (stage 6 on its 4-bit NF4 base with torchao's 8-bit
AdamW with stochastic rounding, as the a5000 profile trains it) run twice from copies of one root:
`python -m kormedgemma train-stage` and `accelerate launch --config_file config/accelerate_zero2.yaml`
with the same number of processes and global batch. Losses, gradient norms and trained tensors are
compared; a ZeRO-2 run killed after its checkpoint is resumed and compared with the whole run.
With one GPU this shows that DeepSpeed and the 4-bit base mix (or how they fail), not scaling; with
N GPUs `plain` is DDP under torchrun and a one-GPU run with N times the accumulation is the
reference both are compared with.

    python benchmarks/deepspeed_gpu.py --root /tmp/ds_gpu [--gpus 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Kept in every launched process: NVLink multicast can take a shared host's GPUs out of service.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _run(command: list[str], log: Path, extra: dict[str, str] | None = None) -> dict:
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1", **(extra or {})}
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    return {"returncode": code, "seconds": round(time.perf_counter() - started, 1), "log": log.name}


def _train(root: Path, stage: int, launcher: list[str], overrides: list[str], log: Path,
           extra: dict[str, str] | None = None) -> dict:
    command = [*launcher, "-m", "kormedgemma", "train-stage", "--stage", str(stage), "--set", f"paths.root={root}"]
    for item in overrides:
        command += ["--set", item]
    return _run(command, log, extra)


def _metrics(root: Path, stage: int) -> dict | None:
    path = root / f"models/staged_training/stage{stage}/metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _max_difference(a: Path, b: Path, stage: int) -> dict:
    from safetensors.torch import load_file

    out = {}
    for part in ("trained.safetensors", "adapter/adapter_model.safetensors"):
        fa, fb = a / f"models/staged_training/stage{stage}" / part, b / f"models/staged_training/stage{stage}" / part
        if fa.is_file() and fb.is_file():
            x, y = load_file(fa), load_file(fb)
            shared = sorted(x.keys() & y.keys())
            out[part] = {"tensors": len(x), "same_keys": x.keys() == y.keys(),
                         "max_abs_difference": max((float((x[k].float() - y[k].float()).abs().max()) for k in shared),
                                                   default=None),
                         "max_abs_value": max((float(x[k].float().abs().max()) for k in x), default=None)}
    return out


def _summary(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    keys = ("distributed", "processes", "first_loss", "last_loss", "tokens_per_second", "peak_gpu_allocated_gb",
            "peak_gpu_reserved_gb", "resumed_from", "notices")
    return {**{k: metrics.get(k) for k in keys}, "losses": [h["loss"] for h in metrics["history"]],
            "grad_norms": [h["grad_norm"] for h in metrics["history"]], "final_eval": metrics["evals"][-1]}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="scratch folder")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = args.root / "base"
    result: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "gpus": args.gpus,
                    "torch": torch.__version__,
                    "environment": {k: os.environ.get(k) for k in NO_MULTICAST}, "stages": {}}
    import deepspeed

    result["deepspeed"] = deepspeed.__version__
    if not (base / "models/staged_training/stage5/manifest.json").is_file():
        result["prepare"] = _run([sys.executable, "-m", "kormedgemma", "run", "--profile", "tiny", "--to", "3.05",
                                  "--set", f"paths.root={base}"], logs / "prepare.log")
    single = [sys.executable] if args.gpus == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                       "--nproc_per_node", str(args.gpus)]
    zero2 = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "config/accelerate_zero2.yaml",
             "--num_processes", str(args.gpus)]
    common = ["base.torch_dtype=bfloat16"]
    plans = {1: ["staged.stage1.max_steps=4", "staged.stage1.save_every=2", "staged.stage1.grad_accum=2"],
             6: ["staged.stage6.max_steps=4", "staged.stage6.save_every=2", "staged.stage6.grad_accum=2",
                 "staged.stage6.optimizer=adamw_8bit_sr", "staged.stage6.load_in_4bit=true"]}
    runs = [("plain", single), ("zero2", zero2), ("zero2_killed", zero2)]
    if args.gpus > 1:  # the same global batch on one GPU: N times the accumulation
        runs.insert(0, ("one_gpu", [sys.executable]))
    for stage, plan in plans.items():
        entry: dict = {"overrides": common + plan}
        roots = {}
        for name, launcher in runs:
            accumulate = f"staged.stage{stage}.grad_accum={2 * args.gpus}"
            overrides = [accumulate if name == "one_gpu" and o.startswith(f"staged.stage{stage}.grad_accum=") else o
                         for o in plan]
            root = args.root / f"stage{stage}_{name}"
            roots[name] = root
            done = _metrics(root, stage)
            if done is not None and (name != "zero2_killed" or done.get("resumed_from")):
                entry[f"{name}_metrics"] = _summary(done)  # a command cut at its time limit: run it again
                continue
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(base, root, ignore=shutil.ignore_patterns(
                *(f"stage{k}" for k in range(stage, 8)), "merged", "checkpoints", "final"))
            if name == "zero2_killed":
                entry["killed"] = _train(root, stage, launcher, common + overrides, logs / f"s{stage}_killed.log",
                                         {"KORMEDGEMMA_CRASH_AT_STEP": "3"})
                entry["resumed"] = _train(root, stage, launcher, common + overrides, logs / f"s{stage}_resumed.log")
            else:
                entry[name] = _train(root, stage, launcher, common + overrides, logs / f"s{stage}_{name}.log")
            entry[f"{name}_metrics"] = _summary(_metrics(root, stage))
            print(stage, name, json.dumps(entry[f"{name}_metrics"])[:400], flush=True)
        entry["zero2_vs_plain"] = _max_difference(roots["zero2"], roots["plain"], stage)
        if "one_gpu" in roots:
            entry["zero2_vs_one_gpu"] = _max_difference(roots["zero2"], roots["one_gpu"], stage)
            entry["plain_vs_one_gpu"] = _max_difference(roots["plain"], roots["one_gpu"], stage)
        entry["resumed_vs_whole"] = _max_difference(roots["zero2_killed"], roots["zero2"], stage)
        result["stages"][str(stage)] = entry
        (args.out / "deepspeed_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({s: {k: v for k, v in e.items() if "_vs_" in k}
                      for s, e in result["stages"].items()}, indent=1))


if __name__ == "__main__":
    main()
