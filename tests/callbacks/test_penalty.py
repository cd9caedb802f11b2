"""Tests of VNEPenalty (docs/definitions.md#vne-penalty): gradients, restoration, composition."""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks import penalty as penalty_mod
from lightning_spectral.callbacks.penalty import VNEPenalty, reduce_rows, vne_penalty_term
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError, SpectralWarning
from lightning_spectral.testing import MemoryLogger

# --------------------------------------------------------------------------- helpers


class GradGrab(Callback):
    """Copies the gradients seen at each optimizer step (before the update)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
             if p.grad is not None}
        )


class TinyNet(LightningModule):
    """``features = Linear(8, width) → Tanh``; ``head = Linear(width, 3)``; SGD."""

    def __init__(self, width: int = 48, output: str = "tensor", manual: bool = False,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(nn.Linear(8, width), nn.Tanh())
        self.head = nn.Linear(width, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.to(dtype)
        self.output = output
        self.automatic_optimization = not manual
        self.explicit: VNEPenalty | None = None  # set for the explicit form (inject=False)
        self.fail_at: int | None = None

    def task_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.features(x)), y)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = self.task_loss(x, y)
        if self.explicit is not None:
            loss = loss + self.explicit.term(self)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        if self.output == "dict":
            return {"loss": loss, "batch_size": len(x)}
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_data(dtype: torch.dtype = torch.float32, n: int = 64, seed: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen).to(dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def make_trainer(callbacks: list[Any], max_steps: int = 1, logger: Any = False,
                 **kwargs: Any) -> Trainer:
    return Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger, accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )


def dense_vne(h: torch.Tensor) -> torch.Tensor:
    """Independent float64 VNE: eigenvalues of the d×d autocorrelation, masked p log p."""
    z = h / h.norm(dim=1, keepdim=True)
    c = z.T @ z / h.shape[0]
    lam = torch.linalg.eigvalsh(c).clamp_min(0)
    lam = torch.where(lam > lam.max().detach() * len(lam) * 2.0**-52, lam, torch.zeros_like(lam))
    p = lam / lam.sum()
    p = p[p > 0]
    return -(p * p.log()).sum()


def scipy_vne(h: np.ndarray) -> float:
    z = h / np.linalg.norm(h, axis=1, keepdims=True)
    lam = scipy.linalg.eigvalsh(z.T @ z / len(z))
    lam = lam[lam > lam.max() * len(lam) * 2.0**-52]
    p = lam / lam.sum()
    return float(-(p * np.log(p)).sum())


def hand_grads(model: TinyNet, batches: list[tuple[torch.Tensor, torch.Tensor]], alpha: float,
               accumulate: int = 1) -> dict[str, torch.Tensor]:
    """Gradient of ``Σ (L_task − α·VNE(h)) / accumulate`` over micro-batches, by hand."""
    m = copy.deepcopy(model)
    total = torch.zeros((), dtype=torch.float64)
    for x, y in batches:
        h = m.features(x)
        total = total + (F.cross_entropy(m.head(h), y) - alpha * dense_vne(h)) / accumulate
    names = [n for n, _ in m.named_parameters()]
    grads = torch.autograd.grad(total, [p for _, p in m.named_parameters()])
    return dict(zip(names, grads, strict=True))


def batches(loader: DataLoader, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, b in enumerate(loader):
        if i == k:
            break
        out.append(b)
    return out


def hooks_and_keys(model: LightningModule) -> tuple[set[str], list[int]]:
    """The instance attributes and hook counts of every submodule (what a fit may not change).

    ``hparams`` is touched first: Lightning itself creates ``_hparams`` lazily during fit.
    """
    _ = model.hparams
    counts = [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
              for m in model.modules()]
    return set(model.__dict__), counts


# --------------------------------------------------------------------------- the term itself


def test_term_known_values_and_scipy() -> None:
    # isotropic rows ±e_j: VNE = log d (docs/definitions.md#vne-values); term = −α log d
    d = 6
    h = torch.cat([torch.eye(d), -2.0 * torch.eye(d)]).double().requires_grad_()
    term, value, ok = vne_penalty_term([h], alpha=0.2)
    assert bool(ok)
    assert value.item() == pytest.approx(math.log(d), abs=1e-12)
    assert term.item() == pytest.approx(-0.2 * math.log(d), abs=1e-12)
    # rank one: VNE = 0
    scales = torch.linspace(-1, 3, 10, dtype=torch.float64)[:, None]
    r1 = torch.randn(1, 5, dtype=torch.float64) * scales
    assert vne_penalty_term([r1], 0.5)[1].item() == pytest.approx(0.0, abs=1e-12)
    # random batch vs scipy; views are averaged
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 7, generator=gen), torch.randn(20, 7, generator=gen)
    t2, v2, _ = vne_penalty_term([a, b], alpha=-0.3)
    want = (scipy_vne(a.double().numpy()) + scipy_vne(b.double().numpy())) / 2
    assert v2.item() == pytest.approx(want, rel=1e-5)
    assert t2.item() == pytest.approx(0.3 * want, rel=1e-5)


def test_term_nonfinite_is_masked_with_zero_gradient() -> None:
    h = torch.randn(16, 4, dtype=torch.float64)
    h[3, 1] = float("nan")
    h.requires_grad_()
    term, value, ok = vne_penalty_term([h], alpha=0.7)
    assert not bool(ok) and math.isnan(value.item()) and term.item() == 0.0
    term.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    # finite input: the gradient is the hand gradient of −α·VNE
    g = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    vne_penalty_term([g], alpha=0.7)[0].backward()
    (ref,) = torch.autograd.grad(-0.7 * dense_vne(g), g)
    torch.testing.assert_close(g.grad, ref, rtol=1e-9, atol=1e-12)


def test_reduce_rows_conv_and_tokens() -> None:
    conv = nn.Conv2d(2, 3, 3)
    out = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(reduce_rows(conv, out), out.mean(dim=(2, 3)))
    lin = nn.Linear(2, 6)
    tok = torch.randn(4, 7, 6)
    assert torch.equal(reduce_rows(lin, (tok, None)), tok.reshape(28, 6))
    assert reduce_rows(lin, "not a tensor") is None


# --------------------------------------------------------------------------- with a Trainer


@pytest.mark.parametrize(("alpha", "output"), [(0.3, "tensor"), (-0.4, "dict")])
def test_injected_gradient_equals_hand_gradient_float64(alpha: float, output: str) -> None:
    model = TinyNet(output=output, dtype=torch.float64)
    loader = make_data(torch.float64)
    want = hand_grads(model, batches(loader, 1), alpha)
    plain = hand_grads(model, batches(loader, 1), 0.0)
    grab, log = GradGrab(), MemoryLogger()
    make_trainer([VNEPenalty("features", alpha=alpha), grab], logger=log).fit(model, loader)
    got = grab.grads[0]
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)
    # the penalty really contributes (the test can fail)
    diff = max((want[n] - plain[n]).abs().max().item() for n in want)
    assert diff > 1e-4
    # logged values: VNE of the first batch (scipy, float64) and −α·VNE
    assert log.series("vne_penalty/vne/features")[0] == pytest.approx(
        scipy_vne(first_features(loader)), rel=1e-9)
    assert log.series("vne_penalty/features")[0] == pytest.approx(
        -alpha * log.series("vne_penalty/vne/features")[0], rel=1e-12)


def first_features(loader: DataLoader) -> np.ndarray:
    model = TinyNet(dtype=torch.float64)  # same seed, same initial weights
    with torch.no_grad():
        return model.features(batches(loader, 1)[0][0]).numpy()


def test_gradient_accumulation_penalises_each_micro_batch_float64() -> None:
    alpha = 0.25
    model = TinyNet(dtype=torch.float64)
    loader = make_data(torch.float64)
    want = hand_grads(model, batches(loader, 2), alpha, accumulate=2)
    grab, log = GradGrab(), MemoryLogger()
    trainer = make_trainer([VNEPenalty("features", alpha=alpha), grab], logger=log,
                           accumulate_grad_batches=2)
    trainer.fit(model, loader)
    assert len(grab.grads) == 1
    for name in want:
        torch.testing.assert_close(grab.grads[0][name], want[name], rtol=1e-9, atol=1e-12)
    # one logged value for the optimizer step: the mean over its two micro-batches
    fresh = TinyNet(dtype=torch.float64)
    with torch.no_grad():
        vals = [scipy_vne(fresh.features(x).numpy()) for x, _ in batches(loader, 2)]
    assert log.series("vne_penalty/vne/features") == {0: pytest.approx(sum(vals) / 2, rel=1e-9)}


def test_manual_optimization_raises_with_inject_and_works_with_term() -> None:
    model = TinyNet(manual=True, dtype=torch.float64)
    keys, hooks = hooks_and_keys(model)
    with pytest.raises(SpectralConfigError, match=r"inject=False.*term\(self\)"):
        make_trainer([VNEPenalty("features", alpha=0.3)]).fit(model, make_data(torch.float64))
    assert hooks_and_keys(model) == (keys, hooks)

    alpha = 0.3
    model = TinyNet(manual=True, dtype=torch.float64)
    loader = make_data(torch.float64)
    want = hand_grads(model, batches(loader, 1), alpha)
    penalty, grab = VNEPenalty("features", alpha=alpha, inject=False), GradGrab()
    model.explicit = penalty
    make_trainer([penalty, grab]).fit(model, loader)
    for name in want:
        torch.testing.assert_close(grab.grads[0][name], want[name], rtol=1e-9, atol=1e-12)


def test_explicit_term_with_automatic_optimization_and_misuse() -> None:
    alpha = -0.2
    model = TinyNet(dtype=torch.float64)
    loader = make_data(torch.float64)
    want = hand_grads(model, batches(loader, 1), alpha)
    penalty, grab = VNEPenalty("features", alpha=alpha, inject=False), GradGrab()
    model.explicit = penalty
    make_trainer([penalty, grab]).fit(model, loader)
    for name in want:
        torch.testing.assert_close(grab.grads[0][name], want[name], rtol=1e-9, atol=1e-12)
    # forgetting to call term() is reported once
    with pytest.warns(SpectralWarning, match=r"term\(\) was not called") as caught:
        make_trainer([VNEPenalty("features", inject=False)], max_steps=2).fit(
            TinyNet(), make_data())
    assert sum(issubclass(w.category, SpectralWarning) for w in caught) == 1
    with pytest.raises(SpectralConfigError, match="before the callback was set up"):
        VNEPenalty("features", inject=False).term(model)
    with pytest.raises(SpectralConfigError, match="inject=False"):
        VNEPenalty("features").term(model)


def test_alpha_zero_is_bit_identical_to_no_callback() -> None:
    def run(callbacks: list[Any]) -> dict[str, torch.Tensor]:
        model = TinyNet()
        make_trainer(callbacks, max_steps=4).fit(model, make_data())
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    log = MemoryLogger()
    base = run([])
    with_cb = run([VNEPenalty("features", alpha=0.0)])
    moved = run([VNEPenalty("features", alpha=0.1)])
    assert all(torch.equal(base[n], with_cb[n]) for n in base)
    assert not all(torch.equal(base[n], moved[n]) for n in base)  # the comparison can fail
    del log


def test_every_n_steps_and_logging_schedule() -> None:
    log = MemoryLogger()
    make_trainer([VNEPenalty("features", alpha=0.1, every_n_steps=2)], max_steps=5, logger=log,
                 log_every_n_steps=2).fit(TinyNet(), make_data(n=160))
    assert sorted(log.series("vne_penalty/vne/features")) == [0, 2, 4]
    assert sorted(log.series("vne_penalty/features")) == [0, 2, 4]
    for step, value in log.series("vne_penalty/vne/features").items():
        assert 0 < value <= math.log(32)
        assert log.series("vne_penalty/features")[step] == pytest.approx(-0.1 * value, rel=1e-6)


def test_tensorboard_scalars_and_layout(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    make_trainer([VNEPenalty("features", alpha=-0.1)], max_steps=3, logger=logger,
                 log_every_n_steps=50).fit(TinyNet(), make_data(n=96))
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0")).Reload()
    assert [e.step for e in acc.Scalars("vne_penalty/vne/features")] == [0, 1, 2]
    pen = [e.value for e in acc.Scalars("vne_penalty/features")]
    vals = [e.value for e in acc.Scalars("vne_penalty/vne/features")]
    assert pen == pytest.approx([0.1 * v for v in vals], rel=1e-6)
    assert "custom_scalars" in str(acc.Tags())


class Poison(nn.Module):
    """Identity, or NaN everywhere while ``on`` (like a masked fill: its Jacobian stays finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(torch.full_like(x, self.on, dtype=torch.bool), float("nan"))


class SideNet(TinyNet):
    """The task loss does not use ``side``; ``side``'s output is only penalised."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Sequential(nn.Linear(8, 16), Poison())

    def task_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.side(x)
        return super().task_loss(x, y)


def test_nonfinite_vne_skips_penalty_and_warns_once() -> None:
    model = SideNet()
    model.side[1].on = True
    before = model.side[0].weight.detach().clone()
    log = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([VNEPenalty("side", alpha=0.5)], max_steps=3, logger=log,
                     log_every_n_steps=1).fit(model, make_data(n=96))
    ours = [w for w in caught if issubclass(w.category, SpectralWarning)]
    assert len(ours) == 1 and "not finite" in str(ours[0].message)
    # nothing reached the side layer: its weights are unchanged and finite
    assert torch.equal(model.side[0].weight, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isnan(v) for v in log.series("vne_penalty/vne/side").values())
    assert set(log.series("vne_penalty/side").values()) == {0.0}


def test_nan_vne_on_finite_input_leaves_training_as_alpha_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = penalty_mod.vne
    monkeypatch.setattr(penalty_mod, "vne", lambda h, normalize=True: real(h, normalize) * np.nan)

    def run(alpha: float) -> dict[str, torch.Tensor]:
        model = TinyNet()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpectralWarning)
            make_trainer([VNEPenalty("features", alpha=alpha)], max_steps=3).fit(model, make_data())
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    poisoned, zero = run(0.5), run(0.0)
    assert all(torch.equal(poisoned[n], zero[n]) for n in zero)


def test_nonfinite_strict_raises_and_restores() -> None:
    model = SideNet()
    model.side[1].on = True
    keys, hooks = hooks_and_keys(model)
    with pytest.raises(SpectralComputeError, match="not finite"):
        make_trainer([VNEPenalty("side", alpha=0.5, strict=True)]).fit(model, make_data())
    assert hooks_and_keys(model) == (keys, hooks)


def test_missing_layer_lists_module_names() -> None:
    model = TinyNet()
    with pytest.raises(SpectralConfigError,
                       match=r"'encoder' matches no module.*features\.0.*head"):
        make_trainer([VNEPenalty("encoder")]).fit(model, make_data())
    # a glob must name exactly one module
    with pytest.raises(SpectralConfigError, match=r"'features\.\*' matches 2 modules"):
        make_trainer([VNEPenalty("features.*")]).fit(model, make_data())


def test_constructor_validation() -> None:
    with pytest.raises(SpectralConfigError):
        VNEPenalty("features", alpha=float("nan"))
    with pytest.raises(SpectralConfigError):
        VNEPenalty("features", every_n_steps=0)
    with pytest.raises(SpectralConfigError):
        VNEPenalty(3)  # type: ignore[arg-type]
    a, b = VNEPenalty("a"), VNEPenalty("b")
    assert a.state_key != b.state_key


def test_module_restored_after_fit_and_after_exception() -> None:
    model = TinyNet()
    keys, hooks = hooks_and_keys(model)
    assert not any(hooks)
    make_trainer([VNEPenalty("features", alpha=0.1)], max_steps=2).fit(model, make_data())
    assert hooks_and_keys(model) == (keys, hooks)
    assert "training_step" not in model.__dict__

    model.fail_at = 1
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer([VNEPenalty("features", alpha=0.1)], max_steps=3).fit(model, make_data())
    assert hooks_and_keys(model) == (keys, hooks)

    # a training_step the user had set on the instance is put back as it was
    model.fail_at = None
    own = model.training_step
    model.training_step = own
    make_trainer([VNEPenalty("features", alpha=0.1)], max_steps=1).fit(model, make_data())
    assert model.__dict__["training_step"] is own


def test_bf16_mixed_computes_vne_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[torch.dtype, bool]] = []
    real = penalty_mod.vne

    def spy(h: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        seen.append((h.dtype, torch.is_autocast_enabled("cpu")))
        return real(h, normalize)

    monkeypatch.setattr(penalty_mod, "vne", spy)
    grab, log = GradGrab(), MemoryLogger()
    model = TinyNet()
    make_trainer([VNEPenalty("features", alpha=0.2), grab], max_steps=2, logger=log,
                 precision="bf16-mixed", log_every_n_steps=1).fit(model, make_data())
    assert seen and all(dtype == torch.float32 and not autocast for dtype, autocast in seen)
    assert all(math.isfinite(v) and v > 0 for v in log.series("vne_penalty/vne/features").values())
    assert all(torch.isfinite(g).all() for g in grab.grads[0].values())


def test_composes_with_another_forward_hook() -> None:
    # a second, detaching observer on the same module (what SpectralMonitor's capture does)
    alpha = 0.3
    model = TinyNet(dtype=torch.float64)
    loader = make_data(torch.float64)
    want = hand_grads(model, batches(loader, 1), alpha)
    seen: list[torch.Tensor] = []
    handle = model.features.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    grab = GradGrab()
    make_trainer([VNEPenalty("features", alpha=alpha), grab]).fit(model, loader)
    handle.remove()
    assert len(seen) == 1
    for name in want:
        torch.testing.assert_close(grab.grads[0][name], want[name], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_digits_vne_ordering_minus_zero_plus() -> None:
    """VNE⁻ lowers and VNE⁺ raises the held-out representation entropy.

    See docs/definitions.md#vne-penalty.
    """
    from lightning.pytorch import seed_everything

    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders, load_digits_tensors
    from lightning_spectral.functional import vne

    alpha, final = 0.1, {}
    _, _, x_test, _ = load_digits_tensors(seed=0)
    for a in (-alpha, 0.0, alpha):
        seed_everything(0, verbose=False)
        model = DigitsClassifier(arch="mlp", hidden=(128, 64))
        train, _ = digits_dataloaders(batch_size=64, seed=0)
        Trainer(max_epochs=1, callbacks=[VNEPenalty("features", alpha=a)], logger=False,
                accelerator="cpu", devices=1, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False).fit(model, train)
        with torch.no_grad():
            final[a] = float(vne(model.features(x_test), dtype="float64"))
    assert final[-alpha] < final[0.0] < final[alpha], final


def test_composes_with_spectral_monitor() -> None:
    spectral = pytest.importorskip("lightning_spectral.callbacks.spectral")
    alpha = 0.3
    model = TinyNet(dtype=torch.float64)
    loader = make_data(torch.float64)
    want = hand_grads(model, batches(loader, 1), alpha)
    monitor = spectral.SpectralMonitor(every_n_steps=1, layers="features", weights=False,
                                       histograms=False, figures=False)
    grab, log = GradGrab(), MemoryLogger()
    keys, hooks = hooks_and_keys(model)
    make_trainer([monitor, VNEPenalty("features", alpha=alpha), grab], logger=log,
                 log_every_n_steps=1).fit(model, loader)
    for name in want:
        torch.testing.assert_close(grab.grads[0][name], want[name], rtol=1e-9, atol=1e-12)
    # each writes its own tag: the monitor vne/features, the penalty vne_penalty/vne/features
    monitor_vne = log.series("vne/features")[0]
    penalty_vne = log.series("vne_penalty/vne/features")[0]
    assert monitor_vne == pytest.approx(penalty_vne, rel=1e-5)
    assert sum("vne/features" in m for step, m in log.records if step == 0) == 1
    assert hooks_and_keys(model) == (keys, hooks)


# --------------------------------------------------------------------------- lifecycle


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name or "<root>"


@contextlib.contextmanager
def sigint_restored() -> Iterator[None]:
    """Lightning ignores SIGINT after a KeyboardInterrupt; put the test process's handler back."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("inject", [True, False])
def test_reused_callback_starts_a_fresh_schedule_and_resume_continues_it(
    inject: bool, tmp_path: Any
) -> None:
    penalty = VNEPenalty("features", alpha=0.1, every_n_steps=2, inject=inject)
    logs = []
    for _ in range(2):  # the same callback, a new Trainer and a new model each time
        model, log = TinyNet(), MemoryLogger()
        if not inject:
            model.explicit = penalty
        trainer = make_trainer([penalty], max_steps=3, logger=log, log_every_n_steps=1)
        trainer.fit(model, make_data(n=160))
        logs.append(sorted(log.series("vne_penalty/vne/features")))
    assert logs == [[0, 2], [0, 2]]
    # only a ckpt_path resume continues the schedule: step 3 is not due, step 4 is
    ckpt = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed, model, log = VNEPenalty("features", alpha=0.1, every_n_steps=2, inject=inject), \
        TinyNet(), MemoryLogger()
    if not inject:
        model.explicit = resumed
    make_trainer([resumed], max_steps=6, logger=log, log_every_n_steps=1).fit(
        model, make_data(n=160), ckpt_path=ckpt)
    assert sorted(log.series("vne_penalty/vne/features")) == [4]


class Interrupted(TinyNet):
    """Raises ``error`` in training_step once ``global_step`` reaches ``fail_at``."""

    def __init__(self, error: type[BaseException], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise self.error("interrupted")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("inject", [True, False])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_fit_removes_hooks_and_wrapper_and_writes_completed_steps(
    inject: bool, error: type[BaseException]
) -> None:
    model, log = Interrupted(error), MemoryLogger()
    model.fail_at = 2
    penalty = VNEPenalty("features", alpha=0.1, inject=inject)
    if not inject:
        model.explicit = penalty
    trainer = make_trainer([penalty], max_steps=5, logger=log, log_every_n_steps=50)
    expected = SystemExit if error is KeyboardInterrupt else RuntimeError
    with sigint_restored(), pytest.raises(expected):  # Lightning: KeyboardInterrupt -> exit(1)
        trainer.fit(model, make_data(n=160))
    assert_no_hooks(model)
    assert "training_step" not in model.__dict__
    assert not penalty.hooks_attached
    # the two completed steps are written although log_every_n_steps was not reached
    assert sorted(log.series("vne_penalty/vne/features")) == [0, 1]


class MetricsForward(TinyNet):
    """``training_step`` calls ``term()`` and then runs the layer again for a metric."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = self.task_loss(x, y) + self.explicit.term(self)
        with torch.no_grad():
            acc = (self.head(self.features(x)).argmax(1) == y).float().mean()
        self.seen_acc = float(acc)
        return loss


@pytest.mark.parametrize("accumulate", [1, 2])
def test_term_called_then_layer_runs_again_does_not_warn(accumulate: int) -> None:
    alpha = 0.3
    model = MetricsForward(dtype=torch.float64)
    loader = make_data(torch.float64)
    want = hand_grads(model, batches(loader, accumulate), alpha, accumulate=accumulate)
    penalty, grab, log = VNEPenalty("features", alpha=alpha, inject=False), GradGrab(), \
        MemoryLogger()
    model.explicit = penalty
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([penalty, grab], logger=log, accumulate_grad_batches=accumulate).fit(
            model, loader)
    ours = [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)]
    assert ours == []
    # the penalty covers the forward before term() only
    for name in want:
        torch.testing.assert_close(grab.grads[0][name], want[name], rtol=1e-9, atol=1e-12)
    assert list(log.series("vne_penalty/vne/features")) == [0]


class FrozenSide(TinyNet):
    """``side`` is frozen and sees only data: its output does not require grad."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(8, 16).requires_grad_(False)

    def task_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.side(x)
        return super().task_loss(x, y)


def test_warnings_state_the_true_consequence() -> None:
    # a finite VNE of an output without grad: logged as computed, not "as NaN"
    log = MemoryLogger()
    with pytest.warns(SpectralWarning, match="does not require grad") as caught:
        make_trainer([VNEPenalty("side", alpha=0.2)], max_steps=2, logger=log,
                     log_every_n_steps=1).fit(FrozenSide(), make_data())
    messages = [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)]
    assert len(messages) == 1
    assert "logged as NaN" not in messages[0] and "logged as computed" in messages[0]
    assert all(math.isfinite(v) and v > 0 for v in log.series("vne_penalty/vne/side").values())


def test_layer_that_does_not_run_is_reported_without_claiming_nan() -> None:
    class Unused(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(8, 4)

    log = MemoryLogger()
    with pytest.warns(SpectralWarning, match="did not run") as caught:
        make_trainer([VNEPenalty("unused", alpha=0.2)], max_steps=2, logger=log).fit(
            Unused(), make_data())
    messages = [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)]
    assert len(messages) == 1 and "logged as NaN" not in messages[0]
    assert "nothing was logged" in messages[0]
    assert "vne_penalty/vne/unused" not in log.tags()
