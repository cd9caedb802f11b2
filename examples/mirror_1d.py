# smoke: --steps 200
# smoke: --lightning --steps 100
"""Two- and three-layer absolute-value networks approach their convex optimum.

See docs/definitions.md#mirrors.

Trains a :class:`lightning_spectral.MirrorNet` of depth 2 and of depth 3 on a 1-D regression
problem with exactly the objective of docs/definitions.md#mirrors-depth2 / #mirrors-depth3
(full batch, Adam), and tracks the
certificate ``convex_gap`` = (J(network) − J*) / J*, where J* is the optimum of the equivalent
Lasso with reflection features. Prints the optimum of each depth and the final gaps; with
``--out DIR`` it also saves the gap curves and the overlay figure (network, Lasso solution and
its breakpoints) as PNG files.

    python examples/mirror_1d.py --out docs/images          # one to two minutes on 2 CPU cores
    python examples/mirror_1d.py --steps 300                # quick look
    python examples/mirror_1d.py --lightning                # the MirrorCertificate callback
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lightning_spectral.functional.mirrors import (
    MirrorNet,
    convex_gap,
    lasso_mirror_fit,
    network_objective,
)
from lightning_spectral.plots import new_figure
from lightning_spectral.plots.mirrors import mirror_overlay


def make_data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A target with a mirror symmetry: y = 2·||x − 0.1| − 0.45| + noise, x in [−1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.sort(torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1).values
    y = 2 * torch.abs(torch.abs(x - 0.1) - 0.45) + 0.05 * torch.randn(
        n, generator=gen, dtype=torch.float64)
    return x, y


def train(depth: int, x: torch.Tensor, y: torch.Tensor, beta: float, steps: int, width: int,
          fit, every: int = 25, seed: int = 0) -> tuple[MirrorNet, list[int], list[float]]:
    net = MirrorNet(width, depth, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-4)
    at, gaps = [], []
    for step in range(1, steps + 1):
        opt.zero_grad()
        network_objective(net, x, y, beta).backward()
        opt.step()
        sched.step()
        if step % every == 0 or step == 1:
            at.append(step)
            gaps.append(convex_gap(net, x, y, beta, fit=fit))
    return net, at, gaps


def run_lightning(x: torch.Tensor, y: torch.Tensor, beta: float, steps: int, width: int) -> None:
    """The same training under Lightning with the MirrorCertificate callback."""
    from torch.utils.data import DataLoader, TensorDataset

    try:  # either Lightning flavour
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl

    from lightning_spectral import MirrorCertificate

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = MirrorNet(width, 3, generator=torch.Generator().manual_seed(0))

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return network_objective(self.net, xb, yb, beta)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(x.float()[:, None], y.float()[:, None]),
                      batch_size=len(x))
    trainer = pl.Trainer(max_steps=steps,
                         callbacks=[MirrorCertificate(every_n_steps=50, beta=beta)],
                         enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir="runs_mirror")
    trainer.fit(Regressor(), data)
    print("TensorBoard logs under runs_mirror/: tensorboard --logdir runs_mirror")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--width", type=int, default=40)
    p.add_argument("--out", type=Path, default=None, help="folder for the PNG figures")
    p.add_argument("--lightning", action="store_true", help="train under Lightning instead")
    args = p.parse_args()

    x, y = make_data(args.n)
    if args.lightning:
        run_lightning(x, y, args.beta, args.steps, args.width)
        return
    fits, curves, nets = {}, {}, {}
    for depth in (2, 3):
        t0 = time.perf_counter()
        fits[depth] = lasso_mirror_fit(x, y, args.beta, depth)
        f = fits[depth]
        print(f"depth {depth}: dictionary {f.params.shape[0]} features, Lasso optimum "
              f"J* = {f.objective:.6g} (rel. duality gap {f.gap / f.objective:.1e}, "
              f"{f.support.numel()} active features, solved in {time.perf_counter() - t0:.2f} s)")
    print(f"reflection features lower the optimum by "
          f"{100 * (1 - fits[3].objective / fits[2].objective):.1f} % (depth 3 vs depth 2)")
    for depth in (2, 3):
        nets[depth], at, gaps = train(depth, x, y, args.beta, args.steps, args.width,
                                      fits[depth])
        curves[depth] = (at, gaps)
        print(f"depth {depth}: gap after {at[0]} step: {gaps[0]:.3g}, after {at[-1]} steps: "
              f"{gaps[-1]:.3g} (minimum over training {min(gaps):.3g}, never below −tol)")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        fig, ax = new_figure(figsize=(6.0, 3.6))
        for depth, (at, gaps) in curves.items():
            ax.semilogy(at, np.maximum(gaps, 1e-12), label=f"depth {depth}")
        ax.set_xlabel("Adam step (full batch)")
        ax.set_ylabel("convex gap (J − J*) / J*")
        ax.set_title(f"1-D regression, n = {args.n}, β = {args.beta:g}")
        ax.legend()
        fig.savefig(args.out / "mirror_gap.png", dpi=110)
        xs = x.numpy()
        grid = torch.linspace(float(x.min()) - 0.05, float(x.max()) + 0.05, 400,
                              dtype=torch.float64)
        for depth in (2, 3):
            with torch.no_grad():
                f_net = nets[depth](grid).numpy()
            fig = mirror_overlay(xs, y.numpy(), grid.numpy(), f_net,
                                 fits[depth].predict(grid).numpy(),
                                 fits[depth].breakpoints().numpy(),
                                 nets[depth].breakpoints().numpy(),
                                 title=f"depth {depth}: network after {args.steps} steps vs "
                                       f"Lasso optimum")
            fig.savefig(args.out / f"mirror_overlay_depth{depth}.png", dpi=110)
        print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
