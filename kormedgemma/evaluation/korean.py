"""Phase 5: KorMedMCQA accuracy of any model, scored as lm-evaluation-harness scores it.

Three modes, one result format:
- ``generate`` (the harness's ``kormedmcqa`` task, v3.0 in lm_eval 0.4.13): the harness prompt,
  greedy generation up to 1,024 tokens cut at its stop sequences, the answer *extracted* by the
  KorMedMCQA paper's cascade and compared with the gold letter. That is ``accuracy``, the number
  to compare with published ones; the v2.0 score (exact match of the whole cut output) is kept
  beside it as ``exact_match_v2``, for figures published before v3.0.
- ``loglikelihood``: the letter A–E whose continuation ``" X"`` after ``정답：`` the model finds
  most likely. Never fails to answer, so it separates "knows" from "formats the answer".
- ``chat`` (this project's own, no harness task): the same prompt as a user turn of the model's
  chat template, free generation to the end of the turn, the answer read by the same cascade.

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

from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.environment import free_memory
from kormedgemma.core.io import write_json, write_jsonl, write_text
from kormedgemma.core.manifest import write_artifact
from kormedgemma.core.plots import new_figure, saved
from kormedgemma.data.kormedmcqa import (
    LETTERS,
    STOP_SEQUENCES,
    McqaSet,
    build_prompt,
    cut_at_stops,
    extract_choice,
    harness_choice,
    letter,
    read_mcqa_folder,
)
from kormedgemma.evaluation.decoding import greedy_generate, varying_shape_attention
from kormedgemma.evaluation.perplexity import perplexity, read_heldout
from kormedgemma.modeling.base_model import base_model_ref, builds_base, load_for_eval
from kormedgemma.vocab.tokenizer import efficiency_table

Mode = Literal["generate", "loglikelihood", "chat"]
MODES: tuple[str, ...] = ("generate", "loglikelihood", "chat")
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"


def chat_prompt(tokenizer: Any, text: str) -> str:
    """`text` as one user turn, ready for the model's answer (the harness's --apply_chat_template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat mode needs a tokenizer with a chat template; this one has none (use --mode generate)")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- generation
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   stop_strings: Sequence[str] = (), batch_size: int = 8, add_special_tokens: bool = True,
                   max_length: Optional[int] = None, desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy continuations of `prompts` (`decoding.greedy_generate`: finished rows leave the batch)."""
    return greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                           batch_size=batch_size, add_special_tokens=add_special_tokens, max_length=max_length,
                           desc=desc, progress=progress).texts


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
    with tqdm(total=len(inputs), desc=desc, unit="seq", disable=not progress) as bar, varying_shape_attention(device):
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
# lm-evaluation-harness's `kormedmcqa` task as this module reproduces it (its `max_gen_toks`).
TASK_VERSION = "3.0"
MAX_GEN_TOKS = 1024


def evaluate_mcqa(model: Any, tokenizer: Any, data: McqaSet, *, shots: int = 0, mode: Mode = "generate",
                  batch_size: int = 8, max_new_tokens: int = MAX_GEN_TOKS, chat_max_new_tokens: int = 256,
                  max_length: Optional[int] = None, progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results, predictions) of `model` on every test question of `data`.

    `max_length` is the context the harness would give the model (default: the model's own, as
    the harness resolves it); prompts longer than it minus the generation cap keep their last
    tokens, and the count is in the results."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    check_shots(data, shots)
    items = [(subset, row) for subset, rows in data.test.items() for row in rows]
    prompts = [build_prompt(row, data.fewshot.get(subset, []), shots) for subset, row in items]
    started = time.perf_counter()
    truncated: set[int] = set()
    v2: list[Optional[str]] = [None] * len(items)
    chat = mode == "chat"
    if mode == "loglikelihood":
        scores = choice_logprobs(model, tokenizer, prompts, [[f" {x}" for x in LETTERS]] * len(prompts),
                                 batch_size=batch_size, desc=f"{shots}-shot log-likelihood", progress=progress)
        chosen = [LETTERS[max(range(len(LETTERS)), key=s.__getitem__)] for s in scores]
        raw = [json.dumps(dict(zip(LETTERS, (round(v, 4) for v in s)))) for s in scores]
    else:
        run = greedy_generate(model, tokenizer, [chat_prompt(tokenizer, p) for p in prompts] if chat else prompts,
                              max_new_tokens=chat_max_new_tokens if chat else max_new_tokens,
                              stop_strings=() if chat else STOP_SEQUENCES, batch_size=batch_size,
                              add_special_tokens=not chat, max_length=max_length,
                              desc=f"{shots}-shot {mode}", progress=progress)
        truncated = set(run.truncated)
        raw = [o.strip() for o in run.texts] if chat else [cut_at_stops(o) for o in run.texts]
        chosen = [extract_choice(r) for r in raw]
        if not chat:
            v2 = [harness_choice(r) for r in raw]
    seconds = time.perf_counter() - started
    predictions = [{"subject": subset, "question": row["question"], "gold": letter(row["answer"]),
                    "prediction": pick, "exact_match_v2": v2_pick, "truncated": k in truncated, "raw_output": text}
                   for k, ((subset, row), pick, v2_pick, text) in enumerate(zip(items, chosen, v2, raw))]
    results = summarize(predictions, subsets=list(data.test))
    results.update({"mode": mode, "shots": shots, "task": TASKS[mode], "scoring": SCORING[mode],
                    "data": str(data.root), "bad_rows": data.bad_rows, "bad_row_count": len(data.bad_rows),
                    "max_new_tokens": max_new_tokens if mode == "generate" else chat_max_new_tokens if chat else None,
                    "seconds": round(seconds, 2), "questions_per_second": round(len(items) / max(seconds, 1e-9), 3),
                    "seconds_per_100_questions": round(100 * seconds / max(len(items), 1), 2)})
    if truncated:
        results["warnings"] = [f"{len(truncated)} of {len(items)} prompts were longer than the model's context "
                               f"minus {results['max_new_tokens']} new tokens and kept only their last tokens "
                               "(lm-evaluation-harness's rule)"]
    return results, predictions


def check_shots(data: McqaSet, shots: int) -> None:
    """Fail before any model loads when a subset has fewer fewshot rows than asked for."""
    for subset in data.test:
        have = len(data.fewshot.get(subset, []))
        if shots > have:
            where = data.root / subset / "fewshot.jsonl"
            raise ValueError(f"{shots}-shot needs {shots} usable rows in {where}, it has {have}: add them or use --shots 0")


TASKS = {
    "generate": f"lm-evaluation-harness kormedmcqa v{TASK_VERSION}",
    "loglikelihood": "project's own (log-likelihood of the answer letter; not a harness task)",
    "chat": "project's own (chat template; not a harness task)",
}
SCORING = {
    "generate": "greedy generation up to max_new_tokens cut at the harness's stop sequences; accuracy: the "
                "answer extracted by the KorMedMCQA paper's cascade (Appendix B, last match) equals the gold "
                "letter (v3.0); exact_match_v2: the whole cut output equals it ignoring spaces, newlines, case "
                "and ASCII punctuation (v2.0)",
    "loglikelihood": "argmax over A–E of log P(' X' | prompt)",
    "chat": "chat template, generation to the end of the turn, the same answer extraction",
}
CHANCE = 1 / len(LETTERS)


def _fraction(hits: int, n: int) -> Optional[float]:
    return round(hits / n, 4) if n else None


def _figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    correct = sum(p["prediction"] == p["gold"] for p in rows)
    scored_v2 = [p for p in rows if p.get("exact_match_v2") is not None]
    return {"n": n, "correct": correct, "accuracy": _fraction(correct, n),
            "exact_match_v2": _fraction(sum(p["exact_match_v2"] == p["gold"] for p in scored_v2), n)
            if scored_v2 else None,
            "unanswered": sum(p["prediction"] == "" for p in rows),
            "truncated": sum(bool(p.get("truncated")) for p in rows)}


def summarize(predictions: Sequence[dict[str, Any]], subsets: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Accuracy per subset and overall (micro, as the harness's group weights by size; macro
    beside it), from prediction rows only."""
    names = list(subsets) if subsets else sorted({p["subject"] for p in predictions})
    table = {name: _figures([p for p in predictions if p["subject"] == name]) for name in names}
    overall = _figures(predictions)
    scored = [t["accuracy"] for t in table.values() if t["accuracy"] is not None]
    overall["macro_accuracy"] = round(sum(scored) / len(scored), 4) if scored else None
    accuracy = overall["accuracy"]
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

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / PREDICTIONS_FILE, predictions)
    write_json(out_dir / RESULTS_FILE, results)
    return out_dir / RESULTS_FILE


