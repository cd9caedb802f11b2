"""Fixtures for the SpectralMonitor tests (tests/callbacks/test_spectral_*.py).

Test files cannot import each other (``--import-mode=importlib``), so shared helpers are handed
out as fixtures: an in-memory logger class and a factory of small, quiet Trainers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from lightning.pytorch import Trainer

from lightning_spectral.testing import MemoryLogger


@pytest.fixture
def memory_logger_cls() -> type[MemoryLogger]:
    return MemoryLogger


@pytest.fixture
def make_trainer(tmp_path) -> Callable[..., Trainer]:
    """``make_trainer(callbacks, **overrides)``: CPU, no progress bar/summary/checkpoints."""

    def factory(callbacks: list | None = None, **overrides: Any) -> Trainer:
        kwargs: dict[str, Any] = dict(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=str(tmp_path),
            deterministic=False,
        )
        kwargs.update(overrides)
        return Trainer(callbacks=callbacks or [], **kwargs)

    return factory


