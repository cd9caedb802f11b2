# requires: extra=demos  (lightning_spectral.demos reads scikit-learn's digits)
# smoke: --quick
"""Truncated-SVD compression of the digits MLP and CNN: accuracy against parameter count.

Trains :class:`lightning_spectral.demos.DigitsClassifier` (``arch="mlp"`` and ``"cnn"``) on
scikit-learn's bundled 8×8 digits with a plain Lightning ``Trainer``, then

1. saves a Lightning checkpoint and prints ``lightning-spectral analyze`` of it (the per-matrix
   table, read from the file without the model's code), and
2. compresses each model at several energies ``τ`` (docs/definitions.md#capacity) with
   :func:`lightning_spectral.compression_curve` and prints the measured accuracy against
   parameter count, with the per-layer report at ``τ = 0.9``.

Figures go to ``docs/images/compress_digits_<arch>.png``. CPU only, about a minute on two cores::

    python examples/compress_digits.py [--epochs 30] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

try:  # either Lightning flavour; import it before lightning_spectral, which follows it
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from lightning_spectral import analyze_state_dict, compress, compression_curve
from lightning_spectral.cli import main as cli_main
from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

ENERGIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
ROOT = Path(__file__).resolve().parents[1]


def train(arch: str, epochs: int, seed: int = 0,
          ckpt: Path | None = None) -> tuple[DigitsClassifier, object]:
    """Train the digits model; with ``ckpt``, also save a Lightning checkpoint there."""
    torch.manual_seed(seed)  # an example script owns its process's RNG
    model = DigitsClassifier(arch=arch, lr=3e-3 if arch == "cnn" else 1e-3)
    train_loader, val_loader = digits_dataloaders(batch_size=64, seed=seed, image=arch == "cnn")
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_loader)
    if ckpt is not None:
        trainer.save_checkpoint(ckpt)
    return model, val_loader


def analysis_table(model: torch.nn.Module, energy: float = 0.9) -> str:
    rows = analyze_state_dict(model.state_dict(), energy=energy)
    lines = [f"| weight | shape | σ_max | stable rank | erank | k({energy:g}) | EY rel. error | "
             "param ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {r['sv_max']:.3f} | "
            f"{r['stable_rank']:.2f} | {r['erank']:.2f} | {r['rank_at_energy']} | "
            f"{r['eckart_young_rel_error']:.3f} | {r['param_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="2 epochs, 3 energies, no figures")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args()
    epochs = 2 if args.quick else args.epochs
    energies = (0.5, 0.9, 0.99) if args.quick else ENERGIES
    torch.set_num_threads(min(2, torch.get_num_threads()))

    for arch in ("mlp", "cnn"):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / f"digits_{arch}.ckpt"
            model, val_loader = train(arch, epochs, ckpt=ckpt)
            print(f"\n## {arch.upper()} ({epochs} epochs)\n")
            print(f"$ lightning-spectral analyze digits_{arch}.ckpt --energy 0.9")
            cli_main(["analyze", str(ckpt), "--energy", "0.9"])  # the checkpoint, no model code
        print()
        print(analysis_table(model))
        curve = compression_curve(model, val_loader, energies=energies,
                                  title=f"digits {arch.upper()}: truncated SVD of every layer")
        print()
        print(curve.to_markdown())
        _, report = compress(model, energy=0.9)
        print(f"\nPer-layer report at τ = 0.9 (FLOPs {report.flops_per}):\n")
        print(report.to_markdown())
        if not args.quick:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            path = args.out_dir / f"compress_digits_{arch}.png"
            curve.figure.savefig(path, dpi=110)
            print(f"\nfigure: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
