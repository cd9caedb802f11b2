"""Figures of layer spectra for :class:`~lightning_spectral.callbacks.spectral.SpectralMonitor`.

Both functions take host data (NumPy) and return a :class:`matplotlib.figure.Figure` made with
:func:`lightning_spectral.plots.new_figure` (Agg, no pyplot state); the caller logs it through
:func:`lightning_spectral.report.log_figure`, which releases it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_spectral.plots import new_figure

__all__ = ["spectra_figure", "spectrum_heatmap"]

_FLOOR = 1e-12  # log-scale floor for exact zeros (rank-deficient spectra)


def spectra_figure(
    panels: Mapping[str, Mapping[str, np.ndarray]], step: int | None = None
) -> Any:
    """All layers' spectra on a log scale, one curve per layer, one panel per kind.

    ``panels`` maps a panel title (e.g. ``"activations: λ/Σλ"``) to ``{layer: descending
    distribution}`` (docs/definitions.md#distribution). The x-axis is the eigenvalue index ``i``
    (1-based); values below ``1e-12`` (exact zeros after the #cutoff) are drawn at the floor.
    """
    titles = [t for t, curves in panels.items() if curves]
    fig, axes = new_figure(1, max(len(titles), 1), figsize=(5.5 * max(len(titles), 1), 3.8),
                           squeeze=False)
    for ax, title in zip(axes[0], titles, strict=False):
        for layer, values in panels[title].items():
            v = np.asarray(values, dtype=np.float64)
            v = np.where(np.isfinite(v), v, np.nan)
            ax.plot(np.arange(1, v.size + 1), np.maximum(v, _FLOOR), label=layer, lw=1.2)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("index i")
        ax.set_ylabel("share of the spectrum")
        ax.set_title(title if step is None else f"{title} (step {step})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    return fig


def spectrum_heatmap(layer: str, steps: Sequence[int], spectra: Sequence[np.ndarray]) -> Any:
    """The spectrum of one layer over training: rows = logged steps, columns = index, log colour.

    ``spectra[k]`` is the descending distribution logged at ``steps[k]``; vectors of different
    lengths (a smaller last batch) are padded with NaN (drawn blank).
    """
    from matplotlib.colors import LogNorm

    width = max((len(s) for s in spectra), default=1)
    grid = np.full((len(spectra), width), np.nan)
    for k, s in enumerate(spectra):
        v = np.asarray(s, dtype=np.float64)
        grid[k, : v.size] = np.where(v > 0, v, np.nan)
    fig, ax = new_figure(figsize=(6.0, 4.0))
    finite = grid[np.isfinite(grid)]
    if finite.size:
        norm = LogNorm(vmin=max(finite.min(), _FLOOR), vmax=max(finite.max(), _FLOOR * 10))
        y = np.asarray(steps, dtype=np.float64)
        x = np.arange(1, width + 1, dtype=np.float64)
        mesh = ax.pcolormesh(x, y, grid, shading="nearest", norm=norm, cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="λ_i / Σλ")
    ax.set_xscale("log")
    ax.set_xlabel("eigenvalue index i")
    ax.set_ylabel("global step")
    ax.set_title(f"{layer}: activation spectrum over training", fontsize=10)
    return fig
