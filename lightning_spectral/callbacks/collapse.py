"""``CollapseMonitor``: neural collapse (NC1–NC4) and the MIR/HDR interplay, once per epoch.

The features are the *input* of the classifier head (an ``nn.Linear``), read through a
:class:`~lightning_spectral.capture.LayerCapture` with ``pre=True`` and a sink: its hook is
registered once at ``setup``, only records during the monitored passes, and is removed at
``teardown`` and on an exception. Per batch, the rows go into streaming statistics
(:mod:`lightning_spectral.stats`: per-class counts and sums and ``Q = Σ h hᵀ``, float64, on the
model's device) and into a bounded deterministic reservoir of at most ``max_samples`` rows; both
are created from the width of the first rows, so a lazy head (``nn.LazyLinear``) needs nothing
at setup. At the end of a due epoch the statistics are all-reduced across DDP ranks, the metrics
are computed by :mod:`lightning_spectral.functional.collapse` (docs/definitions.md#collapse) and
:mod:`lightning_spectral.functional.interplay` (#mir-hdr), and logged through
:mod:`lightning_spectral.report` as ``collapse/<key>`` with a figure and a custom-scalars
category.

Three sources of forward passes: ``"train"`` streams the epoch's training forwards (weights
change under it), ``"val"`` the validation forwards, and ``"train_eval"`` runs one extra no-grad,
eval-mode pass over the training dataset with the end-of-epoch weights (Papyan, Han & Donoho's
protocol), in dataset order through the monitor's own sequential loader, with every other
capture paused and every RNG state restored afterwards.

The class is assembled from four private layers, each in its own module: the per-batch intake
of rows and the epoch's statistics (``_collapse_rows``), the epoch end (``_collapse_epoch``: the
metrics, their checks, the log, the figure and :func:`layout`), the choice and capture of the
head (``_collapse_head``) and the ``train_eval`` pass (``_collapse_eval``). This module holds the
configuration, the checkpointed state, the schedule and the Lightning hooks.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_spectral import report
from lightning_spectral._compat import STEP_OUTPUT, LightningModule, Trainer, override
from lightning_spectral.callbacks._base import check_choice, check_float, check_int
from lightning_spectral.callbacks._collapse_epoch import (  # noqa: F401 - re-exported here
    LAYOUT,
    NAMESPACES,
    layout,
)
from lightning_spectral.callbacks._collapse_eval import TrainEvalPass
from lightning_spectral.callbacks._collapse_rows import _PROBLEM_KEYS
from lightning_spectral.capture import LayerCapture
from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.stats import ClassStatsAccumulator, RowReservoir

__all__ = ["CollapseMonitor"]


class CollapseMonitor(TrainEvalPass):
    """Log NC1–NC4 and MIR/HDR of the classifier head's input.

    The metrics are defined in docs/definitions.md#collapse and #mir-hdr.

    Args:
        head: name (or glob pattern matching exactly one module) of the classifier
            ``nn.Linear`` in ``named_modules()``; its input are the features, its rows the class
            heads. ``"auto"``: the last ``nn.Linear`` *called* in the monitored forward whose
            width fits the classes (see docs/collapse.md, "Which Linear is the head").
        labels: where the labels are in a batch: an index (tuple/list batches) or a key (dict
            batches).
        every_n_epochs: log at the end of every n-th epoch (``(epoch + 1) % n == 0``).
        source: ``"train"`` reuses the training forward passes of the epoch (no extra compute;
            the weights change during the epoch, so the statistics mix the epoch's weight
            snapshots); ``"val"`` uses the validation passes (sanity checking excluded;
            ``trainer.validate`` included); ``"train_eval"`` runs, at the end of each due
            training epoch, one no-grad pass in eval mode over the training dataset with the
            end-of-epoch weights (the protocol of Papyan, Han & Donoho), see docs/collapse.md.
        max_batches: ``source="train_eval"`` only: evaluate the first ``max_batches ×
            batch_size`` samples of the training dataset, in dataset order (default ``None``:
            all of it).
        eval_step: ``source="train_eval"`` only: how the pass runs the model on a batch.
            ``"forward"`` (default): ``pl_module(inputs)`` with ``inputs`` the first item of a
            tuple/list batch that is not the labels, or the whole batch otherwise (a dict);
            ``"training_step"``: ``training_step(batch, batch_idx)`` with ``self.log`` silenced
            (its loss is discarded; it must be free of other side effects such as metric
            updates); any other string: a LightningModule method called as ``method(batch)``.
        max_samples: bound on the deterministic sample of rows used for NC4, MIR and HDR.
        num_classes: size of the label space ``K`` (default: the head's ``out_features``);
            labels must lie in ``[0, K)``. With ``head="auto"`` the head is the last ``nn.Linear``
            called whose width equals ``K``.
        strict: raise :class:`~lightning_spectral.errors.SpectralComputeError` instead of logging
            NaN with one warning when a metric cannot be computed.
        figure_budget: the geometry figure (≈ 0.3–1 s to draw on a CPU) is skipped at an epoch
            end while the monitor as a whole (figures, per-batch intake, epoch ends) has used
            more than this fraction of the fit's wall time; the last skipped one is drawn when
            training ends (``1.0``: every epoch).
        interplay_budget: MIR and HDR (one eigenproblem of size ``min(max_samples, d·C)``,
            the larger part of an epoch end) are computed at a due epoch while the monitor as a
            whole has used at most this fraction of the fit's wall time, and at the first due
            epoch of a fit. A skipped epoch logs NC1–NC4 without ``mir``/``hdr`` (absent, not
            NaN); if the last logged epoch skipped them, they are computed when training ends
            and logged at that epoch's step. ``1.0``: every due epoch. See docs/collapse.md.
        prefix: prepended to every tag and to the dashboard category; two monitors of one
            source in one Trainer need distinct prefixes.
        prog_bar: tags or glob patterns (with the prefix) also shown in the progress bar.

    After each logging event ``last_metrics`` holds the logged values (tag → float) and
    ``history`` the ``(epoch, nc1)`` pairs of this fit (continued on a ``ckpt_path`` resume);
    ``head_name`` is the chosen head.

    Logged tags (at the step Lightning's ``self.log`` uses): ``collapse/<key>`` for every key
    of the collapse table in docs/metrics.md, ``collapse/mir`` and ``collapse/hdr`` — under
    ``collapse_val/`` for ``source="val"`` and ``collapse_train_eval/`` for
    ``source="train_eval"``; with TensorBoard also the figure
    ``collapse/geometry`` and a ``collapse`` custom-scalars category. Every value also goes
    into ``trainer.callback_metrics`` on every rank (``EarlyStopping(monitor="collapse/nc1")``).
    """

    def __init__(
        self,
        head: str = "auto",
        labels: int | str = 1,
        every_n_epochs: int = 1,
        source: Literal["train", "val", "train_eval"] = "train",
        max_samples: int = 4096,
        num_classes: int | None = None,
        strict: bool = False,
        figure_budget: float = 0.01,
        prefix: str = "",
        prog_bar: str | list[str] | None = None,
        max_batches: int | None = None,
        eval_step: str = "forward",
        interplay_budget: float = 0.02,
    ) -> None:
        super().__init__(
            strict=strict, figure_budget=figure_budget, prefix=prefix, prog_bar=prog_bar
        )
        if not isinstance(head, str) or not head:
            raise SpectralConfigError(
                f"head must be a module name (or glob pattern) or 'auto', got {head!r}"
            )
        if isinstance(labels, bool) or not isinstance(labels, int | str):
            raise SpectralConfigError(
                f"labels must be a batch index (int) or key (str), got {labels!r}"
            )
        self.head = head
        self.labels = labels
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, 1)
        self.source: Literal["train", "val", "train_eval"] = check_choice(
            "source", source, ("train", "val", "train_eval")
        )
        self.max_batches = check_int("max_batches", max_batches, 1, optional=True)
        if not isinstance(eval_step, str) or not eval_step:
            raise SpectralConfigError(
                "eval_step must be 'forward', 'training_step' or a LightningModule method name, "
                f"got {eval_step!r}"
            )
        self.eval_step = eval_step
        if source != "train_eval" and (max_batches is not None or eval_step != "forward"):
            raise SpectralConfigError(
                "max_batches and eval_step apply to source='train_eval' only (the other sources "
                f"read forward passes Lightning runs anyway); got source={source!r}"
            )
        self.max_samples = check_int("max_samples", max_samples, 1)
        self.interplay_budget = check_float("interplay_budget", interplay_budget, 0.0, 1.0)
        self.num_classes = check_int("num_classes", num_classes, 2, optional=True)
        # the validation passes of ``trainer.validate`` are monitored too
        self.stages = ("fit", "validate") if source == "val" else ("fit",)
        self._flush_rows = max(1024, self.max_samples)
        self._head_name: str | None = None
        self._head_module: nn.Linear | None = None
        self._num_labels = 0
        self._capture: LayerCapture | None = None
        self._probe: LayerCapture | None = None
        self._candidates: dict[str, nn.Linear] = {}
        self._probe_order: list[str] = []
        self._probe_rows: dict[int, tuple[str, torch.Tensor]] = {}
        self._own_pass = False  # True while the train_eval pass runs (see _HeadCapture)
        self._reset()

    # ------------------------------------------------------------------ identity and state
    @property
    def namespace(self) -> str:
        """The first part of every tag: ``collapse`` (``source="train"``), ``collapse_val``
        (``"val"``) or ``collapse_train_eval`` (``"train_eval"``)."""
        return NAMESPACES[self.source]

    def _namespace(self) -> tuple[str, str]:
        return (self.prefix, self.source)

    @override
    def _state_key_config(self) -> dict[str, Any]:
        extra = {"prefix": self.prefix} if self.prefix else {}
        return dict(head=self.head, labels=self.labels, source=self.source, **extra)

    @property
    def head_name(self) -> str | None:
        """The module name of the head (``None`` while ``head="auto"`` is still undecided)."""
        return self._head_name

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:  # loaded and not used yet: it is still the state
            return {**self._restored, "history": list(self.history)}
        state: dict[str, Any] = {
            "history": list(self.history),
            "epoch": self._collecting_epoch,
            "head": self._head_name,
        }
        if self._collecting_epoch is not None:
            state["problem_text"] = dict(self._problem_text)
            state["host_problems"] = list(self._host_problems)
            if self._acc is not None:
                self._flush()
                state["accumulator"] = self._acc.state_dict()
                if self._reservoir is not None:
                    state["reservoir"] = self._reservoir.state_dict()
        return state

    #: ``(epoch, nc1)`` of this fit (continued on a ``ckpt_path`` resume)
    history: list[tuple[int, float]]
    _restored: dict[str, Any] | None

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a ckpt_path resume: Lightning calls this after ``setup``, so it survives the reset
        self.history = [(int(e), float(v)) for e, v in state_dict.get("history", [])]
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------ lifecycle
    def _reset(self) -> None:
        """A fresh fit: no history, no statistics, nothing restored."""
        self.history = []
        self.last_metrics: dict[str, float] = {}
        self._restored = None
        self._collecting_epoch: int | None = None
        self._started_epoch: int | None = None
        self._acc: ClassStatsAccumulator | None = None
        self._reservoir: RowReservoir | None = None
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._stage: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._buffered = 0
        self._pending_labels: torch.Tensor | None = None
        self._problem_text: dict[int, str] = {}
        self._host_problems = [0.0] * len(_PROBLEM_KEYS)
        self._warned_absent = False
        self._layout_done = False
        self._pending_figure: tuple | None = None
        #: the last logged epoch whose MIR/HDR were skipped (``interplay_budget``): its epoch,
        #: logging step, row sample, their labels and the head's weight, computed at train end
        self._pending_interplay: tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor] | None
        self._pending_interplay = None
        self._skipped_sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._interplay_done = 0
        self._epoch_started = False

    # ------------------------------------------------------------------ schedule
    def _start_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        self._started_epoch = epoch
        restored, self._restored = self._restored, None
        if restored is not None:
            self._adopt_restored_head(pl_module, restored)
        installed = self._capture is not None or self._probe is not None
        if restored is not None and installed:
            done = restored.get("epoch")
            if isinstance(done, int) and done < epoch:
                # the checkpoint was taken after the last batch of epoch ``done`` but before its
                # end; Lightning resumes in the next epoch without ending it, so end it here
                self._collect(done, pl_module, restored)
                self._finish_epoch(trainer, pl_module)
            if done != epoch:
                restored = None
        if not self._due(epoch) or not installed:
            self._collecting_epoch = None
            return
        self._collect(epoch, pl_module, restored)

    def _ensure_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the epoch if ``on_train_epoch_start`` did not (a resume inside it skips it)."""
        if self._started_epoch != int(trainer.current_epoch):
            self._start_epoch(trainer, pl_module)

    # ------------------------------------------------------------------ training passes
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # until an epoch start is seen, each batch checks that its epoch was started
        self._epoch_started = False
        self._figures.start()
        self._pending_figure = None
        self._pending_interplay = None
        self._interplay_done = 0

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_interplay(trainer)
        figure, self._pending_figure = self._pending_figure, None
        if figure is not None and report.tensorboard_writers(trainer):
            self._draw(trainer, figure)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.source == "train":
            self._start_epoch(trainer, pl_module)
            self._epoch_started = True

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.source == "train":
            if not self._epoch_started:  # a resume inside an epoch skips its epoch start
                self._ensure_epoch(trainer, pl_module)
            self._begin_batch(batch)

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.source == "train":
            self._end_batch(pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.source == "train":
            self._ensure_epoch(trainer, pl_module)
            self._finish_epoch(trainer, pl_module)
        elif self.source == "train_eval":
            self._train_eval(trainer, pl_module)

    # ------------------------------------------------------------------ validation passes
    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.source == "val" and not trainer.sanity_checking:
            self._start_epoch(trainer, pl_module)

    @override
    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.source == "val" and not trainer.sanity_checking:
            self._begin_batch(batch)

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.source == "val" and not trainer.sanity_checking:
            self._end_batch(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.source == "val" and not trainer.sanity_checking:
            self._finish_epoch(trainer, pl_module)

    # ------------------------------------------------------------------ epoch end
    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics of the rows accumulated so far (a collective under DDP).

        Returns 0-d float64 tensors keyed by tag suffix (``nc1``, …, ``nc4``, ``mir``, ``hdr``)
        plus ``_cosine``/``_classes`` for the figure and the problem counters.
        """
        return self._compute()
