"""``SpectralMonitor``: per-layer spectra of activations and weights, every N optimizer steps.

The callback is thin: *is it due?* (:class:`~lightning_spectral.callbacks._base.StepSchedule`)
→ :class:`~lightning_spectral.capture.LayerCapture` → :mod:`lightning_spectral.functional` →
:mod:`lightning_spectral.report`. See ``docs/monitor.md`` for usage and costs and
``docs/metrics.md`` for every tag.

Schedule (``x``-axis = ``trainer.global_step``, the number of optimizer steps taken): an
*activation event* is due at step ``g`` when ``g`` reaches the next multiple of
``every_n_steps`` (0 included). Its rows are captured from the training forward passes of every
micro-batch that leads to optimizer step ``g + 1`` (all micro-batches of the accumulation window
under gradient accumulation), and the event is logged at step ``g`` once that optimizer step
has happened. A *weight event* reads the weights used by that same forward (at the start of the
window), so activations and weights logged at step ``g`` belong together.

Short batches: a spectrum from fewer rows is a different statistic (its rank is bounded by the
row count). When a layer's window holds fewer than half the rows of that layer's largest window
so far (the last, short batch of an epoch), the activation event is postponed to the next step
— at most :data:`MAX_POSTPONE` times in a row — and ``rows/<layer>`` records how many rows stand
behind every logged value.

Lifecycle: a new fit starts a fresh schedule (only a ``ckpt_path`` resume continues one);
``teardown`` and ``on_exception`` remove every hook.

Longer than the other callbacks: one monitor owns two schedules (activations and weights) that
must agree step by step, the rank-zero computation with its broadcast, the chunked activation
event under ``memory_budget``, the exact/estimated weight events and the dashboard layout; the
mathematics itself is in :mod:`lightning_spectral.functional`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lightning_spectral import report
from lightning_spectral._compat import STEP_OUTPUT, LightningModule, Trainer, override
from lightning_spectral.callbacks._base import (
    SpectralCallback,
    StepSchedule,
    check_bool,
    check_choice,
    check_int,
    check_layers,
    full_tensor,
    logging_step,
    strategy_kind,
    warn_rank_zero,
)
from lightning_spectral.capture import LayerCapture, weight_matrices
from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.functional.estimate import estimate_weight
from lightning_spectral.functional.quantities import (
    ACTIVATION_QUANTITIES,
    ESTIMATED_QUANTITIES,
    QUANTITIES,
    WEIGHT_QUANTITIES,
    Spectra,
    compute_quantities,
    estimate_quantities,
    quantity,
)
from lightning_spectral.functional.spectrum import (
    _distribution_of_cut,
    autocorrelation_eigvals,
    autocorrelation_eigvals_pair,
    spectral_distribution,
)
from lightning_spectral.functional.weights import singular_values_many, weight_matrix

__all__ = [
    "SpectralMonitor",
    "WEIGHTS_EVERY_FACTOR",
    "ACTIVATION_QUANTITIES",
    "WEIGHT_QUANTITIES",
    "MAX_POSTPONE",
]

#: ``weights_every_n_steps=None`` means ``WEIGHTS_EVERY_FACTOR × every_n_steps`` (docs/monitor.md)
WEIGHTS_EVERY_FACTOR = 50
#: an activation event is postponed at most this many steps in a row for short windows
MAX_POSTPONE = 8
#: a window is short when a layer holds fewer than this fraction of its largest window's rows
SHORT_FRACTION = 0.5

#: hidden columns of the packed blocks: NaN exactly for a non-finite layer (λ_1, resp. σ_1)
_PROBE_A = "_probe_activation"
_PROBE_W = "_probe_weight"
#: the per-layer chart titled by the layer name alone (the others: "<layer>: <chart>")
_RANKS_CHART = "ranks"
_MAX_HISTORY = 512  # heatmap rows kept per layer (thinned by 2 when full)
#: default of ``figure_budget``: the per-event spectra figure is skipped while figure rendering
#: has used more than this fraction of the fit's wall time (the first event always gets one)
FIGURE_BUDGET = 0.01
#: default of ``large_weight_threshold``: a weight matrix with ``min(out, in·k…)`` at least this
#: large is estimated between exact events (docs/definitions.md#large-weights)
LARGE_WEIGHT_THRESHOLD = 2048
#: default of ``exact_every``: every this many weight events, large weights get the full SVD
EXACT_EVERY = 10
#: histogram buckets: TensorBoard's default exponential buckets merged by this factor, so each
#: spans a factor 1.1**8 ≈ 2.1 (``SummaryWriter.add_histogram(..., max_bins=1548 // 8)``): ~35
#: buckets for a spectrum instead of ~280, a record 7× smaller to write
HISTOGRAM_MERGE = 8
#: ``memory_budget=None``: an activation event's working memory is half the size of its
#: captured rows, clamped to this range (bytes)
MEMORY_BUDGET_RANGE = (32 * 2**20, 256 * 2**20)


def _layer_bytes(n: int, d: int, itemsize: int, need_raw: bool) -> int:
    """Estimated peak working memory of one ``n × d`` layer's spectra in an event, in bytes.

    Its rows' working copy, plus what ``autocorrelation_eigvals_pair`` /
    ``autocorrelation_eigvals`` allocate without autograd (``m = min(n, d)``): the float64 Gram
    with its scaling and the working-precision copies for ``eigvalsh`` (at most ``5·itemsize·m²``
    bytes); the float32 product's partial sums when ``max(n, d) > 4m``; the float64 copies of
    the rows when the product is formed in float64 (``m < 32``, or float32 matmuls that are not
    IEEE); and a normalised copy of the rows for ``n > d`` when no raw spectrum is computed.
    """
    m, length = min(n, d), max(n, d)
    total = n * d * itemsize + 5 * itemsize * m * m
    if itemsize == 4:
        if m < 32 or torch.get_float32_matmul_precision() != "highest":
            total += 2 * 8 * n * d
        elif length > 4 * m:
            total += 4 * (length // (4 * m)) * m * m
    if n > d and not need_raw:
        total += n * d * itemsize
    return max(total, 1)


def _check_quantities(quantities: Any) -> tuple[str, ...]:
    """The selected table entries (docs/metrics.md), in table order."""
    if quantities is None:
        return tuple(q.name for q in QUANTITIES)
    if isinstance(quantities, str) or not all(isinstance(q, str) for q in quantities):
        raise SpectralConfigError(
            f"quantities must be None or a list of quantity names, got {quantities!r}"
        )
    table = [q.name for q in QUANTITIES]
    unknown = [q for q in quantities if q not in table]
    if unknown:
        raise SpectralConfigError(
            f"unknown quantities {unknown}; the quantity table "
            f"(lightning_spectral.functional.quantities) has: {', '.join(table)}"
        )
    if not quantities:
        raise SpectralConfigError(f"quantities is empty; choose from: {', '.join(table)}")
    return tuple(n for n in table if n in set(quantities))


class SpectralMonitor(SpectralCallback):
    """Log per-layer eigen-spectra of activations and weights every ``every_n_steps`` steps.

    Args:
        every_n_steps: optimizer steps between activation events (first event at step 0).
        layers: ``"auto"`` (every ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.MultiheadAttention``
            and ``nn.LSTM``/``nn.GRU``/``nn.RNN``), or module names / glob patterns
            (``"encoder.*"``); a pattern that matches nothing fails at ``setup`` listing the
            available module names. How each module type's output becomes rows is tabulated
            in docs/metrics.md.
        weights: also log the weight matrices' singular spectra (attention: the input and
            output projections; recurrent layers: every ``weight_ih``/``weight_hh`` matrix).
        weights_every_n_steps: optimizer steps between weight events; ``None`` means
            ``50 × every_n_steps`` (all weight spectra of a 784-512-512-10 MLP cost ≈ 7 of its
            training steps, an activation event ≈ 0.6, so the total stays under 1 % of training
            time; see docs/monitor.md). The final weights are also logged when training ends.
        max_samples: at most this many rows per layer and rank are captured per event
            (a deterministic subsample that leaves the global RNG alone).
        conv_reduce: ``"mean"`` (spatial mean) or ``"flatten"`` for channel-first outputs.
        histograms: write ``eigvals/<layer>`` and ``weight_svals/<layer>`` histograms.
        figures: write the all-layer spectra figure each event and a heatmap per layer at the
            end of fit.
        dtype: working precision of the spectra, ``"float32"`` or ``"float64"``.
        strict: raise :class:`~lightning_spectral.errors.SpectralComputeError` on non-finite
            activations or weights instead of logging NaN with one warning.
        figure_budget: the per-event spectra figure is skipped while the monitor — its
            events and its figures together — has used more than this fraction of the fit's
            wall time (one figure costs more than a hundred steps of a small MLP), so at the
            defaults figures only fill what the events leave of 1 %; the first event always
            gets one.
        prefix: prepended to every tag (``prefix="student/"`` → ``student/vne/<layer>``) and
            dashboard category; two monitors in one Trainer need distinct prefixes.
        prog_bar: tags or glob patterns (with the prefix) also shown in the progress bar, e.g.
            ``["erank/*"]``.
        quantities: the tag prefixes to log, from the quantity table
            ``lightning_spectral.functional.quantities.QUANTITIES`` (``None``: all of
            them); e.g. ``["vne", "erank", "weight_stable_rank"]``. An unknown name raises
            :class:`~lightning_spectral.errors.SpectralConfigError` listing the table.
            ``rows/<layer>`` and the histograms are always written.
        large_weight_threshold: a weight matrix whose smaller side ``min(out, in·k…)`` is at
            least this large is *estimated* between exact events instead of decomposed by a
            full SVD (docs/definitions.md#large-weights): ``weight_sv_max`` and
            ``weight_stable_rank`` from a warm-started Lanczos iteration and the exact
            ``‖W‖_F``, ``weight_erank``, ``weight_rank90`` and ``weight_rank99`` from a block
            Krylov sketch; ``weight_alpha``, ``weight_alpha_weighted`` and its
            ``weight_svals`` histogram (and its panel of the spectra figure) are written at
            exact events only. ``None``: every weight gets the full SVD at every event.
            Smaller weights always do, with the same values as without this option.
        exact_every: large weights get the full SVD at every ``exact_every``-th weight event of
            the schedule (those at steps ``k · exact_every · weights_every_n_steps``), at their
            first event in each fit (the first event of a fit, a lazy weight once it exists,
            every weight after a resume) and at the end of training; ``1``: always.
        memory_budget: bytes of working memory an activation event may use on top of the rows
            it captured. Layers of equal shape are solved together, in chunks whose working
            memory (rows, Gram matrices, ``eigvalsh``'s copy) fits the budget, and each layer's
            captured rows are released once they are copied into their chunk, so an event
            peaks at about its rows plus the budget; a layer that alone needs more is solved on
            its own. ``None``: half the size of the captured rows, clamped to 32–256 MiB, so
            that an event needs at most about 1.5 times the memory of its rows when they exceed
            64 MiB (docs/performance.md). The logged values do not depend on it.

    Every scalar also goes into ``trainer.callback_metrics`` on every rank, so
    ``EarlyStopping(monitor="vne/<layer>")`` and ``ModelCheckpoint(monitor="erank/<layer>")``
    work. Values are logged at the step Lightning's ``self.log`` uses (batches that stepped the
    optimizers), the schedule counts ``trainer.global_step``; the two differ only with several
    optimizers (manual optimization).

    Logged tags (docs/metrics.md): ``vne/``, ``erank/``, ``eig_max/``, ``condition/``,
    ``rankme/`` and ``rows/`` per layer (activations); ``weight_stable_rank/``, ``weight_erank/``,
    ``weight_sv_max/``, ``weight_rank90/``, ``weight_rank99/``, ``weight_alpha/``,
    ``weight_alpha_weighted/`` per weight matrix (the layer name, or ``<layer>.<parameter>`` for
    attention and recurrent layers).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        layers: str | list[str] = "auto",
        weights: bool = True,
        weights_every_n_steps: int | None = None,
        max_samples: int = 1024,
        conv_reduce: Literal["mean", "flatten"] = "mean",
        histograms: bool = True,
        figures: bool = True,
        dtype: Literal["float32", "float64"] = "float32",
        strict: bool = False,
        figure_budget: float = FIGURE_BUDGET,
        prefix: str = "",
        prog_bar: str | list[str] | None = None,
        quantities: list[str] | None = None,
        large_weight_threshold: int | None = LARGE_WEIGHT_THRESHOLD,
        exact_every: int = EXACT_EVERY,
        memory_budget: int | None = None,
    ) -> None:
        super().__init__(
            strict=strict, figure_budget=figure_budget, prefix=prefix, prog_bar=prog_bar
        )
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        check_int("weights_every_n_steps", weights_every_n_steps, optional=True)
        self.weights_every_n_steps = (
            weights_every_n_steps
            if weights_every_n_steps is not None
            else WEIGHTS_EVERY_FACTOR * self.every_n_steps
        )
        self.layers: str | list[str] = check_layers("layers", layers)
        self.weights = check_bool("weights", weights)
        self.max_samples = check_int("max_samples", max_samples)
        self.conv_reduce = check_choice("conv_reduce", conv_reduce, ("mean", "flatten"))
        self.histograms = check_bool("histograms", histograms)
        self.figures = check_bool("figures", figures)
        check_choice("dtype", dtype, ("float32", "float64"))
        self._dtype = torch.float64 if dtype == "float64" else torch.float32
        self.dtype = dtype
        self.quantities = _check_quantities(quantities)
        self._act_quantities = tuple(n for n in self.quantities if n in ACTIVATION_QUANTITIES)
        self._weight_quantities = tuple(n for n in self.quantities if n in WEIGHT_QUANTITIES)
        self.large_weight_threshold: int | None = check_int(
            "large_weight_threshold", large_weight_threshold, optional=True
        )
        self.exact_every: int = check_int("exact_every", exact_every)
        self.memory_budget: int | None = check_int("memory_budget", memory_budget, optional=True)
        #: the selected weight quantities that large weights log between exact events
        self._estimated_quantities = tuple(
            n for n in self._weight_quantities if n in ESTIMATED_QUANTITIES
        )
        self._capture: LayerCapture | None = None
        #: weight tag -> (owner module, parameter name), read when due
        self._weight_layers: dict[str, tuple[nn.Module, str]] = {}
        #: layer -> its weight tags
        self._weights_of: dict[str, list[str]] = {}
        self._act_schedule = StepSchedule(self.every_n_steps)
        self._weight_schedule = StepSchedule(self.weights_every_n_steps)
        self._reset()

    def _reset(self) -> None:
        self._act_schedule.reset()
        self._weight_schedule.reset()
        self._last_weight_step: int | None = None
        self._history: dict[str, dict[str, list[Any]]] = {}
        self._full_rows: dict[str, int] = {}
        self._postponed = 0
        self._capturing_for: int | None = None
        self._capturing_log = 0
        #: training batches that return at once (no step can be due before them)
        self._skip_batches = 0
        self._pending_weights: tuple[int, int, dict[str, torch.Tensor]] | None = None
        #: large weights: the tags whose full SVD this fit has computed, the pending event's
        #: estimate rows (tag -> the row it holds in the pending dict), that event's exact padding
        #: width, and the Lanczos warm starts (tag -> top right singular vector; not checkpointed)
        self._exact_seen: set[str] = set()
        self._estimated: dict[str, torch.Tensor] = {}
        self._pad_width = 0
        self._sv_vectors: dict[str, torch.Tensor] = {}
        self._layout_done = False
        self._warned_empty: set[str] = set()
        #: ``{"step": g, "rows": {layer: rows used}}`` of the last activation event (all ranks)
        self.last_event: dict[str, Any] = {}

    @property
    def _log_weights(self) -> bool:
        """Weight events happen: ``weights=True`` and a weight quantity is selected."""
        return self.weights and bool(self._weight_quantities)

    # -- identity and state ----------------------------------------------------------------------
    @override
    def _state_key_config(self) -> dict[str, Any]:
        extra = {"prefix": self.prefix} if self.prefix else {}
        return dict(
            every_n_steps=self.every_n_steps,
            layers=self.layers,
            weights_every_n_steps=self.weights_every_n_steps,
            **extra,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """Schedule and heatmap history (tensors and plain values only: safe ``weights_only``)."""
        return {
            "next_step": self._act_schedule.next,
            "next_weight_step": self._weight_schedule.next,
            "last_weight_step": self._last_weight_step,
            "full_rows": dict(self._full_rows),
            "history": {
                layer: {"steps": list(h["steps"]), "spectra": list(h["spectra"])}
                for layer, h in self._history.items()
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skip_batches = 0
        self._act_schedule.load_state_dict(state_dict.get("next_step"))
        self._weight_schedule.load_state_dict(state_dict.get("next_weight_step"))
        last = state_dict.get("last_weight_step")
        self._last_weight_step = None if last is None else int(last)
        self._full_rows = {str(k): int(v) for k, v in state_dict.get("full_rows", {}).items()}
        self._history = {
            layer: {"steps": [int(s) for s in h["steps"]],
                    "spectra": [torch.as_tensor(v, dtype=torch.float32) for v in h["spectra"]]}
            for layer, h in state_dict.get("history", {}).items()
        }

    # -- lifetime --------------------------------------------------------------------------------
    def _install(self, trainer: Any, pl_module: Any, stage: str) -> None:
        kind = strategy_kind(trainer)
        if self._log_weights and kind in ("fsdp", "deepspeed"):
            raise SpectralConfigError(
                f"SpectralMonitor(weights=True) cannot read whole weights under "
                f"{type(trainer.strategy).__name__} (it keeps flat parameter shards): use "
                "ModelParallelStrategy (FSDP2, whose sharded weights are gathered per event), "
                "DDP, or SpectralMonitor(weights=False) for activation spectra only"
            )
        if getattr(pl_module, "_compiler_ctx", None):
            warn_rank_zero(
                "SpectralMonitor: the LightningModule was torch.compile'd before the monitor's "
                "hooks were registered; the compiled graph may not call them."
            )
        self._capture = self._open_capture(
            pl_module,
            layers=self.layers,
            max_samples=self.max_samples,
            conv_reduce=self.conv_reduce,
        )
        self._weight_layers = {}
        self._weights_of = {}
        for name in self._capture.names:
            matrices = weight_matrices(name, self._capture.modules[name])
            self._weight_layers.update(matrices)
            self._weights_of[name] = list(matrices)

    def _uninstall(self) -> None:
        self._capture = None
        self._capturing_for = None
        self._pending_weights = None

    # -- schedule --------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._skip_batches:
            self._skip_batches -= 1  # no step can be due yet (see below)
            return
        if self._capture is None or self._capturing_for is not None:
            return  # not set up, or inside an accumulation window already being captured
        g = int(trainer.global_step)
        act_due = self._act_schedule.due(g)
        weights_on = self._log_weights and bool(self._weight_layers)
        weight_due = weights_on and self._weight_schedule.due(g)
        if not (act_due or weight_due):
            # Under automatic optimization a training batch advances ``global_step`` by at
            # most one, so the next due step cannot come before this many more batches: they
            # return at once, without reading ``global_step`` (a chain of Lightning properties,
            # the larger part of this hook's cost on a step without an event). Manual
            # optimization may step several times per batch: it reads every batch.
            if pl_module.automatic_optimization:
                upcoming = self._act_schedule.next
                if weights_on:
                    upcoming = min(upcoming, self._weight_schedule.next)
                self._skip_batches = max(upcoming - g - 1, 0)
            return
        log_step = logging_step(trainer)
        with self._charged():
            if weight_due:
                self._weight_schedule.done(g)
                self._pending_weights = (g, log_step, self._weight_spectra(trainer))
            if act_due:
                self._capturing_for = g
                self._capturing_log = log_step
                self._capture.start(seed=g)
            elif weight_due:
                self._emit(trainer, g, log_step, None)

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        g = self._capturing_for
        if g is None or self._capture is None or int(trainer.global_step) == g:
            return  # no window open, or its optimizer step has not happened yet
        with self._charged():
            self._end_window(trainer, g)

    def _end_window(self, trainer: Any, g: int) -> None:
        """Close the capture window of schedule step ``g`` and emit its event."""
        assert self._capture is not None
        self._capture.stop()
        self._capturing_for = None
        rows: dict[str, torch.Tensor] | None = self._capture.take()
        if rows is not None and int(getattr(trainer, "world_size", 1)) > 1:
            rows = self._gather(trainer, rows)  # every rank, same order
        if rows and self._short_window(rows):
            # the last, short batch of an epoch: take the spectrum at the next step instead
            self._postponed += 1
            self._act_schedule.postpone(g)
            rows = None
        else:
            self._postponed = 0
            self._act_schedule.done(g)
            for n, count in [(n, int(r.shape[0])) for n, r in (rows or {}).items()]:
                self._full_rows[n] = max(self._full_rows.get(n, 0), count)
        if rows is not None or self._pending_weights is not None:
            self._emit(trainer, g, self._capturing_log, rows)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._skip_batches = 0
        self._figures.start()

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._capture is not None:
            self._capture.stop()  # never capture validation forwards

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._capture is not None and self._capturing_for is not None:
            self._capture.active = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._capture is not None:
            self._capture.stop()
            self._capture.take()  # an unfinished window (interrupted fit) is dropped
        self._capturing_for = None
        g = int(trainer.global_step)
        log_step = logging_step(trainer)
        if self._log_weights and self._weight_layers and self._last_weight_step != g:
            self._pending_weights = (g, log_step, self._weight_spectra(trainer, final=True))
            self._emit(trainer, g, log_step, None)
        if self.figures and trainer.is_global_zero and report.tensorboard_writers(trainer):
            from lightning_spectral.plots.spectral import spectrum_heatmap

            for layer, h in self._history.items():
                if not h["steps"]:
                    continue
                spectra = [t.numpy() for t in h["spectra"]]
                fig = spectrum_heatmap(layer, h["steps"], spectra)
                self._figure(trainer, f"spectrum_heatmap/{layer}", fig, log_step)

    # -- computing -------------------------------------------------------------------------------
    def _weight_spectra(self, trainer: Any, final: bool = False) -> dict[str, torch.Tensor]:
        """Singular values of every watched weight, one batched decomposition per shape (rank zero
        only; float32: from the float64 Gram matrix, ``singular_values_many(method="gram")``).

        The parameters are read now (a lazy module's weight once it exists; a weight that is
        still uninitialised is left out of this event). Under FSDP2 (``ModelParallelStrategy``)
        each sharded weight is gathered whole — every rank joins, and holds one whole matrix at
        a time; only rank zero keeps it and computes.

        Between exact events (:meth:`_exact_weight_event`; ``final``: the end of training) a
        large weight (``large_weight_threshold``) is estimated instead, now, from the weights
        of this moment: its entry is a row of estimated quantities (:meth:`_estimate_large`),
        which :meth:`_weight_metrics` recognises by identity in ``self._estimated``. The other
        weights get exactly the SVD they would get without large ones (a large and a small
        matrix never share a shape, hence never a batch)."""
        tags: list[str] = []
        mats: list[torch.Tensor] = []
        zero = bool(trainer.is_global_zero)
        for tag, (owner, pname) in self._weight_layers.items():
            w = getattr(owner, pname, None)
            if not isinstance(w, torch.Tensor) or isinstance(
                w, nn.parameter.UninitializedParameter
            ) or w.ndim < 2:
                continue
            with torch.no_grad():
                whole = full_tensor(w.detach())  # FSDP2: a gather every rank joins, in order
            if zero:
                tags.append(tag)
                mats.append(whole)
        exact = self._exact_weight_event(int(trainer.global_step), final)
        self._estimated = {}
        if not mats:
            return {}
        # a weight's first event in a fit is exact (the first event, a lazy weight once it
        # exists, every weight after a resume)
        large = [] if exact else [i for i, m in enumerate(mats)
                                  if tags[i] in self._exact_seen and self._is_large(m)]
        self._exact_seen.update(t for i, t in enumerate(tags) if i not in set(large))
        if not large:
            with torch.no_grad():
                svals = singular_values_many(mats, dtype=self._dtype, method="gram")
            return dict(zip(tags, svals, strict=True))
        self._pad_width = max(min(weight_matrix(m).shape) for m in mats)
        small = [i for i in range(len(mats)) if i not in set(large)]
        with torch.no_grad():
            svals = singular_values_many(
                [mats[i] for i in small], dtype=self._dtype, method="gram"
            )
            rows = self._estimate_large({tags[i]: mats[i] for i in large})
        out = dict(zip([tags[i] for i in small], svals, strict=True))
        out.update(rows)
        return {t: out[t] for t in tags if t in out}  # the watched order

    def _exact_weight_event(self, step: int, final: bool) -> bool:
        """Every weight gets the full SVD at this weight event: the one at the end of training,
        every ``exact_every``-th one of the schedule's grid (steps that are multiples of
        ``exact_every · weights_every_n_steps``), or always without a threshold. (A large
        weight's first event in a fit is exact too: :meth:`_weight_spectra`.)"""
        return (
            final
            or self.large_weight_threshold is None
            or (step // self.weights_every_n_steps) % self.exact_every == 0
        )

    def _is_large(self, w: torch.Tensor) -> bool:
        """The matrix view's smaller side reaches ``large_weight_threshold`` (shapes only)."""
        threshold = self.large_weight_threshold
        return threshold is not None and min(weight_matrix(w).shape) >= threshold

    def _estimate_large(self, mats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rank zero, between exact events: per large weight the row of its selected estimated
        quantities followed by ``σ̃_1`` (the non-finite probe), recorded in ``self._estimated``.

        :func:`~lightning_spectral.functional.estimate.estimate_weight` warm-starts its Lanczos
        iteration from the weight's previous top singular vector (kept per tag, on the weight's
        device); a non-finite weight logs NaN and drops its vector. Weights with no selected
        estimated quantity are left out of the event (alpha only: exact events only).
        """
        if not self._estimated_quantities:
            return {}
        for tag, w in mats.items():
            est = estimate_weight(w, self._sv_vectors.get(tag), dtype=self._dtype)
            if est.vector is None:
                self._sv_vectors.pop(tag, None)
            else:
                self._sv_vectors[tag] = est.vector
            values = estimate_quantities(self._estimated_quantities, [est])[0]
            self._estimated[tag] = torch.cat([values, est.sv_max.reshape(1)])
        return dict(self._estimated)

    def _short_window(self, rows: dict[str, torch.Tensor]) -> bool:
        """True when the window should be postponed: a layer holds fewer than half the rows of
        its largest window so far (host integers from shapes: no synchronisation)."""
        if self._postponed >= MAX_POSTPONE:
            return False
        return any(
            r.shape[0] < SHORT_FRACTION * self._full_rows.get(n, 0) for n, r in rows.items()
        )

    def _gather(self, trainer: Any, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The union of every rank's rows per layer (rank order); two collectives on all ranks.

        ``rows`` is consumed: each layer's rows are popped once copied into the one send buffer
        (zero-padded to the largest count of any rank), so a rank holds at most that buffer,
        the gathered buffers of all ranks and the per-layer unions at a time."""
        names = self._capture.names if self._capture is not None else []
        device = trainer.strategy.root_device
        shape = torch.tensor(
            [[rows[n].shape[0], rows[n].shape[1]] if n in rows else [0, 0] for n in names],
            dtype=torch.int64,
            device=device,
        )
        shapes = trainer.strategy.all_gather(shape).cpu()  # (world, L, 2)
        counts = shapes[..., 0]
        dims = shapes[..., 1].amax(dim=0)
        top = counts.amax(dim=0)
        sizes = [int(top[i]) * int(dims[i]) for i in range(len(names))]
        flat = torch.zeros(sum(sizes), dtype=self._dtype, device=device)
        offset = 0
        for i, n in enumerate(names):
            part = rows.pop(n, None)
            if part is not None and part.shape[0]:
                block = flat[offset : offset + sizes[i]].view(int(top[i]), int(dims[i]))
                block[: part.shape[0]].copy_(part)
            del part
            offset += sizes[i]
        rows.clear()
        gathered = trainer.strategy.all_gather(flat)  # (world, total)
        del flat
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for i, n in enumerate(names):
            size = sizes[i]
            pieces = [
                gathered[r, offset : offset + size].reshape(int(top[i]), int(dims[i]))[
                    : int(counts[r, i])
                ]
                for r in range(gathered.shape[0])
            ]
            offset += size
            if int(counts[:, i].sum()) > 0:
                out[n] = torch.cat(pieces)
        return out

    def _emit(
        self, trainer: Any, step: int, log_step: int, rows: dict[str, torch.Tensor] | None
    ) -> None:
        """Compute, move to the host once, and log one event of schedule step ``step`` at logger
        step ``log_step`` (rows already gathered across ranks). Every rank calls this at the
        same point: values computed on rank zero are broadcast into every rank's
        ``callback_metrics``. On rank zero ``rows`` is consumed: each layer's rows are popped
        (and released) as the computation reaches them."""
        if rows is not None:
            self.last_event = {"step": step, "rows": {n: int(r.shape[0]) for n, r in rows.items()}}
            self._warn_empty(rows)
        pending = self._pending_weights
        self._pending_weights = None
        if not trainer.is_global_zero:
            self._log(trainer, {}, log_step, computed_on_every_rank=False)
            return
        try:
            values = self._compute_event(trainer, log_step, rows, pending)
        except BaseException:
            # the other ranks wait in the broadcast: release them before raising (strict=True)
            self._log(trainer, {}, log_step, computed_on_every_rank=False)
            raise
        self._log(trainer, values, log_step, computed_on_every_rank=False)

    def _compute_event(
        self,
        trainer: Any,
        step: int,
        rows: dict[str, torch.Tensor] | None,
        pending: tuple[int, int, dict[str, torch.Tensor]] | None,
    ) -> dict[str, float]:
        """Rank zero: the event's scalars (returned, unprefixed); histograms and figures are
        written here. ``rows`` is consumed (emptied) by the computation."""
        packed: dict[str, torch.Tensor] = {}
        unpack: list[tuple[str, list[str], tuple[str, ...], list[int] | None]] = []
        counts = {n: int(r.shape[0]) for n, r in (rows or {}).items()}
        if rows:
            self._activation_metrics(rows, packed, unpack)
        weight_names: list[str] = []
        if pending is not None and pending[2]:
            self._last_weight_step = pending[0]
            weight_names = list(pending[2])
            self._weight_metrics(pending[2], packed, unpack)
        if not packed:
            return {}
        _, host = report.to_host({}, packed)  # the event's one device-to-host copy
        host_s, host_v = self._unpack(host, unpack)
        for n, count in counts.items():
            host_s[f"rows/{n}"] = float(count)
        self._check_finite(host_s, list(counts), weight_names)
        host_s = {t: v for t, v in host_s.items() if not t.startswith("_")}  # drop the probes
        tb = bool(report.tensorboard_writers(trainer))
        if tb and not self._layout_done:
            self._register_layout(trainer)
        if self.histograms and tb:  # one record per writer for all of them
            report.log_histograms(
                trainer, {self.prefix + tag: v for tag, v in host_v.items()}, step,
                merge=HISTOGRAM_MERGE,
            )
        act = {t.split("/", 1)[1]: v for t, v in host_v.items() if t.startswith("eigvals/")}
        wts = {t.split("/", 1)[1]: v for t, v in host_v.items() if t.startswith("weight_svals/")}
        if self.figures:
            for layer, values in act.items():
                self._remember(layer, step, values)
        if self.figures and tb and (act or wts) and self._figures.allowed(self.figure_budget):
            from lightning_spectral.plots.spectral import spectra_figure

            with self._figures.timed():
                panels = {"activations: λ_i / Σλ": act, "weights: σ_i² / Σσ²": wts}
                fig = spectra_figure(panels, step=step)
                self._figure(trainer, "spectra/all_layers", fig, step)
        return host_s

    def _activation_metrics(
        self, rows: dict[str, torch.Tensor], packed: dict, unpack: list
    ) -> None:
        """The selected activation quantities of the table (docs/definitions.md#spectra): one
        batched ``eigvalsh`` per shape and chunk (two when a selected quantity needs the raw
        rows, RankMe, whose spectrum shares the normalised one's Gram product when ``n <= d``).

        The spectra of all layers on a device are then zero-padded into one ``(L, m_max)``
        matrix (they are cut already, and :class:`Spectra` is told each one's length), so the
        quantities and distributions cost a few tensor operations per event, not per shape,
        layer or quantity. Results stay packed: a ``(L, q + 1)`` block — the last column is
        ``λ_1``, the non-finite probe — and a ``(L, m_max)`` block of distributions.

        Memory: ``rows`` is consumed. A group is solved in chunks of layers whose estimated
        working memory (:func:`_layer_bytes`) fits the event's budget (``memory_budget``); each
        layer's rows are copied into its chunk's working tensor (in the working precision) and
        popped from ``rows`` at once, so the captured rows are released as the event proceeds.
        Each problem is solved independently, so the values do not depend on the chunking.
        """
        groups: dict[tuple, list[str]] = {}
        for name in rows:  # (no loop variable left holding a layer's rows)
            groups.setdefault((tuple(rows[name].shape), rows[name].device), []).append(name)
        want_dist = self.histograms or self.figures
        selected = self._act_quantities
        need_raw = any(quantity(n).raw for n in selected)
        itemsize = torch.empty(0, dtype=self._dtype).element_size()
        budget = self._event_budget(rows, itemsize)
        # per device: layer names, their spectra (one tensor per chunk) and lengths
        solved: dict[torch.device, tuple[list[str], list[torch.Tensor], list[torch.Tensor],
                                         list[int]]] = {}
        # inference mode: no autograd bookkeeping at all (≈ 15 % of an event of small layers,
        # which is all dispatch); the results are only read, on the host
        with torch.inference_mode():
            for (shape, device), names in groups.items():
                n, d = shape
                per_layer = _layer_bytes(n, d, itemsize, need_raw)
                size = max(1, budget // per_layer)
                order, lams, raws, lengths = solved.setdefault(device, ([], [], [], []))
                for start in range(0, len(names), size):
                    chunk = names[start : start + size]
                    stack = torch.empty((len(chunk), n, d), dtype=self._dtype, device=device)
                    for i, name in enumerate(chunk):
                        stack[i].copy_(rows.pop(name))  # the captured rows are released here
                    if need_raw:
                        # RankMe reads the raw (not row-normalised) rows' spectrum
                        lam, raw = autocorrelation_eigvals_pair(
                            stack, dtype=self._dtype, overwrite=True
                        )
                        raws.append(raw)
                    else:
                        lam = autocorrelation_eigvals(stack, dtype=self._dtype)
                    del stack
                    lams.append(lam)
                    order.extend(chunk)
                    lengths.extend([lam.shape[-1]] * len(chunk))
            for di, (order, lams, raws, lengths) in enumerate(solved.values()):
                self._activation_block(
                    f"a{di}", order, lams, raws, lengths, want_dist, packed, unpack
                )

    def _activation_block(
        self, key: str, order: list[str], lams: list[torch.Tensor], raws: list[torch.Tensor],
        lengths: list[int], want_dist: bool, packed: dict, unpack: list,
    ) -> None:
        """Quantities and distributions of one device's (already cut) spectra, zero-padded to
        the longest: packed under ``key`` and ``key + "d"``."""
        selected = self._act_quantities
        width = max(lengths)
        padded = any(m != width for m in lengths)

        def stack(parts: list[torch.Tensor]) -> torch.Tensor:
            if padded:
                parts = [torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in parts]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        lam = stack(lams)
        sizes = None
        if padded:
            sizes = torch.cat([torch.full((t.shape[0],), t.shape[-1], device=lam.device)
                               for t in lams])
        sp = Spectra(lam=lam, raw=stack(raws) if raws else None, sizes=sizes, cut=True)
        probe = lam[..., :1] if width else lam.sum(dim=-1, keepdim=True)
        packed[key] = (torch.cat([compute_quantities(selected, sp), probe], dim=-1)
                       if selected else probe)
        unpack.append((key, order, (*selected, _PROBE_A), None))
        if want_dist:
            packed[key + "d"] = _distribution_of_cut(lam, sp.entropy_total[1])
            unpack.append((key + "d", order, ("eigvals",), lengths if padded else None))

    def _event_budget(self, rows: dict[str, torch.Tensor], itemsize: int) -> int:
        """Bytes of working memory for this event: ``memory_budget``, or by default half the
        rows' size in the working precision, clamped to :data:`MEMORY_BUDGET_RANGE`."""
        if self.memory_budget is not None:
            return self.memory_budget
        captured = sum(r.numel() for r in rows.values()) * itemsize
        low, high = MEMORY_BUDGET_RANGE
        return min(max(captured // 2, low), high)

    def _weight_metrics(self, svals: dict[str, torch.Tensor], packed: dict, unpack: list) -> None:
        """The selected weight quantities of the table (docs/definitions.md#weights).

        The singular-value vectors are zero-padded into one ``(L, r_max)`` matrix: trailing
        zeros change none of these quantities (they are cut off, add no energy and no mass),
        so every weight is handled by the same few batched operations. The last column is
        ``σ_1``, the non-finite probe.

        Estimated large weights (the rows recorded by :meth:`_estimate_large`) form a block of
        their own, ``(L_e, q_e + 1)``: the selected quantities that have an estimator, then
        ``σ̃_1``; no distribution (histogram, figure panel) is written for them. The exact block
        is then padded to the width it would have with the large weights' spectra in it.
        """
        estimated = [n for n in svals if self._estimated.get(n) is svals[n]]
        self._estimated = {}
        if estimated:
            packed["we"] = torch.stack([svals[n] for n in estimated])
            unpack.append(("we", estimated, (*self._estimated_quantities, _PROBE_W), None))
        names = [n for n in svals if n not in set(estimated)]
        if not names:
            return
        lengths = [int(svals[n].shape[-1]) for n in names]
        selected = self._weight_quantities
        with torch.no_grad():
            s = torch.nn.utils.rnn.pad_sequence([svals[n] for n in names], batch_first=True)
            if estimated and self._pad_width > s.shape[-1]:
                s = torch.nn.functional.pad(s, (0, self._pad_width - s.shape[-1]))
            sp = Spectra(s=s)
            probe = s.amax(dim=-1, keepdim=True)
            block = (torch.cat([compute_quantities(selected, sp), probe], dim=-1)
                     if selected else probe)
            packed["w"] = block
            unpack.append(("w", names, (*selected, _PROBE_W), None))
            if self.histograms or self.figures:
                packed["wd"] = spectral_distribution(sp.s2)
                unpack.append(("wd", names, ("weight_svals",), lengths))

    @staticmethod
    def _unpack(
        host: dict[str, np.ndarray], unpack: list
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Split the packed host arrays into ``{tag: value}`` and ``{tag: distribution}``."""
        scalars: dict[str, float] = {}
        vectors: dict[str, np.ndarray] = {}
        for key, names, quantities, lengths in unpack:
            arr = host[key].reshape(len(names), -1)
            if quantities[0] in ("eigvals", "weight_svals"):
                for j, n in enumerate(names):
                    row = arr[j] if lengths is None else arr[j, : lengths[j]]
                    vectors[f"{quantities[0]}/{n}"] = row
                continue
            for j, n in enumerate(names):
                for q, value in zip(quantities, arr[j], strict=True):
                    scalars[f"{q}/{n}"] = float(value)
        return scalars, vectors

    # -- reporting helpers -----------------------------------------------------------------------
    def _check_finite(self, host: dict[str, float], layers: list[str], weights: list[str]) -> None:
        bad = [n for n in layers if math.isnan(host.get(f"{_PROBE_A}/{n}", 0.0))]
        if bad:
            self._fail.problem(
                "nonfinite-activations",
                f"non-finite (NaN/Inf) activations in layer(s) {', '.join(bad)}",
            )
        bad_w = [n for n in weights if math.isnan(host.get(f"{_PROBE_W}/{n}", 0.0))]
        if bad_w:
            self._fail.problem(
                "nonfinite-weights", f"non-finite (NaN/Inf) weights in layer(s) {', '.join(bad_w)}"
            )

    def _warn_empty(self, rows: dict[str, torch.Tensor]) -> None:
        if self._capture is None:
            return
        for name in self._capture.names:
            if name in rows or name in self._capture.skipped or name in self._warned_empty:
                continue
            self._warned_empty.add(name)
            warn_rank_zero(
                f"SpectralMonitor: layer {name!r} produced no output in the training step; "
                "nothing is logged for it (is it used in training_step?)"
            )

    def _remember(self, layer: str, step: int, values: np.ndarray) -> None:
        h = self._history.setdefault(layer, {"steps": [], "spectra": []})
        if h["steps"] and h["steps"][-1] >= step:  # a replayed step after resume: replace it
            keep = [i for i, s in enumerate(h["steps"]) if s < step]
            h["steps"] = [h["steps"][i] for i in keep]
            h["spectra"] = [h["spectra"][i] for i in keep]
        h["steps"].append(int(step))
        h["spectra"].append(torch.as_tensor(values, dtype=torch.float32))
        if len(h["steps"]) > _MAX_HISTORY:  # thin by 2, keeping the newest entry
            h["steps"] = h["steps"][::-1][::2][::-1]
            h["spectra"] = h["spectra"][::-1][::2][::-1]

    def _register_layout(self, trainer: Any) -> None:
        """Dashboard layout from the quantity table: one chart per selected quantity (all
        layers), and per layer one chart per scale (``Quantity.chart``: ``"<layer>"`` holds the
        rank-like quantities, ``"<layer>: entropy (nats)"`` the VNE), never mixing scales."""
        names = self._capture.names if self._capture is not None else []
        with_weights = self._log_weights and bool(self._weight_layers)
        selected = [q for q in QUANTITIES if q.name in self.quantities
                    and (q.kind == "activation" or with_weights)]
        by_quantity = report.multiline_layout(
            {q: [f"^{q}/"] for q in [s.name for s in selected] + ["rows"]}
        )
        charts: dict[str, list[str]] = {}
        for n in names:
            weight_tags = self._weights_of.get(n, []) if with_weights else []
            alternatives = "|".join(re.escape(t) for t in weight_tags)
            for chart in dict.fromkeys(q.chart for q in selected if q.chart is not None):
                act = "|".join(q.name for q in selected
                               if q.chart == chart and q.kind == "activation")
                wts = "|".join(q.name for q in selected if q.chart == chart and q.kind == "weight")
                patterns = [f"^({act})/{re.escape(n)}$"] if act else []
                if wts and weight_tags:
                    patterns.append(f"^({wts})/({alternatives})$")
                if patterns:
                    charts[n if chart == _RANKS_CHART else f"{n}: {chart}"] = patterns
        by_layer = report.multiline_layout(charts)
        self._layout(
            trainer, {"spectral: by quantity": by_quantity, "spectral: by layer": by_layer}
        )
        self._layout_done = True
