"""Hostile and malformed checkpoints given to ``analyze``, ``align`` and ``load_state_dict``.

Every payload is written here by hand from pickle opcodes (or a custom ``__reduce__``): BUILD on
an allow-listed class, torch's legacy "module" persistent id, a refused global, zero-stride views
of any size, allocation bombs, and paths that are not regular files. Each must end in exit 2 with
one line on stderr, no traceback, no file written and no change to the process.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pathlib
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_spectral import _checkpoint, analysis
from lightning_spectral._checkpoint import (
    SAFE_LOAD_TYPES,
    CheckpointError,
    UnsafeLoadWarning,
    default_max_bytes,
    format_bytes,
    load_state_dict,
    parse_bytes,
)
from lightning_spectral.analysis import svd_working_bytes, weight_spectra
from lightning_spectral.cli import main

# ------------------------------------------------------------------------------------------
# writing pickles by hand


def U(text: str) -> bytes:
    """BINUNICODE."""
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def G(module: str, name: str) -> bytes:
    """GLOBAL."""
    return b"c" + f"{module}\n{name}\n".encode()


def LONG(n: int) -> bytes:
    """LONG1 (any size)."""
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def INTS(*values: int) -> bytes:
    """A tuple of ints."""
    return b"(" + b"".join(LONG(v) for v in values) + b"t"


class Raw:
    """Written verbatim into the pickle where it appears (it must leave one value)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class _RawPickler(pickle._Pickler):  # the pure-Python pickler: ``save`` can be overridden
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Raw):
            self.write(obj.data)
            return
        super().save(obj, save_persistent_id)


class RawPickleModule:
    """A ``pickle_module`` for ``torch.save`` that writes :class:`Raw` fragments verbatim."""

    __name__ = "raw_pickle"
    Pickler = _RawPickler
    dump = staticmethod(pickle.dump)


def save(obj, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, pickle_module=RawPickleModule,
               _use_new_zipfile_serialization=not legacy)
    return path


def lightning_like(raw: bytes, **extra) -> dict:
    """A Lightning-style checkpoint whose hyper_parameters entry is the raw fragment."""
    return {"state_dict": {"fc.weight": torch.eye(3), "fc.bias": torch.zeros(3)},
            "hyper_parameters": Raw(raw), **extra}


def build_on_class(module: str, name: str, attrs: dict[str, bytes]) -> bytes:
    """BUILD with state ``(None, attrs)`` on the class itself: ``setattr(cls, k, v)``."""
    slots = b"".join(U(k) + v + b"s" for k, v in attrs.items())
    return G(module, name) + b"N}" + slots + b"\x86b"


def module_pid_payload(target: Path) -> bytes:
    """Legacy format: make ``Counter`` look like a module whose source changed, with
    ``dump_patches`` on and a chosen ``__name__``; the "module" persistent id then writes
    ``<__name__>.patch``."""
    return (build_on_class("collections", "Counter", {"dump_patches": b"\x88",
                                                      "__name__": U(str(target))})
            + b"0"  # POP
            + b"(" + U("module") + G("collections", "Counter") + U("evil.py")
            + U("class Counter: pass") + b"tQ")


