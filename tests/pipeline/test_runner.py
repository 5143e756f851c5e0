"""The papermill runner on every real notebook, under a temporary artifact root.

The tests that run notebooks share one run of the whole tiny pipeline (`first_run`, ~3 min on two
cores) and form the second tier (`make test-slow`); the ones that need no run stay in `make test`."""
import base64
import json
import re

import pytest
from plotdata import png_size

from kormedgemma.core.artifacts import artifact_path, require
from kormedgemma.core.config import load_config
from kormedgemma.core.io import MissingArtifactError
from kormedgemma.core.manifest import read_manifest
from kormedgemma.pipeline.runner import NotebookFailed, run_pipeline
from kormedgemma.pipeline.steps import STEPS, select_steps


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    overrides = {"paths.root": str(root)}
    outcomes = run_pipeline("tiny", overrides=overrides, echo=lambda *_: None)
    return root, overrides, outcomes


@pytest.mark.notebooks
@pytest.mark.slow
def test_runs_every_notebook_and_writes_the_contract(first_run):
    root, overrides, outcomes = first_run
    assert [(o.id, o.status) for o in outcomes] == [(s.id, "ran") for s in STEPS]
    config = load_config("tiny", overrides=overrides)
    for key in ("base_model", "raw_korean", "raw_english", "raw_kormedmcqa", "dictionary", "korean",
                "english", "kormedmcqa"):
        assert read_manifest(artifact_path(config, key)) is not None, key
    run_dir = sorted((root / "runs").iterdir())[0]
    executed = sorted(p.name for p in (run_dir / "executed").iterdir())
    assert executed == sorted(s.notebook.split("/")[-1] for s in STEPS)
    assert (run_dir / "logs").is_dir() and (run_dir / "report.md").is_file()
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "`data/processed/korean`" in report or "data/processed/korean" in report
    # The executed notebook shows its outputs (the statistics table made it into the copy).
    notebook = json.loads((run_dir / "executed" / "04_preprocess_data.ipynb").read_text(encoding="utf-8"))
    assert any(cell.get("outputs") for cell in notebook["cells"] if cell["cell_type"] == "code")


@pytest.mark.notebooks
@pytest.mark.slow
def test_second_run_skips_fresh_notebooks_and_reruns_after_a_config_change(first_run):
    root, overrides, _ = first_run
    again = run_pipeline("tiny", overrides=overrides, echo=lambda *_: None)
    assert {o.id: o.status for o in again} == {s.id: "ran" if s.id == "0.01" else "skipped" for s in STEPS}
    changed = run_pipeline("tiny", start="0.04", stop="0.04", overrides={**overrides, "data.preprocess.seed": 11},
                           echo=lambda *_: None)
    assert [(o.id, o.status) for o in changed] == [("0.04", "ran")]
    # A tokenizer key leaves phase 0 fresh and re-runs phase 1, and what reads its outputs (their
    # hashes change): 1.02 reads 1.01's model, 1.03 1.02's pieces, 1.04 1.03's tokenizer, 2.01 that.
    tuned = run_pipeline("tiny", stop="2.01", overrides={**overrides, "data.preprocess.seed": 11,
                                                          "tokenizer.min_frequency": 4}, echo=lambda *_: None)
    assert {o.id: o.status for o in tuned if o.id >= "1"} == {s.id: "ran" for s in STEPS if "1" <= s.id <= "2.01"}
    assert all(o.status == "skipped" for o in tuned if o.id < "1" and o.id != "0.01")


@pytest.mark.notebooks
@pytest.mark.slow
def test_failing_notebook_names_cell_and_keeps_existing_artifacts(first_run):
    root, overrides, _ = first_run
    config = load_config("tiny", overrides=overrides)
    raw = artifact_path(config, "raw_korean")
    before = read_manifest(raw)
    broken = {**overrides, "data.sources.bundled_korean_medical.local_path": "data/samples/missing.txt"}
    with pytest.raises(NotebookFailed, match=r"0.02 phase0_data_preparation/02_collect_korean_medical.ipynb "
                                             r"failed in cell \d+ \(FileNotFoundError: .*missing.txt"):
        run_pipeline("tiny", start="0.02", stop="0.02", overrides=broken, echo=lambda *_: None)
    assert read_manifest(raw) == before
    assert not [p for p in raw.parent.iterdir() if p.name.startswith(".tmp-")]
    state = json.loads(sorted((root / "runs").glob("*/state.json"))[-1].read_text())
    assert state[-1]["status"] == "failed" and "cell" in state[-1]["note"]


def test_missing_inputs_fail_at_once_naming_the_producer(tmp_path):
    overrides = {"paths.root": str(tmp_path)}
    with pytest.raises(MissingArtifactError, match=r"needs data/raw/korean/, which is missing: run "
                                                   r"phase0_data_preparation/02_collect_korean_medical.ipynb"):
        run_pipeline("tiny", start="0.04", overrides=overrides, echo=lambda *_: None)
    with pytest.raises(MissingArtifactError, match=r"--to 0.02"):
        require(load_config("tiny", overrides=overrides), "raw_kormedmcqa")


