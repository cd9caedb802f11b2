"""The gate: rules, readers, reports and the ``lightning-spectral check`` command."""

from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spectral import gate
from lightning_spectral._crc32c import crc32c, masked_crc32c
from lightning_spectral._eventfile import EventFileError, read_scalars
from lightning_spectral.cli import main
from lightning_spectral.gate import (
    GateInputError,
    NoMatchingTagError,
    RuleSyntaxError,
    RunReadError,
    check,
    load_rules,
    parse_rule,
    read_run,
)

# ----------------------------------------------------------------------------- rule grammar


@pytest.mark.parametrize(
    "text, pattern, reducer, window, op, threshold",
    [
        ("vne/encoder.* >= 2.0", "vne/encoder.*", "last", None, ">=", 2.0),
        ("collapse/nc1 last < 0.5", "collapse/nc1", "last", None, "<", 0.5),
        ("erank/* min > 4", "erank/*", "min", None, ">", 4.0),
        ("weight_stable_rank/fc2 mean(last=5) <= 30", "weight_stable_rank/fc2", "mean", 5,
         "<=", 30.0),
        ("a first == -1e-3", "a", "first", None, "==", -1e-3),
        ("a max != inf", "a", "max", None, "!=", math.inf),
        ("a mean ( last = 12 ) > .5", "a", "mean", 12, ">", 0.5),
        ("  x/y<=-inf  ", "x/y", "last", None, "<=", -math.inf),
        ("lastly/tag mean>1E2", "lastly/tag", "mean", None, ">", 100.0),
    ],
)
def test_parse_rule(text, pattern, reducer, window, op, threshold):
    rule = parse_rule(text)
    assert (rule.pattern, rule.reducer, rule.window, rule.op, rule.threshold) == (
        pattern, reducer, window, op, threshold)


@pytest.mark.parametrize(
    "text, column, expected",
    [
        ("vne/encoder.* => 2.0", 15, "operator"),
        ("vne/* >= two", 10, "number"),
        ("vne/* >= 2.0 extra", 14, "end of the rule"),
        ("vne/* median > 1", 7, "reducer"),
        ("vne/* mean(last=0) > 1", 17, "positive integer"),
        ("vne/* mean(last=3 > 1", 19, "')'"),
        ("vne/* max(last=3) > 1", 10, "only 'mean'"),
        (">= 2", 1, "tag pattern"),
        ("vne/*", 6, "operator"),
        ("vne/* >= nan", 10, "number"),
        ("vne/* >= 2.0.1", 10, "number"),
    ],
)
def test_malformed_rule_points_at_position(text, column, expected):
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(text)
    err = info.value
    assert err.column == column, str(err)
    assert expected in str(err)
    assert repr(text) in str(err) and "\n" not in str(err)
    caret = err.pointer().splitlines()
    assert caret[1].index("^") - 2 == column - 1


SERIES = np.array([3.0, -1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])


@pytest.mark.parametrize(
    "reducer, expected",
    [
        ("last", 6.0), ("first", 3.0), ("min", -1.0), ("max", 9.0),
        ("mean", 29.0 / 8), ("mean(last=3)", (9.0 + 2.0 + 6.0) / 3),
        ("mean(last=100)", 29.0 / 8),
    ],
)
def test_reducers_known_values_and_numpy(reducer, expected):
    rule = parse_rule(f"t {reducer} > 0")
    got = rule.reduce(SERIES)
    assert got == pytest.approx(expected, rel=1e-15)
    independent = {
        "last": SERIES[-1], "first": SERIES[0], "min": SERIES.min(), "max": SERIES.max(),
        "mean": SERIES.mean(), "mean(last=3)": SERIES[-3:].mean(),
        "mean(last=100)": SERIES.mean(),
    }[reducer]
    assert got == pytest.approx(float(independent), rel=1e-15)


@pytest.mark.parametrize(
    "op, below, equal, above",
    [("<", True, False, False), ("<=", True, True, False), (">", False, False, True),
     (">=", False, True, True), ("==", False, True, False), ("!=", True, False, True)],
)
def test_every_operator_at_the_boundary(op, below, equal, above):
    rule = parse_rule(f"t {op} 2.5")
    assert rule.compare(2.0) is below
    assert rule.compare(2.5) is equal
    assert rule.compare(3.0) is above
    assert rule.compare(math.nan) is False  # a NaN metric fails every operator


