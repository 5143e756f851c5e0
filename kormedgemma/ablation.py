"""The embedding-init ablation, the seed's own question: which initialisation of the new tokens'
rows serves a real Gemma 3 best?

One command over the init methods (hybrid, EEVE, WECHSEL, mean + covariance, plain mean, random)
and the lm_head-row choices (as the method makes them, the subword mean, the base mean), each
measured at step 0 on held-out Korean and English in bits per character, beside the base model.
The rows are written into one resized model in place (each combination overwrites every new row,
base rows are never touched), so the ablation loads the model once. Step 0 is what an init
decides on its own; what stages 1-3 make of it needs the GPU (each combination trained).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from config.training_config import ProjectConfig

METHODS = ("hybrid", "eeve", "wechsel", "mean", "plain_mean", "random")
OUTPUT_ROWS = ("method", "subword_mean", "base_mean")


def init_ablation(config: ProjectConfig, methods: Sequence[str] = METHODS, outputs: Sequence[str] = OUTPUT_ROWS,
                  max_texts: Optional[int] = None, seq_len: Optional[int] = None,
                  progress: bool = True) -> dict[str, Any]:
    """Bits per character at step 0 for every (method, output rows) pair, and the base model's."""
    from kormedgemma.artifacts import require
    from kormedgemma.base_model import base_model_ref, load_for_eval, load_tokenizer
    from kormedgemma.embeddings import initialize_new_rows, wechsel_inputs_for
    from kormedgemma.environment import free_memory
    from kormedgemma.perplexity import heldout_bits_per_char, read_heldout

    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(outputs) - set(OUTPUT_ROWS))
    if unknown:
        raise ValueError(f"unknown method or output rows {unknown}: methods {METHODS}, output rows {OUTPUT_ROWS}")
    evaluation = config.evaluation
    max_texts = max_texts or evaluation.perplexity_max_texts
    seq_len = seq_len or evaluation.perplexity_seq_len
    resized = require(config, "resized_model")
    store = require(config, "token_store")
    heldout = {language: read_heldout(require(config, language), max_texts, store, language)
               for language in ("korean", "english")}

    def measure(model: Any, tokenizer: Any, label: str) -> dict[str, Any]:
        return heldout_bits_per_char(model, tokenizer, heldout, seq_len, evaluation.batch_size, progress, label)

    started = time.time()
    base, base_tokenizer = load_for_eval(base_model_ref(config))
    rows = [{"method": "base model", "output_rows": "—", **measure(base, base_tokenizer, "base")}]
    del base
    free_memory()
    model, merged = load_for_eval(resized)
    base_tokenizer = load_tokenizer(config)
    wechsel = wechsel_inputs_for(config)[0] if {"wechsel", "hybrid"} & set(methods) else None
    for method, output in itertools.product(methods, outputs):
        spec = dataclasses.replace(config.embeddings, method=method, output_rows=output)
        initialize_new_rows(model, base_tokenizer, merged, spec, wechsel if method in ("wechsel", "hybrid") else None)
        rows.append({"method": method, "output_rows": output, **measure(model, merged, f"{method}/{output}")})
    reference = rows[0]
    for row in rows[1:]:
        for language in ("korean", "english"):
            key = f"{language}_bits_per_char"
            row[f"{language}_vs_base"] = round(row[key] / reference[key] - 1, 4)
    return {"rows": rows, "texts_per_language": max_texts, "seq_len": seq_len,
            "chars": {language: texts.chars for language, texts in heldout.items()},
            "new_tokens": len(merged) - len(base_tokenizer), "seconds": round(time.time() - started, 1)}


def plot_ablation(result: dict[str, Any], path: Optional[Path] = None) -> Any:
    """Korean against English bits per character at step 0, one point per (method, output rows)."""
    from kormedgemma.plots import new_figure

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
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
