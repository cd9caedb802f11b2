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
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import random
from collections.abc import Iterator
from importlib import import_module
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_spectral import capture as _capture_module
from lightning_spectral import report
from lightning_spectral._compat import FLAVOUR
from lightning_spectral.callbacks._base import (
    SpectralCallback,
    check_choice,
    check_int,
    full_tensor,
    logging_step,
    strategy_kind,
    warn_rank_zero,
)
from lightning_spectral.callbacks.curvature import _Silenced
from lightning_spectral.callbacks.penalty import unwrapped_training_step
from lightning_spectral.capture import LayerCapture, paused, resolve_layers, resolve_one
from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.functional.collapse import collapse_from_stats, collapse_keys
from lightning_spectral.functional.interplay import information_interplay
from lightning_spectral.stats import ClassStatsAccumulator, RowReservoir, distributed_world_size

__all__ = ["CollapseMonitor"]

rank_zero_info = import_module(f"{FLAVOUR}.utilities").rank_zero_info

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


def _keep(h: torch.Tensor) -> torch.Tensor:
    """The rows to hold until the next bulk update: a reference or a copy.

    A CPU tensor that owns exactly its storage is kept as is (autograd saves the head input, so
    it is not modified in place); a view is copied so that no larger buffer stays alive, and
    accelerator tensors are always copied (CUDA graphs reuse static buffers).
    """
    if h.device.type != "cpu" or not _owns_storage(h):
        return h.clone()
    return h


def _describe(module: nn.Linear) -> str:
    """``"Linear 64→10"`` (``"LazyLinear ?→10"`` before a lazy module's first forward)."""
    width_in = module.in_features or "?"
    return f"{type(module).__name__} {width_in}→{module.out_features}"


#: the tag namespace of each source
NAMESPACES = {"train": "collapse", "val": "collapse_val", "train_eval": "collapse_train_eval"}


class _HeadCapture(LayerCapture):
    """The monitor's capture: a :class:`LayerCapture` that keeps recording inside
    :func:`~lightning_spectral.capture.paused` while its monitor runs its own ``train_eval``
    pass, the one forward every *other* capture must not record. The pause is lifted only for
    the duration of this capture's own hook call."""

    monitor: CollapseMonitor | None = None

    def _make_pre_hook(self, name: str) -> Any:
        hook = super()._make_pre_hook(name)

        def own_pass_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            monitor = self.monitor
            if monitor is None or not monitor._own_pass:
                return hook(mod, args)
            counter = _capture_module._PAUSED
            held, counter[0] = counter[0], 0
            try:
                return hook(mod, args)
            finally:
                counter[0] = held

        return own_pass_hook


