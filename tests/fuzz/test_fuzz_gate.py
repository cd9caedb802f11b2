"""Fuzzing ``lightning-spectral check``: mutated event files, CSV logs and TOML rules files.

Every case must end in exit status 0, 1 or 2 within seconds: never a traceback, an internal
error, a hang, a file written, a leaked file descriptor or a change of process state. Exit 2
prints exactly one line on stderr; 0 and 1 print only one-line warnings there. Inputs are
mutations of real files (a ``SummaryWriter`` run with scalars, histograms, images and text; the
project's writer; a CSVLogger-like ``metrics.csv``; a rules file): truncation, bit flips,
splices, re-framed records with valid checksums (so the protobuf decoder sees the damage),
wrong wire types and huge declared lengths. Two oracles check that what is reported is what
was logged: CSV values against an independent reduction, and rule line numbers.

Deterministic (``derandomize=True``); the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_spectral._crc32c import masked_crc32c
from lightning_spectral.cli import main
from lightning_spectral.gate import load_rules
from lightning_spectral.testing import write_scalars

FUZZ = settings(derandomize=True, deadline=5000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(examples: int) -> settings:
    """Deterministic settings with ``examples`` cases (each must finish within 5 s)."""
    return settings(FUZZ, max_examples=examples)
EVENTS = "events.out.tfevents.1700000000.fuzz.1.0"
RULES_TOML = """\
# rules for the fuzzed runs: everything is optional, so any run that reads passes or fails
[[rule]]
check = "* >= -inf"
optional = true

[[rule]]
name = "min of all"
check = "* min > -1e30"
optional = true
"""
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


# ----------------------------------------------------------------------------- harness


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the body runs longer than ``seconds``."""
    if (not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"check did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return None


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            out[p] = (st_.st_size, st_.st_mtime_ns)
    return out


def _state(root: Path) -> tuple:
    return (os.getcwd(), dict(os.environ), list(sys.path), _open_fds(), _tree(root),
            threading.active_count(), signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGPIPE) if hasattr(signal, "SIGPIPE") else None,
            np.geterr(), sys.stdout, sys.stderr)


