"""CurvatureMonitor: logs the SPEC.md §6.4 quantities and never perturbs training."""

from __future__ import annotations

import math
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
                                  mode="train")
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
