"""Phase 3's speed on the real Gemma 3 270M, side by side with a naive loop, in one process.

    python benchmarks/gemma3_270m_speed.py --root RUN_ROOT --config benchmarks/gemma3_270m_local.yaml \
        [--set base.model=...gguf] [--steps 40] [--out benchmarks/results]

RUN_ROOT is a finished `gemma3_270m` run's `paths.root` (its phase 0-2 artifacts are linked, not
copied, into RUN_ROOT/speed/, where every stage trains again for --steps optimizer steps through
`kormedgemma.training.stage.train_stage`, the pipeline's own code). The naive loop is the issue's
rough sketch: the initialised model in fp32 weights, every parameter trained by torch's AdamW under
bf16 autocast, 32 x 512 tokens a step, no compile. Both read the same shape of batch; the stages'
rate leaves their first step out (compilation), the naive loop's its first three.

Without a GPU it runs on the CPU, for a dry run of the script itself (its figures then mean nothing):
with every stage at micro_batch_size 1 and seq_len 64 and --steps 3 it took 102 s on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def naive_loop(model_dir: Path, steps: int, batch: int, seq_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a dry run of this script
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(steps + 3):
        ids = torch.randint(0, vocab, (batch, seq_len), device=device, generator=generator)
        sync()
        started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - started)
    timed = times[3:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_second": round(batch * seq_len * len(timed) / sum(timed), 1), "steps": len(timed),
            "peak_gpu_allocated_gb": None if peak is None else round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a finished gemma3_270m run's paths.root")
    parser.add_argument("--config", dest="config_file", default=str(REPO / "benchmarks/gemma3_270m_local.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()

    from kormedgemma.core.artifacts import artifact_path, link_upstream
    from kormedgemma.core.config import load_config, parse_overrides
    from kormedgemma.training.stage import train_stage

    overrides = parse_overrides(args.overrides)
    config = load_config("gemma3_270m", overrides={**overrides, "paths.root": args.root}, config_file=args.config_file)
    root = Path(args.root).resolve() / "speed"
    scratch = dataclasses.replace(config, paths=dataclasses.replace(config.paths, root=str(root)))
    link_upstream(config, scratch, before="3.01")  # phase 0-2 outputs linked; stages train afresh
    hyper = config.staged.stage1
    shape = {"micro_batch_size": hyper.micro_batch_size, "grad_accum": hyper.grad_accum, "seq_len": hyper.seq_len}
    print("naive loop ...", flush=True)
    naive = naive_loop(artifact_path(config, "initialized_model"), args.steps, hyper.micro_batch_size * hyper.grad_accum,
                       hyper.seq_len)
    print(json.dumps(naive), flush=True)
    stages = []
    for number in range(1, 8):
        name = f"stage{number}"
        stage = dataclasses.replace(getattr(config.staged, name), max_steps=args.steps, eval_every=10**6,
                                    save_every=10**6)
        run = dataclasses.replace(scratch, staged=dataclasses.replace(scratch.staged, **{name: stage}))
        started = time.perf_counter()
        metrics = train_stage(run, number, progress_bar=False)
        row = {"stage": number, "tokens_per_second": metrics["tokens_per_second"],
               "speedup_over_naive": round(metrics["tokens_per_second"] / naive["tokens_per_second"], 2),
               "peak_gpu_allocated_gb": metrics.get("peak_gpu_allocated_gb"), "compile": stage.compile_layers,
               "lora": stage.lora is not None, "optimizer": stage.optimizer,
               "wall_seconds": round(time.perf_counter() - started, 1)}
        stages.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "shape": shape,
              "steps_timed_per_stage": args.steps - 1, "naive_loop": naive, "stages": stages}
    card = next((tag for tag in ("h200", "h100", "a100", "cpu") if tag in result["device"].lower()), "gpu")
    out = Path(args.out) / f"gemma3_270m_stage_speed_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
