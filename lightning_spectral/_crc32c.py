"""CRC-32C (Castagnoli) of TFRecord framing, for many records at once with NumPy.

TensorBoard event files frame every record with masked CRC-32C checksums of its length field
and its data. Checking two million records one byte at a time in Python would take minutes, so
the checksums are computed on whole arrays: the CRC register update is linear over GF(2), so
the register after a message ``b_0 … b_{L-1}`` (initial register 0) is ``XOR_p E[L-1-p][b_p]``
with ``E[k][b]`` the register left by byte ``b`` followed by ``k`` zero bytes. Records of equal
length are reduced together in one table gather (:func:`crc32c_many`); longer records are cut
into 256-byte blocks whose registers are chained. The initial register ``0xFFFFFFFF`` is
equivalent to XOR-ing ``0xFF`` into the first four message bytes (its contribution is tabulated
per length). :func:`crc32c` is the one-byte-at-a-time reference.

Used by the event-file reader (:mod:`lightning_spectral._eventfile`) and by the test writer
:func:`lightning_spectral.testing.write_scalars`.
"""

from __future__ import annotations

from typing import overload

import numpy as np

__all__ = ["crc32c", "crc32c_many", "crc32c_of_lengths", "mask", "masked_crc32c"]

_POLY = 0x82F63B78  # CRC-32C, reflected
_MASK_DELTA = 0xA282EAD8
_SHORT = 256  # records up to this many bytes are checked in one gather per length
_ROWS_ELEMS = 1 << 22  # elements per gather chunk (bounded memory)


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
def mask(crc: np.ndarray) -> np.ndarray: ...
@overload
def mask(crc: int) -> int: ...
def mask(crc: np.ndarray | int) -> np.ndarray | int:
    """TFRecord's masking of a CRC (a rotation by 15 bits plus a constant), elementwise."""
    if isinstance(crc, np.ndarray):
        crc = crc.astype(np.uint64)
        out = (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF
        return out.astype(np.uint32)
    crc = int(crc)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that TFRecord framing stores."""
    return int(mask(crc32c(data)))


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


def crc32c_many(arr: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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


def crc32c_of_lengths(lengths: np.ndarray) -> np.ndarray:
    """CRC-32C of the 8-byte little-endian encodings of ``lengths`` (computed once per value)."""
    values, inverse = np.unique(lengths, return_inverse=True)
    raw = np.frombuffer(values.astype("<u8").tobytes(), dtype=np.uint8)
    crcs = _crc_exact(raw, np.arange(len(values), dtype=np.int64) * 8, 8)
    return crcs[inverse.reshape(-1)]
