"""Neural-collapse figure: class-mean geometry against the simplex ETF, and NC1 over epochs.

Left: the cosine matrix of the centred class means (``cos(m_c, m_c')``,
docs/definitions.md#collapse-metrics). Middle: the simplex-ETF target (1 on the diagonal,
``−1/(C−1)`` elsewhere). Right: NC1 against the epoch, on a log scale. Built with
:func:`lightning_spectral.plots.new_figure` (Agg, no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_spectral.plots import new_figure

__all__ = ["collapse_figure"]


def collapse_figure(
    cosine: np.ndarray,
    classes: Sequence[int],
    nc1_history: Sequence[tuple[int, float]],
    title: str = "",
) -> Any:
    """A three-panel :class:`matplotlib.figure.Figure`; the caller logs and releases it.

    ``cosine`` is the ``C×C`` cosine matrix of the centred class means (NaN allowed),
    ``classes`` the ``C`` present labels, ``nc1_history`` ``(epoch, nc1)`` pairs.
    """
    cos = np.asarray(cosine, dtype=np.float64)
    c = cos.shape[0]
    target = np.full((c, c), -1.0 / (c - 1) if c > 1 else 0.0)
    np.fill_diagonal(target, 1.0)
    fig, axes = new_figure(1, 3, figsize=(11.0, 3.6))
    labels = [str(int(k)) for k in classes]
    for ax, mat, name in (
        (axes[0], cos, "cos(m_c, m_c') of centred class means"),
        (axes[1], target, f"simplex ETF target (−1/(C−1) = {target[0, 1] if c > 1 else 0:.3f})"),
    ):
        im = ax.imshow(mat, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        ax.set_title(name, fontsize=9)
        ticks = np.arange(c)
        if c <= 20:
            ax.set_xticks(ticks, labels, fontsize=7)
            ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel("class")
    fig.colorbar(im, ax=axes[:2], shrink=0.8)
    ax = axes[2]
    pts = [(e, v) for e, v in nc1_history if math.isfinite(v) and v > 0]
    if pts:
        ep, val = zip(*pts, strict=True)
        ax.plot(ep, val, marker="o", markersize=3)
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NC1 = tr(Σ_W Σ_B⁺)/C")
    ax.set_title("NC1 over epochs (→ 0 at collapse)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
