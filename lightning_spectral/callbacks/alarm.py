"""SpectralAlarm: the gate's rules evaluated while the model trains.

The alarm keeps its own bounded per-tag history of what was logged so far: every value the
library's callbacks logged, with its step (read from
:func:`lightning_spectral.report.published_since`, the record behind the values they also put
into ``trainer.callback_metrics``), and every other number in ``trainer.callback_metrics``
(what ``self.log`` produced) when it changes. At each evaluation point (end of a training
batch, of validation, of a training epoch) every check whose tag received a new value is
evaluated with the same rule semantics as ``lightning-spectral check`` (see
:mod:`lightning_spectral.gate`; a NaN value fails; the reducers are those of
:mod:`lightning_spectral.reduce`, trends included). Rules may compare with a reference run given
as ``baseline=`` (``"vne/* mean(last=3) >= 0.9 * baseline"``): it is read once at setup with
the gate's reader and reduced like the gate reduces it. A check failing ``patience`` consecutive
evaluations triggers ``action``: ``"stop"`` sets ``trainer.should_stop`` (like
``EarlyStopping``; under DDP the decision is shared by all ranks), ``"raise"`` raises
:class:`SpectralAlarmError`, ``"warn"`` emits one
:class:`~lightning_spectral.errors.SpectralWarning` per failing streak. The rule grammar is in
docs/gate.md; the alarm computes no mathematics of its own.

Every fit starts from an empty history (an alarm reused with a new ``Trainer`` counts its
strikes from zero again); only a ``ckpt_path`` resume, which restores the alarm's state,
continues the history and the strikes of the interrupted run. The alarm's warnings and log
messages go out on global rank zero only (only rank zero receives the monitors' values).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch

from lightning_spectral import report
from lightning_spectral._compat import (
    STEP_OUTPUT,
    LightningModule,
    Trainer,
    override,
    rank_zero_only,
)
from lightning_spectral.callbacks._base import (
    SpectralCallback,
    check_bool,
    check_choice,
    check_int,
    warn_rank_zero,
)
from lightning_spectral.errors import SpectralConfigError, SpectralError
from lightning_spectral.gate._common import GateInputError, _fmt
from lightning_spectral.gate.evaluate import _baseline_run, _Reduced
from lightning_spectral.gate.rules import Rule, parse_rule
from lightning_spectral.gate.runs import Run
from lightning_spectral.reduce import StreamingSeries

__all__ = ["SpectralAlarm", "SpectralAlarmError"]

log = logging.getLogger(__name__)

_ACTIONS: tuple[Literal["stop", "raise", "warn"], ...] = ("stop", "raise", "warn")


class SpectralAlarmError(SpectralError, RuntimeError):
    """Raised by ``SpectralAlarm(action="raise")`` when a rule keeps failing."""


class SpectralAlarm(SpectralCallback):
    """Stop, raise or warn during training when a gate rule fails ``patience`` times in a row.

    Args:
        rules: gate rules, ``"TAG_PATTERN [REDUCER] OP THRESHOLD"`` (see
            :mod:`lightning_spectral.gate`), e.g.
            ``["vne/* >= 1.0", "collapse/nc1 mean(last=3) < 0.5", "vne/* drop_from_max_rel
            <= 0.3", "erank/* mean(last=3) >= 0.8 * baseline"]``, or :class:`Rule` objects
            (:func:`~lightning_spectral.gate.load_rules`; ``optional`` is honoured for tags
            missing from the baseline). A glob gives one check per matching tag, tags being
            discovered as they are logged.
        patience: consecutive failing evaluations of a check before the action fires. A check is
            evaluated only when its tag received a new value.
        action: ``"stop"`` (``trainer.should_stop = True``), ``"raise"`` (
            :class:`SpectralAlarmError`) or ``"warn"``.
        watch_callback_metrics: also follow ``trainer.callback_metrics`` (``self.log`` values).
        baseline: a reference run (a log directory, an event file or a ``metrics.csv``, as
            ``lightning-spectral check --baseline`` reads it; or a
            :class:`~lightning_spectral.gate.Run`) for the rules that compare with
            ``baseline``: the same reducer on the same tag of that run, over the whole run. Read
            once, at setup; an unreadable run raises :class:`SpectralConfigError` there. A tag
            the baseline lacks fails its check (for an optional :class:`Rule`: one warning, and
            the check is skipped).

    A ``slope(last=K)`` check waits for the tag's second value (a slope needs two points).
    """

    def __init__(
        self,
        rules: list[str | Rule],
        patience: int = 1,
        action: Literal["stop", "raise", "warn"] = "stop",
        watch_callback_metrics: bool = True,
        baseline: str | os.PathLike | Run | None = None,
    ) -> None:
        super().__init__()
        if isinstance(rules, (str, Rule)):
            rules = [rules]
        if not rules:
            raise SpectralConfigError("SpectralAlarm needs at least one rule, e.g. "
                                      "rules=['vne/* >= 1.0']")
        try:
            self.rules: list[Rule] = [r if isinstance(r, Rule) else parse_rule(r)
                                      for r in rules]
        except GateInputError as exc:
            raise SpectralConfigError(f"SpectralAlarm: {exc}") from exc
        if baseline is not None and not isinstance(baseline, (str, os.PathLike, Run)):
            raise SpectralConfigError("SpectralAlarm: baseline must be a path to a run (or a "
                                      f"gate Run), got {type(baseline).__name__}")
        if baseline is None:
            for rule in self.rules:
                if rule.relative:
                    raise SpectralConfigError(
                        f"SpectralAlarm: rule {rule.text!r} compares with a baseline, but no "
                        "baseline was given (pass baseline='path/to/reference/run')")
        self.baseline = baseline
        self._baseline: _Reduced | None = None  # read at setup
        self.patience = check_int("patience", patience)
        self.action: Literal["stop", "raise", "warn"] = check_choice("action", action, _ACTIONS)
        self.watch_callback_metrics = check_bool("watch_callback_metrics",
                                                 watch_callback_metrics)
        self._window = max([r.window or 1 for r in self.rules])
        self._tag_rules: dict[str, frozenset[int]] = {}  # rule matching, fixed by the rules
        self._reset()

    def _reset(self) -> None:
        """An empty history: what a fresh fit starts from."""
        self._history: dict[str, StreamingSeries] = {}
        self._seen: dict[tuple[int, str], int] = {}  # (rule index, tag) -> version evaluated
        self._strikes: dict[tuple[int, str], int] = {}
        self._cm_cache: dict[str, float] = {}
        self._cm_names: set[str] = set()  # every callback-metric tag seen (for messages)
        self._published_seq = 0
        self._dirty: set[str] = set()  # tags with values not yet evaluated
        self.triggered: list[str] = []  # messages of the checks that fired
        self.stopped_step: int | None = None
        self._skipped: set[tuple[int, str]] = set()  # optional checks missing from the baseline

    # ------------------------------------------------------------------ state
    @override
    def _state_key_config(self) -> dict[str, Any]:
        return dict(rules=[r.text for r in self.rules], patience=self.patience,
                    action=self.action)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {tag: h.state() for tag, h in self._history.items()},
            "strikes": [[i, tag, n] for (i, tag), n in self._strikes.items()],
            "seen": [[i, tag, v] for (i, tag), v in self._seen.items()],
            "triggered": list(self.triggered),
            "stopped_step": self.stopped_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = {tag: StreamingSeries.from_state(s, self._window)
                         for tag, s in state_dict.get("history", {}).items()}
        self._strikes = {(int(i), str(t)): int(n) for i, t, n in state_dict.get("strikes", [])}
        # restored histories restart their version counters: everything counts as evaluated
        self._seen = {(int(i), str(t)): self._history[t].version
                      for i, t, _ in state_dict.get("seen", []) if t in self._history}
        self.triggered = list(state_dict.get("triggered", []))
        self.stopped_step = state_dict.get("stopped_step")

    # ------------------------------------------------------------------ intake
    def record(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Add logged values (``{tag: number}``) to the history; evaluated at the next hook."""
        for tag, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            hist = self._history.get(tag)
            if hist is None:
                hist = self._history[tag] = StreamingSeries(self._window)
            hist.add(number, step)
            self._dirty.add(tag)

    def _namespace(self) -> None:
        return None  # the alarm writes no tags

    def _install(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._load_baseline()
        # read only what this fit logs from now on
        self._published_seq = report.published_since(trainer, 1 << 62)[0]

    def _load_baseline(self) -> _Reduced | None:
        """Read the baseline run once (the gate's reader); SpectralConfigError if it cannot."""
        if self._baseline is None and self.baseline is not None:
            try:
                run = (self.baseline if isinstance(self.baseline, Run)
                       else _baseline_run(self.baseline))
            except GateInputError as exc:
                raise SpectralConfigError(f"SpectralAlarm: {exc}") from exc
            self._baseline = _Reduced(run)
        return self._baseline

    def _drain_published(self, trainer: Any) -> None:
        """Record every value the library's callbacks logged since the last evaluation."""
        self._published_seq, events = report.published_since(trainer, self._published_seq)
        for tag, value, step in events:
            self.record({tag: value}, step)

    def _rules_of(self, tag: str) -> frozenset[int]:
        """Indices of the rules whose pattern matches ``tag`` (cached: patterns are fixed)."""
        hit = self._tag_rules.get(tag)
        if hit is None:
            hit = self._tag_rules[tag] = frozenset(
                i for i, rule in enumerate(self.rules) if rule.matches(tag))
        return hit

    def _wanted(self, tag: str) -> bool:
        return bool(self._rules_of(tag))

    def _poll_callback_metrics(self, trainer: Any) -> None:
        """Read the ``self.log`` values that some rule names, all in one host transfer.

        Only tags a rule matches are read, so an alarm on spectral tags never touches the
        user's per-step metrics; the matched scalar tensors are stacked per device and moved
        to the host together (one synchronisation per poll on a GPU, not one per metric).
        """
        if not self.watch_callback_metrics:
            return
        metrics = dict(getattr(trainer, "callback_metrics", {}) or {})
        self._cm_names.update(metrics)
        numbers: dict[str, float] = {}
        by_device: dict[Any, list[tuple[str, torch.Tensor]]] = {}
        published = report.published_tags(trainer)  # read above, with their steps
        for tag, value in metrics.items():
            if tag in published or not self._wanted(tag):
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() == 1 and not value.is_complex():
                    by_device.setdefault(value.device, []).append((tag, value))
                continue
            try:
                numbers[tag] = float(value)
            except (TypeError, ValueError):
                continue
        for items in by_device.values():
            stacked = torch.stack([v.detach().reshape(()).to(torch.float32) for _, v in items])
            for (tag, _), number in zip(items, stacked.tolist(), strict=True):
                numbers[tag] = float(number)
        fresh = {}
        for tag, number in numbers.items():
            old = self._cm_cache.get(tag)
            if old is None or not (old == number or (math.isnan(old) and math.isnan(number))):
                fresh[tag] = number
                self._cm_cache[tag] = number
        if fresh:
            self.record(fresh, int(getattr(trainer, "global_step", 0)))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[str]:
        """Evaluate every check with new data; return the messages of checks that fire now."""
        fired: list[str] = []
        if not self._dirty:
            return fired
        # only tags with new values since the last evaluation, in the order they first appeared
        tags = [t for t in self._history if t in self._dirty]
        self._dirty = set()
        for i, rule in enumerate(self.rules):
            for tag in tags:
                if i not in self._rules_of(tag):
                    continue
                hist = self._history[tag]
                key = (i, tag)
                if self._seen.get(key) == hist.version:
                    continue
                self._seen[key] = hist.version
                if rule.reducer == "slope" and len(hist) < 2:
                    continue  # a slope needs two points: not evaluated yet
                value = hist.reduce(rule.reducer, rule.window)
                threshold = rule.threshold
                if rule.relative:
                    base = self._baseline_value(tag, rule)
                    if base is None and rule.optional:
                        if key not in self._skipped:
                            self._skipped.add(key)
                            warn_rank_zero(f"SpectralAlarm: {tag} is not in the baseline run "
                                           f"{self._baseline_label()}; optional rule "
                                           f"{rule.text!r} skips it")
                        continue
                    threshold = rule.threshold_for(base)
                    if base is None:
                        failure = (f"{tag} is not in the baseline run "
                                   f"{self._baseline_label()}")
                    else:
                        failure = (f"{rule.reducer_label} = {_fmt(value)}, expected {rule.op} "
                                   f"{_fmt(threshold)} ({rule.threshold_label}, baseline "
                                   f"{_fmt(base)})")
                else:
                    failure = (f"{rule.reducer_label} = {_fmt(value)}, expected {rule.op} "
                               f"{_fmt(threshold)}")
                if rule.compare(value, threshold):
                    self._strikes[key] = 0
                    continue
                strikes = self._strikes.get(key, 0) + 1
                self._strikes[key] = strikes
                if strikes == self.patience or (strikes > self.patience and self.action != "warn"):
                    fired.append(
                        f"SpectralAlarm: rule {rule.text!r} failed on {tag}: {failure} "
                        f"({strikes} consecutive evaluation{'s' if strikes > 1 else ''}, "
                        f"step {hist.step})"
                    )
        return fired

    def _baseline_value(self, tag: str, rule: Rule) -> float | None:
        """The rule's reducer on ``tag`` over the whole baseline run (None: not in it)."""
        base = self._load_baseline()
        return None if base is None else base.value(tag, rule)

    def _baseline_label(self) -> str:
        base = self._load_baseline()
        return base.run.label if base is not None else "-"

    def _check(self, trainer: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        self._drain_published(trainer)
        self._poll_callback_metrics(trainer)
        fired = self.evaluate()
        decision = bool(fired)
        if int(getattr(trainer, "world_size", 1)) > 1 and self.action != "warn":
            decision = bool(trainer.strategy.reduce_boolean_decision(decision, all=False))
        if not decision:
            return
        self.triggered.extend(fired)
        message = "; ".join(fired) if fired else "SpectralAlarm: a rule failed on another rank"
        if self.action == "raise":
            raise SpectralAlarmError(message)
        if self.action == "warn":
            warn_rank_zero(message)
            return
        if not trainer.should_stop:
            self.stopped_step = int(getattr(trainer, "global_step", 0))
            if getattr(rank_zero_only, "rank", 0) == 0:
                log.warning("%s; stopping the fit at step %d", message, self.stopped_step)
        trainer.should_stop = True

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._check(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Name the rules that never applied to anything (rank zero: only it has every tag)."""
        if getattr(rank_zero_only, "rank", 0) != 0:
            return  # other ranks never receive the monitors' values
        tags = sorted(set(self._history) | self._cm_names)
        unwatched: set[str] = set()
        if not self.watch_callback_metrics:
            unwatched = set(getattr(trainer, "callback_metrics", {}) or {})
        if not tags and not unwatched:
            return  # nothing was logged at all (e.g. a fit that ended before any event)
        no_tag: list[str] = []
        only_logged: list[str] = []
        for i, rule in enumerate(self.rules):
            if any(i in self._rules_of(t) for t in tags):
                continue
            if any(i in self._rules_of(t) for t in unwatched):
                only_logged.append(rule.text)
            else:
                no_tag.append(rule.text)
        if only_logged:
            warn_rank_zero(f"SpectralAlarm: rule(s) {only_logged} match only self.log values, "
                           "which this alarm does not follow (watch_callback_metrics=False); "
                           "they were never evaluated")
        if no_tag and tags:
            shown = ", ".join(tags[:10]) + (" ..." if len(tags) > 10 else "")
            warn_rank_zero(f"SpectralAlarm: rule(s) {no_tag} matched no logged tag, so they "
                           f"were never evaluated (logged: {shown})")
