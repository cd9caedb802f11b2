"""SpectralAlarm: rule semantics shared with the gate, patience, actions, resume, real fits."""

from __future__ import annotations

import math
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


@pytest.mark.parametrize("reducer", ["last", "first", "min", "max", "mean", "mean(last=3)"])
@pytest.mark.parametrize("rewrites", [False, True], ids=["one-per-step", "rewritten-steps"])
def test_streaming_reducers_equal_the_gate(reducer, rewrites):
    """After every logged value the alarm's streaming value equals the gate's value on the
    series read back so far (the last write of a step wins), NaN included."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=40)
    values[17] = math.nan if reducer != "last" else values[17]
    steps = np.sort(rng.integers(0, 25, size=40)) if rewrites else np.arange(40)
    alarm = SpectralAlarm([f"x {reducer} > -100"])
    rule = alarm.rules[0]
    for i in range(40):
        alarm.record({"x": float(values[i])}, step=int(steps[i]))
        got = alarm._history["x"].reduce(rule.reducer, rule.window)
        # the gate on the same series, as a run would hold it: one value per step, the last
        run = {"x": {int(s): float(v) for s, v in zip(steps[: i + 1], values[: i + 1],
                                                      strict=True)}}
        series = np.array(list(run["x"].values()))
        want = check({"x": series}, [f"x {reducer} > -100"]).results[0].value
        if math.isnan(want):
            assert math.isnan(got), (i, got)
        else:
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), i


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
