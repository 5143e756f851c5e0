"""Figures the library draws, shown as pictures in the notebooks: headless (papermill) and in
JupyterLab alike.

The plotting helpers (all but `curves.plot_all_stages`, which notebook 3.07 shows with
`plt.show()`) build `matplotlib.figure.Figure` objects without pyplot: nothing joins
pyplot's global figure list, so no figure leaks, none is shown twice (once returned, once flushed
by the inline backend at the end of the cell) and a helper called inside a step (0.04's
histogram, 1.02's frequency curve) only writes its PNG. Such a figure has no display formatter of
its own (the inline backend, which the runner's kernels use as JupyterLab's do, registers one only
once pyplot is imported, and a kernel started with `MPLBACKEND=Agg` never), so IPython would print
`<Figure size 900x360 with 1 Axes>`. `new_figure` first registers an `image/png` formatter for
`Figure` on the running IPython shell, so a helper's figure returned as a cell's last expression
is a picture; the PNG saved beside the artifact is unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def _png(figure: Any) -> Any:
    from IPython.core.pylabtools import print_figure

    # At the figure's own size (figsize x dpi pixels), framed like its saved PNG: the helpers lay
    # out with tight_layout, so no tight bounding box cropping it to a content-dependent size.
    return print_figure(figure, "png", bbox_inches=None)


def _has_picture_formatter(shell: Any, figure_type: type) -> bool:
    for mime, formatter in shell.display_formatter.formatters.items():
        if mime == "text/plain":
            continue
        try:
            formatter.lookup_by_type(figure_type)
            return True
        except KeyError:
            continue
    return False


def show_figures_in_notebook() -> bool:
    """Make `Figure` objects display as PNG pictures on the running IPython shell.

    Idempotent, and it never replaces a picture formatter already there (the inline backend's,
    with the reader's `InlineBackend.figure_formats`), so a figure is drawn once. Returns whether
    an IPython shell is running.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    from matplotlib.figure import Figure

    if not _has_picture_formatter(shell, Figure):
        shell.display_formatter.formatters["image/png"].for_type(Figure, _png)
    return True


def new_figure(figsize: tuple[float, float]) -> Any:
    """A pyplot-free `Figure` that a notebook shows as a picture (see the module's docstring)."""
    from matplotlib.figure import Figure

    show_figures_in_notebook()
    return Figure(figsize=figsize)


def saved(figure: Any, path: Optional[Path] = None) -> Any:
    """The figure, also written as a PNG to `path` when one is given: the artifact keeps the
    picture the notebook shows, at one resolution for every plot."""
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