def check(root: Path, *argv: str | os.PathLike, junit: Path | None = None
          ) -> tuple[int, str, str]:
    """``main(["check", *argv])`` in-process, asserting the contract; returns (code, out, err).

    ``root`` (the example's directory) must be left exactly as it was, except for ``junit``."""
    args = ["check", *map(os.fspath, argv)]
    if junit is not None:
        args += ["--junit", os.fspath(junit)]
    before = _state(root)
    out, err = io.StringIO(), io.StringIO()
    with watchdog(20), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    after = _state(root)
    if junit is not None and junit.exists():
        after[4].pop(os.fspath(junit))
    assert before == after, "the check changed files or process state"
    out_s, err_s = out.getvalue(), err.getvalue()
    event(f"exit {code}" + (" with a warning" if code != 2 and err_s else ""))
    assert code in (0, 1, 2), (code, err_s)
    assert "Traceback" not in err_s and "internal error" not in err_s, err_s
    assert not _CONTROL.search(out_s) and not _CONTROL.search(err_s), (out_s, err_s)
    lines = err_s.splitlines()
    assert err_s == "" or err_s.endswith("\n")
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("lightning-spectral check: error: "), err_s
    else:
        assert all(line.startswith("lightning-spectral check: warning: ") for line in lines)
        if junit is not None:
            ET.parse(junit)  # well-formed whatever the tags hold
    for line in out_s.splitlines():  # no line may pass for a CI workflow command by accident
        if not line.startswith(("::error ", "::notice ")):
            assert not line.lstrip().startswith("::") and "##[" not in line, line
    return code, out_s, err_s


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Real files to mutate."""
    root = tmp_path_factory.mktemp("seeds")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(root / "tb"))
    rng = np.random.default_rng(0)
    for step in range(0, 12, 3):
        writer.add_scalar("vne/encoder.fc1", 1.0 + 0.1 * step, step)
        writer.add_scalar("collapse/nc1", 1.0 / (step + 1), step, new_style=True)
        writer.add_histogram("eigvals/fc1", rng.random(16) + step, step)
    writer.add_image("spectra/fc1", rng.random((3, 8, 8)), 0)
    writer.add_text("notes", "a *spectral* note", 0)
    writer.add_custom_scalars({"spectral": {"vne": ["Multiline", ["^vne/"]]}})
    writer.close()
    (tb,) = (root / "tb").glob("events*")
    own = write_scalars(root / "own", [(t, s, 0.5 * s + j) for s in range(6)
                                       for j, t in enumerate(["a", "b/c", "dé"])])
    tensor = write_scalars(root / "tensor", [("t", s, float(s)) for s in range(4)],
                           tensor_encoded=True)
    shaped = b""  # TF1-style scalar tensors: shape [1], float_val, the 'scalars' plugin
    for step in range(3):
        proto = (b"\x08\x01" + ld(2, ld(2, b"\x08\x01"))
                 + ld(5, struct.pack("<f", 0.25 * step)))
        value = ld(1, b"s") + ld(8, proto) + ld(9, ld(1, ld(1, b"scalars")))
        event = (b"\x09" + struct.pack("<d", 1.7e9 + step) + b"\x10" + varint(step)
                 + ld(5, ld(1, value)))
        shaped += frame(event)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", "step", "train_loss", "vne/fc1", "val_acc"])
    for s in range(6):
        w.writerow([s // 3, s, 2.0 / (s + 1), "" if s % 2 else 1.0 + s, "" if s < 5 else 0.9])
    return {"summarywriter": tb.read_bytes(), "own": own.read_bytes(),
            "tensor": tensor.read_bytes(), "shaped": shaped, "csv": buf.getvalue().encode(),
            "rules": RULES_TOML.encode()}


@contextlib.contextmanager
def example_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz_gate_") as d:
        yield Path(d)


# ----------------------------------------------------------------------------- mutations


def split_records(buf: bytes) -> list[bytes]:
    out, off = [], 0
    while off + 12 <= len(buf):
        (length,) = struct.unpack_from("<Q", buf, off)
        out.append(buf[off + 12 : off + 12 + length])
        off += 16 + length
    return out


def frame(data: bytes, length: int | None = None, good_head_crc: bool = True) -> bytes:
    head = struct.pack("<Q", len(data) if length is None else length)
    crc = masked_crc32c(head) if good_head_crc else masked_crc32c(head) ^ 0x5A5A
    return head + struct.pack("<I", crc) + data + struct.pack("<I", masked_crc32c(data))


@st.composite
def byte_mutations(draw, seed: bytes, max_ops: int = 4) -> bytes:
    """Truncate, flip, overwrite, splice (duplicate a region elsewhere), delete, insert."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, max_ops))):
        n = len(data)
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "splice", "delete",
                                   "insert"]))
        at = draw(st.integers(0, n))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and at < n:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=12))
            data[at : at + len(chunk)] = chunk
        elif op == "splice":
            a = draw(st.integers(0, n))
            b = draw(st.integers(a, min(n, a + 64)))
            data[at:at] = data[a:b]
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


