"""Read every scalar of a TensorBoard event file, with the record checksums verified.

An event file is a sequence of TFRecords: ``uint64 length | uint32 masked_crc32c(length) |
data[length] | uint32 masked_crc32c(data)``, each ``data`` a serialized ``tensorboard.Event``.

**Why not TensorBoard's reader.** ``EventAccumulator`` keeps a reservoir of 10,000 scalars per
tag by default (``size_guidance={"scalars": 0}`` keeps all), so it can see every value, but:

* it is slow: a pure-Python CRC and one protobuf parse per record. On 200 tags × 250 steps
  this reader was about 30 times faster than ``EventAccumulator(size_guidance={"scalars": 0})``
  (17-34 times per round) and about 60 times faster than its bare ``EventFileLoader``, on a
  shared 2-core machine (``python -m benchmarks.bench_gate``, benchmarks/RESULTS.md, "Gate");
  a gate reads runs of millions of records;
* it skips a truncated or corrupt record with a log message, where a gate must fail loudly:
  here a bad record is an error naming the file and the byte offset.

**What makes it fast** (whole arrays with NumPy; a run of 200 tags × 10,000 steps holds two
million records):

* the CRC-32C of all records of one length in one table gather
  (:mod:`lightning_spectral._crc32c`);
* the common record written by ``SummaryWriter.add_scalar`` (and so by Lightning's
  ``TensorBoardLogger``) — ``Event{wall_time, step, summary{value{tag, simple_value}}}`` in
  canonical field order — is decoded with vectorised byte checks (:func:`_fast_scalars`).
  Every other record (file version, histograms, images, hyper-parameters, tensor-encoded
  scalars as TF2 and ``new_style`` writers emit them) is parsed by TensorBoard's own ``Event``
  protobuf class, imported on first use;
* the record framing is followed by verified speculation (:func:`_walk`), which saved 14 %
  (median of per-round savings) of the reading time of the two-million record run.

**Hostile input.** Only regular files are opened (:func:`open_regular` refuses FIFOs, sockets
and devices before and after opening, without ever blocking); the whole file is read once and a
record's declared length is never allocated (a length running past the end of the file is an
incomplete record). Every malformed record raises :class:`EventFileError`: a checksum failure,
a protobuf ``DecodeError``, a known field with the wrong wire type (which protobuf would keep as
an unknown field, silently dropping the value), a ``scalars`` tensor that is not one number.
Protobuf parsing took up to 43 times a record's size in memory (measured for a record of
empty repeated messages), so a record other than an ``add_scalar`` value is parsed only up to
:data:`MAX_PARSED_RECORD` bytes; a larger one is an error.

Kept in one module, longer than most: the framing walk, the checksum comparison, the
vectorised decoder and the protobuf fallback all work on one whole-file buffer through the same
arrays of record offsets, and :func:`read_scalars` ties them together; the CRC arithmetic is
in :mod:`lightning_spectral._crc32c`, the test writer in
:func:`lightning_spectral.testing.write_scalars`.
"""
from __future__ import annotations

import errno
import functools
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lightning_spectral._crc32c import crc32c_many, crc32c_of_lengths, mask, masked_crc32c

__all__ = [
    "MAX_PARSED_RECORD",
    "EventFileError",
    "NotRegularFileError",
    "ScalarRecords",
    "file_kind",
    "open_regular",
    "read_scalars",
]


class EventFileError(Exception):
    """An event file could not be read: truncated, failed a checksum, or malformed."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class NotRegularFileError(OSError):
    """A path that is not a regular file (a FIFO, socket, device or directory) was to be read;
    ``strerror`` says what it is."""

    def __init__(self, path: Path | str, kind: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))
        self.kind = kind


def file_kind(mode: int) -> str:
    """``'regular file'``, ``'directory'``, ``'FIFO'``, ``'socket'``, ... for an ``st_mode``."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0))


