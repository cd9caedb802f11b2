"""DDP helper for test_spectral_monitor.py (run as a script; not collected by pytest).

Two CPU processes (gloo) train a seeded digits MLP with SpectralMonitor; each rank writes
``rank<r>.json`` with the rows its monitor used at the last event (the gathered union) and
``input<r>.pt`` with the inputs of its first training forward; rank zero's CSVLogger holds the
logged values. Usage: ``python spectral_ddp_script.py OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import SpectralMonitor
from lightning_spectral.demos import DigitsClassifier, load_digits_tensors


def main(out: Path) -> None:
    torch.set_num_threads(1)
    x, y, _, _ = load_digits_tensors()
    data = TensorDataset(x[:128], y[:128])
    loader = DataLoader(data, batch_size=16, shuffle=False)
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32, 16))
    seen: list[torch.Tensor] = []

    def record_input(module, args, output):
        if module.training and not seen:
            seen.append(args[0].detach().clone())

    model.features[1].register_forward_hook(record_input)
    monitor = SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, figures=False,
                              histograms=False)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, callbacks=[monitor],
        logger=CSVLogger(str(out), name="csv", version=0),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, loader)
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps(monitor.last_event))
    torch.save(seen[0], out / f"input{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
