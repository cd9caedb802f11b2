"""Sharded-strategy helper for test_sharded.py (run as a script; not collected by pytest).

Two CPU processes (gloo) train the same seeded MLP under ``ModelParallelStrategy`` (FSDP2,
``fully_shard`` on every Linear) or DDP, with SpectralMonitor, CollapseMonitor and VNEPenalty;
rank zero's CSVLogger holds the logged values. Usage: ``python sharded_script.py OUT KIND``
with KIND ``fsdp2`` or ``ddp``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import CollapseMonitor, SpectralMonitor, VNEPenalty


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.classifier = nn.Linear(16, 3)

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for module in (self.features[0], self.features[2], self.classifier):
                fully_shard(module, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main(out: Path, kind: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 16, generator=g), torch.randint(0, 3, (128,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    strategy = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                if kind == "fsdp2" else DDPStrategy())
    callbacks = [
        SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, figures=False,
                        histograms=False),
        CollapseMonitor(head="classifier", interplay_budget=1.0),  # every epoch compared
        VNEPenalty("features", alpha=0.0),
    ]
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=6, callbacks=callbacks,
        logger=CSVLogger(str(out), name=kind, version=0), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(Net(), loader)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
