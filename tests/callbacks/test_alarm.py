"""SpectralAlarm: rule semantics shared with the gate, patience, actions, resume, real fits."""

from __future__ import annotations

import math
import os
import signal
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import report
from lightning_spectral.callbacks.alarm import SpectralAlarm, SpectralAlarmError
from lightning_spectral.demos import DigitsClassifier, digits_dataloaders
from lightning_spectral.errors import SpectralConfigError, SpectralWarning
from lightning_spectral.gate import check


class FakeTrainer(SimpleNamespace):
    """A Trainer stand-in (hashable and weak-referenceable, as the logging record needs)."""

    __hash__ = object.__hash__


def fake_trainer(**kw):
    base = dict(callback_metrics={}, global_step=0, world_size=1, should_stop=False,
                sanity_checking=False, loggers=[], is_global_zero=True)
    base.update(kw)
    return FakeTrainer(**base)


def feed(alarm: SpectralAlarm, trainer, tag: str, values, start: int = 0):
    """Log one value per step and run the alarm's batch-end hook after each."""
    for i, v in enumerate(values):
        trainer.global_step = start + i
        report.log_scalars(trainer, {tag: float(v)}, start + i)
        alarm.on_train_batch_end(trainer, None, None, None, i)


@pytest.mark.parametrize("reducer", ["last", "first", "min", "max", "mean", "mean(last=3)",
                                     "slope(last=5)", "slope(last=2)", "drop_from_max",
                                     "drop_from_max_rel"])
