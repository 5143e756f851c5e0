"""The a5000 pipeline end to end at MedGemma-4B shape, on local stand-ins, under a 24 GB GPU cap.

What a user's first `make demo PROFILE=a5000` meets — 8.6 GB checkpoints loaded and saved in every
step, the 272K-row vocabulary through every phase, phase 4's and 5's memory, disk use, the merge
into a 262K-piece base — met here first, on the project's own notebooks through the runner:

    python benchmarks/rehearsal_a5000.py --root /tmp/rehearsal prepare      # stand-ins, English text
    python benchmarks/rehearsal_a5000.py --root /tmp/rehearsal run --to 2.02
    python benchmarks/rehearsal_a5000.py --root /tmp/rehearsal run --to 3.01 --kill-after-checkpoint 3.01
    python benchmarks/rehearsal_a5000.py --root /tmp/rehearsal run            # resumes, then the rest
    python benchmarks/rehearsal_a5000.py --root /tmp/rehearsal collect --out benchmarks/results/rehearsal_a5000.json

`run` is `python -m kormedgemma run --profile a5000 --config benchmarks/rehearsal_a5000.yaml` with
`paths.root` set and KORMEDGEMMA_GPU_MEMORY_GB=24 (every training, evaluation and quantisation
process holds itself to 24 GB of a larger card). Finished notebooks are skipped, so a run split
over several commands (a machine that keeps files only between short commands) continues where
the last stopped. `--kill-after-checkpoint 3.01` SIGKILLs the run once stage 1 has written its first
resume checkpoint; the next `run` resumes the stage from it (its metrics say `resumed_from`).

The figures per notebook (wall time, peak GPU memory allocated/reserved, peak RSS, bytes written,
artifact growth) are the runner's own (`runs/<id>/state.json`); `collect` gathers every run's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "benchmarks" / "rehearsal_a5000.yaml"
SHARED = REPO.parent / "shared" / "data"
CAP_GB = "24"


def prepare(root: Path, device: str | None) -> dict:
    """Stand-ins under root/standins and the English replay text the YAML names."""
    from kormedgemma.data.dictionary import read_pairs_tsv

    root.mkdir(parents=True, exist_ok=True)
    english = root / "sources" / "kcd_english_terms.txt"
    english.parent.mkdir(parents=True, exist_ok=True)
    terms = dict.fromkeys(en.strip() for _, en, _ in read_pairs_tsv(SHARED / "ko_en_medical_terms_kcd/kcd_ko_en.tsv", "kcd")
                          if en.strip())
    english.write_text("\n".join(terms) + "\n", encoding="utf-8")
    figures = {"english_terms": len(terms)}
    if not (root / "standins" / "medgemma-4b" / "config.json").is_file():
        command = [sys.executable, "-m", "kormedgemma", "build-standins", "--out", str(root / "standins"),
                   "--side-files", str(SHARED / "gemma3_tokenizer_side_files"),
                   "--korean", str(SHARED / "kowiki_medical/kowiki_medical.jsonl"),
                   "--dictionary", str(SHARED / "ko_en_medical_terms_kcd/kcd_ko_en.tsv")]
        if device:
            command += ["--device", device]
        started = time.time()
        subprocess.run(command, check=True, cwd=REPO)
        figures["standins_seconds"] = round(time.time() - started, 1)
    figures.update(json.loads((root / "standins" / "standins.json").read_text(encoding="utf-8")))
    return figures


def _command(root: Path, start: str | None, stop: str | None) -> list[str]:
    command = [sys.executable, "-m", "kormedgemma", "run", "--profile", "a5000", "--config", str(CONFIG),
               "--set", f"paths.root={root}"]
    if start:
        command += ["--from", start]
    if stop:
        command += ["--to", stop]
    return command


def _environment() -> dict:
    env = dict(os.environ, KORMEDGEMMA_GPU_MEMORY_GB=CAP_GB, PYTHONUNBUFFERED="1")
    env.setdefault("TQDM_MININTERVAL", "30")
    return env


def run(root: Path, start: str | None, stop: str | None, kill_step: str | None) -> int:
    command = _command(root, start, stop)
    print("$ KORMEDGEMMA_GPU_MEMORY_GB=24 " + " ".join(command), flush=True)
    if not kill_step:
        process = subprocess.Popen(command, cwd=REPO, env=_environment(), start_new_session=True)
        try:
            return process.wait()
        except KeyboardInterrupt:  # the command's time budget: stop the runner as Ctrl-C would, so it
            os.killpg(process.pid, signal.SIGINT)  # writes state.json and the report before exiting
            try:
                return process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                return process.wait()
    from kormedgemma.training.loop import latest_checkpoint
    from kormedgemma.training.stage import CHECKPOINTS

    stage = int(kill_step.split(".")[1])
    folder = root / CHECKPOINTS / f"stage{stage}"
    process = subprocess.Popen(command, cwd=REPO, env=_environment(), start_new_session=True)
    while process.poll() is None:
        if folder.is_dir() and latest_checkpoint(folder) is not None:
            time.sleep(2)  # a checkpoint is sealed when it is listed; let the step after it begin
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            print(f"killed the run after stage {stage}'s checkpoint {latest_checkpoint(folder).name}", flush=True)
            _record(root, {"killed_step": kill_step, "checkpoint": latest_checkpoint(folder).name,
                           "killed_at": time.strftime("%Y-%m-%d %H:%M:%S")})
            return 0
        time.sleep(1)
    print(f"the run ended (exit {process.returncode}) before stage {stage} wrote a checkpoint", flush=True)
    return 1


def _record(root: Path, entry: dict) -> None:
    from kormedgemma.core.io import write_json

    path = root / "rehearsal_events.json"
    events = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    write_json(path, events + [entry])


def collect(root: Path, out: Path) -> dict:
    """Every run's per-notebook figures, the stand-ins' and the resume evidence, in one JSON."""
    import torch

    from kormedgemma.core.io import write_json
    from kormedgemma.pipeline.report import heaviest_cell

    runs = []
    for run_dir in sorted((root / "runs").iterdir()):
        state = run_dir / "state.json"
        if state.is_file():
            runs.append({"run": run_dir.name, "notebooks": json.loads(state.read_text(encoding="utf-8"))})
    latest: dict[str, dict] = {}
    for entry in runs:
        for row in entry["notebooks"]:
            if row["status"] in ("ran", "failed"):
                latest[row["id"]] = {"run": entry["run"], **row}
    stage1 = root / "models" / "staged_training" / "stage1" / "metrics.json"
    resumed = json.loads(stage1.read_text(encoding="utf-8")).get("resumed_from") if stage1.is_file() else None
    events = root / "rehearsal_events.json"
    result = {
        "machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "gpu_cap_gb": float(CAP_GB), "torch": torch.__version__, "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "config": str(CONFIG.relative_to(REPO)),
        "standins": json.loads((root / "standins" / "standins.json").read_text(encoding="utf-8"))
        if (root / "standins" / "standins.json").is_file() else None,
        "events": json.loads(events.read_text(encoding="utf-8")) if events.is_file() else [],
        "stage1_resumed_from": resumed,
        "notebooks": [latest[k] for k in sorted(latest)],
        "runs": runs,
    }
    write_json(out, result)
    for row in result["notebooks"]:
        used = row.get("resources", {})
        print(f"{row['id']:>5} {row['status']:>6} {row['seconds']:8.1f}s  GPU {used.get('peak_gpu_allocated_gb', '-')}"
              f"/{used.get('peak_gpu_reserved_gb', '-')} GB  RSS {used.get('peak_rss_gb', '-')} GB "
              f"(anon {used.get('peak_anon_rss_gb', '-')}, kernel {used.get('kernel_peak_rss_gb', '-')})  "
              f"wrote {used.get('written_gb', '-')} GB  +{used.get('artifacts_growth_gb', '-')} GB")
        if used.get("cells"):
            print(f"{'':>22}heaviest {heaviest_cell(used)}")
            top = max(used["cells"], key=lambda cell: cell["peak_rss_gb"])
            for mapping in top.get("largest_mappings", []):
                print(f"{'':>24}at its end {mapping['rss_gb']:6.2f} GB {mapping['mapping']}")
        for process in used.get("processes_at_peak", [])[:4]:
            print(f"{'':>22}{process['rss_gb']:6.2f} GB (anon {process['anon_gb']}) {process['name']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="artifact root of the rehearsal (paths.root)")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("--device", default=None)
    go = commands.add_parser("run")
    go.add_argument("--from", dest="start")
    go.add_argument("--to", dest="stop")
    go.add_argument("--kill-after-checkpoint", dest="kill", metavar="STEP", help="e.g. 3.01")
    gather = commands.add_parser("collect")
    gather.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    root = args.root.resolve()
    if args.command == "prepare":
        print(json.dumps(prepare(root, args.device), indent=2))
        return 0
    if args.command == "run":
        return run(root, args.start, args.stop, args.kill)
    collect(root, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
