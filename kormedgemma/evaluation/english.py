"""English medical retention: did teaching Korean cost MedGemma its English medicine?

Three benchmarks, each scored 0-shot by log-likelihood of the answer label, with the prompts of
lm-evaluation-harness's `medqa_4options`, `mmlu_*` and `pubmedqa` tasks (`kormedgemma parity`
renders a known row with the installed harness and checks the strings are equal). They are read
from a local folder (`evaluation.english_local_path`: `<name>.jsonl` rows of `question`,
`choices`, `answer` index, optional `context` (PubMedQA's abstract sections joined by newlines, as
the harness joins them) and `subject`) or from the Hub: MedQA from the harness's own dataset;
PubMedQA's 1,000 labelled questions from `qiaojin/PubMedQA`, because the harness's
`bigbio/pubmed_qa` (its 500-question fold-0 test split) is a loading script that current
`datasets` no longer runs. A drop of more than `evaluation.retention_tolerance` against the
base model is flagged, and so is English bits per character on held-out text rising more than
`evaluation.english_bits_tolerance`: a small model answers the benchmarks near chance, and its
forgetting shows in the text first.
"""
from __future__ import annotations

# The project modules this one uses are imported inside the functions that need them: at the top
# they would take its import from 0.08 s to 2.4 s (measured; docs/ARCHITECTURE.md).
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kormedgemma.core.config import ProjectConfig

LETTERS = "ABCD"
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    hub_id: str
    hub_configs: tuple[Optional[str], ...]
    split: str
    convert: Callable[[dict[str, Any], Optional[str]], dict[str, Any]]  # Hub row → project schema


def _medqa(row: dict[str, Any], _: Optional[str]) -> dict[str, Any]:
    return {"question": row["sent1"], "choices": [row[f"ending{i}"] for i in range(4)], "answer": int(row["label"])}


def _mmlu(row: dict[str, Any], subject: Optional[str]) -> dict[str, Any]:
    return {"question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"]), "subject": subject}


def _pubmedqa(row: dict[str, Any], _: Optional[str]) -> dict[str, Any]:
    labels = ["yes", "no", "maybe"]
    return {"question": row["question"], "context": "\n".join(row["context"]["contexts"]), "choices": labels,
            "answer": labels.index(row["final_decision"])}


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("medqa", "MedQA (USMLE, 4 options)", "GBaker/MedQA-USMLE-4-options-hf", (None,), "test", _medqa),
    Benchmark("mmlu_medical", "MMLU medical subsets", "cais/mmlu", MMLU_MEDICAL, "test", _mmlu),
    Benchmark("pubmedqa", "PubMedQA (labelled)", "qiaojin/PubMedQA", ("pqa_labeled",), "train", _pubmedqa),
]}


def prompt_and_choices(name: str, row: dict[str, Any]) -> tuple[str, list[str]]:
    """The harness's context and continuations for one row."""
    if name == "pubmedqa":
        return f"Abstract: {row['context']}\nQuestion: {row['question']}\nAnswer:", [f" {c}" for c in row["choices"]]
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    if name == "medqa":
        return f"Question: {row['question']}{options}\nAnswer:", [f" {LETTERS[i]}" for i in range(len(row["choices"]))]
    subject = str(row.get("subject") or "medicine").replace("_", " ")
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{row['question'].strip()}{options}\nAnswer:", [f" {LETTERS[i]}" for i in range(len(row["choices"]))])


def _valid(row: dict[str, Any]) -> Optional[str]:
    choices = row.get("choices")
    if not str(row.get("question") or "").strip():
        return "empty question"
    if not isinstance(choices, list) or len(choices) < 2 or any(not str(c).strip() for c in choices):
        return "choices must be a list of ≥ 2 non-empty options"
    answer = row.get("answer")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f"answer {answer!r} is not an index into the choices"
    return None


