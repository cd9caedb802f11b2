"""Gating against a baseline run (``--baseline``), the trend reducers and the Markdown report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spectral.cli import main
from lightning_spectral.gate import (
    MissingBaselineError,
    NoMatchingTagError,
    Rule,
    RuleSyntaxError,
    Run,
    RunReadError,
    check,
    evaluate,
    load_rules,
    parse_rule,
    read_run,
)
from lightning_spectral.reduce import StreamingSeries, reduce_values

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    "text, op, factor, offset",
    [
        ("erank/* last >= 0.8 * baseline", ">=", 0.8, 0.0),
        ("collapse/nc1 last <= 1.2 * baseline", "<=", 1.2, 0.0),
        ("vne/classifier mean(last=5) >= baseline - 0.1", ">=", 1.0, -0.1),
        ("a == baseline", "==", 1.0, 0.0),
        ("a>=0.5*baseline+2", ">=", 0.5, 2.0),
        ("a < -1e-3 * baseline + 1e2", "<", -1e-3, 100.0),
        ("a != baseline-0", "!=", 1.0, 0.0),
        ("  a max\t>\t2 *\tbaseline  ", ">", 2.0, 0.0),
    ],
)
def test_parse_baseline_thresholds(text, op, factor, offset):
    rule = parse_rule(text)
    assert rule.relative and (rule.op, rule.factor, rule.offset) == (op, factor, offset)
    assert math.isnan(rule.threshold)
    assert rule.threshold_for(10.0) == pytest.approx(factor * 10.0 + offset, rel=1e-15)
    assert math.isnan(rule.threshold_for(None)) and math.isnan(rule.threshold_for(math.nan))
    assert not parse_rule("a >= 0.8").relative


def test_threshold_labels_and_reducer_labels():
    assert parse_rule("a >= 0.8 * baseline").threshold_label == "0.8 * baseline"
    assert parse_rule("a >= baseline - 0.1").threshold_label == "baseline - 0.1"
    assert parse_rule("a >= 2 * baseline + 3").threshold_label == "2 * baseline + 3"
    assert parse_rule("a >= 2.5").threshold_label == "2.5"
    assert parse_rule("a slope(last=7) < 0").reducer_label == "slope(last=7)"
    assert parse_rule("a drop_from_max_rel <= 0.3").reducer_label == "drop_from_max_rel"
    assert parse_rule("a drop_from_max < 1").reducer == "drop_from_max"
    assert parse_rule("a mean(last=3) > 0").reducer_label == "mean(last=3)"


@pytest.mark.parametrize(
    "text, column, expected",
    [
        ("a >= 0.8 *", 11, "'baseline' after '*'"),
        ("a >= 0.8 * base", 12, "'baseline' after '*'"),
        ("a >= 0.8 * baselines", 12, "'baseline' after '*'"),
        ("a >= baseline +", 16, "number"),
        ("a >= baseline * 0.8", 15, "'+ NUMBER'"),
        ("a >= baseline 0.1", 15, "'+ NUMBER'"),
        ("a >= baseline - 0.1 x", 21, "end of the rule"),
        ("a >= inf * baseline", 6, "finite"),
        ("a >= baseline + inf", 17, "finite"),
        ("a >= baseline - -1", 17, "without a sign"),
        ("a >= basline", 6, "number or 'baseline'"),
        ("a >= 0.8 baseline", 10, "end of the rule"),
        ("a slope > 0", 8, "slope(last=K)"),
        ("a slope(last=1) > 0", 14, "K >= 2"),
        ("a slope(last=) > 0", 14, "K >= 2"),
        ("a max(last=3) > 0", 6, "only 'mean' and 'slope'"),
        ("a drop_from_max(last=2) > 0", 16, "only 'mean' and 'slope'"),
        ("a drop_from_max_rel( > 0", 20, "takes no window"),
        ("a drop > 0", 3, "reducer"),
    ],
)
def test_malformed_baseline_and_trend_rules(text, column, expected):
    with pytest.raises(RuleSyntaxError) as info:
        parse_rule(text)
    assert info.value.column == column, str(info.value)
    assert expected in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- trend reducers


def _series(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    steps = np.sort(rng.choice(np.arange(10**6), size=n, replace=False)).astype(np.int64)
    values = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4) + rng.normal() * 5
    return steps, values


@pytest.mark.parametrize("seed", range(20))
def test_slope_and_drops_match_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    steps, values = _series(rng, n)
    for k in (2, 3, 10, n, n + 5):
        want = np.polyfit(steps[-k:].astype(np.float64), values[-k:], 1)[0]
        got = reduce_values(values, "slope", k, steps)
        assert got == pytest.approx(want, rel=1e-8, abs=1e-12 * np.abs(values).max())
        # the same through a rule, and in the gate (a run given as {tag: (steps, values)})
        rule = parse_rule(f"x slope(last={k}) < 0")
        assert rule.reduce(values, steps) == got
        (result,) = check({"x": (steps, values)}, [rule]).results
        assert result.value == got
    top = float(np.max(values))
    assert reduce_values(values, "drop_from_max") == top - values[-1]
    assert reduce_values(values, "drop_from_max_rel") == pytest.approx(
        (top - values[-1]) / abs(top), rel=1e-15)
    # without steps the positions 0..n-1 are the steps
    positions = np.arange(n, dtype=np.float64)
    assert reduce_values(values, "slope", 5) == pytest.approx(
        np.polyfit(positions[-5:], values[-5:], 1)[0], rel=1e-8, abs=1e-12)


def test_trend_reducers_known_values_and_edges():
    steps = np.array([0, 10, 20, 30])
    assert reduce_values([1.0, 2.0, 3.0, 4.0], "slope", 4, steps) == pytest.approx(0.1)
    assert reduce_values([5.0, 3.0, 1.0], "slope", 2) == pytest.approx(-2.0)
    assert math.isnan(reduce_values([5.0], "slope", 3))  # one point: no slope
    assert math.isnan(reduce_values([1.0, math.nan, 3.0], "slope", 3))
    assert reduce_values([1.0, math.nan, 3.0, 4.0], "slope", 2) == pytest.approx(1.0)
    assert reduce_values([1.0, 4.0, 2.0], "drop_from_max") == 2.0
    assert reduce_values([1.0, 4.0, 2.0], "drop_from_max_rel") == 0.5
    assert reduce_values([-4.0, -1.0, -2.0], "drop_from_max_rel") == 1.0  # |max| = 1
    assert reduce_values([1.0, 4.0, 4.0], "drop_from_max_rel") == 0.0
    assert reduce_values([-1.0, 0.0, -1.0], "drop_from_max_rel") == math.inf
    assert reduce_values([0.0, 0.0], "drop_from_max_rel") == 0.0
    assert math.isnan(reduce_values([1.0, math.nan, 0.5], "drop_from_max"))
    assert math.isnan(reduce_values([1.0, math.nan, 0.5], "drop_from_max_rel"))
    assert math.isnan(reduce_values([], "slope", 3))
    assert math.isnan(reduce_values([], "drop_from_max"))
    # a collapse caught without a baseline
    report = check({"vne/a": [1.0, 2.0, 2.1, 1.2], "vne/b": [1.0, 1.5, 1.4]},
                   ["vne/* drop_from_max_rel <= 0.3"])
    assert [r.status for r in report.results] == ["fail", "pass"]


@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
       gaps=st.lists(st.integers(1, 1000), min_size=40, max_size=40),
       k=st.integers(2, 12))
@settings(max_examples=80, deadline=None)
def test_streaming_trend_reducers_equal_the_whole_series(values, gaps, k):
    """StreamingSeries (O(k) memory) gives exactly the numbers of reduce_values."""
    steps = np.cumsum(gaps[: len(values)]).astype(np.int64)
    series = StreamingSeries(window=k)
    for i, (s, v) in enumerate(zip(steps.tolist(), values, strict=True)):
        series.add(v, s)
        seen = np.asarray(values[: i + 1])
        for reducer, window in (("slope", k), ("drop_from_max", None),
                                ("drop_from_max_rel", None)):
            want = reduce_values(seen, reducer, window, steps[: i + 1])
            got = series.reduce(reducer, window)
            assert (math.isnan(got) and math.isnan(want)) or got == want, (reducer, i)
    assert len(series.xs) == min(k, len(values))  # bounded memory


# ----------------------------------------------------------------------------- baseline runs


def _runs(tmp_path: Path, events, scale: float = 1.0, shift: float = 0.0,
          extra: bool = False) -> tuple[Path, Path]:
    """A baseline run and a run whose every value is ``scale * v + shift``."""
    series = {
        "erank/fc1": [4.0, 3.5, 3.0, 3.2, 3.0],
        "erank/fc2": [8.0, 7.0, 6.0, 6.5, 6.25],
        "vne/classifier": [0.5, 1.0, 1.25, 1.5, 1.75],
        "collapse/nc1": [4.0, 2.0, 1.0, 0.75, 0.5],
    }
    base = tmp_path / "base"
    events(base, series)
    changed = {t: [scale * v + shift for v in vs] for t, vs in series.items()}
    if extra:
        changed["erank/fc3"] = [1.0, 1.0, 1.0, 1.0, 1.0]
    run = tmp_path / "run"
    events(run, changed)
    return base, run


RULES = ["erank/* last >= 0.8 * baseline", "collapse/nc1 last <= 1.2 * baseline",
         "vne/classifier mean(last=5) >= baseline - 0.1"]


def test_identical_runs_pass_every_baseline_rule(tmp_path: Path, events):
    base, _ = _runs(tmp_path, events)
    report = check(base, [*RULES, "erank/* last == baseline", "vne/* min == 1 * baseline",
                          "erank/fc1 slope(last=3) == baseline", "* drop_from_max >= baseline"],
                   baseline=base)
    assert report.passed, report.to_text()
    assert report.baseline == str(base)
    for r in report.results:
        assert r.baseline == r.value and r.note is None


@pytest.mark.parametrize("scale, passes", [(0.81, True), (0.79, False)])
def test_scaled_run_fails_by_the_stated_margin(tmp_path: Path, events, scale, passes):
    base, run = _runs(tmp_path, events, scale=scale)
    report = check(run, ["erank/* last >= 0.8 * baseline"], baseline=base)
    assert [r.tag for r in report.results] == ["erank/fc1", "erank/fc2"]
    for r in report.results:
        assert r.threshold == pytest.approx(0.8 * r.baseline, rel=1e-15)
        assert r.value == pytest.approx(scale * r.baseline, rel=1e-6)
        assert r.passed is passes
    assert report.passed is passes


@pytest.mark.parametrize("scale, passes", [(1.19, True), (1.21, False)])
def test_upper_bound_relative_to_the_baseline(tmp_path: Path, events, scale, passes):
    base, run = _runs(tmp_path, events, scale=scale)
    (r,) = check(run, ["collapse/nc1 last <= 1.2 * baseline"], baseline=base).results
    assert r.baseline == 0.5 and r.threshold == pytest.approx(0.6)
    assert r.passed is passes


@pytest.mark.parametrize("shift, passes", [(-0.09, True), (-0.11, False)])
def test_offset_from_the_baseline(tmp_path: Path, events, shift, passes):
    base, run = _runs(tmp_path, events, shift=shift)
    (r,) = check(run, ["vne/classifier mean(last=5) >= baseline - 0.1"], baseline=base).results
    assert r.baseline == pytest.approx(1.2) and r.threshold == pytest.approx(1.1)
    assert r.passed is passes


def test_tags_missing_from_the_baseline_are_reported(tmp_path: Path, events):
    base, run = _runs(tmp_path, events, extra=True)
    report = check(run, ["erank/* last >= 0.8 * baseline"], baseline=base)
    got = [(r.tag, r.status, r.note) for r in report.results]
    assert got == [("erank/fc1", "pass", None), ("erank/fc2", "pass", None),
                   ("erank/fc3", "fail", "not in the baseline run")]
    missing = report.results[2]
    assert missing.baseline is None and math.isnan(missing.threshold)
    optional = Rule(**{**parse_rule("erank/* last >= 0.8 * baseline").__dict__,
                       "optional": True})
    report = check(run, [optional], baseline=base)
    assert [r.status for r in report.results] == ["pass", "pass", "skip"] and report.passed
    assert report.results[2].note == "not in the baseline run"
    # the reverse: a tag the baseline has and the run lost
    report = check(base, ["erank/* last >= 0.8 * baseline"], baseline=run)
    assert [(r.tag, r.status) for r in report.results][-1] == ("erank/fc3", "fail")
    assert "not in this run" in report.results[-1].note
    # a rule matching nothing anywhere is still bad input
    with pytest.raises(NoMatchingTagError, match="nor in the baseline"):
        check(run, ["weight/* last >= baseline"], baseline=base)
    # an absolute rule shows the baseline's value, but never fails for a missing one
    report = check(run, ["erank/* last >= 0"], baseline=base)
    assert [r.baseline for r in report.results] == [3.0, 6.25, None] and report.passed


def test_nan_baseline_fails(tmp_path: Path):
    report = check({"a": [1.0, 2.0]}, ["a max >= 0.5 * baseline"],
                   baseline={"a": [math.nan, 1.0]})
    (r,) = report.results
    assert r.status == "fail" and "NaN" in r.note


def test_baseline_rule_without_baseline():
    with pytest.raises(MissingBaselineError, match=r"'a >= 0.8 \* baseline'"):
        check({"a": [1.0]}, ["a > 0", "a >= 0.8 * baseline"])
    run = Run.from_mapping({"a": [1.0]})
    with pytest.raises(MissingBaselineError):
        evaluate(run, [parse_rule("a >= baseline")])


def test_several_runs_each_against_the_one_baseline(tmp_path: Path, events):
    base, run = _runs(tmp_path, events, scale=0.5)
    report = check([base, run], ["erank/fc1 last >= 0.8 * baseline"], baseline=base)
    assert [(r.run, r.status) for r in report.results] == [(str(base), "pass"),
                                                           (str(run), "fail")]


def test_toml_baseline_rules(tmp_path: Path, events):
    base, run = _runs(tmp_path, events, scale=0.5)
    rules = tmp_path / "regression.toml"
    rules.write_text('[[rule]]\nname = "ranks hold"\ncheck = "erank/* last >= 0.8 * baseline"\n'
                     '\n[[rule]]\ncheck = "vne/* drop_from_max_rel <= 0.3"\n', encoding="utf-8")
    parsed = load_rules(rules)
    assert parsed[0].factor == 0.8 and parsed[0].source == f"{rules}:3"
    report = check(run, parsed, baseline=base)
    assert [r.status for r in report.results] == ["fail", "fail", "pass"]
    gh = report.to_github().splitlines()
    assert f"file={rules}" in gh[0] and "line=3" in gh[0]
    assert "expected >= 2.4 (0.8 * baseline, baseline 3)" in gh[0]


# ----------------------------------------------------------------------------- the command


def _one_line_error(capsys, *argv: str) -> str:
    code = main(["check", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lightning-spectral check: error: ")
    return err


def test_cli_baseline_pass_fail_and_reports(tmp_path: Path, events, capsys):
    base, run = _runs(tmp_path, events, scale=0.5, extra=True)
    assert main(["check", str(base), "--baseline", str(base), *sum(
        (["--rule", r] for r in RULES), [])]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["tag", "reducer", "baseline", "value", "op",
                                           "threshold", "verdict"]
    assert f"baseline: {base}" in out and "PASSED: 4 checks" in out
    assert main(["check", str(run), "--baseline", str(base), "--format", "json",
                 "--rule", "erank/* last >= 0.8 * baseline"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["baseline"] == str(base) and data["passed"] is False
    fc3 = data["checks"][2]
    assert (fc3["tag"], fc3["status"], fc3["baseline"], fc3["threshold"], fc3["note"]) == (
        "erank/fc3", "fail", None, None, "not in the baseline run")
    assert data["checks"][0]["threshold"] == pytest.approx(2.4)


def test_cli_baseline_rule_without_baseline_names_the_rule(tmp_path: Path, events, capsys):
    base, _ = _runs(tmp_path, events)
    err = _one_line_error(capsys, str(base), "--rule", "vne/* > 0", "--rule",
                          "erank/* last >= 0.8 * baseline")
    assert "'erank/* last >= 0.8 * baseline' (--rule)" in err and "--baseline" in err
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\ncheck = "vne/* > 0"\n[[rule]]\ncheck = "a >= baseline"\n',
                     encoding="utf-8")
    err = _one_line_error(capsys, str(base), "--rules", str(rules))
    assert f"({rules}:4)" in err


def test_cli_bad_baseline_paths(tmp_path: Path, events, capsys, cli):
    base, _ = _runs(tmp_path, events)
    rule = ["--rule", "erank/* last >= 0.8 * baseline"]
    missing = tmp_path / "missing"
    err = _one_line_error(capsys, str(base), "--baseline", str(missing), *rule)
    assert f"baseline {missing}: no such file or directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _one_line_error(capsys, str(base), "--baseline", str(empty), *rule)
    assert f"baseline {empty}: no TensorBoard event files or metrics.csv" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("not a run\n", encoding="utf-8")
    err = _one_line_error(capsys, str(base), "--baseline", str(notes), *rule)
    assert f"baseline {notes}" in err
    err = _one_line_error(capsys, str(base), "--baseline", os.devnull, *rule)
    assert "baseline /dev/null: not a regular file or directory" in err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = cli(["check", str(base), "--baseline", str(fifo), *rule])  # never waits on it
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"baseline {fifo}: not a regular file or directory (FIFO)" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(RunReadError, match="^baseline "):
        check(base, rule[1:], baseline=missing)


# ----------------------------------------------------------------------------- markdown

MARKDOWN = """\
### ❌ Spectral gate failed

