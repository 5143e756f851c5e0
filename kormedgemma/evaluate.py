"""Phase 5: KorMedMCQA accuracy of any model, scored as lm-evaluation-harness scores it.

Three modes, one result format:
- ``generate`` (the harness's): the harness prompt, greedy generation cut at its stop
  sequences, exact match (`kormedgemma.harness`). The number to compare with published ones.
- ``loglikelihood``: the letter A–E whose continuation ``" X"`` after ``정답：`` the model finds
  most likely. Never fails to answer, so it separates "knows" from "formats the answer".
- ``chat``: the same prompt as a user turn of the model's chat template, free generation up to
  the end of the turn, the answer read with the KorMedMCQA paper's extraction cascade: what an
  instruction-tuned model that reasons before answering expects.

`predictions.jsonl` holds one row per question and `results.json` is computed from those rows
alone (`summarize`), so anyone can recompute every figure from the predictions.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch

from kormedgemma.base_model import load_for_eval
from kormedgemma.harness import (LETTERS, STOP_SEQUENCES, McqaSet, build_prompt, cut_at_stops, extract_choice,
                                 harness_choice, letter)

Mode = Literal["generate", "loglikelihood", "chat"]
MODES: tuple[str, ...] = ("generate", "loglikelihood", "chat")
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-sequence ids: `<eos>` and, for chat models, `<end_of_turn>` (Gemma's turn end)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn_end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id and turn_end not in ids:
        ids.append(turn_end)
    return ids


def chat_prompt(tokenizer: Any, text: str) -> str:
    """`text` as one user turn, ready for the model's answer (the harness's --apply_chat_template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat mode needs a tokenizer with a chat template; this one has none (use --mode generate)")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- generation
