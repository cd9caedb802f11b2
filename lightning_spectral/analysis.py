"""Offline per-matrix analysis of a checkpoint's weights.

The quantities are defined in docs/definitions.md#weights (with #stable-rank and #erank).

No model code is needed: a Lightning ``.ckpt`` (its ``"state_dict"``) or a plain ``state_dict``
file is read as a mapping from names to tensors, and every *weight matrix* in it is decomposed.

**Which tensors are weight matrices** (decision, documented in ``docs/compression.md``): a
floating-point tensor with at least two dimensions whose name (last dotted component) ends in
``weight`` — ``fc.weight``, ``conv.weight``, ``attn.in_proj_weight``, ``emb.weight``. Biases,
BatchNorm/LayerNorm scales and running statistics are 1-D and so never qualify; integer buffers
(``num_batches_tracked``) are not floating. Embedding tables are **included**: they are linear maps
from one-hot inputs, and every quantity reported here (singular values, stable rank, effective
rank, truncation rank, Eckart–Young error, parameter ratio) is invariant under transposition, so
their ``(num, dim)`` layout does not matter. Use ``exclude`` (glob patterns) to drop any of them.
A tensor of shape ``(out, in, k1, ...)`` is read as ``W.reshape(out, in·k1·...)``
(docs/definitions.md#weight-matrix); for ``ConvTranspose`` kernels, stored ``(in, out, k...)``,
this is the transposed layout's reshape, which a state dict alone cannot tell apart.

**Loading** (:func:`load_state_dict`) never runs a pickle outside ``torch.load(weights_only=True)``
unless ``unsafe=True`` is passed, reads only regular files, memory-maps zip checkpoints and
refuses any tensor that would not fit in a memory budget before anything is computed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import math
import os
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from lightning_spectral.errors import SpectralError
from lightning_spectral.functional.quantities import Spectra, compute_quantities
from lightning_spectral.functional.weights import (
    singular_values_many,
    truncation_rank,
    weight_matrix,
)

__all__ = [
    "ANALYSIS_KEYS",
    "SAFE_LOAD_TYPES",
    "CheckpointError",
    "UnsafeLoadWarning",
    "analyze_spectra",
    "analyze_state_dict",
    "check_svd_budget",
    "default_max_bytes",
    "format_bytes",
    "is_weight_matrix",
    "load_state_dict",
    "load_torch_file",
    "parse_bytes",
    "select_weight_matrices",
    "summarize_spectrum",
    "svd_working_bytes",
    "weight_spectra",
]

#: The keys of one analysis row, in order (the ``--format json`` objects have exactly these).
ANALYSIS_KEYS: tuple[str, ...] = (
    "name",
    "shape",
    "params",
    "sv_max",
    "stable_rank",
    "erank",
    "rank_at_energy",
    "energy",
    "eckart_young_rel_error",
    "param_ratio",
    "alpha",
    "alpha_weighted",
)

_CHUNK = 16  # matrices per batched svdvals call (bounds the memory of one stack)


class CheckpointError(SpectralError, ValueError):
    """A file could not be read as a checkpoint or holds no weight matrices."""


# ------------------------------------------------------------------------------------------
# loading
#
# Policy (documented in docs/compression.md, "Loading policy"):
#
# 1. Only regular files are opened (a FIFO, socket or device would block or never end).
# 2. A parse-only pre-scan of the pickle (nothing is executed or imported) refuses a pickle that
#    would set attributes on a class or function, feed a tensor to a non-tensor constructor
#    (``set(t)`` iterates a zero-stride view of any length), or allocate more than the memory
#    budget while unpickling (``bytearray(n)``, nested ``_codecs.encode``, legacy storages).
# 3. The file is unpickled by ``torch.load(weights_only=True)`` alone, with the few extra types
#    of :data:`SAFE_LOAD_TYPES`; zip checkpoints are memory-mapped (``mmap=True``), so storages
#    are read lazily, only when a computation touches them.
# 4. Before anything is computed, every tensor's storage and view (``numel * element_size``,
#    what a contiguous copy needs) must fit in the memory budget.
#
# ``unsafe=True`` (``--unsafe-load``) replaces step 2 and weights-only unpickling by
# ``torch.load(weights_only=False)`` and warns; the rest still applies.


class UnsafeLoadWarning(UserWarning):
    """Emitted by ``unsafe=True``: the file is unpickled with ``weights_only=False``."""


#: Types accepted besides ``torch.load(weights_only=True)``'s defaults (tensors, storages,
#: dtypes, ``torch.Size``/``torch.device``, ``dict``/``list``/``tuple``/``set``,
#: ``OrderedDict``, ``Counter``, ``str``/``bytes``/``bytearray``, numbers, ``None``): names as
#: they appear in a pickle. Lightning's ``AttributeDict`` (hyper-parameters of older
#: checkpoints) is read as a plain ``dict``; ``PosixPath``/``WindowsPath`` are read as the
#: concrete path class where it exists on this system and as the pure path class elsewhere.
SAFE_LOAD_TYPES: tuple[str, ...] = (
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "argparse.Namespace",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)

_ZIP_MAGIC = b"PK\x03\x04"
_FALLBACK_TOTAL_MEMORY = 8 * 1024**3  # assumed when the machine's memory cannot be read
_BUDGET_FRACTION = 4  # default memory budget: 1/4 of the machine's (or cgroup's) memory
_NAME_LIMIT = 120  # characters of a tensor name or refused global printed in an error
_SCAN_PICKLES_LEGACY = 5  # magic, protocol, sys info, the object, storage keys


def _printable(text: str, limit: int | None = None) -> str:
    """``text`` with control characters (ANSI escapes, newlines) escaped, optionally cut."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                  for ch in str(text))
    if limit is not None and len(out) > limit:
        out = out[:limit] + "..."
    return out


