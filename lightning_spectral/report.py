"""The one place that writes to loggers.

Scalars go to every attached logger (TensorBoard, CSV, ...); histograms, figures and the
custom-scalars layout only to TensorBoard writers. Only global rank zero writes. A logging
event moves its numbers to the host once: :func:`to_host` concatenates every scalar and vector
of the event into one tensor, copies it, and splits it again on the host.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "to_host",
    "log_scalars",
    "publish",
    "published_since",
    "published_tags",
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


def publish(
    trainer: Any, metrics: Mapping[str, float], prog_bar: Sequence[str] = ()
) -> None:
    """Put ``metrics`` into ``trainer.callback_metrics`` (as 0-d float32 CPU tensors, as
    ``LightningModule.log(..., logger=False)`` would), on the calling rank, so that
    ``EarlyStopping``, ``ModelCheckpoint`` and any callback listed after the caller read them.
    Tags matching a glob of ``prog_bar`` also go to the progress bar."""
    if not metrics:
        return
    try:
        target = trainer.callback_metrics
    except Exception:  # a Trainer stand-in without a logger connector
        return
    if not isinstance(target, dict):
        return
    for tag, value in metrics.items():
        target[tag] = torch.tensor(float(value), dtype=torch.float32)
    if prog_bar:
        try:
            bar = trainer.progress_bar_metrics
        except Exception:
            return
        if isinstance(bar, dict):
            for tag, value in metrics.items():
                if any(fnmatch.fnmatchcase(tag, pattern) for pattern in prog_bar):
                    bar[tag] = float(value)


# trainer -> [next sequence number, [(seq, tag, value, step), ...], {tags}]: every scalar the
# callbacks logged, in order, for readers that need each value with its step (SpectralAlarm)
_PUBLISHED: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
_PUBLISHED_KEEP = 100_000


def _record(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    try:
        entry = _PUBLISHED.setdefault(trainer, [0, [], set()])
    except TypeError:  # not weak-referenceable
        return
    seq, events, tags = entry
    for tag, value in metrics.items():
        events.append((seq, tag, float(value), int(step)))
        tags.add(tag)
        seq += 1
    entry[0] = seq
    if len(events) > _PUBLISHED_KEEP:
        del events[: len(events) - _PUBLISHED_KEEP // 2]


def published_since(trainer: Any, seq: int) -> tuple[int, list[tuple[str, float, int]]]:
    """The scalars logged through :func:`log_scalars` for ``trainer`` after sequence number
    ``seq``, as ``(tag, value, step)``, and the sequence number to ask with next time
    (``published_since(trainer, 2**62)[0]`` is where the record stands now)."""
    entry = _PUBLISHED.get(trainer) if trainer is not None else None
    if entry is None:
        return 0, []
    nxt, events, _ = entry
    if seq >= nxt:
        return nxt, []
    return nxt, [(tag, value, step) for s, tag, value, step in events if s >= seq]


def published_tags(trainer: Any) -> set[str]:
    """Every tag logged through :func:`log_scalars` for ``trainer`` so far."""
    entry = _PUBLISHED.get(trainer) if trainer is not None else None
    return set() if entry is None else entry[2]


def log_scalars(
    trainer: Any,
    metrics: Mapping[str, float],
    step: int,
    prog_bar: Sequence[str] = (),
) -> None:
    """Write host-side scalars to every logger attached to ``trainer`` (rank zero only) and
    publish them into ``trainer.callback_metrics`` (every rank that calls this)."""
    if not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    publish(trainer, clean, prog_bar)
    _record(trainer, clean, step)
    if not _is_global_zero(trainer):
        return
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
