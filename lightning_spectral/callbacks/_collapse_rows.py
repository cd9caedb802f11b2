"""The rows of ``CollapseMonitor``: which epochs are collected, and the per-batch intake.

Each monitored batch hands the head's input rows (from the capture's sink) and the batch's labels
to :meth:`RowIntake._add_rows`. The rows are copied at once into a staging block allocated once
per accumulator (while they are still in the cache, and without keeping the batch's tensors
alive); the labels are held as references. Every ``max(1024, max_samples)`` rows (fewer for very
wide heads, see ``_STAGE_ELEMENTS``) the block is moved in bulk into the float64 class statistics
and the row reservoir of :mod:`lightning_spectral.stats` (:meth:`RowIntake._flush`; no host
synchronisation, nothing large allocated). Rows of at most float32 precision are staged at
float32 width and widened to float64 in one pass per block (exact), and the reservoir copies the
rows it samples from that float32 block: the values are those of the float64 rows, which hold
them exactly. Rows of a wider dtype are staged at float64 width directly.
Problems found on the way (labels missing, out of range, mis-shaped; the head not called) are
counted, not raised: they are summed across ranks with the statistics and turn the epoch into
NaN with one warning at its end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_spectral.callbacks._base import SpectralCallback
from lightning_spectral.stats import ClassStatsAccumulator, RowReservoir

# problem counters, summed across ranks with the statistics
_BAD_RANGE, _NOT_INTEGER, _NO_LABELS, _SHAPE, _NOT_CALLED = range(5)
_PROBLEM_KEYS = ("labels_range", "labels_dtype", "labels_missing", "labels_shape", "head_idle")

_RANGE_TEXT = "labels outside [0, {k}) (num_classes)"

#: at most this many rows × features in the float64 staging block (16 MiB, plus 8 MiB for its
#: float32 twin): a wide head flushes more often
_STAGE_ELEMENTS = 1 << 21

#: row dtypes held exactly by float32 (staged at float32 width before widening to float64)
_FLOAT32_EXACT = (torch.float32, torch.float16, torch.bfloat16)

#: at most this many views of the staging blocks are cached (one per batch position and size)
_MAX_SLOTS = 1024

#: label dtypes seen so far: whether each is an integer type (one lookup per batch)
_INTEGER_DTYPE: dict[torch.dtype, bool] = {}


def _is_integer(dtype: torch.dtype) -> bool:
    """Whether labels of ``dtype`` are integer class indices (not float, complex or bool)."""
    known = _INTEGER_DTYPE.get(dtype)
    if known is None:
        known = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        _INTEGER_DTYPE[dtype] = known
    return known


def _owns_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is contiguous and spans its whole storage (not a view of a larger one)."""
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _keep(h: torch.Tensor) -> torch.Tensor:
    """The rows to hold until the next bulk update: a reference or a copy.

    A CPU tensor that owns exactly its storage is kept as is (autograd saves the head input, so
    it is not modified in place); a view is copied so that no larger buffer stays alive, and
    accelerator tensors are always copied (CUDA graphs reuse static buffers).
    """
    if h.device.type != "cpu" or not _owns_storage(h):
        return h.clone()
    return h


def _cat_into(parts: list[torch.Tensor], out: torch.Tensor) -> None:
    """Concatenate ``parts`` into ``out`` (converting the dtype), moving them to its device when
    they are elsewhere (labels on another device than the model's first parameters)."""
    if parts[0].device == out.device:
        torch.cat(parts, out=out)
    else:
        out.copy_(torch.cat(parts))


