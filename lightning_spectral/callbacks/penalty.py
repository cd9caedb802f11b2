"""VNE penalty: add ``−α · VNE`` of a layer's output to the training loss (SPEC.md §2.5).

``L_total = L_task − α · VNE(H_batch)``: ``α > 0`` ("VNE⁺") raises the von Neumann entropy of the
layer's representation (spreads its eigenvalues), ``α < 0`` ("VNE⁻") lowers it. ``VNE`` is
:func:`lightning_spectral.functional.vne` (SPEC.md §2.1), computed in float32 (float64 for a
float64 model) with autocast disabled, on the device where the activations live.

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

How it works: at ``setup("fit")`` a forward hook is registered on the layer. It keeps the layer's
output *with its graph* only while a due training step runs (SPEC.md §0.1 reduction: a
convolution output ``(n, c, *spatial)`` is averaged over its spatial positions to ``(n, c)``;
any other output ``(…, d)`` becomes the rows ``(n·…, d)``). With ``inject=True`` the
LightningModule's ``training_step`` is wrapped (an instance attribute, so Lightning's strategy
and DDP forward redirection call it) and the penalty is added to the returned loss (a tensor or
the ``"loss"`` of a dict) *before* Lightning divides it for gradient accumulation, scales it for
AMP and calls backward once. Hook and wrapper are removed at ``teardown`` and in
``on_exception``, leaving the module exactly as it was.

If the layer runs several times in one step (several augmented views), the VNE of each call's
batch is computed and the values are averaged (SPEC.md §2.5).

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
from lightning_spectral._compat import Callback
from lightning_spectral.callbacks._base import FailSoft
from lightning_spectral.capture import (
    first_tensor,
    reduction_for,
    rows_channel_first,
    rows_channel_last,
)
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError
from lightning_spectral.functional.spectrum import vne

__all__ = ["VNEPenalty", "vne_penalty_term", "reduce_rows"]


def reduce_rows(module: nn.Module | None, output: Any) -> torch.Tensor | None:
    """A layer output as a representation batch ``(rows, features)`` (SPEC.md §0.1).

    Uses the module-type table of :mod:`lightning_spectral.capture` (the same reduction as
    ``SpectralMonitor``): a tuple/list output contributes its first tensor; convolution outputs
    are channel-first, ``(n, c, *spatial) → (n, c)`` by the spatial mean; every other output is
    channel-last, ``(…, d) → (∏…, d)`` (a token output ``(n, t, d)`` gives ``n·t`` rows; ``(n,)``
    gives ``n`` rows of one feature). The graph is kept. ``None`` for outputs that hold no
    floating tensor.
    """
    tensor = first_tensor(output)
    if tensor is None or not tensor.is_floating_point() or tensor.ndim == 0:
        return None
    red = reduction_for(module) if module is not None else None
    if red is not None and red.layout == "channel_first":
        return rows_channel_first(tensor, "mean", red.spatial_dims)
    return rows_channel_last(tensor, "flatten")


@contextlib.contextmanager
def _autocast_off(device_type: str) -> Iterator[None]:
    """Disable autocast on ``device_type`` (eigenvalues are never computed in half precision)."""
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def vne_penalty_term(
    views: Sequence[torch.Tensor], alpha: float, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The term ``−α · mean_views VNE(h_v)`` to add to a loss (SPEC.md §2.5), masked if not finite.

    ``views`` are representation batches ``(n, d)`` (already reduced per SPEC.md §0.1), each
    keeping its graph. Each is cast to float32 (float64 stays float64) with autocast disabled,
    its non-finite entries are replaced by 0, and :func:`~lightning_spectral.functional.vne`
    (§2.1) is taken; the values are averaged over the views.

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


class VNEPenalty(Callback):
    """Von Neumann entropy regularizer ``L_total = L_task − α · VNE(H)`` (SPEC.md §2.5).

    Args:
        layer: name of the module (as in ``named_modules()``) whose output ``H`` is penalised.
        alpha: ``α``; ``> 0`` raises the entropy (VNE⁺), ``< 0`` lowers it (VNE⁻), ``0`` only
            logs (training is then bit-identical to training without the callback). The paper
            recommends ``|α| ≪ 0.5`` with batches of at least 32 samples.
        every_n_steps: apply (and log) the penalty when ``trainer.global_step % every_n_steps
            == 0`` — optimizer steps, so every micro-batch of an accumulated step is penalised.
        normalize: normalise the rows of ``H`` before the autocorrelation (SPEC.md §2.1).
        strict: raise :class:`~lightning_spectral.errors.SpectralComputeError` on a non-finite
            VNE instead of skipping the penalty for that step with one warning.
        inject: add the penalty to what ``training_step`` returns (automatic optimization
            only). With ``inject=False`` nothing is added: call :meth:`term` in your
            ``training_step`` (required with manual optimization).
    """

    def __init__(
        self,
        layer: str,
        alpha: float = 0.1,
        every_n_steps: int = 1,
        normalize: bool = True,
        strict: bool = False,
        inject: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(layer, str):
            raise SpectralConfigError(f"layer must be a module name (str), got {layer!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(
            float(alpha)
        ):
            raise SpectralConfigError(f"alpha must be a finite float, got {alpha!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or (
            every_n_steps < 1
        ):
            raise SpectralConfigError(
                f"every_n_steps must be a positive integer, got {every_n_steps!r}"
            )
        self.layer = layer
        self.alpha = float(alpha)
        self.every_n_steps = every_n_steps
        self.normalize = bool(normalize)
        self.strict = bool(strict)
        self.inject = bool(inject)
        self._fail = FailSoft(strict, f"VNEPenalty({layer!r})")
        # installed state (set in setup, cleared by _uninstall)
        self._hook_handle: torch.utils.hooks.RemovableHandle | None = None
        self._module_ref: weakref.ReferenceType[nn.Module] | None = None
        self._patched: tuple[weakref.ReferenceType[Any], bool, Any] | None = None
        self._trainer_ref: weakref.ReferenceType[Any] | None = None
        # capture state
        self._armed = False
        self._armed_step = 0
        self._views: list[torch.Tensor] = []
        # logging state: the open optimizer step and the closed steps waiting for a host copy
        self._acc: list[Any] | None = None  # [step, sum vne, sum penalty, count]
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, alpha=self.alpha)

    # ------------------------------------------------------------------ setup / teardown
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        modules = dict(pl_module.named_modules())
        if self.layer not in modules:
            names = [name for name in modules if name]
            raise SpectralConfigError(
                f"VNEPenalty: layer {self.layer!r} not found in {type(pl_module).__name__}; "
                f"available modules: {', '.join(names) or '(none)'}"
            )
        if self.inject and not getattr(pl_module, "automatic_optimization", True):
            raise SpectralConfigError(
                "VNEPenalty: the LightningModule uses manual optimization, so the penalty cannot "
                "be added to the loss automatically; use VNEPenalty(..., inject=False) and write "
                "`loss = loss + penalty.term(self)` in training_step before "
                "`self.manual_backward(loss)`"
            )
        self._uninstall()  # a second fit with the same callback starts clean
        module = modules[self.layer]
        self._module_ref = weakref.ref(module)
        self._trainer_ref = weakref.ref(trainer)
        self._hook_handle = module.register_forward_hook(self._capture)
        if self.inject:
            had_own = "training_step" in pl_module.__dict__
            previous = pl_module.__dict__.get("training_step")
            original = pl_module.training_step
            pl_module.training_step = self._wrap(original, pl_module)
            self._patched = (weakref.ref(pl_module), had_own, previous)
        self._acc = None
        self._pending = []

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._uninstall()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        """Remove the hook and the wrapper; restore ``training_step`` exactly as it was."""
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        if self._patched is not None:
            ref, had_own, previous = self._patched
            module = ref()
            if module is not None:
                if had_own:
                    module.__dict__["training_step"] = previous
                else:
                    module.__dict__.pop("training_step", None)
            self._patched = None
        self._armed = False
        self._views = []
        self._acc = None
        self._pending = []
        self._module_ref = None

    # ------------------------------------------------------------------ capture
    def _due(self, trainer: Any) -> bool:
        return int(trainer.global_step) % self.every_n_steps == 0

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._armed:
            return
        rows = reduce_rows(module, output)
        if rows is None:
            self._fail.problem(
                "output", f"output of layer {self.layer!r} holds no floating tensor "
                f"({type(output).__name__}); no penalty"
            )
            return
        self._views.append(rows)

    def _arm(self, trainer: Any) -> None:
        self._views = []
        self._armed = self._due(trainer)
        self._armed_step = int(trainer.global_step)

    def _disarm(self) -> None:
        self._armed = False
        self._views = []

    def _wrap(self, original: Callable[..., Any], pl_module: Any) -> Callable[..., Any]:
        module_ref = weakref.ref(pl_module)

        def training_step(*args: Any, **kwargs: Any) -> Any:
            trainer = self._trainer_ref() if self._trainer_ref is not None else None
            if trainer is None:
                return original(*args, **kwargs)
            self._arm(trainer)
            try:
                output = original(*args, **kwargs)
                if not self._armed:
                    return output
                return self._add_to_output(output, module_ref())
            finally:
                self._disarm()

        training_step.__wrapped__ = original  # type: ignore[attr-defined]
        return training_step

    # ------------------------------------------------------------------ the penalty
    def _consume(self, pl_module: Any) -> torch.Tensor | None:
        """The term for the views captured so far (None when nothing is due); clears them."""
        views, self._views = self._views, []
        if not views:
            self._fail.problem(
                "not_called", f"layer {self.layer!r} did not run during training_step at step "
                f"{self._armed_step}; no penalty"
            )
            return None
        if self.alpha != 0 and torch.is_grad_enabled() and not any(v.requires_grad for v in views):
            self._fail.problem(
                "no_grad", f"the output of layer {self.layer!r} does not require grad, so the "
                "penalty cannot change the model"
            )
        if self.alpha == 0:
            with torch.no_grad():
                term, value, ok = vne_penalty_term(views, 0.0, self.normalize)
        else:
            term, value, ok = vne_penalty_term(views, self.alpha, self.normalize)
        if self.strict and not bool(ok):
            raise SpectralComputeError(
                f"VNEPenalty({self.layer!r}): the VNE of layer {self.layer!r} is not finite at "
                f"step {self._armed_step}"
            )
        self._record(self._armed_step, value, term.detach() + 0.0)
        return term

    def _add_to_output(self, output: Any, pl_module: Any) -> Any:
        if output is None:
            self._views = []
            return output
        is_mapping = isinstance(output, Mapping)
        loss = output.get("loss") if is_mapping else output
        if not isinstance(loss, torch.Tensor):
            self._views = []
            return output  # Lightning reports the malformed output itself
        term = self._consume(pl_module)
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
        ``every_n_steps``) and where the VNE is not finite. The captured outputs are released.
        """
        if self.inject:
            raise SpectralConfigError(
                "VNEPenalty.term() is for VNEPenalty(..., inject=False); with inject=True the "
                "penalty is already added to the loss training_step returns"
            )
        if self._hook_handle is None:
            raise SpectralConfigError(
                "VNEPenalty.term() called before the callback was set up: pass the callback to "
                "Trainer(callbacks=[...]) and call term() inside training_step"
            )
        device = getattr(pl_module, "device", None)
        if not self._armed:
            return torch.zeros((), device=device)
        term = self._consume(pl_module)
        if term is None:
            return torch.zeros((), device=device)
        return term

    # ------------------------------------------------------------------ explicit-form gating
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.inject and self._hook_handle is not None:
            self._arm(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.inject:
            if self._armed and self._views:
                self._fail.problem(
                    "term_not_called", f"layer {self.layer!r} ran during training_step but "
                    "term() was not called; with inject=False add `loss = loss + "
                    "penalty.term(self)` to training_step"
                )
            self._disarm()
        if self._acc is not None and int(trainer.global_step) != self._acc[0]:
            self._close_step()
        if len(self._pending) >= max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)):
            self._flush(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        name = re.escape(self.layer)
        report.register_layout(
            trainer,
            {
                f"VNE penalty: {self.layer}": report.multiline_layout(
                    {
                        f"vne/{self.layer}": [f"^vne/{name}$"],
                        f"vne_penalty/{self.layer} (−α·VNE)": [f"^vne_penalty/{name}$"],
                    }
                )
            },
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close_step()
        self._flush(trainer)

    # ------------------------------------------------------------------ logging
    def _record(self, step: int, value: torch.Tensor, term: torch.Tensor) -> None:
        if self._acc is not None and self._acc[0] != step:
            self._close_step()
        if self._acc is None:
            self._acc = [step, value, term, 1]
        else:
            self._acc[1] = self._acc[1] + value
            self._acc[2] = self._acc[2] + term
            self._acc[3] += 1

    def _close_step(self) -> None:
        if self._acc is None:
            return
        step, total_v, total_p, count = self._acc
        self._pending.append((step, total_v / count, total_p / count))
        self._acc = None

    def _flush(self, trainer: Any) -> None:
        """Move every pending step's values to the host in one copy and write them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flat = torch.stack(
            [t.to(pending[0][1].device, torch.float64) for _, v, p in pending for t in (v, p)]
        )
        _, vectors = report.to_host({}, {"values": flat})
        host = vectors["values"]
        vne_tag, pen_tag = f"vne/{self.layer}", f"vne_penalty/{self.layer}"
        for i, (step, _, _) in enumerate(pending):
            value, term = float(host[2 * i]), float(host[2 * i + 1])
            if not math.isfinite(value):
                self._fail.problem(
                    "nonfinite", f"the VNE of layer {self.layer!r} is not finite at step {step}; "
                    "the penalty was skipped for that step"
                )
            report.log_scalars(trainer, {vne_tag: value, pen_tag: term}, step=step)
