"""Read every scalar of a TensorBoard event file, with the record checksums verified.

An event file is a sequence of TFRecords: ``uint64 length | uint32 masked_crc32c(length) |
data[length] | uint32 masked_crc32c(data)``, each ``data`` a serialized ``tensorboard.Event``.
TensorBoard's ``EventAccumulator`` can keep every value (its default keeps a reservoir of
10,000 scalars per tag; ``size_guidance={"scalars": 0}`` keeps all), but it is slow — pure
Python CRC and protobuf parsing per record — and it skips a truncated or corrupt record with a
log message. A gate needs the opposite on both counts: fast on millions of records, and loud
about truncation and corruption (a bad record is an error naming the file and byte offset).
So this module reads the records itself. Its writer for tests and benchmarks is
:func:`lightning_spectral.testing.write_scalars`.

Speed matters (a run of 200 tags × 10,000 steps holds two million records), so the work is done
on whole arrays with NumPy:

* CRC-32C (Castagnoli) of many records at once. The CRC register update is linear over GF(2),
  so the register after a message ``b_0 … b_{L-1}`` (initial register 0) is
  ``XOR_p E[L-1-p][b_p]`` with ``E[k][b]`` the register left by byte ``b`` followed by ``k``
  zero bytes. Records of equal length are reduced together in one table gather; longer records
  are cut into 256-byte blocks whose registers are chained. The initial register
  ``0xFFFFFFFF`` is equivalent to XOR-ing ``0xFF`` into the first four message bytes (its
  contribution is tabulated per length).
* The common record written by ``SummaryWriter.add_scalar`` (and so by Lightning's
  ``TensorBoardLogger``) — ``Event{wall_time, step, summary{value{tag, simple_value}}}`` in
  canonical field order — is decoded with vectorised byte checks; every other record goes
  through a small protobuf wire-format decoder that also understands tensor-encoded scalars
  (``Summary.Value.tensor`` with the ``scalars`` plugin, as TF2 and ``new_style`` writers emit).

No TensorFlow, TensorBoard or torch import is needed.

Hostile input: only regular files are opened (:func:`open_regular` refuses FIFOs, sockets and
devices before and after opening, without ever blocking), the whole file is read once and a
record's declared length is never allocated (a length running past the end of the file is an
incomplete record), and every malformed record raises :class:`EventFileError`. A known field
with the wrong protobuf wire type is malformed.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, overload

import numpy as np

__all__ = [
    "EventFileError",
    "NotRegularFileError",
    "ScalarRecords",
    "file_kind",
    "open_regular",
    "read_scalars",
    "masked_crc32c",
    "crc32c",
]

_POLY = 0x82F63B78  # CRC-32C, reflected
_MASK_DELTA = 0xA282EAD8
_SHORT = 256  # records up to this many bytes are checked in one gather per length
_ROWS_ELEMS = 1 << 22  # elements per gather chunk (bounded memory)


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


def _make_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _make_table()


def _make_shift_tables(n: int) -> np.ndarray:
    """``E[k][b]``: the register after byte ``b`` then ``k`` zero bytes, from register 0."""
    e = np.empty((n, 256), dtype=np.uint32)
    e[0] = _TABLE
    for k in range(1, n):
        prev = e[k - 1]
        e[k] = _TABLE[prev & 0xFF] ^ (prev >> 8)
    return e


_E = _make_shift_tables(_SHORT)
_E_REV = np.ascontiguousarray(_E[::-1])  # row j: byte at column j of a right-aligned width-256 row


def _init_contribution(length: int) -> int:
    """Register contribution of the initial value 0xFFFFFFFF for a message of ``length``."""
    out = 0
    for i in range(min(length, 4)):
        out ^= int(_E[length - 1 - i][0xFF]) if length - 1 - i < _SHORT else 0
    if length < 4:
        out ^= 0xFFFFFFFF >> (8 * length)
    return out


_INIT = np.array([_init_contribution(n) for n in range(_SHORT + 1)], dtype=np.uint32)


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (reference implementation, one byte at a time)."""
    crc = 0xFFFFFFFF
    table = _TABLE.tolist()
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@overload
def _mask(crc: np.ndarray) -> np.ndarray: ...
@overload
def _mask(crc: int) -> int: ...
def _mask(crc: np.ndarray | int) -> np.ndarray | int:
    if isinstance(crc, np.ndarray):
        crc = crc.astype(np.uint64)
        out = (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF
        return out.astype(np.uint32)
    crc = int(crc)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that TFRecord framing stores."""
    return int(_mask(crc32c(data)))


def _crc_long(arr: np.ndarray, start: int, length: int) -> int:
    """CRC-32C of one long record: 256-byte blocks reduced at once, then chained."""
    msg = arr[start : start + length].copy()
    msg[:4] ^= 0xFF  # the initial register, folded into the first four bytes (length >= 4)
    pad = (-length) % _SHORT
    blocks = np.concatenate([np.zeros(pad, dtype=np.uint8), msg]).reshape(-1, _SHORT)
    cols = np.arange(_SHORT)
    lin = np.bitwise_xor.reduce(_E_REV[cols[None, :], blocks], axis=1).tolist()
    shift = [_E[_SHORT - 1 - i].tolist() for i in range(4)]
    reg = 0
    for value in lin:
        reg = (
            shift[0][reg & 0xFF]
            ^ shift[1][(reg >> 8) & 0xFF]
            ^ shift[2][(reg >> 16) & 0xFF]
            ^ shift[3][reg >> 24]
            ^ value
        )
    return reg ^ 0xFFFFFFFF


def _crc_exact(arr: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """CRC-32C of records that all have ``length`` (<= 256) bytes: one gather, no padding."""
    out = np.empty(len(starts), dtype=np.uint32)
    if length == 0:
        out[:] = 0
        return out
    itype = np.int32 if len(arr) < 2**31 - 1 else np.int64
    flat = _E_REV[_SHORT - length :].reshape(-1)
    base = (np.arange(length, dtype=np.int32) * 256)[:, None]
    cols = np.arange(length, dtype=itype)[:, None]
    final = _INIT[length] ^ np.uint32(0xFFFFFFFF)
    rows_per_chunk = max(1, _ROWS_ELEMS // length)
    for lo in range(0, len(starts), rows_per_chunk):
        s = starts[lo : lo + rows_per_chunk].astype(itype)
        m = arr[cols + s[None, :]]  # (length, rows): the reduction runs over contiguous rows
        vals = flat[base + m]
        out[lo : lo + len(s)] = np.bitwise_xor.reduce(vals, axis=0) ^ final
    return out


def _crc_many(arr: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC-32C of ``arr[s:s+L]`` for every record: grouped by length, long ones in blocks."""
    out = np.empty(len(starts), dtype=np.uint32)
    if len(starts) == 0:
        return out
    short = np.flatnonzero(lengths <= _SHORT)
    if len(short):
        values, inverse = np.unique(lengths[short], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(values) + 1))
        for k, length in enumerate(values.tolist()):
            sel = short[order[bounds[k] : bounds[k + 1]]]
            out[sel] = _crc_exact(arr, starts[sel], int(length))
    for i in np.flatnonzero(lengths > _SHORT).tolist():
        out[i] = _crc_long(arr, int(starts[i]), int(lengths[i]))
    return out