@pytest.mark.parametrize("rewrites", [False, True], ids=["one-per-step", "rewritten-steps"])
def test_streaming_reducers_equal_the_gate(reducer, rewrites):
    """After every logged value the alarm's streaming value equals the gate's value on the
    series read back so far (the last write of a step wins), NaN included; the trend reducers
    also equal NumPy (np.polyfit against the steps; max - last)."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=40)
    values[17] = math.nan if reducer != "last" else values[17]
    steps = np.sort(rng.integers(0, 25, size=40)) if rewrites else 3 * np.arange(40) + 7
    alarm = SpectralAlarm([f"x {reducer} > -100"])
    rule = alarm.rules[0]
    for i in range(40):
        alarm.record({"x": float(values[i])}, step=int(steps[i]))
        got = alarm._history["x"].reduce(rule.reducer, rule.window)
        # the gate on the same series, as a run would hold it: one value per step, the last
        by_step = {int(s): float(v) for s, v in zip(steps[: i + 1], values[: i + 1],
                                                    strict=True)}
        xs = np.array(list(by_step), dtype=np.int64)
        series = np.array(list(by_step.values()))
        want = check({"x": (xs, series)}, [f"x {reducer} > -100"]).results[0].value
        if math.isnan(want):
            assert math.isnan(got), (i, got)
        else:
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), i
        if rule.reducer == "slope":
            k = rule.window
            window = series[-k:]
            if len(window) >= 2 and not np.isnan(window).any():
                ref = np.polyfit(xs[-k:].astype(np.float64), window, 1)[0]
                assert got == pytest.approx(ref, rel=1e-9, abs=1e-12), i
            else:
                assert math.isnan(got), i
        elif reducer.startswith("drop_from_max") and not np.isnan(series).any():
            drop = series.max() - series[-1]
            ref = drop if reducer == "drop_from_max" else (
                drop / abs(series.max()) if drop else 0.0)
            assert got == pytest.approx(ref, rel=1e-12, abs=1e-15), i
    if rule.reducer == "slope":  # O(k) memory: only the window's values and steps are kept
        assert len(alarm._history["x"].recent) == len(alarm._history["x"].xs) == rule.window


def test_same_step_replaces_like_the_gate():
    alarm = SpectralAlarm(["x mean > 0"])
    for step, v in [(0, 1.0), (1, 5.0), (1, 3.0), (2, 2.0)]:
        alarm.record({"x": v}, step=step)
    assert alarm._history["x"].reduce("mean") == pytest.approx(2.0)  # (1 + 3 + 2) / 3


@pytest.mark.parametrize("patience", [1, 3])
def test_stop_after_patience_consecutive_failures(patience):
    alarm = SpectralAlarm(["vne/* >= 1.0"], patience=patience, action="stop")
    trainer = fake_trainer()
    # fails, passes (resets), then fails for good
    feed(alarm, trainer, "vne/a", [0.5] * (patience - 1) + [2.0] + [0.5] * (patience - 1))
    assert trainer.should_stop is False and alarm.triggered == []
    feed(alarm, trainer, "vne/a", [0.5], start=2 * patience)
    assert trainer.should_stop is True
    assert alarm.stopped_step == 2 * patience
    assert "vne/a" in alarm.triggered[0] and f"{patience} consecutive" in alarm.triggered[0]


def test_stale_values_are_not_recounted():
    """A check is evaluated only when its tag gets a new value: other tags' updates do not
    advance its patience."""
    alarm = SpectralAlarm(["val_loss < 1.0"], patience=2)
    trainer = fake_trainer()
    alarm.record({"val_loss": 5.0}, step=0)
    for step in range(1, 10):  # many evaluations, but only one val_loss value
        alarm.record({"train_loss": 0.1}, step=step)
        alarm.on_train_batch_end(trainer, None, None, None, step)
    assert trainer.should_stop is False
    alarm.record({"val_loss": 4.0}, step=10)
    alarm.on_validation_end(trainer, None)
    assert trainer.should_stop is True


def test_report_log_scalars_feeds_the_alarm_without_a_logger():
    """Every value report.log_scalars logs reaches the alarm with its step (no logger)."""
    from lightning_spectral import report

    alarm = SpectralAlarm(["vne/* > 1"], action="stop")
    trainer = fake_trainer(callbacks=[alarm], loggers=[], is_global_zero=True)
    report.log_scalars(trainer, {"vne/fc1": torch.tensor(0.25), "erank/fc1": 3.0}, step=7)
    alarm.on_train_batch_end(trainer, None, None, None, 0)
    assert alarm._history["vne/fc1"].last == 0.25 and alarm._history["vne/fc1"].step == 7
    assert alarm._history["erank/fc1"].last == 3.0
    # published into callback_metrics as well, and not read a second time from there
    assert float(trainer.callback_metrics["vne/fc1"]) == 0.25
    assert alarm._history["vne/fc1"].version == 1
    assert trainer.should_stop is True and "step 7" in alarm.triggered[0]


def test_raise_action():
    alarm = SpectralAlarm(["collapse/nc1 < 0.5"], patience=2, action="raise")
    trainer = fake_trainer()
    feed(alarm, trainer, "collapse/nc1", [0.9])
    with pytest.raises(SpectralAlarmError, match=r"collapse/nc1.*2 consecutive"):
        feed(alarm, trainer, "collapse/nc1", [0.8], start=1)


def test_warn_action_once_per_streak():
    alarm = SpectralAlarm(["x > 0"], patience=2, action="warn")
    trainer = fake_trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feed(alarm, trainer, "x", [-1, -1, -1, -1, 1, -1, -1, math.nan])
    msgs = [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)]
    assert len(msgs) == 2  # one per streak reaching patience (NaN counts as a failure)
    assert trainer.should_stop is False


def test_callback_metrics_are_followed_when_they_change():
    alarm = SpectralAlarm(["val_acc >= 0.9"], patience=2)
    trainer = fake_trainer(callback_metrics={"val_acc": torch.tensor(0.5)})
    alarm.on_validation_end(trainer, None)
    alarm.on_train_batch_end(trainer, None, None, None, 0)  # unchanged: not a new evaluation
    assert trainer.should_stop is False
    trainer.callback_metrics = {"val_acc": torch.tensor(0.6)}
    alarm.on_validation_end(trainer, None)
    assert trainer.should_stop is True


def test_state_dict_resume_keeps_history_and_strikes():
    alarm = SpectralAlarm(["x mean(last=2) < 1"], patience=3)
    trainer = fake_trainer()
    feed(alarm, trainer, "x", [2.0, 2.0])
    state = alarm.state_dict()
    resumed = SpectralAlarm(["x mean(last=2) < 1"], patience=3)
    resumed.setup(trainer, None, "fit")  # Lightning: setup, then the checkpoint's state
    resumed.load_state_dict(state)
    assert resumed._history["x"].reduce("mean", 2) == 2.0
    resumed.on_train_batch_end(trainer, None, None, None, 0)  # nothing new: no strike
    assert trainer.should_stop is False
    feed(resumed, trainer, "x", [2.0], start=2)  # third strike
    assert trainer.should_stop is True
    assert SpectralAlarm(["x > 1"]).state_key != SpectralAlarm(["x > 2"]).state_key


# ----------------------------------------------------------------------------- baseline


@pytest.fixture
def reference_run(tmp_path):
    """A reference run written with the project's event writer: vne/a ends at 2.0 (mean of
    the last two values 1.9), erank/a at 4.0, train_loss at 0.25."""
    from lightning_spectral.testing import write_scalars

    records = [(tag, step, value) for step, values in enumerate(
        [(1.0, 3.0, 1.0), (1.8, 3.5, 0.5), (2.0, 4.0, 0.25)])
        for tag, value in zip(("vne/a", "erank/a", "train_loss"), values, strict=True)]
    run = tmp_path / "reference"
    run.mkdir()
    write_scalars(run / "events.out.tfevents.1700000000.host.1.0", records)
    return run


def test_alarm_stops_when_it_falls_behind_the_baseline(reference_run):
    alarm = SpectralAlarm(["vne/a mean(last=2) >= 0.9 * baseline"], patience=2,
                          baseline=reference_run)
    trainer = fake_trainer()
    alarm.setup(trainer, None, "fit")  # reads the baseline once
    assert alarm._baseline is not None and alarm._baseline.run.label == str(reference_run)
    feed(alarm, trainer, "vne/a", [2.0, 1.8, 1.75])  # mean(last=2) 1.9, 1.775 >= 1.71
    assert trainer.should_stop is False and not alarm.triggered
    feed(alarm, trainer, "vne/a", [1.6, 1.6], start=3)  # 1.675, 1.6 < 0.9 * 1.9 = 1.71
    assert trainer.should_stop is True and alarm.stopped_step == 4
    (message,) = alarm.triggered
    assert "vne/a" in message and "0.9 * baseline, baseline 1.9" in message
    assert "expected >= 1.71" in message and "2 consecutive" in message


def test_alarm_baseline_matches_the_gate(reference_run):
    """The alarm's verdicts equal the gate's on the same series and the same baseline."""
    rules = ["erank/a last >= 0.8 * baseline", "train_loss mean(last=2) <= 1.5 * baseline",
             "vne/a drop_from_max_rel <= baseline + 0.1"]
    rng = np.random.default_rng(0)
    run = {"erank/a": rng.uniform(2.5, 4.5, 12), "train_loss": rng.uniform(0.1, 0.8, 12),
           "vne/a": rng.uniform(0.5, 2.5, 12)}
    alarm = SpectralAlarm(rules, action="warn", baseline=reference_run)
    for step in range(12):
        alarm.record({tag: float(v[step]) for tag, v in run.items()}, step=step)
        seen = {tag: v[: step + 1] for tag, v in run.items()}
        gate = check(seen, rules, baseline=reference_run)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alarm.evaluate()
        for r in gate.results:
            i = rules.index(r.rule.text)
            assert (alarm._strikes.get((i, r.tag), 0) == 0) is r.passed, (step, r.tag)


def test_alarm_baseline_errors(tmp_path):
    with pytest.raises(SpectralConfigError, match=r"'x >= 0.8 \* baseline'.*no baseline"):
        SpectralAlarm(["x > 0", "x >= 0.8 * baseline"])
    with pytest.raises(SpectralConfigError, match="baseline must be a path"):
        SpectralAlarm(["x >= baseline"], baseline=3)
    (tmp_path / "empty").mkdir()
    for bad, needle in [(tmp_path / "missing", "no such file or directory"),
                        (tmp_path / "empty", "no TensorBoard event files"),
                        (os.devnull, "not a regular file or directory")]:
        alarm = SpectralAlarm(["x >= baseline"], baseline=bad)  # read at setup, not here
        with pytest.raises(SpectralConfigError, match=f"baseline {bad}: {needle}"):
            alarm.setup(fake_trainer(), None, "fit")


def test_alarm_tag_missing_from_the_baseline(reference_run):
    trainer = fake_trainer()
    alarm = SpectralAlarm(["vne/* last >= 0.5 * baseline"], baseline=reference_run)
    alarm.setup(trainer, None, "fit")
    feed(alarm, trainer, "vne/b", [5.0])  # never silently passed
    assert trainer.should_stop is True
    assert "vne/b is not in the baseline run" in alarm.triggered[0]
    from lightning_spectral.gate import Rule, parse_rule

    optional = Rule(**{**parse_rule("vne/* last >= 0.5 * baseline").__dict__,
                       "optional": True})
    alarm = SpectralAlarm([optional], baseline=reference_run)
    trainer = fake_trainer()
    alarm.setup(trainer, None, "fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feed(alarm, trainer, "vne/b", [5.0, 4.0])
        feed(alarm, trainer, "vne/a", [0.5], start=2)  # 0.5 < 0.5 * 2.0: a real failure
    msgs = [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)]
    assert len(msgs) == 1 and "vne/b is not in the baseline run" in msgs[0]
    assert trainer.should_stop is True and "vne/a" in alarm.triggered[0]


def test_alarm_slope_waits_for_two_values():
    alarm = SpectralAlarm(["val_loss slope(last=3) <= 0"], action="raise")
    trainer = fake_trainer()
    feed(alarm, trainer, "val_loss", [1.0])  # one value: no slope yet, no strike
    feed(alarm, trainer, "val_loss", [0.9], start=1)
    with pytest.raises(SpectralAlarmError, match=r"slope\(last=3\) = 0.05"):
        feed(alarm, trainer, "val_loss", [1.1], start=2)  # slope of 1, .9, 1.1 = +0.05


def test_fit_stops_behind_a_reference_run(tmp_path):
    """A real fit with a baseline that trains far better than it can: the alarm stops it."""
    from lightning_spectral.gate import Run

    reference = Run.from_mapping({"train_loss": [1e-6] * 5}, label="reference")
    alarm = SpectralAlarm(["train_loss mean(last=2) <= 10 * baseline"], patience=2,
                          baseline=reference)
    trainer = _tiny_fit(alarm, _Logs(), tmp_path, steps=10)
    assert trainer.global_step == 2 == alarm.stopped_step  # two strikes: two batches
    assert "10 * baseline, baseline 1e-06" in alarm.triggered[0]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(rules=["vne/* => 1"]), "column 7"),
        (dict(rules=[]), "at least one rule"),
        (dict(rules=["x > 1"], patience=0), "patience"),
        (dict(rules=["x > 1"], action="explode"), "action"),
    ],
)
def test_config_errors_fail_fast(kwargs, needle):
    with pytest.raises(SpectralConfigError, match=needle):
        SpectralAlarm(**kwargs)


# ----------------------------------------------------------------------------- real fits


def _fit(alarm: SpectralAlarm, tmp_path, monitor: bool = False, max_steps: int = 40):
    torch.manual_seed(0)
    callbacks = [alarm]
    if monitor:
        from lightning_spectral.callbacks.spectral import SpectralMonitor

        callbacks.insert(0, SpectralMonitor(every_n_steps=2, weights=False, histograms=False,
                                            figures=False, max_samples=64))
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=callbacks,
    )
    train, _ = digits_dataloaders(batch_size=32)
    model = DigitsClassifier(hidden=(16, 16))
    trainer.fit(model, train)
    return trainer


@pytest.mark.slow
def test_fit_stops_on_a_monitor_metric(tmp_path):
    """VNE of a 16-wide layer is at most log 16 < 3, so 'vne/* > 3' fails at the first
    SpectralMonitor event (step 0) and the fit stops right after, like EarlyStopping."""
    torch.set_num_threads(1)
    alarm = SpectralAlarm(["vne/features.* > 3"], patience=2, action="stop")
    trainer = _fit(alarm, tmp_path, monitor=True)
    assert alarm.triggered and "vne/features." in alarm.triggered[0]
    # events at steps 0 and 2 -> second strike seen at the end of the batch of step 2
    assert trainer.global_step <= 4 < 40
    assert alarm.stopped_step is not None


@pytest.mark.slow
def test_fit_raises_and_passing_rules_do_not_interfere(tmp_path):
    torch.set_num_threads(1)
    alarm = SpectralAlarm(["train_loss < 0.0"], action="raise")
    with pytest.raises(SpectralAlarmError, match="train_loss"):
        _fit(alarm, tmp_path, max_steps=5)
    calm = SpectralAlarm(["train_loss < 100", "train_acc >= 0"], action="raise")
    trainer = _fit(calm, tmp_path, max_steps=5)
    assert trainer.global_step == 5 and not calm.triggered


# ----------------------------------------------------------------------------- lifecycle


class _Logs(pl.LightningModule):
    """A tiny regression that logs ``train_loss`` every step (and may fail at ``fail_at``)."""

    def __init__(self, fail_at: int | None = None,
                 error: type[BaseException] = RuntimeError) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 1)
        self.fail_at, self.error = fail_at, error

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise self.error("boom")
        loss = torch.nn.functional.mse_loss(self.body(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _tiny_fit(alarm: SpectralAlarm, model: pl.LightningModule, tmp_path, steps: int = 3):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen))
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, limit_val_batches=0,
                      default_root_dir=str(tmp_path), callbacks=[alarm])
    trainer.fit(model, DataLoader(data, batch_size=8))
    return trainer


def test_reused_alarm_counts_from_zero_in_a_new_trainer(tmp_path):
    alarm = SpectralAlarm(["train_loss < 0"], action="warn")
    for _ in range(2):  # the same alarm, a new Trainer and a new model each time
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _tiny_fit(alarm, _Logs(), tmp_path)
        ours = [w for w in caught if issubclass(w.category, SpectralWarning)]
        assert len(ours) == 1 and "train_loss" in str(ours[0].message)
        assert len(alarm.triggered) == 1
        assert len(alarm._history["train_loss"]) == 3  # this fit's values only


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_fit_leaves_no_hooks(error, tmp_path):
    model = _Logs(fail_at=2, error=error)
    alarm = SpectralAlarm(["train_loss < 100"], action="raise")
    before = signal.getsignal(signal.SIGINT)
    expected = SystemExit if error is KeyboardInterrupt else RuntimeError
    try:
        with pytest.raises(expected):
            _tiny_fit(alarm, model, tmp_path, steps=5)
    finally:  # Lightning ignores SIGINT after a KeyboardInterrupt
        signal.signal(signal.SIGINT, before)
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name or "<root>"
    assert "training_step" not in model.__dict__
    assert not alarm.triggered


def test_unmatched_rule_warning_only_on_rank_zero_and_only_when_true(monkeypatch):
    from lightning_spectral._compat import rank_zero_only

    def end_of_fit(alarm: SpectralAlarm, trainer) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            alarm.on_fit_end(trainer, None)
        return [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)]

    # rank 1 never receives the monitors' vne/* values: no warning there
    trainer = fake_trainer(callback_metrics={"train_loss": torch.tensor(0.5)})
    alarm = SpectralAlarm(["vne/* > 0", "train_loss < 1"])
    alarm.on_train_batch_end(trainer, None, None, None, 0)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert end_of_fit(alarm, trainer) == []
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    [message] = end_of_fit(alarm, trainer)
    assert "['vne/* > 0'] matched no logged tag" in message and "train_loss" in message

    # a tag logged after the last evaluation (e.g. flushed at the end of training) did match
    alarm = SpectralAlarm(["vne/* > 0"], watch_callback_metrics=False)
    alarm.record({"erank/fc": 3.0}, step=0)
    alarm.on_train_batch_end(trainer, None, None, None, 0)
    alarm.record({"vne/fc": 1.0}, step=5)
    assert end_of_fit(alarm, trainer) == []

    # a rule on a self.log value that the alarm does not follow says so
    alarm = SpectralAlarm(["train_loss < 1"], watch_callback_metrics=False)
    alarm.record({"vne/fc": 1.0}, step=0)
    [message] = end_of_fit(alarm, trainer)
    assert "watch_callback_metrics=False" in message and "matched no logged tag" not in message


def test_warn_action_only_on_rank_zero(monkeypatch):
    from lightning_spectral._compat import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    alarm = SpectralAlarm(["x > 0"], action="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feed(alarm, fake_trainer(), "x", [-1.0])
    assert alarm.triggered and not [w for w in caught
                                    if issubclass(w.category, SpectralWarning)]
