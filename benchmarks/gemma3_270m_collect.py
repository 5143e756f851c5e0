"""What a GPU run of the real Gemma 3 270M brought back, as one results file and the curve plot.

    python benchmarks/gemma3_270m_collect.py --run UNPACKED_G270_TGZ [--local-root LOCAL] \
        --out benchmarks/results/gemma3_270m_gpu_attempt2_h200.json

`benchmarks/gemma3_270m_device.sh` returns each run's logs, manifests and metrics (no weights) in
$OUT/g270.tgz: `method` and `baseline`, or the variants of `G270_VARIANTS`. This reads every run
there: the time of every notebook, each stage's losses, phase 4, what phase 5 finished and
6.01's bf16-against-4-bit comparison and 6.02's serving check where they ran. Stage
metrics written before the stages recorded bits per character carry only
losses per token, which do not compare across tokenizers; their valid blocks' tokens per
character come from the same run's phases 0.00-1.04 rebuilt on this machine (LOCAL/method and
LOCAL/baseline, `python -m kormedgemma run ... --to 1.04`, deterministic: the rebuilt new pieces
must equal the returned ones, or the script refuses), read by phase 3's own `stage_data`. The
curves are `kormedgemma.evaluation.compare.stage_curves`, the plot its `plot_stage_curves`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = {"method": {}, "baseline": {"tokenizer.expand": False}}
DONE = re.compile(r"^\[(\d+)/\d+\] (\S+) .*: done in ([\d.]+)s \(peak RSS ([\d.]+) GB(?:.*?GPU ([\d.]+) GB allocated)?")


def notebook_seconds(log: Path) -> dict[str, dict[str, float]]:
    rows = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = DONE.match(line)
        if match:
            rows[match[2]] = {"seconds": float(match[3]), "peak_rss_gb": float(match[4]),
                              **({"gpu_allocated_gb": float(match[5])} if match[5] else {})}
    return rows


def run_notebooks(run: Path, label: str) -> dict[str, dict[str, float]]:
    """Every notebook a variant ran: its run's log, then its --branch runs' (LABEL.<from>.log)."""
    logs = [run / f"{label}.log", *sorted(run.glob(f"{label}.[0-9]*.log"))]
    return {step: row for log in logs if log.is_file() for step, row in notebook_seconds(log).items()}


def valid_tokens_per_char(config: Any) -> dict[str, float]:
    """Phase 3's valid blocks under this run's tokenizer, through phase 3's own code."""
    from transformers import AutoTokenizer

    from kormedgemma.core.artifacts import require
    from kormedgemma.training.stage import stage_config, stage_data

    tokenizer = AutoTokenizer.from_pretrained(require(config, "merged_tokenizer"))  # the base's, without expansion
    return stage_data(config, tokenizer, stage_config(config, 1), seed=0).valid_tokens_per_char


def evaluation_settings(run: Path, label: str) -> dict[str, Any]:
    """The evaluation-block settings the run's stages were trained with (compare's
    `evaluation_blocks`, from the first trained stage's manifest), as overrides of stage 1: the
    local rebuild must cut the same blocks, whatever the profile says today."""
    from kormedgemma.core.config import load_config
    from kormedgemma.evaluation.compare import evaluation_blocks

    returned = load_config("gemma3_270m", overrides={**RUNS.get(label, {}), "paths.root": str(run / label)})
    blocks = evaluation_blocks(returned)
    if not blocks:
        raise SystemExit(f"{run / label}: no trained stage's manifest came back")
    return {f"staged.stage1.{key}": value for key, value in blocks.items()}


def stage_metrics(run: Path, label: str, per_char: dict[str, float]) -> list[dict[str, Any]]:
    from kormedgemma.modeling.loss import bits_per_char

    stages = []
    for k in range(1, 8):
        file = run / label / "models/staged_training" / f"stage{k}" / "metrics.json"
        if not file.is_file():
            break
        metrics = json.loads(file.read_text(encoding="utf-8"))
        if "valid_tokens_per_char" not in metrics:
            metrics["valid_tokens_per_char"] = {k: round(v, 5) for k, v in per_char.items()}
            for e in metrics.get("evals", []):
                for language, ratio in per_char.items():
                    if e.get(f"{language}_valid_loss") is not None:
                        e[f"{language}_valid_bits_per_char"] = bits_per_char(e[f"{language}_valid_loss"] * ratio, 1.0)
        stages.append(metrics)
    return stages


