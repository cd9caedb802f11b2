"""``lightning-spectral check`` on hostile input: it never hangs, never prints a traceback and
never reports something it did not read.

Exit status 0 (pass), 1 (a check failed) or 2 (bad input, one line on stderr naming the file,
tag or rule); special files inside a run are skipped with a one-line warning.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lightning_spectral import gate
from lightning_spectral._crc32c import masked_crc32c
from lightning_spectral.cli import main
from lightning_spectral.gate import load_rules, read_run

# a control character (other than the newline ending a line) anywhere in the output
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(["check", *argv])`` in-process: (exit status, stdout, stderr)."""
    try:
        code = main(["check", *map(str, argv)])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and err.startswith("lightning-spectral check: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def frame(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    head = struct.pack("<Q", len(data))
    return (head + struct.pack("<I", masked_crc32c(head)) + data
            + struct.pack("<I", masked_crc32c(data)))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            return bytes(out + bytes([n]))
        out.append(n & 0x7F | 0x80)
        n >>= 7


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def scalar_tensor_event(tensor: bytes, tag: bytes = b"t", step: int = 1) -> bytes:
    """``Event{wall_time, step, summary{value{tag, tensor, metadata{plugin 'scalars'}}}}``."""
    metadata = ld(1, ld(1, b"scalars"))
    value = ld(1, tag) + ld(8, tensor) + ld(9, metadata)
    return b"\x09" + struct.pack("<d", 1.7e9) + b"\x10" + varint(step) + ld(5, ld(1, value))


def subprocess_check(*argv, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m lightning_spectral check ARGV``, failing the test instead of hanging."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "lightning_spectral", "check", *map(os.fspath, argv)],
            capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        pytest.fail(f"check {' '.join(map(str, argv))} hung (killed after {timeout} s)")


@pytest.fixture
def short_tmp():
    """A short temporary directory (AF_UNIX socket paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="lsh", dir="/tmp") as d:
        yield Path(d)


# ----------------------------------------------------------------------------- special files


def test_fifo_named_metrics_csv_inside_a_run_does_not_hang(tmp_path: Path, events):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "metrics.csv")
    done = subprocess_check(run, "--rule", "a > 0", timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert str(run / "metrics.csv") in done.stderr and "FIFO" in done.stderr
    # next to a real run (one sub-directory with event files) it is skipped with a warning
    events(run / "version_0", {"a": [1.0, 2.0]})
    done = subprocess_check(run, "--rule", "a > 0", timeout=30)
    assert done.returncode == 0, done.stderr
    warning, = done.stderr.splitlines()
    assert warning.startswith("lightning-spectral check: warning: ")
    assert str(run / "metrics.csv") in warning and "FIFO" in warning and "skipped" in warning


def test_special_files_among_event_files_are_skipped_with_a_warning(short_tmp: Path, events,
                                                                   capsys):
    run = short_tmp / "run"
    events(run, {"a": [1.0, 2.0]})
    os.mkfifo(run / "events.out.tfevents.2.host.fifo")
    (run / "events.out.tfevents.3.host.zero").symlink_to("/dev/zero")  # endless, if read
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(run / "events.out.tfevents.4.host.sock"))
        code, out, err = run_main(capsys, run, "--rule", "a == 2")
    finally:
        sock.close()
    assert code == 0, err
    assert "PASSED: 1 checks" in out
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert all(line.startswith("lightning-spectral check: warning: ") for line in lines)
    assert "FIFO" in lines[0] and "character device" in lines[1] and "socket" in lines[2]


def test_a_device_named_metrics_csv_is_skipped(tmp_path: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").symlink_to("/dev/zero")
    code, _, err = run_main(capsys, run, "--rule", "a > 0")
    assert_one_line_error(code, err, str(run / "metrics.csv"), "character device",
                          "empty run")


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_run_argument_that_is_not_a_file_or_directory(tmp_path: Path, capsys, kind):
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        what = "FIFO"
    else:
        path = Path("/dev/null")
        what = "character device"
    done = subprocess_check(path, "--rule", "a > 0", timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and str(path) in done.stderr and what in done.stderr
    code, _, err = run_main(capsys, path, "--rule", "a > 0")
    assert_one_line_error(code, err, str(path), "not a regular file or directory")


def test_rules_file_and_junit_report_that_are_fifos(tmp_path: Path, demo_run: Path):
    fifo = tmp_path / "rules.toml"
    os.mkfifo(fifo)
    done = subprocess_check(demo_run, "--rules", fifo, timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert str(fifo) in done.stderr and "FIFO" in done.stderr
    junit = tmp_path / "report.xml"
    os.mkfifo(junit)  # nobody reads it: writing must not block forever
    done = subprocess_check(demo_run, "--rule", "vne/* > 0", "--junit", junit, timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert str(junit) in done.stderr and "Traceback" not in done.stderr


def test_name_too_long(tmp_path: Path, demo_run: Path, capsys):
    long_name = tmp_path / ("x" * 300)
    code, _, err = run_main(capsys, long_name, "--rule", "a > 0")
    assert_one_line_error(code, err, "x" * 300, "File name too long")
    code, _, err = run_main(capsys, demo_run, "--rules", tmp_path / ("y" * 300 + ".toml"))
    assert_one_line_error(code, err, "y" * 300, "File name too long")
    code, _, err = run_main(capsys, tmp_path / ("z" * 300) / "metrics.csv", "--rule", "a > 0")
    assert_one_line_error(code, err, "z" * 300)


# ----------------------------------------------------------------------------- unreadable dirs


def _deny(monkeypatch, denied: Path) -> None:
    """Make listing ``denied`` fail with EACCES (as chmod 000 would for a non-root user)."""
    def refuse(target) -> bool:
        try:
            return Path(os.fsdecode(target)).resolve() == denied.resolve()
        except (TypeError, OSError):
            return False

    real_scandir, real_listdir, real_iterdir = os.scandir, os.listdir, Path.iterdir

    def scandir(target="."):
        if refuse(target):
            raise PermissionError(13, "Permission denied", str(target))
        return real_scandir(target)

    def listdir(target="."):
        if refuse(target):
            raise PermissionError(13, "Permission denied", str(target))
        return real_listdir(target)

    def iterdir(self):
        if refuse(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(Path, "iterdir", iterdir)


def test_run_directory_that_cannot_be_listed(tmp_path: Path, events, capsys, monkeypatch):
    run = tmp_path / "run"
    events(run, {"a": [1.0]})
    _deny(monkeypatch, run)
    code, _, err = run_main(capsys, run, "--rule", "a > 0")
    assert_one_line_error(code, err, str(run), "Permission denied")


def test_unreadable_sub_directory_is_not_an_empty_run(tmp_path: Path, events, capsys,
                                                      monkeypatch):
    run = tmp_path / "runs"
    events(run / "version_0", {"a": [1.0]})
    _deny(monkeypatch, run / "version_0")
    code, _, err = run_main(capsys, run, "--rule", "a > 0")
    assert_one_line_error(code, err, str(run / "version_0"), "Permission denied")
    assert "empty run" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads a chmod 000 directory anyway (covered by monkeypatch)")
def test_unreadable_sub_directory_with_real_permissions(tmp_path: Path, events, capsys):
    run = tmp_path / "runs"
    events(run / "version_0", {"a": [1.0]})
    (run / "version_0").chmod(0)
    try:
        code, _, err = run_main(capsys, run, "--rule", "a > 0")
    finally:
        (run / "version_0").chmod(0o755)
    assert_one_line_error(code, err, str(run / "version_0"), "Permission denied")


# ----------------------------------------------------------------------------- CSV


@pytest.mark.parametrize("cell, why", [
    ("inf", "not finite"), ("-inf", "not finite"), ("nan", "not finite"),
    ("1e30", "out of range"), ("9223372036854775808", "out of range"),
    ("2.5", "not a whole number"), ("1e-3", "not a whole number"),
    ("1e999999999", "out of range"), ("seven", "not a number"),
])
def test_csv_step_cells_that_are_not_steps(tmp_path: Path, capsys, cell: str, why: str):
    path = tmp_path / "metrics.csv"
    path.write_text(f"step,a\n0,1.0\n{cell},2.0\n", encoding="utf-8")
    code, _, err = run_main(capsys, path, "--rule", "a > 0")
    assert_one_line_error(code, err, f"{path}:3", "column 'step'", repr(cell), why)


def test_csv_whole_number_steps_are_exact(tmp_path: Path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,a\n3.0,1\n9007199254740993,2\n1e3,3\n", encoding="utf-8")
    run = read_run(path)
    assert run.scalars["a"].steps.tolist() == [3, 1000, 9007199254740993]


def test_csv_fractional_steps_are_not_truncated_and_merged(tmp_path: Path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_text("step,a\n1.2,1.0\n1.7,5.0\n", encoding="utf-8")
    code, _, err = run_main(capsys, path, "--rule", "a last == 5")
    assert_one_line_error(code, err, f"{path}:2", "column 'step'", "'1.2'")


def test_csv_with_a_byte_order_mark_keeps_its_step_column(tmp_path: Path):
    path = tmp_path / "metrics.csv"
    path.write_bytes("step,a\n5,1.0\n7,2.0\n".encode("utf-8-sig"))
    run = read_run(path)
    assert run.tags == ["a"]
    assert run.scalars["a"].steps.tolist() == [5, 7]


def test_csv_duplicate_columns_are_refused(tmp_path: Path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,acc,loss\n0,1.0,0.5,9.0\n", encoding="utf-8")
    code, _, err = run_main(capsys, path, "--rule", "loss > 0")
    assert_one_line_error(code, err, str(path), "'loss'", "twice")


def test_csv_row_with_values_but_no_step(tmp_path: Path, capsys):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,a\n0,0,1.0\n0,,2.0\n", encoding="utf-8")
    code, _, err = run_main(capsys, path, "--rule", "a > 0")
    assert_one_line_error(code, err, f"{path}:3", "column 'step'", "empty")


# ----------------------------------------------------------------------------- event files


@pytest.mark.parametrize("tensor", [
    b"\x08\x01" + ld(2, b"\x10\x05"),  # tensor_shape.dim as a varint instead of a message
    b"\x08\x01\x28\x05",  # float_val as a varint instead of fixed32
    b"\x08\x01\x29" + b"\x00" * 8,  # float_val as fixed64
    b"\x08\x01" + ld(2, ld(2, b"\x0d\x01\x00\x00\x00")),  # dim.size as fixed32
    b"\x0a\x01\x01",  # dtype as a string
])
def test_crc_valid_record_with_wrong_wire_types(tmp_path: Path, capsys, tensor: bytes):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "events.out.tfevents.1.host"
    version = b"\x09" + struct.pack("<d", 1.7e9) + ld(3, b"brain.Event:2")
    path.write_bytes(frame(version) + frame(scalar_tensor_event(tensor)))
    code, _, err = run_main(capsys, run, "--rule", "t > 0")
    assert_one_line_error(code, err, str(path), "not a valid Event")


def test_wrong_wire_type_for_the_summary_and_the_value(tmp_path: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "events.out.tfevents.1.host"
    summary_as_varint = b"\x09" + struct.pack("<d", 1.7e9) + b"\x10\x01\x28\x07"
    simple_as_varint = (b"\x09" + struct.pack("<d", 1.7e9)
                        + ld(5, ld(1, ld(1, b"t") + b"\x10\x03")))
    for record in (summary_as_varint, simple_as_varint):
        path.write_bytes(frame(record))
        code, _, err = run_main(capsys, run, "--rule", "t > 0")
        assert_one_line_error(code, err, str(path), "not a valid Event", "wire type")


def test_step_varint_wider_than_64_bits(tmp_path: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    event = (b"\x09" + struct.pack("<d", 1.7e9) + b"\x10" + b"\xff" * 9 + b"\x7f"
             + ld(5, ld(1, ld(1, b"t") + b"\x15" + struct.pack("<f", 1.0))))
    (run / "events.out.tfevents.1.host").write_bytes(frame(event))
    code, out, err = run_main(capsys, run, "--rule", "t == 1")
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert_one_line_error(code, err, "events.out.tfevents.1.host")


@pytest.mark.parametrize("tensor, value", [
    (b"\x08\x01" + ld(2, ld(2, b"\x08\x01")) + b"\x2d" + struct.pack("<f", 0.5), 0.5),
    (b"\x08\x02" + b"\x31" + struct.pack("<d", -2.25), -2.25),  # double_val, no shape
    (b"\x08\x09" + ld(4, struct.pack("<q", -7)), -7.0),  # int64 tensor_content
    (b"\x08\x13" + ld(13, varint(0x3C00)), 1.0),  # half_val: the float16 bits of 1.0
    (b"\x08\x01" + ld(2, ld(2, b"")) + b"\x2d" + struct.pack("<f", 0.5), None),  # shape [0]
    (b"\x08\x01" + ld(5, struct.pack("<2f", 1.0, 2.0)), None),  # two values
    (b"\x08\x01", None),  # no value
])
def test_scalars_tensor_must_hold_one_number(tmp_path: Path, capsys, tensor: bytes,
                                             value: float | None):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "events.out.tfevents.1.host"
    path.write_bytes(frame(scalar_tensor_event(tensor)))
    code, _, err = run_main(capsys, run, "--rule", f"t == {value}" if value is not None
                            else "t > 0")
    if value is None:
        assert_one_line_error(code, err, str(path), "'scalars' tensor that is not one number")
    else:
        assert code == 0, err


def test_damage_outside_the_scalars_is_corruption_too(tmp_path: Path, capsys):
    """Every record is parsed whole: a wrong wire type in a histogram or a tag that is not
    UTF-8 (protobuf ``string`` fields must be) is a corrupt record, not a skipped one."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / "events.out.tfevents.1.host"
    version = b"\x09" + struct.pack("<d", 1.7e9) + ld(3, b"brain.Event:2")
    histo_min_as_varint = (b"\x09" + struct.pack("<d", 1.7e9)
                           + ld(5, ld(1, ld(1, b"h") + ld(5, b"\x08\x03"))))
    tag_not_utf8 = scalar_tensor_event(b"\x08\x01\x2d" + struct.pack("<f", 1.0), tag=b"t\xff")
    for record, why in ((histo_min_as_varint, "HistogramProto field 1 has wire type 0"),
                        (tag_not_utf8, "UTF-8")):
        path.write_bytes(frame(version) + frame(record))
        code, _, err = run_main(capsys, run, "--rule", "t > 0")
        assert_one_line_error(code, err, str(path), f"byte {len(frame(version))}",
                              "not a valid Event", why)


def test_wrong_wire_type_found_where_protobuf_cannot_list_unknown_fields(
        tmp_path: Path, capsys, monkeypatch):
    """Where protobuf cannot list unknown fields (older upb-based releases), any unknown field
    is refused."""
    from lightning_spectral import _eventfile

    monkeypatch.setattr(_eventfile, "_unknown_fields", lambda msg: None)
    run = tmp_path / "run"
    run.mkdir()
    path = run / "events.out.tfevents.1.host"
    good = scalar_tensor_event(b"\x08\x01\x2d" + struct.pack("<f", 2.5))
    path.write_bytes(frame(good))
    code, _, err = run_main(capsys, run, "--rule", "t == 2.5")
    assert code == 0, err
    path.write_bytes(frame(scalar_tensor_event(b"\x08\x01\x28\x05")))  # float_val as varint
    code, _, err = run_main(capsys, run, "--rule", "t > 0")
    assert_one_line_error(code, err, str(path), "not a valid Event", "wire type")


def test_record_too_large_to_parse_is_refused(tmp_path: Path, capsys, monkeypatch):
    """A record other than an add_scalar value is parsed only up to MAX_PARSED_RECORD bytes
    (protobuf needs tens of times a record's size in memory for small repeated messages)."""
    from lightning_spectral import _eventfile

    run = tmp_path / "run"
    run.mkdir()
    path = run / "events.out.tfevents.1.host"
    values = b"".join(ld(1, b"") for _ in range(200))  # 200 empty Summary.Value messages
    record = b"\x09" + struct.pack("<d", 1.7e9) + ld(5, values)
    path.write_bytes(frame(record))
    code, _, err = run_main(capsys, run, "--rule", "t > 0", "--rule", "* > 0")
    assert code == 2 and "no scalar values" in err, err  # parsed: holds no scalar
    monkeypatch.setattr(_eventfile, "MAX_PARSED_RECORD", len(record) - 1)
    code, _, err = run_main(capsys, run, "--rule", "t > 0")
    assert_one_line_error(code, err, str(path), "byte 0", f"holds {len(record)} bytes")


def test_live_run_truncated_last_record_is_ignored_with_a_warning(tmp_path: Path, events,
                                                                  capsys):
    run = tmp_path / "run"
    path = events(run, {"a": [1.0, 2.0, 3.0]})
    full = path.read_bytes()
    # the last record (a = 3.0 at step 2) is still being written: cut at every byte of it
    record_len = len(frame(scalar_simple(b"a", 2, 3.0)))
    start = len(full) - record_len
    for cut in (start + 1, start + 7, start + 8, start + 12, start + 20, len(full) - 1):
        path.write_bytes(full[:cut])
        code, out, err = run_main(capsys, run, "--rule", "a last == 2", "--rule", "a max == 2")
        assert code == 0, (cut, err)
        warning, = err.splitlines()
        assert warning.startswith("lightning-spectral check: warning: ") and str(path) in warning
        assert f"byte {start}" in warning and "incomplete" in warning
    # a corrupted record in the middle is an error, not a truncation
    middle = bytearray(full)
    middle[start - 3] ^= 0x40
    path.write_bytes(bytes(middle))
    code, _, err = run_main(capsys, run, "--rule", "a > 0")
    assert_one_line_error(code, err, str(path), "checksum")
    # as is a broken length field in the middle
    broken = bytearray(full)
    broken[start - record_len] ^= 0x01
    path.write_bytes(bytes(broken))
    code, _, err = run_main(capsys, run, "--rule", "a > 0")
    assert_one_line_error(code, err, str(path), "corrupt")


def scalar_simple(tag: bytes, step: int, value: float) -> bytes:
    """The ``add_scalar`` record of the project's writer (wall time 1.7e9 + 1e-3 * index)."""
    # only the length matters to the caller; the layout is the writer's
    return (b"\x09" + struct.pack("<d", 1.7e9) + (b"\x10" + varint(step) if step else b"")
            + ld(5, ld(1, ld(1, tag) + b"\x15" + struct.pack("<f", value))))


@pytest.mark.parametrize("declared", [2**62, 2**64 - 1, 10**12])
def test_huge_declared_length_is_never_allocated(tmp_path: Path, events, capsys,
                                                 declared: int):
    run = tmp_path / "run"
    path = events(run, {"a": [1.0, 2.0]})
    good = path.read_bytes()
    head = struct.pack("<Q", declared)
    # a header with a valid checksum: a record still being written (ignored, with a warning)
    path.write_bytes(good + head + struct.pack("<I", masked_crc32c(head)) + b"\x00" * 40)
    tracemalloc.start()
    try:
        code, _, err = run_main(capsys, run, "--rule", "a last == 2")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0 and "incomplete" in err and err.count("\n") == 1, err
    assert peak < 64 * 2**20, peak
    # the same header with a wrong checksum: a corrupt file
    path.write_bytes(good + head + b"\x00\x00\x00\x00" + b"\x00" * 40)
    code, _, err = run_main(capsys, run, "--rule", "a last == 2")
    assert_one_line_error(code, err, str(path), f"byte {len(good)}", "corrupt")


# ----------------------------------------------------------------------------- reports


NASTY = "ok\n::error file=x.py,line=1::injected\x1b[31m\x00\x07\u2028##[error]v1 %0A,:"


@pytest.fixture
def nasty_run(tmp_path: Path, events) -> Path:
    run = tmp_path / "run"
    events(run, {NASTY: [1.0, 2.0], "::warning::x": [5.0], "plain": [1.0]})
    return run


def test_text_report_escapes_control_characters(nasty_run: Path, capsys):
    code, out, err = run_main(capsys, nasty_run, "--rule", "* > 1.5")
    assert code == 1, err
    assert not _CONTROL.search(out), out
    for line in out.splitlines():
        assert not line.lstrip().startswith("::"), line
        assert "##[" not in line, line
    assert r"ok\n::error file=x.py,line=1::injected\x1b[31m\x00\x07\u2028" in out
    assert len(out.splitlines()) == 2 + 3 + 2  # header, dashes, 3 checks, blank, summary


def test_github_report_escapes_control_characters_and_workflow_syntax(nasty_run: Path,
                                                                     capsys):
    code, out, err = run_main(capsys, nasty_run, "--rule", "* > 1.5", "--format", "github")
    assert code == 1, err
    lines = out.splitlines()
    assert len(lines) == 2  # one failure (plain = 1.0) ... and the summary
    code, out, err = run_main(capsys, nasty_run, "--rule", "* > 9", "--format", "github")
    lines = out.splitlines()
    assert code == 1 and len(lines) == 4, out
    assert all(line.startswith(("::error ", "::notice ")) for line in lines), out
    assert not _CONTROL.search(out)
    nasty_line = next(line for line in lines if "injected" in line)
    # the message (after the second '::') holds no raw newline, '%' or command
    props, _, message = nasty_line[len("::error "):].partition("::")
    assert "%25" in message and "\n" not in message and "::error" not in props
    assert r"ok\n::error file=x.py" in message and r"\x1b[31m" in message


def test_json_report_round_trips_the_tag(nasty_run: Path, capsys):
    import json

    code, out, _ = run_main(capsys, nasty_run, "--rule", "* > 1.5", "--format", "json")
    assert code == 1 and "##[" not in out
    tags = {c["tag"] for c in json.loads(out)["checks"]}
    assert NASTY in tags


def test_junit_report_is_well_formed_xml(nasty_run: Path, tmp_path: Path, capsys):
    junit = tmp_path / "gate.xml"
    code, _, err = run_main(capsys, nasty_run, "--rule", "* > 1.5", "--junit", junit)
    assert code == 1, err
    root = ET.parse(junit).getroot()  # expat refuses control characters: must parse
    names = [c.get("name") for c in root.iter("testcase")]
    assert len(names) == 3
    assert any(r"ok\n::error file=x.py,line=1::injected\x1b[31m\x00" in n for n in names)


def test_error_lines_escape_control_characters(tmp_path: Path, capsys, events):
    run = tmp_path / "run\nline\x1b"
    events(run, {"a": [1.0]})
    code, _, err = run_main(capsys, run, "--rule", "missing > 0")
    assert_one_line_error(code, err, r"run\nline\x1b")
    assert not _CONTROL.search(err)


def test_non_utf8_run_name_is_printed_escaped(tmp_path: Path, events):
    raw = os.fsencode(tmp_path) + b"/run\xff"
    run = Path(os.fsdecode(raw))
    events(run, {"a": [1.0]})
    done = subprocess.run([sys.executable, "-m", "lightning_spectral", "check", raw,
                           "--rule", "a > 0", "--junit", os.fsencode(tmp_path) + b"/j.xml"],
                          capture_output=True, timeout=60,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert done.returncode == 0, done.stderr
    ET.parse(tmp_path / "j.xml")


# ----------------------------------------------------------------------------- rule lines


def test_rule_line_numbers_are_exact(tmp_path: Path, demo_run: Path, capsys):
    rules = tmp_path / "gates.toml"
    text = (
        '# the first rule used to read\n'                      # 1
        '#   check = "vne/* > 100"\n'                          # 2
        '[[rule]]\n'                                           # 3
        'name = """\n'                                         # 4
        '[[rule]]\n'                                           # 5
        'check = "vne/* > 100"\n'                              # 6
        '"""\n'                                                # 7
        'check = "vne/* > 100"\n'                              # 8
        '\n'                                                   # 9
        "[[ rule ]]  # again, quoted key and a comment\n"      # 10
        "'check' = 'vne/* > 100'  # check = \"vne/* > 100\"\n"  # 11
        '\n'                                                   # 12
        '[[rule]]\n'                                           # 13
        'optional = true\n'                                    # 14
        'name = "check = \\"vne/* > 100\\""\n'                 # 15
        '  check   =   "vne/* > 100"\n'                        # 16
        '[["rule"]]\n'                                         # 17
        'check = "collapse/nc1 < 100"\n'                       # 18
    )
    rules.write_text(text, encoding="utf-8")
    parsed = load_rules(rules)
    assert [r.source for r in parsed] == [f"{rules}:{n}" for n in (8, 11, 16, 18)]
    code, out, _ = run_main(capsys, demo_run, "--rules", rules, "--format", "github")
    assert code == 1
    lines = [line for line in out.splitlines() if "file=" in line]
    assert len(lines) == 3 * 2  # two vne tags per vne rule
    got = [re.search(r"line=(\d+)", line).group(1) for line in lines]
    assert got == ["8", "8", "11", "11", "16", "16"]


def test_rule_line_numbers_of_inline_tables_and_crlf(tmp_path: Path):
    rules = tmp_path / "gates.toml"
    rules.write_bytes(
        b'rule = [\r\n'
        b'  { check = "a > 1" },\r\n'
        b'  { name = "n", check = "a > 1" }, { check = "b < 2" },\r\n'
        b']\r\n')
    assert [r.source for r in load_rules(rules)] == [f"{rules}:{n}" for n in (2, 3, 3)]


# ----------------------------------------------------------------------------- scale


def test_rule_matching_is_linear_in_rules_and_tags(monkeypatch):
    n = 3000
    data = {f"m/{i:05d}": [float(i)] for i in range(n)}
    rules = [f"m/{i:05d} >= 0" for i in range(n)]  # literal patterns
    rules += [f"m/{i:05d}* >= 0" for i in range(0, n, 3)]  # globs with a literal prefix
    rules += ["*/0000[0-9] >= 0", "m/?0001 >= 0"]  # globs that must look at every tag
    calls = 0
    real = fnmatch.fnmatchcase

    def counting(name, pattern):
        nonlocal calls
        calls += 1
        if calls > 10 * n:
            raise AssertionError("rule matching is not linear in the number of rules")
        return real(name, pattern)

    monkeypatch.setattr(fnmatch, "fnmatchcase", counting)
    report = gate.check(data, rules)
    assert report.passed and len(report.results) == n + n // 3 + 10 + 1
    assert calls <= n // 3 * 2 + 2 * n + 10, calls


def test_many_rules_load_and_evaluate_in_linear_time(tmp_path: Path, capsys):
    """10x the rules costs about 10x the time (quadratic scaling would cost 100x)."""
    run = {f"m/{i}": [float(i)] for i in range(20)}

    def rules_file(n: int) -> Path:
        path = tmp_path / f"rules{n}.toml"
        path.write_text("".join(f'# rule {i}\n[[rule]]\ncheck = "m/{i % 20} >= -{i}"\n'
                                f'name = "rule {i}"\n\n' for i in range(n)), encoding="utf-8")
        return path

    def best(path: Path) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            rules = load_rules(path)
            gate.check(run, rules).to_text()
            times.append(time.perf_counter() - t0)
        return min(times)

    small, large = rules_file(400), rules_file(4000)  # every rule text is distinct
    best(small)  # warm-up
    ratio = best(large) / best(small)
    assert ratio < 20, ratio
    assert load_rules(large)[-1].source == f"{large}:{5 * 3999 + 3}"


# ----------------------------------------------------------------------------- last resort


def test_unexpected_exception_is_one_line_not_a_traceback(demo_run: Path, capsys,
                                                          monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom\nsecond line\x1b[0m")

    monkeypatch.setattr(gate, "check", boom)
    code = main(["check", str(demo_run), "--rule", "vne/* > 0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == ("lightning-spectral check: internal error: RuntimeError: "
                   "kaboom\\nsecond line\\x1b[0m\n")


def test_keyboard_interrupt_exits_130(demo_run: Path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gate, "read_run", interrupted)
    code = main(["check", str(demo_run), "--rule", "vne/* > 0"])
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err


def test_stat_of_files_is_unchanged_by_a_check(demo_run: Path, capsys):
    before = {p: p.stat().st_mtime_ns for p in demo_run.iterdir()}
    mode = stat.S_IMODE(demo_run.stat().st_mode)
    code, _, _ = run_main(capsys, demo_run, "--rule", "vne/* > 0")
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in demo_run.iterdir()} == before
    assert stat.S_IMODE(demo_run.stat().st_mode) == mode
