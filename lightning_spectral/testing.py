"""Helpers for testing code that uses lightning_spectral (in your own pytest suite, too).

:class:`MemoryLogger` is a Lightning logger that keeps every ``log_metrics`` call in memory, so a
test can assert on what the monitors logged without reading event files::

    logger = MemoryLogger()
    trainer = pl.Trainer(logger=logger, callbacks=[SpectralMonitor(every_n_steps=10)])
    trainer.fit(model, loader)
    assert logger.last("vne/encoder") > 1.0

For thresholds over a finished run written by a real logger, use
:func:`lightning_spectral.gate.check` instead.

:func:`count_host_syncs` counts the device-to-host synchronisations a block of code causes, so a
test can hold the monitors (or your own code) to "one transfer per event"::

    with count_host_syncs("cuda") as syncs:
        trainer.fit(model, loader)
    assert syncs.count_under("lightning_spectral") == number_of_events

:func:`write_scalars` writes ``(tag, step, value)`` records as a TensorBoard event file, in
the record layout of ``SummaryWriter.add_scalar`` (or tensor-encoded), for tests of code that
reads runs.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_spectral._compat import pl
from lightning_spectral._crc32c import crc32c_many, crc32c_of_lengths, mask

__all__ = ["HostSyncs", "MemoryLogger", "count_host_syncs", "write_scalars"]

#: Tensor methods that copy data to the host (the CPU stand-in for a CUDA synchronisation)
HOST_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostSyncs:
    """What :func:`count_host_syncs` saw: one ``(file, line, what)`` per synchronisation."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.events: list[tuple[str, int, str]] = []

    @property
    def count(self) -> int:
        return len(self.events)

    def count_under(self, folder: str) -> int:
        """Synchronisations caused by code whose file path contains the folder ``folder``."""
        return sum(1 for f, _, _ in self.events if folder in Path(f).parts)

    def sites(self) -> dict[str, int]:
        """``{"file.py:line what": count}``, by the Python line that caused them."""
        out: dict[str, int] = {}
        for f, line, what in self.events:
            key = f"{Path(f).name}:{line} {what}".rstrip()
            out[key] = out.get(key, 0) + 1
        return out

    def describe(self) -> str:
        """``"2 (report.py:56 .cpu() ×1, ...)"``."""
        where = ", ".join(f"{s} ×{n}" for s, n in sorted(self.sites().items()))
        return f"{self.count} ({where})" if where else str(self.count)