def stride0_payload(size: tuple[int, ...], kind: str = "FloatStorage", key: str = "0") -> bytes:
    """A zero-stride view, of any size, of storage ``key`` (one element)."""
    storage = b"(" + U("storage") + G("torch", kind) + U(key) + U("cpu") + LONG(1) + b"tQ"
    return (G("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + LONG(0) + INTS(*size)
            + INTS(*(0 for _ in size)) + b"\x89" + G("collections", "OrderedDict") + b")Rt" + b"R")


class HParams:
    """A custom hyper-parameter class (harmless, but not in the weights-only allow-list)."""

    def __init__(self, width: int) -> None:
        self.width = width


class Touch:
    """Pickles to a call that would create a file if it ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# ------------------------------------------------------------------------------------------
# running the command and checking the process


REPO = Path(__file__).resolve().parents[2]


def run_sub(args, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, "-m", "lightning_spectral", *map(str, args)],
                           capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def run_in(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_exit_2(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert all(ch.isprintable() for ch in lines[0]), repr(lines[0])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class ProcessState:
    """Identity snapshot of what a hostile pickle could patch; restores it afterwards."""

    def __init__(self) -> None:
        self.counter = dict(vars(collections.Counter))
        self.counter_name = collections.Counter.__name__
        self.tensor = dict(vars(torch.Tensor))
        self.module = dict(vars(torch.nn.Module))
        self.load = torch.load
        self.safe_globals = set(torch.serialization.get_safe_globals())
        self.filters = list(warnings.filters)

    def assert_unchanged(self) -> None:
        assert collections.Counter("aab")["a"] == 2
        assert collections.Counter("aab")["z"] == 0
        assert collections.Counter.__name__ == self.counter_name
        now = vars(collections.Counter)
        assert set(now) == set(self.counter)
        assert all(now[k] is v for k, v in self.counter.items())
        tensor_now = vars(torch.Tensor)
        assert all(tensor_now.get(k) is v for k, v in self.tensor.items())
        assert all(vars(torch.nn.Module).get(k) is v for k, v in self.module.items())
        assert torch.load is self.load
        assert torch.ones(2) + torch.ones(2) is not None
        assert set(torch.serialization.get_safe_globals()) == self.safe_globals
        assert warnings.filters == self.filters

    def restore(self) -> None:
        for cls, snap in ((collections.Counter, self.counter), (torch.Tensor, self.tensor),
                          (torch.nn.Module, self.module)):
            for key in list(vars(cls)):
                if key not in snap:
                    delattr(cls, key)
            for key, value in snap.items():
                if vars(cls).get(key) is not value:
                    setattr(cls, key, value)
        collections.Counter.__name__ = self.counter_name
        torch.load = self.load


@pytest.fixture
def state():
    snap = ProcessState()
    yield snap
    snap.restore()


# ------------------------------------------------------------------------------------------
# 1. code execution through the loader


@pytest.mark.parametrize("command", ["analyze", "align"])
def test_legacy_module_persistent_id_writes_no_file(tmp_path, capsys, state, command):
    """BUILD on collections.Counter + torch's legacy "module" persistent id used to write
    ``<chosen path>.patch`` and exit 0."""
    target = tmp_path / "chosen" / "pwned"
    target.parent.mkdir()
    ckpt = save(lightning_like(module_pid_payload(target)), tmp_path / "evil.ckpt", legacy=True)
    assert ckpt.stat().st_size < 1024
    args = [command, ckpt] + ([ckpt, "--data", "random"] if command == "align" else [])
    code, out, err = run_in(capsys, *args)
    line = assert_one_line_exit_2(code, err, str(ckpt), "collections.Counter")
    assert "refused" in line
    assert list(target.parent.iterdir()) == []
    state.assert_unchanged()


def test_legacy_module_persistent_id_subprocess(tmp_path):
    target = tmp_path / "pwned"
    ckpt = save(lightning_like(module_pid_payload(target)), tmp_path / "evil.ckpt", legacy=True)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run_sub(["analyze", ckpt], cwd=work)
    assert_one_line_exit_2(proc.returncode, proc.stderr, str(ckpt))
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "evil.ckpt"]
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "payload, victim",
    [
        (build_on_class("collections", "Counter", {"update": b"N", "__missing__": b"N"}),
         "collections.Counter"),
        (build_on_class("torch", "Tensor", {"__add__": b"N"}), "torch.Tensor"),
        (build_on_class("torch.nn.parameter", "Parameter", {"__repr__": b"N"}),
         "torch.nn.parameter.Parameter"),
    ],
    ids=["Counter", "Tensor", "Parameter"],
)
def test_build_on_allowed_class_changes_nothing(tmp_path, capsys, state, payload, victim, legacy):
    """BUILD on an allow-listed class used to patch it for the whole process (exit 0)."""
    ckpt = save(lightning_like(payload), tmp_path / "evil.ckpt", legacy=legacy)
    code, out, err = run_in(capsys, "analyze", ckpt)
    assert_one_line_exit_2(code, err, str(ckpt), victim, "refused")
    assert out == ""
    state.assert_unchanged()
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(ckpt)
    state.assert_unchanged()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reduce_payload_is_refused_and_never_runs(tmp_path, capsys, state, legacy):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "reduce.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.eye(2)},
                "hyper_parameters": {"x": Touch(marker)}}, ckpt,
               _use_new_zipfile_serialization=not legacy)
    code, _, err = run_in(capsys, "analyze", ckpt)
    line = assert_one_line_exit_2(code, err, str(ckpt), "system")
    assert "blocked" in line or "never allowed" in line
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_state_dict(ckpt, max_bytes="1G")
    assert not marker.exists()
    state.assert_unchanged()


def test_custom_class_refused_consistently_by_analyze_and_align(tmp_path, capsys, state):
    """The same one clean line (naming the class, no ANSI escape) from both commands."""
    ckpt = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.eye(3), "fc.bias": torch.zeros(3)},
                "hyper_parameters": {"cfg": HParams(3)}}, ckpt)
    code, _, err_an = run_in(capsys, "analyze", ckpt)
    line_an = assert_one_line_exit_2(code, err_an, str(ckpt), f"{HParams.__module__}.HParams",
                                     "--unsafe-load")
    code, _, err_al = run_in(capsys, "align", ckpt, ckpt, "--data", "random")
    line_al = assert_one_line_exit_2(code, err_al, str(ckpt), "HParams")
    assert "\x1b" not in err_an + err_al
    assert line_an.split("error: ", 1)[1] == line_al.split("align: ", 1)[1]
    state.assert_unchanged()


@pytest.mark.parametrize("command", ["analyze", "align"])
def test_unsafe_load_reads_a_trusted_pickle_with_a_warning(tmp_path, capsys, command):
    ckpt = tmp_path / "custom.ckpt"
    gen = torch.Generator().manual_seed(0)
    torch.save({"state_dict": {"0.weight": torch.randn(6, 4, generator=gen),
                               "0.bias": torch.zeros(6),
                               "2.weight": torch.randn(3, 6, generator=gen),
                               "2.bias": torch.zeros(3)},
                "hyper_parameters": {"cfg": HParams(3)}}, ckpt)
    extra = [ckpt, "--data", "random", "--points", "3"] if command == "align" else []
    code, out, err = run_in(capsys, command, ckpt, *extra, "--unsafe-load")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "--unsafe-load" in lines[0]
    assert "trust" in lines[0]
    assert out.strip()


def test_python_api_unsafe_flag(tmp_path):
    ckpt = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.eye(2)}, "hyper_parameters": HParams(2)}, ckpt)
    with pytest.raises(CheckpointError, match="HParams"):
        load_state_dict(ckpt)
    with pytest.warns(UnsafeLoadWarning, match="weights_only=False"):
        sd = load_state_dict(ckpt, unsafe=True)
    assert list(sd) == ["fc.weight"] and torch.equal(sd["fc.weight"], torch.eye(2))


def test_user_safe_globals_are_left_alone(tmp_path):
    """The extra types are added for one load only, and a caller's own entries survive."""
    entry = (argparse.Namespace, "argparse.Namespace")
    ckpt = tmp_path / "ns.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.eye(2)},
                "hyper_parameters": {"ns": argparse.Namespace(a=1)}}, ckpt)
    before = torch.serialization.get_safe_globals()
    load_state_dict(ckpt)
    assert set(torch.serialization.get_safe_globals()) == set(before)
    torch.serialization.add_safe_globals([entry])
    try:
        load_state_dict(ckpt)
        assert entry in torch.serialization.get_safe_globals()
    finally:
        torch.serialization._weights_only_unpickler._remove_safe_globals([entry])
    assert set(torch.serialization.get_safe_globals()) == set(before)


