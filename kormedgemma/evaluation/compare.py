"""The comparison a researcher asks first: the method (vocabulary expansion, EEVE's stages) against
the simple alternative (continued pretraining without new tokens, `tokenizer.expand: false`), each a
finished run under its own `paths.root`, side by side.

`trajectory` measures one run's models in bits per character on the same held-out Korean and
English text — the base, the initialised model, each stage, the instruction-tuned model — because
per-token losses cannot compare tokenizers; `compare` puts two runs' trajectories beside their
KorMedMCQA and English results (phase 5), Korean tokens per character and training GPU time.
`recorded_trajectory` reads the same trajectory from what the stages measured as they trained
(their evaluation blocks cover the same held-out characters on both paths when
`staged.stageN.eval_chars` is set), so two runs compare without a GPU or their weights: a GPU
session that ends before the comparison still leaves one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from config.training_config import ProjectConfig
from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.environment import free_memory
from kormedgemma.core.io import atomic_file, write_json, write_text
from kormedgemma.core.manifest import read_manifest
from kormedgemma.core.plots import new_figure, saved
from kormedgemma.evaluation.perplexity import heldout_bits_per_char, read_run_heldout
from kormedgemma.modeling.base_model import base_model_ref, load_for_eval
from kormedgemma.training.results import StageMetrics
from kormedgemma.training.stage import apply_trained, load_stage_model, read_metrics

LANGUAGES = ("korean", "english")


def trajectory(config: ProjectConfig, max_texts: Optional[int] = None, seq_len: Optional[int] = None,
               progress: bool = True, heldout: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Held-out bits per character of the base, the initialised model, stages 1-7 and the
    instruction-tuned model of one run (a stage that was skipped repeats the model before it);
    `heldout`: `read_run_heldout`'s texts when the caller has read them already."""

    spec = config.evaluation
    seq_len = seq_len or spec.perplexity_seq_len
    heldout = heldout or read_run_heldout(config, max_texts)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else None

    def measure(label: str, model: Any, tokenizer: Any) -> dict[str, Any]:
        started = time.time()
        figures = heldout_bits_per_char(model, tokenizer, heldout, seq_len, spec.batch_size, progress, label)
        return {"model": label, **figures, "seconds": round(time.time() - started, 1)}

    rows = [measure("base", *load_for_eval(base_model_ref(config)))]
    free_memory()
    # the initialised model once, then each stage's tensors applied on top, as load_stage_model does
    # for one stage: one model load for the whole trajectory, not eight
    model, tokenizer = load_stage_model(config, 0, device=device)
    rows.append(measure("initialised", model.eval(), tokenizer))
    for stage in range(1, 8):
        if "skipped" in read_metrics(config, stage):
            rows.append({**rows[-1], "model": f"stage {stage}", "skipped": True, "seconds": 0.0})
            continue
        model = apply_trained(model, require(config, f"stage{stage}")).eval()
        rows.append(measure(f"stage {stage}", model, tokenizer))
    del model
    free_memory()
    rows.append(measure("instruct", *load_for_eval(require(config, "instruct_model"))))
    free_memory()
    return rows