def open_regular(path: Path | str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """Open a *regular* file for reading, never blocking on a FIFO or touching a device.

    The path is checked with ``stat`` first (a FIFO, socket or device is never opened), then
    opened non-blocking and checked again on the open descriptor (so a file swapped for a FIFO
    in between is refused too). Raises :class:`NotRegularFileError` or any other
    :class:`OSError`; ``kwargs`` go to :func:`open` (``encoding``, ``newline``, ...).
    """
    mode_bits = os.stat(path).st_mode
    if not stat.S_ISREG(mode_bits):
        raise NotRegularFileError(path, file_kind(mode_bits))
    fd = os.open(path, _OPEN_FLAGS)
    try:
        mode_bits = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode_bits):
            raise NotRegularFileError(path, file_kind(mode_bits))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return open(fd, mode, closefd=True, **kwargs)  # the caller closes it
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------- other records

#: Largest record, other than an ``add_scalar`` value, that is parsed (bytes). Protobuf
#: parsing took up to 43 times a record's size in memory (measured: a record of empty repeated
#: messages), so this bounds one parse to well under 1 GiB; the largest record of the digits
#: demo's runs (a spectrum figure) is 62 KiB, an image or a graph is rarely over a few MiB.
MAX_PARSED_RECORD = 16 * 2**20

# TensorProto dtype enum -> (struct code, itemsize) for tensor_content
_DTYPES = {1: ("<f", 4), 2: ("<d", 8), 3: ("<i", 4), 9: ("<q", 8), 19: ("<e", 2),
           4: ("<B", 1), 5: ("<h", 2), 6: ("<b", 1), 10: ("<?", 1), 17: ("<H", 2),
           22: ("<I", 4), 23: ("<Q", 8), 14: ("bf16", 2)}
_WIRE_NAMES = {0: "varint", 1: "fixed64", 2: "length-delimited", 3: "group", 5: "fixed32"}
# TensorProto's number fields other than tensor_content (half_val holds raw float16 bits)
_NUMBER_FIELDS = ("float_val", "double_val", "int_val", "int64_val", "bool_val", "half_val",
                  "uint32_val", "uint64_val")


@functools.cache
def _event_class() -> Any:
    """TensorBoard's ``Event`` message class (imported on first use: CSV runs and files of
    ``add_scalar`` records only never load protobuf)."""
    from tensorboard.compat.proto.event_pb2 import Event

    return Event


@functools.cache
def _unknown_field_set() -> Any:
    """``google.protobuf.unknown_fields.UnknownFieldSet``, or None in releases without it."""
    try:
        # (no type stubs for protobuf need be installed)
        from google.protobuf.unknown_fields import (  # type: ignore[import-untyped,unused-ignore]
            UnknownFieldSet,
        )
    except ImportError:
        return None
    return UnknownFieldSet


def _unknown_fields(msg: Any) -> list[tuple[int, int]] | None:
    """``(field number, wire type)`` of ``msg``'s own unknown fields; None where this protobuf
    cannot list them (older upb-based releases)."""
    field_set = _unknown_field_set()
    if field_set is not None:
        return [(f.field_number, f.wire_type) for f in field_set(msg)]
    try:
        return [(f.field_number, f.wire_type) for f in msg.UnknownFields()]
    except (AttributeError, NotImplementedError):
        return None


def _repeated(field: Any) -> bool:
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:  # older protobuf releases
        return bool(field.label == field.LABEL_REPEATED)
    return bool(repeated)


def _wire_types(field: Any) -> tuple[int, ...]:
    """The wire types a field of this descriptor may arrive with (packed repeated numbers too)."""
    kind = field.type
    if kind in (field.TYPE_STRING, field.TYPE_BYTES, field.TYPE_MESSAGE):
        return (2,)
    if kind == field.TYPE_GROUP:
        return (3,)
    if kind in (field.TYPE_DOUBLE, field.TYPE_FIXED64, field.TYPE_SFIXED64):
        wire = 1
    elif kind in (field.TYPE_FLOAT, field.TYPE_FIXED32, field.TYPE_SFIXED32):
        wire = 5
    else:
        wire = 0
    return (wire, 2) if _repeated(field) else (wire,)


