"""The QLoRA merge gap of stage 6, measured on a GPU through the project's own code.

Stage 6 on a 4-bit base trains its adapter against NF4-dequantised weights; every later phase
loads the adapter merged into the unquantised weights. `kormedgemma.training.stage.qlora_merge_gap`
compares the two (valid loss, KL per token, top-1 agreement). This script trains stage 6 with
`kormedgemma.training.stage.train_stage` twice on copies of one root holding stages 1-5 — once on the
4-bit base (bitsandbytes NF4, as the profile's `load_in_4bit`), once on the bf16 base — and
measures the gap of each.

    python benchmarks/stage6_merge_gap_gpu.py --root ROOT_WITH_STAGES_1_TO_5 [--profile tiny] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="paths.root holding stages 1-5 and their inputs")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--work", default="/tmp/merge_gap", help="scratch folder for the two copies")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    from kormedgemma.core.config import load_config
    from kormedgemma.training.stage import qlora_merge_gap, train_stage

    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "profile": args.profile, "runs": []}
    for base in ("nf4", "bf16"):
        root = Path(args.work) / base
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(args.root, root, ignore=shutil.ignore_patterns("stage6", "stage7", "merged", "checkpoints"))
        config = load_config(args.profile, overrides={"paths.root": str(root), "base.torch_dtype": "bfloat16",
                                                      "staged.stage6.load_in_4bit": base == "nf4"})
        started = time.perf_counter()
        metrics = train_stage(config, 6, progress_bar=False)
        gap = qlora_merge_gap(config)
        results["runs"].append({"base": base, "train_seconds": round(time.perf_counter() - started, 1),
                                "first_loss": metrics["first_loss"], "last_loss": metrics["last_loss"],
                                "final_eval": metrics["evals"][-1], "notices": metrics["notices"], "gap": gap})
        print(json.dumps(results["runs"][-1], indent=1))
    out = Path(args.out) / "stage6_merge_gap_gpu_h100.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
