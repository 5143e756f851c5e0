"""The embedding-init ablation, the seed's own question: which initialisation of the new tokens'
rows serves a real Gemma 3 best?

One command over the init methods (hybrid, EEVE, WECHSEL, mean + covariance, plain mean, random)
and the lm_head-row choices (as the method makes them, the subword mean, the base mean), each
measured at step 0 on held-out Korean and English in bits per character, beside the base model.
The rows are written into one resized model in place (each combination overwrites every new row,
base rows are never touched), so the ablation loads the model once.

Step 0 is what an init decides on its own; what matters is what the stages make of it.
`trained_ablation` trains each combination through stages 1..N (the rows-only stages, where the
init is all the model has) with the pipeline's own 2.02 and 3.0N code, each under its own root
that links the shared upstream artifacts (phases 0-1, the resized model) instead of copying them,
and measures after every stage. It needs the GPU at real size.
"""
from __future__ import annotations

# The project modules this one uses are imported inside the functions that need them: at the top
# they would take its import from 0.11 s to 8.9 s (measured; docs/ARCHITECTURE.md).
import dataclasses
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from config.training_config import ProjectConfig
from kormedgemma.core.artifacts import link_upstream

METHODS = ("hybrid", "eeve", "wechsel", "mean", "plain_mean", "random")
OUTPUT_ROWS = ("method", "subword_mean", "base_mean")


def init_ablation(config: ProjectConfig, methods: Sequence[str] = METHODS, outputs: Sequence[str] = OUTPUT_ROWS,
                  max_texts: Optional[int] = None, seq_len: Optional[int] = None, progress: bool = True,
                  heldout: Optional[dict[str, Any]] = None, wechsel: Optional[tuple] = None) -> dict[str, Any]:
    """Bits per character at step 0 for every (method, output rows) pair, and the base model's.
    `heldout` (`read_run_heldout`) and `wechsel` (`wechsel_inputs_for`): read once by a caller that
    also runs `trained_ablation`, instead of once each."""
    from kormedgemma.core.artifacts import require
    from kormedgemma.core.environment import free_memory
    from kormedgemma.evaluation.perplexity import heldout_bits_per_char, read_run_heldout
    from kormedgemma.modeling.base_model import base_model_ref, load_for_eval, load_tokenizer
    from kormedgemma.vocab.embeddings import initialize_new_rows, wechsel_inputs_for

    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(outputs) - set(OUTPUT_ROWS))
    if unknown:
        raise ValueError(f"unknown method or output rows {unknown}: methods {METHODS}, output rows {OUTPUT_ROWS}")
    evaluation = config.evaluation
    max_texts = max_texts or evaluation.perplexity_max_texts
    seq_len = seq_len or evaluation.perplexity_seq_len
    resized = require(config, "resized_model")
    heldout = heldout or read_run_heldout(config, max_texts)

    def measure(model: Any, tokenizer: Any, label: str) -> dict[str, Any]:
        return heldout_bits_per_char(model, tokenizer, heldout, seq_len, evaluation.batch_size, progress, label)

    started = time.time()
    base, base_tokenizer = load_for_eval(base_model_ref(config))
    rows = [{"method": "base model", "output_rows": "—", **measure(base, base_tokenizer, "base")}]
    del base
    free_memory()
    model, merged = load_for_eval(resized)
    base_tokenizer = load_tokenizer(config)
    if wechsel is None and {"wechsel", "hybrid"} & set(methods):
        wechsel = wechsel_inputs_for(config)
    for method, output in itertools.product(methods, outputs):
        spec = dataclasses.replace(config.embeddings, method=method, output_rows=output)
        initialize_new_rows(model, base_tokenizer, merged, spec, wechsel[0] if method in ("wechsel", "hybrid") else None)
        rows.append({"method": method, "output_rows": output, **measure(model, merged, f"{method}/{output}")})
    reference = rows[0]
    for row in rows[1:]:
        for language in ("korean", "english"):
            key = f"{language}_bits_per_char"
            row[f"{language}_vs_base"] = round(row[key] / reference[key] - 1, 4)
    return {"rows": rows, "texts_per_language": max_texts, "seq_len": seq_len,
            "chars": {language: texts.chars for language, texts in heldout.items()},
            "new_tokens": len(merged) - len(base_tokenizer), "seconds": round(time.time() - started, 1)}


def variant_root(config: ProjectConfig, work: Path, method: str, output: str) -> ProjectConfig:
    """A root under `work` for one (method, output rows) with every artifact made before 2.02
    linked from `config`'s root, and the config that trains there."""
    root = Path(work).resolve() / f"{method}-{output}"
    variant = dataclasses.replace(config, paths=dataclasses.replace(config.paths, root=str(root)),
                                  embeddings=dataclasses.replace(config.embeddings, method=method, output_rows=output))
    link_upstream(config, variant, before="2.02")
    return variant


