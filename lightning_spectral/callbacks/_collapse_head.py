"""Which ``nn.Linear`` is the classifier head of ``CollapseMonitor``, and its capture.

``head="<name>"`` (or a glob matching one module) is resolved at ``setup``. ``head="auto"``
takes the model's ``nn.Linear`` modules (not those owned by an ``nn.MultiheadAttention``) and
decides from the model alone when it can (one Linear, or one whose width fits ``num_classes``);
otherwise a probe capture on every candidate watches the first monitored batch and picks the
last Linear *called* that is wide enough for the labels (docs/collapse.md, "Which Linear is the
head"). The head's capture is a :class:`_HeadCapture`: a forward pre-hook read through a sink,
recording between :meth:`HeadChoice._begin_batch` and :meth:`HeadChoice._end_batch` only.
"""

from __future__ import annotations

import fnmatch
import time
from importlib import import_module
from typing import Any

import torch
from torch import nn

from lightning_spectral import capture as _capture_module
from lightning_spectral._compat import FLAVOUR
from lightning_spectral.callbacks._base import strategy_kind, warn_rank_zero
from lightning_spectral.callbacks._collapse_epoch import EpochReport
from lightning_spectral.callbacks._collapse_rows import _NOT_CALLED, _keep
from lightning_spectral.capture import LayerCapture, resolve_layers, resolve_one
from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.stats import distributed_world_size

rank_zero_info = import_module(f"{FLAVOUR}.utilities").rank_zero_info


def _describe(module: nn.Linear) -> str:
    """``"Linear 64→10"`` (``"LazyLinear ?→10"`` before a lazy module's first forward)."""
    width_in = module.in_features or "?"
    return f"{type(module).__name__} {width_in}→{module.out_features}"


class _HeadCapture(LayerCapture):
    """The monitor's capture: a :class:`LayerCapture` that keeps recording inside
    :func:`~lightning_spectral.capture.paused` while its monitor runs its own ``train_eval``
    pass, the one forward every *other* capture must not record. The pause is lifted only for
    the duration of this capture's own hook call."""

    monitor: HeadChoice | None = None

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


class HeadChoice(EpochReport):
    """Resolve the head (or observe the first batch to choose it) and run its capture."""

    head: str
    num_classes: int | None
    _capture: LayerCapture | None
    _probe: LayerCapture | None
    _candidates: dict[str, nn.Linear]
    _probe_order: list[str]
    _probe_rows: dict[int, tuple[str, torch.Tensor]]
    #: True while the monitor's own train_eval pass runs (see :class:`_HeadCapture`)
    _own_pass: bool
    eval_step: str

    # ------------------------------------------------------------------ setup and teardown
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
        self._buffer, self._stage, self._buffered = [], None, 0
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
        self._capture = self._open_capture(
            model, layers=[name], pre=True, sink=self._on_rows_charged
        )
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

    # ------------------------------------------------------------------ batches
    def _on_rows_charged(self, name: str, rows: Any) -> None:
        """The capture's sink: :meth:`_on_rows`, its time charged to the monitor's clock."""
        begin = time.perf_counter()
        try:
            self._on_rows(name, rows)
        finally:
            self._figures.charge(time.perf_counter() - begin)

    def _begin_batch(self, batch: Any) -> None:
        """Read the batch's labels and switch the capture on (its time charged to the clock)."""
        if self._collecting_epoch is None:
            return
        begin = time.perf_counter()
        self._pending_labels = self._extract_labels(batch)
        if self._pending_labels is not None:
            capture = self._capture if self._capture is not None else self._probe
            if capture is not None:
                capture.start()
        self._figures.charge(time.perf_counter() - begin)

    def _end_batch(self, pl_module: Any) -> None:
        """Switch the capture off, decide the head while it is being observed, and note a batch
        that never called it (the time charged to the clock)."""
        begin = time.perf_counter()
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
            if self._probe_order or self._probe_rows:  # only while the head is being observed
                self._probe_order, self._probe_rows = [], {}
            self._figures.charge(time.perf_counter() - begin)