def run_evaluation(model_ref: str, data_dir: Path, out_dir: Path, *, shots: int = 0, mode: Mode = "generate",
                   batch_size: int = 8, max_new_tokens: int = MAX_GEN_TOKS, chat_max_new_tokens: int = 256,
                   max_length: Optional[int] = None, max_questions: Optional[int] = None,
                   subsets: Optional[Sequence[str]] = None, device: Optional[str] = None,
                   dtype: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """`python -m kormedgemma evaluate`: any model on any KorMedMCQA-schema folder, written to `out_dir`."""

    data = read_mcqa_folder(Path(data_dir), subsets=subsets, max_questions=max_questions)
    check_shots(data, shots)
    model, tokenizer = load_for_eval(model_ref, device=device, dtype=dtype)
    results, predictions = evaluate_mcqa(model, tokenizer, data, shots=shots, mode=mode, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, chat_max_new_tokens=chat_max_new_tokens,
                                         max_length=max_length, progress=progress)
    results["model"] = str(model_ref)
    write_results(Path(out_dir), results, predictions)
    return results


def evaluate_with(model: Any, tokenizer: Any, data: McqaSet, spec: Any, shots: int, mode: Mode,
                  progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`evaluate_mcqa` with the `evaluation` config's batch size, token caps and context length:
    the one place pipeline steps (5.01, 6.01) turn config into evaluator settings."""
    return evaluate_mcqa(model, tokenizer, data, shots=shots, mode=mode, batch_size=spec.batch_size,
                         max_new_tokens=spec.max_new_tokens, chat_max_new_tokens=spec.chat_max_new_tokens,
                         max_length=spec.max_length, progress=progress)


# --------------------------------------------------------------------------- phase 5.01: the artifact
def korean_models(config: Any) -> dict[str, str]:
    """The three models notebook 5.01 compares: base MedGemma, after stage 7, instruction-tuned."""

    return {"base": base_model_ref(config),
            "stage7": str(require(config, "merged_model")), "instruct": str(require(config, "instruct_model"))}


def evaluate_korean(config: Any, progress: bool = True) -> Path:
    """5.01: KorMedMCQA per subset for each model and shot count, Korean bits per character and
    tokenizer efficiency, written to models/final/eval/korean/ (results.json, report.md, plots,
    and each run's predictions under runs/)."""

    spec = config.evaluation
    inputs = {key: require(config, key) for key in ("merged_model", "instruct_model", "kormedmcqa", "korean",
                                                    "token_store")}
    if builds_base(config):
        inputs["base_model"] = require(config, "base_model")
    data = read_mcqa_folder(inputs["kormedmcqa"], subsets=config.data.kormedmcqa.subsets,
                            max_questions=spec.max_questions)
    for shots in {*spec.shots, *spec.loglikelihood_shots}:
        check_shots(data, shots)
    heldout = read_heldout(inputs["korean"], spec.perplexity_max_texts, inputs["token_store"], "korean")
    plan = [(label, spec.mode, shots) for label in ("base", "stage7", "instruct") for shots in spec.shots]
    plan += [(label, "loglikelihood", shots) for label in ("base", "stage7", "instruct")
             for shots in spec.loglikelihood_shots if (label, "loglikelihood", shots) not in plan]
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
        warnings += [f"{r['name']}: {w}" for r in runs for w in r.get("warnings", [])]
        summary = {"models": models, "runs": [_run_summary(r) for r in runs], "perplexity": ppl,
                   "tokenizer_efficiency": efficiency, "bad_rows": data.bad_rows, "warnings": warnings}
        write_json(out.path / "results.json", summary)
        plot_accuracy(summary, out.path / "accuracy.png")
        write_text(out.path / "report.md", korean_report(summary))
        out.metrics.update({"task": TASKS["generate"],
                            "accuracy": {r["name"]: r["overall"]["accuracy"] for r in summary["runs"]},
                            "exact_match_v2": {r["name"]: r["overall"]["exact_match_v2"] for r in summary["runs"]
                                               if r["overall"]["exact_match_v2"] is not None},
                            "bits_per_char": {k: v["bits_per_char"] for k, v in ppl.items()},
                            "questions": data.questions, "bad_rows": len(data.bad_rows), "warnings": warnings})
    return artifact_path(config, "eval_korean")


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("name", "model", "mode", "task", "shots", "subsets", "overall", "at_or_below_chance",
                                "max_new_tokens", "seconds", "questions_per_second", "seconds_per_100_questions")}


def accuracy_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run: accuracy per subset and overall (what the notebook shows). For the
    harness task, `overall` is its v3.0 score and `v2.0 EM` the exact match it replaced."""
    rows = []
    for run in summary["runs"]:
        row: dict[str, Any] = {"model": run["model"], "mode": run["mode"], "shots": run["shots"]}
        row.update({subset: figures["accuracy"] for subset, figures in run["subsets"].items()})
        row.update({"overall": run["overall"]["accuracy"], "v2.0 EM": run["overall"]["exact_match_v2"],
                    "unanswered": run["overall"]["unanswered"], "truncated": run["overall"]["truncated"],
                    "q/s": run["questions_per_second"]})
        rows.append(row)
    return rows


# The scoring modes told apart in the accuracy plot (generate: plain bars).
HATCHES = {"chat": "//", "loglikelihood": ".."}


def plot_accuracy(summary: dict[str, Any], path: Optional[Path] = None) -> Any:
    """Bars per subset (and overall) for every run; chance (20%) dashed."""

    runs = summary["runs"]
    groups = list(runs[0]["subsets"]) + ["overall"]
    figure = new_figure((max(6.0, 1.4 * len(groups) + 2), 3.6))
    ax = figure.subplots()
    width = 0.8 / len(runs)
    colours = {"base": "0.6", "stage7": "tab:orange", "instruct": "tab:blue"}
    for k, run in enumerate(runs):
        values = [run["subsets"][g]["accuracy"] if g != "overall" else run["overall"]["accuracy"] for g in groups]
        shade = 0.55 + 0.45 * (run["shots"] == 0) if run["mode"] != "chat" else 1.0
        ax.bar([x - 0.4 + width * (k + 0.5) for x in range(len(groups))], [v or 0 for v in values], width=width,
               color=colours.get(run["model"], "tab:green"), alpha=shade, hatch=HATCHES.get(run["mode"]),
               label=f"{run['model']} {run['shots']}-shot{'' if run['mode'] == 'generate' else ' ' + run['mode']}")
    ax.axhline(CHANCE, ls="--", lw=0.8, color="tab:red", label="chance")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("KorMedMCQA accuracy")
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return saved(figure, path)


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
    parts += ["## KorMedMCQA accuracy", "",
              f"`generate` rows are lm-evaluation-harness's `kormedmcqa` task v{TASK_VERSION} (lm_eval 0.4.13): "
              "`overall` is its score (the answer extracted from up to "
              f"{MAX_GEN_TOKS} generated tokens cut at its stop sequences), the number to compare with published "
              "figures; `v2.0 EM` is the exact match of the whole cut output that v2.0 reported. `chat` rows are this "
              "project's own protocol. `truncated` counts prompts cut to the model's context (the harness's rule).",
              "", _markdown(accuracy_table(summary)), "", "![accuracy](accuracy.png)", "",
              "## Korean held-out text", "", "Bits per character compare across tokenizers; per-token perplexity does not.",
              "", _markdown(ppl_rows), "", "## Tokenizer efficiency", "", _markdown(summary["tokenizer_efficiency"]), ""]
    if summary["bad_rows"]:
        parts += [f"{len(summary['bad_rows'])} bad rows were skipped: {summary['bad_rows'][:5]}", ""]
    return "\n".join(parts)


def korean_eval_headline(metrics: dict[str, Any]) -> str:
    """5.01's line: every run's accuracy, v2.0's exact match beside it, Korean bits/char, warnings."""
    accuracy = ", ".join(f"{name} {value:.1%}" for name, value in (metrics.get("accuracy") or {}).items()
                         if value is not None)
    v2 = ", ".join(f"{name} {value:.1%}" for name, value in (metrics.get("exact_match_v2") or {}).items())
    warn = f"; ⚠ {len(metrics['warnings'])} warning(s): {metrics['warnings'][0]}" if metrics.get("warnings") else ""
    return (f"KorMedMCQA ({metrics.get('task', 'lm-evaluation-harness kormedmcqa')}) {accuracy}"
            + (f"; v2.0 exact match {v2}" if v2 else "") + f"; Korean bits/char {metrics.get('bits_per_char')}{warn}")
