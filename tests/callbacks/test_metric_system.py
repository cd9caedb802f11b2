"""The callbacks join Lightning's metric system: callback_metrics (EarlyStopping,
ModelCheckpoint, the progress bar), one namespace per instance, Lightning's logging step."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import CollapseMonitor, SpectralMonitor, VNEPenalty
from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.testing import MemoryLogger

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(LightningModule):
    def __init__(self, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.classifier = nn.Linear(12, 3)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class CallRecorder(MemoryLogger):
    """Every (tag, step) written, with repetitions."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: Counter[tuple[str, int]] = Counter()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        for tag in metrics:
            self.writes[(tag, int(step or 0))] += 1


# ------------------------------------------------------------------------ EarlyStopping & co
def test_early_stopping_on_a_collapse_metric(make_trainer):
    stop = EarlyStopping(monitor="collapse/nc1", mode="min", patience=0, min_delta=10.0,
                         check_on_train_epoch_end=True)
    trainer = make_trainer([CollapseMonitor(head="classifier"), stop], max_epochs=10)
    trainer.fit(Net(), loader())
    # nc1 cannot improve by 10 in one epoch: the run stops after the second epoch
    assert trainer.current_epoch == 2 and stop.stopped_epoch == 1
    assert isinstance(trainer.callback_metrics["collapse/nc1"], torch.Tensor)


def test_early_stopping_on_a_layer_vne(make_trainer):
    stop = EarlyStopping(monitor="vne/features.0", mode="max", patience=1, min_delta=5.0,
                         check_on_train_epoch_end=True)
    monitor = SpectralMonitor(every_n_steps=2, weights=False, histograms=False, figures=False)
    trainer = make_trainer([monitor, stop], max_epochs=20)
    trainer.fit(Net(), loader())
    assert trainer.current_epoch < 20 and stop.stopped_epoch > 0
    assert "vne/features.0" in trainer.callback_metrics


def test_model_checkpoint_on_a_layer_erank(make_trainer, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="erank/classifier", mode="max",
                           save_top_k=2, every_n_train_steps=4)
    monitor = SpectralMonitor(every_n_steps=2, weights=False, histograms=False, figures=False)
    trainer = make_trainer([monitor, ckpt], max_steps=12, enable_checkpointing=True)
    trainer.fit(Net(), loader())
    assert ckpt.best_model_path and len(ckpt.best_k_models) == 2
    scores = [float(s) for s in ckpt.best_k_models.values()]
    assert all(s >= 1.0 for s in scores)  # effective ranks, not a default
    assert float(ckpt.best_model_score) == max(scores)


def test_prog_bar_shows_chosen_tags(make_trainer):
    monitor = SpectralMonitor(every_n_steps=1, weights=False, histograms=False, figures=False,
                              prog_bar=["erank/*"])
    trainer = make_trainer([monitor], max_steps=2)
    trainer.fit(Net(), loader())
    bar = trainer.progress_bar_metrics
    assert "erank/classifier" in bar and "erank/features.0" in bar
    assert "vne/classifier" not in bar


# ------------------------------------------------------------------------ namespaces
def test_no_tag_step_written_twice(make_trainer):
    logger = CallRecorder()
    callbacks = [
        SpectralMonitor(every_n_steps=1, layers=["features", "classifier"], histograms=False,
                        figures=False),
        VNEPenalty("features", alpha=0.0),  # the same layer as the monitor
        CollapseMonitor(head="classifier"),
        CollapseMonitor(head="classifier", source="val"),
    ]
    trainer = make_trainer(callbacks, logger=logger, max_epochs=2, accumulate_grad_batches=2,
                           limit_val_batches=2, log_every_n_steps=1)
    trainer.fit(Net(), loader(n=128), loader(n=32))
    trainer.validate(Net(), loader(n=32))
    lightnings_own = {"epoch", "train_loss", "val_loss"}  # Lightning writes "epoch" per group
    repeated = {key: n for key, n in logger.writes.items()
                if n > 1 and key[0] not in lightnings_own}
    assert not repeated, repeated
    tags = {tag for tag, _ in logger.writes}
    assert {"vne/features", "vne_penalty/vne/features", "vne_penalty/features"} <= tags
    assert {"collapse/nc1", "collapse_val/nc1"} <= tags


def test_two_instances_need_distinct_prefixes(make_trainer):
    a = SpectralMonitor(every_n_steps=1, layers="features.*", weights=False, figures=False)
    b = SpectralMonitor(every_n_steps=3, layers="classifier", weights=False, figures=False)
    with pytest.raises(SpectralConfigError, match="distinct prefix"):
        make_trainer([a, b], max_steps=1).fit(Net(), loader())
    logger = MemoryLogger()
    b = SpectralMonitor(every_n_steps=3, layers="classifier", weights=False, figures=False,
                        prefix="head/")
    make_trainer([a, b], max_steps=4, logger=logger).fit(Net(), loader())
    assert sorted(logger.series("head/vne/classifier")) == [0, 3]
    assert sorted(logger.series("vne/features.0")) == [0, 1, 2, 3]
    assert "vne/classifier" not in logger.tags()


def test_collapse_train_and_val_in_one_trainer(make_trainer):
    logger = MemoryLogger()
    train = CollapseMonitor(head="classifier")
    val = CollapseMonitor(head="classifier", source="val")
    make_trainer([train, val], logger=logger, max_epochs=2, limit_val_batches=2).fit(
        Net(), loader(), loader(n=32)
    )
    assert len(logger.series("collapse/nc1")) == 2 == len(logger.series("collapse_val/nc1"))
    assert logger.series("collapse/nc1") != logger.series("collapse_val/nc1")


# ------------------------------------------------------------------------ the x-axis
class TwoOptimizers(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.features.parameters(), lr=0.1),
                torch.optim.SGD(self.classifier.parameters(), lr=0.1)]


def test_logged_at_lightnings_step_with_two_optimizers(make_trainer):
    logger = MemoryLogger()
    monitor = SpectralMonitor(every_n_steps=2, weights=False, histograms=False, figures=False)
    trainer = make_trainer([monitor], logger=logger, max_epochs=1, log_every_n_steps=1)
    trainer.fit(TwoOptimizers(), loader())  # 4 batches, global_step advances 2 per batch
    assert trainer.global_step == 8
    own = sorted(logger.series("train_loss"))
    assert own == [0, 1, 2, 3]  # Lightning's own self.log: one step per batch
    # the schedule counts optimizer steps (global_step 0, 2, 4, 6 = batches 0..3); the values
    # are logged at the batch step Lightning uses, inside the same axis as train_loss
    assert sorted(logger.series("vne/features.0")) == [0, 1, 2, 3]
