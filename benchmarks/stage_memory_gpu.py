"""Phase 3 on a GPU at MedGemma-4B shape: peak memory, tokens/s and MFU of each EEVE stage.

A random-weight Gemma3ForConditionalGeneration of MedGemma-4B's configuration (bf16, vision tower
included), untied and resized to 272,145 tokens (262,145 + 10,000 new), trains each stage for a
few whole optimizer steps on random token ids at sequence length 2048: the a5000 profile's
micro-batch × gradient accumulation (a micro-batch sweep keeps the same sequences per step),
the stage's own optimizer (`kormedgemma.training.stage._optimizer`: Kahan-compensated AdamW unless the
profile says otherwise), gradient checkpointing on, the chunked loss of `kormedgemma.modeling.loss`, under
a 24 GB cap (`torch.cuda.set_per_process_memory_fraction`), as on an RTX A5000. The first
optimizer step (compilation, optimizer state allocation) is excluded from the timing. MFU counts the stage's model FLOPs
per token (forward, plus the backward the
stage needs: activation gradients only when something upstream of lm_head trains, weight
gradients only for trained matrices; recomputation from checkpointing not counted) against the
bf16 matmul rate measured on the same GPU.

    python benchmarks/stage_memory_gpu.py [--stages 1 2 3 4 5 6 7] [--steps 2] [--out DIR]

With --qlora, stage 6 runs as `kormedgemma.training.stage` runs it on a GPU: the model is saved, reloaded
with its language-model linear layers in 4-bit NF4 (bitsandbytes), LoRA on those layers, both
embedding matrices trainable, with the profile's stage-6 optimizer (or `--stage6-optimizer`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from config.training_config import LoraConfig, a5000
from kormedgemma.modeling.base_model import medgemma_4b_config
from kormedgemma.modeling.loss import chunked_causal_lm_loss
from kormedgemma.modeling.rows import RowDeltaEmbedding, RowDeltaLinear
from kormedgemma.training.stages import STAGES, apply_stage
from kormedgemma.vocab.embeddings import resize_for_tokenizer

BASE_TOKENS, NEW_TOKENS, SEQ = 262_145, 10_000, 2048
CAP_BYTES = 24 * 10**9  # an RTX A5000's 24 GB


def measured_bf16_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * 8192**3 / sorted(times)[len(times) // 2]


def flops_per_token(model, stage: int, lora_params: int) -> float:
    text = model.config.text_config
    layers = model.model.language_model.layers
    p_layers = sum(p.numel() for p in layers.parameters())
    vocab_d = model.lm_head.weight.shape[0] * text.hidden_size
    attention = text.num_hidden_layers * SEQ * text.num_attention_heads * text.head_dim
    forward = 2 * p_layers + 2 * vocab_d + 4 * attention
    spec = STAGES[stage]
    needs_activation_grads = spec.input_rows is not None or spec.lora
    backward = (2 * p_layers + 2 * vocab_d + 8 * attention) if needs_activation_grads else 0
    trained_head_rows = {"new": NEW_TOKENS, "all": model.lm_head.weight.shape[0], None: 0}[spec.output_rows]
    backward += 2 * trained_head_rows * text.hidden_size + 2 * lora_params
    return forward + backward


def restore(model):
    """Undo a stage's wrapping without merging, so the next stage starts from the same weights."""
    if hasattr(model, "unload"):
        model = model.unload()
    for getter, setter in ((model.get_input_embeddings, model.set_input_embeddings),
                           (model.get_output_embeddings, model.set_output_embeddings)):
        module = getter()
        if isinstance(module, (RowDeltaEmbedding, RowDeltaLinear)):
            setter(module.base)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    return model