FAILED: 5 checks, 2 passed, 2 failed, 1 skipped · baseline `main` · run `pr`

|  | tag | reducer | baseline | value | change | check | note |
|---|---|---|---:|---:|---:|---|---|
| ❌ fail | `erank/fc1` | `last` | 4 | 2 | -50.0% | `>= 0.8 * baseline` = 3.2 |  |
| ❌ fail | `erank/x\\|y\\n` | `last` | – | 1 |  | `>= 0.8 * baseline` | not in the baseline run |
| ⚪ skip | ``a`b`` | `mean(last=3)` | – | 1 |  | `>= baseline - 0.1` | not in the baseline run |
| ✅ pass | `erank/fc2` | `last` | 8 | 8 | 0.0% | `>= 0.8 * baseline` = 6.4 |  |
| ✅ pass | `vne/a` | `drop_from_max_rel` | 0 | 0.5 |  | `<= 0.6` |  |"""


def test_markdown_snapshot():
    run = Run.from_mapping(
        {"erank/fc1": [4.0, 2.0], "erank/fc2": [8.0], "erank/x|y\n": [1.0], "vne/a": [2.0, 1.0],
         "a`b": [1.0]}, label="pr")
    base = Run.from_mapping(
        {"erank/fc1": [4.0], "erank/fc2": [8.0], "vne/a": [1.0]}, label="main")
    optional = Rule(**{**parse_rule("a`b mean(last=3) >= baseline - 0.1").__dict__,
                       "optional": True})
    report = check(run, ["erank/* last >= 0.8 * baseline", optional,
                         "vne/a drop_from_max_rel <= 0.6"], baseline=base)
    md = report.to_markdown()
    assert md == MARKDOWN, md
    # one table row per check, each with the same number of cells, failures first
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 5 and all(r.count(" | ") == rows[0].count(" | ") for r in rows)