def test_nan_propagates_through_reducers():
    values = np.array([1.0, math.nan, 3.0])
    report = check({"t": values}, ["t min > 0", "t max > 0", "t mean > 0", "t last > 0"])
    assert [r.status for r in report.results] == ["fail", "fail", "fail", "pass"]


def test_glob_expands_to_one_check_per_tag():
    run = {"vne/enc.fc1": [1.0], "vne/enc.fc2": [3.0], "vne/dec.fc1": [5.0],
           "erank/enc.fc1": [7.0]}
    report = check(run, ["vne/enc.* >= 2", "*/enc.fc1 > 0", "vne/???.fc[12] < 10"])
    got = [(r.rule.pattern, r.tag, r.status) for r in report.results]
    assert got == [
        ("vne/enc.*", "vne/enc.fc1", "fail"), ("vne/enc.*", "vne/enc.fc2", "pass"),
        ("*/enc.fc1", "erank/enc.fc1", "pass"), ("*/enc.fc1", "vne/enc.fc1", "pass"),
        ("vne/???.fc[12]", "vne/dec.fc1", "pass"), ("vne/???.fc[12]", "vne/enc.fc1", "pass"),
        ("vne/???.fc[12]", "vne/enc.fc2", "pass"),
    ]
    assert not report.passed and len(report.failures) == 1


def test_no_match_lists_nearest_tags_and_optional_skips():
    run = {"vne/encoder.fc1": [1.0], "vne/encoder.fc2": [1.0], "collapse/nc1": [0.1]}
    with pytest.raises(NoMatchingTagError) as info:
        check(run, ["vne/encoder.fc3 > 0"])
    msg = str(info.value)
    assert "vne/encoder.fc3" in msg and "vne/encoder.fc1" in msg and "vne/encoder.fc2" in msg
    report = check(run, [gate.Rule("x", "vne/nothing*", optional=True),
                         parse_rule("collapse/nc1 < 1")])
    assert [r.status for r in report.results] == ["skip", "pass"] and report.passed


# ----------------------------------------------------------------------------- TOML


def test_rules_file(tmp_path: Path, demo_run: Path):
    rules = tmp_path / "gates.toml"
    rules.write_text(
        '# spectral gates\n'
        '[[rule]]\ncheck = "vne/encoder.* min >= 1.5"\nname = "no collapse"\n\n'
        '[[rule]]\ncheck = "collapse/nc1 < 0.5"\n\n'
        '[[rule]]\ncheck = "hessian/* < 100"\noptional = true\n',
        encoding="utf-8",
    )
    parsed = load_rules(rules)
    assert [r.name for r in parsed] == ["no collapse", None, None]
    assert [r.optional for r in parsed] == [False, False, True]
    assert [r.source for r in parsed] == [f"{rules}:3", f"{rules}:7", f"{rules}:10"]
    report = check(demo_run, parsed)
    assert [r.status for r in report.results] == ["pass", "pass", "pass", "skip"]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('[[rule]]\ncheck = "vne/* >> 1"\n', "column 8"),
        ('[[rule]]\ncheck = "vne/* > 1"\nseverity = "high"\n', "severity"),
        ('[[rule]]\nname = "x"\n', "check ="),
        ('[[rule]]\ncheck = "vne/* > 1"\noptional = "yes"\n', "optional"),
        ('[[rule]\ncheck = "vne/* > 1"\n', "invalid TOML"),
        ('title = "x"\n', "title"),
    ],
)
def test_bad_rules_file_names_the_file(tmp_path: Path, content: str, needle: str):
    path = tmp_path / "bad.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(GateInputError) as info:
        load_rules(path)
    assert str(path) in str(info.value) and needle in str(info.value)


# ----------------------------------------------------------------------------- readers


def test_crc32c_known_value_and_tensorboard_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as ref

    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 4, 8, 100, 256, 257, 3000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == ref(data)


