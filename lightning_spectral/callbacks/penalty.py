"""VNE penalty: add ``−α · VNE`` of a layer's output to the training loss.

``L_total = L_task − α · VNE(H_batch)`` (docs/definitions.md#vne-penalty): ``α > 0`` ("VNE⁺")
raises the von Neumann entropy of the layer's representation (spreads its eigenvalues), ``α < 0``
("VNE⁻") lowers it. ``VNE`` is :func:`lightning_spectral.functional.vne` (#vne), computed in
float32 (float64 for a float64 model) with autocast disabled, on the device where the
activations live.

Two ways to use it, side by side::

    # automatic: the callback adds the term to what training_step returns
    trainer = Trainer(callbacks=[VNEPenalty(layer="features", alpha=0.1)])

    # explicit (manual optimization, or if you prefer to see it in your code)
    penalty = VNEPenalty(layer="features", alpha=0.1, inject=False)
    trainer = Trainer(callbacks=[penalty])
    ...
    def training_step(self, batch, batch_idx):
        loss = ...                      # the forward pass through self.features happens here
        loss = loss + penalty.term(self)
        ...

How it works: at ``setup("fit")`` the layer is resolved (its exact name, or a glob pattern that
matches exactly one module) and the package's one capture path
(:class:`~lightning_spectral.capture.LayerCapture` with ``detach=False``) is opened on it. While
a due training step runs, the capture hands every call's output to the penalty as rows, *with
its graph*, reduced by the module-type table of :mod:`lightning_spectral.capture` (a
convolution or normalisation feature map ``(n, c, *spatial)`` is averaged over its spatial
positions to ``(n, c)``; a packed sequence gives its real tokens; any other output ``(…, d)``
becomes the rows ``(n·…, d)``). Forward passes that autograd re-runs during the backward pass
(gradient checkpointing) are not captured again. With ``inject=True`` the LightningModule's
``training_step`` is wrapped (an instance attribute, so Lightning's strategy and DDP forward
redirection call it) and the penalty is added to the returned loss (a tensor or the ``"loss"``
of a dict) *before* Lightning divides it for gradient accumulation, scales it for AMP and calls
backward once.

Lifecycle: every fit starts a fresh schedule (a callback reused with a new ``Trainer`` penalises
the fit's first step again); only a ``ckpt_path`` resume, which restores the callback's state,
continues the schedule of the interrupted run. The capture and the wrapper are removed at
``teardown`` and in ``on_exception`` (an error in ``training_step``, ``KeyboardInterrupt``),
leaving the module exactly as it was; values of completed steps are still written on an
exception.

If the layer runs several times in one step (several augmented views), the VNE of each call's
batch is computed and the values are averaged (docs/definitions.md#vne-penalty).

Non-finite input or VNE: the penalty is skipped for that step without a host synchronisation
(a ``torch.where`` mask on the value, and a gradient hook that zeroes the penalty's gradient),
``vne/<layer>`` is logged as NaN and one :class:`~lightning_spectral.errors.SpectralWarning` is
issued; with ``strict=True`` the step raises
:class:`~lightning_spectral.errors.SpectralComputeError` instead (this check synchronises).

Logged tags (through :mod:`lightning_spectral.report`, x-axis ``trainer.global_step``):
``vne/<layer>`` — the VNE of the penalised batch (mean over views and accumulated micro-batches);
``vne_penalty/<layer>`` — the term added to the loss, ``−α · VNE`` (0 where skipped). Values stay
on the device and are moved to the host in one copy every ``trainer.log_every_n_steps``
optimizer steps (and at the end of training), so the penalty adds no synchronisation to a step.

Kept in one module, longer than most: it is one callback whose capture, ``training_step``
wrapper, deferred logging and resume state act on one per-fit state, plus the small functions
it is built from (:func:`vne_penalty_term`, and :func:`unwrapped_training_step`, which the
other callbacks use to call ``training_step`` beneath the penalty); this docstring is a
ninth of it.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_spectral import report
from lightning_spectral._compat import STEP_OUTPUT, LightningModule, Trainer, override
from lightning_spectral.callbacks._base import (
    SpectralCallback,
    StepSchedule,
    check_bool,
    check_float,
    check_int,
    logging_step,
)
from lightning_spectral.capture import LayerCapture, module_rows, reduction_for, resolve_one
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError
from lightning_spectral.functional.spectrum import vne

__all__ = ["VNEPenalty", "vne_penalty_term", "reduce_rows", "unwrapped_training_step"]

#: set on the ``training_step`` wrapper of ``VNEPenalty(inject=True)``
_WRAPPER_MARK = "__lightning_spectral_wrapper__"


def reduce_rows(module: nn.Module | None, output: Any) -> torch.Tensor | None:
    """A layer output as a representation batch ``(rows, features)`` (docs/definitions.md#rows).

    A thin wrapper over the capture's table:
    ``capture.module_rows(capture.reduction_for(module), output)`` — the rows the penalty (and
    ``SpectralMonitor``) take from ``module``'s output. A tuple/list output contributes its
    first tensor, a packed sequence its real tokens; channel-first outputs (convolutions,
    batch/group/instance norms, pooling) give ``(n, c, *spatial) → (n, c)`` by the spatial mean;
    channel-last outputs give ``(…, d) → (∏…, d)``. With ``module=None`` the output's shape
    decides (4-D and 5-D outputs are channel-first). The graph is kept. ``None`` for outputs
    that hold no floating tensor.
    """
    return module_rows(reduction_for(module) if module is not None else None, output)


def unwrapped_training_step(pl_module: Any) -> Callable[..., Any]:
    """``pl_module.training_step`` without the wrapper of ``VNEPenalty(inject=True)``.

    For callbacks that evaluate the training loss themselves (``CurvatureMonitor``): calling
    through the wrapper would add the penalty to their loss and record it as a training step.
    """
    fn = pl_module.training_step
    while getattr(fn, _WRAPPER_MARK, False):
        fn = fn.__wrapped__
    return fn


@contextlib.contextmanager
def _autocast_off(device_type: str) -> Iterator[None]:
    """Disable autocast on ``device_type`` (eigenvalues are never computed in half precision)."""
    try:
        ctx: contextlib.AbstractContextManager[Any] = torch.autocast(device_type=device_type,
                                                                     enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def vne_penalty_term(
    views: Sequence[torch.Tensor], alpha: float, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The term ``−α · mean_views VNE(h_v)`` to add to a loss, masked if not finite.

    See docs/definitions.md#vne-penalty. ``views`` are representation batches ``(n, d)``
    (already reduced to rows, #rows), each keeping its graph. Each is cast to float32 (float64
    stays float64) with autocast disabled, its non-finite entries are replaced by 0, and
    :func:`~lightning_spectral.functional.vne` (#vne) is taken; the values are averaged over the
    views.

    Returns ``(term, vne_value, ok)``: ``term`` is ``−α · VNE`` with its graph, or exactly 0 when
    ``ok`` is false; ``vne_value`` is the detached VNE (NaN when not ``ok``); ``ok`` is a 0-d
    bool tensor, false when any input entry or the VNE is not finite. When ``ok`` is false the
    gradient the term sends to the inputs is exactly 0 (a gradient hook masks it), so the
    penalty itself sends neither NaN nor Inf into the model. No host synchronisation.
    """
    if len(views) == 0:
        raise ValueError("vne_penalty_term needs at least one view")
    values: list[torch.Tensor] = []
    finite_inputs: list[torch.Tensor] = []
    sanitized: list[torch.Tensor] = []
    with _autocast_off(views[0].device.type):
        for h in views:
            work = h if h.dtype == torch.float64 else h.float()
            finite = torch.isfinite(work)
            finite_inputs.append(finite.all())
            safe = torch.where(finite, work, torch.zeros_like(work))
            sanitized.append(safe)
            values.append(vne(safe, normalize=normalize))
        value = torch.stack(values).mean() if len(values) > 1 else values[0]
        ok = torch.stack(finite_inputs).all() & torch.isfinite(value)
        term = torch.where(ok, value * (-float(alpha)), torch.zeros_like(value))
    for safe in sanitized:
        if safe.requires_grad:
            safe.register_hook(_mask_gradient(ok))
    value_out = torch.where(ok, value.detach(), torch.full_like(value.detach(), float("nan")))
    return term, value_out, ok


def _mask_gradient(ok: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, grad, torch.zeros_like(grad))

    return hook


class VNEPenalty(SpectralCallback):
    """Von Neumann entropy regularizer ``L_total = L_task − α · VNE(H)``.

    See docs/definitions.md#vne-penalty.

    Args:
        layer: name of the module (as in ``named_modules()``) whose output ``H`` is penalised,
            or a glob pattern matching exactly one module.
        alpha: ``α``; ``> 0`` raises the entropy (VNE⁺), ``< 0`` lowers it (VNE⁻), ``0`` only
            logs (training is then bit-identical to training without the callback). The paper
            recommends ``|α| ≪ 0.5`` with batches of at least 32 samples.
        every_n_steps: apply (and log) the penalty at the optimizer steps
            (``trainer.global_step``) that are multiples of ``every_n_steps``, step 0 included
            — every micro-batch of an accumulated step is penalised.
        normalize: normalise the rows of ``H`` before the autocorrelation
            (docs/definitions.md#vne).
        strict: raise :class:`~lightning_spectral.errors.SpectralComputeError` on a non-finite
            VNE instead of skipping the penalty for that step with one warning.
        inject: add the penalty to what ``training_step`` returns (automatic optimization
            only). With ``inject=False`` nothing is added: call :meth:`term` in your
            ``training_step`` (required with manual optimization).
        prefix: prepended to every tag and to the dashboard category.
        prog_bar: tags or glob patterns (with the prefix) also shown in the progress bar.

    Logged tags: ``vne_penalty/<layer>`` (the term ``−α·VNE`` added to the loss) and
    ``vne_penalty/vne/<layer>`` (the VNE of the penalised batch) — their own namespace, so a
    ``SpectralMonitor`` watching the same layer never writes the same tag.
    """

    def __init__(
        self,
        layer: str,
        alpha: float = 0.1,
        every_n_steps: int = 1,
        normalize: bool = True,
        strict: bool = False,
        inject: bool = True,
        prefix: str = "",
        prog_bar: str | list[str] | None = None,
    ) -> None:
        if not isinstance(layer, str) or not layer:
            raise SpectralConfigError(
                f"layer must be a module name or glob pattern (str), got {layer!r}"
            )
        self.layer = layer
        super().__init__(strict=strict, prefix=prefix, prog_bar=prog_bar)
        self.alpha = check_float("alpha", alpha)
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        self.normalize = check_bool("normalize", normalize)
        self.inject = check_bool("inject", inject)
        self._schedule = StepSchedule(self.every_n_steps)
        # installed state (set by _install, cleared by _uninstall)
        self._layer_capture: LayerCapture | None = None
        self._name: str | None = None  # the resolved module name
        self._patched: tuple[weakref.ReferenceType[Any], bool, Any] | None = None
        self._trainer_ref: weakref.ReferenceType[Any] | None = None
        self._reset()

    def _owner(self) -> str:
        return f"VNEPenalty({self.layer!r})"

    @override
    def _state_key_config(self) -> dict[str, Any]:
        extra = {"prefix": self.prefix} if self.prefix else {}
        return dict(layer=self.layer, alpha=self.alpha, **extra)

    def _namespace(self) -> tuple[str, str]:
        return (self.prefix, self.layer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self._schedule.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._schedule.load_state_dict(state_dict.get("schedule"))

    # ------------------------------------------------------------------ lifecycle
    def _reset(self) -> None:
        self._schedule.reset()
        self._due_step: int | None = None  # the optimizer step found due (all its micro-batches)
        # capture state of the step in progress
        self._armed = False
        self._armed_step = 0
        self._armed_log = 0
        self._term_called = False
        self._views: list[torch.Tensor] = []
        # logging state: the open optimizer step and the closed steps waiting for a host copy
        self._acc: list[Any] | None = None  # [step, sum vne, sum penalty, count]
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _install(self, trainer: Any, pl_module: Any, stage: str) -> None:
        try:
            self._name = resolve_one(pl_module, self.layer)
        except SpectralConfigError as exc:
            raise SpectralConfigError(f"{self._owner()}: {exc}") from None
        if self.inject and not getattr(pl_module, "automatic_optimization", True):
            raise SpectralConfigError(
                "VNEPenalty: the LightningModule uses manual optimization, so the penalty cannot "
                "be added to the loss automatically; use VNEPenalty(..., inject=False) and write "
                "`loss = loss + penalty.term(self)` in training_step before "
                "`self.manual_backward(loss)`"
            )
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        self._layer_capture = self._open_capture(
            pl_module, layers=[self._name], detach=False, sink=self._capture, on_skip=self._on_skip
        )
        if self.inject:
            had_own = "training_step" in pl_module.__dict__
            previous = pl_module.__dict__.get("training_step")
            original = pl_module.training_step
            pl_module.training_step = self._wrap(original)
            self._patched = (weakref.ref(pl_module), had_own, previous)

    def _uninstall(self) -> None:
        """Restore ``training_step`` exactly as it was and drop the captured outputs."""
        if self._patched is not None:
            ref, had_own, previous = self._patched
            module = ref()
            if module is not None:
                if had_own:
                    module.__dict__["training_step"] = previous
                else:
                    module.__dict__.pop("training_step", None)
            self._patched = None
        self._layer_capture = None
        self._trainer_ref = None
        self._armed = False
        self._term_called = False
        self._views = []
        self._acc = None
        self._pending = []

    @override
    def on_exception(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        exception: BaseException,
    ) -> None:
        try:  # write what completed steps computed; the step in progress is dropped
            self._flush(trainer, collective=False)
        except Exception:  # noqa: BLE001 - never mask the exception being handled
            pass
        finally:
            super().on_exception(trainer, pl_module, exception)

    # ------------------------------------------------------------------ capture
    @property
    def _tag_layer(self) -> str:
        return self._name or self.layer

    def _due(self, step: int) -> bool:
        if step == self._due_step:  # another micro-batch of a due optimizer step
            return True
        if self._schedule.due(step):
            self._schedule.done(step)
            self._due_step = step
            return True
        return False

    def _capture(self, name: str, rows: torch.Tensor) -> None:
        """The capture's sink: the rows of one call of the layer (one view), with their graph."""
        self._views.append(rows)

    def _on_skip(self, name: str, reason: str) -> None:
        self._fail.problem(
            "output", f"the output of layer {name!r} cannot be penalised: {reason}",
            consequence="no penalty is added for it",
        )

    def _arm(self, trainer: Any) -> None:
        self._views = []
        self._term_called = False
        self._armed_step = int(trainer.global_step)
        self._armed_log = logging_step(trainer)
        self._armed = self._layer_capture is not None and self._due(self._armed_step)
        if self._armed and self._layer_capture is not None:
            self._layer_capture.start(self._armed_step)

    def _disarm(self) -> None:
        if self._layer_capture is not None:
            self._layer_capture.stop()
        self._armed = False
        self._views = []

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            trainer = self._trainer_ref() if self._trainer_ref is not None else None
            if trainer is None or self._layer_capture is None:
                return original(*args, **kwargs)
            self._arm(trainer)
            try:
                output = original(*args, **kwargs)
                if not self._armed:
                    return output
                return self._add_to_output(output)
            finally:
                self._disarm()

        training_step.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(training_step, _WRAPPER_MARK, True)
        return training_step

    # ------------------------------------------------------------------ the penalty
    def _consume(self) -> torch.Tensor | None:
        """The term for the views captured so far (None when there are none); clears them."""
        views, self._views = self._views, []
        name, step = self._tag_layer, self._armed_step
        if not views:
            if self._layer_capture is not None and name in self._layer_capture.skipped:
                return None  # its output cannot be penalised: reported once with the reason
            if self.inject:
                self._fail.problem(
                    "not_run", f"layer {name!r} did not run during training_step at step {step}",
                    consequence="no penalty was added and nothing was logged for that step",
                )
            else:
                self._fail.problem(
                    "not_run", f"term() at step {step} found no output of layer {name!r} "
                    "captured in this training_step (since it began or since the previous "
                    "term() call); call term() after the forward pass through the layer",
                    consequence="term() returned 0 for that call",
                )
            return None
        if self.alpha != 0 and torch.is_grad_enabled() and not any(v.requires_grad for v in views):
            self._fail.problem(
                "no_grad", f"the output of layer {name!r} does not require grad, so the "
                "penalty cannot change the model",
                consequence="the VNE and the term are logged as computed",
            )
        if self.alpha == 0:
            with torch.no_grad():
                term, value, ok = vne_penalty_term(views, 0.0, self.normalize)
        else:
            term, value, ok = vne_penalty_term(views, self.alpha, self.normalize)
        if self.strict and not bool(ok):
            raise SpectralComputeError(
                f"{self._owner()}: the VNE of layer {name!r} is not finite at step {step}"
            )
        self._record(step, value, term.detach() + 0.0)
        return term

    def _add_to_output(self, output: Any) -> Any:
        if output is None:
            self._views = []
            return output
        is_mapping = isinstance(output, Mapping)
        loss = output.get("loss") if is_mapping else output
        if not isinstance(loss, torch.Tensor):
            self._views = []
            return output  # Lightning reports the malformed output itself
        term = self._consume()
        if term is None or self.alpha == 0:
            return output
        new_loss = loss + term
        if is_mapping:
            new_output = dict(output)
            new_output["loss"] = new_loss
            return new_output
        return new_loss

    def term(self, pl_module: Any = None) -> torch.Tensor:
        """The penalty ``−α · VNE(H)`` for the layer outputs captured so far in this step.

        For ``inject=False``: write ``loss = loss + penalty.term(self)`` in ``training_step``
        after the forward pass (with manual optimization, before ``self.manual_backward``).
        Returns a 0-d tensor with its graph, or a zero tensor on steps that are not due (see
        ``every_n_steps``) and where the VNE is not finite. The captured outputs are released;
        outputs of the layer captured after the last ``term()`` of a step (e.g. a second
        forward pass for metrics) are not penalised.
        """
        if self.inject:
            raise SpectralConfigError(
                "VNEPenalty.term() is for VNEPenalty(..., inject=False); with inject=True the "
                "penalty is already added to the loss training_step returns"
            )
        if self._layer_capture is None:
            raise SpectralConfigError(
                "VNEPenalty.term() called before the callback was set up: pass the callback to "
                "Trainer(callbacks=[...]) and call term() inside training_step"
            )
        self._term_called = True
        device = getattr(pl_module, "device", None)
        if not self._armed:
            return torch.zeros((), device=device)
        term = self._consume()
        if term is None:
            return torch.zeros((), device=device)
        return term

    # ------------------------------------------------------------------ explicit-form gating
    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.inject and self._layer_capture is not None:
            self._arm(trainer)

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.inject:
            if self._armed and self._views and not self._term_called:
                self._fail.problem(
                    "term_not_called", f"layer {self._tag_layer!r} ran during training_step at "
                    f"step {self._armed_step} but term() was not called; with inject=False add "
                    "`loss = loss + penalty.term(self)` to training_step",
                    consequence="no penalty was added for that step",
                )
            self._disarm()
            self._term_called = False
        if self._acc is not None and int(trainer.global_step) != self._acc[0]:
            self._close_step()
        if len(self._pending) >= max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)):
            self._flush(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layer = self._tag_layer
        name = re.escape(layer)
        self._layout(
            trainer,
            {
                f"VNE penalty: {layer}": report.multiline_layout(
                    {
                        f"vne_penalty/vne/{layer}": [f"^vne_penalty/vne/{name}$"],
                        f"vne_penalty/{layer} (−α·VNE)": [f"^vne_penalty/{name}$"],
                    }
                )
            },
        )

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_step()
        self._flush(trainer)

    # ------------------------------------------------------------------ logging
    def _record(self, step: int, value: torch.Tensor, term: torch.Tensor) -> None:
        if self._acc is not None and self._acc[0] != step:
            self._close_step()
        if self._acc is None:
            self._acc = [step, value, term, 1, self._armed_log]
        else:
            self._acc[1] = self._acc[1] + value
            self._acc[2] = self._acc[2] + term
            self._acc[3] += 1

    def _close_step(self) -> None:
        if self._acc is None:
            return
        _, total_v, total_p, count, log_step = self._acc
        self._pending.append((log_step, total_v / count, total_p / count))
        self._acc = None

    def _flush(self, trainer: Any, collective: bool = True) -> None:
        """Move every pending step's values to the host in one copy and write them.

        Under DDP every rank flushes at the same points (the same steps are pending on each);
        rank zero's values are broadcast so that every rank's ``callback_metrics`` hold the
        logged ones. ``collective=False`` (on an exception) writes the local values instead."""
        pending, self._pending = self._pending, []
        distributed = collective and int(getattr(trainer, "world_size", 1) or 1) > 1
        if not pending and not distributed:
            return
        events = self._host_events(pending)
        if distributed:
            events = trainer.strategy.broadcast(events, src=0)
        for step, values in events:
            self._log(trainer, values, step, computed_on_every_rank=True)

    def _host_events(
        self, pending: list[tuple[int, torch.Tensor, torch.Tensor]]
    ) -> list[tuple[int, dict[str, float]]]:
        """The pending steps' values on the host (one copy), warning about non-finite ones."""
        if not pending:
            return []
        flat = torch.stack(
            [t.to(pending[0][1].device, torch.float64) for _, v, p in pending for t in (v, p)]
        )
        _, vectors = report.to_host({}, {"values": flat})
        host = vectors["values"]
        layer = self._tag_layer
        vne_tag, pen_tag = f"vne_penalty/vne/{layer}", f"vne_penalty/{layer}"
        events: list[tuple[int, dict[str, float]]] = []
        for i, (step, _, _) in enumerate(pending):
            value, term = float(host[2 * i]), float(host[2 * i + 1])
            if not math.isfinite(value):
                self._fail.problem(
                    "nonfinite", f"the VNE of layer {layer!r} is not finite at step {step}",
                    consequence=f"no penalty was added for that step; {vne_tag} is logged as NaN",
                )
            events.append((step, {vne_tag: value, pen_tag: term}))
        return events