@st.composite
def reframed_records(draw, seed: bytes) -> bytes:
    """Damage the *data* of records and frame them again with valid checksums, so that the
    damage reaches the protobuf decoder: bit flips, wrong wire types, varint runs, huge
    embedded lengths, truncated or extended payloads, dropped or duplicated records."""
    recs = split_records(seed)
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(0, len(recs) - 1))
        rec = bytearray(recs[k])
        n = len(rec)
        at = draw(st.integers(0, max(0, n - 1)))
        op = draw(st.sampled_from(["flip", "wire", "varint", "huge", "truncate", "extend",
                                   "drop", "duplicate", "bytes"]))
        if op == "flip" and n:
            rec[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "wire" and n:  # a protobuf key byte given another wire type
            rec[at] = (rec[at] & ~7) | draw(st.integers(0, 7))
        elif op == "varint":
            rec[at:at] = b"\xff" * draw(st.integers(1, 12)) + b"\x01"
        elif op == "huge":  # a length-delimited field declaring an enormous length
            field = draw(st.sampled_from([1, 2, 5, 8, 9]))
            rec[at:at] = varint(field << 3 | 2) + varint(draw(st.sampled_from(
                [2**31, 2**63 - 1, 2**64 - 1, n + 1])))
        elif op == "truncate":
            del rec[at:]
        elif op == "extend":
            rec += draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and len(recs) > 1:
            del recs[k]
            continue
        elif op == "duplicate":
            recs.insert(k, recs[k])
            continue
        elif op == "bytes":
            chunk = draw(st.binary(min_size=1, max_size=8))
            rec[at : at + len(chunk)] = chunk
        recs[k] = bytes(rec)
    return b"".join(frame(r) for r in recs)


def parse_message(buf: bytes, depth: int = 0) -> list | None:
    """A protobuf message as ``[[field, wire, value], ...]`` (a length-delimited value that
    parses as a message is a nested list), or None if ``buf`` is not a message."""
    out, pos, n = [], 0, len(buf)
    try:
        while pos < n:
            key, pos = _read_varint(buf, pos)
            field, wire = key >> 3, key & 7
            if field == 0:
                return None
            if wire == 0:
                value, pos = _read_varint(buf, pos)
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                if pos + size > n:
                    return None
                value, pos = buf[pos : pos + size], pos + size
            elif wire == 2:
                size, pos = _read_varint(buf, pos)
                if pos + size > n:
                    return None
                raw, pos = buf[pos : pos + size], pos + size
                nested = parse_message(raw, depth + 1) if raw and depth < 8 else None
                value = nested if nested else raw
            else:
                return None
            out.append([field, wire, value])
    except IndexError:
        return None
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def encode_message(msg: list) -> bytes:
    out = bytearray()
    for field, wire, value in msg:
        out += varint(field << 3 | wire)
        if isinstance(value, list):
            value = encode_message(value)
        if wire == 0:
            out += varint(value if isinstance(value, int) else len(value))
        elif wire == 2:
            value = value if isinstance(value, bytes) else varint(value)
            out += varint(len(value)) + value
        else:
            size = 8 if wire == 1 else 4
            raw = value if isinstance(value, bytes) else struct.pack("<Q", value)
            out += (raw + bytes(size))[:size]
    return bytes(out)


def _nodes(msg: list, path: tuple = ()) -> list[tuple]:
    out = []
    for i, (_, _, value) in enumerate(msg):
        out.append((*path, i))
        if isinstance(value, list):
            out += _nodes(value, (*path, i))
    return out


@st.composite
def proto_mutations(draw, seed: bytes) -> bytes:
    """Structure-aware damage: a field anywhere in a record's message tree (an Event, its
    Summary, a Value, a TensorProto, its shape...) gets another wire type, field number or
    value; the record is encoded again with consistent lengths and framed with valid CRCs."""
    recs = split_records(seed)
    candidates = [i for i, r in enumerate(recs) if parse_message(r)]
    k = draw(st.sampled_from(candidates))
    msg = parse_message(recs[k])
    for _ in range(draw(st.integers(1, 2))):
        nodes = _nodes(msg)
        depth = draw(st.sampled_from(sorted({len(p) for p in nodes})))  # deep fields too
        path = draw(st.sampled_from([p for p in nodes if len(p) == depth]))
        parent = msg
        for i in path[:-1]:
            parent = parent[i][2]
        node = parent[path[-1]]
        op = draw(st.sampled_from(["wire", "wire", "field", "value", "delete", "duplicate"]))
        if op == "wire":
            node[1] = draw(st.sampled_from([0, 1, 2, 5]))
        elif op == "field":
            node[0] = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 16, 17]))
        elif op == "value":
            node[2] = draw(st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=12)))
        elif op == "delete":
            del parent[path[-1]]
            if not msg:
                break
        else:
            parent.insert(path[-1], [node[0], node[1], node[2]])
    recs[k] = encode_message(msg)
    return b"".join(frame(r) for r in recs)


