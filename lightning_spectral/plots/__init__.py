"""Matplotlib figures (Agg backend, never shown; the caller logs and closes them).

One module per area: ``spectral`` (layer spectra), ``collapse`` (neural collapse), ``weights``
(singular-value spectra and compression curves), ``mirrors`` (1-D Lasso certificate).
"""

from __future__ import annotations

from typing import Any


def new_figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` on the Agg backend, without touching the user's global backend.

    Uses :class:`matplotlib.figure.Figure` directly (no pyplot state machine), so creating a
    figure inside a training run never opens a window or changes ``matplotlib.get_backend()``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figsize = kwargs.pop("figsize", None)
    fig = Figure(figsize=figsize, layout=kwargs.pop("layout", "constrained"))
    FigureCanvasAgg(fig)
    axes = fig.subplots(*args, **kwargs)
    return fig, axes