def _error(message: str) -> CheckpointError:
    return CheckpointError(_printable(message))


def _total_memory() -> int | None:
    """Physical memory, or the cgroup's memory limit when that is lower; ``None`` if unknown."""
    sizes: list[int] = []
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page > 0:
            sizes.append(pages * page)
    except (AttributeError, ValueError, OSError):
        pass
    if not sizes:
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemTotal:"):
                        sizes.append(int(line.split()[1]) * 1024)
                        break
        except (OSError, ValueError, IndexError):
            pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file, encoding="ascii") as fh:
                value = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if 0 < value < (sizes[0] if sizes else 2**62):
            sizes.append(value)
    return min(sizes) if sizes else None


def default_max_bytes() -> int:
    """The default memory budget: a quarter of the machine's memory (or of its cgroup limit).

    Read from ``os.sysconf``, else ``/proc/meminfo``; 2 GiB (a quarter of 8 GiB) when neither
    is available.
    """
    return (_total_memory() or _FALLBACK_TOTAL_MEMORY) // _BUDGET_FRACTION


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """A memory size: a byte count or a number with a binary unit, ``512M``, ``4G``, ``1.5GiB``.

    ``K``/``M``/``G``/``T``/``P`` (optionally followed by ``B`` or ``iB``) are powers of 1024.
    Raises ``ValueError`` unless the result is a positive integer.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if match is None:
            raise ValueError(f"not a size: {text!r} (expected bytes or a number with K, M, G or "
                             "T, e.g. 512M, 4G)")
        number, unit = match.group(1), match.group(2).lower()
        value = int(float(number) * 1024 ** "_kmgtp".index(unit or "_")) if unit else int(
            float(number))
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units with three significant digits (``1.49 GiB``)."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.0f} EiB" if value < 1e6 else f"{value:.3g} EiB"


def _sized(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n} bytes ({format_bytes(n)})"


def _budget(max_bytes: int | str | None) -> int:
    return default_max_bytes() if max_bytes is None else parse_bytes(max_bytes)


def _over_budget(budget: int) -> str:
    return f"over the memory budget of {format_bytes(budget)} (--max-bytes / max_bytes)"


# ---- step 1: a regular, non-empty file

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _regular_file(p: Path) -> os.stat_result:
    """``os.stat(p)`` of a readable, non-empty regular file; else a one-line CheckpointError."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise _error(f"{p}: no such file") from None
    except NotADirectoryError:
        raise _error(f"{p}: no such file (a component of the path is not a directory)") from None
    except PermissionError:
        raise _error(f"{p}: permission denied") from None
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EIO, ...
        raise _error(f"{p}: cannot access ({exc.strerror or exc})") from None
    except ValueError as exc:  # embedded NUL byte
        raise _error(f"{p}: not a valid path ({exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _error(f"{p}: is a directory, expected a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise _error(f"{p}: is {kind}, not a regular file")
    if not os.access(p, os.R_OK):
        raise _error(f"{p}: permission denied")
    if st.st_size == 0:
        raise _error(f"{p}: empty file, not a checkpoint")
    return st


def _read_head(p: Path, n: int = 4) -> bytes:
    """The first ``n`` bytes, read without blocking (the file may have been swapped since)."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise _error(f"{p}: unreadable ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _error(f"{p}: not a regular file")
        return os.read(fd, n)
    except OSError as exc:
        raise _error(f"{p}: unreadable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


# ---- step 2: parse-only pre-scan of the pickle


class _Refused(Exception):
    """The pre-scan refuses the pickle (the message says why)."""


class _Stop(Exception):
    """The pre-scan cannot follow further; ``torch.load`` fails at the same point."""


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Obj:
    """Any unpickled object other than a tensor, with the bytes its construction allocates."""

    __slots__ = ("size",)

    def __init__(self, size: int = 0) -> None:
        self.size = size


_TENSOR = _Obj()  # a tensor or storage (identity matters)
_PERSISTENT = ("storage", b"storage")
_ELEMENT_SIZES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8,
    "QUInt8Storage": 1, "QInt8Storage": 1, "QInt32Storage": 4, "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1, "UntypedStorage": 1, "ByteStorage_": 1,
}
_NOT_TENSOR_RESULTS = {"torch.Size", "torch.device", "torch.serialization._get_layout"}
_LITERALS = {"BININT", "BININT1", "BININT2", "BINFLOAT", "LONG1", "BINUNICODE", "SHORT_BINSTRING"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def _is_rebuilder(name: str) -> bool:
    return (name.startswith("torch._utils._rebuild_")
            or name in ("torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter"))


def _size(value: Any) -> int:
    if isinstance(value, str):
        return 4 * len(value)
    if isinstance(value, (bytes, bytearray, tuple)):
        return len(value)
    if isinstance(value, _Obj):
        return value.size
    return 0


class _Scan:
    """Follows a pickle the way torch's weights-only unpickler would, executing nothing.

    Values are abstract: literals, :class:`_Global` names, :data:`_TENSOR`, tuples and
    :class:`_Obj`. Only the opcodes that unpickler implements are followed; at any other one (or
    on a malformed stream) the scan stops, because ``torch.load`` stops there too.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.allocated = 0
        self.storages: dict[str, int] = {}

    def run(self, stream: Any) -> bool:
        """Scan one pickle from ``stream``; ``True`` when it ended with STOP."""
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[Any, Any] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name == "PROTO":
                    continue
                if name == "STOP":
                    return True
                if name in _LITERALS:
                    stack.append(arg)
                elif name in _CONSTANTS:
                    stack.append(_CONSTANTS[name])
                elif name == "MARK":
                    metastack.append(stack)
                    stack = []
                elif name == "EMPTY_TUPLE":
                    stack.append(())
                elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                    stack.append(_Obj())
                elif name == "TUPLE":
                    items, stack = stack, metastack.pop()
                    stack.append(tuple(items))
                elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                    k = int(name[-1])
                    if len(stack) < k:
                        raise _Stop
                    stack[-k:] = [tuple(stack[-k:])]
                elif name in ("APPEND", "SETITEM"):
                    del stack[-(1 if name == "APPEND" else 2):]
                    if not stack:
                        raise _Stop
                elif name in ("APPENDS", "SETITEMS"):
                    stack = metastack.pop()
                    if not stack:
                        raise _Stop
                elif name in ("BINPUT", "LONG_BINPUT"):
                    memo[arg] = stack[-1]
                elif name in ("BINGET", "LONG_BINGET"):
                    stack.append(memo[arg])
                elif name == "GLOBAL":
                    module, _, qualname = str(arg).partition(" ")
                    module = {"__builtin__": "builtins"}.get(module, module)
                    stack.append(_Global(f"{module}.{qualname}"))
                elif name == "BINPERSID":
                    self._persistent(stack.pop())
                    stack.append(_TENSOR)
                elif name == "REDUCE":
                    args = stack.pop()
                    stack[-1] = self._call(stack[-1], args)
                elif name == "NEWOBJ":
                    args = stack.pop()
                    stack[-1] = self._call(stack[-1], args)
                elif name == "BUILD":
                    stack.pop()
                    target = stack[-1]
                    if isinstance(target, _Global):
                        raise _Refused(
                            f"it sets attributes on {_printable(target.name, _NAME_LIMIT)} "
                            "itself (a class or function), which would change it for the whole "
                            "process")
                else:
                    raise _Stop  # an opcode torch's weights-only unpickler refuses
        except (_Stop, IndexError, KeyError, ValueError, EOFError, TypeError, OverflowError):
            return False
        return False  # ran out of opcodes without STOP

    def _persistent(self, pid: Any) -> None:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in _PERSISTENT):
            return
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(numel, int) or isinstance(numel, bool):
            return
        kind = storage_type.name.rsplit(".", 1)[-1] if isinstance(storage_type, _Global) else ""
        nbytes = max(numel, 0) * _ELEMENT_SIZES.get(kind, 16)
        key = str(key)
        self.storages[key] = max(self.storages.get(key, 0), nbytes)

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(func, _Global):
            raise _Stop  # torch refuses to call anything but an allowed global
        name = func.name
        if _is_rebuilder(name):
            return _TENSOR
        shown = _printable(name, _NAME_LIMIT)
        if not isinstance(args, tuple):
            raise _Refused(f"it calls {shown} with arguments that are not a tuple")
        if any(a is _TENSOR for a in args):
            raise _Refused(f"it passes a tensor as an argument to {shown}")
        size = 0
        if name == "builtins.bytearray" and args:
            size = args[0] if isinstance(args[0], int) else _size(args[0])
        elif name == "_codecs.encode" and args:
            size = 4 * _size(args[0])
        elif name.startswith("torch.") and name not in _NOT_TENSOR_RESULTS:
            dims = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            size = 16 * math.prod(max(d, 0) for d in dims) if dims else 0
        self.allocated += max(int(size), 0)
        if self.allocated > self.budget:
            raise _Refused(f"unpickling would allocate at least {_sized(self.allocated)} (in "
                           f"calls to {shown}), {_over_budget(self.budget)}")
        if name.startswith("torch.") and name not in _NOT_TENSOR_RESULTS:
            return _TENSOR
        return _Obj(max(int(size), 0))