def _name(msg: Any) -> str:
    """``Summary.Value`` for ``tensorboard.Summary.Value``."""
    return str(msg.DESCRIPTOR.full_name).removeprefix("tensorboard.")


def _check_wire_types(msg: Any) -> None:
    """Raise ValueError where a known field of ``msg`` or of a message inside it came with
    another wire type (protobuf keeps such a field as an unknown field and drops its value)."""
    unknown = _unknown_fields(msg)
    if unknown is None:  # cannot tell which fields: any unknown field is refused
        stripped = type(msg)()
        stripped.CopyFrom(msg)
        stripped.DiscardUnknownFields()
        if stripped.ByteSize() != msg.ByteSize():
            raise ValueError(f"{_name(msg)} has unknown fields or fields with the wrong "
                             "wire type")
        return
    known = msg.DESCRIPTOR.fields_by_number
    for number, wire in unknown:
        if number in known:
            allowed = _wire_types(known[number])
            raise ValueError(f"{_name(msg)} field {number} has wire type {wire} "
                             f"({_WIRE_NAMES.get(wire, '?')}), expected "
                             + " or ".join(f"{w} ({_WIRE_NAMES[w]})" for w in allowed))
    for field, value in msg.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        for sub in (value if _repeated(field) else (value,)):
            _check_wire_types(sub)


def _tensor_scalar(tensor: Any) -> float | None:
    """The single number of a scalar ``TensorProto`` (every dimension of size 1), or None."""
    if any(dim.size != 1 for dim in tensor.tensor_shape.dim):
        return None
    content = tensor.tensor_content
    if content:
        code = _DTYPES.get(tensor.dtype)
        if code is None or len(content) != code[1]:
            return None
        if code[0] == "bf16":  # bfloat16: the high half of a float32
            return float(struct.unpack("<f", b"\x00\x00" + content)[0])
        return float(struct.unpack(code[0], content)[0])
    filled = [name for name in _NUMBER_FIELDS if len(getattr(tensor, name))]
    if len(filled) != 1 or len(getattr(tensor, filled[0])) != 1:
        return None
    value = getattr(tensor, filled[0])[0]
    if filled[0] == "half_val":
        return float(struct.unpack("<e", struct.pack("<H", value & 0xFFFF))[0])
    return float(value)


def _decode_event(
    data: bytes, plugins: dict[bytes, str]
) -> tuple[int, list[tuple[bytes, float]]]:
    """``(step, [(tag, value), ...])`` of the scalar values in one serialized Event.

    Raises ``DecodeError`` or ValueError for a malformed record (not a valid Event, a known
    field with the wrong wire type, a ``scalars`` tensor that is not one number).
    """
    event = _event_class().FromString(data)
    _check_wire_types(event)
    out: list[tuple[bytes, float]] = []
    for value in event.summary.value:
        tag = value.tag.encode("utf-8")  # the fast path's key: the tag's bytes in the file
        plugin = value.metadata.plugin_data.plugin_name
        if plugin and tag not in plugins:
            plugins[tag] = plugin  # writers may send the metadata only with a tag's first value
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            out.append((tag, float(value.simple_value)))
        elif kind == "tensor" and plugins.get(tag) == "scalars":
            number = _tensor_scalar(value.tensor)
            if number is None:
                shown = tag.decode("utf-8", "backslashreplace")
                raise ValueError(f"tag {shown!r}: a 'scalars' tensor that is not one number")
            out.append((tag, number))
    return event.step, out


# --------------------------------------------------------------------------- file reader


@dataclass
class ScalarRecords:
    """Every scalar of one file in record order: ``tags[tag_ids[i]]`` at ``steps[i]``."""

    tags: list[str]
    tag_ids: np.ndarray  # int64
    steps: np.ndarray  # int64
    values: np.ndarray  # float64
    first_wall_time: float
    truncated_at: int | None = None  # byte offset of an incomplete last record (ignored)
    file_size: int = 0


