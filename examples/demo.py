# requires: extra=demos  (lightning_spectral.demos reads scikit-learn's digits)
# smoke: --epochs 1 --out runs_smoke
"""``make demo``: watch the spectra of a digits MLP and a digits CNN while they train.

Trains ``DigitsClassifier(arch="mlp")`` and ``DigitsClassifier(arch="cnn")`` on scikit-learn's
bundled 8×8 digits (no download) for a few epochs with :class:`SpectralMonitor` and
:class:`CollapseMonitor` attached, writes
TensorBoard logs to ``runs/mlp`` and ``runs/cnn``, and prints the command that opens them.
The three lines a user adds to an existing trainer are marked ``# <-``.

    python examples/demo.py [--every 5] [--out runs] [--epochs N] [--record-baseline DIR]

``make demo`` then gates both runs (``examples/gates.toml``) and compares each with the run
recorded in ``examples/baselines/`` (``examples/regression.toml``, ``--baseline``). After an
intended change of the demo's training, record new baselines with
``python examples/demo.py --record-baseline examples/baselines`` (it writes
``DIR/mlp/metrics.csv`` and ``DIR/cnn/metrics.csv``: every scalar the runs logged, exactly).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import torch

#: per architecture: (epochs, learning rate) that reach a sensible accuracy in seconds
RECIPES = {"mlp": (6, 2e-3), "cnn": (10, 2e-2)}


def train(arch: str, out: Path, every: int, epochs: int | None = None) -> Path:
    """Train one digits model with the monitor on; returns its TensorBoard log directory."""
    try:  # either Lightning flavour
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl

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


def record_baseline(run: Path, path: Path) -> Path:
    """Write every scalar of ``run`` to ``path`` as a CSVLogger-style ``metrics.csv`` (a
    ``step`` column, one column per tag, empty cells where a tag was not logged), which
    ``lightning-spectral check --baseline`` reads. Values are written exactly (the float32
    values of the event files, as Python's shortest float64 repr)."""
    from lightning_spectral.gate import read_run

    scalars = read_run(run).scalars
    tags = sorted(t for t in scalars if t != "hp_metric")
    rows: dict[int, dict[str, float]] = {}
    for tag in tags:
        for step, value in zip(scalars[tag].steps.tolist(), scalars[tag].values.tolist(),
                               strict=True):
            rows.setdefault(step, {})[tag] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["step", *tags])
        for step in sorted(rows):
            writer.writerow([step, *(repr(rows[step][t]) if t in rows[step] else ""
                                     for t in tags)])
    return path


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: 6 (MLP), 10 (CNN)")
    parser.add_argument("--every", type=int, default=5, help="SpectralMonitor every_n_steps")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--record-baseline", type=Path, metavar="DIR", default=None,
                        help="also write each run's scalars to DIR/<arch>/metrics.csv, the "
                        "baselines `make demo` compares with (examples/baselines)")
    args = parser.parse_args(argv)
    # tiny models: one intra-op thread is faster than two (less synchronisation per op)
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = {arch: train(arch, args.out, args.every, args.epochs) for arch in ("mlp", "cnn")}
    print(f"trained both models in {time.perf_counter() - start:.1f} s")
    if args.record_baseline is not None:
        for arch, log_dir in runs.items():
            path = record_baseline(log_dir, args.record_baseline / arch / "metrics.csv")
            print(f"[{arch}] recorded the baseline {path}")
    print(f"\nOpen the dashboard:\n    tensorboard --logdir {args.out}\n")

    # `make demo` then gates these runs on the command line, as a CI job would:
    #     lightning-spectral check runs/mlp runs/cnn --rules examples/gates.toml
    #     lightning-spectral check runs/mlp --baseline examples/baselines/mlp \
    #         --rules examples/regression.toml          (and the same for cnn)
    return runs


if __name__ == "__main__":
    main()
