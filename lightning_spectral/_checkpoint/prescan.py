"""Step 2 of the loading policy: a parse-only pre-scan of a checkpoint's pickle.

The pickle is followed opcode by opcode the way ``torch.load(weights_only=True)``'s unpickler
would, but nothing is executed or imported. It is refused when it would set attributes on a
class or function, feed a tensor to a non-tensor constructor (``set(t)`` iterates a zero-stride
view of any length), or allocate more than the memory budget while unpickling
(``bytearray(n)``, nested ``_codecs.encode``, legacy storages that are read whole, zip members
that inflate past the budget).
"""

from __future__ import annotations

import io
import math
import pickletools
import zipfile
from pathlib import Path
from typing import Any

from lightning_spectral._checkpoint.common import (
    NAME_LIMIT,
    error,
    over_budget,
    printable,
    sized,
)

__all__ = ["prescan"]

_SCAN_PICKLES_LEGACY = 5  # magic, protocol, sys info, the object, storage keys


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
                            f"it sets attributes on {printable(target.name, NAME_LIMIT)} "
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
        shown = printable(name, NAME_LIMIT)
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
            raise _Refused(f"unpickling would allocate at least {sized(self.allocated)} (in "
                           f"calls to {shown}), {over_budget(self.budget)}")
        if name.startswith("torch.") and name not in _NOT_TENSOR_RESULTS:
            return _TENSOR
        return _Obj(max(int(size), 0))


def prescan(p: Path, is_zip: bool, file_size: int, budget: int) -> None:
    """Refuse (a one-line :class:`CheckpointError`) what :class:`_Scan` refuses, and zip or
    legacy-format size tricks; ``budget`` is the memory budget in bytes."""
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
                raise _Refused(f"it declares {sized(declared)} of tensor data but the file "
                               f"holds {sized(file_size)} (corrupt or crafted)")
            if declared > budget:
                raise _Refused(f"its tensor data, {sized(declared)}, is read into memory whole "
                               "(this legacy format cannot be memory-mapped), "
                               f"{over_budget(budget)}")
    except _Refused as exc:
        raise error(f"{p}: refused to unpickle: {exc}") from None
    except OSError as exc:
        raise error(f"{p}: unreadable ({exc.strerror or exc})") from None


def _prescan_zip(p: Path, scan: _Scan, budget: int) -> None:
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            inflated = 0
            for info in infos:
                if info.file_size > budget:
                    raise _Refused(f"archive member {printable(info.filename, NAME_LIMIT)!r} "
                                   f"declares {sized(info.file_size)}, {over_budget(budget)}")
                if info.compress_type != zipfile.ZIP_STORED:
                    inflated += info.file_size
            if inflated > budget:
                raise _Refused(f"its compressed members inflate to {sized(inflated)}, "
                               f"{over_budget(budget)}")
            for info in infos:
                if info.filename == "data.pkl" or info.filename.endswith("/data.pkl"):
                    with zf.open(info) as fh:
                        data = fh.read(budget + 1)
                    scan.run(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
            RuntimeError, ValueError, OverflowError) as exc:
        text = str(exc).strip().splitlines()
        raise error(f"{p}: not a PyTorch/Lightning checkpoint (corrupt zip archive: "
                    f"{text[0][:160] if text else type(exc).__name__})") from None