def _vec_varint(arr: np.ndarray, pos: np.ndarray, max_bytes: int) -> tuple[np.ndarray, ...]:
    """Decode a varint at each ``pos``: ``(value, next position, ok)``."""
    last = len(arr) - 1
    value = np.zeros(len(pos), dtype=np.int64)
    done = np.zeros(len(pos), dtype=bool)
    nxt = pos.copy()
    for k in range(max_bytes):
        b = arr[np.minimum(pos + k, last)].astype(np.int64)
        active = ~done
        value |= np.where(active, (b & 0x7F) << (7 * k), 0)
        end = active & (b < 0x80)
        nxt = np.where(end, pos + k + 1, nxt)
        done |= end
        if done.all():
            break
    return value, nxt, done


def _fast_scalars(
    arr: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised decoding of ``add_scalar`` records; returns ``ok`` and the decoded parts."""
    n = len(arr)
    ends = starts + lengths
    last = n - 1
    ok = (lengths >= 17) & (arr[np.minimum(starts, last)] == 0x09)
    p = starts + 9
    has_step = arr[np.minimum(p, last)] == 0x10
    step, after_step, good = _vec_varint(arr, p + 1, 9)
    ok &= ~has_step | good
    step = np.where(has_step, step, 0)
    p = np.where(has_step, after_step, p)
    ok &= arr[np.minimum(p, last)] == 0x2A
    size, p, good = _vec_varint(arr, p + 1, 3)
    ok &= good & (p + size == ends)
    ok &= arr[np.minimum(p, last)] == 0x0A
    size, p, good = _vec_varint(arr, p + 1, 3)
    ok &= good & (p + size == ends)
    ok &= arr[np.minimum(p, last)] == 0x0A
    size, tag_start, good = _vec_varint(arr, p + 1, 3)
    tag_end = tag_start + size
    ok &= good & (tag_end + 5 == ends)
    ok &= arr[np.minimum(tag_end, last)] == 0x15
    return ok, step, tag_start, tag_end


def _float32_at(arr: np.ndarray, pos: np.ndarray) -> np.ndarray:
    raw = arr[pos[:, None] + np.arange(4)]
    return np.ascontiguousarray(raw).view("<f4").reshape(-1).astype(np.float64)


def _float64_at(arr: np.ndarray, pos: int) -> float:
    return float(np.frombuffer(arr[pos : pos + 8].tobytes(), dtype="<f8")[0])


def _tags_by_dict(buf: bytes, starts: np.ndarray, ends: np.ndarray,
                  index: dict[bytes, int]) -> np.ndarray:
    """Tag id of every record ``buf[starts[i]:ends[i]]``, registering new tags in ``index``.

    (A vectorised alternative — hashing the tag bytes with NumPy and grouping by hash — was
    measured slower than this dictionary over byte slices.)
    """
    setdefault = index.setdefault
    return np.fromiter(
        (setdefault(buf[a:b], len(index))
         for a, b in zip(starts.tolist(), ends.tolist(), strict=True)),
        dtype=np.int64, count=len(starts),
    )


def _lengths_at(arr: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The uint64 record lengths stored at ``pos`` (each ``pos + 8 <= len(arr)``), as int64."""
    raw = np.ascontiguousarray(arr[pos[:, None] + np.arange(8)])
    return raw.view("<u8").reshape(-1).astype(np.int64)


def _walk_simple(buf: bytes, off: int, limit: int) -> tuple[list[int], list[int], int]:
    """Follow the framing from ``off`` over at most ``limit`` records, one at a time."""
    heads: list[int] = []
    lengths: list[int] = []
    unpack = struct.Struct("<Q").unpack_from
    n = len(buf)
    add_head, add_length = heads.append, lengths.append
    try:
        for _ in range(limit):
            if off >= n:
                break
            (length,) = unpack(buf, off)
            add_head(off)
            add_length(length)
            off += length + 16
    except struct.error:  # fewer than 8 bytes left: a truncated header
        pass
    return heads, lengths, off


def _period(lengths: np.ndarray, max_period: int = 1024) -> int | None:
    """Smallest ``p`` for which the whole window ``lengths`` is ``p``-periodic (``p`` at most
    half the window), or None."""
    m = len(lengths)
    top = min(max_period, m // 2)
    if top < 1:
        return None
    # candidates: shifts under which the last value repeats
    tail = lengths[m - 1 - top : m - 1][::-1]
    for p in (np.flatnonzero(tail == lengths[-1]) + 1).tolist():
        if np.array_equal(lengths[p:], lengths[:-p]):
            return p
    return None


_WALK_CHUNK = 4096  # records followed one by one before (re)trying speculation
_SPECULATE = 1 << 16  # records predicted per speculative step


def _walk(buf: bytes, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Offsets and lengths of every record, and the offset where the walk ended (``len(buf)``
    when the framing is intact).

    Following the framing is sequential, which costs a Python step per record. Event files are
    usually periodic (every logging step writes the same tags, so the same record lengths), so
    after a stretch walked one record at a time the walk *speculates*: it predicts the next
    lengths by repeating the detected period, computes where those records would start, reads
    the lengths actually stored there in one vectorised gather and accepts the prefix where the
    prediction holds. Every accepted offset is thus one the plain walk would have reached; on
    the first mismatch it falls back to the plain walk.
    """
    n = len(buf)
    parts: list[np.ndarray] = []
    length_parts: list[np.ndarray] = []
    recent = np.zeros(0, dtype=np.int64)
    off = 0
    while off < n:
        heads, lengths, new_off = _walk_simple(buf, off, _WALK_CHUNK)
        if heads:
            parts.append(np.asarray(heads, dtype=np.int64))
            length_parts.append(np.asarray(lengths, dtype=np.uint64).astype(np.int64))
            recent = np.concatenate([recent, length_parts[-1]])[-4096:]
        if new_off == off or new_off >= n:
            off = new_off
            break
        off = new_off
        p = _period(recent)
        while p is not None and off < n:
            guess = np.tile(recent[-p:], max(1, _SPECULATE // p))
            ends = off + np.cumsum(guess + 16)
            fits = int(np.searchsorted(ends, n, side="right"))  # records ending inside the file
            if fits == 0:
                break
            starts = np.concatenate([[off], ends[: fits - 1]])
            wrong = np.flatnonzero(_lengths_at(arr, starts) != guess[:fits])
            good = int(wrong[0]) if len(wrong) else fits
            if good == 0:
                break
            parts.append(starts[:good])
            length_parts.append(guess[:good])
            recent = np.concatenate([recent, guess[:good]])[-4096:]
            off = int(ends[good - 1])
            if good < len(guess):
                break
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), off
    return np.concatenate(parts), np.concatenate(length_parts), off


def _read_file(path: Path) -> bytes:
    try:
        with open_regular(path) as handle:
            return handle.read()
    except OSError as exc:
        raise EventFileError(path, f"cannot read ({exc.strerror or exc})") from exc


def read_scalars(path: Path | str, *, allow_truncated: bool = False) -> ScalarRecords:
    """Every scalar value in the event file at ``path``, checksums verified.

    Raises :class:`EventFileError` (naming the file) for an unreadable (or not regular),
    truncated or corrupt file. With ``allow_truncated=True`` an *incomplete last record* — the
    file ends inside it, and its length field, when present in full, passes its checksum: a
    file still being written, or cut short by a crash — is left out and its offset returned
    in ``truncated_at``; a record failing a checksum is still an error.
    """
    path = Path(path)
    buf = _read_file(path)
    arr = np.frombuffer(buf, dtype=np.uint8)
    n = len(buf)
    # 1. walk the framing (a declared length is only added to an offset, never allocated)
    heads, lengths, off = _walk(buf, arr)
    truncated_at = None
    if off != n:
        if off < n:  # fewer than the 8 bytes of a length field are left
            tail = off
        else:  # the last record runs past the end of the file
            tail = int(heads[-1])
            heads, lengths = heads[:-1], lengths[:-1]
            if n - tail >= 12:
                head_crc = struct.unpack_from("<I", buf, tail + 8)[0]
                if masked_crc32c(buf[tail : tail + 8]) != head_crc:
                    declared = struct.unpack_from("<Q", buf, tail)[0]
                    raise EventFileError(path, f"corrupt record at byte {tail}: its length "
                                               f"field ({declared}) fails its checksum (file "
                                               f"is {n} bytes)")
        if not allow_truncated:
            raise EventFileError(path, f"truncated record at byte {tail} (file is {n} bytes)")
        truncated_at = tail
    if len(heads) == 0:
        return ScalarRecords([], np.zeros(0, np.int64), np.zeros(0, np.int64),
                             np.zeros(0), float("nan"), truncated_at, n)
    # 2. checksums
    def stored(pos: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(arr[pos[:, None] + np.arange(4)])
        return raw.view("<u4").reshape(-1)

    head_crc = mask(crc32c_of_lengths(lengths))
    bad = np.flatnonzero(head_crc != stored(heads + 8))
    if len(bad):
        raise EventFileError(path, f"record at byte {int(heads[bad[0]])} failed its length "
                                   "checksum (corrupt file)")
    starts = heads + 12
    data_crc = mask(crc32c_many(arr, starts, lengths))
    bad = np.flatnonzero(data_crc != stored(starts + lengths))
    if len(bad):
        raise EventFileError(path, f"record at byte {int(heads[bad[0]])} failed its data "
                                   "checksum (corrupt file)")
    first_wall = _float64_at(arr, int(starts[0]) + 1) if lengths[0] >= 9 and buf[
        int(starts[0])] == 0x09 else float("nan")
    # 3. decode: vectorised path for add_scalar records, TensorBoard's Event for the rest
    ok, step, tag_start, tag_end = _fast_scalars(arr, starts, lengths)
    fast = np.flatnonzero(ok)
    order_fast = fast
    values_fast = _float32_at(arr, tag_end[fast] + 1)
    tag_index: dict[bytes, int] = {}
    ids_fast = _tags_by_dict(buf, tag_start[fast], tag_end[fast], tag_index)
    setdefault = tag_index.setdefault
    slow_order: list[int] = []
    slow_ids: list[int] = []
    slow_steps: list[int] = []
    slow_values: list[float] = []
    plugins: dict[bytes, str] = {}
    others = np.flatnonzero(~ok).tolist()
    if others:
        from google.protobuf.message import (  # type: ignore[import-untyped,unused-ignore]
            DecodeError,
        )
    for i in others:
        s, size = int(starts[i]), int(lengths[i])
        if size > MAX_PARSED_RECORD:
            raise EventFileError(path, f"record at byte {int(heads[i])} holds {size} bytes, more "
                                       f"than the {MAX_PARSED_RECORD} bytes this reader parses "
                                       "for a record other than an add_scalar value")
        try:
            st, pairs = _decode_event(buf[s : s + size], plugins)
        except (DecodeError, ValueError, TypeError, OverflowError, IndexError,
                struct.error) as exc:
            raise EventFileError(path, f"record at byte {int(heads[i])} is not a valid "
                                       f"Event ({exc})") from exc
        for tag, value in pairs:
            slow_order.append(i)
            slow_ids.append(setdefault(tag, len(tag_index)))
            slow_steps.append(st)
            slow_values.append(value)
    order = np.concatenate([order_fast, np.asarray(slow_order, dtype=np.int64)])
    ids = np.concatenate([ids_fast, np.asarray(slow_ids, dtype=np.int64)])
    steps = np.concatenate([step[fast], np.asarray(slow_steps, dtype=np.int64)])
    values = np.concatenate([values_fast, np.asarray(slow_values, dtype=np.float64)])
    if slow_order:
        perm = np.argsort(order, kind="stable")
        ids, steps, values = ids[perm], steps[perm], values[perm]
    tags = [t.decode("utf-8", errors="backslashreplace") for t in tag_index]
    return ScalarRecords(tags, ids, steps, values, first_wall, truncated_at, n)