# ------------------------------------------------------------------------------------------
# 2. real Lightning checkpoints load without --unsafe-load


@pytest.fixture(scope="module", params=["lightning.pytorch", "pytorch_lightning"])
def real_lightning_ckpt(request, tmp_path_factory) -> Path:
    import importlib

    pl = importlib.import_module(request.param)
    from lightning.fabric.utilities.data import AttributeDict

    class Net(pl.LightningModule):
        def __init__(self, lr: float = 0.05, widths=(4, 8, 3), data_dir=None, opts=None,
                     extra=None, act: str = "relu") -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                           torch.nn.Linear(8, 3))

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    model = Net(data_dir=pathlib.Path("/data/digits"), opts=argparse.Namespace(depth=2),
                extra=AttributeDict(a=1))
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=gen),
                                          torch.randint(0, 3, (16,), generator=gen))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root / "ck",
                                                                 monitor="loss"),
                                    pl.callbacks.EarlyStopping("loss")])
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    path = root / "real.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_real_lightning_checkpoint_loads_safely(real_lightning_ckpt, capsys, state, tmp_path):
    with zipfile.ZipFile(real_lightning_ckpt) as zf:  # the extra types are really exercised
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert b"PosixPath" in pkl and b"Namespace" in pkl and b"AttributeDict" in pkl
    code, out, err = run_in(capsys, "analyze", real_lightning_ckpt, "--format", "json")
    assert code == 0, err
    assert err == ""
    assert [r["name"] for r in json.loads(out)] == ["net.0.weight", "net.2.weight"]
    code, out, err = run_in(capsys, "align", real_lightning_ckpt, real_lightning_ckpt,
                            "--data", "random", "--json", "--points", "3")
    assert code == 0, err
    assert json.loads(out)["barrier_after"] == pytest.approx(0.0, abs=1e-9)
    state.assert_unchanged()