def test_step_selection():
    assert [s.id for s in select_steps("0.02", "0.03")] == ["0.02", "0.03"]
    with pytest.raises(ValueError, match="unknown notebook id '9.9'"):
        select_steps("9.9")


def run_dir_of(root):
    return sorted((root / "runs").iterdir())[0]


@pytest.mark.notebooks
@pytest.mark.slow
def test_each_notebook_records_its_peak_memory_and_disk_use(first_run):
    root, _, outcomes = first_run
    by_id = {o.id: o.resources for o in outcomes}
    for step_id, used in by_id.items():
        # A Python kernel with pandas/torch imported holds far more than 50 MB; the appended cell
        # reported the kernel's own peak, the sampler the tree's.
        assert used["peak_rss_gb"] >= 0.05 and used["kernel_peak_rss_gb"] >= 0.05, step_id
        assert 0 < used["peak_anon_rss_gb"] <= used["peak_rss_gb"], step_id
        assert any("ipykernel" in p["name"] for p in used["processes_at_peak"]), (step_id, used["processes_at_peak"])
        assert used["written_gb"] >= 0 and "artifacts_growth_gb" in used, step_id
        # every code cell of the notebook has its own figure, the parameters cell among them
        sources = [cell["source"] for cell in used["cells"]]
        assert any(source.startswith("profile = ") for source in sources), (step_id, sources)
        assert max(cell["peak_rss_gb"] for cell in used["cells"]) <= used["kernel_peak_rss_gb"], step_id
    # 0.00 builds the tiny base model (tokenizer + weights, ~20 MB); 0.01 only reads.
    assert by_id["0.00"]["artifacts_growth_gb"] >= 0.005 and by_id["0.01"]["artifacts_growth_gb"] == 0
    assert (run_dir_of(root) / "inputs" / "00_setup_environment.ipynb").is_file()  # what ran, appended cell included
    run_dir = run_dir_of(root)
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    assert all("peak_rss_gb" in row["resources"] for row in state)
    assert "| peak RSS GB | of it allocated GB |" in (run_dir / "report.md").read_text(encoding="utf-8")
    assert "| cell " in (run_dir / "report.md").read_text(encoding="utf-8")  # the heaviest cell, named


@pytest.mark.notebooks
@pytest.mark.slow
def test_report_has_a_readable_line_per_artifact(first_run):
    root, _, _ = first_run
    report = (sorted((root / "runs").iterdir())[0] / "report.md").read_text(encoding="utf-8")
    assert "Korean tokens/char" in report and "untied=True" in report and "hybrid:" in report
    artifacts = report.split("## Artifacts", 1)[1]  # the steps table quotes cell code, which may hold JSON
    assert artifacts.count("\n| `") >= 20
    assert '{"' not in artifacts  # no artifact falls back to a raw JSON dump


# The cells that draw: a library plot returned or shown, a saved PNG shown, pandas or pyplot drawing.
PLOT_CELL = re.compile(r"\b\w*plot\w*\(|plt\.show\(\)|\.plot\.\w+\(|Image\(filename=")


@pytest.mark.notebooks
@pytest.mark.slow
def test_every_plot_cell_of_the_executed_notebooks_holds_a_picture(first_run):
    """What a researcher opens after an unattended run: each plot is an image/png in the executed
    copy (not `<Figure size 900x360 with 1 Axes>` text), drawn once, and no cell prints torchao's
    failed kernel loads."""
    root, _, _ = first_run
    executed = run_dir_of(root) / "executed"
    plots = 0
    for notebook in sorted(executed.iterdir()):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        for number, cell in enumerate(cells, start=1):
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            outputs = cell.get("outputs", [])
            # text a reader sees: streams, and plain text not standing beside a picture
            shown = "".join("".join(o.get("text", "")) + ("" if "image/png" in o.get("data", {}) else
                                                          "".join(o.get("data", {}).get("text/plain", "")))
                            for o in outputs)
            assert "Failed to load" not in shown and "<Figure size" not in shown, (notebook.name, number, shown[:300])
            if PLOT_CELL.search(source):
                pictures = [o for o in outputs if "image/png" in o.get("data", {})]
                assert len(pictures) == 1, (notebook.name, number, [list(o.get("data", {})) for o in outputs])
                assert min(png_size(base64.b64decode(pictures[0]["data"]["image/png"]))) >= 100
                plots += 1
    # 0.04, 1.02, 2.02, seven stage curves and 3.07's, 4.01, 5.01, 5.02, 6.01
    assert plots == 15


def test_runs_started_in_the_same_second_on_one_root_get_their_own_folders(tmp_path):
    import threading

    from kormedgemma.pipeline.runner import _new_run_dir

    barrier, made = threading.Barrier(8), []

    def claim():
        barrier.wait()
        made.append(_new_run_dir(tmp_path / "runs"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(made) == 8 and len(set(made)) == 8
    assert all((d / "executed").is_dir() and (d / "logs").is_dir() for d in made)
