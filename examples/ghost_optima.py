# requires: extra=demos  (lightning_spectral.demos reads scikit-learn's digits)
# smoke: --epochs 1 --every 10
"""Ghost optima: two seeds of the digits MLP, modulo permutations (docs/definitions.md#symmetry).

Trains the digits MLP twice (two seeds) with :class:`~lightning_spectral.CurvatureMonitor`
attached, then

1. counts the permutation-equivalent copies of each optimum (docs/definitions.md#equivalent-optima),
2. measures the loss barrier on the straight line between the two networks before and after
   aligning the second one's hidden units to the first (weight matching),
3. prints the Hessian's top eigenvalues, trace and the objective-noise quantities
   (docs/definitions.md#objective-noise) over
   training, and compares the stationary spread ``σ_i`` with the distance ``δ`` from the
   trained network to its nearest permuted copy (docs/definitions.md#permutation-distance).

Run: ``python examples/ghost_optima.py`` (about a minute on a laptop CPU);
``--epochs``/``--every`` change the length and the monitoring schedule; TensorBoard logs go to
``runs/ghost_optima`` (``tensorboard --logdir runs/ghost_optima``).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch
from torch import nn

try:  # either Lightning flavour; import it before lightning_spectral, which follows it
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl


def train(seed: int, args: argparse.Namespace) -> tuple[nn.Module, list[dict[str, float]]]:
    from lightning_spectral import CurvatureMonitor
    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

    torch.manual_seed(seed)  # the example's own model initialisation
    model = DigitsClassifier(arch="mlp", hidden=tuple(args.hidden), lr=args.lr)
    train_loader, _ = digits_dataloaders(batch_size=args.batch_size, seed=seed)
    csv_logger = pl.loggers.CSVLogger(args.out, name=f"seed{seed}")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=[pl.loggers.TensorBoardLogger(args.out, name=f"seed{seed}"), csv_logger],
        callbacks=[CurvatureMonitor(every_n_steps=args.every, k=args.k, trace_probes=32,
                                    noise_samples=64, batches=1)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, train_loader)
    rows: list[dict[str, float]] = []
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("hessian/eig_1"):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return model, rows


def as_chain(model: nn.Module) -> nn.Sequential:
    """The DigitsClassifier MLP as one Sequential chain (shares the modules)."""
    return nn.Sequential(*model.features, model.classifier).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--every", type=int, default=60, help="CurvatureMonitor every_n_steps")
    p.add_argument("--hidden", type=int, nargs=2, default=(64, 32))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--out", default="runs/ghost_optima")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lightning_spectral.demos import load_digits_tensors
    from lightning_spectral.functional.symmetry import (
        interpolation_barrier,
        permutation_count_log10,
        permutation_distance,
    )

    t0 = time.perf_counter()
    (model_a, rows_a), (model_b, rows_b) = train(0, args), train(1, args)
    train_s = time.perf_counter() - t0
    a, b = as_chain(model_a), as_chain(model_b)
    _, _, x_te, y_te = load_digits_tensors()
    x_tr, y_tr, _, _ = load_digits_tensors()
    loss = nn.functional.cross_entropy
    res_te = interpolation_barrier(a, b, loss, (x_te, y_te), points=11)
    res_tr = interpolation_barrier(a, b, loss, (x_tr, y_tr), points=11)
    with torch.no_grad():
        acc = [float((m(x_te).argmax(1) == y_te).float().mean()) for m in (a, b)]
    delta = float(permutation_distance(a))

    print(f"\n## Ghost optima (digits MLP 64-{args.hidden[0]}-{args.hidden[1]}-10, "
          f"{args.epochs} epochs, two seeds; {train_s:.0f} s of training)\n")
    print(f"- test accuracy: seed 0 {acc[0]:.3f}, seed 1 {acc[1]:.3f}")
    print(f"- log10 equivalent optima: {permutation_count_log10(a):.1f}")
    print(f"- distance to the nearest permuted copy δ, seed 0: {delta:.4f}")
    print("\n| split | barrier before alignment | barrier after alignment | ratio |")
    print("|---|---|---|---|")
    for name, r in (("train", res_tr), ("test", res_te)):
        ratio = r.barrier_after / r.barrier_before if r.barrier_before > 0 else float("nan")
        print(f"| {name} | {r.barrier_before:.4f} | {r.barrier_after:.4f} | {ratio:.3f} |")
    print("\nloss along the line (test), t = 0, 0.1, ..., 1:")
    print("  before:", " ".join(f"{v:.3f}" for v in res_te.losses_before.tolist()))
    print("  after: ", " ".join(f"{v:.3f}" for v in res_te.losses_after.tolist()))

    k = args.k
    print("\n### Hessian and objective noise over training (seed 0)\n")
    head = (["step", "loss"] + [f"λ_{i}" for i in range(1, k + 1)] + ["trace ± SE"]
            + [f"s²_{i}" for i in (1, k)] + [f"β_{i}" for i in (1, k)]
            + [f"σ_{i}" for i in (1, k)])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows_a:
        cells = [f"{int(r['step'])}", f"{r['hessian/loss']:.3f}"]
        cells += [f"{r[f'hessian/eig_{i}']:.3g}" for i in range(1, k + 1)]
        cells += [f"{r['hessian/trace']:.3g} ± {r['hessian/trace_se']:.2g}"]
        for q in ("noise_s2", "beta", "sigma"):
            cells += [f"{r.get(f'hessian/{q}_{i}', math.nan):.3g}" for i in (1, k)]
        print("| " + " | ".join(cells) + " |")
    end_b = rows_b[-1]
    print(f"\nseed 1 at step {int(end_b['step'])}: λ_1 = {end_b['hessian/eig_1']:.3g}, "
          f"trace = {end_b['hessian/trace']:.3g} ± {end_b['hessian/trace_se']:.2g}")
    last = rows_a[-1]
    sig = [last.get(f"hessian/sigma_{i}", math.nan) for i in range(1, k + 1)]
    print(f"\nσ_i at the end (seed 0): {', '.join(f'{s:.3g}' for s in sig)}; δ = {delta:.3g}; "
          f"σ_1/δ = {sig[0] / delta:.3g}")


if __name__ == "__main__":
    main()