def test_reader_matches_tensorboard_loader_on_summary_writer_files(tmp_path: Path):
    """Files from torch's SummaryWriter (simple_value and tensor-encoded scalars, plus a
    histogram and a layout) read exactly as TensorBoard's own record loader reads them."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in range(0, 50, 7):
        writer.add_scalar("vne/a", 0.5 * step, step)
        writer.add_scalar("vne/b", -1.0 / (step + 1), step, new_style=True)
        writer.add_histogram("eigvals/a", np.arange(5.0) + step, step)
    writer.add_custom_scalars({"spectral": {"vne": ["Multiline", ["^vne/"]]}})
    noise = np.random.default_rng(0).random((3, 32, 32))
    writer.add_image("spectra/all", noise, 0)  # a long record (several CRC blocks)
    writer.add_scalar("vne/a", 123.0, 0)  # a rewritten step
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents*")
    assert path.stat().st_size > 3000
    rec = read_scalars(path)
    ours = [(rec.tags[i], int(s), float(v))
            for i, s, v in zip(rec.tag_ids, rec.steps, rec.values, strict=True)]
    theirs = []
    for event in EventFileLoader(str(path)).Load():  # migrates scalars to tensors
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "scalars":
                number = float(np.frombuffer(value.tensor.tensor_content, "<f4")[0]) \
                    if value.tensor.tensor_content else float(value.tensor.float_val[0])
                theirs.append((value.tag, event.step, number))
    assert ours == theirs and len(ours) == 2 * 8 + 1
    run = read_run(tmp_path)
    assert run.tags == ["vne/a", "vne/b"]
    np.testing.assert_array_equal(run.scalars["vne/a"].steps, np.arange(0, 50, 7))
    assert run.scalars["vne/a"].values[0] == 123.0  # the latest write of step 0


@pytest.mark.parametrize("layout", ["periodic", "random", "phases"])
def test_speculative_framing_walk_equals_the_plain_walk(tmp_path: Path, layout: str):
    """The vectorised walk (period detection + verified speculation) finds exactly the record
    offsets of the one-record-at-a-time walk, also when truncated anywhere."""
    from lightning_spectral import _eventfile as ef

    rng = np.random.default_rng(3)
    if layout == "periodic":  # 7 tags per step, step varint grows at 128
        records = [(f"t/{'x' * j}", step, 1.0) for step in range(1200) for j in range(7)]
    elif layout == "random":
        records = [(f"t/{'x' * int(k)}", int(st), 0.5) for k, st in
                   zip(rng.integers(0, 40, 6000), rng.integers(0, 10**6, 6000), strict=True)]
    else:  # periodic stretches with different periods
        records = [(f"a{j}", s, 1.0) for s in range(800) for j in range(3)]
        records += [(f"b{'y' * j}", s, 1.0) for s in range(800, 2000) for j in range(11)]
    from lightning_spectral.testing import write_scalars

    path = write_scalars(tmp_path / "events.out.tfevents.1", records)
    buf = path.read_bytes()
    for cut in (len(buf), len(buf) - 1, len(buf) - 30, len(buf) // 2 + 3):
        data = buf[:cut]
        arr = np.frombuffer(data, dtype=np.uint8)
        heads, lengths, end = ef._walk(data, arr)
        plain, plain_lengths, plain_end = ef._walk_simple(data, 0, 10**9)
        assert end == plain_end and heads.tolist() == plain
        assert lengths.tolist() == plain_lengths
        assert (end == len(data)) is (cut == len(buf))
    rec = ef.read_scalars(path)
    assert len(rec.values) == len(records)
    assert [rec.tags[i] for i in rec.tag_ids] == [t for t, _, _ in records]
    assert rec.steps.tolist() == [st for _, st, _ in records]


def test_tensor_encoded_scalars(tmp_path: Path, events):
    events(tmp_path, {"t": [1.0, 2.0, 4.0]}, tensor_encoded=True)
    report = check(tmp_path, ["t mean == 2.3333333333333335", "t max == 4"])
    assert report.passed, report.to_text()


def test_every_value_counts_beyond_tensorboard_sampling(tmp_path: Path, events):
    n = 2000
    values = np.arange(n, dtype=np.float64)  # exact in float32
    events(tmp_path, {"erank/x": values})
    run = read_run(tmp_path)
    assert len(run.scalars["erank/x"]) == n
    report = check(run, [f"erank/x mean == {(n - 1) / 2}", "erank/x min == 0",
                         f"erank/x max == {n - 1}", "erank/x mean(last=10) == 1994.5"])
    assert report.passed, report.to_text()
    # TensorBoard's plugin accumulator keeps a reservoir sample by default: a gate on it would
    # silently miss values
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert len(acc.Tensors("erank/x")) < n


def test_merged_files_latest_write_wins(tmp_path: Path, events):
    """A resumed run: a second file rewrites steps 5..9 and continues to 14. It is ordered by
    wall time, not by name (its name sorts first)."""
    events(tmp_path, {"m": [float(i) for i in range(10)]},
                 name="events.out.tfevents.200.host.1.0", wall_time=1000.0)
    events(tmp_path, {"m": [100.0 + i for i in range(10)]}, start_step=5,
                 name="events.out.tfevents.100.host.2.0", wall_time=2000.0)
    series = read_run(tmp_path).scalars["m"]
    np.testing.assert_array_equal(series.steps, np.arange(15))
    expected = np.r_[np.arange(5.0), 100.0 + np.arange(10)]
    np.testing.assert_array_equal(series.values, expected)
    report = check(tmp_path, [f"m mean == {expected.mean()}", "m first == 0", "m last == 109"])
    assert report.passed, report.to_text()


def test_resumed_run_matches_tensorboard_with_latest_writes(tmp_path: Path, events):
    """Run 1 logged steps 0..9 and died; run 2 resumed from step 5 and ended at step 7. The
    rewritten steps 5..7 keep run 2's values; steps 8 and 9 (never reached again) stay, as in
    TensorBoard. TensorBoard's own accumulator, keeping every value, is the independent
    reference: it shows both writes of a rewritten step, of which the gate keeps the last."""
    events(tmp_path, {"m": [float(i) for i in range(10)], "k": [1.0] * 10},
           name="events.out.tfevents.1.host.1.0", wall_time=1000.0)
    events(tmp_path, {"m": [50.0, 60.0, 70.0]}, start_step=5,
           name="events.out.tfevents.2.host.2.0", wall_time=2000.0)
    run = read_run(tmp_path)
    assert run.scalars["m"].steps.tolist() == list(range(10))
    assert run.scalars["m"].values.tolist() == [0, 1, 2, 3, 4, 50, 60, 70, 8, 9]
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    for tag in ("m", "k"):
        latest: dict[int, float] = {}
        for e in acc.Tensors(tag):  # write order
            latest[e.step] = float(e.tensor_proto.float_val[0])
        ours = list(zip(run.scalars[tag].steps.tolist(), run.scalars[tag].values.tolist(),
                        strict=True))
        assert ours == sorted(latest.items())
    assert len(acc.Tensors("m")) == 13  # TensorBoard keeps both writes of steps 5..7
    assert check(tmp_path, ["m last == 9", "m max == 70", "m mean == 20.7"]).passed


def test_lightning_layout_and_nested_dir(tmp_path: Path, events):
    events(tmp_path / "runs" / "mlp" / "version_0", {"a": [1.0, 2.0]})
    assert read_run(tmp_path / "runs" / "mlp").scalars["a"].values.tolist() == [1.0, 2.0]
    events(tmp_path / "runs" / "mlp" / "version_1", {"a": [3.0]})
    with pytest.raises(RunReadError, match="several runs"):
        read_run(tmp_path / "runs" / "mlp")


def test_csv_runs(tmp_path: Path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,step,train_loss,vne/fc1\n"
        "0,0,2.0,\n"
        "0,0,,1.0\n"
        "0,5,1.5,\n"
        "0,5,1.25,1.5\n"  # step 5 written again: the latest row wins
        "1,9,1.0,2.0\n",
        encoding="utf-8",
    )
    for path in (csv_path, tmp_path):
        run = read_run(path)
        assert run.scalars["train_loss"].values.tolist() == [2.0, 1.25, 1.0]
        assert run.scalars["train_loss"].steps.tolist() == [0, 5, 9]
        assert run.scalars["vne/fc1"].values.tolist() == [1.0, 1.5, 2.0]
    report = check(csv_path, ["train_loss mean == 1.4166666666666667", "vne/* min >= 1"])
    assert report.passed, report.to_text()
    csv_path.write_text("step,a\n0,1.0\n1,oops\n", encoding="utf-8")
    with pytest.raises(RunReadError, match=r"metrics.csv:3: column 'a' value 'oops'"):
        read_run(csv_path)


def test_corrupt_and_truncated_event_files_name_the_file(tmp_path: Path, demo_run: Path):
    (path,) = demo_run.glob("events*")
    data = bytearray(path.read_bytes())
    for name, blob in {
        "flipped": bytes(data[:200]) + bytes([data[200] ^ 0x10]) + bytes(data[201:]),
        "garbage": b"not an event file at all, definitely",
        "truncated": bytes(data[:-3]),
    }.items():
        run = tmp_path / name
        run.mkdir()
        bad = run / path.name
        bad.write_bytes(blob)
        with pytest.raises(EventFileError) as info:
            read_scalars(bad)  # strict by default
        assert str(bad) in str(info.value)
        if name != "truncated":
            with pytest.raises(RunReadError) as info:
                read_run(run)
            assert str(bad) in str(info.value)
            continue
        # a file still being written: its incomplete last record is left out, with a warning
        rec = read_scalars(bad, allow_truncated=True)
        at = rec.truncated_at  # the start of the last record of the complete file
        assert at + 16 + int.from_bytes(data[at : at + 8], "little") == len(data)
        assert rec.file_size == len(blob) and 0 < rec.truncated_at < len(blob)
        run_read = read_run(run)
        (warning,) = run_read.warnings
        assert str(bad) in warning and f"byte {rec.truncated_at}" in warning
        assert len(run_read.scalars["collapse/nc1"]) == 10
        assert sum(len(s) for s in run_read.scalars.values()) == 39  # one value of 40 lost


def test_empty_runs(tmp_path: Path, events):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunReadError, match="no TensorBoard event files or metrics.csv"):
        read_run(tmp_path / "empty")
    only_header = tmp_path / "header"
    events(only_header, {"x": [1.0]})
    (f,) = only_header.glob("events*")
    from torch.utils.tensorboard import SummaryWriter

    f.unlink()
    SummaryWriter(str(only_header)).close()  # a real file with only its version record
    with pytest.raises(RunReadError, match="no scalar values"):
        read_run(only_header)
    with pytest.raises(RunReadError, match="no such file"):
        read_run(tmp_path / "missing")


# ----------------------------------------------------------------------------- reports


def test_reports(demo_run: Path):
    report = check([demo_run, {"vne/encoder.fc1": [0.5], "collapse/nc1": [0.1]}],
                   ["vne/encoder.* >= 2", "collapse/nc1 < 0.5"])
    assert [r.status for r in report.results] == ["pass", "pass", "pass", "fail", "pass"]
    text = report.to_text()
    assert text.splitlines()[0].split() == ["run", "tag", "reducer", "value", "op",
                                            "threshold", "verdict"]
    assert "FAILED: 5 checks, 4 passed, 1 failed, 0 skipped" in text
    data = json.loads(report.to_json())
    assert data["passed"] is False and len(data["checks"]) == 5
    assert data["checks"][1]["tag"] == "vne/encoder.fc2"
    assert data["checks"][1]["value"] == pytest.approx(2.4, rel=1e-6)
    assert data["checks"][3]["value"] == 0.5 and data["checks"][3]["status"] == "fail"
    gh = report.to_github().splitlines()
    assert len(gh) == 2 and all(line.startswith("::error ") for line in gh)
    assert "vne/encoder.fc1: last = 0.5" in gh[0] and "title=spectral gate%3A" in gh[0]
    root = ET.fromstring(report.to_junit())
    cases = root.findall(".//testcase")
    assert len(cases) == 5 and root.get("failures") == "1"
    assert len(root.findall("testsuite")) == 2
    assert [c.find("failure") is not None for c in cases] == [False] * 3 + [True, False]


# ----------------------------------------------------------------------------- command line


def test_cli_in_process(demo_run: Path, tmp_path: Path, capsys):
    assert main(["check", str(demo_run), "--rule", "vne/* > 1"]) == 0
    out = capsys.readouterr().out
    assert "PASSED: 2 checks" in out
    junit = tmp_path / "out" / "gate.xml"
    code = main(["check", str(demo_run), "--rule", "collapse/nc1 < 0.05", "--junit", str(junit),
                 "--format", "json"])
    assert code == 1
    assert json.loads(capsys.readouterr().out)["passed"] is False
    assert ET.parse(junit).getroot().get("failures") == "1"
    code = main(["check", str(demo_run), "--rule", "vne/* ~ 1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "column 7" in err and "'vne/* ~ 1'" in err
    assert main(["check", str(demo_run), "--rule", "vne/encoder.fc9 > 1"]) == 2
    err = capsys.readouterr().err
    assert "nearest tags: " in err and "vne/encoder.fc1" in err and err.count("\n") == 1
    assert main(["check", str(demo_run)]) == 2
    assert "no rules" in capsys.readouterr().err
    for argv in (["check"], ["check", str(demo_run), "--rule", "a > 1", "--format", "xml"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and "usage" not in err


def test_cli_subprocess_exit_codes_and_fast_start(demo_run: Path, tmp_path: Path, cli):
    rules = tmp_path / "gates.toml"
    rules.write_text('[[rule]]\ncheck = "weight_stable_rank/fc2 mean(last=5) <= 30"\n',
                     encoding="utf-8")
    ok = cli(["check", str(demo_run), "--rules", str(rules), "--format", "github"])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith("::notice title=spectral gate::PASSED")
    fail = cli(["check", str(demo_run), "--rule", "vne/* min > 10", "--format", "github"])
    assert fail.returncode == 1 and fail.stdout.count("::error ") == 3
    corrupt = tmp_path / "corrupt"
    shutil.copytree(demo_run, corrupt)
    (bad,) = corrupt.glob("events*")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    broken = cli(["check", str(corrupt), "--rule", "vne/* > 1"])
    assert broken.returncode == 2 and str(bad) in broken.stderr
    assert "Traceback" not in broken.stderr and broken.stderr.count("\n") == 1
    bad.write_bytes(demo_run.joinpath(bad.name).read_bytes()[:-1])  # still being written
    live = cli(["check", str(corrupt), "--rule", "vne/* > 1"])
    assert live.returncode == 0 and "Traceback" not in live.stderr
    assert live.stderr.count("\n") == 1 and "warning" in live.stderr and str(bad) in live.stderr
    # the check path imports neither torch nor Lightning nor TensorFlow, and of TensorBoard
    # only its protobuf classes (for the records that are not add_scalar values)
    probe = cli(["check", str(demo_run), "--rule", "vne/* > 1"])
    assert probe.returncode == 0
    code = (
        "import sys\n"
        "from lightning_spectral.cli import main\n"
        f"rc = main(['check', {str(demo_run)!r}, '--rule', 'vne/* > 1'])\n"
        "light = ('tensorboard', 'tensorboard.compat', 'tensorboard.compat.proto', "
        "'tensorboard.lazy', 'tensorboard.version')\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', "
        "'pytorch_lightning', 'tensorflow') or m.split('.')[0] == 'tensorboard' and m not in "
        "light and not m.startswith('tensorboard.compat.proto.')]\n"
        "assert rc == 0 and not heavy, heavy\n"
        "assert 'tensorboard.compat.proto.event_pb2' in sys.modules\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_real_lightning_run_tensorboard_and_csv_agree(tmp_path: Path):
    """A real fit logging to TensorBoardLogger and CSVLogger: the gate reads the same values
    from the version directory and from metrics.csv (two independent formats)."""
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, val = digits_dataloaders(batch_size=128)
        trainer = Trainer(
            accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=3,
            limit_val_batches=1, log_every_n_steps=1, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
            logger=[TensorBoardLogger(str(tmp_path), name="tb", version=0),
                    CSVLogger(str(tmp_path), name="csv", version=0)],
        )
        trainer.fit(DigitsClassifier(hidden=(16, 16)), train, val)
    finally:
        torch.set_num_threads(threads)
    tb = read_run(tmp_path / "tb" / "version_0")
    csv = read_run(tmp_path / "csv" / "version_0")
    for tag in ("train_loss", "val_loss", "val_acc"):
        np.testing.assert_array_equal(tb.scalars[tag].steps, csv.scalars[tag].steps)
        np.testing.assert_allclose(tb.scalars[tag].values, csv.scalars[tag].values, rtol=1e-6)
    assert len(tb.scalars["train_loss"]) == 6 and len(tb.scalars["val_acc"]) == 2
    rules = ["train_loss mean < 10", "val_acc max >= 0", "val_loss last > 0"]
    a, b = check(tb, rules), check(csv, rules)
    assert a.passed and b.passed
    assert [r.value for r in a.results] == pytest.approx([r.value for r in b.results], rel=1e-6)


@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=30),
    reducer=st.sampled_from(["last", "first", "min", "max", "mean", "mean(last=4)"]),
    op=st.sampled_from(list(gate.OPS)),
    threshold=st.floats(-1e6, 1e6, allow_nan=False, width=32),
)
@settings(max_examples=60, deadline=None)
def test_verdicts_match_an_independent_numpy_evaluation(values, reducer, op, threshold):
    series = np.asarray(values, dtype=np.float64)
    report = check({"x": series}, [f"x {reducer} {op} {threshold!r}"])
    reduced = {"last": series[-1], "first": series[0], "min": series.min(),
               "max": series.max(), "mean": series.mean(),
               "mean(last=4)": series[-4:].mean()}[reducer]
    expected = {"<": reduced < threshold, "<=": reduced <= threshold,
                ">": reduced > threshold, ">=": reduced >= threshold,
                "==": reduced == threshold, "!=": reduced != threshold}[op]
    (result,) = report.results
    assert result.value == float(reduced)  # the same float64 arithmetic
    assert result.passed is bool(expected)