def recorded_trajectory(config: ProjectConfig, base: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The trajectory as the stages recorded it on their evaluation blocks: the initialised model
    (the first trained stage's step 0), each stage's last evaluation (a skipped stage repeats the
    model before it), and `base`, the base model's row measured on the same blocks elsewhere (the
    no-expansion run's step 0 is the base itself: untying copies the tied rows). The instruction-
    tuned model is not evaluated on these blocks: its row holds no figures."""

    def figures(evaluation: dict[str, Any]) -> dict[str, Any]:
        return {f"{language}_bits_per_char": evaluation.get(f"{language}_valid_bits_per_char") for language in LANGUAGES}

    stages = [read_metrics(config, k) for k in range(1, 8)]
    trained = [m for m in stages if m.get("steps") and m.get("evals")]
    if not trained or not all(f"{language}_valid_bits_per_char" in trained[0]["evals"][0] for language in LANGUAGES):
        raise ValueError(f"run under {config.paths.root}: its stages recorded no bits per character on their "
                         "evaluation blocks (trained before they did); compare it with its models instead "
                         "(drop --recorded)")
    initialised = figures(trained[0]["evals"][0])
    rows = [{"model": "base", **(base or ({} if config.tokenizer.expand else initialised))},
            {"model": "initialised", **initialised}]
    for number, metrics in enumerate(stages, start=1):
        if not metrics.get("steps"):
            rows.append({**rows[-1], "model": f"stage {number}", "skipped": True})
            continue
        rows.append({"model": f"stage {number}", **figures(metrics["evals"][-1])})
    rows.append({"model": "instruct", **{f"{language}_bits_per_char": None for language in LANGUAGES},
                 "unmeasured": True})
    for row in rows:
        for language in LANGUAGES:
            row.setdefault(f"{language}_bits_per_char", None)
    return rows


def evaluation_blocks(config: ProjectConfig) -> dict[str, Any]:
    """What the stages' evaluation blocks covered: equal on two runs, their recorded bits per
    character measure the same held-out text."""

    for number in range(1, 8):
        if read_metrics(config, number).get("steps"):
            recorded = (read_manifest(require(config, f"stage{number}")) or {}).get("config", {}).get(f"staged.stage{number}", {})
            return {key: recorded.get(key) for key in ("seq_len", "eval_blocks", "eval_chars")}
    return {}


def run_summary(config: ProjectConfig) -> dict[str, Any]:
    """What phases 1-5 of one run recorded: tokens per character, training GPU time, phase 5 results."""

    merged = read_manifest(artifact_path(config, "merged_tokenizer")) or {}
    stages = [read_metrics(config, k) for k in range(1, 8)]
    instruct = read_manifest(artifact_path(config, "instruct_model")) or {}
    summary: dict[str, Any] = {
        "expand": config.tokenizer.expand,
        "new_tokens": merged.get("metrics", {}).get("new_pieces"),
        "korean_tokens_per_char": merged.get("metrics", {}).get("korean_tokens_per_char_after"),
        "stage_train_seconds": [round(m.get("train_seconds", 0.0), 1) for m in stages],
        "stage_steps": [m.get("steps", 0) for m in stages],
        "train_seconds": round(sum(m.get("train_seconds", 0.0) for m in stages), 1),
        "instruct_seconds": instruct.get("seconds"),
        "curves": stage_curves(stages),
    }
    for name in ("korean", "english"):
        results = artifact_path(config, f"eval_{name}") / "results.json"
        if results.is_file():
            summary[f"eval_{name}"] = json.loads(results.read_text(encoding="utf-8"))
    return summary


def stage_curves(stages: list[StageMetrics]) -> list[dict[str, Any]]:
    """Every evaluation of stages 1-7 (their metrics, in order) as one curve: bits per character of
    the valid blocks against the run's cumulative optimizer steps, tokens and training seconds.
    The stage evaluations come every `eval_every` steps at no extra cost, so this shows where a run
    stopped improving, which a per-stage trajectory hides; skipped stages add nothing."""
    rows: list[dict[str, Any]] = []
    steps = tokens = 0
    seconds = 0.0
    for metrics in stages:
        if not metrics.get("steps"):
            continue
        history = metrics.get("history", [])
        per_step = metrics["tokens"] // metrics["steps"]
        elapsed = [0.0]
        for h in history:
            elapsed.append(elapsed[-1] + h["seconds"])
        for e in metrics.get("evals", []):
            if steps and e["step"] == 0:
                continue  # a stage's step 0 is the previous stage's last evaluation
            row = {"stage": metrics["stage"], "step": steps + e["step"], "tokens": tokens + e["step"] * per_step,
                   "train_seconds": round(seconds + elapsed[min(e["step"], len(history))], 2)}
            for language in LANGUAGES:
                row[f"{language}_valid_loss"] = e.get(f"{language}_valid_loss")
                row[f"{language}_bits_per_char"] = e.get(f"{language}_valid_bits_per_char")
            rows.append(row)
        steps, tokens = steps + metrics["steps"], tokens + metrics["tokens"]
        seconds += metrics.get("train_seconds", 0.0)
    return rows


def plot_stage_curves(curves: dict[str, list[dict[str, Any]]], path: Optional[Path] = None) -> Any:
    """Korean and English bits per character of the valid blocks against training tokens, one line
    per run (`{label: stage_curves(...)}`), each stage's start marked on the first run's line."""

    figure = new_figure((9, 3.6))
    axes = figure.subplots(1, 2)
    for ax, language in zip(axes, LANGUAGES):
        key = f"{language}_bits_per_char"
        for (label, rows), style in zip(curves.items(), ("-", "--", ":", "-.")):
            points = [(r["tokens"] / 1e6, r[key]) for r in rows if r[key] is not None]
            if points:
                ax.plot(*zip(*points), style, marker=".", ms=4, label=label)
        first = next(iter(curves.values()), [])
        for previous, row in zip(first, first[1:]):
            if row["stage"] != previous["stage"]:
                ax.axvline(previous["tokens"] / 1e6, color="0.85", lw=0.8, zorder=0)
                ax.annotate(f"s{row['stage']}", (previous["tokens"] / 1e6, 1), xycoords=("data", "axes fraction"),
                            fontsize=6, color="0.5", va="top")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("bits per character (valid blocks)")
        ax.set_title(f"{language}", fontsize=9)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return saved(figure, path)


def compare(method: ProjectConfig, baseline: ProjectConfig, max_texts: Optional[int] = None,
            seq_len: Optional[int] = None, progress: bool = True, recorded: bool = False) -> dict[str, Any]:
    """Both runs' trajectories and summaries, and the final Korean / English gap (method - baseline).
    `recorded`: the trajectories the stages measured as they trained (`recorded_trajectory`), no
    model loaded; both runs' evaluation blocks must have covered the same characters."""

    runs = {"method": method, "baseline": baseline}
    for label, config in runs.items():
        expanded = _added_tokens(config)
        if expanded is None:
            raise FileNotFoundError(f"{label} run under {config.paths.root}: no merged tokenizer (1.03); run its "
                                    "pipeline first (python -m kormedgemma run ...)")
        if (expanded > 0) != (label == "method"):
            raise ValueError(f"{label} run under {config.paths.root} added {expanded} tokens: the method run must "
                             "expand the vocabulary and the baseline must not (tokenizer.expand: false); were the "
                             "two roots swapped?")
    if recorded:
        blocks = {label: evaluation_blocks(config) for label, config in runs.items()}
        if blocks["method"] != blocks["baseline"] or not blocks["method"].get("eval_chars"):
            raise ValueError(f"the two runs' stage evaluations covered different text ({blocks['method']} under "
                             f"{method.paths.root}, {blocks['baseline']} under {baseline.paths.root}): their recorded "
                             "bits per character compare only with the same staged.stageN.eval_chars on both; "
                             "compare their models instead (drop --recorded)")
        trajectories = {"baseline": recorded_trajectory(baseline)}
        base = {k: v for k, v in trajectories["baseline"][0].items() if k != "model"}
        trajectories["method"] = recorded_trajectory(method, base)
    else:
        heldout = {label: read_run_heldout(config, max_texts) for label, config in runs.items()}
        for language in LANGUAGES:  # bits per character compare two runs only on the same text
            chars = {label: texts[language].chars for label, texts in heldout.items()}
            if chars["method"] != chars["baseline"]:
                raise ValueError(f"the two runs' held-out {language} texts differ ({chars['method']:,} characters "
                                 f"under {method.paths.root}, {chars['baseline']:,} under {baseline.paths.root}): run "
                                 "both from the same data and data.preprocess settings, or bits per character do "
                                 "not compare")
        trajectories = {label: trajectory(config, max_texts, seq_len, progress, heldout[label])
                        for label, config in runs.items()}
    result: dict[str, Any] = {label: {"root": str(config.paths.root), **run_summary(config),
                                      "trajectory": trajectories[label]}
                              for label, config in runs.items()}
    result["measured"] = "recorded by the stages on their evaluation blocks" if recorded else "held-out texts, models loaded"
    for language in LANGUAGES:
        key = f"{language}_bits_per_char"
        ends = {label: next(r[key] for r in reversed(result[label]["trajectory"]) if r["model"] == "stage 7")
                for label in runs}
        result[f"{language}_stage7_gap"] = round(ends["method"] - ends["baseline"], 5)
    return result


def _added_tokens(config: ProjectConfig) -> Optional[int]:

    merged = read_manifest(artifact_path(config, "merged_tokenizer"))
    return None if merged is None else int(merged.get("metrics", {}).get("new_pieces") or 0)


def phase5_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Phase 5's accuracies of both runs, one row per KorMedMCQA run (model, mode, shots) and per
    English benchmark; a figure one run lacks is None."""
    def korean(run: dict[str, Any]) -> dict[str, Any]:
        return {r["name"]: r["overall"]["accuracy"] for r in run.get("eval_korean", {}).get("runs", [])}

    def english(run: dict[str, Any]) -> dict[str, Any]:
        return {f"{r['benchmark']} ({model})": r[model] for r in run.get("eval_english", {}).get("retention", [])
                for model in ("base", "adapted")}

    rows = []
    for benchmark, figures in (("KorMedMCQA", korean), ("English", english)):
        method, baseline = figures(result["method"]), figures(result["baseline"])
        rows += [{"benchmark": benchmark, "run": name, "method": method.get(name), "baseline": baseline.get(name)}
                 for name in dict.fromkeys([*method, *baseline])]
    return rows


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1%}"


def _bits(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4f}"


def phase5_bits_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Phase 5's bits per character of both runs: 5.01 on every held-out Korean article (base,
    stage 7, instruction-tuned), 5.02 on the held-out English (base, adapted)."""
    rows = []
    for language, key in (("Korean", "eval_korean"), ("English", "eval_english")):
        figures = {label: {name: v.get("bits_per_char") for name, v in result[label].get(key, {}).get("perplexity", {}).items()}
                   for label in ("method", "baseline")}
        rows += [{"language": language, "model": name, "method": figures["method"].get(name),
                  "baseline": figures["baseline"].get(name)}
                 for name in dict.fromkeys([*figures["method"], *figures["baseline"]])]
    return rows


def report_lines(result: dict[str, Any]) -> list[str]:
    """A Markdown page: the trajectories side by side, then what each run cost and saved."""
    method, baseline = result["method"], result["baseline"]
    where = ("the stages' evaluation blocks, as the stages recorded them" if result.get("measured", "").startswith("recorded")
             else "held-out texts")
    lines = ["# The method against plain continued pretraining", "",
             f"Bits per character (lower is better) on {where}, the same text for both runs.", "",
             "| model | method: Korean | baseline: Korean | method: English | baseline: English |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for left, right in zip(method["trajectory"], baseline["trajectory"]):
        skipped = " (the baseline skips it)" if right.get("skipped") else ""
        lines.append(f"| {left['model']}{skipped} | {_bits(left['korean_bits_per_char'])} | "
                     f"{_bits(right['korean_bits_per_char'])} | {_bits(left['english_bits_per_char'])} | "
                     f"{_bits(right['english_bits_per_char'])} |")
    lines += ["", "| | method | baseline |", "| --- | ---: | ---: |",
              f"| new tokens | {method['new_tokens']} | {baseline['new_tokens']} |",
              f"| Korean tokens per character | {method['korean_tokens_per_char']} | {baseline['korean_tokens_per_char']} |",
              f"| stage training seconds (stages 1-7) | {method['train_seconds']} | {baseline['train_seconds']} |",
              "", f"After stage 7 the method is {result['korean_stage7_gap']:+.4f} bits/char in Korean and "
              f"{result['english_stage7_gap']:+.4f} in English against the baseline (negative: the method is better)."]
    accuracies = phase5_rows(result)
    if accuracies:
        lines += ["", "Phase 5 accuracy (KorMedMCQA: model_mode_shots; English: the base model and the adapted one).",
                  "", "| benchmark | run | method | baseline |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {r['benchmark']} | {r['run']} | {_pct(r['method'])} | {_pct(r['baseline'])} |" for r in accuracies]
    bits = phase5_bits_rows(result)
    if bits:
        lines += ["", "Phase 5 bits per character (5.01: every held-out Korean article; 5.02: the held-out English).",
                  "", "| language | model | method | baseline |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {r['language']} | {r['model']} | {_bits(r['method'])} | {_bits(r['baseline'])} |" for r in bits]
    return lines


def write_comparison(result: dict[str, Any], out: Path, command: Optional[str] = None) -> Path:
    """comparison.json, comparison.md and comparison.png in `out/`, each written whole and renamed
    into place; anything else in `out/` is left alone (it may be a run's folder)."""

    out = Path(out)
    with atomic_file(out / "comparison.png", "wb") as handle:
        plot_comparison(result).savefig(handle, dpi=110, format="png")
    with atomic_file(out / "curves.png", "wb") as handle:
        plot_stage_curves({label: result[label].get("curves", []) for label in ("method", "baseline")}).savefig(
            handle, dpi=110, format="png")
    write_text(out / "comparison.md", "\n".join([*report_lines(result), "", "![comparison](comparison.png)", "",
                                                 "Along training (the stages' own evaluations):", "",
                                                 "![curves](curves.png)", ""]))
    write_json(out / "comparison.json", {**result, **({"command": command} if command else {})})
    return out


def plot_comparison(result: dict[str, Any], path: Optional[Path] = None) -> Any:
    """Korean and English bits per character along each run, the method and the baseline."""

    figure = new_figure((9, 3.6))
    axes = figure.subplots(1, 2)
    for ax, language in zip(axes, LANGUAGES):
        for label, style in (("method", "-o"), ("baseline", "--s")):
            rows = result[label]["trajectory"]
            values = [r[f"{language}_bits_per_char"] for r in rows]  # an unmeasured model is a gap
            ax.plot(range(len(rows)), [float("nan") if v is None else v for v in values], style, ms=4, label=label)
        names = [r["model"] for r in result["method"]["trajectory"]]
        ax.set_xticks(range(len(names)), [n.replace("stage ", "s") for n in names], rotation=45, fontsize=7)
        ax.set_title(f"{language}: held-out bits per character", fontsize=9)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return saved(figure, path)
