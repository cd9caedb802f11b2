"""SpectralAlarm: the gate's rules evaluated while the model trains.

The alarm keeps its own bounded per-tag history of what was logged so far: every value the
library's callbacks logged, with its step (read from
:func:`lightning_spectral.report.published_since`, the record behind the values they also put
into ``trainer.callback_metrics``), and every other number in ``trainer.callback_metrics``
(what ``self.log`` produced) when it changes. At each evaluation point (end of a training
batch, of validation, of a training epoch) every check whose tag received a new value is
evaluated with the same rule semantics as ``lightning-spectral check`` (see
:mod:`lightning_spectral.gate`; a NaN value fails). A check failing ``patience`` consecutive
evaluations triggers ``action``: ``"stop"`` sets ``trainer.should_stop`` (like
``EarlyStopping``; under DDP the decision is shared by all ranks), ``"raise"`` raises
:class:`SpectralAlarmError`, ``"warn"`` emits one
:class:`~lightning_spectral.errors.SpectralWarning` per failing streak. The rule grammar and the
quantities' definitions are in docs/gate.md and SPEC.md; the alarm computes no mathematics.

Every fit starts from an empty history (an alarm reused with a new ``Trainer`` counts its
strikes from zero again); only a ``ckpt_path`` resume, which restores the alarm's state,
continues the history and the strikes of the interrupted run. The alarm's warnings and log
messages go out on global rank zero only (only rank zero receives the monitors' values).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from lightning_spectral import report
from lightning_spectral._compat import rank_zero_only
from lightning_spectral.callbacks._base import (
    SpectralCallback,
    check_bool,
    check_choice,
    check_int,
    warn_rank_zero,
)
from lightning_spectral.errors import SpectralConfigError, SpectralError
from lightning_spectral.gate import GateInputError, Rule, parse_rule
from lightning_spectral.reduce import StreamingSeries

__all__ = ["SpectralAlarm", "SpectralAlarmError"]

log = logging.getLogger(__name__)

_ACTIONS: tuple[Literal["stop", "raise", "warn"], ...] = ("stop", "raise", "warn")


class SpectralAlarmError(SpectralError, RuntimeError):
    """Raised by ``SpectralAlarm(action="raise")`` when a rule keeps failing."""


class SpectralAlarm(SpectralCallback):
    """Stop, raise or warn during training when a gate rule fails ``patience`` times in a row.

    Args:
        rules: gate rules, ``"TAG_PATTERN [REDUCER] OP VALUE"`` (see
            :mod:`lightning_spectral.gate`), e.g.
            ``["vne/* >= 1.0", "collapse/nc1 mean(last=3) < 0.5"]``. A glob gives one check per
            matching tag, tags being discovered as they are logged.
        patience: consecutive failing evaluations of a check before the action fires. A check is
            evaluated only when its tag received a new value.
        action: ``"stop"`` (``trainer.should_stop = True``), ``"raise"`` (
            :class:`SpectralAlarmError`) or ``"warn"``.
        watch_callback_metrics: also follow ``trainer.callback_metrics`` (``self.log`` values).
    """

    def __init__(
        self,
        rules: list[str],
        patience: int = 1,
        action: Literal["stop", "raise", "warn"] = "stop",
        watch_callback_metrics: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(rules, str):
            rules = [rules]
        if not rules:
            raise SpectralConfigError("SpectralAlarm needs at least one rule, e.g. "
                                      "rules=['vne/* >= 1.0']")
        try:
            self.rules: list[Rule] = [parse_rule(r) for r in rules]
        except GateInputError as exc:
            raise SpectralConfigError(f"SpectralAlarm: {exc}") from exc
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

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(rules=[r.text for r in self.rules],
                                        patience=self.patience, action=self.action)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {tag: h.state() for tag, h in self._history.items()},
            "strikes": [[i, tag, n] for (i, tag), n in self._strikes.items()],
            "seen": [[i, tag, v] for (i, tag), v in self._seen.items()],
            "triggered": list(self.triggered),
            "stopped_step": self.stopped_step,
        }

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
        # read only what this fit logs from now on
        self._published_seq = report.published_since(trainer, 1 << 62)[0]

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
                value = hist.reduce(rule.reducer, rule.window)
                if rule.compare(value):
                    self._strikes[key] = 0
                    continue
                strikes = self._strikes.get(key, 0) + 1
                self._strikes[key] = strikes
                if strikes == self.patience or (strikes > self.patience and self.action != "warn"):
                    fired.append(
                        f"SpectralAlarm: rule {rule.text!r} failed on {tag}: "
                        f"{rule.reducer_label} = {value:.6g}, expected {rule.op} "
                        f"{rule.threshold:g} ({strikes} consecutive evaluation"
                        f"{'s' if strikes > 1 else ''}, step {hist.step})"
                    )
        return fired

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

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._check(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._check(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._check(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
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