def test_markdown_without_baseline_and_hostile_tags(capsys, tmp_path: Path, events):
    run = tmp_path / "run"
    events(run, {"vne/ok": [1.0], "vne/::error::x\n##[y]": [0.1], "vne/`a|b`": [2.0],
                 "vne/@user <b>*x*</b>": [3.0]})
    assert main(["check", str(run), "--rule", "vne/* >= 0.5", "--format", "markdown"]) == 1
    md = capsys.readouterr().out
    lines = md.splitlines()
    assert lines[0] == "### ❌ Spectral gate failed"
    head = lines[4]
    assert head == "|  | tag | reducer | value | check |"
    assert lines[6].startswith("| ❌ fail | `vne/::error::x\\n##\\x5by]`")  # failures first
    assert "`` vne/`a\\|b` ``" in md  # a longer fence around backticks, '|' escaped
    assert "`vne/@user <b>*x*</b>`" in md  # in a code span: no mention, no HTML, no emphasis
    for line in lines:
        assert not line.lstrip().startswith("::") and "##[" not in line
        if line.startswith("| ") and "`" in line:
            assert line.replace("\\|", "").count("|") == 6


# ----------------------------------------------------------------------------- the demo


def test_demo_rules_files_parse_and_the_recorded_baselines_pass_themselves():
    """The demo's rule files are valid, and each recorded baseline passes its regression
    rules against itself and the single-run gates."""
    gates = load_rules(REPO / "examples" / "gates.toml")
    regression = load_rules(REPO / "examples" / "regression.toml")
    assert all(r.relative for r in regression) and not any(r.relative for r in gates)
    for arch in ("mlp", "cnn"):
        base = REPO / "examples" / "baselines" / arch
        report = check(base, regression, baseline=base)
        assert report.passed and len(report.results) >= 10, report.to_text()
        assert check(base, gates).passed
        # a collapsed layer fails: every effective rank at 1 (rank one)
        run = read_run(base)
        for tag in run.tags:
            if tag.startswith("erank/"):
                run.scalars[tag].values = np.ones_like(run.scalars[tag].values)
        collapsed = check(run, regression, baseline=base)
        failed = {r.tag for r in collapsed.failures}
        assert {t for t in run.tags if t.startswith("erank/")} - {"erank/features.0"} <= failed