@contextlib.contextmanager
def count_host_syncs(device: str | torch.device = "cpu") -> Iterator[HostSyncs]:
    """Count the device-to-host synchronisations caused inside the block.

    On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` makes PyTorch warn at every
    synchronising operation: explicit copies to the host *and* implicit ones, such as the error
    check after ``torch.linalg.eigvalsh`` or ``svdvals`` (PyTorch documents that these
    synchronise on CUDA). The warnings are counted, each with the Python line that caused it,
    and the previous debug mode is restored.

    On CPU there is no device to wait for, so the stand-in is counted: calls of the tensor
    methods that would copy to the host on a GPU (``.item()``, ``.tolist()``, ``.cpu()``,
    ``.numpy()``, and ``bool()``/``float()``/``int()`` of a tensor). What ``.cpu()`` returned
    is then host memory, so ``.numpy()`` or ``.tolist()`` of it (or of a slice of it) is not
    counted again; nor is a tensor made by ``torch.from_numpy`` inside the block. The implicit
    synchronisations of CUDA kernels (linear-algebra error checks) are not visible this way.
    """
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("count_host_syncs('cuda'): CUDA is not available")
        result = HostSyncs("cuda")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        result.events += [(w.filename, w.lineno, "") for w in caught
                          if "synchroniz" in str(w.message)]
        return
    result = HostSyncs("cpu")
    originals = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}
    depth = [0]
    host: set[int] = set()

    def storage(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return -1

    def mark_host(t: torch.Tensor) -> None:
        # forgotten when ``t`` dies: its memory address may be reused by a device-side tensor
        ptr = storage(t)
        host.add(ptr)
        weakref.finalize(t, host.discard, ptr)

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0 and storage(self) not in host:
                frame = sys._getframe(1)
                result.events.append(
                    (frame.f_code.co_filename, frame.f_lineno, f".{name.strip('_')}()")
                )
            depth[0] += 1
            try:
                out = fn(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if name == "cpu" and isinstance(out, torch.Tensor):
                mark_host(out)
            return out

        return counted

    from_numpy = torch.from_numpy

    def host_from_numpy(array: Any) -> torch.Tensor:
        out = from_numpy(array)
        mark_host(out)
        return out

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    # same call as torch.from_numpy; only the parameter's name differs
    torch.from_numpy = host_from_numpy  # type: ignore[assignment]
    try:
        yield result
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.from_numpy = from_numpy


_Logger: Any = pl.loggers.logger.Logger  # the flavour's Logger base class, chosen at import time


class MemoryLogger(_Logger):
    """Keeps every ``log_metrics`` call as ``(step, {tag: value})`` in :attr:`records`."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyper-parameters are not recorded."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((int(step or 0), dict(metrics)))

    def series(self, tag: str) -> dict[int, float]:
        """``{step: value}`` of one tag (the last value wins if a step repeats)."""
        return {step: m[tag] for step, m in self.records if tag in m}

    def tags(self) -> set[str]:
        """Every tag logged so far."""
        return {tag for _, m in self.records for tag in m}

    def last(self, tag: str) -> float:
        """The value of ``tag`` at its latest step; ``KeyError`` if it was never logged."""
        series = self.series(tag)
        if not series:
            raise KeyError(f"{tag!r} was never logged; logged tags: {sorted(self.tags())}")
        return series[max(series)]


def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def write_scalars(
    path: Path | str,
    records: list[tuple[str, int, float]],
    wall_time: float = 1.7e9,
    tensor_encoded: bool = False,
) -> Path:
    """Write ``(tag, step, value)`` records as a TensorBoard event file (fast, NumPy CRCs).

    Records are encoded as ``SummaryWriter.add_scalar`` does (``simple_value``), or, with
    ``tensor_encoded=True``, as a float32 scalar tensor with the ``scalars`` plugin metadata,
    as TF2 writers do. A ``file_version`` event comes first, as in every real file.
    """
    blobs = [b"\x09" + struct.pack("<d", wall_time) + b"\x1a\x0dbrain.Event:2"]
    cache: dict[str, bytes] = {}
    for k, (tag, step, value) in enumerate(records):
        tb = cache.get(tag)
        if tb is None:
            raw = tag.encode()
            tb = cache[tag] = b"\x0a" + _varint_bytes(len(raw)) + raw
        if tensor_encoded:
            tensor = b"\x08\x01\x2a\x04" + struct.pack("<f", value)
            meta = b"\x0a\x09\x0a\x07scalars"
            body = (tb + b"\x42" + _varint_bytes(len(tensor)) + tensor
                    + b"\x4a" + _varint_bytes(len(meta)) + meta)
        else:
            body = tb + b"\x15" + struct.pack("<f", value)
        summary = b"\x0a" + _varint_bytes(len(body)) + body
        event = b"\x09" + struct.pack("<d", wall_time + 1e-3 * k)
        if step:
            event += b"\x10" + _varint_bytes(step)
        event += b"\x2a" + _varint_bytes(len(summary)) + summary
        blobs.append(event)
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    joined = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    crcs = mask(crc32c_many(joined, starts, lengths))
    heads = np.frombuffer(lengths.astype("<u8").tobytes(), dtype=np.uint8)
    head_crcs = mask(crc32c_of_lengths(lengths))
    head_bytes = heads.reshape(-1, 8)
    head_crc_bytes = np.frombuffer(head_crcs.astype("<u4").tobytes(), np.uint8).reshape(-1, 4)
    crc_bytes = np.frombuffer(crcs.astype("<u4").tobytes(), np.uint8).reshape(-1, 4)
    out = bytearray()
    for k, blob in enumerate(blobs):
        out += head_bytes[k].tobytes() + head_crc_bytes[k].tobytes() + blob
        out += crc_bytes[k].tobytes()
    path = Path(path)
    path.write_bytes(bytes(out))
    return path