def test_safe_types_are_documented():
    text = (REPO / "docs" / "compression.md").read_text()
    for name in SAFE_LOAD_TYPES:
        assert name.rsplit(".", 1)[-1] in text, name


def test_loading_names_are_importable_from_analysis():
    """``lightning_spectral.analysis`` re-exports the loaders (the documented import path)."""
    for name in _checkpoint.__all__:
        assert name in analysis.__all__ and getattr(analysis, name) is getattr(_checkpoint, name)


# ------------------------------------------------------------------------------------------
# 3. memory budget


def test_stride0_view_refused_before_materialising(tmp_path, capsys):
    """A 1.5 kB file holding a 20000x20000 zero-stride view: refused in well under a second."""
    ckpt = tmp_path / "expanded.pt"
    torch.save({"fc.weight": torch.zeros(1).expand(20000, 20000)}, ckpt)
    assert ckpt.stat().st_size < 2000
    start = time.perf_counter()
    code, out, err = run_in(capsys, "analyze", ckpt, "--max-bytes", "1G")
    assert time.perf_counter() - start < 10
    assert_one_line_exit_2(code, err, str(ckpt), "'fc.weight'", "1600000000 bytes", "1.49 GiB",
                           "--max-bytes")
    # align refuses it on the same grounds
    code, _, err = run_in(capsys, "align", ckpt, ckpt, "--data", "random", "--max-bytes", "1G")
    assert_one_line_exit_2(code, err, str(ckpt), "'fc.weight'", "1600000000 bytes")


def test_stride0_view_within_storage_budget_still_counts_the_svd(tmp_path, capsys):
    ckpt = tmp_path / "expanded.pt"
    torch.save({"fc.weight": torch.zeros(1).expand(4000, 4000)}, ckpt)  # 64 MB dense
    need = svd_working_bytes(torch.zeros(1).expand(4000, 4000))
    assert need > 5 * 64_000_000
    code, _, err = run_in(capsys, "analyze", ckpt, "--max-bytes", "100M")
    assert_one_line_exit_2(code, err, str(ckpt), "'fc.weight'", "singular values")


def test_huge_declared_view_default_budget_subprocess(tmp_path):
    """200000x200000 (160 GB) used to end in a traceback with exit 1."""
    ckpt = tmp_path / "huge.pt"
    torch.save({"fc.weight": torch.as_strided(torch.zeros(1), (200000, 200000), (0, 0))}, ckpt)
    proc = run_sub(["analyze", ckpt], cwd=tmp_path)
    assert_one_line_exit_2(proc.returncode, proc.stderr, str(ckpt), "'fc.weight'",
                           "160000000000 bytes")


def test_huge_declared_view_legacy_format(tmp_path, capsys):
    ckpt = tmp_path / "huge.pt"
    torch.save({"fc.weight": torch.as_strided(torch.zeros(1), (200000, 200000), (0, 0))}, ckpt,
               _use_new_zipfile_serialization=False)
    start = time.perf_counter()
    code, _, err = run_in(capsys, "analyze", ckpt)
    assert time.perf_counter() - start < 10
    assert_one_line_exit_2(code, err, str(ckpt), "'fc.weight'", "160000000000 bytes")


