"""Fixtures for the callback tests (tests/callbacks/).

Test files cannot import each other (``--import-mode=importlib``), so shared helpers are handed
out as fixtures: an in-memory logger class, a factory of small, quiet Trainers, and the check
that a fit with a callback ends bit-identical to one without.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
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


@pytest.fixture
def assert_unperturbed() -> Callable[..., None]:
    """``assert_unperturbed((plain_state, plain_rng), (watched_state, watched_rng))``: a fit
    with a callback ended with bit-identical weights and global RNG state to one without."""

    def check(plain: tuple[dict, torch.Tensor], watched: tuple[dict, torch.Tensor]) -> None:
        (plain_state, plain_rng), (watched_state, watched_rng) = plain, watched
        assert plain_state.keys() == watched_state.keys()
        for key in plain_state:
            assert torch.equal(plain_state[key], watched_state[key]), key
        assert torch.equal(plain_rng, watched_rng)  # the global RNG was not touched

    return check