def _prescan(p: Path, is_zip: bool, file_size: int, budget: int) -> None:
    """Refuse (CheckpointError) what :class:`_Scan` refuses, and zip/legacy size tricks."""
    scan = _Scan(budget)
    try:
        if is_zip:
            _prescan_zip(p, scan, budget)
        else:
            with open(p, "rb") as fh:
                for _ in range(_SCAN_PICKLES_LEGACY):
                    if not scan.run(fh):
                        break
            declared = sum(scan.storages.values())
            if declared > file_size:
                raise _Refused(f"it declares {_sized(declared)} of tensor data but the file "
                               f"holds {_sized(file_size)} (corrupt or crafted)")
            if declared > budget:
                raise _Refused(f"its tensor data, {_sized(declared)}, is read into memory whole "
                               "(this legacy format cannot be memory-mapped), "
                               f"{_over_budget(budget)}")
    except _Refused as exc:
        raise _error(f"{p}: refused to unpickle: {exc}") from None
    except OSError as exc:
        raise _error(f"{p}: unreadable ({exc.strerror or exc})") from None


def _prescan_zip(p: Path, scan: _Scan, budget: int) -> None:
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            inflated = 0
            for info in infos:
                if info.file_size > budget:
                    raise _Refused(f"archive member {_printable(info.filename, _NAME_LIMIT)!r} "
                                   f"declares {_sized(info.file_size)}, {_over_budget(budget)}")
                if info.compress_type != zipfile.ZIP_STORED:
                    inflated += info.file_size
            if inflated > budget:
                raise _Refused(f"its compressed members inflate to {_sized(inflated)}, "
                               f"{_over_budget(budget)}")
            for info in infos:
                if info.filename == "data.pkl" or info.filename.endswith("/data.pkl"):
                    with zf.open(info) as fh:
                        data = fh.read(budget + 1)
                    scan.run(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
            RuntimeError, ValueError, OverflowError) as exc:
        text = str(exc).strip().splitlines()
        raise _error(f"{p}: not a PyTorch/Lightning checkpoint (corrupt zip archive: "
                     f"{text[0][:160] if text else type(exc).__name__})") from None


