"""The one place that writes to loggers.

Scalars go to every attached logger (TensorBoard, CSV, ...); histograms, figures and the
custom-scalars layout only to TensorBoard writers. Only global rank zero writes. A logging
event moves its numbers to the host once: :func:`to_host` concatenates every scalar and vector
of the event into one tensor, copies it, and splits it again on the host.

TensorBoard's writer hands every record to a thread that checksums it in pure Python while
holding the GIL, so a logging event writes few, small records: the scalars of one call go to a
Lightning ``TensorBoardLogger`` as one record (:func:`log_scalars`), the histograms of one call
to PyTorch's ``SummaryWriter`` as one record (:func:`log_histograms`), with the same content
``add_scalar`` / ``add_histogram`` would write.
"""

from __future__ import annotations

import fnmatch
import struct
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
    "log_histograms",
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
    # one tensor for all of them, handed out as 0-d views (one allocation, not one per tag)
    values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float32)
    target.update(zip(metrics, values.unbind(), strict=True))
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
        writer = _plain_tensorboard_writer(logger)
        if writer is None:
            logger.log_metrics(clean, step=step)
            continue
        from tensorboard.compat.proto.summary_pb2 import Summary

        prefix = getattr(logger, "_prefix", "") or ""
        join = getattr(logger, "LOGGER_JOIN_CHAR", "-") if prefix else ""
        _write_summary(writer, [Summary.Value(tag=f"{prefix}{join}{tag}", simple_value=value)
                                for tag, value in clean.items()], step)


#: where Lightning's own ``TensorBoardLogger.log_metrics`` is defined (both package flavours)
_STOCK_TENSORBOARD = (
    "lightning.fabric.loggers.tensorboard",
    "lightning_fabric.loggers.tensorboard",
)


def _is_torch_writer(writer: Any) -> bool:
    """``writer`` is PyTorch's own ``SummaryWriter`` (not a subclass defined elsewhere)."""
    return type(writer).__module__.startswith("torch.utils.tensorboard") and callable(
        getattr(writer, "_get_file_writer", None)
    )


def _plain_tensorboard_writer(logger: Any) -> Any:
    """The ``SummaryWriter`` of a Lightning ``TensorBoardLogger`` whose ``log_metrics`` is
    Lightning's own, else ``None``.

    Such a logger writes each scalar as its own record (``add_scalar``: one
    ``Event{step, summary{value{tag, simple_value}}}`` each, every one a hand-over to the
    writer's thread); :func:`log_scalars` writes the same values, tags (with the logger's
    ``prefix``) and step as one record of several values instead, which TensorBoard and
    ``lightning-spectral check`` read alike. A subclass that overrides ``log_metrics``, and any
    other logger, is called as usual.
    """
    fn = getattr(type(logger), "log_metrics", None)
    if (getattr(fn, "__qualname__", "") != "TensorBoardLogger.log_metrics"
            or getattr(fn, "__module__", "") not in _STOCK_TENSORBOARD):
        return None
    writer = getattr(logger, "experiment", None)
    return writer if _is_torch_writer(writer) else None


