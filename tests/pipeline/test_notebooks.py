"""The notebooks as committed (valid, one `parameters` cell, outputs stripped) and the library's
figures as pictures in them: a helper's Figure shown in a kernel is an `image/png` output."""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from plotdata import png_size

from kormedgemma.pipeline.steps import STEPS

ROOT = Path(__file__).resolve().parents[2]


def _notebooks() -> list[Path]:
    paths = {ROOT / step.notebook for step in STEPS}
    paths |= {path for path in ROOT.glob("phase*/**/*.ipynb") if ".ipynb_checkpoints" not in path.parts}
    return sorted(paths)


@pytest.mark.parametrize("path", _notebooks(), ids=lambda path: str(path.relative_to(ROOT)))
def test_notebook_is_valid_parameterised_and_stripped(path: Path) -> None:
    import nbformat

    assert path.is_file(), f"{path.relative_to(ROOT)} is in pipeline.STEPS but missing"
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert (raw["nbformat"], raw["nbformat_minor"]) >= (4, 5)
    missing = [index for index, cell in enumerate(raw["cells"]) if not cell.get("id")]
    assert not missing, f"cells {missing} have no id (nbformat 4.5 requires one; read() only patches it in memory)"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{len(tagged)} cells tagged `parameters`; papermill needs exactly one"
    assert tagged[0].cell_type == "code"
    dirty = [index for index, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"code cells {dirty} carry outputs or an execution count: commit notebooks stripped"


def test_pipeline_notebooks_are_all_found() -> None:
    assert {ROOT / step.notebook for step in STEPS} <= set(_notebooks())


# --------------------------------------------------------------------------- figures


_RETENTION = {"retention": [{"benchmark": "medqa", "base": 0.3, "adapted": 0.28, "flagged": False},
                            {"benchmark": "pubmedqa", "base": 0.5, "adapted": 0.4, "flagged": True}],
              "benchmarks": {"medqa": {"base": {"chance": 0.25}}, "pubmedqa": {"base": {"chance": 0.33}}}}


def _stage_metrics() -> dict:
    return {"stage": 1, "name": "new input embeds", "steps": 4,
            "history": [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 5)],
            "evals": [{"step": 2, "korean_valid_loss": 2.5, "english_valid_loss": 2.0},
                      {"step": 4, "korean_valid_loss": 2.3, "english_valid_loss": 2.0}]}


def _helpers(tmp_path: Path) -> dict:
    """Every library function that builds a figure, called as its step calls it (with a path)."""
    from kormedgemma.data.preprocess import plot_length_histogram
    from kormedgemma.deploy.quantize import plot_deployment
    from kormedgemma.evaluation.english import plot_retention
    from kormedgemma.evaluation.korean import plot_accuracy
    from kormedgemma.training.curves import save_stage_plot
    from kormedgemma.training.instruct import save_instruct_plot
    from kormedgemma.vocab.tokenizer import plot_frequencies

    run = {"model": "base", "shots": 0, "mode": "generate", "subsets": {"doctor": {"accuracy": 0.3}},
           "overall": {"accuracy": 0.3}}
    plan = {"weights_gb": 3.0, "overhead_gb": 1.5, "kv_needed_gb": 6.0, "max_num_seqs": 8, "max_model_len": 4096,
            "budget_gb": 21.6, "gpu_gb": 24.0}
    instruct = {"history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.8}],
                "evals": [{"step": 2, "dev_loss": 1.9}], "best_dev_loss": 1.9, "best_step": 2}
    return {
        "plot_frequencies": lambda p: plot_frequencies(np.array([50, 20, 9, 3, 1]), 5, 3, p),
        "plot_length_histogram": lambda p: plot_length_histogram({"korean train": np.array([20, 300, 4000, 25])}, p),
        "save_stage_plot": lambda p: save_stage_plot(_stage_metrics(), p),
        "plot_retention": lambda p: plot_retention(_RETENTION, p),
        "plot_accuracy": lambda p: plot_accuracy({"runs": [run]}, p),
        "save_instruct_plot": lambda p: save_instruct_plot(instruct, p),
        "plot_deployment": lambda p: plot_deployment({"compare": {"bf16": {"bytes": 8e9}, "w4a16": {"bytes": 3e9}},
                                                      "memory_plan": plan}, p),
    }


SAVED_SIZES = {"plot_frequencies": (715, 396), "plot_length_histogram": (550, 352), "save_stage_plot": (550, 352),
               "plot_retention": (660, 352), "plot_accuracy": (660, 396), "save_instruct_plot": (660, 352),
               "plot_deployment": (1100, 418)}