class RowIntake(SpectralCallback):
    """The statistics of the epoch being collected and the per-batch path that fills them."""

    labels: int | str
    every_n_epochs: int
    max_samples: int
    _flush_rows: int
    _head_name: str | None
    _head_module: nn.Linear | None
    _num_labels: int
    _collecting_epoch: int | None
    _acc: ClassStatsAccumulator | None
    _reservoir: RowReservoir | None
    #: the batches held until the next bulk update: (their rows' place in a staging block,
    #: their labels)
    _buffer: list[tuple[torch.Tensor, torch.Tensor]]
    #: the staging blocks of a bulk update: float64 rows, their labels, float32 rows
    _stage: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    _buffered: int
    #: whether the rows held are staged in the float64 block (some had a dtype wider than
    #: float32) rather than in the float32 one
    _wide: bool = False
    #: views of the staging blocks by (float64 block?, first row, rows): slicing a tensor costs
    #: more than the copy of a batch into it
    _slots: dict[tuple[bool, int, int], torch.Tensor]
    _pending_labels: torch.Tensor | None
    _problem_text: dict[int, str]
    _host_problems: list[float]

    # ------------------------------------------------------------------ the epoch's statistics
    def _create(self, dim: int, device: torch.device) -> None:
        """The accumulators for ``dim`` features (problems noted so far carried over)."""
        self._acc = ClassStatsAccumulator(
            self._num_labels, dim, device=device, num_problems=len(_PROBLEM_KEYS)
        )
        self._reservoir = RowReservoir(self.max_samples, dim, device=device)
        # the staging blocks of the bulk update (float64 rows, their labels, float32 rows), reused
        rows = max(1, min(self._flush_rows, _STAGE_ELEMENTS // max(1, dim)))
        self._stage = (
            torch.empty(rows, dim, dtype=torch.float64, device=device),
            torch.empty(rows, dtype=torch.long, device=device),
            torch.empty(rows, dim, dtype=torch.float32, device=device),
        )
        self._buffer, self._buffered, self._wide = [], 0, False
        self._slots = {}
        for index, amount in enumerate(self._host_problems):
            if amount:
                self._acc.flag(index, amount)
        self._host_problems = [0.0] * len(_PROBLEM_KEYS)

    def _restore_statistics(self, restored: dict[str, Any], device: torch.device) -> None:
        """Continue the checkpointed epoch's statistics (a resume inside that epoch)."""
        self._problem_text.update(
            {int(k): str(v) for k, v in restored.get("problem_text", {}).items()}
        )
        host = restored.get("host_problems")
        if isinstance(host, list) and len(host) == len(_PROBLEM_KEYS):
            self._host_problems = [float(v) for v in host]
        state = restored.get("accumulator")
        if state is None:
            return
        try:
            if int(state["num_classes"]) != self._num_labels:
                raise ValueError(
                    f"{state['num_classes']} classes in the checkpoint, {self._num_labels} now"
                )
            self._create(int(state["dim"]), device)
            assert self._acc is not None and self._reservoir is not None
            self._acc.load_state_dict(state)
            if "reservoir" in restored:
                self._reservoir.load_state_dict(restored["reservoir"])
        except (ValueError, KeyError) as exc:
            self._acc, self._reservoir, self._stage = None, None, None
            self._fail.problem(
                "restore",
                f"the checkpoint's statistics of epoch {restored.get('epoch')} do not fit: {exc}",
                consequence="that epoch's statistics restart at the resumed batch",
            )

    def _due(self, epoch: int) -> bool:
        """Whether ``epoch`` is logged (``(epoch + 1) % every_n_epochs == 0``)."""
        return (epoch + 1) % self.every_n_epochs == 0

    def _collect(self, epoch: int, pl_module: Any, restored: dict[str, Any] | None) -> None:
        """Start collecting ``epoch``: empty statistics, or the checkpoint's (``restored``)."""
        device = torch.device(pl_module.device)
        self._buffer, self._buffered, self._wide = [], 0, False
        self._problem_text = {}
        self._host_problems = [0.0] * len(_PROBLEM_KEYS)
        head = self._head_module
        if head is not None and head.in_features > 0:
            dim = head.in_features
            if self._acc is None or self._acc.device != device or self._acc.dim != dim:
                self._create(dim, device)
        else:  # undecided or lazy head: created from the first rows
            self._acc, self._reservoir, self._stage = None, None, None
        if self._acc is not None and self._reservoir is not None:
            self._acc.reset()
            self._reservoir.reset()
        if restored is not None:  # resuming inside this epoch: continue its statistics
            self._restore_statistics(restored, device)
        self._collecting_epoch = epoch

    def _abandon_epoch(self) -> None:
        """Drop the statistics of an epoch that cannot be completed."""
        self._collecting_epoch = None
        self._pending_labels = None
        self._buffer, self._buffered, self._wide = [], 0, False
        if self._acc is not None:
            self._acc.reset()
        if self._reservoir is not None:
            self._reservoir.reset()

    # ------------------------------------------------------------------ per batch
    def _extract_labels(self, batch: Any) -> torch.Tensor | None:
        key = self.labels
        if isinstance(batch, dict):
            if key not in batch:
                self._note(
                    _NO_LABELS,
                    f"labels key {key!r} not in the batch; keys found: {sorted(map(str, batch))}",
                )
                return None
            y = batch[key]
        elif isinstance(batch, list | tuple):
            if not isinstance(key, int) or not -len(batch) <= key < len(batch):
                self._note(
                    _NO_LABELS,
                    f"labels={key!r} does not index the batch, a "
                    f"{type(batch).__name__} of length {len(batch)}",
                )
                return None
            y = batch[key]
        else:
            self._note(
                _NO_LABELS,
                f"labels={key!r}: the batch is a {type(batch).__name__}, not a tuple, list or dict",
            )
            return None
        if not isinstance(y, torch.Tensor):
            self._note(_NO_LABELS, f"labels={key!r} selects a {type(y).__name__}, not a tensor")
            return None
        if not _is_integer(y.dtype):
            self._note(_NOT_INTEGER, f"labels must be integer class indices, got dtype {y.dtype}")
            return None
        return y

    def _note(self, index: int, text: str) -> None:
        if self._acc is not None:
            self._acc.flag(index)
        else:
            self._host_problems[index] += 1.0
        self._problem_text.setdefault(index, text)

    def _on_rows(self, name: str, rows: torch.Tensor) -> None:
        """Sink of the head's capture: pair the first call of each batch with its labels."""
        labels, self._pending_labels = self._pending_labels, None
        if labels is None:
            return  # a further call of the head in this batch
        if self._acc is None and self._collecting_epoch is not None:
            self._create(rows.shape[1], rows.device)  # a lazy head: its width is known now
        self._add_rows(rows, labels)

    def _add_rows(self, h: torch.Tensor, y: torch.Tensor, kept: bool = False) -> None:
        """Stage one batch's rows and hold its labels; the statistics and the row sample are
        updated in bulk once a staging block is full (``kept``: ``h`` is already the monitor's
        own copy; the rows are copied into the block either way)."""
        if y.ndim != 1:  # integer labels (checked on extraction): no autograd history
            y = y.reshape(-1)
        n = h.shape[0]
        if y.shape[0] != n:
            self._note(_SHAPE, f"{y.shape[0]} labels for {n} feature rows")
            return
        if self._acc is None:
            self._create(h.shape[1], h.device)
        acc, stage = self._acc, self._stage
        assert acc is not None and stage is not None
        if h.shape[1] != acc.dim:
            self._note(_SHAPE, f"the head's input has {h.shape[1]} features, {acc.dim} before")
            return
        room = stage[0].shape[0]
        if self._buffered + n > room:
            self._flush()
        if n > room:  # a batch larger than the blocks goes in pieces
            for start in range(0, n, room):
                self._add_rows(h[start : start + room], y[start : start + room])
            return
        start = self._buffered
        if not self._wide and h.dtype not in _FLOAT32_EXACT:
            # a wider dtype: this block is staged at float64 width from here on
            stage[0][:start].copy_(stage[2][:start])  # exact
            self._wide = True
        where = (self._wide, start, n)
        slot = self._slots.get(where)
        if slot is None:
            if len(self._slots) >= _MAX_SLOTS:  # batches of ever-changing sizes
                self._slots.clear()
            slot = self._slots[where] = (stage[0] if self._wide else stage[2])[start : start + n]
        slot.copy_(h.detach() if h.requires_grad else h)  # exact for float32 and narrower
        self._buffer.append((slot, y))
        self._buffered = start + n
        if self._buffered == room:
            self._flush()

    def _flush(self) -> None:
        """Move the staged rows into the statistics and the reservoir (no host sync)."""
        if not self._buffer:
            return
        acc, res, stage = self._acc, self._reservoir, self._stage
        assert acc is not None and res is not None and stage is not None
        m = self._buffered
        h64, labels, h32 = stage if m == stage[0].shape[0] else (b[:m] for b in stage)
        with torch.no_grad():
            if self._wide:
                sampled = h64
            else:
                h64.copy_(h32)  # one widening to float64 (exact), shared with the hash
                sampled = h32  # the reservoir's float32 copies come from here: the same values
            _cat_into([b[1] for b in self._buffer], labels)
            self._buffer, self._buffered, self._wide = [], 0, False
            clamped = labels.clamp(0, self._num_labels - 1)
            acc.flag(_BAD_RANGE, (clamped != labels).sum())  # the epoch becomes NaN if > 0
            self._problem_text.setdefault(_BAD_RANGE, _RANGE_TEXT.format(k=self._num_labels))
            acc.update(h64, clamped)
            # it hashes the float64 rows and keeps float32 copies of the rows it samples
            res.update(sampled, clamped, rows64=h64)
