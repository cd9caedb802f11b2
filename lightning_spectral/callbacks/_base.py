"""The skeleton every callback is built on.

A callback of this package reads as *due? → capture → functional → report*. What they all
share lives here, once:

- :class:`SpectralCallback`: the lifecycle. ``setup("fit")`` starts a **fresh** state (a
  callback reused in a new ``Trainer`` starts its schedule again; only a ``ckpt_path`` resume,
  whose ``load_state_dict`` runs after ``setup``, continues one) and installs the captures;
  ``teardown`` **and** ``on_exception`` (an error in ``training_step``, ``KeyboardInterrupt``,
  an alarm) remove every hook and wrapper, so nothing is left on the user's model.
- :class:`StepSchedule`: "due at optimizer step ``g``" (step 0 included unless told otherwise),
  the one rule of every step-based callback, with its state for resuming.
- :class:`FailSoft`: a metric that cannot be computed is reported once, on rank zero, with the
  true consequence; ``strict=True`` raises instead.
- :class:`FigureClock`: the wall-time budget of figures.
- ``check_*``: the constructor checks (one message style, :class:`SpectralConfigError`).

Hooks are registered only through :class:`lightning_spectral.capture.LayerCapture`.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from lightning_spectral import report
from lightning_spectral._compat import Callback, LightningModule, Trainer, override, rank_zero_only
from lightning_spectral.capture import LayerCapture
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError, SpectralWarning

__all__ = [
    "SpectralCallback",
    "StepSchedule",
    "FailSoft",
    "FigureClock",
    "warn_rank_zero",
    "check_int",
    "check_float",
    "check_choice",
    "check_layers",
    "check_bool",
    "check_tags",
    "logging_step",
    "full_tensor",
    "strategy_kind",
]

T = TypeVar("T")


# ------------------------------------------------------------------------------- checks
def check_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> Any:
    """``value`` if it is an ``int`` (not a bool) ``>= minimum`` (or ``None`` when optional)."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if optional else ""
        raise SpectralConfigError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")
    return value


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> float:
    """``float(value)`` if it is a finite real number within ``[low, high]`` (``(low, high]``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
        float(value)
    ):
        raise SpectralConfigError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise SpectralConfigError(f"{name} must be {bound}, got {value!r}")
    if high is not None and v > high:
        raise SpectralConfigError(f"{name} must be <= {high}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise SpectralConfigError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise SpectralConfigError(f"{name} must be True or False, got {value!r}")
    return value


def check_layers(name: str, value: Any) -> str | list[str]:
    """A layer selection: ``"auto"``, one name/glob pattern, or a list of them."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) and x for x in value):
        return list(value)
    raise SpectralConfigError(
        f"{name} must be 'auto', a module name/glob pattern or a list of them, got {value!r}"
    )


def check_tags(name: str, value: Any) -> list[str]:
    """``None`` or a list of tags / glob patterns (a single string is one pattern)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) and x for x in value):
        return list(value)
    raise SpectralConfigError(f"{name} must be None, a tag/glob or a list of them, got {value!r}")


def logging_step(trainer: Any, after_step: bool = False) -> int:
    """The step Lightning's own ``self.log`` writes to the loggers: the number of batches that
    stepped the optimizers (one per optimizer step, not one per optimizer); ``global_step`` as a
    fallback.

    ``after_step=True`` is for ``on_train_batch_end``, where the optimizers of the batch have
    stepped but Lightning has not counted the batch yet: it counts it, so a value computed from
    the new weights sits where ``global_step`` would put it with one optimizer.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    value = getattr(loop, "_batches_that_stepped", None)
    if not isinstance(value, int):
        return int(getattr(trainer, "global_step", 0))
    if after_step:
        accumulating = getattr(loop, "_should_accumulate", None)
        try:
            stepped = not accumulating() if callable(accumulating) else True
        except Exception:  # noqa: BLE001 - a loop state we cannot read: assume it stepped
            stepped = True
        value += int(stepped)
    return value


# ------------------------------------------------------------------------------- strategies
def strategy_kind(trainer: Any) -> str:
    """``"fsdp2"`` (``ModelParallelStrategy``: DTensor parameters), ``"fsdp"`` (``FSDPStrategy``:
    flat parameters), ``"deepspeed"``, or ``"plain"`` (single device, DDP: whole parameters)."""
    name = type(getattr(trainer, "strategy", None)).__name__
    if name == "ModelParallelStrategy":
        return "fsdp2"
    if name.startswith("FSDP"):
        return "fsdp"
    if name.startswith("DeepSpeed"):
        return "deepspeed"
    return "plain"


