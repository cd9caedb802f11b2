"""Choose between ``lightning.pytorch`` and ``pytorch_lightning``.

Following einops' backend rule, the flavour is picked by what the user already imported
(``sys.modules``), never by importing a framework the user did not ask for:

1. ``LIGHTNING_SPECTRAL_BACKEND`` = ``lightning`` or ``pytorch_lightning`` forces one;
2. else the flavour already imported wins (``lightning.pytorch`` first if both are);
3. else ``lightning.pytorch`` if installed, then ``pytorch_lightning``.

Lightning calls callback hooks by name, so a callback built on one flavour also runs under the
other flavour's ``Trainer``; the flavour matters for ``isinstance`` checks such as
``LightningCLI``'s ``class_path`` validation.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from typing_extensions import override

_FLAVOURS = ("lightning.pytorch", "pytorch_lightning")


def _choose() -> str:
    forced = os.environ.get("LIGHTNING_SPECTRAL_BACKEND", "").strip()
    if forced:
        name = "lightning.pytorch" if forced in ("lightning", "lightning.pytorch") else forced
        if name not in _FLAVOURS:
            raise ImportError(
                f"LIGHTNING_SPECTRAL_BACKEND={forced!r}: expected 'lightning' or "
                "'pytorch_lightning'"
            )
        return name
    for name in _FLAVOURS:
        if name in sys.modules:
            return name
    for name in _FLAVOURS:
        root = name.split(".")[0]
        if importlib.util.find_spec(root) is not None:
            return name
    raise ImportError(
        "lightning_spectral needs PyTorch Lightning: pip install pytorch-lightning (or lightning)"
    )


FLAVOUR: str = _choose()
pl: ModuleType = importlib.import_module(FLAVOUR)
if TYPE_CHECKING:
    # the type checker reads the declared dependency's classes; both flavours define the same
    # hooks with the same signatures, so the annotations hold for either at run time
    from pytorch_lightning import Callback, LightningModule, Trainer
    from pytorch_lightning.utilities.types import STEP_OUTPUT
else:
    STEP_OUTPUT = Any
    Callback = pl.Callback
    LightningModule = pl.LightningModule
    Trainer = pl.Trainer
rank_zero_only = importlib.import_module(f"{FLAVOUR}.utilities").rank_zero_only

__all__ = [
    "FLAVOUR",
    "pl",
    "Callback",
    "LightningModule",
    "Trainer",
    "STEP_OUTPUT",
    "override",
    "rank_zero_only",
]
