# requires: extra=demos  (lightning_spectral.demos reads scikit-learn's digits)
# smoke: --epochs 2 --every 1 --logdir ""
"""Neural collapse on the digits MLP: train well past zero training error and watch it happen.

    python examples/collapse_digits.py                 # 600 epochs, ~5 minutes on 1 core
    python examples/collapse_digits.py --epochs 50     # quick look
    tensorboard --logdir runs                          # the "collapse" custom-scalars category

``CollapseMonitor`` reads the classifier head's input (the 64-dimensional penultimate features)
during the training passes and logs NC1–NC4 (docs/definitions.md#collapse) and MIR/HDR
(#mir-hdr) every
``--every`` epochs. The script prints a table of the logged values next to the training
accuracy; ``--out`` writes it as markdown (docs/collapse.md holds a measured one).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

try:  # either Lightning flavour; import it before lightning_spectral, which follows it
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from lightning_spectral import CollapseMonitor
from lightning_spectral.demos import DigitsClassifier, digits_dataloaders, load_digits_tensors

COLUMNS = ("nc1", "nc2_etf", "nc2_etf_w", "nc3", "nc4", "mir", "hdr")


class CollapseClassifier(DigitsClassifier):
    """The digits MLP trained with SGD (momentum 0.9) on the MSE to one-hot targets or on CE.

    Under MSE loss neural collapse is reached quickly and robustly (Han, Papyan & Donoho, ICLR
    2022); with cross-entropy on the digits NC1 plateaus around 0.5 within a few hundred epochs.
    """

    def __init__(self, loss: str = "mse", lr: float = 0.1, weight_decay: float = 1e-4) -> None:
        super().__init__(arch="mlp", hidden=(128, 64), lr=lr, weight_decay=weight_decay)
        self.loss = loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.loss == "mse":
            target = torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
            return torch.nn.functional.mse_loss(logits, target)
        return torch.nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
        )


class TrainAccuracy(pl.Callback):
    """Training-set accuracy at the monitor's epochs (eval mode restored afterwards)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.values: dict[int, float] = {}
        x, y, _, _ = load_digits_tensors()
        self.x, self.y = x, y

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            pred = pl_module(self.x.to(pl_module.device)).argmax(dim=1).cpu()
        pl_module.train(was_training)
        self.values[epoch] = float((pred == self.y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=600)
    p.add_argument("--every", type=int, default=10, help="log every n epochs")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 = polite on a shared box)"
    )
    p.add_argument("--logdir", default="runs", help="TensorBoard directory ('' for none)")
    p.add_argument("--out", type=Path, default=None, help="write the table as markdown")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, _ = digits_dataloaders(batch_size=args.batch_size, seed=0)
    model = CollapseClassifier(loss=args.loss, lr=args.lr, weight_decay=args.weight_decay)
    # a study of the dynamics: MIR/HDR at every logged epoch, whatever they cost on this tiny
    # model (the default budget keeps the monitor within 2 % of the fit's time instead)
    monitor = CollapseMonitor(head="classifier", every_n_epochs=args.every, interplay_budget=1.0)
    acc = TrainAccuracy(args.every)
    rows: list[tuple[int, int, float, dict[str, float]]] = []

    class Collect(pl.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if (trainer.current_epoch + 1) % args.every == 0:
                rows.append(
                    (
                        trainer.current_epoch + 1,
                        trainer.global_step,
                        acc.values.get(trainer.current_epoch, math.nan),
                        dict(monitor.last_metrics),
                    )
                )

    logger: Any = (
        pl.loggers.TensorBoardLogger(args.logdir, name="collapse_digits") if args.logdir else False
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor, acc, Collect()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*logging interval.*")
        trainer.fit(model, train)
    elapsed = time.perf_counter() - t0

    header = "| epoch | step | train acc | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (3 + len(COLUMNS))]
    for epoch, step, train_acc, m in rows:
        vals = " | ".join(f"{m.get('collapse/' + k, math.nan):.4g}" for k in COLUMNS)
        lines.append(f"| {epoch} | {step} | {train_acc:.4f} | {vals} |")
    table = "\n".join(lines)
    print(table)
    first, last = rows[0][3], rows[-1][3]
    summary = (
        f"\nNC1 {first['collapse/nc1']:.3g} → {last['collapse/nc1']:.3g} "
        f"(×{first['collapse/nc1'] / last['collapse/nc1']:.0f} smaller); "
        f"MIR {first['collapse/mir']:.3f} → {last['collapse/mir']:.3f} "
        f"(collapse value for C = 10: 0.952); HDR {first['collapse/hdr']:.3f} → "
        f"{last['collapse/hdr']:.3f}. {args.epochs} epochs in {elapsed:.0f} s."
    )
    print(summary)
    if args.out:
        args.out.write_text(table + "\n" + summary + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