def _write_summary(writer: Any, values: list[Any], step: int) -> None:
    """One event record holding ``values`` (``Summary.Value`` protos) at ``step``."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer._get_file_writer().add_summary(Summary(value=values), step)


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
    log_histograms(trainer, {tag: values}, step)


def log_histograms(
    trainer: Any,
    histograms: Mapping[str, np.ndarray | torch.Tensor],
    step: int,
    merge: int = 1,
) -> None:
    """Write a TensorBoard histogram of each ``{tag: values}`` (host data preferred) at ``step``.

    Non-finite values are left out; a tag without finite values is skipped. For PyTorch's own
    ``SummaryWriter`` every histogram of the call goes into one event record, each holding
    what ``SummaryWriter.add_histogram(tag, values, max_bins=B // merge)`` writes (``B`` the
    writer's default exponential buckets, each 1.1× wider than the last, so ``merge``
    consecutive buckets become one; trimmed to the occupied range): see
    :func:`_histogram_proto`. ``merge=1`` gives exactly ``add_histogram``'s default buckets.
    Fewer buckets make a smaller record: TensorBoard's writer checksums every record in pure
    Python (≈ 0.12 µs per byte) while holding the GIL. Other writers get ``add_histogram`` per
    tag, with their own buckets.
    """
    prepared: dict[str, np.ndarray] = {}
    for tag, values in histograms.items():
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy()
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        arr = arr[np.isfinite(arr)]
        if arr.size:
            prepared[tag] = arr
    if not prepared:
        return
    for writer in tensorboard_writers(trainer):
        edges = _bucket_edges(writer)
        if edges is None:
            for tag, arr in prepared.items():
                writer.add_histogram(tag, arr, global_step=step)
            continue
        from tensorboard.compat.proto.summary_pb2 import Summary

        _write_summary(writer, [Summary.Value(tag=tag, histo=_histogram_proto(arr, edges, merge))
                                for tag, arr in prepared.items()], step)


# writer -> its default histogram bucket edges as an array
_EDGES: weakref.WeakKeyDictionary[Any, np.ndarray] = weakref.WeakKeyDictionary()


def _bucket_edges(writer: Any) -> np.ndarray | None:
    """The default bucket edges of PyTorch's ``SummaryWriter`` (``None`` for other writers)."""
    if not _is_torch_writer(writer) or not hasattr(writer, "default_bins"):
        return None
    edges = _EDGES.get(writer)
    if edges is None:
        edges = np.asarray(writer.default_bins, dtype=np.float64)
        _EDGES[writer] = edges
    return edges


def _histogram_proto(values: np.ndarray, edges: np.ndarray, merge: int = 1) -> Any:
    """The ``HistogramProto`` that ``SummaryWriter.add_histogram(tag, values, bins=edges,
    max_bins=(len(edges) - 1) // merge)`` writes (``merge=1``: no ``max_bins``).

    The same buckets and statistics as PyTorch's ``make_histogram``: ``np.histogram`` with
    explicit edges counts ``edges[i] <= v < edges[i+1]`` (the last bucket closed, values
    outside the edges left out); ``max_bins`` then sums every ``merge`` consecutive buckets
    (from the first), keeping every ``merge``-th edge and the last; the histogram is trimmed to
    its occupied buckets plus one empty bucket on the left (TensorBoard keeps only right
    edges). Here each value's bucket is found directly (one search per value, not per edge) and
    only the occupied range is counted.
    """
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    inside = values[(values >= edges[0]) & (values <= edges[-1])]
    if inside.size == 0:
        raise ValueError("histogram of values outside the writer's bucket range")
    fine = len(edges) - 1
    merge = max(1, fine // max(1, fine // merge)) if merge > 1 else 1  # as ``max_bins`` does
    bucket = np.minimum(edges.searchsorted(inside, "right") - 1, fine - 1) // merge
    if merge > 1:
        edges = np.concatenate([edges[:-1:merge], edges[-1:]])
    start, stop = int(bucket.min()), int(bucket.max()) + 1
    counts = np.zeros(stop - start + 1, dtype="<f8")
    counts[1:] = np.bincount(bucket - start, minlength=stop - start)
    # the message in protobuf's wire format, parsed once: the two long repeated fields go in as
    # packed little-endian doubles, which is several times faster than building it field by
    # field (HistogramProto: min=1, max=2, num=3, sum=4, sum_squares=5 are doubles;
    # bucket_limit=6 and bucket=7 packed repeated doubles)
    limits = np.ascontiguousarray(edges[start : stop + 1], dtype="<f8").tobytes()
    buckets = counts.tobytes()
    stats = (float(values.min()), float(values.max()), float(len(values)), float(values.sum()),
             float(values.dot(values)))
    wire = b"".join([
        struct.pack("<BdBdBdBdBd", 0x09, stats[0], 0x11, stats[1], 0x19, stats[2], 0x21,
                    stats[3], 0x29, stats[4]),
        b"\x32", _varint(len(limits)), limits,
        b"\x3a", _varint(len(buckets)), buckets,
    ])
    return HistogramProto.FromString(wire)


def _varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


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