@st.composite
def header_bombs(draw, seed: bytes) -> bytes:
    """A record header declaring a huge (or merely wrong) length, with a valid or an invalid
    checksum, at a record boundary; the bytes after it are the file's own."""
    recs = split_records(seed)
    k = draw(st.integers(0, len(recs) - 1))
    head = b"".join(frame(r) for r in recs[:k])
    rest = b"".join(frame(r) for r in recs[k:])
    declared = draw(st.one_of(
        st.sampled_from([2**63, 2**64 - 1, 2**62 + 5, 2**40, len(rest), len(rest) - 15,
                         len(rest) + 1]),
        st.integers(0, 2**64 - 1)))
    good = draw(st.booleans())
    bomb = frame(b"", length=declared, good_head_crc=good)[:12]
    keep = draw(st.integers(0, len(rest)))
    return head + bomb + rest[12 : 12 + keep]


def write_run(root: Path, blob: bytes, name: str = EVENTS) -> Path:
    run = root / "run"
    run.mkdir()
    (run / name).write_bytes(blob)
    return run


def write_rules(root: Path) -> Path:
    path = root / "rules.toml"
    path.write_text(RULES_TOML, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- event files


@fuzz(120)
@given(data=st.data(), which=st.sampled_from(["summarywriter", "own", "tensor"]),
       fmt=st.sampled_from(["text", "json", "github", "markdown"]))
def test_mutated_event_file_bytes(seeds, data, which, fmt):
    blob = data.draw(byte_mutations(seeds[which]), label="file")
    with example_dir() as root:
        run = write_run(root, blob)
        check(root, run, "--rules", write_rules(root), "--format", fmt,
              junit=root / "junit.xml")


@fuzz(150)
@given(data=st.data(), which=st.sampled_from(["summarywriter", "own", "tensor", "shaped"]))
def test_reframed_records_reach_the_decoder(seeds, data, which):
    blob = data.draw(reframed_records(seeds[which]), label="file")
    with example_dir() as root:
        run = write_run(root, blob)
        code, out, err = check(root, run, "--rules", write_rules(root), "--format", "json")
        if code != 2:
            json.loads(out)


@fuzz(150)
@given(data=st.data(), which=st.sampled_from(["summarywriter", "tensor", "shaped", "own"]))
def test_wrong_wire_types_and_fields_in_valid_records(seeds, data, which):
    blob = data.draw(proto_mutations(seeds[which]), label="file")
    with example_dir() as root:
        run = write_run(root, blob)
        check(root, run, "--rules", write_rules(root), junit=root / "junit.xml")


@fuzz(60)
@given(data=st.data(), which=st.sampled_from(["summarywriter", "own"]))
def test_huge_declared_lengths(seeds, data, which):
    blob = data.draw(header_bombs(seeds[which]), label="file")
    with example_dir() as root:
        run = write_run(root, blob)
        code, _, err = check(root, run, "--rules", write_rules(root))
        if code == 2:
            assert EVENTS in err


@fuzz(40)
@given(data=st.data())
def test_several_mutated_files_in_one_run(seeds, data):
    """A resumed run (two event files) with either one damaged, and a special file."""
    with example_dir() as root:
        run = root / "run"
        run.mkdir()
        first = data.draw(st.sampled_from(["summarywriter", "own"]))
        blob = seeds[first]
        if data.draw(st.booleans()):
            blob = data.draw(byte_mutations(blob, max_ops=2))
        (run / EVENTS).write_bytes(blob)
        second = seeds["own"]
        if data.draw(st.booleans()):
            second = data.draw(reframed_records(second))
        (run / "events.out.tfevents.1800000000.fuzz.2.0").write_bytes(second)
        if data.draw(st.booleans()):
            os.mkfifo(run / "events.out.tfevents.1900000000.fuzz.3.0")
        check(root, run, "--rules", write_rules(root), "--format", "github")


# ----------------------------------------------------------------------------- CSV

CELLS = st.one_of(
    st.sampled_from(["", "0", "1", "-1", "2.5", "1.0", "inf", "-inf", "nan", "NaN", "1e30",
                     "1e999", "-1e-999", "9223372036854775807", "9223372036854775808",
                     " 3 ", "abc", "0x10", "1_000", "١٢", "\x00", '"', "1,5", "∞", "1e-3"]),
    st.text(max_size=6))
HEADERS = st.one_of(
    st.sampled_from(["step", "epoch", "loss", "vne/a", "a", "", "\ufeffstep", "x\ny",
                     "::error::x", "##[error]y", "step ", "Step"]),
    st.text(max_size=5))


NUMBERS = st.one_of(st.integers(-10, 10).map(str), st.floats(width=32).map(repr),
                    st.sampled_from(["", "", "1e-3", "inf", "nan"]))


@st.composite
def csv_files(draw) -> bytes:
    if draw(st.booleans()):  # hostile: any header, any cell
        header = draw(st.lists(HEADERS, min_size=1, max_size=5))
        rows = draw(st.lists(st.lists(CELLS, max_size=len(header) + 1), max_size=8))
    else:  # plausible: distinct names, a step column, numbers (and a few surprises)
        names = draw(st.lists(st.sampled_from(["loss", "vne/a", "acc", "epoch", "x\x1by",
                                               "::error::z"]), min_size=1, max_size=4,
                              unique=True))
        header = ["step", *names]
        rows = [[draw(st.one_of(st.integers(0, 50).map(str), st.just("2.0"),
                                st.sampled_from(["", "1.5", "1e30"])))]
                + [draw(NUMBERS) for _ in names]
                for _ in range(draw(st.integers(0, 8)))]
    buf = io.StringIO()
    if draw(st.booleans()):
        csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(
            [header, *rows])
    else:  # raw: no quoting at all
        buf.write("\n".join(",".join(r) for r in [header, *rows]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return buf.getvalue().encode(encoding, errors="replace")


@fuzz(150)
@given(blob=csv_files(), fmt=st.sampled_from(["text", "json", "github", "markdown"]))
def test_generated_csv_logs(blob, fmt):
    with example_dir() as root:
        path = root / "metrics.csv"
        path.write_bytes(blob)
        target = path if len(blob) % 2 else root
        check(root, target, "--rule", "* >= -inf", "--format", fmt, junit=root / "j.xml")


@fuzz(80)
@given(data=st.data())
def test_mutated_csv_bytes(seeds, data):
    blob = data.draw(byte_mutations(seeds["csv"]), label="file")
    with example_dir() as root:
        (root / "metrics.csv").write_bytes(blob)
        check(root, root, "--rules", write_rules(root))


@fuzz(60)
@given(rows=st.lists(st.tuples(st.integers(-5, 30), st.lists(st.one_of(
    st.none(), st.floats(allow_nan=False, allow_infinity=False, width=64)),
    min_size=3, max_size=3)), min_size=1, max_size=12),
    bom=st.booleans())
def test_csv_values_are_reported_exactly(rows, bom):
    """Oracle: the reported last / min / mean of each column equal an independent reduction
    (one value per step, the later row wins) — nothing lost, merged or reordered."""
    names = ["loss", "vne/a", "acc"]
    text = "step," + ",".join(names) + "\n" + "".join(
        f"{step}," + ",".join("" if v is None else repr(v) for v in values) + "\n"
        for step, values in rows)
    series: dict[str, dict[int, float]] = {}
    for step, values in rows:
        for name, v in zip(names, values, strict=True):
            if v is not None:
                series.setdefault(name, {})[step] = v
    with example_dir() as root:
        path = root / "metrics.csv"
        path.write_bytes(text.encode("utf-8-sig" if bom else "utf-8"))
        code, out, err = check(root, path, "--format", "json", "--rule", "* last >= -inf",
                               "--rule", "* min >= -inf", "--rule", "* mean >= -inf")
    if not series:
        assert code == 2 and "no logged values" in err
        return
    assert code in (0, 1), err
    got = {(c["tag"], c["reducer"]): c["value"] for c in json.loads(out)["checks"]}
    assert {tag for tag, _ in got} == set(series)
    for tag, by_step in series.items():
        ordered = [by_step[s] for s in sorted(by_step)]
        expected = {"last": ordered[-1], "min": min(ordered),
                    "mean": float(np.mean(np.asarray(ordered, dtype=np.float64)))}
        for reducer, value in expected.items():
            reported = got[(tag, reducer)]
            if not math.isfinite(value):  # an overflowing mean: reported as a string
                assert reported in ("inf", "-inf", None)
            else:
                assert reported == value, (tag, reducer, reported, value)


# ----------------------------------------------------------------------------- TOML rules

RULE_TEXTS = ["vne/* > 1", "collapse/nc1 last < 0.5", "a mean(last=3) <= 2", "* min >= 0",
              "b != inf", "* slope(last=3) < 1e9", "vne/* drop_from_max_rel <= 0.3",
              "* drop_from_max >= 0"]
# rules that compare with a baseline run (--baseline)
BASELINE_TEXTS = ["* last >= 0.8 * baseline", "* mean(last=2) <= baseline + 1",
                  "a drop_from_max_rel <= 2 * baseline - 0.5", "b/c slope(last=4) == baseline",
                  "* >= baseline"]


@fuzz(100)
@given(data=st.data())
def test_mutated_rules_files(seeds, data):
    blob = data.draw(byte_mutations(seeds["rules"]), label="rules")
    with example_dir() as root:
        run = write_run(root, seeds["own"])
        path = root / "rules.toml"
        path.write_bytes(blob)
        check(root, run, "--rules", path, "--format", "github")


@fuzz(80)
@given(rule=st.one_of(st.text(max_size=30),
                      st.sampled_from(RULE_TEXTS + BASELINE_TEXTS).map(
                          lambda r: r.replace(" ", "\t")),
                      st.builds(lambda a, b: a + b, st.sampled_from(RULE_TEXTS + BASELINE_TEXTS),
                                st.text(max_size=8)),
                      st.just("a mean(last=" + "9" * 40 + ") > 1"),
                      st.just("a slope(last=" + "9" * 18 + ") > 1"),
                      st.just("a >= " + "9" * 400 + " * baseline - " + "9" * 400),
                      st.just("a > " + "1" * 5000)),
       baseline=st.booleans())
def test_arbitrary_rule_strings(seeds, rule, baseline):
    if "\x00" in rule:  # argv cannot hold NUL; the library refuses it as any bad rule
        rule = rule.replace("\x00", "?")
    with example_dir() as root:
        run = write_run(root, seeds["own"])
        extra = ["--baseline", run] if baseline else []
        code, out, err = check(root, run, "--rule", rule, "--format", "json", *extra)
        if "baseline" in rule and not baseline and code == 2:
            assert "baseline" in err


@fuzz(60)
@given(data=st.data(), which=st.sampled_from(["summarywriter", "own", "csv"]),
       fmt=st.sampled_from(["text", "json", "github", "markdown"]))
def test_mutated_baseline_runs(seeds, data, which, fmt):
    """A damaged baseline is bad input naming the baseline (or reads and compares): the run
    itself is intact."""
    with example_dir() as root:
        run = write_run(root, seeds["own"])
        blob = data.draw(byte_mutations(seeds[which]), label="baseline")
        base = root / "base"
        base.mkdir()
        (base / ("metrics.csv" if which == "csv" else EVENTS)).write_bytes(blob)
        rules = [arg for text in data.draw(st.lists(st.sampled_from(BASELINE_TEXTS),
                                                    min_size=1, max_size=3))
                 for arg in ("--rule", text)]
        code, _, err = check(root, run, "--baseline", base, *rules, "--format", fmt,
                             junit=root / "junit.xml")
        if code == 2 and "no tag matches" not in err:
            assert "baseline" in err, err


@st.composite
def rules_files_with_lines(draw) -> tuple[str, list[int]]:
    """A rules file whose rule texts also appear in comments, names and multi-line strings,
    with every header and key spelling; returns (text, the line of each rule's check key)."""
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    lines: list[str] = []
    expected: list[int] = []
    inline = draw(st.booleans()) and draw(st.booleans())
    n_rules = draw(st.integers(1, 5))
    texts = [draw(st.sampled_from(RULE_TEXTS)) for _ in range(n_rules)]
    if inline:
        lines.append("rule = [")
        for text in texts:
            if draw(st.booleans()):
                lines.append(f"  # {{ check = \"{text}\" }}")
            name = draw(st.sampled_from(["", f'name = "check = {text}", ']))
            lines.append(f'  {{ {name}check = "{text}" }},')
            expected.append(len(lines))
        lines.append("]")
        return newline.join(lines) + newline, expected
    for text in texts:
        for _ in range(draw(st.integers(0, 2))):
            lines.append(draw(st.sampled_from([
                f'# check = "{text}"', "# [[rule]]", "", f"   # check = '{text}'"])))
        lines.append(draw(st.sampled_from(["[[rule]]", "[[ rule ]]", '[["rule"]]',
                                           "[[ 'rule' ]]  # a rule", "  [[rule]]"])))
        before = draw(st.sampled_from(["none", "name", "multiline", "optional"]))
        if before == "name":
            lines.append(f'name = "check = \\"{text}\\""')
        elif before == "multiline":
            lines += ['name = """', "[[rule]]", f'check = "{text}"', '"""']
        elif before == "optional":
            lines.append("optional = true")
        key = draw(st.sampled_from(["check", '"check"', "'check'", "  check"]))
        value = draw(st.sampled_from([f'"{text}"', f"'{text}'", f"'''{text}'''"]))
        comment = draw(st.sampled_from(["", f'  # check = "{text}"']))
        lines.append(f"{key} = {value}{comment}")
        expected.append(len(lines))
        if draw(st.booleans()):
            lines.append(f'# after: check = "{text}"')
    return newline.join(lines) + newline, expected


@fuzz(100)
@given(case=rules_files_with_lines())
def test_rule_line_numbers_oracle(case):
    text, expected = case
    with example_dir() as root:
        path = root / "rules.toml"
        path.write_bytes(text.encode())
        sources = [r.source for r in load_rules(path)]
    assert sources == [f"{path}:{line}" for line in expected], text


# ----------------------------------------------------------------------------- processes


@pytest.mark.parametrize("case", ["damaged-events", "hostile-csv"])
def test_subprocess_cases(seeds, case):
    """In a real process: exit status, no traceback, nothing left waiting."""
    with example_dir() as root:
        if case == "damaged-events":
            blob = bytearray(seeds["summarywriter"])
            blob[len(blob) // 3] ^= 0x20
            run = write_run(root, bytes(blob[:-5]))
            os.mkfifo(run / "metrics.csv")
        else:
            run = root / "run"
            run.mkdir()
            (run / "metrics.csv").write_bytes(
                "\ufeffstep,a,a\n1.5,inf,2\n".encode() + b"\xff\x00")
        done = subprocess.run(
            [sys.executable, "-m", "lightning_spectral", "check", str(run), "--rules",
             str(write_rules(root))], capture_output=True, text=True, timeout=60,
            env=dict(os.environ))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
