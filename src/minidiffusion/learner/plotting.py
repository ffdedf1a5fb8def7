"""PNG figures for callbacks, without pyplot: no global figure state, no GUI backend.

`matplotlib.figure.Figure` renders through Agg when saved as PNG, so this works on a
server, in a thread or in a test. matplotlib is imported only when a plot is made.
"""

from __future__ import annotations

from pathlib import Path

from ..paths import atomic_write

__all__ = ["new_figure", "save_figure"]


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.0)):
    """Return (figure, axes): a pyplot-free Figure and a 2-D array [nrows, ncols] of its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` as a PNG to `path` via a temporary file (never half a file); returns the path."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
