"""MirrorCertificate: the convex-optimality gap of a MirrorNet during training.

The gap is defined in docs/definitions.md#mirrors-values.
"""

from __future__ import annotations

import contextlib
import signal
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import report
from lightning_spectral.callbacks.mirrors import MirrorCertificate
from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.functional.mirrors import (
    lasso_mirror_fit,
    network_objective,
)
from lightning_spectral.models import MirrorNet
from lightning_spectral.testing import MemoryLogger

BETA = 0.05


class _Regressor(pl.LightningModule):
    def __init__(self, depth: int = 2, width: int = 8, extra: bool = False) -> None:
        super().__init__()
        self.net = MirrorNet(width, depth, generator=torch.Generator().manual_seed(3))
        if extra:
            self.other = MirrorNet(width, depth, generator=torch.Generator().manual_seed(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        # the certified objective, rescaled per batch (same minimiser on full batches)
        return network_objective(self.net, x, y, BETA)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


class _NotMirror(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.body(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=gen) * 2 - 1
    y = torch.sin(3 * x) + 0.1 * torch.randn(n, 1, generator=gen)
    return x, y


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 24) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(1))


def _trainer(callbacks, logger, steps: int = 30) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, logger=logger, callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1)


def test_logs_gap_objective_optimum_and_solves_once():
    x, y = _data()
    rec = MemoryLogger()
    cb = MirrorCertificate(every_n_steps=5, beta=BETA, figure_every_n_steps=0)
    model = _Regressor(depth=3)
    _trainer([cb], rec, steps=30).fit(model, _loader(x, y))
    rows = [(s, m) for s, m in rec.records if "mirror/gap" in m]
    assert [s for s, _ in rows] == [5, 10, 15, 20, 25, 30]
    assert cb.solves == 1  # once per data set, not per event (and not again per epoch)
    ref = lasso_mirror_fit(x, y, BETA, 3)
    for _, m in rows:
        assert m["mirror/optimum"] == pytest.approx(ref.objective, rel=1e-9)
        assert m["mirror/gap"] >= -1e-9
        assert m["mirror/gap"] == pytest.approx(
            (m["mirror/objective"] - m["mirror/optimum"]) / m["mirror/optimum"], rel=1e-12)
    # the logged objective is the network's objective on the data
    J = float(network_objective(model.net, x, y, BETA, dtype=torch.float64).detach())
    assert rows[-1][1]["mirror/objective"] == pytest.approx(J, rel=1e-12)
    assert rows[-1][1]["mirror/gap"] < rows[0][1]["mirror/gap"]


def test_training_is_bit_identical_with_and_without():
    x, y = _data(seed=2)
    results = []
    for with_cb in (False, True):
        torch.manual_seed(0)
        model = _Regressor(depth=2)
        cbs = [MirrorCertificate(every_n_steps=2, beta=BETA, figure_every_n_steps=0)]
        _trainer(cbs if with_cb else [], MemoryLogger(), steps=12).fit(
            model, _loader(x, y, batch_size=8))
        results.append(([p.detach().clone() for p in model.parameters()],
                        torch.random.get_rng_state()))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(results[0][1], results[1][1])


def test_max_samples_bounds_the_data_with_own_generator():
    x, y = _data(n=40, seed=5)
    cb = MirrorCertificate(every_n_steps=100, beta=BETA, max_samples=16,
                           figure_every_n_steps=0)
    _trainer([cb], MemoryLogger(), steps=2).fit(_Regressor(), _loader(x, y, batch_size=20))
    assert cb.fit is not None and cb.fit.x.numel() == 16
    # the subset is a subset of the training points
    assert set(cb.fit.x.tolist()) <= set(x[:, 0].double().tolist())


def test_setup_errors_name_what_is_available():
    x, y = _data()
    with pytest.raises(SpectralConfigError, match="no MirrorNet found.*body"):
        _trainer([MirrorCertificate(beta=BETA)], MemoryLogger(), 1).fit(_NotMirror(),
                                                                     _loader(x, y))
    with pytest.raises(SpectralConfigError, match="several MirrorNet.*net.*other"):
        _trainer([MirrorCertificate(beta=BETA)], MemoryLogger(), 1).fit(_Regressor(extra=True),
                                                                     _loader(x, y))
    with pytest.raises(SpectralConfigError, match="no module named 'nett'.*'net'"):
        _trainer([MirrorCertificate(beta=BETA, module="nett")], MemoryLogger(), 1).fit(
            _Regressor(), _loader(x, y))
    # naming one of several works
    cb = MirrorCertificate(beta=BETA, module="other", every_n_steps=1, figure_every_n_steps=0)
    _trainer([cb], MemoryLogger(), 1).fit(_Regressor(extra=True), _loader(x, y))
    assert cb.fit is not None


