"""The one place that writes to loggers.

Scalars go to every attached logger (TensorBoard, CSV, ...); histograms, figures and the
custom-scalars layout only to TensorBoard writers. Only global rank zero writes. A logging
event moves its numbers to the host once: :func:`to_host` concatenates every scalar and vector
of the event into one tensor, copies it, and splits it again on the host.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "to_host",
    "log_scalars",
    "tensorboard_writers",
    "log_histogram",
    "log_figure",
    "register_layout",
    "multiline_layout",
]


def to_host(
    scalars: Mapping[str, torch.Tensor | float],
    vectors: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Move an event's numbers to the host in one device-to-host copy.

    ``scalars`` map a tag to a 0-d tensor (or a Python number); ``vectors`` map a tag to a
    tensor of any shape, returned flattened as float64 NumPy arrays. Tensors may live on any
    device; all are concatenated on the first tensor's device, then copied once.
    """
    vectors = vectors or {}
    parts: list[torch.Tensor] = []
    layout: list[tuple[str, str, int]] = []
    device = None
    for kind, mapping in (("s", scalars), ("v", vectors)):
        for tag, value in mapping.items():
            if isinstance(value, torch.Tensor):
                t = value.detach().reshape(-1)
                device = device or t.device
            else:
                t = torch.tensor([float(value)], dtype=torch.float64)
            parts.append(t)
            layout.append((kind, tag, t.numel()))
    if not parts:
        return {}, {}
    device = device or torch.device("cpu")
    flat = torch.cat([p.to(device=device, dtype=torch.float64) for p in parts])
    host = flat.cpu().numpy()
    out_s: dict[str, float] = {}
    out_v: dict[str, np.ndarray] = {}
    offset = 0
    for kind, tag, size in layout:
        chunk = host[offset : offset + size]
        offset += size
        if kind == "s":
            out_s[tag] = float(chunk[0]) if size else float("nan")
        else:
            out_v[tag] = chunk.copy()
    return out_s, out_v


def _is_global_zero(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Write host-side scalars to every logger attached to ``trainer`` (rank zero only)."""
    if not metrics or not _is_global_zero(trainer):
        return
    clean = {k: float(v) for k, v in metrics.items()}
    # listeners (e.g. SpectralAlarm) see what the monitors log, with or without a logger
    for callback in getattr(trainer, "callbacks", []) or []:
        listener = getattr(callback, "on_spectral_scalars", None)
        if callable(listener):
            listener(trainer, clean, step)
    for logger in getattr(trainer, "loggers", []) or []:
        logger.log_metrics(clean, step=step)


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The TensorBoard ``SummaryWriter`` of each TensorBoard logger (empty off rank zero)."""
    if not _is_global_zero(trainer):
        return []
    writers = []
    for logger in getattr(trainer, "loggers", []) or []:
        if "TensorBoard" not in type(logger).__name__:
            continue
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_histogram") and hasattr(exp, "add_figure"):
            writers.append(exp)
    return writers


def log_histogram(trainer: Any, tag: str, values: np.ndarray | torch.Tensor, step: int) -> None:
    """Write a TensorBoard histogram of ``values`` (host data preferred) at ``step``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    for writer in tensorboard_writers(trainer):
        writer.add_histogram(tag, values, global_step=step)


def log_figure(trainer: Any, tag: str, figure: Any, step: int) -> None:
    """Write a matplotlib figure as a TensorBoard image at ``step``; the figure is released.

    Figures made with :func:`lightning_spectral.plots.new_figure` are not registered with pyplot,
    so nothing is left open; pyplot figures are closed as well.
    """
    try:
        for writer in tensorboard_writers(trainer):
            writer.add_figure(tag, figure, global_step=step, close=False)
    finally:
        import matplotlib.pyplot as plt

        if plt.fignum_exists(getattr(figure, "number", -1)):
            plt.close(figure)


# writer -> merged layout {category title: {chart title: ["Multiline", [regex, ...]]}}
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list]]] = weakref.WeakKeyDictionary()


def multiline_layout(charts: Mapping[str, list[str]]) -> dict[str, list]:
    """``{chart title: [tag regex, ...]}`` as custom-scalars ``Multiline`` charts."""
    return {title: ["Multiline", list(regexes)] for title, regexes in charts.items()}


def register_layout(trainer: Any, categories: Mapping[str, Mapping[str, list]]) -> None:
    """Merge ``categories`` into the custom-scalars layout of each TensorBoard writer.

    A run holds one layout, so every callback's categories are merged per writer and the whole
    layout is written again; a category registered twice is replaced, not duplicated.
    ``categories`` is ``{category: {chart title: ["Multiline", [regex, ...]]}}``.
    """
    for writer in tensorboard_writers(trainer):
        merged = _LAYOUTS.setdefault(writer, {})
        for category, charts in categories.items():
            merged[category] = {title: list(spec) for title, spec in charts.items()}
        writer.add_custom_scalars(merged)
        writer.flush()
