"""``CollapseMonitor``: neural collapse (NC1–NC4) and the MIR/HDR interplay, once per epoch.

The features are the *input* of the classifier head (an ``nn.Linear``), read by a forward
pre-hook registered once at ``setup``, gated so that it only records during the monitored
passes, and removed at ``teardown``. Per batch, the rows go into streaming statistics
(:mod:`lightning_spectral.stats`: per-class counts and sums and ``Q = Σ h hᵀ``, float64, on the
model's device) and into a bounded deterministic reservoir of at most ``max_samples`` rows. At the
end of a due epoch the statistics are all-reduced across DDP ranks, the metrics are computed by
:mod:`lightning_spectral.functional.collapse` (SPEC.md §4) and
:mod:`lightning_spectral.functional.interplay` (SPEC.md §3.3), and logged through
:mod:`lightning_spectral.report` as ``collapse/<key>`` with a figure and a custom-scalars
category.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from lightning_spectral import report
from lightning_spectral._compat import Callback
from lightning_spectral.callbacks._base import FailSoft, FigureClock
from lightning_spectral.errors import SpectralConfigError, SpectralWarning
from lightning_spectral.functional.collapse import _collapse_compute, collapse_keys
from lightning_spectral.functional.interplay import information_interplay
from lightning_spectral.stats import ClassStatsAccumulator, RowReservoir

__all__ = ["CollapseMonitor"]

# problem counters, summed across ranks with the statistics
_BAD_RANGE, _NOT_INTEGER, _NO_LABELS, _SHAPE, _NOT_CALLED = range(5)
_PROBLEM_KEYS = ("labels_range", "labels_dtype", "labels_missing", "labels_shape", "head_idle")

_RANGE_TEXT = "labels outside [0, {k}) (num_classes)"


def _owns_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is contiguous and spans its whole storage (not a view of a larger one)."""
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


LAYOUT = {
    "collapse": report.multiline_layout(
        {
            "NC1 within-class variability (→ 0)": ["collapse/nc1$"],
            "NC2 class means → simplex ETF (→ 0)": [
                "collapse/nc2_equinorm$",
                "collapse/nc2_equiangular$",
                "collapse/nc2_cos_std$",
                "collapse/nc2_etf$",
            ],
            "NC2 head rows → simplex ETF (→ 0)": ["collapse/nc2_.*_w$"],
            "NC3 self-duality (→ 0)": ["collapse/nc3.*"],
            "NC4 agreement with nearest class mean (→ 1)": ["collapse/nc4$"],
            "Information interplay: MIR (↑), HDR (↓)": ["collapse/mir$", "collapse/hdr$"],
        }
    )
}


