"""Figures of layer matrix decomposition: singular spectra and compression curves.

The quantities are defined in docs/definitions.md#weights.

Every function returns a :class:`matplotlib.figure.Figure` built by :func:`new_figure` (Agg,
no pyplot state); the caller saves or logs it and then drops it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_spectral.plots import new_figure

__all__ = ["singular_value_figure", "compression_curve_figure"]


def singular_value_figure(
    name: str,
    singular_values: Any,
    energy: float | None = None,
    rank: int | None = None,
) -> Any:
    """Singular-value spectrum of one weight, with its cumulative energy.

    See docs/definitions.md#singular-spectrum. Left axis: ``σ_i`` against ``i`` (log scale when
    all are positive). Right axis: the cumulative energy ``Σ_{j<=i} σ_j² / Σσ²``. When ``rank``
    (``k(τ)``, #capacity) is given, a vertical line marks it, labelled with ``energy``.
    """
    s = np.asarray(
        singular_values.detach().cpu().double() if hasattr(singular_values, "detach")
        else singular_values,
        dtype=np.float64,
    ).ravel()
    idx = np.arange(1, s.size + 1)
    fig, ax = new_figure(figsize=(5.0, 3.2))
    ax.plot(idx, s, marker="o", markersize=2.5, linewidth=1.0, color="C0")
    if s.size and np.all(s > 0):
        ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σ_i", color="C0")
    ax.set_title(name, fontsize=9)
    total = float(np.sum(s**2))
    if total > 0:
        ax2 = ax.twinx()
        ax2.plot(idx, np.cumsum(s**2) / total, color="C1", linewidth=1.0)
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("cumulative energy", color="C1")
    if rank is not None and rank > 0:
        label = f"k = {rank}" + (f" (τ = {energy:g})" if energy is not None else "")
        ax.axvline(rank, color="C3", linestyle="--", linewidth=1.0, label=label)
        ax.legend(loc="lower left", fontsize=8)
    return fig


def compression_curve_figure(
    rows: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, Any] | None = None,
    metric_name: str = "accuracy",
    title: str | None = None,
) -> Any:
    """Task metric against parameter count across truncation energies.

    ``rows`` are mappings with ``params``, ``metric`` and ``energy`` (as produced by
    :func:`lightning_spectral.compression.compression_curve`); ``baseline`` (same keys) is the
    uncompressed model, drawn as a star. Each point is annotated with its energy ``τ``.
    """
    fig, ax = new_figure(figsize=(5.0, 3.4))
    pts = sorted(rows, key=lambda r: r["params"])
    xs = [r["params"] for r in pts]
    ys = [np.nan if r["metric"] is None else r["metric"] for r in pts]
    ax.plot(xs, ys, marker="o", linewidth=1.0, color="C0", label="compressed")
    labels: dict[tuple[float, float], list[str]] = {}
    for r, x, y in zip(pts, xs, ys, strict=True):
        if r.get("energy") is not None:  # points that coincide share one label
            labels.setdefault((x, y), []).append(f"{r['energy']:g}")
    for i, ((x, y), text) in enumerate(labels.items()):  # alternate below/above the curve
        ax.annotate("τ=" + ", ".join(text), (x, y), textcoords="offset points",
                    xytext=(-4, -11) if i % 2 == 0 else (-4, 6), fontsize=7, ha="right")
    if baseline is not None:
        ax.plot([baseline["params"]], [baseline["metric"]], marker="*", markersize=11,
                color="C3", linestyle="none", label="original")
    ax.set_xlabel("parameters")
    ax.set_ylabel(metric_name)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig
