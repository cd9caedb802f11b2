"""CurvatureMonitor: logs the curvature quantities and never perturbs training.

The quantities are those of docs/definitions.md#curvature.
"""

from __future__ import annotations

import contextlib
import math
import signal
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks.curvature import CurvatureMonitor
from lightning_spectral.demos import DigitsClassifier
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError, SpectralWarning
from lightning_spectral.functional.curvature import (
    flat_gradients,
    hessian_eigenpairs,
    objective_noise,
)
from lightning_spectral.testing import MemoryLogger

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 96, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 64, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def _model(seed: int = 0) -> DigitsClassifier:
    torch.manual_seed(seed)  # the test's own seeding of module initialisation
    return DigitsClassifier(arch="mlp", hidden=(12, 8), lr=0.05)


def _bn_dropout_module() -> DigitsClassifier:
    model = _model()
    model.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12),
                                   nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 8), nn.ReLU())
    return model


def _fit(callbacks: list, logger=None) -> DigitsClassifier:
    # dropout (global RNG) and BatchNorm (running statistics) make any perturbation visible
    model = _bn_dropout_module()
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=logger or False,
                         callbacks=callbacks, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, deterministic=True)
    trainer.fit(model, train_dataloaders=_data())
    return model


def test_training_bit_identical_with_and_without_and_tags_logged():
    plain = _fit([])
    rec = MemoryLogger()
    monitor = CurvatureMonitor(every_n_steps=2, k=2, trace_probes=4, noise_samples=6)
    train_mode = CurvatureMonitor(every_n_steps=3, k=1, trace_probes=2, noise_samples=0,
                                  mode="train", prefix="train_mode/")  # its own tags
    watched = _fit([monitor, train_mode], logger=rec)
    for (name, p), q in zip(plain.state_dict().items(), watched.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    rows = [(step, m) for step, m in rec.records if "hessian/eig_2" in m]
    assert [step for step, _ in rows] == [2, 4, 6]
    tags = set(rows[0][1])
    want = {"hessian/eig_1", "hessian/eig_2", "hessian/trace", "hessian/trace_se",
            "hessian/loss"} | {f"hessian/{q}_{i}" for q in ("noise_s2", "beta", "sigma")
                               for i in (1, 2)}
    assert want <= tags
    for _, m in rows:
        assert m["hessian/eig_1"] >= m["hessian/eig_2"]
        assert all(math.isfinite(m[t]) for t in want if not t.startswith(("hessian/beta",
                                                                          "hessian/sigma")))
    # the second monitor wrote under its prefix, never the first one's tags
    assert sorted(s for s, m in rec.records if "train_mode/hessian/eig_1" in m) == [3, 6]
    assert all(not (set(m) & {"hessian/trace"} and "train_mode/hessian/trace" in m)
               for _, m in rec.records if "hessian/eig_2" not in m)
    assert monitor.state_dict() == {"last_step": 6, "events": 3}
    assert train_mode.state_dict() == {"last_step": 6, "events": 2}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compute_restores_modes_buffers_grads_and_rng(mode):
    model = _bn_dropout_module().train()
    model.features[4].eval()  # a mixed pattern of flags must come back exactly
    flags = [m.training for m in model.modules()]
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.random.get_rng_state()
    batch = (torch.rand(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen))
    monitor = CurvatureMonitor(k=2, trace_probes=3, noise_samples=4, mode=mode)
    if mode == "train":  # BatchNorm in training mode has no per-sample gradients: NaN + warning
        with pytest.warns(SpectralWarning, match="objective-noise computation failed"):
            out = monitor.compute(model, lr=0.1, batches=[batch])
        assert math.isnan(float(out["hessian/noise_s2_1"]))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SpectralWarning)
            out = monitor.compute(model, lr=0.1, batches=[batch])
        assert math.isfinite(float(out["hessian/noise_s2_1"]))
    assert math.isfinite(float(out["hessian/eig_1"]))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_compute_matches_functional_quantities():
    model = _model().eval()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(10, 64, generator=gen), torch.randint(0, 10, (10,), generator=gen)
    monitor = CurvatureMonitor(k=2, trace_probes=0, noise_samples=10, loss="cross_entropy",
                               tol=1e-6, max_iter=200)
    out = monitor.compute(model, lr=0.05, step=0, batches=[(x, y)])
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    vals, vecs = hessian_eigenpairs(loss, params, k=2, tol=1e-6, max_iter=200)
    torch.testing.assert_close(torch.stack([out["hessian/eig_1"], out["hessian/eig_2"]]), vals,
                               rtol=1e-4, atol=1e-7)
    rows = flat_gradients([lambda i=i: nn.functional.cross_entropy(model(x[i:i + 1]),
                                                                   y[i:i + 1])
                           for i in range(10)], params)
    noise = objective_noise(rows, vals, vecs, 0.05, batch_size=10)
    torch.testing.assert_close(out["hessian/noise_s2_1"], noise.s2[0], rtol=1e-3, atol=1e-9)
    assert "hessian/trace" not in out


def test_training_step_loss_does_not_log():
    model = _model()
    calls = []
    model.log = lambda *a, **k: calls.append(a)  # instance attribute must survive
    saved = model.log
    monitor = CurvatureMonitor(k=1, trace_probes=2, noise_samples=2)
    gen = torch.Generator().manual_seed(0)
    monitor.compute(model, lr=0.1, batches=[(torch.rand(4, 64, generator=gen),
                                             torch.randint(0, 10, (4,), generator=gen))])
    assert calls == [] and model.log is saved


def test_configuration_errors():
    with pytest.raises(SpectralConfigError, match="k must be an integer >= 1"):
        CurvatureMonitor(k=0)
    with pytest.raises(SpectralConfigError, match="mode"):
        CurvatureMonitor(mode="inference")
    monitor = CurvatureMonitor(loss="my_loss")
    with pytest.raises(SpectralConfigError, match="has no method 'my_loss'.*training_step"):
        monitor.setup(None, _model(), "fit")
    a, b = CurvatureMonitor(k=2), CurvatureMonitor(k=3)
    assert a.state_key != b.state_key
    b.load_state_dict({"last_step": 40, "events": 2})
    assert b.state_dict() == {"last_step": 40, "events": 2}


def test_fail_soft_and_strict():
    model = _model()

    class Broken(DigitsClassifier):
        def nan_loss(self, batch):
            return self(batch[0]).sum() * float("nan")

    broken = Broken(arch="mlp", hidden=(4, 4))
    batch = (torch.rand(4, 64), torch.zeros(4, dtype=torch.long))
    soft = CurvatureMonitor(k=1, loss="nan_loss", trace_probes=0, noise_samples=0)
    soft.setup(None, broken, "fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = soft.compute(broken, batches=[batch])
        soft.compute(broken, batches=[batch])
    assert math.isnan(float(out["hessian/eig_1"]))
    assert len([w for w in caught if issubclass(w.category, SpectralWarning)]) == 1
    strict = CurvatureMonitor(k=1, loss="nan_loss", trace_probes=0, noise_samples=0,
                              strict=True)
    with pytest.raises(SpectralComputeError):
        strict.compute(broken, batches=[(torch.rand(4, 64), torch.zeros(4, dtype=torch.long))])
    del model


# ----------------------------------------------------------------------------- lifecycle


def _assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name or "<root>"


@contextlib.contextmanager
def _sigint_restored():
    """Lightning ignores SIGINT after a KeyboardInterrupt; put the test process's handler back."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _small_fit(callbacks: list, model: DigitsClassifier | None = None, max_steps: int = 4,
               seed: int = 0, logger=None) -> MemoryLogger:
    logger = logger or MemoryLogger()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger,
                         callbacks=callbacks, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model if model is not None else _model(seed), train_dataloaders=_data(seed=seed))
    return logger


def _hessian_rows(log: MemoryLogger) -> list[tuple[int, float]]:
    return [(step, m["hessian/eig_1"]) for step, m in log.records if "hessian/eig_1" in m]


def _cheap(**kw) -> CurvatureMonitor:
    return CurvatureMonitor(every_n_steps=2, k=1, trace_probes=0, noise_samples=0, **kw)


def test_reused_monitor_starts_fresh_in_a_new_trainer():
    """Schedule, event count and kept batches all start again: the second fit logs exactly what
    a new monitor logs on it."""
    reused = _cheap()
    first = _hessian_rows(_small_fit([reused], seed=0))
    assert [s for s, _ in first] == [2, 4]
    again = _hessian_rows(_small_fit([reused], seed=1))
    fresh = _hessian_rows(_small_fit([_cheap()], seed=1))
    assert again == fresh and [s for s, _ in again] == [2, 4]
    assert reused.state_dict() == {"last_step": 4, "events": 2}


def test_reused_after_an_exception_keeps_no_batches_of_the_failed_fit():
    class Failing(DigitsClassifier):
        fail_at: int | None = None

        def training_step(self, batch, batch_idx):
            if self.fail_at is not None and self.global_step >= self.fail_at:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    failing = Failing(arch="mlp", hidden=(12, 8), lr=0.05)
    failing.fail_at = 3
    reused = _cheap()
    with pytest.raises(RuntimeError, match="boom"):
        _small_fit([reused], model=failing, seed=0)
    assert reused._kept == []
    again = _hessian_rows(_small_fit([reused], seed=1))
    assert again == _hessian_rows(_small_fit([_cheap()], seed=1))


def test_resume_from_checkpoint_continues_the_schedule(tmp_path):
    monitor = _cheap()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(_model(), train_dataloaders=_data())
    ckpt = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed, log = _cheap(), MemoryLogger()
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=log, callbacks=[resumed],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "resuming mid-epoch with a non-resumable loader"
        trainer.fit(_model(), train_dataloaders=_data(), ckpt_path=ckpt)
    assert [s for s, _ in _hessian_rows(log)] == [4, 6]
    assert resumed.state_dict() == {"last_step": 6, "events": 3}


class _InterruptingLoss(DigitsClassifier):
    """A custom loss that raises ``error`` on its ``fail_on``-th call (inside an event)."""

    error: type[BaseException] = KeyboardInterrupt
    fail_on = 3

    def probe_loss(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fail_on:
            raise self.error("interrupted mid-event")
        return nn.functional.cross_entropy(self(batch[0]), batch[1])


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_exception_mid_event_leaves_the_model_as_found(error):
    torch.manual_seed(0)
    model = _InterruptingLoss(arch="mlp", hidden=(12, 8), lr=0.05)
    model.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12),
                                   nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 8), nn.ReLU())
    model.error = error
    # strict: the RuntimeError is not swallowed by the fail-soft path
    monitor = _cheap(loss="probe_loss", mode="eval", strict=error is RuntimeError)
    expected = SystemExit if error is KeyboardInterrupt else SpectralComputeError
    with _sigint_restored(), pytest.raises(expected):
        _small_fit([monitor], model=model)
    assert model.calls == model.fail_on  # it did stop in the middle of an event
    assert all(m.training for m in model.modules())  # eval mode of the event undone
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    _assert_no_hooks(model)
    assert monitor._kept == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_in_training_step_leaves_no_hooks(error):
    class Failing(DigitsClassifier):
        def training_step(self, batch, batch_idx):
            if self.global_step >= 3:
                raise error("boom")
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = Failing(arch="mlp", hidden=(12, 8), lr=0.05)
    monitor = _cheap()
    expected = SystemExit if error is KeyboardInterrupt else RuntimeError
    with _sigint_restored(), pytest.raises(expected):
        _small_fit([monitor], model=model, max_steps=6)
    _assert_no_hooks(model)
    assert "training_step" not in model.__dict__
    assert all(m.training for m in model.modules())
    assert monitor._kept == []


def test_training_step_loss_bypasses_the_penalty_wrapper():
    """With VNEPenalty(inject=True) on the model, the monitor's loss is the module's own
    training_step: the penalty logs the same values with and without the monitor."""
    from lightning_spectral.callbacks.penalty import VNEPenalty

    def run(with_monitor: bool) -> MemoryLogger:
        torch.manual_seed(0)
        model = _model()
        callbacks = [VNEPenalty("features", alpha=0.1)]
        if with_monitor:
            callbacks.append(_cheap())
        log = _small_fit(callbacks, model=model, logger=MemoryLogger())
        assert "training_step" not in model.__dict__
        return log

    alone, watched = run(False), run(True)
    assert watched.series("vne_penalty/vne/features") == alone.series("vne_penalty/vne/features")
    assert sorted(alone.series("vne_penalty/vne/features")) == [0, 1, 2, 3]
    assert [s for s, _ in _hessian_rows(watched)] == [2, 4]


def test_noise_failure_warning_says_what_is_logged():
    model = _bn_dropout_module().train()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.rand(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen))
    monitor = CurvatureMonitor(k=1, trace_probes=0, noise_samples=4, mode="train")
    with pytest.warns(SpectralWarning, match="objective-noise") as caught:
        out = monitor.compute(model, lr=0.1, batches=[batch])
    message = next(str(w.message) for w in caught if issubclass(w.category, SpectralWarning))
    assert "eigenvalues, trace and loss as computed" in message
    assert math.isfinite(float(out["hessian/eig_1"]))


def test_attention_hessian_through_the_math_kernel_in_eval_mode():
    """The fused attention kernels have no second derivative: the monitor runs the math kernel,
    which gives the same loss and gradient as the fused one, and finite curvature."""
    from lightning_spectral.callbacks.curvature import math_attention

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    head = torch.nn.Linear(16, 3)
    model = torch.nn.ModuleDict({"layer": layer, "head": head})
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(layer(x).mean(1)), y)

    params = list(model.parameters())
    fused = torch.autograd.grad(loss(), params)
    with math_attention():
        math_grads = torch.autograd.grad(loss(), params)
    for a, b in zip(fused, math_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monitor = CurvatureMonitor(k=1, trace_probes=2, noise_samples=0, loss="cross_entropy")
    lit = torch.nn.Module()
    lit.forward = lambda inp: head(layer(inp).mean(1))  # type: ignore[method-assign]
    lit.layer, lit.head = layer, head
    out = monitor.compute(lit, batches=[(x, y)])
    assert math.isfinite(float(out["hessian/eig_1"])) and math.isfinite(float(out["hessian/trace"]))


# ----------------------------------------------------------------------------- which=


class _Saddle(pl.LightningModule):
    """``loss = ½ Σ d_i θ_i²`` with a known diagonal Hessian ``diag(1, −5, 0.5, 0.2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.register_buffer("d", torch.tensor([1.0, -5.0, 0.5, 0.2], dtype=torch.float64))

    def saddle_loss(self, batch) -> torch.Tensor:
        return 0.5 * (self.d * self.theta**2).sum()

    def training_step(self, batch, batch_idx):
        return self.saddle_loss(batch) + 0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_which_picks_the_largest_or_the_largest_magnitude_eigenvalues():
    batch = (torch.zeros(2, 1),)
    out = {}
    for which in ("largest", "magnitude"):
        monitor = CurvatureMonitor(k=2, trace_probes=0, noise_samples=0, loss="saddle_loss",
                                   tol=1e-12, which=which)
        values = monitor.compute(_Saddle(), step=0, batches=[batch])
        out[which] = [float(values["hessian/eig_1"]), float(values["hessian/eig_2"])]
    assert out["largest"] == pytest.approx([1.0, 0.5], abs=1e-12)
    assert out["magnitude"] == pytest.approx([-5.0, 1.0], abs=1e-12)  # PyHessian's top-2


def test_which_magnitude_is_what_a_fit_logs():
    log = MemoryLogger()
    monitor = CurvatureMonitor(every_n_steps=2, k=2, trace_probes=0, noise_samples=0,
                               loss="saddle_loss", tol=1e-12, which="magnitude")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=log, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    data = DataLoader(TensorDataset(torch.zeros(4, 1, dtype=torch.float64)), batch_size=2)
    trainer.fit(_Saddle(), train_dataloaders=data)
    rows = [m for _, m in log.records if "hessian/eig_1" in m]
    assert len(rows) == 1
    assert [rows[0]["hessian/eig_1"], rows[0]["hessian/eig_2"]] == pytest.approx([-5.0, 1.0])


def test_which_is_validated_and_in_the_state_key_only_when_not_the_default():
    with pytest.raises(SpectralConfigError, match="which must be one of"):
        CurvatureMonitor(which="smallest")
    # the key of checkpoints written before ``which`` existed: they still resume
    assert CurvatureMonitor().state_key == (
        "CurvatureMonitor{'every_n_steps': 500, 'k': 5, 'loss': 'training_step', "
        "'batches': 1, 'mode': 'eval'}"
    )
    assert CurvatureMonitor(which="largest").state_key == CurvatureMonitor().state_key
    assert CurvatureMonitor(which="magnitude").state_key != CurvatureMonitor().state_key
