"""Phase 5 on a GPU at MedGemma-4B shape: KorMedMCQA 5-shot questions per second.

A random-weight Gemma3ForConditionalGeneration of MedGemma-4B's configuration (bf16, vision
tower included), resized to 272,145 tokens, answers 5-shot KorMedMCQA prompts through the
library's own evaluator (`kormedgemma.evaluation.korean.evaluate_mcqa`): harness prompt, greedy
generation with the harness's stop strings, batched with left padding, under a 24 GB cap as on
an RTX A5000. The prompts are the tiny profile's processed KorMedMCQA rows (tokenized by the
tiny merged tokenizer), each question lengthened with held-out Korean text until the 5-shot
prompt reaches --prompt-tokens, the length of a real 5-shot KorMedMCQA prompt.

Random weights never produce a stop string, so every answer runs the full --max-new-tokens:
equal work for every row, the case where dropping finished rows gains nothing, which isolates
the cost of a decoding step. The same batches are timed through transformers' `model.generate`
(what lm-evaluation-harness calls, and the evaluator's path before `decoding.greedy_generate`)
as the baseline. Log-likelihood mode (one forward per question) is timed too. Greedy outputs are
compared across runs.

    python benchmarks/eval_generation_gpu.py --root .gpu_root --data DIR [--batches 1 8 16 32] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kormedgemma.data.kormedmcqa import STOP_SEQUENCES, McqaSet, build_prompt, cut_at_stops, read_mcqa_folder
from kormedgemma.data.readers import read_split
from kormedgemma.evaluation.decoding import MaskRowsPast, stop_token_ids
from kormedgemma.evaluation.korean import evaluate_mcqa
from kormedgemma.modeling.base_model import medgemma_4b_config
from kormedgemma.vocab.embeddings import resize_for_tokenizer

ROWS = 262_145 + 10_000
CAP_BYTES = 24 * 10**9


def lengthen(data: McqaSet, tokenizer, filler: list[str], target: int) -> McqaSet:
    """Grow every question until a 5-shot prompt holds about `target` tokens."""
    text = " ".join(filler)
    subset = next(iter(data.test))
    for extra in range(0, len(text), 20):
        rows = {k: [dict(r, question=r["question"] + " " + text[:extra]) for r in v] for k, v in data.test.items()}
        shots = {k: [dict(r, question=r["question"] + " " + text[:extra]) for r in v] for k, v in data.fewshot.items()}
        prompt = build_prompt(rows[subset][0], shots[subset], 5)
        if len(tokenizer.encode(prompt)) >= target:
            return McqaSet(root=data.root, test=rows, fewshot=shots)
    raise ValueError("not enough filler text to reach the target prompt length")


@torch.no_grad()
def generate_baseline(model, tokenizer, prompts: list[str], batch: int, max_new_tokens: int) -> list[str]:
    """transformers' `generate` over the same longest-first left-padded batches (no row leaves a
    batch before the last one stops)."""
    from transformers import GenerationConfig, LogitsProcessorList

    order = sorted(range(len(prompts)), key=lambda i: -len(tokenizer.encode(prompts[i])))
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id, stop_strings=list(STOP_SEQUENCES))
    outputs = [""] * len(prompts)
    tokenizer.padding_side = "left"
    for start in range(0, len(order), batch):
        chosen = order[start:start + batch]
        inputs = tokenizer([prompts[i] for i in chosen], return_tensors="pt", padding=True).to(model.device)
        new = model.generate(**inputs, generation_config=settings, tokenizer=tokenizer,
                             logits_processor=LogitsProcessorList([MaskRowsPast(len(tokenizer))]))
        for i, ids in zip(chosen, new[:, inputs["input_ids"].shape[1]:]):
            outputs[i] = cut_at_stops(tokenizer.decode(ids, skip_special_tokens=True))
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".gpu_root", help="artifact root: models/initialized (tokenizer) and "
                                                            "data/processed/korean (filler text)")
    parser.add_argument("--data", required=True, help="KorMedMCQA-schema folder (test + fewshot)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--baseline-batches", type=int, nargs="*", default=[8, 16],
                        help="batch sizes to time through model.generate too")
    parser.add_argument("--questions", type=int, default=64, help="questions per timed run")
    parser.add_argument("--prompt-tokens", type=int, default=1200, help="5-shot prompt length to reach")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    root = Path(args.root)
    tokenizer = AutoTokenizer.from_pretrained(root / "models/initialized")
    data = read_mcqa_folder(Path(args.data))
    data = lengthen(data, tokenizer, read_split(root / "data/processed/korean", "train"), args.prompt_tokens)
    pool = [(k, r) for k, v in data.test.items() for r in v]
    chosen = [pool[i % len(pool)] for i in range(args.questions)]
    subset = chosen[0][0]
    # one subset, `questions` rows (repeats of the real ones), its own 5 fewshot rows
    timed = McqaSet(root=data.root, test={subset: [r for _, r in chosen]}, fewshot={subset: data.fewshot[subset]})
    lengths = [len(tokenizer.encode(build_prompt(r, timed.fewshot[subset], 5))) for r in timed.test[subset]]

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration(medgemma_4b_config())
    torch.set_default_dtype(torch.float32)
    resize_for_tokenizer(model, ROWS, 64)
    model.eval()
    setup = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": model.lm_head.weight.shape[0],
             "cap_gb": CAP_BYTES / 1e9, "model_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
             "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1), "prompt_tokens_max": max(lengths),
             "questions": len(lengths), "max_new_tokens": args.max_new_tokens}
    print(json.dumps(setup), flush=True)
    evaluate_mcqa(model, tokenizer, McqaSet(root=data.root, test={subset: timed.test[subset][:2]}, fewshot=timed.fewshot),
                  shots=5, batch_size=2, max_new_tokens=args.max_new_tokens, progress=False)  # warm-up
    results = []
    plan = [("generate", b) for b in args.batches] + [("model.generate", b) for b in args.baseline_batches]
    plan += [("loglikelihood", b) for b in args.batches]
    prompts = [build_prompt(r, timed.fewshot[subset], 5) for r in timed.test[subset]]
    outputs: dict[tuple[str, int], list[str]] = {}
    for mode, batch in plan:
        run = {"mode": mode, "batch": batch}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            torch.cuda.synchronize()
            started = time.perf_counter()
            if mode == "model.generate":
                texts = generate_baseline(model, tokenizer, prompts, batch, args.max_new_tokens)
            else:
                _, predictions = evaluate_mcqa(model, tokenizer, timed, shots=5, mode=mode, batch_size=batch,
                                               max_new_tokens=args.max_new_tokens, progress=False)
                texts = [p["raw_output"] for p in predictions]
        except torch.OutOfMemoryError:
            results.append({**run, "status": "out of memory under the 24 GB cap"})
            print(json.dumps(results[-1]), flush=True)
            continue
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if mode != "loglikelihood":
            outputs[(mode, batch)] = texts
        results.append({**run, "status": "ok", "seconds": round(seconds, 2),
                        "questions_per_second": round(len(lengths) / seconds, 2),
                        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2)})
        print(json.dumps(results[-1]), flush=True)
    reference = outputs.get(("generate", args.batches[0]))
    agreement = {f"{m} batch {b}": round(sum(x == y for x, y in zip(o, reference)) / len(o), 3)
                 for (m, b), o in outputs.items()} if reference else {}
    print("same greedy output as the evaluator at batch", args.batches[0], json.dumps(agreement))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_generation_gpu.json").write_text(json.dumps(
        {"setup": setup, "runs": results, "output_agreement": agreement}, indent=2) + "\n")
    print(f"{'mode':>14} {'batch':>5} {'q/s':>7} {'peak GB':>8}")
    for r in results:
        print(f"{r['mode']:>14} {r['batch']:>5} {r.get('questions_per_second', '-'):>7} {r.get('peak_allocated_gb', '-'):>8}")


if __name__ == "__main__":
    main()