def full_tensor(t: Any) -> Any:
    """The whole tensor behind ``t``: a sharded ``DTensor`` (FSDP2) is gathered — a collective,
    so every rank must call this for the same tensors in the same order; anything else is
    returned as it is."""
    gather = getattr(t, "full_tensor", None)
    if callable(gather):
        return gather()
    return t


# ------------------------------------------------------------------------------- warnings
def warn_rank_zero(message: str, *, stacklevel: int = 3) -> None:
    """One :class:`SpectralWarning`, issued on global rank zero only."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        warnings.warn(message, SpectralWarning, stacklevel=stacklevel)


class FailSoft:
    """Records problems: raises when ``strict``, else warns once per ``key`` and carries on.

    ``consequence`` says what happened instead, in the warning: by default the value was logged
    as NaN; pass the true consequence otherwise (a skipped penalty, a finite value that is only
    suspicious). Warnings go out on global rank zero only.
    """

    def __init__(self, strict: bool, owner: str) -> None:
        self.strict = bool(strict)
        self.owner = owner
        self._warned: set[str] = set()

    def problem(self, key: str, message: str, consequence: str | None = "logged as NaN") -> None:
        """Report that a metric could not be computed (or is suspicious)."""
        text = f"{self.owner}: {message}"
        if self.strict:
            raise SpectralComputeError(text)
        if key in self._warned:
            return
        self._warned.add(key)
        tail = f" ({consequence}; further warnings of this kind suppressed)" if consequence else (
            " (further warnings of this kind suppressed)"
        )
        warn_rank_zero(text + tail, stacklevel=4)

    def reset(self) -> None:
        """Warn again (a new fit)."""
        self._warned.clear()


# ------------------------------------------------------------------------------- schedule
class StepSchedule:
    """Due at optimizer step ``g`` when ``g`` has reached the next multiple of ``every``.

    ``first`` is the first due step (0: step 0 included). After an event at ``g``,
    :meth:`done` moves the next due step to the first multiple of ``every`` after ``g``, so a
    skipped step (resume, a postponed event) never shifts the grid. :meth:`postpone` makes the
    next step due instead (an event that could not be taken at ``g``).
    """

    def __init__(self, every: int, first: int = 0) -> None:
        self.every = int(every)
        self.first = int(first)
        self.next = self.first

    def due(self, step: int) -> bool:
        return step >= self.next

    def after(self, step: int) -> int:
        return (step // self.every + 1) * self.every

    def done(self, step: int) -> None:
        self.next = self.after(step)

    def postpone(self, step: int) -> None:
        self.next = step + 1

    def reset(self) -> None:
        self.next = self.first

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, state: dict[str, Any] | int | None) -> None:
        if isinstance(state, dict):
            state = state.get("next")
        self.next = self.first if state is None else int(state)


class FigureClock:
    """The figure budget shared by the callbacks that draw (``figure_budget`` arguments).

    ``start()`` at the beginning of training; wrap each drawing in ``with clock.timed():``;
    ``allowed(budget)`` is true for the first figure and then while drawing — plus the other
    work a callback charges to it (:meth:`charge`) — has used at most ``budget`` of the wall
    time since ``start()``.
    """

    def __init__(self) -> None:
        self.t0: float | None = None
        self.seconds = 0.0
        self.work = 0.0
        self.drawn = 0

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        self.work = 0.0
        self.drawn = 0

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of the callback's own (non-figure) work against the budget."""
        self.work += max(float(seconds), 0.0)

    def allowed(self, budget: float) -> bool:
        if self.t0 is None or self.drawn == 0:
            return True
        return self.within(budget)

    def within(self, budget: float) -> bool:
        """Figures and charged work together have used at most ``budget`` of the wall time
        since ``start()`` (always true before it)."""
        if self.t0 is None:
            return True
        return self.seconds + self.work <= budget * (time.perf_counter() - self.t0)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - begin
            self.drawn += 1


# ------------------------------------------------------------------------------- skeleton
#: the Lightning hooks called on every batch. Lightning dispatches each one to every callback
#: through its profiler context (≈ 2 µs per hook and callback, whether the callback implements it
#: or not) and skips an attribute that is not callable: a subclass of :class:`SpectralCallback`
#: that does not implement one of them gets a :class:`_SkippedHook` instead, so that a step pays
#: only for the hooks the callback uses.
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)