class MaskRowsPast:
    """Logits processor: rows past the tokenizer (the embedding matrix is padded to a multiple of
    64) are never generated — no text decodes from them, and stop-string matching indexes a
    table by token id. A slice, not `suppress_tokens`' per-step membership test."""

    def __init__(self, first_unused: int) -> None:
        self.first_unused = first_unused

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.first_unused:
            scores[:, self.first_unused:] = -math.inf
        return scores


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   stop_strings: Sequence[str] = (), batch_size: int = 8, add_special_tokens: bool = True,
                   static_cache: bool = False, desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy continuations of `prompts`, batched longest-first with left padding.

    `static_cache` makes transformers compile the decoding step (CUDA). Measured at MedGemma-4B
    shape: 2-3.5× faster on one fixed batch, but 4% end to end over batches of varying prompt
    length (benchmarks/results/eval_generation_gpu_h100.json), so it is an option, not the default.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    lengths = [len(tokenizer.encode(p, add_special_tokens=add_special_tokens)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id, stop_strings=list(stop_strings) or None,
                                cache_implementation="static" if static_cache else None)
    processors = LogitsProcessorList([MaskRowsPast(len(tokenizer))])
    outputs: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                batch = tokenizer([prompts[i] for i in chosen], return_tensors="pt", padding=True,
                                  add_special_tokens=add_special_tokens).to(device)
                generated = model.generate(**batch, generation_config=settings, tokenizer=tokenizer,
                                           logits_processor=processors)
                new = generated[:, batch["input_ids"].shape[1]:]
                for i, ids in zip(chosen, new):
                    outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
                bar.update(len(chosen))
    finally:
        tokenizer.padding_side = side
    return outputs


# --------------------------------------------------------------------------- log-likelihood
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: encode context+continuation whole, the continuation is what follows
    the context's own encoding (trailing context spaces move to the continuation first)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    return head, whole[len(head):]


@torch.no_grad()
def choice_logprobs(model: Any, tokenizer: Any, contexts: Sequence[str], choices: Sequence[Sequence[str]],
                    batch_size: int = 8, desc: str = "log-likelihood", progress: bool = True) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens after its context.

    Requests sharing one input (every single-token choice of a question) run once; batches are
    left-padded with explicit positions so only the last few positions' logits are computed —
    a 272K-row vocabulary times a 5-shot prompt would not fit otherwise.
    """
    from tqdm.auto import tqdm

    requests: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
    for q, (context, options) in enumerate(zip(contexts, choices)):
        for c, option in enumerate(options):
            head, tail = encode_pair(tokenizer, context, option)
            if not tail:
                raise ValueError(f"choice {option!r} adds no token after its context")
            requests.setdefault(tuple(head + tail[:-1]), []).append((q, c, tail))
    scores = [[-math.inf] * len(options) for options in choices]
    device = next(model.parameters()).device
    inputs = sorted(requests, key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with tqdm(total=len(inputs), desc=desc, unit="seq", disable=not progress) as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            width = max(len(x) for x in chunk)
            keep = max(len(tail) for x in chunk for _, _, tail in requests[x])
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, x in enumerate(chunk):
                ids[row, width - len(x):] = torch.tensor(x)
                mask[row, width - len(x):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           logits_to_keep=keep, use_cache=False).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, x in enumerate(chunk):
                for q, c, tail in requests[x]:
                    picked = logprobs[row, keep - len(tail):, :].gather(-1, torch.tensor(tail, device=device)[:, None])
                    scores[q][c] = float(picked.sum())
            bar.update(len(chunk))
    return scores


# --------------------------------------------------------------------------- KorMedMCQA
def evaluate_mcqa(model: Any, tokenizer: Any, data: McqaSet, *, shots: int = 0, mode: Mode = "generate",
                  batch_size: int = 8, max_new_tokens: int = 16, chat_max_new_tokens: int = 256,
                  static_cache: bool = False, progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results, predictions) of `model` on every test question of `data`."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    check_shots(data, shots)
    items = [(subset, row) for subset, rows in data.test.items() for row in rows]
    prompts = [build_prompt(row, data.fewshot.get(subset, []), shots) for subset, row in items]
    started = time.perf_counter()
    if mode == "loglikelihood":
        scores = choice_logprobs(model, tokenizer, prompts, [[f" {x}" for x in LETTERS]] * len(prompts),
                                 batch_size=batch_size, desc=f"{shots}-shot log-likelihood", progress=progress)
        chosen = [LETTERS[max(range(len(LETTERS)), key=s.__getitem__)] for s in scores]
        raw = [json.dumps(dict(zip(LETTERS, (round(v, 4) for v in s)))) for s in scores]
        extracted = chosen
    elif mode == "generate":
        outputs = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=STOP_SEQUENCES,
                                 batch_size=batch_size, static_cache=static_cache, desc=f"{shots}-shot generate",
                                 progress=progress)
        raw = [cut_at_stops(o) for o in outputs]
        chosen = [harness_choice(r) for r in raw]
        extracted = [extract_choice(r) for r in raw]
    else:
        rendered = [chat_prompt(tokenizer, p) for p in prompts]
        outputs = generate_texts(model, tokenizer, rendered, max_new_tokens=chat_max_new_tokens, batch_size=batch_size,
                                 add_special_tokens=False, static_cache=static_cache, desc=f"{shots}-shot chat",
                                 progress=progress)
        raw = [o.strip() for o in outputs]
        chosen = [extract_choice(r) for r in raw]
        extracted = chosen
    seconds = time.perf_counter() - started
    predictions = [{"subject": subset, "question": row["question"], "gold": letter(row["answer"]),
                    "prediction": pick, "extracted": pulled, "raw_output": text}
                   for (subset, row), pick, pulled, text in zip(items, chosen, extracted, raw)]
    results = summarize(predictions, subsets=list(data.test))
    results.update({"mode": mode, "shots": shots, "scoring": SCORING[mode], "data": str(data.root),
                    "bad_rows": data.bad_rows, "bad_row_count": len(data.bad_rows), "seconds": round(seconds, 2),
                    "seconds_per_100_questions": round(100 * seconds / max(len(items), 1), 2)})
    return results, predictions


def check_shots(data: McqaSet, shots: int) -> None:
    """Fail before any model loads when a subset has fewer fewshot rows than asked for."""
    for subset in data.test:
        have = len(data.fewshot.get(subset, []))
        if shots > have:
            where = data.root / subset / "fewshot.jsonl"
            raise ValueError(f"{shots}-shot needs {shots} usable rows in {where}, it has {have}: add them or use --shots 0")


SCORING = {
    "generate": "lm-evaluation-harness kormedmcqa: greedy generation cut at its stop sequences, exact match "
                "ignoring spaces, newlines, case and ASCII punctuation",
    "loglikelihood": "argmax over A–E of log P(' X' | prompt)",
    "chat": "chat template, generation to the end of the turn, KorMedMCQA paper answer extraction (Appendix B)",
}
CHANCE = 1 / len(LETTERS)


def summarize(predictions: Sequence[dict[str, Any]], subsets: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Accuracy per subset and overall, from prediction rows only."""
    names = list(subsets) if subsets else sorted({p["subject"] for p in predictions})
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [p for p in predictions if p["subject"] == name]
        correct = sum(p["prediction"] == p["gold"] for p in rows)
        table[name] = {"n": len(rows), "correct": correct,
                       "accuracy": round(correct / len(rows), 4) if rows else None,
                       "extracted_accuracy": round(sum(p["extracted"] == p["gold"] for p in rows) / len(rows), 4) if rows else None,
                       "unanswered": sum(p["prediction"] == "" for p in rows)}
    n = len(predictions)
    correct = sum(p["prediction"] == p["gold"] for p in predictions)
    accuracy = round(correct / n, 4) if n else None
    scored = [t["accuracy"] for t in table.values() if t["accuracy"] is not None]
    overall = {"n": n, "correct": correct, "accuracy": accuracy,
               "macro_accuracy": round(sum(scored) / len(scored), 4) if scored else None,
               "extracted_accuracy": round(sum(p["extracted"] == p["gold"] for p in predictions) / n, 4) if n else None,
               "unanswered": sum(p["prediction"] == "" for p in predictions)}
    return {"subsets": table, "overall": overall, "chance": CHANCE,
            "at_or_below_chance": accuracy is not None and accuracy <= CHANCE}


def chance_warning(results: dict[str, Any], name: str = "model") -> Optional[str]:
    """The loud line a report must carry when a model scores at or below guessing."""
    overall = results["overall"]
    if not results.get("at_or_below_chance"):
        return None
    return (f"WARNING: {name} scores {overall['accuracy']:.1%} on {overall['n']} questions, at or below chance "
            f"({results['chance']:.0%} for five options); {overall['unanswered']} answers were not a letter A–E. "
            "Check the prompt, the tokenizer/model pairing and predictions.jsonl before trusting any comparison.")


def write_results(out_dir: Path, results: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> Path:
    """predictions.jsonl, then results.json (each written whole, then renamed into place)."""
    from kormedgemma.io import write_json, write_jsonl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / PREDICTIONS_FILE, predictions)
    write_json(out_dir / RESULTS_FILE, results)
    return out_dir / RESULTS_FILE


def run_evaluation(model_ref: str, data_dir: Path, out_dir: Path, *, shots: int = 0, mode: Mode = "generate",
                   batch_size: int = 8, max_new_tokens: int = 16, chat_max_new_tokens: int = 256,
                   max_questions: Optional[int] = None, subsets: Optional[Sequence[str]] = None,
                   device: Optional[str] = None, dtype: Optional[str] = None, static_cache: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """`python -m kormedgemma evaluate`: any model on any KorMedMCQA-schema folder, written to `out_dir`."""
    from kormedgemma.harness import read_mcqa_folder

    data = read_mcqa_folder(Path(data_dir), subsets=subsets, max_questions=max_questions)
    check_shots(data, shots)
    model, tokenizer = load_for_eval(model_ref, device=device, dtype=dtype)
    results, predictions = evaluate_mcqa(model, tokenizer, data, shots=shots, mode=mode, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, chat_max_new_tokens=chat_max_new_tokens,
                                         static_cache=static_cache, progress=progress)
    results["model"] = str(model_ref)
    write_results(Path(out_dir), results, predictions)
    return results


def evaluate_with(model: Any, tokenizer: Any, data: McqaSet, spec: Any, shots: int, mode: Mode,
                  progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`evaluate_mcqa` with the `evaluation` config's batch size, token caps and static-cache
    switch: the one place pipeline steps (5.01, 6.01) turn config into evaluator settings."""
    return evaluate_mcqa(model, tokenizer, data, shots=shots, mode=mode, batch_size=spec.batch_size,
                         max_new_tokens=spec.max_new_tokens, chat_max_new_tokens=spec.chat_max_new_tokens,
                         static_cache=spec.static_cache and torch.cuda.is_available(), progress=progress)


# --------------------------------------------------------------------------- phase 5.01: the artifact
def korean_models(config: Any) -> dict[str, str]:
    """The three models notebook 5.01 compares: base MedGemma, after stage 7, instruction-tuned."""
    from kormedgemma.artifacts import require
    from kormedgemma.hub import model_ref

    return {"base": model_ref(config, config.base.model, "base.model"),
            "stage7": str(require(config, "merged_model")), "instruct": str(require(config, "instruct_model"))}


def evaluate_korean(config: Any, progress: bool = True) -> Path:
    """5.01: KorMedMCQA per subset for each model and shot count, Korean bits per character and
    tokenizer efficiency, written to models/final/eval/korean/ (results.json, report.md, plots,
    and each run's predictions under runs/)."""
    from kormedgemma.artifacts import artifact_path, require
    from kormedgemma.environment import free_memory
    from kormedgemma.harness import read_mcqa_folder
    from kormedgemma.io import write_json, write_text
    from kormedgemma.manifest import write_artifact
    from kormedgemma.perplexity import perplexity, read_heldout
    from kormedgemma.tokenizer import efficiency_table

    spec = config.evaluation
    inputs = {key: require(config, key) for key in ("merged_model", "instruct_model", "kormedmcqa", "korean",
                                                    "token_store")}
    if config.base.build_tiny:
        inputs["base_model"] = require(config, "base_model")
    data = read_mcqa_folder(inputs["kormedmcqa"], subsets=config.data.kormedmcqa.subsets,
                            max_questions=spec.max_questions)
    for shots in spec.shots:
        check_shots(data, shots)
    heldout = read_heldout(inputs["korean"], spec.perplexity_max_texts, inputs["token_store"], "korean")
    plan = [(label, spec.mode, shots) for label in ("base", "stage7", "instruct") for shots in spec.shots]
    if spec.mode != "chat":
        plan.append(("instruct", "chat", 0))
    models = korean_models(config)
    runs: list[dict[str, Any]] = []
    ppl: dict[str, Any] = {}
    tokenizers: dict[str, Any] = {}
    keys = ["evaluation", "base.model", "data.kormedmcqa.subsets"]
    with write_artifact(artifact_path(config, "eval_korean"), "5.01", config, keys, inputs) as out:
        for label, ref in models.items():
            model, tokenizer = load_for_eval(ref)
            tokenizers[label] = tokenizer
            for _, mode, shots in [p for p in plan if p[0] == label]:
                results, predictions = evaluate_with(model, tokenizer, data, spec, shots, mode, progress)
                results["model"] = ref
                name = f"{label}_{mode}_{shots}shot"
                write_results(out.path / "runs" / name, results, predictions)
                runs.append({**results, "name": name, "model": label, "ref": ref})
            ppl[label] = perplexity(model, tokenizer, heldout, spec.perplexity_seq_len, spec.batch_size, progress,
                                    desc=f"{label} Korean perplexity")
            del model
            free_memory()
        efficiency = efficiency_table({"base": tokenizers["base"], "expanded": tokenizers["instruct"]},
                                      {"korean valid": heldout.texts})
        warnings = [w for w in (chance_warning(r, r["name"]) for r in runs) if w]
        summary = {"models": models, "runs": [_run_summary(r) for r in runs], "perplexity": ppl,
                   "tokenizer_efficiency": efficiency, "bad_rows": data.bad_rows, "warnings": warnings}
        write_json(out.path / "results.json", summary)
        plot_accuracy(summary, out.path / "accuracy.png")
        write_text(out.path / "report.md", korean_report(summary))
        out.metrics.update({"accuracy": {r["name"]: r["overall"]["accuracy"] for r in summary["runs"]},
                            "bits_per_char": {k: v["bits_per_char"] for k, v in ppl.items()},
                            "questions": data.questions, "bad_rows": len(data.bad_rows), "warnings": warnings})
    return artifact_path(config, "eval_korean")


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("name", "model", "mode", "shots", "subsets", "overall", "at_or_below_chance",
                                "seconds", "seconds_per_100_questions")}


def accuracy_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run: accuracy per subset and overall (what the notebook shows)."""
    rows = []
    for run in summary["runs"]:
        row: dict[str, Any] = {"model": run["model"], "mode": run["mode"], "shots": run["shots"]}
        row.update({subset: figures["accuracy"] for subset, figures in run["subsets"].items()})
        row.update({"overall": run["overall"]["accuracy"], "extracted": run["overall"]["extracted_accuracy"],
                    "unanswered": run["overall"]["unanswered"], "s/100 q": run["seconds_per_100_questions"]})
        rows.append(row)
    return rows


def plot_accuracy(summary: dict[str, Any], path: Optional[Path] = None) -> Any:
    """Bars per subset (and overall) for every run; chance (20%) dashed."""
    from matplotlib.figure import Figure

    runs = summary["runs"]
    groups = list(runs[0]["subsets"]) + ["overall"]
    figure = Figure(figsize=(max(6.0, 1.4 * len(groups) + 2), 3.6))
    ax = figure.subplots()
    width = 0.8 / len(runs)
    colours = {"base": "0.6", "stage7": "tab:orange", "instruct": "tab:blue"}
    for k, run in enumerate(runs):
        values = [run["subsets"][g]["accuracy"] if g != "overall" else run["overall"]["accuracy"] for g in groups]
        shade = 0.55 + 0.45 * (run["shots"] == 0) if run["mode"] != "chat" else 1.0
        ax.bar([x - 0.4 + width * (k + 0.5) for x in range(len(groups))], [v or 0 for v in values], width=width,
               color=colours.get(run["model"], "tab:green"), alpha=shade, hatch="//" if run["mode"] == "chat" else None,
               label=f"{run['model']} {run['shots']}-shot{' chat' if run['mode'] == 'chat' else ''}")
    ax.axhline(CHANCE, ls="--", lw=0.8, color="tab:red", label="chance")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("KorMedMCQA accuracy")
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if r.get(h) is None else str(r.get(h)) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def korean_report(summary: dict[str, Any]) -> str:
    ppl_rows = [{"model": k, **v} for k, v in summary["perplexity"].items()]
    parts = ["# Korean evaluation (phase 5.01)", ""]
    parts += [f"> {w}" for w in summary["warnings"]] + ([""] if summary["warnings"] else [])
    parts += ["## KorMedMCQA accuracy", "", _markdown(accuracy_table(summary)), "", "![accuracy](accuracy.png)", "",
              "## Korean held-out text", "", "Bits per character compare across tokenizers; per-token perplexity does not.",
              "", _markdown(ppl_rows), "", "## Tokenizer efficiency", "", _markdown(summary["tokenizer_efficiency"]), ""]
    if summary["bad_rows"]:
        parts += [f"{len(summary['bad_rows'])} bad rows were skipped: {summary['bad_rows'][:5]}", ""]
    return "\n".join(parts)