# ---- step 3: torch.load


def _torch_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _extra_safe_globals() -> list[Any]:
    """``add_safe_globals`` entries for :data:`SAFE_LOAD_TYPES` (``(type, pickle name)``)."""
    import argparse
    import pathlib

    posix = pathlib.PurePosixPath if os.name == "nt" else pathlib.PosixPath
    windows = pathlib.WindowsPath if os.name == "nt" else pathlib.PureWindowsPath
    types = {"PosixPath": posix, "WindowsPath": windows, "PurePath": pathlib.PurePath,
             "PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath}
    entries: list[Any] = []
    for name in SAFE_LOAD_TYPES:
        module, _, qualname = name.rpartition(".")
        if module == "pathlib":
            cls = types[qualname]
            # Python >= 3.13 pickles paths as pathlib._local.<name>
            entries += [(cls, name), (cls, f"pathlib._local.{qualname}")]
        elif name == "argparse.Namespace":
            entries.append((argparse.Namespace, name))
        else:  # Lightning's AttributeDict: read as a plain dict
            entries.append((dict, name))
    return entries


@contextlib.contextmanager
def _accepting_extra_types() -> Iterator[None]:
    """Allow :data:`SAFE_LOAD_TYPES` for one ``torch.load``; the caller's own list untouched."""
    ser = torch.serialization
    if _torch_version() < (2, 6) or not hasattr(ser, "safe_globals"):
        yield  # (type, name) entries need torch >= 2.6: accept torch's defaults only
        return
    present = ser.get_safe_globals()
    missing = [e for e in _extra_safe_globals() if e not in present]
    with ser.safe_globals(missing):
        yield


_GLOBAL_RE = re.compile(r"GLOBAL (\S+) was not an allowed global")
_BLOCKED_RE = re.compile(r"GLOBAL (\S+) whose module (\S+) is blocked")
_WO_ERROR_RE = re.compile(r"WeightsUnpickler error:\s*(.+)", re.DOTALL)
_UNSAFE_HINT = "use --unsafe-load (unsafe=True in Python) only for a file you trust"


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            # torch appends a paragraph about weights_only to several messages
            return line.split(" In PyTorch 2.6, we changed")[0].strip()
    return ""


def _weights_only_refusal(p: Path, message: str) -> CheckpointError:
    """One line from torch's multi-line ``UnpicklingError``, naming what was refused."""
    match = _GLOBAL_RE.search(message)
    if match:
        return _error(f"{p}: refused to unpickle {_printable(match.group(1), _NAME_LIMIT)}: "
                      f"not a type weights-only loading accepts ({_UNSAFE_HINT})")
    match = _BLOCKED_RE.search(message)
    if match:
        return _error(f"{p}: refused to unpickle {_printable(match.group(1), _NAME_LIMIT)}: "
                      f"module {_printable(match.group(2), _NAME_LIMIT)} is never allowed")
    match = _WO_ERROR_RE.search(message)
    line = _first_line(match.group(1) if match else message) or "weights-only load failed"
    return _error(f"{p}: refused to unpickle: {_printable(line, 240)} ({_UNSAFE_HINT})")


def _torch_load(p: Path, *, unsafe: bool, is_zip: bool) -> Any:
    """``torch.load`` on the CPU, memory-mapped for zip files; weights-only unless ``unsafe``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols, sources, ...
        if unsafe:
            return torch.load(p, map_location="cpu", mmap=is_zip, weights_only=False)
        with _accepting_extra_types():
            return torch.load(p, map_location="cpu", mmap=is_zip, weights_only=True)


def _load_error(p: Path, exc: BaseException, head: bytes, is_zip: bool) -> CheckpointError:
    text = str(exc)
    if isinstance(exc, MemoryError):
        return _error(f"{p}: out of memory while loading")
    if isinstance(exc, OSError) and exc.strerror:
        return _error(f"{p}: unreadable ({exc.strerror})")
    if not isinstance(exc, pickle.UnpicklingError) and "weights_only" in text:
        # legacy .tar files, TorchScript archives
        return _error(f"{p}: refused to unpickle: {_printable(_first_line(text), 240)} "
                      f"({_UNSAFE_HINT})")
    if not is_zip and not head.startswith(b"\x80"):  # neither a zip nor a pickle
        return _error(f"{p}: not a PyTorch/Lightning checkpoint (not a torch.save archive)")
    if isinstance(exc, pickle.UnpicklingError):
        return _weights_only_refusal(p, text)
    first = _printable(_first_line(text), 200)
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return _error(f"{p}: not a PyTorch/Lightning checkpoint ({reason})")


def _read(path: str | os.PathLike[str], unsafe: bool, max_bytes: int | str | None,
          stacklevel: int = 3) -> tuple[Path, int, Any]:
    try:
        budget = _budget(max_bytes)
    except ValueError as exc:
        raise ValueError(f"max_bytes: {exc}") from None
    p = Path(path)
    st = _regular_file(p)
    head = _read_head(p)
    is_zip = head.startswith(_ZIP_MAGIC)
    if unsafe:
        warnings.warn(f"unsafe=True: {p} is unpickled with weights_only=False, which runs any "
                      "code the file contains; use it only for files you trust",
                      UnsafeLoadWarning, stacklevel=stacklevel)
    else:
        _prescan(p, is_zip, st.st_size, budget)
    try:
        obj = _torch_load(p, unsafe=unsafe, is_zip=is_zip)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise _load_error(p, exc, head, is_zip) from None
    return p, budget, obj


# ---- step 4: every tensor within the budget, before anything is computed


def _check_tensor(p: Path, name: str, t: torch.Tensor, budget: int, strict: bool) -> None:
    shown = _printable(name, _NAME_LIMIT)
    if t.device.type != "cpu":
        raise _error(f"{p}: tensor '{shown}' is on device {t.device.type}, which holds no data "
                     "here")
    if t.layout != torch.strided or t.is_nested:
        if strict:
            raise _error(f"{p}: tensor '{shown}' has layout {t.layout}; only dense tensors are "
                         "supported")
        return
    storage = t.untyped_storage().nbytes()
    view = t.numel() * t.element_size()
    what = "x".join(str(n) for n in t.shape) or "scalar"
    if view > budget:
        raise _error(f"{p}: tensor '{shown}' ({what} {str(t.dtype).removeprefix('torch.')}) "
                     f"needs {_sized(view)} as a dense array, {_over_budget(budget)}")
    if storage > budget:
        raise _error(f"{p}: tensor '{shown}' has a storage of {_sized(storage)}, "
                     f"{_over_budget(budget)}")


def _check_tensors(p: Path, obj: Any, budget: int, strict: bool) -> None:
    """:func:`_check_tensor` on every tensor reachable through containers, depth first."""
    todo: list[tuple[str, Any]] = [("", obj)]
    seen: set[int] = set()
    while todo:
        name, value = todo.pop()
        if isinstance(value, torch.Tensor):
            _check_tensor(p, name or "<top level>", value, budget, strict)
            continue
        if id(value) in seen or isinstance(value, (str, bytes, int, float, type(None))):
            continue
        seen.add(id(value))
        # names stop growing past _NAME_LIMIT, so a deeply nested pickle costs linear time
        stem = name if len(name) <= _NAME_LIMIT else name[:_NAME_LIMIT] + "..."
        if isinstance(value, Mapping):
            children = []
            for k, v in value.items():
                if isinstance(k, torch.Tensor):
                    children.append((f"{stem}.<tensor key>", k))
                    k = "<tensor key>"
                key = k if isinstance(k, str) else type(k).__name__
                children.append((f"{stem}.{key}" if stem else key, v))
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = [(f"{stem}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, torch.nn.Module):
            children = [(f"{stem}.{k}" if stem else k, v)
                        for k, v in value.state_dict(keep_vars=True).items()]
        else:
            continue
        todo.extend(reversed(children))


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a Lightning checkpoint or plain state dict; ``None`` if there are none."""
    if isinstance(obj, torch.nn.Module):  # a whole pickled module (torch.save(model))
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors or None


def load_torch_file(
    path: str | os.PathLike[str], *, unsafe: bool = False, max_bytes: int | str | None = None
) -> Any:
    """Any ``torch.save`` file (e.g. a data file of tensors) under the loading policy.

    Same checks as :func:`load_state_dict`; every tensor in the result must be a dense CPU
    tensor within the memory budget. Raises :class:`CheckpointError` (one line naming the file).
    """
    p, budget, obj = _read(path, unsafe, max_bytes)
    _check_tensors(p, obj, budget, strict=True)
    return obj


def load_state_dict(
    path: str | os.PathLike[str], *, unsafe: bool = False, max_bytes: int | str | None = None
) -> dict[str, torch.Tensor]:
    """Read a Lightning ``.ckpt`` (its ``"state_dict"``) or a plain state-dict file, on the CPU.

    **Loading policy.** Only regular files are read. The file is unpickled by
    ``torch.load(weights_only=True)`` alone, accepting torch's default types plus
    :data:`SAFE_LOAD_TYPES` (paths, ``argparse.Namespace``, Lightning's ``AttributeDict``);
    anything else (a custom hyper-parameter class, a pickled function) is refused with a
    :class:`CheckpointError` naming it, and a parse-only pre-scan refuses pickles that would
    modify a class, iterate a tensor in a constructor or allocate past the budget while
    unpickling. Zip checkpoints (``torch.save`` since 1.6) are memory-mapped, so tensors are read
    lazily; the legacy format is read whole. Before returning, every tensor's storage and its
    dense size (``numel * element_size``) must fit in ``max_bytes`` (bytes or a string such as
    ``"4G"``; default :func:`default_max_bytes`, a quarter of the machine's memory).

    ``unsafe=True`` unpickles with ``weights_only=False`` instead, which **runs any code the
    file contains**: only for files you trust. It emits an :class:`UnsafeLoadWarning`; the
    regular-file and memory checks still apply.

    Returns the name → tensor mapping. Raises :class:`CheckpointError` with a one-line message
    naming the file and the problem (not found, not a regular file, unreadable, not a torch
    file, a refused type, over the memory budget, no tensors).
    """
    p, budget, obj = _read(path, unsafe, max_bytes)
    _check_tensors(p, obj, budget, strict=False)
    sd = _extract_state_dict(obj)
    if sd is None:
        raise _error(
            f"{p}: no state_dict found (expected a Lightning .ckpt with a 'state_dict' entry or a "
            f"mapping of names to tensors, got {type(obj).__name__})"
        )
    for name, tensor in sd.items():
        _check_tensor(p, name, tensor, budget, strict=True)
    return sd


def svd_working_bytes(weight: torch.Tensor, dtype: torch.dtype | str | None = None) -> int:
    """Peak bytes :func:`weight_spectra` needs for one weight: an upper estimate.

    The matrix ``(out, in·k…)`` is copied into the batch, converted to the working dtype
    (float32, or float64 for float64 weights or ``dtype="float64"``), copied once more when
    non-finite entries are zeroed, and once more by LAPACK, which also needs a workspace:
    ``numel · (element_size + 4 · working element size)`` plus the vectors of the decomposition.
    (Measured peaks on CPU were 0.75-0.9 of this for float32 and float64 matrices.)
    """
    work = 8 if (weight.dtype == torch.float64 or str(dtype).removeprefix("torch.") == "float64"
                 ) else 4
    numel = weight.numel()
    rows = weight.shape[0] if weight.ndim else 1
    cols = numel // max(rows, 1)
    return numel * (weight.element_size() + 4 * work) + 8 * work * (rows + cols)


def check_svd_budget(
    weights: Mapping[str, torch.Tensor], max_bytes: int | str | None = None,
    dtype: torch.dtype | str | None = None, path: str | os.PathLike[str] | None = None,
) -> None:
    """Raise :class:`CheckpointError` for the first weight whose :func:`svd_working_bytes`
    exceeds the budget (default :func:`default_max_bytes`); nothing is computed."""
    budget = _budget(max_bytes)
    prefix = f"{path}: " if path is not None else ""
    for name, w in weights.items():
        need = svd_working_bytes(w, dtype)
        if need > budget:
            what = "x".join(str(n) for n in w.shape)
            raise _error(f"{prefix}tensor '{_printable(name, _NAME_LIMIT)}' ({what}) needs about "
                         f"{_sized(need)} for its singular values, {_over_budget(budget)}")


# ------------------------------------------------------------------------------------------
# selection and analysis


def is_weight_matrix(name: str, tensor: Any) -> bool:
    """Whether ``name``/``tensor`` is analysed: floating, ``ndim >= 2``, name ending in ``weight``.

    See the module docstring for the reasoning (embeddings included, 1-D norms excluded).
    """
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and tensor.ndim >= 2
        and tensor.numel() > 0
        and name.rsplit(".", 1)[-1].endswith("weight")
    )


