"""The pipeline's report card: one Markdown page with every step's headline figures.

Built from the manifests, so it tells what the artifacts on disk are, whichever run made them.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Iterable

from config.training_config import ProjectConfig
from kormedgemma.core.artifacts import ARTIFACTS, artifact_path
from kormedgemma.core.io import write_text
from kormedgemma.core.manifest import read_manifest

# Each artifact's line in the report comes from the module that makes it: the report asks, it does
# not know what a stage or an evaluation measures. "module:function", imported when a report is
# written, so the runner's own process does not import torch to start a run.
HEADLINES: dict[str, str] = {
    "base_model": "modeling.base_model:base_headline",
    "raw_korean": "data.sources:raw_headline",
    "raw_english": "data.sources:raw_headline",
    "raw_kormedmcqa": "data.sources:raw_kormedmcqa_headline",
    "dictionary": "data.dictionary:dictionary_headline",
    "korean": "data.preprocess:corpus_headline",
    "english": "data.preprocess:corpus_headline",
    "kormedmcqa": "data.preprocess:kormedmcqa_headline",
    "korean_sp": "vocab.tokenizer:korean_sp_headline",
    "new_tokens": "vocab.tokenizer:new_tokens_headline",
    "merged_tokenizer": "vocab.tokenizer:merged_tokenizer_headline",
    "token_store": "data.token_store:token_store_headline",
    "resized_model": "vocab.embeddings:resized_headline",
    "initialized_model": "vocab.embeddings:initialized_headline",
    **{f"stage{n}": "training.stage:stage_headline" for n in range(1, 8)},
    "merged_model": "training.stage:merged_headline",
    "instruct_model": "training.instruct:instruct_headline",
    "eval_korean": "evaluation.korean:korean_eval_headline",
    "eval_english": "evaluation.english:english_eval_headline",
    "awq_model": "deploy.quantize:awq_headline",
    "serve_check": "deploy.serve:serve_check_headline",
}


def headline(key: str, metrics: dict[str, Any]) -> str:
    """A one-line summary of an artifact's metrics, for the report table, by the module that made it
    (an artifact no module describes shows its metrics as JSON)."""
    if key not in HEADLINES:
        return json.dumps(metrics, ensure_ascii=False)[:200]
    module, function = HEADLINES[key].split(":")
    return getattr(importlib.import_module(f"kormedgemma.{module}"), function)(metrics)


def artifact_rows(config: ProjectConfig) -> Iterable[dict[str, Any]]:
    for key, artifact in ARTIFACTS.items():
        manifest = read_manifest(artifact_path(config, key))
        if manifest is None:
            continue
        yield {"artifact": artifact.relpath, "step": manifest.get("step"), "seconds": manifest.get("seconds"),
               "summary": headline(key, manifest.get("metrics", {})), "finished": manifest.get("finished")}


def heaviest_cell(resources: dict[str, Any]) -> str:
    """'cell 7 `gap = qlora_merge_gap(cfg)`: 21.5 GB (anon 2.0, file 10.6, shmem 8.9)', or '—' without per-cell figures."""
    cells = resources.get("cells") or []
    if not cells:
        return "—"
    top = max(cells, key=lambda cell: cell["peak_rss_gb"])
    source = top["source"].replace("|", "\\|").replace("`", "'")
    return (f"cell {top['cell']} `{source}`: {top['peak_rss_gb']:.1f} GB "
            f"(anon {top['peak_anon_gb']:.1f}, file {top['peak_file_gb']:.1f}, shmem {top.get('peak_shmem_gb', 0):.1f})")


def write_run_report(config: ProjectConfig, run_dir: Path, outcomes: Iterable[Any]) -> Path:
    outcomes = list(outcomes)
    lines = [f"# Korean MedGemma pipeline report — profile `{config.profile}`", "",
             f"Run folder: `{run_dir}`", "", "## Notebooks", "",
             "| step | status | seconds | peak RSS GB | of it allocated GB | GPU GB allocated / reserved | GB written | "
             "artifacts +GB | heaviest cell | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for outcome in outcomes:
        used = getattr(outcome, "resources", None) or {}
        gpu = (f"{used['peak_gpu_allocated_gb']:.2f} / {used['peak_gpu_reserved_gb']:.2f}"
               if "peak_gpu_allocated_gb" in used else "—")
        cells = [f"{used[k]:.2f}" if k in used else "—"
                 for k in ("peak_rss_gb", "peak_anon_rss_gb", "written_gb", "artifacts_growth_gb")]
        lines.append(f"| {outcome.id} | {outcome.status} | {outcome.seconds:.1f} | {cells[0]} | {cells[1]} | {gpu} | "
                     f"{cells[2]} | {cells[3]} | {heaviest_cell(used)} | {outcome.note} |")
    lines += ["", "Peak RSS is the notebook's whole process tree; *of it allocated* is anonymous memory, what must "
              "fit in RAM (the rest is pages of files read through memory maps, which the kernel can drop). "
              "*Heaviest cell* is the kernel's cell with the highest peak RSS: that peak, and the most of it "
              "allocated, file-backed and in shared memory seen during the cell.", ""]
    lines += ["## Artifacts", "", "| artifact | made by | seconds | summary |", "| --- | --- | ---: | --- |"]
    for row in artifact_rows(config):
        lines.append(f"| `{row['artifact']}` | {row['step']} | {row['seconds']} | {row['summary']} |")
    path = Path(run_dir) / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
