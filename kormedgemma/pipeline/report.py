"""The pipeline's report card: one Markdown page with every step's headline figures.

Built from the manifests, so it tells what the artifacts on disk are, whichever run made them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from config.training_config import ProjectConfig
from kormedgemma.core.artifacts import ARTIFACTS, artifact_path
from kormedgemma.core.io import write_text
from kormedgemma.core.manifest import read_manifest


def headline(key: str, metrics: dict[str, Any]) -> str:
    """A one-line summary of an artifact's metrics, for the report table."""
    if key == "base_model":
        return (f"{metrics.get('parameters', 0):,} parameters, {metrics.get('tokenizer_size')} tokens, "
                f"{metrics.get('embedding_rows')} embedding rows, tied={metrics.get('tied_embeddings')}")
    if key in ("raw_korean", "raw_english"):
        docs = metrics.get("docs_per_source", {})
        return ", ".join(f"{name}: {count:,}" for name, count in docs.items())
    if key in ("raw_kormedmcqa", "kormedmcqa"):
        rows = metrics.get("rows", {})
        total = sum(sum(v.values()) for v in rows.values())
        bad = len(metrics.get("bad_rows", []))
        return f"{total:,} questions in {len(rows)} subsets" + (f", {bad} bad rows dropped" if key == "kormedmcqa" else "")
    if key == "dictionary":
        return f"{metrics.get('pairs', 0):,} pairs ({metrics.get('per_source')})"
    if key in ("korean", "english"):
        filters = metrics.get("filters", {})
        return (f"{filters.get('input', 0):,} in → {filters.get('kept', 0):,} kept; train "
                f"{metrics.get('train', {}).get('docs', 0):,} / valid {metrics.get('valid', {}).get('docs', 0):,}")
    if key == "korean_sp":
        return f"{metrics.get('pieces', 0):,} Korean pieces"
    if key == "new_tokens":
        return (f"{metrics.get('new_pieces', 0):,} new pieces ({metrics.get('selected', 0):,} ≥ min_frequency, "
                f"{metrics.get('parents', 0):,} parents); counted {metrics.get('corpus_mb', 0)} MB at "
                f"{metrics.get('count_mb_per_second', 0)} MB/s")
    if key == "merged_tokenizer":
        return (f"vocab {metrics.get('base_size', 0):,} → {metrics.get('vocab_size', 0):,}; Korean tokens/char "
                f"{metrics.get('korean_tokens_per_char_before')} → {metrics.get('korean_tokens_per_char_after')} "
                f"(−{metrics.get('korean_reduction', 0):.1%}); SentencePiece/fast agreement "
                f"{metrics.get('sentencepiece_agreement', 0):.0%}")
    if key == "token_store":
        parts = metrics.get("parts", {})
        return "; ".join(f"{part}: {figures.get('docs', 0):,} docs, {figures.get('tokens', 0):,} tokens"
                         for part, figures in parts.items()) + f" (tokenized in {metrics.get('seconds')} s)"
    if key == "resized_model":
        return (f"rows {metrics.get('rows_before', 0):,} → {metrics.get('rows_after', 0):,} for "
                f"{metrics.get('tokens', 0):,} tokens; untied={metrics.get('untied')}")
    if key == "initialized_model":
        alignment = metrics.get("alignment") or {}
        extra = f"; Procrustes cosine {alignment['train_cosine']}" if "train_cosine" in alignment else ""
        return f"{metrics.get('method')}: {metrics.get('coverage')}{extra}"
    if key.startswith("stage") and key[5:].isdigit():
        final = metrics.get("final_eval") or {}
        resumed = f"; resumed from {metrics['resumed_from']}" if metrics.get("resumed_from") else ""
        return (f"{metrics.get('steps', 0):,} steps, {metrics.get('tokens', 0):,} tokens at "
                f"{metrics.get('tokens_per_second', 0):,.0f} tok/s; train loss {metrics.get('first_loss')} → "
                f"{metrics.get('last_loss')}; valid ko {final.get('korean_valid_loss')} / en "
                f"{final.get('english_valid_loss')}{resumed}")
    if key == "merged_model":
        return f"{metrics.get('parameters', 0):,} parameters, every LoRA merged"
    if key == "instruct_model":
        stopped = ", stopped early" if metrics.get("stopped_early") else ""
        return (f"{metrics.get('examples', 0):,} examples ({metrics.get('refused_leakage', 0)} refused as leakage), "
                f"{metrics.get('steps', 0):,} steps{stopped}; kept step {metrics.get('best_step')} (dev loss "
                f"{metrics.get('best_dev_loss')}); train loss {metrics.get('first_loss')} → {metrics.get('last_loss')}")
    if key == "eval_korean":
        accuracy = ", ".join(f"{name} {value:.1%}" for name, value in (metrics.get("accuracy") or {}).items()
                             if value is not None)
        v2 = ", ".join(f"{name} {value:.1%}" for name, value in (metrics.get("exact_match_v2") or {}).items())
        warn = f"; ⚠ {len(metrics['warnings'])} warning(s): {metrics['warnings'][0]}" if metrics.get("warnings") else ""
        return (f"KorMedMCQA ({metrics.get('task', 'lm-evaluation-harness kormedmcqa')}) {accuracy}"
                + (f"; v2.0 exact match {v2}" if v2 else "") + f"; Korean bits/char {metrics.get('bits_per_char')}{warn}")
    if key == "eval_english":
        retention = ", ".join(f"{r['benchmark']} {r['base']:.1%} → {r['adapted']:.1%}" for r in metrics.get("retention", []))
        flagged = f"; ⚠ dropped beyond tolerance: {', '.join(metrics['flagged'])}" if metrics.get("flagged") else ""
        return f"{retention}; English bits/char {metrics.get('bits_per_char')}{flagged}"
    if key == "awq_model":
        acc = metrics.get("accuracy") or {}
        bpc = metrics.get("bits_per_char") or {}
        fits = "fits" if metrics.get("fits_full_concurrency") else "⚠ does not fit full concurrency"
        return (f"{metrics.get('backend')} {metrics.get('scheme')}: {metrics.get('source_gb')} → "
                f"{metrics.get('quantized_gb')} GB in {metrics.get('seconds')} s; Korean bits/char "
                f"{bpc.get('source')} → {bpc.get('quantized')}; KorMedMCQA {_pct(acc.get('source'))} → "
                f"{_pct(acc.get('quantized'))}; {metrics.get('serve_gpu_gb')} GB card: {fits}"
                + (f"; ⚠ {len(metrics['warnings'])} run(s) at or below chance" if metrics.get("warnings") else ""))
    if key == "serve_check":
        return (f"{metrics.get('backend')} answered in {metrics.get('latency_s')} s "
                f"({metrics.get('completion_tokens')} tokens): {str(metrics.get('answer', ''))[:60]!r}")
    return json.dumps(metrics, ensure_ascii=False)[:200]


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "n/a"


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