def trained_ablation(config: ProjectConfig, methods: Sequence[str], outputs: Sequence[str], stages: int, work: Path,
                     max_texts: Optional[int] = None, seq_len: Optional[int] = None, keep_models: bool = False,
                     progress: bool = True, heldout: Optional[dict[str, Any]] = None,
                     wechsel: Optional[tuple] = None) -> list[dict[str, Any]]:
    """Bits per character after each of stages 1..`stages` for every (method, output rows) pair,
    each initialised by 2.02 and trained by 3.0N exactly as the pipeline would, with `config`'s
    stage settings. Unless `keep_models`, a variant's models go once measured (its metrics stay).

    Each finished variant's rows are kept in `work/trained.json` at once, so a run stopped part-way
    loses at most the variant it was on: the same command again measures only what is missing (rows
    recorded under other settings are not reused)."""
    import torch

    from kormedgemma.core.artifacts import artifact_path, require
    from kormedgemma.core.config import config_to_dict
    from kormedgemma.core.environment import free_memory
    from kormedgemma.core.io import write_json
    from kormedgemma.evaluation.perplexity import heldout_bits_per_char, read_run_heldout
    from kormedgemma.training.stage import apply_trained, checkpoint_root, load_stage_model, train_stage
    from kormedgemma.vocab.embeddings import initialize_artifact, wechsel_inputs_for

    if not 1 <= stages <= 3:
        raise ValueError(f"stages={stages}: the trained ablation covers the rows-only stages 1-3 (EEVE's stages 1-3 "
                         "train only the new rows, where the init is all the model has)")
    evaluation = config.evaluation
    max_texts = max_texts or evaluation.perplexity_max_texts
    seq_len = seq_len or evaluation.perplexity_seq_len
    heldout = heldout or read_run_heldout(config, max_texts)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else None
    record = Path(work) / "trained.json"
    settings = {"stages": stages, "max_texts": max_texts, "seq_len": seq_len,
                **{key: config_to_dict(config)[key] for key in ("embeddings", "staged")}}
    earlier = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    done = earlier.get("rows", []) if earlier.get("settings") == json.loads(json.dumps(settings)) else []
    rows: list[dict[str, Any]] = []
    for method, output in itertools.product(methods, outputs):
        kept = [r for r in done if (r["method"], r["output_rows"]) == (method, output)]
        if len(kept) == stages:
            rows += kept
            continue
        if wechsel is None and method in ("wechsel", "hybrid"):
            wechsel = wechsel_inputs_for(config)
        variant = variant_root(config, work, method, output)
        started = time.time()
        initialize_artifact(variant, wechsel if method in ("wechsel", "hybrid") else None)
        metrics = [train_stage(variant, k, progress_bar=progress) for k in range(1, stages + 1)]
        model, tokenizer = load_stage_model(variant, 0, device=device)
        for k in range(1, stages + 1):
            model = apply_trained(model, require(variant, f"stage{k}")).eval()
            figures = heldout_bits_per_char(model, tokenizer, heldout, seq_len, evaluation.batch_size, progress,
                                            f"{method}/{output} stage {k}")
            rows.append({"method": method, "output_rows": output, "stage": k, **figures,
                         "steps": metrics[k - 1].get("steps"), "train_seconds": metrics[k - 1].get("train_seconds"),
                         "last_loss": metrics[k - 1].get("last_loss")})
        rows[-1]["seconds"] = round(time.time() - started, 1)
        del model
        free_memory()
        if not keep_models:  # whole artifacts go (none is left half there); the figures are in `rows`
            for key in ("initialized_model", *(f"stage{k}" for k in range(1, stages + 1))):
                shutil.rmtree(artifact_path(variant, key))
            for k in range(1, stages + 1):
                shutil.rmtree(checkpoint_root(variant, k), ignore_errors=True)
        measured = {(r["method"], r["output_rows"]) for r in rows}
        write_json(record, {"settings": settings, "rows": rows + [r for r in done if (r["method"], r["output_rows"])
                                                                   not in measured]})
    return rows


def plot_ablation(result: dict[str, Any], path: Optional[Path] = None) -> Any:
    """Korean against English bits per character at step 0, one point per (method, output rows)."""
    from kormedgemma.core.plots import new_figure, saved

    figure = new_figure((7, 4.5))
    ax = figure.subplots()
    markers = {"method": "o", "subword_mean": "s", "base_mean": "^", "—": "*"}
    for row in result["rows"]:
        ax.scatter(row["english_bits_per_char"], row["korean_bits_per_char"], marker=markers.get(row["output_rows"], "o"),
                   s=120 if row["method"] == "base model" else 40, color="black" if row["method"] == "base model" else None,
                   label=f"{row['method']} / {row['output_rows']}" if row["method"] != "base model" else "base model")
    ax.set_xlabel("English bits per character (held out)")
    ax.set_ylabel("Korean bits per character (held out)")
    ax.set_title("New-token initialisation at step 0 (lower is better on both)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    return saved(figure, path)


def trained_curves(result: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per language, each combination's bits per character at step 0 and after each trained stage."""
    step0 = {(r["method"], r["output_rows"]): r for r in result["rows"][1:]}
    curves: dict[str, dict[str, list[float]]] = {"korean": {}, "english": {}}
    for row in result["trained"]:
        pair = (row["method"], row["output_rows"])
        for language, lines in curves.items():
            key = f"{language}_bits_per_char"
            lines.setdefault(f"{pair[0]} / {pair[1]}", [step0[pair][key]]).append(row[key])
    return curves


def plot_trained_ablation(result: dict[str, Any], path: Optional[Path] = None) -> Any:
    """Korean and English bits per character from step 0 through the trained stages, one line per
    (method, output rows), the base model as a dotted line."""
    from kormedgemma.core.plots import new_figure, saved

    figure = new_figure((10, 4))
    base = result["rows"][0]
    for ax, (language, lines) in zip(figure.subplots(1, 2), trained_curves(result).items()):
        for label, values in lines.items():
            ax.plot(range(len(values)), values, "-o", ms=3, label=label)
        ax.axhline(base[f"{language}_bits_per_char"], color="black", ls=":", label="base model")
        ax.set_xticks(range(len(next(iter(lines.values())))))
        ax.set_xlabel("after stage (0: the init alone)")
        ax.set_title(f"{language}: held-out bits per character", fontsize=9)
        ax.legend(fontsize=6)
    figure.tight_layout()
    return saved(figure, path)
