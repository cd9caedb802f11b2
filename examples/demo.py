"""``make demo``: watch the spectra of a digits MLP and a digits CNN while they train.

Trains ``DigitsClassifier(arch="mlp")`` and ``DigitsClassifier(arch="cnn")`` on scikit-learn's
bundled 8×8 digits (no download) for a few epochs with :class:`SpectralMonitor` and
:class:`CollapseMonitor` attached, writes
TensorBoard logs to ``runs/mlp`` and ``runs/cnn``, and prints the command that opens them.
The three lines a user adds to an existing trainer are marked ``# <-``.

    python examples/demo.py [--every 5] [--out runs] [--epochs N]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

#: per architecture: (epochs, learning rate) that reach a sensible accuracy in seconds
RECIPES = {"mlp": (6, 2e-3), "cnn": (10, 2e-2)}


def train(arch: str, out: Path, every: int, epochs: int | None = None) -> Path:
    """Train one digits model with the monitor on; returns its TensorBoard log directory."""
    import lightning.pytorch as pl

    from lightning_spectral import CollapseMonitor, SpectralMonitor  # <- 1. import
    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

    default_epochs, lr = RECIPES[arch]
    epochs = epochs or default_epochs
    torch.manual_seed(0)
    model = DigitsClassifier(arch=arch, hidden=(128, 64), lr=lr)
    train_loader, val_loader = digits_dataloaders(batch_size=64, image=arch == "cnn")
    monitor = SpectralMonitor(every_n_steps=every, weights_every_n_steps=2 * every)  # <- 2.
    monitor.figure_budget = 0.15  # a demo wants pictures; the default keeps figures under 1 %
    if (out / arch).exists():  # a re-run replaces the demo's own previous logs
        shutil.rmtree(out / arch)
    logger = pl.loggers.TensorBoardLogger(str(out), name=arch, version="")
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[monitor, CollapseMonitor(head="classifier")],  # <- 3. attach
        log_every_n_steps=every,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, train_loader, val_loader)
    acc = trainer.callback_metrics.get("val_acc")
    print(f"[{arch}] {trainer.global_step} steps, val_acc={float(acc):.3f}, logs: {logger.log_dir}")
    return Path(logger.log_dir)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: 6 (MLP), 10 (CNN)")
    parser.add_argument("--every", type=int, default=5, help="SpectralMonitor every_n_steps")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    # tiny models: one intra-op thread is faster than two (less synchronisation per op)
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = {arch: train(arch, args.out, args.every, args.epochs) for arch in ("mlp", "cnn")}
    print(f"trained both models in {time.perf_counter() - start:.1f} s")
    print(f"\nOpen the dashboard:\n    tensorboard --logdir {args.out}\n")

    # `make demo` then gates these runs on the command line, as a CI job would:
    #     lightning-spectral check runs/mlp runs/cnn --rules examples/gates.toml
    return runs


if __name__ == "__main__":
    main()