class _SkippedHook:
    """A per-batch Lightning hook the class does not implement (see :data:`PER_BATCH_HOOKS`).

    Read on an instance it is ``None``, which Lightning's dispatch skips without entering its
    profiler. Read through ``super()`` from a subclass that implements the hook, or on the
    class, it is Lightning's no-op, so ``super().on_after_backward(trainer, pl_module)`` still
    works and introspection sees an ordinary method.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        noop = getattr(Callback, self.name)
        if obj is None:
            return noop
        for klass in type(obj).__mro__:
            if self.name in klass.__dict__:
                # a plain attribute lookup finds the first definition in the MRO: this
                # descriptor only when no subclass implements the hook; otherwise we are
                # reached through super()
                return None if klass.__dict__[self.name] is self else noop.__get__(obj)
        return None


class SpectralCallback(Callback):
    """Base class of the package's callbacks: lifecycle, captures, fail-soft and figure budget.

    Subclasses implement :meth:`_reset` (the state a fresh fit starts from), :meth:`_install`
    (resolve modules and open captures with :meth:`_open_capture`) and, if they change anything
    else on the model, :meth:`_uninstall`. They must not register hooks themselves.

    Args:
        strict: raise :class:`~lightning_spectral.errors.SpectralComputeError` where a metric
            cannot be computed, instead of logging NaN with one warning.
        figure_budget: fraction of the fit's wall time figures may use (the first figure is
            always drawn); ``0`` draws only the first, ``1`` every one.
        prefix: prepended to every tag the callback writes (scalars, histograms, figures) and to
            its dashboard categories, so two instances of one callback can share a Trainer.
        prog_bar: tags or glob patterns (with the prefix) also shown in the progress bar.

    Every scalar goes to the loggers (rank zero) at :func:`logging_step` and into
    ``trainer.callback_metrics`` on every rank, where ``EarlyStopping``, ``ModelCheckpoint`` and
    callbacks listed after this one read it.
    """

    #: the stages whose ``setup`` installs the callback
    stages: tuple[str, ...] = ("fit",)

    def __init__(
        self,
        *,
        strict: bool = False,
        figure_budget: float = 0.01,
        prefix: str = "",
        prog_bar: str | list[str] | None = None,
    ) -> None:
        super().__init__()
        self.strict = check_bool("strict", strict)
        self.figure_budget = check_float("figure_budget", figure_budget, 0.0, 1.0)
        if not isinstance(prefix, str) or any(c.isspace() for c in prefix):
            raise SpectralConfigError(f"prefix must be a string without spaces, got {prefix!r}")
        self.prefix = prefix
        self.prog_bar = check_tags("prog_bar", prog_bar)
        self._fail = FailSoft(self.strict, self._owner())
        self._figures = FigureClock()
        self._captures: list[LayerCapture] = []

    # -- identity ------------------------------------------------------------------------------
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in PER_BATCH_HOOKS:
            if getattr(cls, name) is getattr(Callback, name):  # Lightning's own no-op
                setattr(cls, name, _SkippedHook(name))

    def __setattr__(self, name: str, value: Any) -> None:
        if name[0] != "_":  # a public (configuration) attribute: the key may change
            self.__dict__.pop("_state_key_cache", None)
        object.__setattr__(self, name, value)

    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the class name and the
        configuration that tells two instances apart (:meth:`_state_key_config`).

        Lightning reads it around every hook call of every callback (its profiler names each
        call after it), so it is formatted once and kept until a public attribute is assigned
        or a list of the configuration is changed in place (``monitor.layers.append(...)``)."""
        cached = self.__dict__.get("_state_key_cache")
        if cached is not None and all(tuple(v) == seen for v, seen in cached[1]):
            return cached[0]
        config = self._state_key_config()
        lists = tuple((v, tuple(v)) for v in config.values() if isinstance(v, list))
        key = self._generate_state_key(**config)
        self.__dict__["_state_key_cache"] = (key, lists)
        return key

    def _state_key_config(self) -> dict[str, Any]:
        """The configuration in :attr:`state_key` (keyword arguments of Lightning's
        ``_generate_state_key``); its values must not change for a given configuration, or
        the state saved by earlier versions is no longer found on resume."""
        return {}

    def _namespace(self) -> tuple[Any, ...] | None:
        """What makes this instance's tags its own (``None``: it writes no tags). Two instances
        of one class with equal namespaces in one Trainer would write the same tags."""
        return (self.prefix,)

    def _check_namespace(self, trainer: Any) -> None:
        mine = self._namespace()
        if mine is None:
            return
        for other in getattr(trainer, "callbacks", None) or []:
            if other is self or type(other) is not type(self):
                continue
            if other._namespace() == mine:
                raise SpectralConfigError(
                    f"two {type(self).__name__} callbacks in one Trainer would write the same "
                    f"tags (prefix={self.prefix!r}); give each a distinct prefix=..."
                )

    def _log(
        self,
        trainer: Any,
        metrics: Mapping[str, float],
        step: int,
        *,
        computed_on_every_rank: bool,
    ) -> dict[str, float]:
        """Log ``metrics`` (tags without the prefix) at ``step``: to the loggers on rank zero and
        into ``trainer.callback_metrics`` on every rank.

        Values computed on rank zero only are broadcast first (every rank must call this at the
        same point then, with an empty mapping off rank zero); returns the logged values.
        """
        values = {self.prefix + tag: float(v) for tag, v in metrics.items()}
        if not computed_on_every_rank and int(getattr(trainer, "world_size", 1) or 1) > 1:
            values = trainer.strategy.broadcast(values, src=0)
        report.log_scalars(trainer, values, step, prog_bar=self.prog_bar)
        return values

    def _layout(self, trainer: Any, categories: Mapping[str, Mapping[str, list[Any]]]) -> None:
        """Register dashboard categories, their titles and tag patterns under the prefix."""
        if self.prefix:
            esc = re.escape(self.prefix)
            categories = {
                f"{self.prefix}{category}": {
                    title: [spec[0], [
                        "^" + esc + (rx[1:] if rx.startswith("^") else rx) for rx in spec[1]
                    ]]
                    for title, spec in charts.items()
                }
                for category, charts in categories.items()
            }
        report.register_layout(trainer, categories)

    def _histogram(self, trainer: Any, tag: str, values: Any, step: int) -> None:
        report.log_histogram(trainer, self.prefix + tag, values, step)

    @contextlib.contextmanager
    def _charged(self) -> Iterator[None]:
        """Charge the enclosed work (figures excluded: they are timed already) to the figure
        clock, so that what the clock allows (figures within ``figure_budget``, and whatever
        else a callback budgets on it) is measured against the callback as a whole."""
        begin, drawing = time.perf_counter(), self._figures.seconds
        try:
            yield
        finally:
            spent = time.perf_counter() - begin
            self._figures.charge(spent - (self._figures.seconds - drawing))

    def _figure(self, trainer: Any, tag: str, figure: Any, step: int) -> None:
        report.log_figure(trainer, self.prefix + tag, figure, step)

    def _owner(self) -> str:
        return type(self).__name__

    # -- to implement ------------------------------------------------------------------------
    def _reset(self) -> None:
        """Return to the state a fresh fit starts from (schedule, history, accumulators)."""

    def _install(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Resolve modules and open the captures (called by ``setup``)."""

    def _uninstall(self) -> None:
        """Undo whatever :meth:`_install` changed besides the captures (idempotent)."""

    # -- captures ------------------------------------------------------------------------------
    def _open_capture(self, model: nn.Module, **kwargs: Any) -> LayerCapture:
        """A :class:`LayerCapture` on ``model``, attached now and removed by :meth:`release`."""
        kwargs.setdefault("owner", self._owner())
        kwargs.setdefault("warn", warn_rank_zero)
        capture = LayerCapture(model, **kwargs)
        self._captures.append(capture)
        capture.attach()
        return capture

    def release(self) -> None:
        """Remove every hook and wrapper this callback put on the model (idempotent)."""
        captures, self._captures = self._captures, []
        for capture in captures:
            capture.remove()
        self._uninstall()

    @property
    def hooks_attached(self) -> bool:
        """True while any of this callback's hooks is on a module."""
        return any(c.attached for c in self._captures)

    # -- Lightning hooks -----------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages:
            return
        self.release()  # hooks left by an earlier fit that ended without teardown
        self._check_namespace(trainer)
        if stage == "fit":
            self._reset()
            self._fail.reset()
        self._install(trainer, pl_module, stage)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.release()

    @override
    def on_exception(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        exception: BaseException,
    ) -> None:
        self.release()
