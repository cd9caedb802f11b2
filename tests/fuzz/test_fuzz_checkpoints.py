"""Mutated checkpoints through ``lightning-spectral analyze`` and ``align`` (hypothesis).

Seeds: a small MLP ``state_dict`` and a real Lightning checkpoint (``Trainer.save_checkpoint``
with ``save_hyperparameters()``), each in the zip format and the legacy
(``_use_new_zipfile_serialization=False``) format. Mutations: truncation, byte flips (anywhere,
or inside the pickle with the zip CRCs repaired so that the loader, not the CRC check, sees
them), splices of two seeds, and integers of the pickle (sizes, strides, offsets, storage
lengths) replaced by huge or negative values of the same width.

Every example must end in exit 0, 1 or 2 within a few seconds, exit 2 with one line on stderr,
never a traceback, never a file written in the working directory, never a change to the
process. Deterministic (``derandomize=True``, no example database); about 500 examples.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickletools
import struct
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_spectral.cli import main

SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMIT_S = 10.0  # per example; the analyses themselves take milliseconds
BUDGET = "256M"  # so that a mutated size is refused instead of allocated
INT_OPS = {"BININT1": 1, "BININT2": 2, "BININT": 4, "LONG1": None}


# ------------------------------------------------------------------------------------------
# seeds


def _to_bytes(obj, legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _mlp_state_dict() -> dict:
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4),
                              torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net.state_dict()


def _lightning_checkpoint(root: Path) -> bytes:
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self, lr: float = 0.05, widths=(6, 8, 3), tag: str = "fuzz") -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                           torch.nn.Linear(8, 3))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6, generator=gen),
                                          torch.randint(0, 3, (16,), generator=gen))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=root)
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(root / "real.ckpt")
    return (root / "real.ckpt").read_bytes()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    mlp = _mlp_state_dict()
    real = _lightning_checkpoint(tmp_path_factory.mktemp("lightning"))
    ckpt = torch.load(io.BytesIO(real), weights_only=True)
    return {"mlp-zip": _to_bytes(mlp, False), "mlp-legacy": _to_bytes(mlp, True),
            "lightning-zip": real, "lightning-legacy": _to_bytes(ckpt, True)}


SEED_NAMES = ["mlp-zip", "mlp-legacy", "lightning-zip", "lightning-legacy"]


# ------------------------------------------------------------------------------------------
# where the pickle is, and same-length edits of it


def _pickle_span(blob: bytes) -> tuple[int, int, str | None]:
    """``(start, end, zip member)`` of the object pickle (zip: data.pkl; legacy: pickles 1-5)."""
    if blob.startswith(b"PK\x03\x04"):
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
            local = info.header_offset
            name_len, extra_len = struct.unpack("<HH", blob[local + 26: local + 30])
            start = local + 30 + name_len + extra_len
            return start, start + info.file_size, info.filename
    stream = io.BytesIO(blob)
    for _ in range(5):
        for _op in pickletools.genops(stream):
            pass
    return 0, stream.tell(), None


def _int_ops(blob: bytes) -> list[tuple[int, int, int]]:
    """``(start, end, operand width)`` of every integer opcode in the pickle (offsets into
    the pickle bytes of :func:`_pickle_bytes`)."""
    pkl = _pickle_bytes(blob)
    stream = io.BytesIO(pkl)
    ops: list[tuple[int, int, str]] = []
    try:
        while stream.tell() < len(pkl):
            for op, _arg, pos in pickletools.genops(stream):
                ops.append((pos, op.name))
    except ValueError:
        pass
    ends = [pos for pos, _ in ops[1:]] + [stream.tell()]
    return [(pos, end, INT_OPS[name] or pkl[pos + 1])
            for (pos, name), end in zip(ops, ends, strict=True) if name in INT_OPS]


def _pickle_bytes(blob: bytes) -> bytes:
    start, end, _ = _pickle_span(blob)
    return blob[start:end]


def _with_pickle(blob: bytes, pkl: bytes) -> bytes:
    """``blob`` with its object pickle replaced (zip: the archive rewritten, members stored)."""
    start, end, member = _pickle_span(blob)
    if member is None:
        return pkl + blob[end:]
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pkl if info.filename == member else src.read(info))
    return out.getvalue()


def _repair_crc(blob: bytearray, member: str) -> None:
    """Recompute the CRC-32 of ``member`` in its local header and central directory entry."""
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as zf:
        info = zf.getinfo(member)
        cd = zf.start_dir
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", blob[local + 26: local + 30])
    data = bytes(blob[local + 30 + name_len + extra_len:][: info.compress_size])
    crc = struct.pack("<I", zlib.crc32(data))
    blob[local + 14: local + 18] = crc
    while blob[cd: cd + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", blob[cd + 28: cd + 34])
        if blob[cd + 46: cd + 46 + name_len].decode("utf-8", "replace") == member:
            blob[cd + 16: cd + 20] = crc
            return
        cd += 46 + name_len + extra_len + comment_len


# ------------------------------------------------------------------------------------------
# running one example


@contextlib.contextmanager
def _in_directory(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class _State:
    def __init__(self) -> None:
        self.counter = dict(vars(collections.Counter))
        self.tensor = dict(vars(torch.Tensor))
        self.load = torch.load
        self.safe = set(torch.serialization.get_safe_globals())
        self.filters = list(warnings.filters)

    def check(self) -> None:
        assert collections.Counter("aab")["a"] == 2
        assert all(vars(collections.Counter).get(k) is v for k, v in self.counter.items())
        assert set(vars(collections.Counter)) == set(self.counter)
        assert all(vars(torch.Tensor).get(k) is v for k, v in self.tensor.items())
        assert torch.load is self.load
        assert set(torch.serialization.get_safe_globals()) == self.safe
        assert warnings.filters == self.filters


def check_cli(blob: bytes, command: str = "analyze") -> int:
    """Run ``command`` on ``blob`` in an empty working directory and check the contract."""
    state = _State()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "fuzzed.ckpt"
        path.write_bytes(blob)
        argv = ["analyze", str(path), "--format", "json", "--max-bytes", BUDGET]
        if command == "align":
            argv = ["align", str(path), str(path), "--data", "random", "--points", "3",
                    "--samples", "8", "--max-bytes", BUDGET]
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with _in_directory(work), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = main(argv)
        elapsed = time.perf_counter() - start
        assert sorted(p.name for p in work.iterdir()) == ["fuzzed.ckpt"]
    text = err.getvalue()
    assert code in (0, 1, 2), (code, text)
    assert "Traceback" not in text, text
    assert elapsed < LIMIT_S, (elapsed, text)
    if code == 2:
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].isprintable(), text
    state.check()
    return code


commands = st.sampled_from(["analyze", "analyze", "analyze", "align"])


# ------------------------------------------------------------------------------------------
# the suite


def test_seeds_load(seeds):
    for name in SEED_NAMES:
        assert check_cli(seeds[name]) == 0, name
        assert check_cli(seeds[name], "align") == 0, name


@pytest.mark.parametrize("name", SEED_NAMES)
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_truncated(seeds, name, data):
    blob = seeds[name]
    cut = data.draw(st.one_of(st.integers(0, 64), st.integers(0, len(blob) - 1)), label="cut")
    check_cli(blob[:cut], data.draw(commands, label="command"))


@pytest.mark.parametrize("name", SEED_NAMES)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_flipped_bytes(seeds, name, data):
    blob = bytearray(seeds[name])
    start, end, member = _pickle_span(bytes(blob))
    in_pickle = data.draw(st.booleans(), label="in pickle")
    lo, hi = (start, end - 1) if in_pickle else (0, len(blob) - 1)
    flips = data.draw(st.lists(st.tuples(st.integers(lo, hi), st.integers(1, 255)),
                               min_size=1, max_size=8), label="flips")
    for pos, mask in flips:
        blob[pos] ^= mask
    if in_pickle and member is not None:
        _repair_crc(blob, member)
    check_cli(bytes(blob), data.draw(commands, label="command"))


@pytest.mark.parametrize("name", SEED_NAMES)
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_spliced(seeds, name, data):
    blob = seeds[name]
    donor = seeds[data.draw(st.sampled_from(SEED_NAMES), label="donor")]
    at = data.draw(st.integers(0, len(blob)), label="at")
    src = data.draw(st.integers(0, len(donor) - 1), label="from")
    size = data.draw(st.integers(1, 512), label="size")
    replace = data.draw(st.booleans(), label="replace")
    chunk = donor[src: src + size]
    spliced = blob[:at] + chunk + blob[at + (len(chunk) if replace else 0):]
    check_cli(spliced, data.draw(commands, label="command"))


@pytest.mark.parametrize("name", SEED_NAMES)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_huge_declared_sizes(seeds, name, data):
    """Integers of the pickle (shapes, strides, offsets, storage sizes) set to extremes, in
    place or widened to 8-byte LONG1 values (the archive is rewritten around the pickle)."""
    blob = seeds[name]
    ops = _int_ops(blob)
    assert ops
    pkl = bytearray(_pickle_bytes(blob))
    edits = data.draw(st.lists(st.sampled_from(ops), min_size=1, max_size=3, unique=True),
                      label="ints")
    for start, end, width in sorted(edits, reverse=True):  # back to front: offsets stay valid
        if data.draw(st.booleans(), label="widen"):
            value = data.draw(st.sampled_from([2**31, 10**12, 2**40 + 1, 2**62, -(2**40)]),
                              label="value")
            pkl[start:end] = b"\x8a\x08" + value.to_bytes(8, "little", signed=True)
        else:
            top = 2 ** (8 * width - (0 if width <= 2 else 1)) - 1  # BININT/LONG1 are signed
            value = data.draw(st.sampled_from([0, top, top // 2 + 1]), label="value")
            pkl[end - width:end] = value.to_bytes(width, "little", signed=width > 2)
    check_cli(_with_pickle(blob, bytes(pkl)), data.draw(commands, label="command"))
