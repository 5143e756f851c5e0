"""Run the notebooks headless with papermill: in order, resumable, with logs kept.

Each run gets `runs/<timestamp>/` holding the executed copy of every notebook, its log, a
`state.json` of what ran, was skipped or failed (with each notebook's peak memory and bytes
written, `kormedgemma.core.resources`), and `report.md` with every step's headline figures. The
notebook as run — the source plus a last cell that reports the kernel's memory peaks — is kept
in `inputs/`. A notebook is skipped when all its outputs' manifests match the current inputs and
config, so re-running the same command after a crash (or a fix) resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional

from kormedgemma.core.artifacts import ARTIFACTS, artifact_path, is_complete
from kormedgemma.core.config import ProjectConfig, load_config, repo_root, resolve_path
from kormedgemma.core.errors import UserError
from kormedgemma.core.io import MissingArtifactError, write_json
from kormedgemma.core.manifest import freshness
from kormedgemma.core.resources import GB, TRACK_CELL, TreeSampler, peaks_cell, tree_bytes
from kormedgemma.pipeline.report import write_run_report
from kormedgemma.pipeline.steps import Step, select_steps, step_by_id


class NotebookFailed(UserError, RuntimeError):
    """A notebook raised: names the notebook, the cell and the executed copy to open."""


@dataclass
class StepOutcome:
    id: str
    status: str  # ran | skipped | failed
    seconds: float
    note: str = ""
    # Peak RAM / GPU memory and bytes written while the notebook ran (kormedgemma.core.resources).
    resources: dict[str, Any] = field(default_factory=dict)


def step_is_fresh(step: Step, config: ProjectConfig) -> tuple[bool, str]:
    outputs = step.outputs_for(config)
    if not outputs:
        return False, "no artifact of its own (always runs)"
    for key in outputs:
        fresh, reason = freshness(artifact_path(config, key), config)
        if not fresh:
            return False, reason
    return True, "inputs and config unchanged"


def missing_inputs(step: Step, config: ProjectConfig, scheduled: set[str]) -> Optional[str]:
    """A message naming the producer of the first input that will not exist when `step` starts."""
    for key in step.inputs_for(config):
        producer = ARTIFACTS[key].producer
        if producer in scheduled or is_complete(artifact_path(config, key)):
            continue
        source = step_by_id(producer)
        return (f"{step.id} ({step.notebook}) needs {ARTIFACTS[key].shown}, which is missing: run "
                f"{source.notebook} first (`python -m kormedgemma run --profile {config.profile} "
                f"--from {source.id}`)")
    return None


def run_pipeline(profile: str = "tiny", start: Optional[str] = None, stop: Optional[str] = None,
                 force: bool = False, overrides: Optional[Mapping[str, Any]] = None,
                 config_file: Optional[str] = None, runs_dir: Optional[Path] = None,
                 echo: Any = print) -> list[StepOutcome]:
    """Execute the selected notebooks; raises NotebookFailed or MissingArtifactError on the first stop."""
    config = load_config(profile, overrides=overrides, config_file=config_file)  # validate before work
    steps = select_steps(start, stop)
    run_dir = _new_run_dir(Path(runs_dir or resolve_path(config, "runs")))
    # absolute: each notebook runs in its own folder, where a path relative to here would not resolve
    parameters = {"profile": profile, "overrides": dict(overrides or {}),
                  "config_file": str(Path(config_file).resolve()) if config_file else None}
    write_json(run_dir / "run.json", {"profile": profile, "from": start, "to": stop, "force": force,
                                      "parameters": parameters, "steps": [s.id for s in steps]})
    echo(f"run {run_dir.name}: {len(steps)} notebook(s), profile {profile}, logs in {run_dir}")
    outcomes: list[StepOutcome] = []
    scheduled = {s.id for s in steps}
    try:
        for index, step in enumerate(steps, start=1):
            head = f"[{index}/{len(steps)}] {step.id} {step.title}"
            if not force:
                fresh, reason = step_is_fresh(step, config)
                if fresh:
                    outcomes.append(StepOutcome(step.id, "skipped", 0.0, reason))
                    echo(f"{head}: skipped ({reason})")
                    continue
            problem = missing_inputs(step, config, {s for s in scheduled if s < step.id})
            if problem:
                outcomes.append(StepOutcome(step.id, "failed", 0.0, problem))
                raise MissingArtifactError(problem)
            echo(f"{head}: running {step.notebook}")
            started = time.time()
            artifacts_before = _artifact_bytes(config, run_dir)
            try:
                with TreeSampler() as sampler:
                    _execute(step, parameters, run_dir)
            except NotebookFailed as exc:
                outcomes.append(StepOutcome(step.id, "failed", time.time() - started, str(exc),
                                            _resources(config, run_dir, step, sampler, artifacts_before)))
                raise
            outcomes.append(StepOutcome(step.id, "ran", time.time() - started, "",
                                        _resources(config, run_dir, step, sampler, artifacts_before)))
            echo(f"{head}: done in {outcomes[-1].seconds:.1f}s ({_resource_line(outcomes[-1].resources)})")
    finally:
        write_json(run_dir / "state.json", [o.__dict__ for o in outcomes])

        write_run_report(config, run_dir, outcomes)
    return outcomes


def _new_run_dir(runs: Path) -> Path:
    """runs/<timestamp>[_N]/, made by this process alone: two runs started in the same second on one
    root (the branches of `benchmarks/gemma3_270m_variants.py`) must not share a folder, so the name
    is claimed by an exclusive mkdir rather than checked, then made."""
    runs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in range(1000):
        run_dir = runs / (stamp if suffix == 0 else f"{stamp}_{suffix}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        (run_dir / "executed").mkdir()
        (run_dir / "logs").mkdir()
        return run_dir
    raise UserError(f"{runs} already holds 1,000 runs started at {stamp}: remove some")


def _artifact_bytes(config: ProjectConfig, run_dir: Path) -> int:
    """Bytes under the artifact folders (data/, models/) and this run's folder."""
    return sum(tree_bytes(resolve_path(config, name)) for name in ("data", "models")) + tree_bytes(run_dir)