def load_benchmark(config: ProjectConfig, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, bad rows) of one benchmark: the local file when configured, else the Hub."""
    from kormedgemma.core.config import resolve_input
    from kormedgemma.core.hub import hub_access
    from kormedgemma.core.io import read_jsonl

    spec, cap = config.evaluation, config.evaluation.english_max_questions
    if name not in BENCHMARKS:
        raise ValueError(f"unknown English benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    raw: list[dict[str, Any]] = []
    if spec.english_local_path:
        file = resolve_input(config, spec.english_local_path) / f"{name}.jsonl"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: evaluation.english_local_path must hold {name}.jsonl "
                                    "(or set it to null to read the benchmark from the Hub)")
        raw = list(read_jsonl(file))
    else:
        bench = BENCHMARKS[name]
        with hub_access(f"{bench.title} ({bench.hub_id})",
                        "Set evaluation.english_local_path to a folder of <benchmark>.jsonl files."):
            from datasets import load_dataset

            for subset in bench.hub_configs:
                for row in load_dataset(bench.hub_id, subset, split=bench.split):
                    raw.append(bench.convert(dict(row), subset))
    rows, bad = [], []
    for number, row in enumerate(raw, start=1):
        reason = _valid(row)
        if reason:
            bad.append({"benchmark": name, "row": number, "reason": reason})
        else:
            rows.append(row)
    return (rows[:cap] if cap else rows), bad


def score_benchmark(model: Any, tokenizer: Any, name: str, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                    progress: bool = True) -> dict[str, Any]:
    from kormedgemma.evaluation.korean import choice_logprobs

    pairs = [prompt_and_choices(name, row) for row in rows]
    scores = choice_logprobs(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], batch_size=batch_size,
                             desc=name, progress=progress)
    picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(p == row["answer"] for p, row in zip(picks, rows))
    chance = sum(1 / len(row["choices"]) for row in rows) / max(len(rows), 1)
    return {"n": len(rows), "correct": correct, "accuracy": round(correct / len(rows), 4) if rows else None,
            "chance": round(chance, 4), "predictions": picks}


def retention_table(results: dict[str, dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """Per benchmark: base and adapted accuracy, the drop, and whether it exceeds the tolerance."""
    rows = []
    for name, by_model in results.items():
        base, adapted = by_model["base"]["accuracy"], by_model["adapted"]["accuracy"]
        drop = round(base - adapted, 4)
        rows.append({"benchmark": name, "n": by_model["base"]["n"], "base": base, "adapted": adapted, "drop": drop,
                     "flagged": drop > tolerance})
    return rows


def text_retention(perplexity: dict[str, dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """English bits per character, base vs adapted: the relative rise, flagged above `tolerance`."""
    base, adapted = perplexity["base"]["bits_per_char"], perplexity["adapted"]["bits_per_char"]
    rise = round(adapted / base - 1, 4)
    return {"base": base, "adapted": adapted, "rise": rise, "tolerance": tolerance, "flagged": rise > tolerance}


def evaluate_english(config: ProjectConfig, progress: bool = True) -> Path:
    """5.02: English benchmarks and English bits per character, base vs instruction-tuned model."""
    from kormedgemma.core.artifacts import artifact_path, require
    from kormedgemma.core.environment import free_memory
    from kormedgemma.core.io import write_json
    from kormedgemma.core.manifest import write_artifact
    from kormedgemma.evaluation.perplexity import perplexity, read_heldout
    from kormedgemma.modeling.base_model import base_model_ref, builds_base, load_for_eval

    spec = config.evaluation
    inputs = {key: require(config, key) for key in ("instruct_model", "english", "token_store")}
    if builds_base(config):
        inputs["base_model"] = require(config, "base_model")
    models = {"base": base_model_ref(config), "adapted": str(inputs["instruct_model"])}
    benchmarks = {name: load_benchmark(config, name) for name in spec.english_benchmarks}
    heldout = read_heldout(inputs["english"], spec.perplexity_max_texts, inputs["token_store"], "english")
    results: dict[str, dict[str, Any]] = {name: {} for name in benchmarks}
    ppl: dict[str, Any] = {}
    for label, ref in models.items():
        model, tokenizer = load_for_eval(ref)
        for name, (rows, _) in benchmarks.items():
            results[name][label] = score_benchmark(model, tokenizer, name, rows, spec.batch_size, progress)
        ppl[label] = perplexity(model, tokenizer, heldout, spec.perplexity_seq_len, spec.batch_size, progress,
                                desc=f"{label} English perplexity")
        del model
        free_memory()
    table = retention_table(results, spec.retention_tolerance)
    text = text_retention(ppl, spec.english_bits_tolerance)
    summary = {"models": models, "tolerance": spec.retention_tolerance, "retention": table, "perplexity": ppl,
               "text_retention": text, "bad_rows": [b for _, (_, bad) in benchmarks.items() for b in bad],
               "flagged": [r["benchmark"] for r in table if r["flagged"]] + (["English bits/char"] if text["flagged"] else []),
               "benchmarks": {name: {label: {k: v for k, v in r.items() if k != "predictions"} for label, r in by.items()}
                              for name, by in results.items()}}
    keys = ["evaluation.english_benchmarks", "evaluation.english_local_path", "evaluation.english_max_questions",
            "evaluation.retention_tolerance", "evaluation.english_bits_tolerance", "evaluation.perplexity_seq_len",
            "evaluation.perplexity_max_texts", "base.model"]
    with write_artifact(artifact_path(config, "eval_english"), "5.02", config, keys, inputs) as out:
        write_json(out.path / "results.json", summary)
        plot_retention(summary, out.path / "retention.png")
        out.metrics.update({"retention": table, "flagged": summary["flagged"],
                            "bits_per_char": {k: v["bits_per_char"] for k, v in ppl.items()}})
    return artifact_path(config, "eval_english")


def retention_warnings(summary: dict[str, Any]) -> list[str]:
    warnings = [f"WARNING: English {r['benchmark']} accuracy fell {r['drop']:.1%} ({r['base']:.1%} → {r['adapted']:.1%} "
                f"on {r['n']} questions), more than the tolerated {summary['tolerance']:.1%}" for r in summary["retention"]
                if r["flagged"]]
    text = summary.get("text_retention")
    if text and text["flagged"]:
        warnings.append(f"WARNING: English bits per character rose {text['rise']:.1%} ({text['base']} → {text['adapted']} "
                        f"on held-out English text), more than the tolerated {text['tolerance']:.1%}: the model is "
                        "forgetting English (more English replay, or shorter stages 6-7)")
    return warnings


def plot_retention(summary: dict[str, Any], path: Optional[Path] = None) -> Any:
    """Grouped bars: base vs adapted accuracy per benchmark, chance dashed."""
    from kormedgemma.core.plots import new_figure, saved

    figure = new_figure((6, 3.2))
    ax = figure.subplots()
    rows = summary["retention"]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["base"] for r in rows], width=0.4, label="base", color="0.6")
    ax.bar([x + 0.2 for x in xs], [r["adapted"] for r in rows], width=0.4, label="adapted", color="tab:blue")
    for x, r in zip(xs, rows):
        chance = summary["benchmarks"][r["benchmark"]]["base"]["chance"]
        ax.hlines(chance, x - 0.4, x + 0.4, linestyles="--", colors="tab:red", lw=0.8)
        if r["flagged"]:
            ax.annotate("drop", (x + 0.2, r["adapted"]), ha="center", va="bottom", color="tab:red", fontsize=8)
    ax.set_xticks(list(xs), [r["benchmark"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (chance dashed)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return saved(figure, path)


def english_eval_headline(metrics: dict[str, Any]) -> str:
    """5.02's line: each benchmark base → adapted, English bits/char, what dropped too far."""
    retention = ", ".join(f"{r['benchmark']} {r['base']:.1%} → {r['adapted']:.1%}" for r in metrics.get("retention", []))
    flagged = f"; ⚠ beyond tolerance: {', '.join(metrics['flagged'])}" if metrics.get("flagged") else ""
    return f"{retention}; English bits/char {metrics.get('bits_per_char')}{flagged}"
