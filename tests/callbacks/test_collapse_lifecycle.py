"""CollapseMonitor's lifecycle and head choice: fresh fits, resume inside an epoch, exceptions,
``head="auto"`` on models with auxiliary heads, lazy heads and gradient checkpointing."""

from __future__ import annotations

import logging
import math
import signal
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks.collapse import CollapseMonitor
from lightning_spectral.errors import SpectralConfigError, SpectralWarning
from lightning_spectral.functional.collapse import neural_collapse
from lightning_spectral.testing import MemoryLogger

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers
class Heads(pl.LightningModule):
    """``x → body (Linear d→w, ReLU) → h``; ``classifier(h)`` and an auxiliary ``aux(h)``.

    ``aux`` is *defined after* the classifier; ``order`` says which heads the forward calls, in
    which order (only the classifier's output enters the loss, the auxiliary adds a small
    penalty). ``lazy`` builds the Linear modules as ``nn.LazyLinear``; ``ckpt`` runs the body
    (``"body"``) or body and classifier (``"all"``) under ``torch.utils.checkpoint``.
    """

    def __init__(
        self,
        classes: int = 4,
        aux_width: int = 3,
        order: tuple[str, ...] = ("classifier",),
        width: int = 8,
        lr: float = 0.05,
        lazy: bool = False,
        ckpt: str = "none",
        fail_at: int | None = None,
        fail_with: type[BaseException] = RuntimeError,
    ) -> None:
        super().__init__()
        linear = (lambda i, o: nn.LazyLinear(o)) if lazy else nn.Linear
        self.body = nn.Sequential(linear(6, width), nn.ReLU())
        self.classifier = linear(width, classes)
        self.aux = linear(width, aux_width)
        self.order, self.lr, self.ckpt = order, lr, ckpt
        self.fail_at, self.fail_with = fail_at, fail_with

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.ckpt == "body":
            return checkpoint(self.body, x, use_reentrant=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs: dict[str, torch.Tensor] = {}
        if self.ckpt == "all":
            h = checkpoint(self.body, x, use_reentrant=False)
            outs["classifier"] = checkpoint(self.classifier, h, use_reentrant=False)
            for name in self.order:
                if name != "classifier":
                    outs[name] = getattr(self, name)(h)
        else:
            h = self._features(x)
            for name in self.order:
                outs[name] = getattr(self, name)(h)
        aux = outs.get("aux")
        return outs["classifier"], (aux if aux is not None else h.new_zeros(()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and batch_idx == self.fail_at:
            self(batch[0])  # the hooks are live during this forward
            raise self.fail_with("boom")
        logits, aux = self(batch[0])
        # (clamped: one test feeds labels wider than every head)
        target = batch[1].clamp(max=logits.shape[1] - 1)
        return nn.functional.cross_entropy(logits, target) + 0.01 * aux.pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, _ = self(batch[0])
        self.log("val_loss", nn.functional.cross_entropy(logits, batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_data(n: int = 48, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 2 * torch.randn(classes, 6, generator=g)[y] + torch.randn(n, 6, generator=g)
    return x, y


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_trainer(callbacks: list, epochs: int = 1, **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", MemoryLogger())
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        **kw,
    )


def collapse_events(logger: MemoryLogger) -> list[tuple[int, dict[str, float]]]:
    prefixes = ("collapse/", "collapse_val/")
    return [(s, m) for s, m in logger.records if any(k.startswith(prefixes) for k in m)]


def values(mon: CollapseMonitor) -> list[float]:
    return [v for _, v in mon.history]


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def reference_nc1(model: Heads, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        h = model.body(x).double()
    w, b = model.classifier.weight.detach().double(), model.classifier.bias.detach().double()
    return float(neural_collapse(h, y, w, b)["nc1"])


# ----------------------------------------------------------------------------- fresh fits
def test_reused_callback_starts_fresh_in_a_new_trainer():
    """A second Trainer with a new (differently shaped) model logs its own epochs only."""
    mon = CollapseMonitor(interplay_budget=1.0)
    x, y = make_data()
    first = MemoryLogger()
    make_trainer([mon], epochs=2, logger=first).fit(Heads(), loader(x, y))
    assert [e for e, _ in mon.history] == [0, 1]

    x3, y3 = make_data(classes=3, seed=1)
    torch.manual_seed(1)
    second = MemoryLogger()
    model = Heads(classes=3, width=5)
    make_trainer([mon], epochs=2, logger=second).fit(model, loader(x3, y3))
    torch.manual_seed(1)
    fresh = CollapseMonitor(interplay_budget=1.0)
    make_trainer([fresh], epochs=2).fit(Heads(classes=3, width=5), loader(x3, y3))

    assert [e for e, _ in mon.history] == [0, 1]  # fit 1 is not carried over
    assert len(collapse_events(second)) == 2
    assert all(math.isfinite(v) for _, v in mon.history)
    assert values(mon) == pytest.approx(values(fresh), rel=1e-9)
    assert mon.last_metrics == pytest.approx(fresh.last_metrics, rel=1e-9, nan_ok=True)
    assert no_hooks(model) and not mon.hooks_attached


# ----------------------------------------------------------------------------- exceptions
@pytest.mark.parametrize(
    "fail_at, fail_with",
    [
        (0, RuntimeError),  # during the first batch: the head is still being observed
        (2, RuntimeError),  # later: the head's own capture is live
        (2, KeyboardInterrupt),  # Lightning calls on_exception, then sys.exit(1)
    ],
)
def test_exception_in_training_step_leaves_no_hooks(fail_at, fail_with):
    x, y = make_data()
    model = Heads(order=("aux", "classifier"), fail_at=fail_at, fail_with=fail_with)
    mon = CollapseMonitor()
    expected = SystemExit if fail_with is KeyboardInterrupt else RuntimeError
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(expected):
            make_trainer([mon], epochs=2).fit(model, loader(x, y))
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after an interrupt
    assert no_hooks(model), [n for n, m in model.named_modules() if m._forward_pre_hooks]
    assert not mon.hooks_attached
    # and the callback is usable again, from a fresh start
    clean = Heads(order=("aux", "classifier"))
    make_trainer([mon]).fit(clean, loader(x, y))
    assert [e for e, _ in mon.history] == [0]
    assert no_hooks(clean)


# ----------------------------------------------------------------------------- resume
def test_resume_inside_an_epoch_logs_every_epoch_with_continued_statistics(tmp_path):
    """Checkpoints after batch 2 of epoch 1 and after the last batch of epoch 2 (before its
    end): both resumed runs log epochs [0, 1, 2, 3] with the uninterrupted values.

    Every batch holds the same 24 rows, so the loader restarting at the resumed batch (a plain
    DataLoader is not resumable) feeds the resumed run exactly what the uninterrupted run saw;
    the features move between steps (lr 0.1), so the resumed epoch's statistics only match
    if they continue the checkpointed ones.
    """
    x, y = make_data(n=24)
    data = DataLoader(TensorDataset(x.repeat(4, 1), y.repeat(4)), batch_size=24)

    def fit(ckpt: str | None = None) -> tuple[CollapseMonitor, MemoryLogger]:
        torch.manual_seed(0)
        mon, logger = CollapseMonitor(interplay_budget=1.0), MemoryLogger()
        callbacks: list = [mon]
        if ckpt is None:
            callbacks.append(pl.callbacks.ModelCheckpoint(
                dirpath=tmp_path, filename="{step}", every_n_train_steps=6, save_top_k=-1))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint")
            make_trainer(callbacks, epochs=4, logger=logger, enable_checkpointing=ckpt is None
                         ).fit(Heads(order=("aux", "classifier"), lr=0.1), data, ckpt_path=ckpt)
        return mon, logger

    full, full_log = fit()
    assert [e for e, _ in full.history] == [0, 1, 2, 3]
    for name, resumed_epochs in (("step=6.ckpt", 3), ("step=12.ckpt", 2)):
        mon, log = fit(str(tmp_path / name))
        assert [e for e, _ in mon.history] == [0, 1, 2, 3], name
        assert values(mon) == pytest.approx(values(full), rel=1e-9), name
        assert mon.head_name == "classifier"  # kept from the checkpoint, not observed again
        events, reference = collapse_events(log), collapse_events(full_log)[-resumed_epochs:]
        assert [s for s, _ in events] == [s for s, _ in reference], name
        for (_, got), (_, want) in zip(events, reference, strict=True):
            assert got == pytest.approx(want, rel=1e-7, abs=1e-9), name


# ----------------------------------------------------------------------------- head="auto"
def _fit_auto(model: Heads, caplog, **kw: Any) -> tuple[CollapseMonitor, list[str]]:
    x, y = make_data(n=48, classes=model.classifier.out_features)
    mon = CollapseMonitor(**kw)
    with caplog.at_level(logging.INFO):
        make_trainer([mon]).fit(model, loader(x, y))
    lines = [r.getMessage() for r in caplog.records if "CollapseMonitor: head" in r.getMessage()]
    return mon, lines


@pytest.mark.parametrize(
    "classes, aux_width, order",
    [
        (10, 4, ("classifier",)),  # an auxiliary head defined last but never called
        (4, 3, ("aux", "classifier")),  # defined after the classifier, called before it
        (10, 4, ("classifier", "aux")),  # called after the classifier, narrower than the labels
        (4, 16, ("aux", "classifier")),  # a wide projection called before the classifier
    ],
)
def test_auto_head_is_the_last_linear_called_that_fits_the_labels(
    classes, aux_width, order, caplog
):
    model = Heads(classes=classes, aux_width=aux_width, order=order, lr=0.0)
    mon, lines = _fit_auto(model, caplog)
    assert mon.head_name == "classifier"
    assert len(lines) == 1
    assert f"head 'classifier' (Linear 8→{classes}) chosen: last Linear called" in lines[0]
    x, y = make_data(n=48, classes=classes)  # the first batch's rows count too
    assert mon.last_metrics["collapse/nc1"] == pytest.approx(reference_nc1(model, x, y), rel=1e-6)


def test_auto_head_with_num_classes_is_chosen_at_setup(caplog):
    model = Heads(classes=10, aux_width=4, order=("classifier", "aux"))
    mon = CollapseMonitor(num_classes=10)
    with caplog.at_level(logging.INFO):
        trainer = make_trainer([mon])
        mon.setup(trainer, model, "fit")
        assert mon.head_name == "classifier"  # decided statically, before any batch
        mon.teardown(trainer, model, "fit")
    assert any("the only Linear whose width equals the 10 classes" in r.getMessage()
               for r in caplog.records)
    assert no_hooks(model)


def test_auto_head_two_equal_candidates_is_an_error_naming_both():
    x, y = make_data()
    model = Heads(classes=4, aux_width=4, order=("aux", "classifier"))
    with pytest.raises(SpectralConfigError, match=r"'classifier' and 'aux'.*head='classifier'"):
        make_trainer([CollapseMonitor()]).fit(model, loader(x, y))
    assert no_hooks(model)
    # statically ambiguous too: both have the width num_classes asks for
    with pytest.raises(SpectralConfigError, match="'classifier' and 'aux'"):
        make_trainer([CollapseMonitor(num_classes=4)]).fit(model, loader(x, y))
    # an explicit head settles it
    mon = CollapseMonitor(head="classifier")
    make_trainer([mon]).fit(model, loader(x, y))
    assert mon.head_name == "classifier" and len(mon.history) == 1


def test_auto_head_too_narrow_for_the_labels_is_an_error():
    x, y = make_data(classes=12)
    model = Heads(classes=4, aux_width=3, width=8, order=("classifier",))
    with pytest.raises(SpectralConfigError, match="wide enough for the labels up to 11"):
        make_trainer([CollapseMonitor()]).fit(model, loader(x, y))


def test_head_by_glob_pattern_must_match_one_module():
    model = Heads(order=("aux", "classifier"))
    mon = CollapseMonitor(head="class*")
    mon.setup(None, model, "fit")
    assert mon.head_name == "classifier" and mon.hooks_attached
    mon.teardown(None, model, "fit")
    assert no_hooks(model)
    with pytest.raises(SpectralConfigError, match=r"matches 2 modules \(classifier, aux\)"):
        CollapseMonitor(head="[ac]*").setup(None, model, "fit")
    assert no_hooks(model)


# ----------------------------------------------------------------------------- lazy heads
@pytest.mark.parametrize("head", ["auto", "classifier"])
def test_lazy_linear_head_takes_its_width_from_the_first_rows(head):
    x, y = make_data()
    torch.manual_seed(0)
    model = Heads(lazy=True, order=("aux", "classifier"), lr=0.0)
    mon = CollapseMonitor(head=head)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([mon], epochs=2).fit(model, loader(x, y))
    assert not [w for w in caught if issubclass(w.category, SpectralWarning)]
    assert mon.head_name == "classifier"
    assert [e for e, _ in mon.history] == [0, 1]
    assert all(math.isfinite(v) for v in mon.last_metrics.values())
    assert mon.last_metrics["collapse/nc1"] == pytest.approx(reference_nc1(model, x, y), rel=1e-6)


# ----------------------------------------------------------------------------- checkpointing
class CountingMonitor(CollapseMonitor):
    """Counts what the head's capture hands over."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls = 0

    def _on_rows(self, name: str, rows: torch.Tensor) -> None:
        self.calls += 1
        super()._on_rows(name, rows)


@pytest.mark.parametrize("head", ["auto", "classifier"])
def test_gradient_checkpointing_captures_each_forward_once(head):
    """Re-run forwards (during the backward pass) are not captured: the same head, the same
    rows and the same values as without checkpointing."""
    x, y = make_data()
    runs = {}
    for ckpt in ("none", "body", "all"):
        torch.manual_seed(0)
        mon = CountingMonitor(head=head)
        model = Heads(ckpt=ckpt, lr=0.05)
        make_trainer([mon], epochs=2).fit(model, loader(x, y))
        assert mon.head_name == "classifier", ckpt  # body.0 re-runs last, yet is not chosen
        runs[ckpt] = mon
    assert runs["all"].calls == runs["body"].calls == runs["none"].calls
    # 3 batches × 2 epochs; with head="auto" the first batch's rows come from the observation
    assert runs["none"].calls == (5 if head == "auto" else 6)
    for ckpt in ("body", "all"):
        assert values(runs[ckpt]) == pytest.approx(values(runs["none"]), rel=1e-9)
        assert runs[ckpt].last_metrics == pytest.approx(runs["none"].last_metrics, rel=1e-7)


# ----------------------------------------------------------------------------- source="val"
def test_val_source_in_fit_and_in_trainer_validate():
    x, y = make_data()
    model = Heads(order=("aux", "classifier"), lr=0.0)
    mon = CollapseMonitor(source="val", interplay_budget=1.0)
    logger = MemoryLogger()
    trainer = make_trainer([mon], epochs=2, logger=logger)
    trainer.fit(model, loader(x, y), loader(x[:24], y[:24]))
    assert [e for e, _ in mon.history] == [0, 1]
    assert mon.last_metrics["collapse_val/nc1"] == pytest.approx(
        reference_nc1(model, x[:24], y[:24]), rel=1e-6
    )
    trainer.validate(model, loader(x[24:], y[24:]))
    assert len(collapse_events(logger)) == 3
    assert mon.last_metrics["collapse_val/nc1"] == pytest.approx(
        reference_nc1(model, x[24:], y[24:]), rel=1e-6
    )
    assert no_hooks(model)


# ----------------------------------------------------------------------------- interplay budget
def test_interplay_budget_skips_epochs_and_completes_the_last_at_train_end():
    """``interplay_budget=0``: MIR/HDR at the first epoch only, absent (not NaN) on the others,
    and the last epoch's computed when training ends, at that epoch's step, equal to what an
    every-epoch monitor logs for it; NC1–NC4 are logged every epoch either way."""
    x, y = make_data()
    runs = {}
    for budget in (0.0, 1.0):
        torch.manual_seed(0)
        mon, logger = CollapseMonitor(interplay_budget=budget), MemoryLogger()
        make_trainer([mon], epochs=3, logger=logger).fit(Heads(), loader(x, y))
        runs[budget] = (mon, logger)
    (lean, lean_log), (full, full_log) = runs[0.0], runs[1.0]
    assert sorted(lean_log.series("collapse/nc1")) == sorted(full_log.series("collapse/nc1"))
    steps = sorted(full_log.series("collapse/mir"))
    assert len(steps) == 3
    assert sorted(lean_log.series("collapse/mir")) == [steps[0], steps[2]]  # not epoch 1
    assert all(math.isfinite(v) for v in lean_log.series("collapse/mir").values())
    for tag in ("collapse/mir", "collapse/hdr"):
        for step in (steps[0], steps[2]):
            assert lean_log.series(tag)[step] == full_log.series(tag)[step]  # bit for bit
    # the end-of-training values are the last epoch's, also in last_metrics
    assert lean.last_metrics["collapse/mir"] == full.last_metrics["collapse/mir"]
    assert lean.last_metrics == full.last_metrics
    epoch_one = [m for s, m in lean_log.records if s == steps[1] and "collapse/nc1" in m]
    assert epoch_one and "collapse/mir" not in epoch_one[0]


def test_interplay_budget_counts_the_whole_monitor():
    """The budget is measured against everything the monitor does: with its per-batch intake
    and epoch ends charged, a tiny budget leaves MIR/HDR to the first epoch (and the end), a
    full one computes them every epoch."""
    x, y = make_data()
    mon = CollapseMonitor(interplay_budget=1e-9)
    make_trainer([mon], epochs=4).fit(Heads(), loader(x, y))
    assert mon._figures.work > 0.0  # intake and epoch ends were charged
    assert mon._interplay_done == 2  # epoch 0, then the last epoch at the end of training
    with pytest.raises(SpectralConfigError, match="interplay_budget"):
        CollapseMonitor(interplay_budget=1.5)
