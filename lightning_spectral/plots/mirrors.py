"""Overlay figure of the 1-D Lasso certificate: network vs convex optimum.

The certificate is defined in docs/definitions.md#mirrors-values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_spectral.plots import new_figure

__all__ = ["mirror_overlay"]


def mirror_overlay(
    x: np.ndarray,
    y: np.ndarray,
    grid: np.ndarray,
    network: np.ndarray,
    lasso: np.ndarray,
    lasso_breakpoints: np.ndarray,
    network_breakpoints: np.ndarray | None = None,
    title: str | None = None,
) -> Any:
    """A figure with the data, the network function, the Lasso solution and its breakpoints.

    ``grid``/``network``/``lasso`` are the curves (same length); ``lasso_breakpoints`` are drawn
    as dotted vertical lines (the kinks of the active dictionary features, ``a₁`` and
    ``a₁ ± a₂``), ``network_breakpoints`` as ticks on the lower edge. Returns a
    :class:`matplotlib.figure.Figure` made with :func:`lightning_spectral.plots.new_figure`
    (no pyplot state); the caller logs and releases it.
    """
    fig, ax = new_figure(figsize=(6.0, 3.8))
    lo, hi = float(np.min(grid)), float(np.max(grid))
    for i, b in enumerate(np.asarray(lasso_breakpoints, dtype=float)):
        if lo <= b <= hi:
            ax.axvline(b, color="0.75", linestyle=":", linewidth=0.9,
                       label="Lasso breakpoints" if i == 0 else None)
    ax.plot(grid, lasso, color="tab:orange", linestyle="--", linewidth=1.8,
            label="Lasso optimum (convex)")
    ax.plot(grid, network, color="tab:blue", linewidth=1.4, label="network")
    ax.scatter(x, y, s=12, color="black", zorder=3, label="data")
    if network_breakpoints is not None and len(network_breakpoints):
        nb = np.asarray(network_breakpoints, dtype=float)
        nb = nb[(nb >= lo) & (nb <= hi)]
        ax.plot(nb, np.full(nb.shape, 0.0), linestyle="none", marker="|", markersize=9,
                color="tab:blue", transform=ax.get_xaxis_transform(),
                label="network breakpoints")
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    return fig