class CollapseMonitor(Callback):
    """Log NC1–NC4 (SPEC.md §4) and MIR/HDR (SPEC.md §3.3) of the classifier head's input.

    Args:
        head: name of the classifier ``nn.Linear`` in ``named_modules()``; ``"auto"`` takes the
            last ``nn.Linear``. Its input are the features, its rows the class heads.
        labels: where the labels are in a batch: an index (tuple/list batches) or a key (dict
            batches).
        every_n_epochs: log at the end of every n-th epoch (``(epoch + 1) % n == 0``).
        source: ``"train"`` reuses the training forward passes of the epoch (no extra compute);
            ``"val"`` uses the validation passes (sanity checking excluded).
        max_samples: bound on the deterministic sample of rows used for NC4, MIR and HDR.
        num_classes: size of the label space ``K`` (default: the head's ``out_features``);
            labels must lie in ``[0, K)``.
        strict: raise :class:`~lightning_spectral.errors.SpectralComputeError` instead of logging
            NaN with one warning when a metric cannot be computed.

    After each logging event ``last_metrics`` holds the logged values (tag → float) and
    ``history`` the ``(epoch, nc1)`` pairs so far (restored on resume).

    Logged tags (step = ``trainer.global_step``): ``collapse/<key>`` for every key of SPEC.md
    §4's table, ``collapse/mir`` and ``collapse/hdr``; with TensorBoard also the figure
    ``collapse/geometry`` and a ``collapse`` custom-scalars category.

    ``figure_budget`` (class attribute, default 0.01): the geometry figure (≈ 0.3–1 s to draw on a
    CPU) is skipped at an epoch end while figures have used more than this fraction of the fit's
    wall time; the last skipped one is drawn when training ends. Set it on an instance to draw
    more often (``1.0``: every epoch).
    """

    figure_budget: float = 0.01

    def __init__(
        self,
        head: str = "auto",
        labels: int | str = 1,
        every_n_epochs: int = 1,
        source: str = "train",
        max_samples: int = 4096,
        num_classes: int | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(head, str) or not head:
            raise SpectralConfigError(f"head must be a module name or 'auto', got {head!r}")
        if isinstance(labels, bool) or not isinstance(labels, int | str):
            raise SpectralConfigError(
                f"labels must be a batch index (int) or key (str), got {labels!r}"
            )
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or (every_n_epochs < 1)
        ):
            raise SpectralConfigError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        if source not in ("train", "val"):
            raise SpectralConfigError(f"source must be 'train' or 'val', got {source!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise SpectralConfigError(f"max_samples must be an int >= 1, got {max_samples!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise SpectralConfigError(
                f"num_classes must be None or an int >= 2, got {num_classes!r}"
            )
        self.head = head
        self.labels = labels
        self.every_n_epochs = every_n_epochs
        self.source = source
        self.max_samples = max_samples
        self.num_classes = num_classes
        self.strict = bool(strict)
        self._fail = FailSoft(self.strict, "CollapseMonitor")
        self._head_name: str | None = None
        self._head_module: nn.Linear | None = None
        self._handle: Any = None
        self._num_labels = 0
        self._dim = 0
        self._acc: ClassStatsAccumulator | None = None
        self._reservoir: RowReservoir | None = None
        self._gate = False
        self._pending_labels: torch.Tensor | None = None
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self._flush_rows = max(1024, max_samples)
        self._collecting_epoch: int | None = None
        self._problem_text: dict[int, str] = {}
        self._warned_absent = False
        self._layout_done = False
        self._figures = FigureClock()
        self._pending_figure: tuple | None = None
        self.history: list[tuple[int, float]] = []
        self.last_metrics: dict[str, float] = {}
        self._restored: dict[str, Any] | None = None

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(head=self.head, labels=self.labels, source=self.source)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": list(self.history), "epoch": self._collecting_epoch}
        if self._acc is not None and self._collecting_epoch is not None:
            self._flush()
            state["accumulator"] = self._acc.state_dict()
            if self._reservoir is not None:
                state["reservoir"] = self._reservoir.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(e), float(v)) for e, v in state_dict.get("history", [])]
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------ setup / teardown
    # ------------------------------------------------------------------ figures
    def _render(self, trainer: Any, figure: tuple) -> None:
        from lightning_spectral.plots.collapse import collapse_figure

        cosine, classes, history, epoch, step = figure
        with self._figures.timed():
            fig = collapse_figure(
                cosine, classes, history,
                title=f"neural collapse at epoch {epoch} (head {self._head_name!r})",
            )
            report.log_figure(trainer, "collapse/geometry", fig, step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._figures.start()
        self._pending_figure = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        figure, self._pending_figure = self._pending_figure, None
        if figure is not None and report.tensorboard_writers(trainer):
            try:
                self._render(trainer, figure)
            except Exception as exc:  # a figure never breaks the run
                self._fail.problem("figure", f"collapse figure: {type(exc).__name__}: {exc}")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._handle is not None:
            return
        name, module = self._resolve_head(pl_module)
        k = self.num_classes if self.num_classes is not None else module.out_features
        if k > module.out_features:
            raise SpectralConfigError(
                f"CollapseMonitor: num_classes={k} exceeds the head {name!r}'s out_features="
                f"{module.out_features}; every class needs a head row"
            )
        self._head_name, self._head_module = name, module
        self._num_labels, self._dim = k, module.in_features
        self._handle = module.register_forward_pre_hook(self._pre_hook)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._gate = False
        self._pending_labels = None
        self._buffer, self._buffered = [], 0

    def _resolve_head(self, pl_module: nn.Module) -> tuple[str, nn.Linear]:
        modules = dict(pl_module.named_modules())
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if self.head == "auto":
            if not linears:
                kinds = sorted({type(m).__name__ for m in modules.values()})
                raise SpectralConfigError(
                    "CollapseMonitor(head='auto'): the model has no nn.Linear to use as the "
                    f"classifier head; module types found: {kinds}"
                )
            return linears[-1], modules[linears[-1]]  # type: ignore[return-value]
        if self.head not in modules:
            raise SpectralConfigError(
                f"CollapseMonitor: no module named {self.head!r}; nn.Linear modules available: "
                f"{linears or 'none'}"
            )
        module = modules[self.head]
        if not isinstance(module, nn.Linear):
            raise SpectralConfigError(
                f"CollapseMonitor: head {self.head!r} is a {type(module).__name__}, not an "
                f"nn.Linear; nn.Linear modules available: {linears or 'none'}"
            )
        return self.head, module

    # ------------------------------------------------------------------ schedule
    def _due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every_n_epochs == 0

    def _start_epoch(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch)
        if not self._due(epoch) or self._handle is None:
            self._collecting_epoch = None
            return
        device = pl_module.device
        if self._acc is None or self._acc.device != torch.device(device):
            self._acc = ClassStatsAccumulator(
                self._num_labels, self._dim, device=device, num_problems=len(_PROBLEM_KEYS)
            )
            self._reservoir = RowReservoir(self.max_samples, self._dim, device=device)
        self._acc.reset()
        assert self._reservoir is not None
        self._reservoir.reset()
        self._buffer, self._buffered = [], 0
        self._problem_text = {}
        restored, self._restored = self._restored, None
        if restored is not None and restored.get("epoch") == epoch and "accumulator" in restored:
            # resuming inside this epoch: continue its accumulators
            self._acc.load_state_dict(restored["accumulator"])
            if "reservoir" in restored:
                self._reservoir.load_state_dict(restored["reservoir"])
        self._collecting_epoch = epoch

    # ------------------------------------------------------------------ capture
    def _extract_labels(self, batch: Any) -> torch.Tensor | None:
        key = self.labels
        if isinstance(batch, dict):
            if key not in batch:
                self._note(
                    _NO_LABELS,
                    f"labels key {key!r} not in the batch; keys found: {sorted(map(str, batch))}",
                )
                return None
            y = batch[key]
        elif isinstance(batch, list | tuple):
            if not isinstance(key, int) or not -len(batch) <= key < len(batch):
                self._note(
                    _NO_LABELS,
                    f"labels={key!r} does not index the batch, a "
                    f"{type(batch).__name__} of length {len(batch)}",
                )
                return None
            y = batch[key]
        else:
            self._note(
                _NO_LABELS,
                f"labels={key!r}: the batch is a {type(batch).__name__}, not a tuple, list or dict",
            )
            return None
        if not isinstance(y, torch.Tensor):
            self._note(_NO_LABELS, f"labels={key!r} selects a {type(y).__name__}, not a tensor")
            return None
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            self._note(_NOT_INTEGER, f"labels must be integer class indices, got dtype {y.dtype}")
            return None
        return y

    def _note(self, index: int, text: str) -> None:
        if self._acc is not None:
            self._acc.flag(index)
        self._problem_text.setdefault(index, text)

    def _begin_batch(self, batch: Any) -> None:
        if self._collecting_epoch is None:
            return
        self._pending_labels = self._extract_labels(batch)
        self._gate = self._pending_labels is not None

    def _end_batch(self) -> None:
        if self._gate and self._pending_labels is not None:
            self._note(_NOT_CALLED, f"the head {self._head_name!r} was not called on a batch")
        self._gate = False
        self._pending_labels = None

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._gate or self._pending_labels is None or not args:
            return
        y = self._pending_labels
        self._pending_labels = None  # first call of the head in this batch only
        self._gate = False
        features = args[0]
        if not isinstance(features, torch.Tensor):
            return
        h = features.detach()
        if h.ndim != 2:
            h = h.reshape(-1, h.shape[-1])
        y = y.detach().reshape(-1)
        if y.shape[0] != h.shape[0]:
            self._note(_SHAPE, f"{y.shape[0]} labels for {h.shape[0]} feature rows")
            return
        # per batch only a reference or a copy; the statistics are updated in bulk (``_flush``).
        # A CPU tensor that owns exactly its storage is kept as is (autograd saves the head
        # input, so it is not modified in place); a view is copied so that no larger buffer stays
        # alive, and accelerator tensors are always copied (CUDA graphs reuse static buffers).
        if h.device.type != "cpu" or not _owns_storage(h):
            h = h.clone()
        self._buffer.append((h, y))
        self._buffered += h.shape[0]
        if self._buffered >= self._flush_rows:
            self._flush()

    def _flush(self) -> None:
        """Move the buffered rows into the statistics and the reservoir (no host sync)."""
        if not self._buffer:
            return
        acc, res = self._acc, self._reservoir
        assert acc is not None and res is not None
        with torch.no_grad():
            h = torch.cat([b[0] for b in self._buffer]).to(acc.device)
            y = torch.cat([b[1] for b in self._buffer]).to(acc.device, torch.long)
            self._buffer, self._buffered = [], 0
            clamped = y.clamp(0, self._num_labels - 1)
            acc.flag(_BAD_RANGE, (clamped != y).sum())  # the epoch becomes NaN if > 0
            self._problem_text.setdefault(_BAD_RANGE, _RANGE_TEXT.format(k=self._num_labels))
            h64 = h.to(torch.float64)  # one conversion, shared by the statistics and the hash
            acc.update(h64, clamped)
            res.update(h, clamped, copy=False, rows64=h64)

    # training passes
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.source == "train":
            self._start_epoch(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.source == "train":
            self._begin_batch(batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.source == "train":
            self._end_batch()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.source == "train":
            self._finish_epoch(trainer, pl_module)

    # validation passes
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.source == "val" and not trainer.sanity_checking:
            self._start_epoch(trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.source == "val" and not trainer.sanity_checking:
            self._begin_batch(batch)

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.source == "val" and not trainer.sanity_checking:
            self._end_batch()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.source == "val" and not trainer.sanity_checking:
            self._finish_epoch(trainer, pl_module)

    # ------------------------------------------------------------------ epoch end
    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics of the rows accumulated so far (a collective under DDP).

        Returns 0-d float64 tensors keyed by tag suffix (``nc1``, …, ``nc4``, ``mir``, ``hdr``)
        plus ``_cosine``/``_classes`` for the figure and the problem counters.
        """
        acc, res, head = self._acc, self._reservoir, self._head_module
        assert acc is not None and res is not None and head is not None
        self._flush()
        acc.all_reduce()  # every rank, same order: the statistics ...
        rows, row_labels = res.gather()  # ... then the row sample
        weight = head.weight.detach()
        bias = head.bias.detach() if head.bias is not None else None
        # NC4's classifier argmax runs over all rows of the head (SPEC.md §4)
        out = _collapse_compute(
            acc.stats,
            weight,
            bias,
            rows=rows,
            row_labels=row_labels,
            dtype=torch.float64,
            geometry=True,
        )
        if rows.shape[0] > 0:
            # spectra in float32, the project's working precision (DESIGN.md); ~4× cheaper than
            # float64 for the (d·r)-sized eigenproblem and accurate to ~1e-4 in MIR/HDR
            inter = information_interplay(
                rows, weight.to(rows.device), row_labels, dtype=torch.float32
            )
            out["mir"] = inter["mir"].to(torch.float64)
            out["hdr"] = inter["hdr"].to(torch.float64)
        else:
            nan = torch.full((), math.nan, dtype=torch.float64, device=acc.device)
            out["mir"], out["hdr"] = nan, nan
        out["_problems"] = acc.problems.clone()
        out["_counts"] = acc.stats.counts.clone()
        finite = torch.isfinite(acc.stats.sums).all() & torch.isfinite(weight).all()
        out["_finite"] = finite.to(torch.float64)
        return out

    def _finish_epoch(self, trainer: Any, pl_module: Any) -> None:
        epoch = self._collecting_epoch
        self._gate = False
        self._pending_labels = None
        if epoch is None or self._acc is None:
            return
        self._collecting_epoch = None
        keys = (*collapse_keys(True), "mir", "hdr")
        try:
            out = self.compute()
        except Exception as exc:  # never crash mid-fit unless strict
            self._acc.reset()
            if self._reservoir is not None:
                self._reservoir.reset()
            self._fail.problem("compute", f"epoch {epoch}: {type(exc).__name__}: {exc}")
            host_s = {f"collapse/{k}": math.nan for k in keys}
            self.history.append((epoch, math.nan))
            self.last_metrics = dict(host_s)
            report.log_scalars(trainer, host_s, int(trainer.global_step))
            return
        scalars = {f"collapse/{k}": out[k] for k in keys}
        vectors = {
            "cosine": out["_cosine"],
            "classes": out["_classes"].to(torch.float64),
            "problems": out["_problems"],
            "counts": out["_counts"],
            "finite": out["_finite"],
        }
        host_s, host_v = report.to_host(scalars, vectors)  # the event's one host transfer
        self._acc.reset()
        assert self._reservoir is not None
        self._reservoir.reset()

        problems = host_v["problems"]
        if not host_v["finite"][0]:
            self._fail.problem(
                "nonfinite",
                f"epoch {epoch}: the head {self._head_name!r} or its input features hold NaN/Inf",
            )
            host_s = {k: math.nan for k in host_s}
        elif (problems > 0).any():
            for idx in range(len(_PROBLEM_KEYS)):
                if problems[idx] > 0:
                    text = self._problem_text.get(idx, _PROBLEM_KEYS[idx].replace("_", " "))
                    self._fail.problem(
                        _PROBLEM_KEYS[idx],
                        f"epoch {epoch}: {text} ({int(problems[idx])} occurrences across ranks)",
                    )
            host_s = {k: math.nan for k in host_s}
        else:
            counts = host_v["counts"]
            present = int((counts > 0).sum())
            if present < 2:
                seen = sorted(int(k) for k in host_v["classes"])
                self._fail.problem(
                    "one_class",
                    f"epoch {epoch}: {present} class(es) seen (labels {seen}); the collapse "
                    "metrics need at least two classes",
                )
                host_s = {k: math.nan for k in host_s}  # MIR/HDR too: the epoch is degenerate
            elif present < self._num_labels and not self._warned_absent:
                self._warned_absent = True
                absent = [i for i in range(self._num_labels) if counts[i] == 0]
                warnings.warn(
                    f"CollapseMonitor: epoch {epoch}: classes {absent} absent; metrics use the "
                    f"{present} classes present (SPEC.md §4); further warnings suppressed",
                    SpectralWarning,
                    stacklevel=2,
                )
        self.history.append((epoch, host_s["collapse/nc1"]))
        self.last_metrics = dict(host_s)
        step = int(trainer.global_step)
        report.log_scalars(trainer, host_s, step)
        if report.tensorboard_writers(trainer):
            if not self._layout_done:
                report.register_layout(trainer, LAYOUT)
                self._layout_done = True
            c = host_v["classes"].size
            if c >= 2:
                figure = (host_v["cosine"].reshape(c, c), host_v["classes"].astype(int).tolist(),
                          list(self.history), epoch, step)
                if self._figures.allowed(self.figure_budget):
                    self._pending_figure = None
                    self._render(trainer, figure)
                else:  # drawn at the end of the fit if no later epoch is drawn
                    self._pending_figure = figure
