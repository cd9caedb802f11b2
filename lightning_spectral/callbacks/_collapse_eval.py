"""The ``train_eval`` pass of ``CollapseMonitor(source="train_eval")``.

At the end of each due training epoch the monitor runs one extra no-grad, eval-mode pass over the
training dataset with the end-of-epoch weights (the protocol of Papyan, Han & Donoho), in dataset
order through its own sequential loader (this rank's share under DDP), with every other capture
paused, the precision plugin's evaluation context, and every module's mode and every RNG state
(torch CPU and accelerator, Python, NumPy) restored afterwards (docs/collapse.md).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_spectral.callbacks._collapse_head import HeadChoice
from lightning_spectral.callbacks.curvature import _Silenced
from lightning_spectral.callbacks.penalty import unwrapped_training_step
from lightning_spectral.capture import paused
from lightning_spectral.errors import SpectralConfigError


class TrainEvalPass(HeadChoice):
    """The monitor's own evaluation pass over the training set."""

    max_batches: int | None
    _restored: dict[str, Any] | None

    def _train_eval(self, trainer: Any, pl_module: Any) -> None:
        """One no-grad, eval-mode pass over the training dataset with the end-of-epoch weights;
        logs it as the epoch's statistics (every rank takes part, as for the other sources)."""
        epoch = int(trainer.current_epoch)
        restored, self._restored = self._restored, None
        if restored is not None:
            self._adopt_restored_head(pl_module, restored)
        if not self._due(epoch) or (self._capture is None and self._probe is None):
            return
        loader = self._eval_loader(trainer)
        if loader is None:
            self._log_nan(trainer, epoch)
            return
        self._collect(epoch, pl_module, None)
        try:
            with self._evaluation(trainer, pl_module):
                for batch_idx, batch in enumerate(loader):
                    batch = trainer.strategy.batch_to_device(batch)
                    self._begin_batch(batch)
                    try:
                        self._run_step(pl_module, batch, batch_idx)
                    finally:
                        self._end_batch(pl_module)
        except SpectralConfigError:
            raise
        except Exception as exc:  # never crash mid-fit unless strict
            self._abandon_epoch()
            self._fail.problem(
                "train_eval",
                f"epoch {epoch}: the train_eval pass failed: {type(exc).__name__}: {exc}"
                + (" (pass eval_step='<method>' to say how to run the model on a batch)"
                   if self.eval_step == "forward" else ""),
            )
            self._log_nan(trainer, epoch)
            return
        self._finish_epoch(trainer, pl_module)

    def _eval_loader(self, trainer: Any) -> DataLoader | None:
        """The pass's own loader: the training dataset in order (this rank's share under DDP),
        the training loader's batch size and collate function, never its sampler."""
        source = getattr(trainer, "train_dataloader", None)
        if not isinstance(source, DataLoader):
            self._fail.problem(
                "train_eval_loader",
                "source='train_eval' needs one training torch DataLoader, got "
                f"{type(source).__name__}",
            )
            return None
        dataset = source.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            self._fail.problem(
                "train_eval_loader",
                "source='train_eval' needs a map-style training dataset (len and indexing), got "
                f"{type(dataset).__name__}",
            )
            return None
        batch_size = source.batch_size or getattr(source.batch_sampler, "batch_size", None) or 1
        size = len(dataset)
        if self.max_batches is not None:
            size = min(size, self.max_batches * batch_size)
        world = max(1, int(getattr(trainer, "world_size", 1) or 1))
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        workers = int(source.num_workers)
        extra: dict[str, Any] = {}
        if workers > 0:
            extra = {
                "worker_init_fn": source.worker_init_fn,
                "multiprocessing_context": source.multiprocessing_context,
                "prefetch_factor": source.prefetch_factor,
            }
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=list(range(rank, size, world)),  # this rank's share, in order, no padding
            collate_fn=source.collate_fn,
            num_workers=workers,
            pin_memory=source.pin_memory,
            drop_last=False,
            # a loader draws its base seed at each iteration: from this generator, not the RNG
            generator=torch.Generator().manual_seed(0),
            **extra,
        )

    @contextlib.contextmanager
    def _evaluation(self, trainer: Any, pl_module: Any) -> Iterator[None]:
        """Eval mode, no grad, other captures paused, precision context; every module's mode and
        every RNG state (torch CPU and accelerator, Python, NumPy) restored afterwards."""
        flags = [(m, m.training) for m in pl_module.modules()]
        device = torch.device(pl_module.device)
        devices = [device.index or 0] if device.type == "cuda" else []
        python_state, numpy_state = random.getstate(), np.random.get_state()
        plugin = getattr(trainer, "precision_plugin", None)
        precision = getattr(plugin, "val_step_context", None)
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), paused():
                pl_module.eval()
                self._own_pass = True
                with precision() if callable(precision) else contextlib.nullcontext():
                    yield
        finally:
            self._own_pass = False
            for module, flag in flags:
                module.training = flag
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def _run_step(self, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Run the model on one batch of the pass, as ``eval_step`` says."""
        if self.eval_step == "forward":
            if isinstance(batch, list | tuple) and len(batch) > 1:
                skip = self.labels % len(batch) if isinstance(self.labels, int) else None
                inputs = next(item for i, item in enumerate(batch) if i != skip)
            else:
                inputs = batch
            pl_module(inputs)
        elif self.eval_step == "training_step":
            with _Silenced(pl_module):
                unwrapped_training_step(pl_module)(batch, batch_idx)
        else:
            getattr(pl_module, self.eval_step)(batch)