def layout(namespace: str = "collapse") -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars category of one monitor's tags (``collapse``, ``collapse_val`` or
    ``collapse_train_eval``)."""
    ns = namespace
    return {
        ns: report.multiline_layout(
            {
                "NC1 within-class variability (→ 0)": [f"^{ns}/nc1$"],
                "NC2 class means → simplex ETF (→ 0)": [
                    f"^{ns}/nc2_equinorm$",
                    f"^{ns}/nc2_equiangular$",
                    f"^{ns}/nc2_cos_std$",
                    f"^{ns}/nc2_etf$",
                ],
                "NC2 head rows → simplex ETF (→ 0)": [f"^{ns}/nc2_.*_w$"],
                "NC3 self-duality (→ 0)": [f"^{ns}/nc3.*"],
                "NC4 agreement with nearest class mean (→ 1)": [f"^{ns}/nc4$"],
                "Information interplay: MIR (↑), HDR (↓)": [f"^{ns}/mir$", f"^{ns}/hdr$"],
            }
        )
    }


LAYOUT = layout("collapse")


class CollapseMonitor(SpectralCallback):
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
            end while figures have used more than this fraction of the fit's wall time; the last
            skipped one is drawn when training ends (``1.0``: every epoch).
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

    @property
    def state_key(self) -> str:
        extra = {"prefix": self.prefix} if self.prefix else {}
        return self._generate_state_key(
            head=self.head, labels=self.labels, source=self.source, **extra
        )

    @property
    def head_name(self) -> str | None:
        """The module name of the head (``None`` while ``head="auto"`` is still undecided)."""
        return self._head_name

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
        self._buffered = 0
        self._pending_labels: torch.Tensor | None = None
        self._problem_text: dict[int, str] = {}
        self._host_problems = [0.0] * len(_PROBLEM_KEYS)
        self._warned_absent = False
        self._layout_done = False
        self._pending_figure: tuple | None = None

    def _open_capture(self, model: nn.Module, **kwargs: Any) -> LayerCapture:
        """The head's (or the candidates') capture, able to record in the train_eval pass."""
        kwargs.setdefault("owner", self._owner())
        kwargs.setdefault("warn", warn_rank_zero)
        capture = _HeadCapture(model, **kwargs)
        capture.monitor = self
        self._captures.append(capture)
        capture.attach()
        return capture

    def _install(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Resolve the head (or prepare to observe it) and open the capture."""
        if strategy_kind(trainer) in ("fsdp", "deepspeed"):
            raise SpectralConfigError(
                f"CollapseMonitor cannot read the classifier head's whole weight under "
                f"{type(trainer.strategy).__name__} (flat parameter shards); use "
                "ModelParallelStrategy (FSDP2) or DDP"
            )
        if self.source == "train_eval" and strategy_kind(trainer) != "plain":
            raise SpectralConfigError(
                "CollapseMonitor(source='train_eval') runs the model on each rank's share of the "
                "training set, which a sharded model cannot do rank by rank; use source='train' "
                "or 'val' under sharded strategies"
            )
        if self.source == "train_eval" and self.eval_step not in ("forward", "training_step"):
            if not callable(getattr(pl_module, self.eval_step, None)):
                raise SpectralConfigError(
                    f"CollapseMonitor(eval_step={self.eval_step!r}): {type(pl_module).__name__} "
                    f"has no method {self.eval_step!r}; use 'forward', 'training_step' or the "
                    "name of a method called as method(batch)"
                )
        self._acc, self._reservoir = None, None  # the head (and its width) may differ
        self._buffer, self._buffered = [], 0
        self._head_name, self._head_module, self._num_labels = None, None, 0
        modules = dict(pl_module.named_modules())
        linears = [n for n, m in modules.items() if n and isinstance(m, nn.Linear)]
        if self.head != "auto":
            self._choose(pl_module, self._named_head(pl_module, modules, linears), None)
            return
        self._candidates = self._auto_candidates(pl_module, modules)
        chosen = self._static_choice()
        if chosen is not None:
            self._choose(pl_module, *chosen)
            return
        # several candidates: the first monitored batch shows which is called last, and how wide
        # the labels need it to be
        self._probe = self._open_capture(
            pl_module, layers=list(self._candidates), pre=True, sink=self._on_probe
        )

    def _uninstall(self) -> None:
        """Forget the (now removed) captures and the batch in flight."""
        self._capture, self._probe = None, None
        self._pending_labels = None
        self._probe_order, self._probe_rows = [], {}

    # ------------------------------------------------------------------ the head
    def _named_head(
        self, model: nn.Module, modules: dict[str, nn.Module], linears: list[str]
    ) -> str:
        pattern = self.head
        if not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in modules if n):
            raise SpectralConfigError(
                f"CollapseMonitor: no module named {pattern!r}; nn.Linear modules available: "
                f"{linears or 'none'}"
            )
        name = resolve_one(model, pattern, what="head")
        module = modules[name]
        if not isinstance(module, nn.Linear):
            raise SpectralConfigError(
                f"CollapseMonitor: head {name!r} is a {type(module).__name__}, not an "
                f"nn.Linear; nn.Linear modules available: {linears or 'none'}"
            )
        return name

    @staticmethod
    def _auto_candidates(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Linear]:
        """The model's ``nn.Linear`` modules (lazy ones included), without those owned by an
        ``nn.MultiheadAttention`` (called functionally, never as modules)."""
        try:
            names = resolve_layers(model, "auto")
        except SpectralConfigError:
            names = []
        found = {n: modules[n] for n in names if isinstance(modules[n], nn.Linear)}
        if not found:
            kinds = sorted({type(m).__name__ for m in modules.values()})
            raise SpectralConfigError(
                "CollapseMonitor(head='auto'): the model has no nn.Linear to use as the "
                f"classifier head; module types found: {kinds}"
            )
        return found  # type: ignore[return-value]

    def _static_choice(self) -> tuple[str, str] | None:
        """``(name, reason)`` when the head follows from the model alone, else ``None``."""
        cands = self._candidates
        k = self.num_classes
        if k is not None:
            if all(m.out_features < k for m in cands.values()):
                widths = ", ".join(f"{n}: {m.out_features}" for n, m in cands.items())
                raise SpectralConfigError(
                    f"CollapseMonitor: num_classes={k} exceeds the out_features of every "
                    f"nn.Linear ({widths}); every class needs a head row"
                )
            equal = [n for n, m in cands.items() if m.out_features == k]
            if len(equal) == 1:
                return equal[0], f"the only Linear whose width equals the {k} classes"
            wide = [n for n, m in cands.items() if m.out_features >= k]
            if not equal and len(wide) == 1:
                return wide[0], f"the only Linear at least as wide as the {k} classes"
        if len(cands) == 1:
            return next(iter(cands)), "the model's only Linear"
        return None

    def _choose(self, model: nn.Module, name: str, reason: str | None) -> None:
        """Make ``name`` the head and open its capture; ``reason`` goes to one info line."""
        module = dict(model.named_modules())[name]
        assert isinstance(module, nn.Linear)
        k = self.num_classes if self.num_classes is not None else module.out_features
        if k > module.out_features:
            raise SpectralConfigError(
                f"CollapseMonitor: num_classes={k} exceeds the head {name!r}'s out_features="
                f"{module.out_features}; every class needs a head row"
            )
        self._head_name, self._head_module, self._num_labels = name, module, k
        self._capture = self._open_capture(model, layers=[name], pre=True, sink=self._on_rows)
        if reason is not None:
            rank_zero_info(f"CollapseMonitor: head {name!r} ({_describe(module)}) chosen: {reason}")

    def _on_probe(self, name: str, rows: torch.Tensor) -> None:
        """Sink of the first monitored batch's capture on every candidate: the call order, and
        the rows of the one module per width that could still become the head."""
        if self._pending_labels is None:
            return
        self._probe_order.append(name)
        width = self._candidates[name].out_features
        held = self._probe_rows.get(width)
        if held is None or held[0] != name:
            self._probe_rows[width] = (name, _keep(rows))

    def _decide(self, model: nn.Module) -> None:
        """Choose the head from the first monitored batch (``head="auto"``, several candidates)."""
        labels = self._pending_labels
        assert labels is not None and self._probe is not None
        if not self._probe_order:
            self._note(_NOT_CALLED, "no nn.Linear was called during a monitored batch")
            return
        last = {n: i for i, n in enumerate(self._probe_order)}
        called = sorted(last, key=last.__getitem__)  # by the position of their last call
        width = {n: self._candidates[n].out_features for n in called}
        listing = ", ".join(f"{n!r} ({_describe(self._candidates[n])})" for n in called)
        k = self.num_classes
        if k is not None:
            fit = [n for n in called if width[n] == k]
            reason = f"last Linear called whose width equals the {k} classes"
            if not fit:
                fit = [n for n in called if width[n] >= k]
                reason = f"last Linear called at least as wide as the {k} classes"
        else:
            top = labels.max() if labels.numel() else labels.new_full((), -1)
            if distributed_world_size() > 1:  # every rank must choose the same head
                top = top.clone()
                torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
            largest = int(top)  # once per fit: the only host read of a batch
            if largest < 0:
                return  # no labels in this batch: decide on the next one
            fit = [n for n in called if width[n] > largest]
            reason = (
                f"last Linear called that is wide enough for the labels (0..{largest} in the "
                "first monitored batch)"
            )
        if not fit:
            need = f"{k} classes" if k is not None else f"labels up to {largest}"
            raise SpectralConfigError(
                f"CollapseMonitor(head='auto'): no nn.Linear called in the forward is wide "
                f"enough for the {need}; called: {listing}. Pass head='<name>' (or check the "
                "labels)"
            )
        chosen = fit[-1]
        twins = [n for n in fit if n != chosen and width[n] == width[chosen]]
        if twins:
            raise SpectralConfigError(
                f"CollapseMonitor(head='auto'): {chosen!r} and {twins[-1]!r} are both called "
                f"with {width[chosen]} outputs and either could be the classifier; pass "
                f"head='{chosen}' or head='{twins[-1]}'"
            )
        rows = self._probe_rows[width[chosen]][1]
        self._probe.remove()
        self._probe, self._probe_order, self._probe_rows = None, [], {}
        self._choose(model, chosen, reason)
        if self._collecting_epoch is not None and self._acc is None:
            self._create(rows.shape[1], rows.device)
        self._add_rows(rows, labels, kept=True)  # the first batch counts too

    def _adopt_restored_head(self, model: nn.Module, restored: dict[str, Any]) -> None:
        """On resume, keep the head the checkpointed run chose instead of observing again."""
        name = restored.get("head")
        if self._probe is None or not isinstance(name, str) or name not in self._candidates:
            return
        self._probe.remove()
        self._probe = None
        self._choose(model, name, "restored from the checkpoint")

    # ------------------------------------------------------------------ statistics
    def _create(self, dim: int, device: torch.device) -> None:
        """The accumulators for ``dim`` features (problems noted so far carried over)."""
        self._acc = ClassStatsAccumulator(
            self._num_labels, dim, device=device, num_problems=len(_PROBLEM_KEYS)
        )
        self._reservoir = RowReservoir(self.max_samples, dim, device=device)
        for index, amount in enumerate(self._host_problems):
            if amount:
                self._acc.flag(index, amount)
        self._host_problems = [0.0] * len(_PROBLEM_KEYS)

    def _restore_statistics(self, restored: dict[str, Any], device: torch.device) -> None:
        """Continue the checkpointed epoch's statistics (a resume inside that epoch)."""
        self._problem_text.update(
            {int(k): str(v) for k, v in restored.get("problem_text", {}).items()}
        )
        host = restored.get("host_problems")
        if isinstance(host, list) and len(host) == len(_PROBLEM_KEYS):
            self._host_problems = [float(v) for v in host]
        state = restored.get("accumulator")
        if state is None:
            return
        try:
            if int(state["num_classes"]) != self._num_labels:
                raise ValueError(
                    f"{state['num_classes']} classes in the checkpoint, {self._num_labels} now"
                )
            self._create(int(state["dim"]), device)
            assert self._acc is not None and self._reservoir is not None
            self._acc.load_state_dict(state)
            if "reservoir" in restored:
                self._reservoir.load_state_dict(restored["reservoir"])
        except (ValueError, KeyError) as exc:
            self._acc, self._reservoir = None, None
            self._fail.problem(
                "restore",
                f"the checkpoint's statistics of epoch {restored.get('epoch')} do not fit: {exc}",
                consequence="that epoch's statistics restart at the resumed batch",
            )

    def _due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every_n_epochs == 0

    def _start_epoch(self, trainer: Any, pl_module: Any) -> None:
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

    def _collect(self, epoch: int, pl_module: Any, restored: dict[str, Any] | None) -> None:
        """Start collecting ``epoch``: empty statistics, or the checkpoint's (``restored``)."""
        device = torch.device(pl_module.device)
        self._buffer, self._buffered = [], 0
        self._problem_text = {}
        self._host_problems = [0.0] * len(_PROBLEM_KEYS)
        head = self._head_module
        if head is not None and head.in_features > 0:
            dim = head.in_features
            if self._acc is None or self._acc.device != device or self._acc.dim != dim:
                self._create(dim, device)
        else:  # undecided or lazy head: created from the first rows
            self._acc, self._reservoir = None, None
        if self._acc is not None and self._reservoir is not None:
            self._acc.reset()
            self._reservoir.reset()
        if restored is not None:  # resuming inside this epoch: continue its statistics
            self._restore_statistics(restored, device)
        self._collecting_epoch = epoch

    def _ensure_epoch(self, trainer: Any, pl_module: Any) -> None:
        """Start the epoch if ``on_train_epoch_start`` did not (a resume inside it skips it)."""
        if self._started_epoch != int(trainer.current_epoch):
            self._start_epoch(trainer, pl_module)

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
        else:
            self._host_problems[index] += 1.0
        self._problem_text.setdefault(index, text)

    def _begin_batch(self, batch: Any) -> None:
        if self._collecting_epoch is None:
            return
        self._pending_labels = self._extract_labels(batch)
        if self._pending_labels is None:
            return
        capture = self._capture if self._capture is not None else self._probe
        if capture is not None:
            capture.start()

    def _end_batch(self, pl_module: Any) -> None:
        if self._capture is not None:
            self._capture.stop()
        try:
            if self._probe is not None and self._probe.active:
                self._probe.stop()
                if self._pending_labels is not None:
                    self._decide(pl_module)
            elif self._pending_labels is not None and self._collecting_epoch is not None:
                self._note(_NOT_CALLED, f"the head {self._head_name!r} was not called on a batch")
        finally:
            self._pending_labels = None
            self._probe_order, self._probe_rows = [], {}

    def _on_rows(self, name: str, rows: torch.Tensor) -> None:
        """Sink of the head's capture: pair the first call of each batch with its labels."""
        labels, self._pending_labels = self._pending_labels, None
        if labels is None:
            return  # a further call of the head in this batch
        if self._acc is None and self._collecting_epoch is not None:
            self._create(rows.shape[1], rows.device)  # a lazy head: its width is known now
        self._add_rows(rows, labels)

    def _add_rows(self, h: torch.Tensor, y: torch.Tensor, kept: bool = False) -> None:
        """Buffer one batch's rows with their labels; the statistics are updated in bulk."""
        y = y.detach().reshape(-1)
        if y.shape[0] != h.shape[0]:
            self._note(_SHAPE, f"{y.shape[0]} labels for {h.shape[0]} feature rows")
            return
        if self._acc is not None and h.shape[1] != self._acc.dim:
            self._note(
                _SHAPE, f"the head's input has {h.shape[1]} features, {self._acc.dim} before"
            )
            return
        self._buffer.append((h if kept else _keep(h), y))
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

    # ------------------------------------------------------------------ figures
    def _render(self, trainer: Any, figure: tuple) -> None:
        from lightning_spectral.plots.collapse import collapse_figure

        cosine, classes, history, epoch, step = figure
        with self._figures.timed():
            fig = collapse_figure(
                cosine, classes, history,
                title=f"neural collapse at epoch {epoch} (head {self._head_name!r})",
            )
            self._figure(trainer, f"{self.namespace}/geometry", fig, step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._figures.start()
        self._pending_figure = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        figure, self._pending_figure = self._pending_figure, None
        if figure is not None and report.tensorboard_writers(trainer):
            self._draw(trainer, figure)

    def _draw(self, trainer: Any, figure: tuple) -> None:
        try:
            self._render(trainer, figure)
        except Exception as exc:  # a figure never breaks the run
            self._fail.problem(
                "figure",
                f"collapse figure: {type(exc).__name__}: {exc}",
                consequence="the figure was not drawn; the scalars were logged",
            )

    # ------------------------------------------------------------------ training passes
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.source == "train":
            self._start_epoch(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.source == "train":
            self._ensure_epoch(trainer, pl_module)
            self._begin_batch(batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.source == "train":
            self._end_batch(pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.source == "train":
            self._ensure_epoch(trainer, pl_module)
            self._finish_epoch(trainer, pl_module)
        elif self.source == "train_eval":
            self._train_eval(trainer, pl_module)

    # ------------------------------------------------------------------ the train_eval pass
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

    def _abandon_epoch(self) -> None:
        """Drop the statistics of an epoch that cannot be completed."""
        self._collecting_epoch = None
        self._pending_labels = None
        self._buffer, self._buffered = [], 0
        if self._acc is not None:
            self._acc.reset()
        if self._reservoir is not None:
            self._reservoir.reset()

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

    # ------------------------------------------------------------------ validation passes
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
            self._end_batch(pl_module)

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
        # FSDP2: the head's sharded weight is gathered (every rank computes this, in order)
        weight = full_tensor(head.weight.detach())
        bias = full_tensor(head.bias.detach()) if head.bias is not None else None
        # NC4's classifier argmax runs over all rows of the head
        # (docs/definitions.md#collapse-metrics)
        out = collapse_from_stats(
            acc.stats,
            weight,
            bias,
            rows=rows,
            row_labels=row_labels,
            dtype=torch.float64,
            geometry=True,
        )
        if rows.shape[0] > 0:
            # spectra in float32, the working precision; ~4× cheaper than float64 for the
            # (d·r)-sized eigenproblem and accurate to ~1e-4 in MIR/HDR
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

    def _log_nan(self, trainer: Any, epoch: int) -> None:
        keys = (*collapse_keys(True), "mir", "hdr")
        host_s = {f"{self.namespace}/{k}": math.nan for k in keys}
        self.history.append((epoch, math.nan))
        self.last_metrics = dict(host_s)
        self._log(trainer, host_s, logging_step(trainer), computed_on_every_rank=True)

    def _report_problems(self, epoch: int, counts: Any) -> bool:
        """One warning per kind of problem seen (counts per kind); True if there was any."""
        seen = False
        for idx, key in enumerate(_PROBLEM_KEYS):
            if counts[idx] > 0:
                seen = True
                text = self._problem_text.get(idx, key.replace("_", " "))
                self._fail.problem(
                    key, f"epoch {epoch}: {text} ({int(counts[idx])} occurrences across ranks)"
                )
        return seen

    def _finish_epoch(self, trainer: Any, pl_module: Any) -> None:
        epoch = self._collecting_epoch
        self._pending_labels = None
        if epoch is None:
            return
        self._collecting_epoch = None
        if self._acc is None:
            # no rows at all: the labels were never usable, or the head never ran
            if not self._report_problems(epoch, self._host_problems):
                what = "the head" if self._head_name is None else f"the head {self._head_name!r}"
                self._fail.problem(_PROBLEM_KEYS[_NOT_CALLED], f"epoch {epoch}: {what} was "
                                   "never called on a monitored batch")
            self._log_nan(trainer, epoch)
            return
        keys = (*collapse_keys(True), "mir", "hdr")
        try:
            out = self.compute()
        except Exception as exc:  # never crash mid-fit unless strict
            self._acc.reset()
            if self._reservoir is not None:
                self._reservoir.reset()
            self._fail.problem("compute", f"epoch {epoch}: {type(exc).__name__}: {exc}")
            self._log_nan(trainer, epoch)
            return
        scalars = {f"{self.namespace}/{k}": out[k] for k in keys}
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

        if not host_v["finite"][0]:
            self._fail.problem(
                "nonfinite",
                f"epoch {epoch}: the head {self._head_name!r} or its input features hold NaN/Inf",
            )
            host_s = {k: math.nan for k in host_s}
        elif self._report_problems(epoch, host_v["problems"]):
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
                warn_rank_zero(
                    f"CollapseMonitor: epoch {epoch}: classes {absent} absent; metrics use the "
                    f"{present} classes present; further warnings suppressed",
                    stacklevel=2,
                )
        self.history.append((epoch, host_s[f"{self.namespace}/nc1"]))
        self.last_metrics = dict(host_s)
        step = logging_step(trainer)
        self._log(trainer, host_s, step, computed_on_every_rank=True)
        if report.tensorboard_writers(trainer):
            if not self._layout_done:
                self._layout(trainer, layout(self.namespace))
                self._layout_done = True
            c = host_v["classes"].size
            if c >= 2:
                figure = (host_v["cosine"].reshape(c, c), host_v["classes"].astype(int).tolist(),
                          list(self.history), epoch, step)
                if self._figures.allowed(self.figure_budget):
                    self._pending_figure = None
                    self._draw(trainer, figure)
                else:  # drawn at the end of the fit if no later epoch is drawn
                    self._pending_figure = figure
