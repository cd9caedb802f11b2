"""CollapseMonitor(source="train_eval"): one no-grad, eval-mode pass over the training set with
the end-of-epoch weights; equal to the functional on a reference forward, invisible to
training (weights, RNG streams, modes, other callbacks' captures), DDP-consistent."""

from __future__ import annotations

import copy
import csv
import math
import random
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_spectral import capture as capture_module
from lightning_spectral.callbacks.collapse import CollapseMonitor
from lightning_spectral.capture import LayerCapture
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError, SpectralWarning
from lightning_spectral.functional.collapse import neural_collapse
from lightning_spectral.functional.interplay import information_interplay
from lightning_spectral.testing import MemoryLogger

pytestmark = pytest.mark.usefixtures("one_thread")

NS = "collapse_train_eval/"


# ----------------------------------------------------------------------------- helpers
class Net(pl.LightningModule):
    """``6 → 8`` Linear, BatchNorm, ReLU, Dropout → ``head``: eval mode changes the features
    (running statistics, no dropout), so a pass in training mode would be visible."""

    def __init__(self, classes: int = 4, lr: float = 0.1, dict_batch: bool = False,
                 norm: bool = True, dropout: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8) if norm else nn.Identity(),
                                  nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(8, classes)
        self.lr = lr
        self.dict_batch = dict_batch
        self.logged = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _xy(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (batch["x"], batch["y"]) if self.dict_batch else (batch[0], batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._xy(batch)
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        self.logged += 1
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Augmented(Dataset):
    """Draws from torch's, Python's and NumPy's global RNGs in ``__getitem__`` (a random
    augmentation), as many real datasets do."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, noise: float = 0.1,
                 dict_batch: bool = False) -> None:
        self.x, self.y, self.noise, self.dict_batch = x, y, noise, dict_batch

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        jitter = self.noise * (torch.randn(self.x.shape[1]) + random.random()
                               + float(np.random.rand()))
        x = self.x[i] + jitter
        return {"x": x, "y": self.y[i]} if self.dict_batch else (x, self.y[i])


def make_data(n: int = 80, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 2 * torch.randn(classes, 6, generator=g)[y] + torch.randn(n, 6, generator=g)
    return x, y


def shuffled(dataset: Dataset, batch_size: int = 16) -> DataLoader:
    # no generator of its own: the sampler draws from the global RNG, the hardest case
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def make_trainer(callbacks: list, epochs: int = 2, **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", MemoryLogger())
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
        devices=kw.pop("devices", 1), deterministic=True, **kw,
    )


def events(logger: MemoryLogger, ns: str = NS) -> list[tuple[int, dict[str, float]]]:
    return [(s, m) for s, m in logger.records if any(k.startswith(ns) for k in m)]


class Snapshots(pl.Callback):
    """A copy of the weights at every training epoch end (listed after the monitor)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.flags: list[list[bool]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append(copy.deepcopy(pl_module.state_dict()))
        self.flags.append([m.training for m in pl_module.modules()])


def reference(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              norm: bool = True) -> dict[str, float]:
    """The metrics of the training set's features under ``state``, computed outside Lightning:
    an eval-mode forward and the functional."""
    model = Net(norm=norm)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        h = model.body(x).double()
    w, b = model.head.weight.detach().double(), model.head.bias.detach().double()
    out = {k: float(v) for k, v in neural_collapse(h, y, w, b).items()}
    inter = information_interplay(h, w, y)
    out["mir"], out["hdr"] = float(inter["mir"]), float(inter["hdr"])
    return out


def assert_matches(logged: dict[str, float], ref: dict[str, float]) -> None:
    assert sorted(logged) == sorted(NS + k for k in ref)
    for key, val in ref.items():
        tol = 1e-4 if key in ("mir", "hdr") else 1e-6
        assert logged[NS + key] == pytest.approx(val, rel=tol, abs=1e-7), key


# ----------------------------------------------------------------------------- correctness
def test_equals_the_functional_on_the_training_set_with_the_end_of_epoch_weights():
    x, y = make_data()
    snaps, logger = Snapshots(), MemoryLogger()
    torch.manual_seed(0)
    model = Net()
    mon = CollapseMonitor(head="head", source="train_eval", interplay_budget=1.0)
    make_trainer([mon, snaps], epochs=3, logger=logger).fit(
        model, shuffled(TensorDataset(x, y))
    )
    logged = events(logger)
    assert [s for s, _ in logged] == [5, 10, 15]  # Lightning's step at each epoch end
    assert len(snaps.states) == 3
    for (_, values), state in zip(logged, snaps.states, strict=True):
        assert_matches(values, reference(state, x, y))
    assert [e for e, _ in mon.history] == [0, 1, 2]
    assert mon.namespace == "collapse_train_eval"
    assert not any(k.startswith("collapse/") for _, m in logger.records for k in m)
    assert model.head._forward_pre_hooks == {}  # removed at teardown


def test_head_auto_and_max_batches_take_the_first_samples_in_dataset_order():
    x, y = make_data(n=90)
    snaps, logger = Snapshots(), MemoryLogger()
    torch.manual_seed(1)
    # 3 × 16 = the first 48 samples
    mon = CollapseMonitor(source="train_eval", max_batches=3, interplay_budget=1.0)
    make_trainer([mon, snaps], epochs=2, logger=logger).fit(
        Net(), shuffled(TensorDataset(x, y))
    )
    assert mon.head_name == "head"
    (_, last) = events(logger)[-1]
    assert_matches(last, reference(snaps.states[-1], x[:48], y[:48]))
    whole = reference(snaps.states[-1], x, y)
    assert last[NS + "nc1"] != pytest.approx(whole["nc1"], rel=1e-6)


def test_training_is_bit_identical_and_no_rng_stream_is_consumed():
    """Shuffled loader on the global RNG, a dataset drawing from torch/random/NumPy, dropout
    and BatchNorm: with and without the monitor, the same weights, buffers and RNG states."""
    x, y = make_data()

    def run(callbacks: list) -> tuple[dict[str, torch.Tensor], Any, Any, Any]:
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        model = Net()
        make_trainer(callbacks, epochs=3).fit(model, shuffled(Augmented(x, y)))
        return (copy.deepcopy(model.state_dict()), torch.get_rng_state(), random.getstate(),
                np.random.get_state())

    plain = run([])
    snaps = Snapshots()
    watched = run([CollapseMonitor(source="train_eval"), snaps])
    for key, value in plain[0].items():
        assert torch.equal(value, watched[0][key]), key
    assert torch.equal(plain[1], watched[1])
    assert plain[2] == watched[2]
    assert plain[3][0] == watched[3][0] and np.array_equal(plain[3][1], watched[3][1])
    assert all(all(flags) for flags in snaps.flags)  # training mode is back after the pass


def test_mixed_module_modes_are_restored_exactly():
    x, y = make_data(n=48)

    class Freeze(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.body[3].eval()  # a frozen dropout: one module in eval mode

    snaps = Snapshots()
    make_trainer([Freeze(), CollapseMonitor(source="train_eval"), snaps]).fit(
        Net(), shuffled(TensorDataset(x, y))
    )
    want = [name != "body.3" for name, _ in Net().named_modules()]
    assert snaps.flags == [want, want]


def test_other_captures_are_paused_during_the_pass():
    """A capture that records every training forward of the epoch sees exactly the training
    samples: the pass's forwards (also through the same head) are not recorded."""
    x, y = make_data(n=64)

    class Watcher(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[int] = []
            self.count = 0

        def setup(self, trainer, pl_module, stage):
            self.capture = LayerCapture(pl_module, layers=["head"], pre=True, sink=self._sink)
            self.capture.attach()

        def _sink(self, name: str, rows: torch.Tensor) -> None:
            self.count += rows.shape[0]

        def on_train_epoch_start(self, trainer, pl_module):
            self.count = 0
            self.capture.start()

        def on_train_epoch_end(self, trainer, pl_module):  # after the monitor's pass
            self.capture.stop()
            self.rows.append(self.count)

        def teardown(self, trainer, pl_module, stage):
            self.capture.remove()

    watcher = Watcher()
    logger = MemoryLogger()
    monitor = CollapseMonitor(source="train_eval", interplay_budget=1.0)
    make_trainer([monitor, watcher], logger=logger).fit(
        Net(), shuffled(TensorDataset(x, y))
    )
    assert watcher.rows == [64, 64]
    assert len(events(logger)) == 2
    assert capture_module._PAUSED == [0]


def test_streaming_train_source_alongside_is_unchanged():
    x, y = make_data(n=64)

    def train_values(callbacks: list) -> list[tuple[int, dict[str, float]]]:
        torch.manual_seed(3)
        logger = MemoryLogger()
        make_trainer(callbacks, logger=logger).fit(Net(), shuffled(TensorDataset(x, y)))
        return events(logger, "collapse/")

    alone = train_values([CollapseMonitor()])
    together = train_values([CollapseMonitor(), CollapseMonitor(source="train_eval")])
    assert alone == together


# ----------------------------------------------------------------------------- eval_step
def test_eval_step_training_step_and_method_on_dict_batches():
    x, y = make_data(n=48)

    class DictNet(Net):
        def features_and_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self(batch["x"])

    results = {}
    for step in ("training_step", "features_and_logits"):
        torch.manual_seed(2)
        model, snaps, logger = DictNet(dict_batch=True), Snapshots(), MemoryLogger()
        model.log_calls = []
        model.log = lambda *a, **k: model.log_calls.append(a[0])  # noqa: B023
        mon = CollapseMonitor(labels="y", source="train_eval", eval_step=step, interplay_budget=1.0)
        make_trainer([mon, snaps], logger=logger).fit(
            model, shuffled(Augmented(x, y, noise=0.0, dict_batch=True))
        )
        assert_matches(events(logger)[-1][1], reference(snaps.states[-1], x, y))
        results[step] = model
    # 3 training batches × 2 epochs; the pass's training_step calls (3 per epoch) did not log
    assert results["features_and_logits"].logged == 6
    assert results["training_step"].logged == 12
    assert all(len(m.log_calls) == 6 for m in results.values())


def test_forward_that_does_not_fit_the_batch_is_nan_and_one_warning_naming_eval_step():
    x, y = make_data(n=48)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([CollapseMonitor(labels="y", source="train_eval")], logger=logger).fit(
            Net(dict_batch=True), shuffled(Augmented(x, y, dict_batch=True))
        )
    ours = [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)
            and "train_eval pass failed" in str(w.message)]
    assert len(ours) == 1 and "TypeError" in ours[0] and "eval_step" in ours[0]
    logged = events(logger)
    assert len(logged) == 2 and all(math.isnan(v) for _, m in logged for v in m.values())
    assert capture_module._PAUSED == [0]


def test_strict_raises_and_leaves_the_model_as_found():
    x, y = make_data(n=48)
    model = Net(dict_batch=True)
    mon = CollapseMonitor(labels="y", source="train_eval", strict=True)
    with pytest.raises(SpectralComputeError, match="train_eval pass failed"):
        make_trainer([mon]).fit(model, shuffled(Augmented(x, y, dict_batch=True)))
    assert all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert capture_module._PAUSED == [0] and not mon._own_pass


def test_keyboard_interrupt_in_the_pass_leaves_the_model_and_rng_as_found():
    x, y = make_data(n=48)

    class Interrupted(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:  # only the monitor's pass runs in eval mode
                torch.rand(3)  # a draw the restored RNG state must undo
                raise KeyboardInterrupt
            return super().forward(x)

    model = Interrupted()
    model.body[3].eval()
    flags = [m.training for m in model.modules()]
    mon = CollapseMonitor(head="head", source="train_eval")

    class RngAtEpochEnd(pl.Callback):  # listed first: the state just before the pass
        def on_train_epoch_end(self, trainer, pl_module):
            self.state = torch.get_rng_state()

    probe = RngAtEpochEnd()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            make_trainer([probe, mon]).fit(model, shuffled(TensorDataset(x, y)))
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after an interrupt
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), probe.state)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert capture_module._PAUSED == [0] and not mon._own_pass and not mon.hooks_attached


def test_configuration():
    assert CollapseMonitor(source="train_eval").namespace == "collapse_train_eval"
    keys = {CollapseMonitor(source=s).state_key for s in ("train", "val", "train_eval")}
    assert len(keys) == 3
    for bad in ({"max_batches": 0}, {"source": "train_eval", "max_batches": 1.5},
                {"max_batches": 2}, {"eval_step": "training_step"},
                {"source": "train_eval", "eval_step": ""}):
        with pytest.raises(SpectralConfigError):
            CollapseMonitor(**bad)
    mon = CollapseMonitor(source="train_eval", eval_step="no_such_method")
    with pytest.raises(SpectralConfigError, match="has no method 'no_such_method'"):
        make_trainer([mon]).fit(Net(), shuffled(TensorDataset(*make_data(n=32))))
    # three sources, three namespaces: no collision in one Trainer
    x, y = make_data(n=32)
    logger = MemoryLogger()
    make_trainer([CollapseMonitor(), CollapseMonitor(source="train_eval")], epochs=1,
                 logger=logger).fit(Net(), shuffled(TensorDataset(x, y)))
    assert len(events(logger, "collapse/")) == len(events(logger)) == 1


def test_resume_continues_the_history(tmp_path):
    x, y = make_data(n=48)
    data = DataLoader(TensorDataset(x, y), batch_size=16)

    def fit(epochs: int, where: str, ckpt: str | None = None):
        torch.manual_seed(0)
        logger, mon = MemoryLogger(), CollapseMonitor(source="train_eval", interplay_budget=1.0)
        ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / where, save_last=True)
        make_trainer([mon, ckpt_cb], epochs=epochs, logger=logger,
                     enable_checkpointing=True).fit(Net(dropout=0.0), data, ckpt_path=ckpt)
        return mon, logger

    full_mon, full_log = fit(4, "a")
    fit(2, "b")
    resumed_mon, resumed_log = fit(4, "c", ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert resumed_mon.history == full_mon.history
    assert events(resumed_log) == events(full_log)[2:]


# ----------------------------------------------------------------------------- DDP
def _read_csv(log_dir: Path) -> dict[str, float]:
    with open(log_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: float(v) for row in rows for k, v in row.items()
            if k.startswith(NS) and v not in ("", None)}


@pytest.mark.slow
def test_ddp_two_ranks_evaluate_their_shards_and_equal_one_process(tmp_path):
    """67 samples (shards of 34 and 33, no padding), lr = 0, no BatchNorm (whose running
    statistics differ across DDP ranks): the all-reduced statistics of two gloo ranks equal
    one process and the reference forward."""
    x, y = make_data(n=67)

    def run(devices: int, name: str) -> dict[str, float]:
        torch.manual_seed(0)
        logger = CSVLogger(tmp_path, name=name, version=0)
        kw: dict[str, Any] = {"devices": devices}
        if devices > 1:
            kw["strategy"] = "ddp_spawn"
        make_trainer([CollapseMonitor(head="head", source="train_eval")], epochs=1,
                     logger=logger, **kw).fit(Net(lr=0.0, norm=False),
                                              shuffled(TensorDataset(x, y), 8))
        return _read_csv(Path(logger.log_dir))

    single = run(1, "single")
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        ddp = run(2, "ddp")
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    torch.manual_seed(0)
    ref = reference(Net(lr=0.0, norm=False).state_dict(), x, y, norm=False)
    assert sorted(single) == sorted(ddp) == sorted(NS + k for k in ref)
    for key, val in ref.items():
        tol = 1e-4 if key in ("mir", "hdr") else 1e-6
        assert single[NS + key] == pytest.approx(val, rel=tol, abs=1e-7), key
        assert ddp[NS + key] == pytest.approx(single[NS + key], rel=tol, abs=1e-7), key
