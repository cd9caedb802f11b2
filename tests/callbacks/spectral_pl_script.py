"""``pytorch_lightning`` helper for test_spectral_monitor.py (run as a script, not collected).

Only ``pytorch_lightning`` is imported before lightning_spectral, so the library must pick that
flavour and never import ``lightning.pytorch``. Prints one JSON line with what was logged.
"""

from __future__ import annotations

import json
import sys

import pytorch_lightning as pl  # first: decides the flavour
import torch

from lightning_spectral import SpectralMonitor
from lightning_spectral._compat import FLAVOUR
from lightning_spectral.demos import DigitsClassifier, digits_dataloaders


class Memory(pl.loggers.logger.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.steps: set[int] = set()

    name = "memory"
    version = 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.tags |= set(metrics)
        self.steps.add(int(step or 0))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, _ = digits_dataloaders(batch_size=32)
    model = DigitsClassifier(hidden=(16, 8))
    logger = Memory()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=logger,
        callbacks=[SpectralMonitor(every_n_steps=2, figures=False)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(model, train)
    print(json.dumps({
        "flavour": FLAVOUR,
        "lightning_pytorch_imported": "lightning.pytorch" in sys.modules,
        "tags": sorted(logger.tags),
        "steps": sorted(logger.steps),
    }))


if __name__ == "__main__":
    main()