def _resources(config: ProjectConfig, run_dir: Path, step: Step, sampler: TreeSampler, before: int) -> dict[str, Any]:
    """The figures of one notebook; never the reason a run stops (a failed notebook's are partial)."""
    figures = sampler.figures()
    try:
        peaks = run_dir / "resources" / f"{step.id}.json"
        if peaks.is_file():
            figures.update(json.loads(peaks.read_text(encoding="utf-8")))
        figures["artifacts_growth_gb"] = round((_artifact_bytes(config, run_dir) - before) / GB, 3)
    except (OSError, ValueError) as exc:
        figures["error"] = str(exc)[:200]
    return figures


def _resource_line(figures: Mapping[str, Any]) -> str:
    parts = [f"peak RSS {figures.get('peak_rss_gb', 0):.1f} GB ({figures.get('peak_anon_rss_gb', 0):.1f} allocated)"]
    if "peak_gpu_allocated_gb" in figures:
        parts.append(f"GPU {figures['peak_gpu_allocated_gb']:.1f} GB allocated / "
                     f"{figures['peak_gpu_reserved_gb']:.1f} reserved")
    parts.append(f"wrote {figures.get('written_gb', 0):.1f} GB")
    return ", ".join(parts)


def _execute(step: Step, parameters: dict[str, Any], run_dir: Path) -> None:
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = repo_root() / step.notebook
    executed = run_dir / "executed" / Path(step.notebook).name
    notebook = nbformat.read(source, as_version=4)
    (run_dir / "resources").mkdir(exist_ok=True)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(TRACK_CELL))
    notebook.cells.append(nbformat.v4.new_code_cell(peaks_cell(run_dir / "resources" / f"{step.id}.json")))
    # What ran is kept beside the executed copy (the source plus the appended cell).
    ran = run_dir / "inputs" / Path(step.notebook).name
    ran.parent.mkdir(exist_ok=True)
    nbformat.write(notebook, ran)
    log = run_dir / "logs" / f"{step.id}_{Path(step.notebook).stem}.log"
    env_backup = os.environ.get("MPLBACKEND")
    # ipykernel's own default: headless all the same (no window), and a figure shown by pyplot
    # (`plt.show()`, pandas' `.plot`) lands in the executed copy as a picture; under Agg it vanished
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        with open(log, "w", encoding="utf-8") as handle:
            papermill.execute_notebook(
                str(ran), str(executed), parameters=parameters, kernel_name="python3",
                cwd=str(source.parent), progress_bar=sys.stderr.isatty(), stdout_file=handle,
                stderr_file=handle, request_save_on_cell_execute=True,
                # The kernel talks to this process over loopback only; its per-start warning about
                # unencrypted TCP would bury the progress lines.
                extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except PapermillExecutionError as exc:
        raise NotebookFailed(
            f"{step.id} {step.notebook} failed in cell {exc.cell_index + 1} "
            f"({exc.ename}: {_first_line(exc.evalue)}). Executed copy: {executed}; log: {log}. "
            "Fix the cause and run the same command again: finished notebooks are skipped.") from None
    finally:
        if env_backup is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_backup


def _first_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0][:400] if lines else ""
