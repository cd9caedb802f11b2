"""Small, self-contained models and data for examples, tests and benchmarks.

Data: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), which ships inside the
package and needs no download. Nothing here touches the global RNG: splits and shuffling use
their own seeded generators.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral._compat import LightningModule, override

__all__ = ["load_digits_tensors", "digits_dataloaders", "DigitsClassifier"]


def load_digits_tensors(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: digits scaled to [0, 1], shape ``(n, 64)``.

    The split is a seeded permutation (its own generator); labels are int64 in ``[0, 10)``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the dev extra
        raise ImportError(
            "the digits demos need scikit-learn: pip install 'lightning-spectral[demos]'"
        ) from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def digits_dataloaders(
    batch_size: int = 64, seed: int = 0, image: bool = False, test_fraction: float = 0.25
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over the digits; ``image=True`` gives ``(n, 1, 8, 8)``.

    The training loader shuffles with its own generator seeded by ``seed``.
    """
    x_tr, y_tr, x_te, y_te = load_digits_tensors(test_fraction=test_fraction, seed=seed)
    if image:
        x_tr, x_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True,
                       generator=gen)
    val = DataLoader(TensorDataset(x_te, y_te), batch_size=256, shuffle=False)
    return train, val


class DigitsClassifier(LightningModule):
    """A small MLP or CNN for the digits; its classifier head is ``self.classifier``.

    ``arch="mlp"``: ``64 → hidden[0] → hidden[1] → 10`` with ReLU (features: the classifier's
    input). ``arch="cnn"``: two 3×3 convolutions (16, 32 channels), global average pooling,
    ``32 → hidden[-1]`` and the classifier. Inputs may be ``(n, 64)`` or ``(n, 1, 8, 8)``.
    """

    def __init__(
        self,
        arch: str = "mlp",
        hidden: tuple[int, ...] = (128, 64),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if arch == "mlp":
            layers: list[nn.Module] = [nn.Flatten()]
            width = 64
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            self.features = nn.Sequential(*layers)
        elif arch == "cnn":
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(32, hidden[-1]),
                nn.ReLU(),
            )
            width = hidden[-1]
        else:
            raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")
        self.arch = arch
        self.classifier = nn.Linear(width, num_classes)
        self.lr = lr
        self.weight_decay = weight_decay

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch == "cnn" and x.ndim == 2:
            x = x.reshape(-1, 1, 8, 8)
        return self.classifier(self.features(x))

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=stage == "train")
        self.log(f"{stage}_acc", acc, prog_bar=True)
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