def accumulation(config, micro_batch: int) -> int:
    """Micro-batches per optimizer step that keep the profile's sequences per step."""
    return max(1, (config.micro_batch_size * config.grad_accum) // micro_batch)


def timed_steps(trained, optimizer, params, micro_batch: int, accum: int, steps: int, chunk_tokens: int = 1024,
                trace: dict | None = None) -> float:
    """Median seconds of whole optimizer steps after the first: `accum` micro-batches of forward and
    backward (the loss scaled by 1/accum, as accelerate does), clipping, one optimizer step."""
    ids = torch.randint(0, BASE_TOKENS + NEW_TOKENS, (micro_batch, SEQ), device="cuda")
    gb = lambda: round(torch.cuda.memory_allocated() / 1e9, 2)  # noqa: E731
    timings = []
    for step in range(steps):
        torch.cuda.synchronize()
        began = time.perf_counter()
        for micro in range(accum):
            loss = chunked_causal_lm_loss(trained, ids, chunk_tokens=chunk_tokens) / accum
            loss.backward()
            if trace is not None and step == 0 and micro == 0:
                trace.update(after_backward=gb(), peak_backward=round(torch.cuda.max_memory_allocated() / 1e9, 2))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if trace is not None and step == 0:
            trace.update(after_optimizer=gb(), peak_optimizer=round(torch.cuda.max_memory_allocated() / 1e9, 2))
        if step >= 1:
            timings.append(time.perf_counter() - began)
    return sorted(timings)[len(timings) // 2]


def run_stage(model, stage: int, steps: int, peak: float, micro_batch: int | None = None,
              chunk_tokens: int = 1024) -> tuple[dict, object]:
    from kormedgemma.training.stage import _optimizer

    profile = a5000().staged
    config = getattr(profile, f"stage{stage}")
    micro_batch = micro_batch or config.micro_batch_size
    accum = accumulation(config, micro_batch)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = {"stage": stage, "name": STAGES[stage].name, "micro_batch": micro_batch, "grad_accum": accum,
              "tokens_per_optimizer_step": micro_batch * accum * SEQ, "seq_len": SEQ, "loss_chunk_tokens": chunk_tokens}
    trained = apply_stage(model, STAGES[stage], BASE_TOKENS, NEW_TOKENS, config.lora or LoraConfig())
    params = [p for p in trained.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for n, p in trained.named_parameters() if p.requires_grad and "lora_" in n)
    result["trainable_parameters"] = sum(p.numel() for p in params)
    result["trainable_bf16_parameters"] = sum(p.numel() for p in params if p.dtype == torch.bfloat16)
    notices: list[str] = []
    optimizer = _optimizer(config, params, notices)
    result["optimizer"] = f"{config.optimizer} ({type(optimizer).__module__}.{type(optimizer).__name__})"
    try:
        seconds = timed_steps(trained, optimizer, params, micro_batch, accum, steps, chunk_tokens)
        tokens_per_second = micro_batch * accum * SEQ / seconds
        result.update({
            "status": "ok", "optimizer_step_seconds": round(seconds, 3),
            "tokens_per_second": round(tokens_per_second), "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
            "model_flops_per_token": flops_per_token(
                model if not hasattr(trained, "get_base_model") else trained.get_base_model(), stage, lora_params),
        })
        result["mfu"] = round(tokens_per_second * result["model_flops_per_token"] / peak, 3)
    except torch.OutOfMemoryError as error:
        result.update({"status": "OOM under 24 GB", "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                       "error": str(error).splitlines()[0][:200]})
    del optimizer, params
    model = restore(trained)
    gc.collect()
    torch.cuda.empty_cache()
    return result, model


def run_qlora_stage6(folder: Path, steps: int, peak: float, compile_layers: bool, chunk_tokens: int = 1024,
                     micro_batch: int | None = None, optimizer_kind: str | None = None) -> dict:
    """Stage 6 with a 4-bit base, through the training module's own choices; `folder` holds the
    bf16 model, saved and dropped from the GPU by the caller."""
    from dataclasses import replace

    from transformers import Gemma3ForConditionalGeneration

    from kormedgemma.training.stage import _bnb_config, _optimizer

    config = a5000().staged.stage6
    if optimizer_kind:
        config = replace(config, optimizer=optimizer_kind)
    micro_batch = micro_batch or config.micro_batch_size
    accum = accumulation(config, micro_batch)
    started = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    quantized = Gemma3ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=_bnb_config(torch.bfloat16), device_map={"": 0})
    result = {"stage": 6, "name": "QLoRA (4-bit NF4 base) + all embeddings", "micro_batch": micro_batch,
              "grad_accum": accum, "tokens_per_optimizer_step": micro_batch * accum * SEQ,
              "seq_len": SEQ, "load_4bit_seconds": round(time.perf_counter() - started, 1),
              "model_gb_4bit": round(torch.cuda.memory_allocated() / 1e9, 2),
              "load_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
              "compiled_layers": compile_layers, "loss_chunk_tokens": chunk_tokens}
    quantized.config.use_cache = False
    quantized.train()  # from_pretrained returns eval mode, where transformers skips gradient checkpointing
    quantized.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = apply_stage(quantized, STAGES[6], BASE_TOKENS, NEW_TOKENS, config.lora)
    if compile_layers:
        for layer in trained.get_base_model().model.language_model.layers:
            layer.compile()
    params = [p for p in trained.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for n, p in trained.named_parameters() if p.requires_grad and "lora_" in n)
    result["trainable_parameters"] = sum(p.numel() for p in params)
    optimizer = _optimizer(config, params, [])
    result["optimizer"] = f"{config.optimizer} ({type(optimizer).__module__}.{type(optimizer).__name__})"
    torch.cuda.reset_peak_memory_stats()
    trace = {"before_step": round(torch.cuda.memory_allocated() / 1e9, 2)}
    try:
        seconds = timed_steps(trained, optimizer, params, micro_batch, accum, steps, chunk_tokens, trace)
        tokens_per_second = micro_batch * accum * SEQ / seconds
        flops = flops_per_token(trained.get_base_model(), 6, lora_params)
        result.update({"status": "ok", "optimizer_step_seconds": round(seconds, 3),
                       "tokens_per_second": round(tokens_per_second),
                       "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                       "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
                       "model_flops_per_token": flops, "mfu": round(tokens_per_second * flops / peak, 3),
                       "memory_trace_gb": trace})
        # what a checkpoint does with the optimizer: torch.save its state and load it into a fresh one
        import io

        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        fresh = _optimizer(config, params, [])
        fresh.load_state_dict(torch.load(buffer, weights_only=False))
        result["optimizer_state_checkpoint_mb"] = round(buffer.getbuffer().nbytes / 1e6, 1)
        del fresh
    except torch.OutOfMemoryError as error:
        result.update({"status": "OOM under 24 GB", "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                       "error": str(error).splitlines()[0][:200], "memory_trace_gb": trace})
    del optimizer, params, trained, quantized
    return result


def profile_step(model, stage: int) -> None:
    """Where one training step's GPU time goes (top operators by CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    trained = apply_stage(model, STAGES[stage], BASE_TOKENS, NEW_TOKENS, LoraConfig())
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(0, BASE_TOKENS + NEW_TOKENS, (2, SEQ), device="cuda")
    for _ in range(2):
        chunked_causal_lm_loss(trained, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        chunked_causal_lm_loss(trained, ids).backward()
        optimizer.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7])
    parser.add_argument("--steps", type=int, default=2, help="whole optimizer steps; the first is not timed")
    parser.add_argument("--sweep", type=int, nargs="*", default=[4, 8],
                        help="extra micro-batch sizes to try (accumulation adjusted to the same sequences per step)")
    parser.add_argument("--stage6-optimizers", nargs="*", default=[None],
                        help="with --qlora: the optimizers to run stage 6 with (default: the profile's)")
    parser.add_argument("--out", default=".")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    parser.add_argument("--profile", action="store_true", help="profile one step of the first stage and stop")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder layer (fuses Gemma's fp32 RMSNorms, GELU and casts)")
    parser.add_argument("--qlora", action="store_true",
                        help="stage 6 as QLoRA: 4-bit base, 8-bit AdamW (runs last: it reloads the model)")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per lm_head/loss chunk")
    parser.add_argument("--scratch", default="/tmp", help="where --qlora saves the bf16 model before reloading it")
    args = parser.parse_args()
    from kormedgemma.core.environment import prefer_expandable_segments

    prefer_expandable_segments()  # as a training process does (PYTORCH_CUDA_ALLOC_CONF set: kept)
    torch.manual_seed(0)
    # Every stage and micro-batch recompiles the layers (other shapes, other trainable tensors);
    # past dynamo's default limit of 8 it would fall back to eager and time that instead.
    torch._dynamo.config.recompile_limit = 128
    torch._dynamo.config.accumulated_recompile_limit = 4096
    total = torch.cuda.get_device_properties(0).total_memory
    peak = measured_bf16_peak()
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
    from transformers import Gemma3ForConditionalGeneration

    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration(medgemma_4b_config())
    torch.set_default_dtype(torch.float32)
    attn_before = model.config._attn_implementation
    model.set_attn_implementation(args.attn)
    resize_for_tokenizer(model, BASE_TOKENS + NEW_TOKENS, 64)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for layer in model.model.language_model.layers:
            layer.compile()
    setup = {"gpu": torch.cuda.get_device_name(0), "measured_bf16_tflops": round(peak / 1e12, 1),
             "cap_gb": CAP_BYTES / 1e9, "build_seconds": round(time.perf_counter() - started, 1),
             "model_gb": round(torch.cuda.memory_allocated() / 1e9, 2), "torch": torch.__version__,
             "rows": model.lm_head.weight.shape[0], "gradient_checkpointing": True,
             "attention": f"{attn_before} -> {model.config._attn_implementation}", "compiled_layers": args.compile,
             "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")}
    print(json.dumps(setup))
    results = []
    if args.profile:
        profile_step(model, args.stages[0])
        return
    qlora = args.qlora and 6 in args.stages
    plan = [(stage, None) for stage in args.stages if not (qlora and stage == 6)]
    plan += [(stage, batch) for batch in args.sweep for stage in args.stages if not (qlora and stage == 6)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every result: a run stopped at its time limit keeps what it measured
        (out / "stage_memory_gpu.json").write_text(json.dumps({"setup": setup, "stages": results}, indent=2) + "\n")

    for stage, batch in plan:
        result, model = run_stage(model, stage, args.steps, peak, batch, args.chunk_tokens)
        results.append(result)
        print(json.dumps(result), flush=True)
        save()
    if qlora:
        import tempfile

        folder = Path(tempfile.mkdtemp(dir=args.scratch))
        model.save_pretrained(folder)
        del model  # the bf16 copy must leave the GPU before the 4-bit one arrives
        gc.collect()
        torch.cuda.empty_cache()
        for kind, batch in [(k, b) for k in args.stage6_optimizers for b in [None, *args.sweep]]:
            results.append(run_qlora_stage6(folder, args.steps, peak, args.compile, args.chunk_tokens, batch, kind))
            print(json.dumps(results[-1]), flush=True)
            save()
            gc.collect()
            torch.cuda.empty_cache()
    save()
    print(f"{'stage':>5} {'batch':>5} {'accum':>5} {'status':>16} {'alloc GB':>8} {'resv GB':>8} {'tok/s':>8} {'MFU':>6}")
    for r in results:
        print(f"{r['stage']:>5} {r['micro_batch']:>5} {r['grad_accum']:>5} {r['status']:>16} "
              f"{r.get('peak_allocated_gb', 0):>8} {r.get('peak_reserved_gb', '-'):>8} "
              f"{r.get('tokens_per_second', '-'):>8} {r.get('mfu', '-'):>6}")


if __name__ == "__main__":
    main()
