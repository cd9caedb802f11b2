"""Steps 1, 3 and 4 of the loading policy, and the loaders built on them.

1. Only regular, readable, non-empty files are opened (a FIFO, socket or device would block or
   never end).
3. The file is unpickled by ``torch.load(weights_only=True)`` alone, with the few extra types
   of :data:`SAFE_LOAD_TYPES`; zip checkpoints are memory-mapped (``mmap=True``), so storages
   are read lazily, only when a computation touches them.
4. Before anything is computed, every tensor's storage and view (``numel * element_size``,
   what a contiguous copy needs) must fit in the memory budget.

Step 2, the pickle pre-scan, is :mod:`lightning_spectral._checkpoint.prescan`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_spectral._checkpoint.common import (
    NAME_LIMIT,
    CheckpointError,
    budget_of,
    error,
    over_budget,
    printable,
    sized,
)
from lightning_spectral._checkpoint.prescan import prescan

__all__ = ["SAFE_LOAD_TYPES", "UnsafeLoadWarning", "load_state_dict", "load_torch_file"]


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
        raise error(f"{p}: no such file") from None
    except NotADirectoryError:
        raise error(f"{p}: no such file (a component of the path is not a directory)") from None
    except PermissionError:
        raise error(f"{p}: permission denied") from None
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EIO, ...
        raise error(f"{p}: cannot access ({exc.strerror or exc})") from None
    except ValueError as exc:  # embedded NUL byte
        raise error(f"{p}: not a valid path ({exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{p}: is a directory, expected a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise error(f"{p}: is {kind}, not a regular file")
    if not os.access(p, os.R_OK):
        raise error(f"{p}: permission denied")
    if st.st_size == 0:
        raise error(f"{p}: empty file, not a checkpoint")
    return st


def _read_head(p: Path, n: int = 4) -> bytes:
    """The first ``n`` bytes, read without blocking (the file may have been swapped since)."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"{p}: unreadable ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{p}: not a regular file")
        return os.read(fd, n)
    except OSError as exc:
        raise error(f"{p}: unreadable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


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
        return error(f"{p}: refused to unpickle {printable(match.group(1), NAME_LIMIT)}: "
                     f"not a type weights-only loading accepts ({_UNSAFE_HINT})")
    match = _BLOCKED_RE.search(message)
    if match:
        return error(f"{p}: refused to unpickle {printable(match.group(1), NAME_LIMIT)}: "
                     f"module {printable(match.group(2), NAME_LIMIT)} is never allowed")
    match = _WO_ERROR_RE.search(message)
    line = _first_line(match.group(1) if match else message) or "weights-only load failed"
    return error(f"{p}: refused to unpickle: {printable(line, 240)} ({_UNSAFE_HINT})")


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
        return error(f"{p}: out of memory while loading")
    if isinstance(exc, OSError) and exc.strerror:
        return error(f"{p}: unreadable ({exc.strerror})")
    if not isinstance(exc, pickle.UnpicklingError) and "weights_only" in text:
        # legacy .tar files, TorchScript archives
        return error(f"{p}: refused to unpickle: {printable(_first_line(text), 240)} "
                     f"({_UNSAFE_HINT})")
    if not is_zip and not head.startswith(b"\x80"):  # neither a zip nor a pickle
        return error(f"{p}: not a PyTorch/Lightning checkpoint (not a torch.save archive)")
    if isinstance(exc, pickle.UnpicklingError):
        return _weights_only_refusal(p, text)
    first = printable(_first_line(text), 200)
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return error(f"{p}: not a PyTorch/Lightning checkpoint ({reason})")


def _read(path: str | os.PathLike[str], unsafe: bool, max_bytes: int | str | None,
          stacklevel: int = 3) -> tuple[Path, int, Any]:
    try:
        budget = budget_of(max_bytes)
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
        prescan(p, is_zip, st.st_size, budget)
    try:
        obj = _torch_load(p, unsafe=unsafe, is_zip=is_zip)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise _load_error(p, exc, head, is_zip) from None
    return p, budget, obj


# ---- step 4: every tensor within the budget, before anything is computed


def _check_tensor(p: Path, name: str, t: torch.Tensor, budget: int, strict: bool) -> None:
    shown = printable(name, NAME_LIMIT)
    if t.device.type != "cpu":
        raise error(f"{p}: tensor '{shown}' is on device {t.device.type}, which holds no data "
                    "here")
    if t.layout != torch.strided or t.is_nested:
        if strict:
            raise error(f"{p}: tensor '{shown}' has layout {t.layout}; only dense tensors are "
                        "supported")
        return
    storage = t.untyped_storage().nbytes()
    view = t.numel() * t.element_size()
    what = "x".join(str(n) for n in t.shape) or "scalar"
    if view > budget:
        raise error(f"{p}: tensor '{shown}' ({what} {str(t.dtype).removeprefix('torch.')}) "
                    f"needs {sized(view)} as a dense array, {over_budget(budget)}")
    if storage > budget:
        raise error(f"{p}: tensor '{shown}' has a storage of {sized(storage)}, "
                    f"{over_budget(budget)}")


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
        # names stop growing past NAME_LIMIT, so a deeply nested pickle costs linear time
        stem = name if len(name) <= NAME_LIMIT else name[:NAME_LIMIT] + "..."
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
        raise error(
            f"{p}: no state_dict found (expected a Lightning .ckpt with a 'state_dict' entry or a "
            f"mapping of names to tensors, got {type(obj).__name__})"
        )
    for name, tensor in sd.items():
        _check_tensor(p, name, tensor, budget, strict=True)
    return sd
