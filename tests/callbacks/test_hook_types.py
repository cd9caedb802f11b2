"""Every Lightning hook a callback defines is marked ``@override`` and typed with Lightning's
classes, so a renamed or re-signed hook upstream is a type error instead of a hook that is
silently never called."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest

import lightning_spectral as ls
from lightning_spectral._compat import Callback
from lightning_spectral.callbacks._base import _SkippedHook

CALLBACKS = [
    ls.SpectralMonitor,
    ls.CollapseMonitor,
    ls.VNEPenalty,
    ls.CurvatureMonitor,
    ls.SpectralAlarm,
    ls.MirrorCertificate,
]

HOOKS = sorted(n for n in dir(Callback) if not n.startswith("_"))


def _overridden(cls: type) -> list[tuple[str, object]]:
    out = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("lightning_spectral"):
            for name, value in vars(klass).items():
                if name in HOOKS and not isinstance(value, _SkippedHook):
                    out.append((f"{klass.__qualname__}.{name}", value))
    return out


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_hooks_are_marked_override(cls: type) -> None:
    hooks = _overridden(cls)
    assert hooks, f"{cls.__name__} defines no Lightning hook"
    missing = []
    for qualname, value in hooks:
        fn = value.fget if isinstance(value, property) else value
        if not getattr(fn, "__override__", False):
            missing.append(qualname)
    assert not missing, f"hooks without @override: {missing}"


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_hook_arguments_use_lightning_types(cls: type) -> None:
    untyped = []
    for qualname, value in _overridden(cls):
        if isinstance(value, property) or not callable(value):
            continue
        params = inspect.signature(value).parameters
        hints = typing.get_type_hints(value, globalns=vars(inspect.getmodule(value)))
        for arg, wanted in (("trainer", "Trainer"), ("pl_module", "LightningModule")):
            if arg in params and getattr(hints.get(arg), "__name__", None) != wanted:
                untyped.append(f"{qualname}({arg}: {hints.get(arg)!r})")
    assert not untyped, f"hook arguments not typed with Lightning's classes: {untyped}"


# ------------------------------------------------------------------ per-batch hooks not used
@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_unused_per_batch_hooks_are_not_dispatched(cls: type) -> None:
    """A per-batch hook the class does not implement reads as ``None`` on an instance, which
    Lightning's dispatch skips; the hooks it implements are ordinary methods."""
    from lightning_spectral.callbacks._base import PER_BATCH_HOOKS, SpectralCallback

    implemented = {n for n, _ in _overridden(cls)}
    obj = object.__new__(cls)  # no constructor arguments needed to read class attributes
    for name in PER_BATCH_HOOKS:
        if any(name == q.rsplit(".", 1)[1] for q in implemented):
            assert callable(getattr(obj, name)), name
        else:
            assert getattr(obj, name) is None, name
            # on the class it is Lightning's no-op: introspection sees a method
            assert getattr(cls, name) is getattr(Callback, name)
    assert issubclass(cls, SpectralCallback)


def test_subclass_hooks_and_super_calls_still_run(tmp_path) -> None:
    """A user subclass implementing a skipped hook is dispatched, and its ``super()`` call (to
    Lightning's no-op) works; Lightning's own override check agrees with both."""
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from lightning_utilities.core.overrides import is_overridden
    from torch.utils.data import DataLoader, TensorDataset

    calls: list[str] = []

    class Counting(ls.SpectralMonitor):
        def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
            calls.append("after_backward")
            super().on_after_backward(trainer, pl_module)

    class Deeper(Counting):  # does not implement it again: inherits the counting one
        pass

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=gen), torch.arange(32) % 3)
    for cls in (Counting, Deeper):
        calls.clear()
        monitor = cls(every_n_steps=2)
        assert is_overridden("on_after_backward", monitor, Callback)
        assert not is_overridden("on_before_backward", monitor, Callback)
        trainer = Trainer(max_steps=3, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False,
                          callbacks=[monitor], default_root_dir=str(tmp_path))
        trainer.fit(Net(), DataLoader(data, batch_size=8))
        assert calls == ["after_backward"] * 3
        assert monitor.last_event is not None  # the monitor itself still ran