def test_huge_declared_storage_legacy(tmp_path, capsys):
    """A legacy storage declaring 400 GB in a file of a few hundred bytes."""
    storage = (b"(" + U("storage") + G("torch", "FloatStorage") + U("7") + U("cpu")
               + LONG(10**11) + b"NtQ")
    payload = (G("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + LONG(0) + INTS(2, 2)
               + INTS(2, 1) + b"\x89" + G("collections", "OrderedDict") + b")RtR")
    ckpt = save({"fc.weight": Raw(payload)}, tmp_path / "declared.pt", legacy=True)
    code, _, err = run_in(capsys, "analyze", ckpt)
    assert_one_line_exit_2(code, err, str(ckpt), "declares")


def test_huge_declared_storage_zip(tmp_path, capsys):
    storage = (b"(" + U("storage") + G("torch", "FloatStorage") + U("0") + U("cpu")
               + LONG(10**11) + b"tQ")
    payload = (G("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + LONG(0)
               + INTS(100000, 100000) + INTS(100000, 1) + b"\x89"
               + G("collections", "OrderedDict") + b")RtR")
    ckpt = save({"a": torch.zeros(1), "fc.weight": Raw(payload)}, tmp_path / "declared.pt")
    code, _, err = run_in(capsys, "analyze", ckpt)
    assert_one_line_exit_2(code, err, str(ckpt))


def test_bytearray_bomb_refused_before_allocating(tmp_path, capsys):
    payload = G("builtins", "bytearray") + LONG(300 * 2**20) + b"\x85R"
    ckpt = save(lightning_like(payload), tmp_path / "bomb.ckpt")
    code, _, err = run_in(capsys, "analyze", ckpt, "--max-bytes", "64M")
    assert_one_line_exit_2(code, err, str(ckpt), "allocate", "bytearray")


def test_codec_doubling_bomb_refused(tmp_path, capsys):
    value = G("_codecs", "encode") + b"(" + U("ab") + U("latin1") + b"tR"
    for _ in range(28):  # each hex encoding doubles: 2**29 bytes if it ran
        value = G("_codecs", "encode") + b"(" + value + U("hex") + b"tR"
    ckpt = save(lightning_like(value), tmp_path / "bomb.ckpt")
    assert ckpt.stat().st_size < 4096
    code, _, err = run_in(capsys, "analyze", ckpt, "--max-bytes", "64M")
    assert_one_line_exit_2(code, err, str(ckpt), "allocate", "_codecs.encode")


def test_iterating_a_huge_view_in_a_constructor_is_refused(tmp_path):
    """``bytearray(view)`` of a 10**10-element zero-stride view would iterate for hours."""
    payload = G("builtins", "bytearray") + b"(" + stride0_payload((10**10,), "ByteStorage") + b"tR"
    ckpt = save({"a": torch.zeros(1, dtype=torch.uint8),
                 "state_dict": {"fc.weight": torch.eye(2)}, "x": Raw(payload)},
                tmp_path / "iterate.ckpt")
    proc = run_sub(["analyze", ckpt], cwd=tmp_path, timeout=60)
    assert_one_line_exit_2(proc.returncode, proc.stderr, str(ckpt), "tensor",
                           "builtins.bytearray")


@pytest.mark.parametrize("text, value", [("1024", 1024), ("512M", 512 * 2**20), ("4G", 4 * 2**30),
                                         ("1.5GiB", 3 * 2**29), ("2kb", 2048), ("1T", 2**40)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0", "-1G", "4X", "1e9"])
def test_bad_max_bytes_exits_2(tmp_path, capsys, text):
    ckpt = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.eye(3)}, ckpt)
    for command in (["analyze", ckpt], ["align", ckpt, ckpt, "--data", "random"]):
        code, _, err = run_in(capsys, *command, f"--max-bytes={text}")
        assert_one_line_exit_2(code, err, "--max-bytes")


def test_default_budget_is_a_quarter_of_memory():
    budget = default_max_bytes()
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < budget <= pages // 4
    assert format_bytes(3 * 2**29) == "1.5 GiB" and format_bytes(100) == "100 bytes"


def test_zip_checkpoints_are_memory_mapped(tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save({"fc.weight": torch.eye(3)}, tmp_path / "zip.pt")
    torch.save({"fc.weight": torch.eye(3)}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(tmp_path / "zip.pt")["fc.weight"], torch.eye(3))
    assert torch.equal(load_state_dict(tmp_path / "legacy.pt")["fc.weight"], torch.eye(3))
    assert [(c["mmap"], c["weights_only"]) for c in calls] == [(True, True), (False, True)]


def test_spectra_chunks_shrink_to_the_budget():
    weights = {f"l{i}.weight": torch.eye(64) * (i + 1) for i in range(6)}
    one = svd_working_bytes(weights["l0.weight"])
    steps = []
    spectra = weight_spectra(weights, progress=lambda done, total: steps.append(done),
                             max_bytes=2 * one + 1)
    assert steps == [2, 4, 6]
    assert all(torch.allclose(spectra[f"l{i}.weight"], torch.full((64,), float(i + 1)))
               for i in range(6))


# ------------------------------------------------------------------------------------------
# 4. paths that are not regular checkpoint files


@pytest.mark.parametrize("command", ["analyze", "align"])
def test_name_too_long(tmp_path, capsys, command):
    path = tmp_path / ("a" * 300 + ".ckpt")
    args = [command, path] + ([path, "--data", "random"] if command == "align" else [])
    code, _, err = run_in(capsys, *args)
    assert_one_line_exit_2(code, err, str(path), "too long")


@pytest.mark.parametrize("command", ["analyze", "align"])
def test_empty_file_and_directory(tmp_path, capsys, command):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for path, what in ((empty, "empty file"), (tmp_path, "is a directory")):
        args = [command, path] + ([path, "--data", "random"] if command == "align" else [])
        code, _, err = run_in(capsys, *args)
        assert_one_line_exit_2(code, err, str(path), what)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX special files")
@pytest.mark.parametrize("command", ["analyze", "align"])
def test_fifo_does_not_hang(tmp_path, capsys, command):
    """Opening a FIFO blocks until a writer appears: it must never be opened."""
    path = tmp_path / "pipe.ckpt"
    os.mkfifo(path)
    args = [command, path] + ([path, "--data", "random"] if command == "align" else [])
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(main([str(a) for a in args])),
                              daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():  # release the blocked reader before failing
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout=30)
        pytest.fail(f"{command} blocked on a FIFO")
    _, err = capsys.readouterr()
    assert_one_line_exit_2(result[0], err, str(path), "FIFO", "not a regular file")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs POSIX special files")
@pytest.mark.parametrize("kind", ["socket", "/dev/null", "/dev/zero"])
def test_special_files_are_refused(tmp_path, capsys, kind):
    if kind == "socket":
        path, what = tmp_path / "s.ckpt", "socket"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    else:
        path, what = Path(kind), "character device"
        if not path.exists():
            pytest.skip(f"no {kind}")
    try:
        for command in (["analyze", path], ["align", path, path, "--data", "random"]):
            code, _, err = run_in(capsys, *command)
            assert_one_line_exit_2(code, err, str(path), what, "not a regular file")
    finally:
        if kind == "socket":
            sock.close()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_permission_denied(tmp_path, capsys):
    ckpt = tmp_path / "locked.pt"
    torch.save({"fc.weight": torch.eye(2)}, ckpt)
    ckpt.chmod(0)
    code, _, err = run_in(capsys, "analyze", ckpt)
    assert_one_line_exit_2(code, err, str(ckpt), "permission denied")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_and_corrupt_files(tmp_path, capsys, legacy):
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.eye(8)}, buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    for i, blob in enumerate([data[: len(data) // 2], data[:40], data[:-3] + b"\xff\xfe\xfd",
                              b"\x80\x02" + b"\xff" * 50]):
        path = tmp_path / f"bad{i}.pt"
        path.write_bytes(blob)
        for command in (["analyze", path], ["align", path, path, "--data", "random"]):
            code, out, err = run_in(capsys, *command)
            assert code in (0, 2), err
            if code == 2:
                assert_one_line_exit_2(code, err, str(path))