def stage_rows(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m in stages:
        evals = m.get("evals", [])
        row = {k: m.get(k) for k in ("stage", "name", "steps", "tokens", "epochs", "train_blocks", "english_share",
                                     "train_seconds", "tokens_per_second", "trainable_parameters", "peak_gpu_allocated_gb")}
        row.update({k: m[k] for k in ("setup_seconds", "eval_seconds", "checkpoint_seconds") if k in m})
        for language in ("korean", "english"):
            key = f"{language}_valid_bits_per_char"
            measured = [e for e in evals if e.get(key) is not None]  # a stage resumed across versions may lack some
            if measured:
                best = min(measured, key=lambda e: e[key])
                row[language] = {"start": measured[0][key], "end": measured[-1][key], "best": best[key],
                                 "best_step": best["step"]}
        rows.append(row)
    return rows


def phase5(run: Path, label: str) -> dict[str, Any]:
    """Finished 5.01 / 5.02 results, or the KorMedMCQA runs 5.01 had written when the machine went."""
    out: dict[str, Any] = {}
    final = run / label / "models/final"
    korean = final / "eval/korean/results.json"
    if korean.is_file():
        result = json.loads(korean.read_text(encoding="utf-8"))
        out["korean"] = {"finished": True, "accuracy": {r["name"]: r["overall"]["accuracy"] for r in result["runs"]},
                         "bits_per_char": {k: v["bits_per_char"] for k, v in result.get("perplexity", {}).items()}}
    else:
        partial = sorted(final.glob("eval/.tmp-korean-*/runs/*/results.json"))
        if partial:
            out["korean"] = {"finished": False, "accuracy": {
                p.parent.name: json.loads(p.read_text(encoding="utf-8"))["overall"]["accuracy"] for p in partial}}
    english = final / "eval/english/results.json"
    if english.is_file():
        result = json.loads(english.read_text(encoding="utf-8"))
        out["english"] = {"retention": result["retention"],
                          "bits_per_char": {k: v["bits_per_char"] for k, v in result["perplexity"].items()}}
    instruct = final / "instruct/metrics.json"
    if instruct.is_file():
        metrics = json.loads(instruct.read_text(encoding="utf-8"))
        out["instruct"] = {k: metrics.get(k) for k in ("examples", "steps", "planned_steps", "best_step", "best_dev_loss",
                                                       "stopped_early", "train_seconds", "tokens_per_second")}
    return out


def phase6(run: Path, label: str) -> dict[str, Any]:
    """6.01's bf16-against-4-bit comparison and 6.02's serving check, where they ran."""
    out: dict[str, Any] = {}
    final = run / label / "models/final"
    quantized = final / "korean_medgemma_awq/quantization.json"
    if quantized.is_file():
        result = json.loads(quantized.read_text(encoding="utf-8"))
        out["awq"] = {"seconds": result["quantization"]["seconds"], "scheme": result["quantization"]["scheme"],
                      "logits_relative_error": result.get("logits_relative_error"),
                      **{side: {"bytes": m["bytes"], "korean_bits_per_char": m["perplexity"]["bits_per_char"],
                                "kormedmcqa": m["kormedmcqa"]["overall"]["accuracy"],
                                "unanswered": m["kormedmcqa"]["overall"]["unanswered"]}
                         for side, m in result["compare"].items()}}
    check = final / "serve_check/check.json"
    if check.is_file():
        result = json.loads(check.read_text(encoding="utf-8"))
        out["serve"] = {k: result.get(k) for k in ("backend", "startup_s", "question", "answer", "latency_s")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="the unpacked g270.tgz")
    parser.add_argument("--local-root", type=Path, default=None,
                        help="LOCAL/{method,baseline}: phases 0.00-1.04 rebuilt, for stage metrics without bits per character")
    parser.add_argument("--config", dest="config_file", default=str(REPO / "benchmarks/gemma3_270m_local.yaml"))
    parser.add_argument("--gguf", default=None, help="base.model of the local rebuild (the assembled GGUF)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--note", default="", help="what happened to the run, in a sentence")
    args = parser.parse_args()

    from kormedgemma.core.config import load_config
    from kormedgemma.evaluation.compare import plot_stage_curves, stage_curves

    gpu = args.run / "gpu.log"  # nvidia-smi's name of the card, written by the device script
    named = gpu.read_text(encoding="utf-8").split("\n")[0].strip() if gpu.is_file() else ""
    card = named or "one H200"  # attempts 1-3 ran on one H200 before gpu.log existed
    result: dict[str, Any] = {"what": f"the real Gemma 3 270M on {card}: the method (vocabulary expansion + EEVE's "
                                      "stages) and plain continued pretraining (tokenizer.expand=false), run at once",
                              "note": args.note, "command": " ".join(sys.argv), "runs": {}}
    curves = {}
    # every run that ran a notebook, also one stopped before the stages (NAME@2.02): its notebook times
    labels = sorted({p.parent.parent.name for p in args.run.glob("*/models/staged_training")}
                    | {p.parent.name for p in args.run.glob("*/runs")})
    for label in sorted(labels, key=lambda name: (name not in RUNS, list(RUNS).index(name) if name in RUNS else 0, name)):
        per_char: dict[str, float] = {}
        trained = [json.loads(f.read_text(encoding="utf-8"))
                   for f in (args.run / label / "models/staged_training").glob("stage*/metrics.json")]
        if not all("valid_tokens_per_char" in m for m in trained if m.get("steps")):
            if label not in RUNS or args.local_root is None:
                sys.exit(f"{label}: its stage metrics predate bits per character; rebuild its phases 0.00-1.04 "
                         "locally and pass --local-root")
            config = load_config("gemma3_270m", config_file=args.config_file,
                                 overrides={**RUNS[label], **evaluation_settings(args.run, label),
                                            "paths.root": str(args.local_root / label),
                                            **({"base.model": args.gguf} if args.gguf else {})})
            returned = args.run / label / "models/tokenizer/new_tokens.json"
            rebuilt = args.local_root / label / "models/tokenizer/new_tokens.json"
            if returned.is_file() and returned.read_bytes() != rebuilt.read_bytes():
                sys.exit("the local rebuild chose other new pieces than the GPU run: rebuild it with the run's settings")
            per_char = valid_tokens_per_char(config)
        stages = stage_metrics(args.run, label, per_char)
        if stages:
            curves[label] = stage_curves(stages)
        per_char = per_char or next((m["valid_tokens_per_char"] for m in stages if m.get("steps")), {})
        result["runs"][label] = {"valid_tokens_per_char": {k: round(v, 5) for k, v in per_char.items()},
                                 "notebooks": run_notebooks(args.run, label),
                                 "stages": stage_rows(stages), "phase5": phase5(args.run, label),
                                 "phase6": phase6(args.run, label),
                                 "curves": curves.get(label, [])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    plot = args.out.with_suffix(".png")
    if curves:  # no stage ran anywhere (every run stopped before 3.01): nothing to draw
        plot_stage_curves(curves, plot)
    for label, run in result["runs"].items():
        print(f"== {label}: valid tokens/char {run['valid_tokens_per_char']}")
        for row in run["stages"]:
            if row.get("korean") and row.get("english"):
                print(f"  stage {row['stage']} ({row['steps']} steps, {row['train_seconds']} s): Korean bits/char "
                      f"{row['korean']['start']} → {row['korean']['end']} (best {row['korean']['best']} at step "
                      f"{row['korean']['best_step']}), English {row['english']['start']} → {row['english']['end']}")
    print(f"wrote {args.out}" + (f" and {plot}" if curves else " (no stage ran: no plot)"))


if __name__ == "__main__":
    main()