def _crc_of_lengths(lengths: np.ndarray) -> np.ndarray:
    """CRC-32C of the 8-byte little-endian encodings of ``lengths`` (computed once per value)."""
    values, inverse = np.unique(lengths, return_inverse=True)
    raw = np.frombuffer(values.astype("<u8").tobytes(), dtype=np.uint8)
    crcs = _crc_exact(raw, np.arange(len(values), dtype=np.int64) * 8, 8)
    return crcs[inverse.reshape(-1)]


# --------------------------------------------------------------------------- protobuf wire


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos  # protobuf keeps the low 64 bits
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field number, wire type, value)``; LEN values are ``bytes``."""
    value: int | bytes
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > n:
                raise ValueError("truncated fixed64")
            value = buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > n:
                raise ValueError("truncated length-delimited field")
            value = buf[pos : pos + size]
            pos += size
        elif wire == 5:
            if pos + 4 > n:
                raise ValueError("truncated fixed32")
            value = buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, value


# TensorProto dtype enum -> (struct code, itemsize) for tensor_content
_DTYPES = {1: ("<f", 4), 2: ("<d", 8), 3: ("<i", 4), 9: ("<q", 8), 19: ("<e", 2),
           4: ("<B", 1), 5: ("<h", 2), 6: ("<b", 1), 10: ("<?", 1), 17: ("<H", 2),
           22: ("<I", 4), 23: ("<Q", 8), 14: ("bf16", 2)}
_WIRE_NAMES = {0: "varint", 1: "fixed64", 2: "length-delimited", 5: "fixed32"}


def _expect(message: str, field: int, wire: int, *allowed: int) -> None:
    """A known field must have its wire type (a mismatch is a malformed record)."""
    if wire not in allowed:
        raise ValueError(f"{message} field {field} has wire type {wire} "
                         f"({_WIRE_NAMES.get(wire, '?')}), expected "
                         + " or ".join(f"{w} ({_WIRE_NAMES[w]})" for w in allowed))


def _unpack_numbers(code: str, size: int, value: bytes) -> tuple[float, ...]:
    if len(value) % size:
        raise ValueError(f"packed field of {len(value)} bytes is not a multiple of {size}")
    return struct.unpack(f"<{len(value) // size}{code}", value)


def _tensor_scalar(buf: bytes) -> float | None:
    """The single number of a scalar ``TensorProto``, or None if it is not one number."""
    dtype = 0
    values: list[float] = []
    content = b""
    scalar_shape = True
    for field, wire, value in _fields(buf):
        if field == 1:  # dtype
            _expect("TensorProto", field, wire, 0)
            dtype = value
        elif field == 2:  # shape: any dimension other than size 1 -> not scalar
            _expect("TensorProto", field, wire, 2)
            for f2, w2, dim in _fields(value):
                if f2 == 2:
                    _expect("TensorShapeProto", f2, w2, 2)
                    for f3, w3, size in _fields(dim):
                        if f3 == 1:
                            _expect("TensorShapeProto.Dim", f3, w3, 0)
                            if size != 1:
                                scalar_shape = False
        elif field == 4:  # tensor_content
            _expect("TensorProto", field, wire, 2)
            content = value
        elif field == 5:  # float_val
            _expect("TensorProto", field, wire, 5, 2)
            values += _unpack_numbers("f", 4, value)
        elif field == 6:  # double_val
            _expect("TensorProto", field, wire, 1, 2)
            values += _unpack_numbers("d", 8, value)
        elif field in (7, 10, 11, 13, 16, 17):  # int, int64, bool, half, uint32, uint64 (varints)
            _expect("TensorProto", field, wire, 0, 2)
            if wire == 2:
                pos, raw = 0, []
                while pos < len(value):
                    v, pos = _varint(value, pos)
                    raw.append(v)
            else:
                raw = [value]
            for v in raw:
                if field == 13:
                    values.append(struct.unpack("<e", struct.pack("<H", v & 0xFFFF))[0])
                elif field == 11:
                    values.append(float(bool(v)))
                elif field in (16, 17):
                    values.append(float(v & (0xFFFFFFFF if field == 16 else (1 << 64) - 1)))
                elif field == 7:
                    v &= 0xFFFFFFFF
                    values.append(float(v - (1 << 32) if v >= 1 << 31 else v))
                else:
                    values.append(float(v - (1 << 64) if v >= 1 << 63 else v))
    if not scalar_shape:
        return None
    if content:
        code = _DTYPES.get(dtype)
        if code is None or len(content) != code[1]:
            return None
        if code[0] == "bf16":  # bfloat16: the high half of a float32
            return float(struct.unpack("<f", b"\x00\x00" + content)[0])
        return float(struct.unpack(code[0], content)[0])
    if len(values) == 1:
        return float(values[0])
    return None


def _decode_event(
    data: bytes, plugins: dict[bytes, bytes]
) -> tuple[int, list[tuple[bytes, float]]]:
    """``(step, [(tag, value), ...])`` of the scalar values in one serialized Event.

    Raises ValueError for a malformed record (truncated field, a known field with the wrong
    wire type, a ``scalars`` tensor that is not one number).
    """
    step = 0
    summary = None
    for field, wire, value in _fields(data):
        if field == 2:
            _expect("Event", field, wire, 0)
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 5:
            _expect("Event", field, wire, 2)
            summary = value
    if summary is None:
        return step, []
    out: list[tuple[bytes, float]] = []
    for field, wire, value in _fields(summary):
        if field != 1:
            continue
        _expect("Summary", field, wire, 2)
        tag = b""
        simple = None
        tensor = None
        plugin = None
        for f, w, v in _fields(value):
            if f == 1:
                _expect("Summary.Value", f, w, 2)
                tag = v
            elif f == 2:
                _expect("Summary.Value", f, w, 5)
                simple = struct.unpack("<f", v)[0]
            elif f == 8:
                _expect("Summary.Value", f, w, 2)
                tensor = v
            elif f == 9:  # SummaryMetadata
                _expect("Summary.Value", f, w, 2)
                for f2, w2, v2 in _fields(v):
                    if f2 == 1:  # PluginData
                        _expect("SummaryMetadata", f2, w2, 2)
                        for f3, w3, v3 in _fields(v2):
                            if f3 == 1:
                                _expect("PluginData", f3, w3, 2)
                                plugin = v3
        if plugin is not None and tag not in plugins:
            plugins[tag] = plugin  # writers may send the metadata only with a tag's first value
        if simple is not None:
            out.append((tag, float(simple)))
        elif tensor is not None and plugins.get(tag) == b"scalars":
            number = _tensor_scalar(tensor)
            if number is None:
                shown = tag.decode("utf-8", "backslashreplace")
                raise ValueError(f"tag {shown!r}: a 'scalars' tensor that is not one number")
            out.append((tag, number))
    return step, out


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

    head_crc = _mask(_crc_of_lengths(lengths))
    bad = np.flatnonzero(head_crc != stored(heads + 8))
    if len(bad):
        raise EventFileError(path, f"record at byte {int(heads[bad[0]])} failed its length "
                                   "checksum (corrupt file)")
    starts = heads + 12
    data_crc = _mask(_crc_many(arr, starts, lengths))
    bad = np.flatnonzero(data_crc != stored(starts + lengths))
    if len(bad):
        raise EventFileError(path, f"record at byte {int(heads[bad[0]])} failed its data "
                                   "checksum (corrupt file)")
    first_wall = _float64_at(arr, int(starts[0]) + 1) if lengths[0] >= 9 and buf[
        int(starts[0])] == 0x09 else float("nan")
    # 3. decode: vectorised path for add_scalar records, wire decoder for the rest
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
    plugins: dict[bytes, bytes] = {}
    for i in np.flatnonzero(~ok).tolist():
        s = int(starts[i])
        try:
            st, pairs = _decode_event(buf[s : s + int(lengths[i])], plugins)
        except (ValueError, TypeError, OverflowError, IndexError, struct.error) as exc:
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