def test_plot_helpers_save_pngs_and_leave_pyplot_alone(tmp_path: Path) -> None:
    from matplotlib._pylab_helpers import Gcf
    from matplotlib.figure import Figure

    before = Gcf.get_num_fig_managers()
    for name, helper in _helpers(tmp_path).items():
        path = tmp_path / f"{name}.png"
        figure = helper(path)
        assert figure is None or isinstance(figure, Figure), name
        assert png_size(path.read_bytes()) == SAVED_SIZES[name], name  # figsize x 110 dpi
    assert Gcf.get_num_fig_managers() == before, "a helper left a pyplot figure open (shown twice, or leaked)"


def _run_notebook(cells: list[str], folder: Path) -> list[list[dict]]:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    return [cell.outputs for cell in notebook.cells]


# The runner's kernels and JupyterLab's run the inline backend; a user's MPLBACKEND=Agg must show pictures too.
@pytest.mark.parametrize("backend", ["Agg", "module://matplotlib_inline.backend_inline"], ids=["agg", "inline"])
def test_helper_figure_is_a_picture_in_a_kernel(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", backend)
    saved = tmp_path / "retention.png"
    outputs = _run_notebook([
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom kormedgemma.evaluation.english import plot_retention\n"
        f"summary = {_RETENTION!r}",
        "plot_retention(summary)",
        # Built twice, saved, displayed once: one picture, not two.
        f"figure = plot_retention(summary)\nplot_retention(summary, {str(saved)!r})\nfigure",
        # A step's helper writing its PNG shows nothing, and nothing imported pyplot.
        f"from kormedgemma.vocab.tokenizer import plot_frequencies\nimport numpy as np\n"
        f"plot_frequencies(np.array([9, 4, 1]), 2, 1, {str(tmp_path / 'freq.png')!r});",
        "'matplotlib.pyplot' in sys.modules",
    ], tmp_path)
    assert outputs[0] == []
    for cell in (1, 2):
        assert len(outputs[cell]) == 1, outputs[cell]
        data = outputs[cell][0]["data"]
        assert data["text/plain"] == "<Figure size 600x320 with 1 Axes>"
        # figsize (6, 3.2) at the kernel's 100 dpi: the whole figure, as a picture.
        assert png_size(base64.b64decode(data["image/png"])) == (600, 320)
    assert png_size(saved.read_bytes()) == (660, 352)  # the artifact's PNG, 110 dpi, as before
    assert outputs[3] == []
    assert outputs[4][0]["data"]["text/plain"] == "False"


def test_outside_ipython_nothing_is_registered() -> None:
    from kormedgemma.core.plots import new_figure, show_figures_in_notebook

    assert show_figures_in_notebook() is False  # no shell: plain Figures, nothing registered
    assert tuple(new_figure((2, 1)).get_size_inches()) == (2, 1)


# --------------------------------------------------------------------------- library noise


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_torchao_import_noise_is_dropped_and_nothing_else() -> None:
    import enum

    from kormedgemma.core import quiet

    quiet.quiet_torchao()
    quiet.quiet_torchao()
    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    assert torchao.filters.count(quiet._FILTER) == pytree.filters.count(quiet._FILTER) == 1
    ours = enum.Enum("KernelPreference", "AUTO")
    ours.__module__ = "torchao.quantization.quantize_.common.kernel_preference"
    theirs = enum.Enum("Mode", "A")
    # torch/utils/_pytree.py's deprecation notice, verbatim.
    deprecated = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                  "type. Calling register_constant() on Enum subclasses is deprecated and will be an error in a "
                  "future release.")
    records = _Records()
    for logger in (torchao, pytree):
        logger.addHandler(records)
    try:
        so = "/venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
        torchao.warning(f"Failed to load {so}: Could not load this library: {so}")  # torchao/__init__.py's format
        torchao.warning("Failed to load /venv/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
        pytree.warning(deprecated, ours)
        torchao.warning("Skipping import of cpp extensions due to incompatible torch version.")
        torchao.error("Failed to load /data/model.safetensors: truncated")
        pytree.warning(deprecated, theirs)
        torchao.setLevel(logging.DEBUG)  # whoever debugs torchao sees the load failures again
        torchao.warning(f"Failed to load {so}: Could not load this library: {so}")
    finally:
        torchao.setLevel(logging.NOTSET)
        for logger in (torchao, pytree):
            logger.removeHandler(records)
    assert [message[:32] for message in records.messages] == [
        "Skipping import of cpp extension", "Failed to load /data/model.safet", "<enum 'Mode'> is an Enum subclas",
        f"Failed to load {so}"[:32]]