def select_weight_matrices(
    state_dict: Mapping[str, Any], exclude: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The weight matrices of a state dict, in order, minus names matching an ``exclude`` glob."""
    patterns = list(exclude)
    return {
        name: t
        for name, t in state_dict.items()
        if is_weight_matrix(name, t) and not any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }


def weight_spectra(
    weights: Mapping[str, torch.Tensor],
    dtype: torch.dtype | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_bytes: int | str | None = None,
) -> dict[str, torch.Tensor]:
    """Singular values (docs/definitions.md#singular-spectrum) of each weight, batched by shape.

    Weights of one reshaped shape go through :func:`singular_values_many` in chunks of at most
    16 matrices (bounded memory); with ``max_bytes`` a chunk also holds no more matrices than
    fit in that many bytes by :func:`svd_working_bytes` (at least one: check single matrices
    with :func:`check_svd_budget` first). ``progress(done, total)`` is called after each chunk.
    """
    budget = None if max_bytes is None else parse_bytes(max_bytes)
    names = list(weights)
    groups: dict[tuple, list[str]] = {}
    for name in names:
        w = weights[name]
        groups.setdefault((tuple(weight_matrix(w).shape), w.dtype, w.device), []).append(name)
    out: dict[str, torch.Tensor] = {}
    done = 0
    for members in groups.values():
        size = _CHUNK
        if budget is not None:
            size = max(1, min(_CHUNK, budget // max(svd_working_bytes(weights[members[0]],
                                                                       dtype), 1)))
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            with torch.no_grad():
                spectra = singular_values_many([weights[n] for n in chunk], dtype=dtype)
            out.update(zip(chunk, spectra, strict=True))
            done += len(chunk)
            if progress is not None:
                progress(done, len(names))
    return {name: out[name] for name in names}


def _check_energy(energy: float) -> float:
    tau = float(energy)
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"energy must lie in (0, 1], got {energy!r}")
    return tau


#: analysis columns computed by the quantity table's weight functions (the same functions as
#: the logged ``weight_*`` tags), in column order
_TABLE_COLUMNS = ("weight_sv_max", "weight_stable_rank", "weight_erank", "weight_alpha",
                  "weight_alpha_weighted")


def _stats(stack: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row statistics of singular values ``stack`` (g, r), descending: a (g, 8) float64.

    Columns (anchors of docs/definitions.md): ``σ_1``, stable rank ``Σσ²/σ_1²`` (#stable-rank),
    ``erank = exp(S(σ²))`` (#erank), ``k(τ)`` (#capacity), the relative Eckart–Young error at ``k``
    (#eckart-young), the heavy-tailed exponent ``α`` of ``σ²`` and ``α·log10 σ_1²``
    (#heavy-tail) and a finiteness flag. ``σ_1``, the stable rank, erank, ``α`` and ``α̂`` are
    the functions of ``lightning_spectral.functional.quantities.QUANTITIES`` that compute the
    logged ``weight_sv_max``, ``weight_stable_rank``, ``weight_erank``, ``weight_alpha`` and
    ``weight_alpha_weighted``, in the same precision.
    The Eckart–Young tail ``Σ_{i>k} σ_i²`` is the formula of :func:`eckart_young_error`,
    gathered per row from one reverse cumulative sum so that rows with different ``k`` share
    one call.
    """
    finite = torch.isfinite(stack).all(dim=-1)
    s = torch.where(finite[:, None], stack, torch.zeros_like(stack))
    table = compute_quantities(_TABLE_COLUMNS, Spectra(s=s)).double()
    sv_max, srank, erank, alpha, alpha_w = table.unbind(dim=-1)
    k = truncation_rank(s, tau).long()  # non-finite rows were zeroed, so k is finite
    s2d = s.square().double()
    tails = torch.cat([s2d.flip(-1).cumsum(-1).flip(-1), s2d.new_zeros(len(s2d), 1)], dim=-1)
    tail = tails.gather(-1, k[:, None])[:, 0]
    total = tails[:, 0]
    nan = torch.full_like(total, float("nan"))
    rel = torch.where(total > 0, (tail / torch.where(total > 0, total, 1.0)).sqrt(), nan)
    out = torch.stack([sv_max, srank, erank, k.double(), rel, alpha, alpha_w, finite.double()],
                      dim=-1)
    # a non-finite weight: every statistic undefined
    return torch.where(finite[:, None] | (torch.arange(8, device=out.device) == 7), out,
                       torch.full_like(out, float("nan")))


def _rows(
    names: list[str], shapes: list[tuple[int, ...]], spectra: list[torch.Tensor], tau: float
) -> list[dict[str, Any]]:
    """Analysis rows; the statistics of equal-length spectra are computed in one batch and all
    of them copied to the host at once."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(spectra):
        groups.setdefault((s.shape[-1], s.device, s.dtype), []).append(i)
    parts, order = [], []
    for idx in groups.values():
        parts.append(_stats(torch.stack([spectra[i].detach() for i in idx]), tau))
        order.extend(idx)
    if parts and len({p.device for p in parts}) == 1:
        host = torch.cat(parts).cpu().tolist()  # one device-to-host copy
    else:
        host = torch.cat([p.cpu() for p in parts]).tolist() if parts else []
    by_index = dict(zip(order, host, strict=True))
    rows = []
    for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        sv_max, srank, erank, k, rel, alpha, alpha_w, finite = by_index[i]
        out_dim, cols = shape[0], math.prod(shape[1:])
        rank = int(k) if finite else None
        rows.append({
            "name": name,
            "shape": list(shape),
            "params": math.prod(shape),
            "sv_max": _clean(sv_max),
            "stable_rank": _clean(srank),
            "erank": _clean(erank),
            "rank_at_energy": rank,
            "energy": tau,
            "eckart_young_rel_error": _clean(rel),
            "param_ratio": (cast(int, rank) * (out_dim + cols) / (out_dim * cols)
                            if finite else None),
            "alpha": _clean(alpha),
            "alpha_weighted": _clean(alpha_w),
        })
    return rows


def _clean(v: float) -> float | None:
    return v if math.isfinite(v) else None


def summarize_spectrum(
    name: str, shape: Sequence[int], s: torch.Tensor, energy: float = 0.99
) -> dict[str, Any]:
    """One analysis row from the singular values ``s`` (descending) of a weight of ``shape``.

    Each item names its section of docs/definitions.md:

    - ``sv_max = σ_1 = ‖W‖₂``; ``stable_rank = Σσ²/σ_1²`` (#stable-rank, ``None`` for ``W = 0``);
    - ``erank = exp(S(σ²))`` (#erank, on ``σ²``, cut off as in #cutoff; 0 for ``W = 0``);
    - ``rank_at_energy = k(τ)`` (#capacity, the memory-capacity estimate) for ``τ = energy``;
    - ``eckart_young_rel_error = (Σ_{i>k} σ_i²)^{1/2} / ‖W‖_F`` at that ``k`` (#eckart-young);
    - ``param_ratio = k·(out + in·k1·...) / (out·in·k1·...)`` (weights only, biases unchanged);
    - ``alpha``: the heavy-tailed exponent of ``σ²`` (#heavy-tail; power-law fit with the KS-optimal
      ``xmin``, as WeightWatcher's ``alpha``) and ``alpha_weighted = α·log10 σ_1²``
      (``None`` where the fit is undefined: fewer than two non-zero ``σ²``).

    Undefined values (a NaN/Inf weight; the stable rank and error of ``W = 0``) are ``None``.
    """
    tau = _check_energy(energy)
    return _rows([name], [tuple(int(n) for n in shape)], [s], tau)[0]


def analyze_state_dict(
    state_dict: Mapping[str, Any],
    energy: float = 0.99,
    *,
    exclude: Iterable[str] = (),
    dtype: torch.dtype | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per-matrix decomposition report of a state dict (docs/definitions.md#weights).

    One dict per weight matrix (see :func:`is_weight_matrix`), in state-dict order, with exactly
    the keys of :data:`ANALYSIS_KEYS`: ``name``, ``shape`` (the tensor's shape), ``params``,
    ``sv_max``, ``stable_rank``, ``erank``, ``rank_at_energy`` (the memory-capacity estimate
    at ``energy``), ``energy``, ``eckart_young_rel_error``, ``param_ratio`` (see
    :func:`summarize_spectrum`). Spectra are computed in float32 (float64 weights, or
    ``dtype="float64"``: float64) on the weights' device, batched by equal matrix shape; the
    statistics are batched by spectrum length and reach the host in one copy.
    ``energy`` must lie in ``(0, 1]``.
    """
    tau = _check_energy(energy)
    weights = select_weight_matrices(state_dict, exclude)
    spectra = weight_spectra(weights, dtype=dtype, progress=progress)
    names = list(weights)
    return _rows(names, [tuple(weights[n].shape) for n in names], [spectra[n] for n in names],
                 tau)


def analyze_spectra(
    weights: Mapping[str, torch.Tensor], spectra: Mapping[str, torch.Tensor], energy: float = 0.99
) -> list[dict[str, Any]]:
    """Analysis rows for precomputed ``spectra`` of ``weights`` (as :func:`weight_spectra`)."""
    tau = _check_energy(energy)
    names = list(weights)
    return _rows(names, [tuple(weights[n].shape) for n in names], [spectra[n] for n in names],
                 tau)