@pytest.mark.parametrize("kwargs", [dict(), dict(beta=-1.0), dict(beta=0.0),
                                    dict(beta=0.1, every_n_steps=0),
                                    dict(beta=0.1, max_samples=1), dict(beta=0.1, tol=2.0)])
def test_constructor_rejects_bad_values(kwargs):
    with pytest.raises(SpectralConfigError):
        MirrorCertificate(**kwargs)


def test_two_dimensional_inputs_fail_with_clear_message():
    x = torch.rand(10, 2)
    y = torch.rand(10, 1)
    with pytest.raises(SpectralConfigError, match="1-D regression"):
        _trainer([MirrorCertificate(beta=BETA)], MemoryLogger(), 1).fit(_Regressor(),
                                                                     _loader(x, y))


def test_figure_overlay_is_logged(tmp_path, monkeypatch):
    x, y = _data()
    logged = []
    real = report.log_figure

    def spy(trainer, tag, figure, step):
        logged.append((tag, step, len(figure.axes[0].lines)))
        real(trainer, tag, figure, step)

    monkeypatch.setattr(report, "log_figure", spy)
    tb = pl.loggers.TensorBoardLogger(str(tmp_path))
    cb = MirrorCertificate(every_n_steps=2, beta=BETA, figure_every_n_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([cb], tb, steps=6).fit(_Regressor(depth=3), _loader(x, y))
    assert [(t, s) for t, s, _ in logged] == [("mirror/overlay", 4), ("mirror/overlay", 6)]
    assert all(n >= 2 for _, _, n in logged)  # network and Lasso curves at least


def test_figure_budget_skips_scheduled_figures_but_draws_the_last(tmp_path, monkeypatch):
    x, y = _data()
    logged: list[int] = []
    real = report.log_figure

    def spy(trainer, tag, figure, step):
        logged.append(step)
        real(trainer, tag, figure, step)

    monkeypatch.setattr(report, "log_figure", spy)

    def run(cb):
        logged.clear()
        tb = pl.loggers.TensorBoardLogger(str(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer([cb], tb, steps=20).fit(_Regressor(depth=3), _loader(x, y))
        return list(logged)

    # a figure costs far more than 1 % of a few tiny steps: first and last only
    budgeted = run(MirrorCertificate(every_n_steps=2, beta=BETA, figure_every_n_steps=2))
    assert budgeted[0] == 2 and budgeted[-1] == 20 and len(budgeted) < 10
    every = MirrorCertificate(every_n_steps=2, beta=BETA, figure_every_n_steps=2,
                              figure_budget=1.0)
    assert run(every) == list(range(2, 21, 2))


def test_overlay_plot_function():
    from matplotlib.figure import Figure

    from lightning_spectral.plots.mirrors import mirror_overlay

    xs = np.linspace(-1, 1, 9)
    fig = mirror_overlay(xs, np.abs(xs), xs, np.abs(xs), np.abs(xs), np.array([0.0]),
                         np.array([0.1]), title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == "t" and len(ax.lines) >= 4


def test_state_dict_roundtrip_and_unique_key():
    a = MirrorCertificate(beta=0.1)
    b = MirrorCertificate(beta=0.2)
    assert a.state_key != b.state_key
    a._last_step = 17
    c = MirrorCertificate(beta=0.1)
    c.load_state_dict(a.state_dict())
    assert c._last_step == 17


def test_non_finite_network_fails_soft_or_strict():
    from lightning_spectral.errors import SpectralComputeError, SpectralWarning

    x, y = _data()
    model = _Regressor()
    with torch.no_grad():
        model.net.xi.fill_(float("nan"))
    rec = MemoryLogger()
    cb = MirrorCertificate(every_n_steps=1, beta=BETA, figure_every_n_steps=0)
    with pytest.warns(SpectralWarning, match="not finite"):
        _trainer([cb], rec, steps=3).fit(model, _loader(x, y))
    gaps = [m["mirror/gap"] for _, m in rec.records if "mirror/gap" in m]
    assert len(gaps) == 3 and all(np.isnan(g) for g in gaps)

    model = _Regressor()
    with torch.no_grad():
        model.net.xi.fill_(float("nan"))
    cb = MirrorCertificate(every_n_steps=1, beta=BETA, figure_every_n_steps=0, strict=True)
    with pytest.raises(SpectralComputeError):
        _trainer([cb], MemoryLogger(), steps=3).fit(model, _loader(x, y))


# ----------------------------------------------------------------------------- lifecycle


def _gap_steps(rec: MemoryLogger) -> list[int]:
    return [s for s, m in rec.records if "mirror/gap" in m]


@contextlib.contextmanager
def _sigint_restored():
    """Lightning ignores SIGINT after a KeyboardInterrupt; put the test process's handler back."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_reused_certificate_starts_a_fresh_schedule_and_keys_the_lasso_by_depth():
    x, y = _data()
    cb = MirrorCertificate(every_n_steps=2, beta=BETA, figure_every_n_steps=0)
    for _ in range(2):  # the same callback, a new Trainer and a new model each time
        rec = MemoryLogger()
        _trainer([cb], rec, steps=2).fit(_Regressor(depth=2), _loader(x, y))
        assert _gap_steps(rec) == [2]
    assert cb.solves == 1  # same data, same depth: the Lasso is reused
    rec = MemoryLogger()
    _trainer([cb], rec, steps=2).fit(_Regressor(depth=3), _loader(x, y))
    assert cb.solves == 2  # a deeper network has another optimum
    assert rec.records[-1][1]["mirror/optimum"] == pytest.approx(
        lasso_mirror_fit(x, y, BETA, 3).objective, rel=1e-9)


def test_gradient_accumulation_logs_each_step_once_and_never_step_zero():
    x, y = _data()
    rec = MemoryLogger()
    cb = MirrorCertificate(every_n_steps=2, beta=BETA, figure_every_n_steps=0)
    trainer = pl.Trainer(max_steps=5, logger=rec, callbacks=[cb], accumulate_grad_batches=2,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(_Regressor(), _loader(x, y, batch_size=8))
    assert _gap_steps(rec) == [2, 4, 5]  # the events, then the end of training


def test_resume_from_checkpoint_continues_the_schedule(tmp_path):
    x, y = _data()
    cb = MirrorCertificate(every_n_steps=2, beta=BETA, figure_every_n_steps=0)
    trainer = _trainer([cb], MemoryLogger(), steps=3)
    trainer.fit(_Regressor(), _loader(x, y, batch_size=8))
    ckpt = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(ckpt)
    rec = MemoryLogger()
    resumed = MirrorCertificate(every_n_steps=2, beta=BETA, figure_every_n_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "resuming mid-epoch with a non-resumable loader"
        _trainer([resumed], rec, steps=6).fit(_Regressor(), _loader(x, y, batch_size=8),
                                               ckpt_path=ckpt)
    assert _gap_steps(rec) == [4, 6]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_fit_leaves_the_model_as_found(error):
    class Failing(_Regressor):
        def training_step(self, batch, batch_idx):
            if self.global_step >= 3:
                raise error("boom")
            return super().training_step(batch, batch_idx)

    x, y = _data()
    model = Failing()
    cb = MirrorCertificate(every_n_steps=1, beta=BETA, figure_every_n_steps=0)
    expected = SystemExit if error is KeyboardInterrupt else RuntimeError
    with _sigint_restored(), pytest.raises(expected):
        _trainer([cb], MemoryLogger(), steps=6).fit(model, _loader(x, y))
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name or "<root>"
        assert m.training, name or "<root>"
    assert "training_step" not in model.__dict__
    assert cb._net is None  # no reference to the model is kept


def test_infinite_objective_warning_does_not_claim_nan():
    from lightning_spectral.errors import SpectralWarning

    class Idle(_Regressor):  # a loss with zero gradients: the network stays as it is
        def training_step(self, batch, batch_idx):
            return (self.net.w * 0.0).sum()

    x, y = _data()
    model = Idle()
    with torch.no_grad():
        model.net.xi.fill_(float("inf"))
    rec = MemoryLogger()
    cb = MirrorCertificate(every_n_steps=1, beta=BETA, figure_every_n_steps=0)
    with pytest.warns(SpectralWarning, match="not finite") as caught:
        _trainer([cb], rec, steps=2).fit(model, _loader(x, y))
    message = next(str(w.message) for w in caught if issubclass(w.category, SpectralWarning))
    assert "logged as NaN" not in message and "logged as computed" in message
    objectives = [m["mirror/objective"] for _, m in rec.records if "mirror/objective" in m]
    assert objectives and all(o == float("inf") for o in objectives)


def test_figure_budget_is_a_checked_constructor_argument():
    assert MirrorCertificate(beta=BETA, figure_budget=0.5).figure_budget == 0.5
    with pytest.raises(SpectralConfigError, match="figure_budget"):
        MirrorCertificate(beta=BETA, figure_budget=2.0)
