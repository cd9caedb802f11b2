"""``CurvatureMonitor``: the loss Hessian's top eigenvalues, its trace and the objective noise
along its eigen-directions, logged during training (docs/definitions.md#curvature).

Schedule, data and loss
-----------------------
Every ``every_n_steps`` optimizer steps (``trainer.global_step``) the callback evaluates, on the
first ``batches`` training batches it saw (kept as detached copies on the model's device, so the
same data is used at every event and the trajectory reflects the parameters, not the data):

- ``loss="training_step"`` (default): the loss returned by ``pl_module.training_step(batch, 0)``
  (a tensor or a dict with ``"loss"``), with ``self.log``/``self.log_dict`` silenced during the
  call. ``training_step`` must otherwise be free of side effects (no metric objects updated, no
  manual optimisation); if it is not, use one of the two forms below.
- ``loss="cross_entropy"`` or ``"mse"``: ``F.cross_entropy(pl_module(x), y)`` (or
  ``F.mse_loss``) for a batch ``(x, y, ...)``.
- any other string: the name of a method of the LightningModule called as ``method(batch)`` and
  returning the scalar loss (checked at ``setup``).

The Hessian is over every parameter with ``requires_grad``. Per-sample gradients for the noise
quantities are taken on up to ``noise_samples`` samples of the kept batches (batches are sliced
along their first dimension: tensors, tuples, lists and dicts of tensors). A model with BatchNorm
in ``mode="train"`` has no per-sample gradients (the statistics couple the samples): its noise
tags are NaN with one warning, while the eigenvalues and the trace are still logged.

Observing never perturbs
------------------------
With ``mode="eval"`` (default) the model is put in eval mode for the computation (deterministic:
dropout off, BatchNorm uses its running statistics and does not update them); ``mode="train"``
keeps the training-mode loss and restores every buffer afterwards. Either way every module's
``training`` flag, the global RNG state and all ``.grad`` tensors are exactly as before (gradients
are taken with :func:`torch.autograd.grad`), and no graph outlives the event, so training is
bit-identical with and without the callback. Only global rank zero computes and logs (the module
is called directly, outside any DDP wrapper, so no collective is issued). The callback registers
no hooks; the modes, buffers and ``log`` methods it changes for an event are restored in a
``finally`` clause, so an exception (or ``KeyboardInterrupt``) in the middle of an event leaves
the model as it found it. ``loss="training_step"`` calls the module's own ``training_step``,
beneath the wrapper of ``VNEPenalty(inject=True)``: the penalty is neither added to the
curvature's loss nor recorded for an event's forward passes.

Lifecycle
---------
Every fit starts a fresh schedule and keeps fresh batches (a callback reused with a new
``Trainer`` logs again at step ``every_n_steps``); only a ``ckpt_path`` resume, which restores
the callback's state, continues the schedule of the interrupted run. The kept batches are
dropped at ``teardown`` and in ``on_exception``.

Tags (``i = 1 … k``, ``λ_1`` the largest; with ``which="magnitude"`` the largest in ``|λ|``)
------------------------------------------------------------------------------------------
``hessian/eig_<i>``, ``hessian/trace``, ``hessian/trace_se``, ``hessian/loss``,
``hessian/noise_s2_<i>``, ``hessian/beta_<i>``, ``hessian/sigma_<i>`` — see
``docs/metrics.md`` (section "Curvature and objective noise").

Kept in one module, longer than most: the helpers before the class (batch slicing, silenced
``log`` calls, mode and buffer preservation) serve this callback's events and carry the
"observing never perturbs" guarantee above; the mathematics is in
:mod:`lightning_spectral.functional.curvature`, and this docstring is a ninth of the module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lightning_spectral import report
from lightning_spectral._compat import STEP_OUTPUT, LightningModule, Trainer, override
from lightning_spectral.callbacks._base import (
    SpectralCallback,
    StepSchedule,
    check_choice,
    check_float,
    check_int,
    logging_step,
    strategy_kind,
)
from lightning_spectral.callbacks.penalty import unwrapped_training_step
from lightning_spectral.capture import paused
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError
from lightning_spectral.functional.curvature import (
    flat_gradients,
    hessian_eigenpairs,
    hessian_trace,
    objective_noise,
)

__all__ = ["CurvatureMonitor"]

_BUILTIN_LOSSES = ("training_step", "cross_entropy", "mse")


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Scaled-dot-product attention through its math kernel: the fused kernels (flash, memory
    efficient, the CPU flash kernel) have no second derivative, which Hessian products need.
    The same values as the math kernel the fused ones stand in for."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        ctx: Any = contextlib.nullcontext()
        legacy = getattr(torch.backends.cuda, "sdp_kernel", None)
        if legacy is not None:
            ctx = legacy(enable_flash=False, enable_math=True, enable_mem_efficient=False)
        with ctx:
            yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _batch_len(batch: Any) -> int:
    t = _first_tensor(batch)
    return 0 if t is None or t.ndim == 0 else int(t.shape[0])


def _slice(batch: Any, i: int, n: int) -> Any:
    return _map_tensors(batch, lambda t: t[i : i + 1] if t.ndim and t.shape[0] == n else t)


class _Silenced:
    """Temporarily replace ``module.log``/``log_dict`` with no-ops (instance attributes)."""

    _NAMES = ("log", "log_dict")

    def __init__(self, module: Any) -> None:
        self.module = module
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        for name in self._NAMES:
            if name in self.module.__dict__:
                self.saved[name] = self.module.__dict__[name]
            object.__setattr__(self.module, name, lambda *a, **k: None)

    def __exit__(self, *exc: object) -> None:
        for name in self._NAMES:
            if name in self.saved:
                object.__setattr__(self.module, name, self.saved[name])
            else:
                self.module.__dict__.pop(name, None)


class _Preserve:
    """Snapshot and restore: training flags, buffers (train mode), global RNG state.

    Whatever happens inside (an exception, ``KeyboardInterrupt``), ``__exit__`` puts back every
    module's ``training`` flag, the buffers and the RNG state; a failure while entering undoes
    what was already changed.
    """

    def __init__(self, module: torch.nn.Module, mode: str) -> None:
        self.module = module
        self.mode = mode
        self.flags: list[tuple[torch.nn.Module, bool]] = []
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rng: Any = None

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.buffers = (
            [(b, b.detach().clone()) for b in self.module.buffers()] if self.mode == "train" else []
        )
        devices = sorted({p.device.index or 0 for p in self.module.parameters()
                          if p.device.type == "cuda"})
        rng = torch.random.fork_rng(devices=devices)
        rng.__enter__()
        self.rng = rng
        try:
            if self.mode == "eval":
                self.module.eval()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            with torch.no_grad():
                for b, saved in self.buffers:
                    b.copy_(saved)
        finally:
            try:
                for m, flag in self.flags:
                    m.training = flag
            finally:
                rng, self.rng = self.rng, None
                if rng is not None:
                    rng.__exit__(None, None, None)
                self.buffers = []
                self.flags = []


class CurvatureMonitor(SpectralCallback):
    """Log the Hessian's top-``k`` eigenvalues, its trace and the objective noise.

    The quantities are defined in docs/definitions.md#curvature.

    Args:
        every_n_steps: run at optimizer steps that are multiples of this (the first event is at
            step ``every_n_steps``, never at step 0).
        k: number of top eigenpairs, by Lanczos.
        which: what "top" means: ``"largest"`` (default) — the ``k`` algebraically largest
            eigenvalues (``eig_1`` = ``λ_max``, the sharpness); ``"magnitude"`` — the ``k``
            largest in ``|λ|``, in descending ``|λ|`` (PyHessian's convention), so a strongly
            negative eigenvalue (negative curvature) can be ``eig_1``. See
            :func:`~lightning_spectral.functional.curvature.hessian_eigenpairs`.
        batches: number of training batches kept (the first ones seen in the fit) and used at
            every event.
        loss: ``"training_step"``, ``"cross_entropy"``, ``"mse"`` or a LightningModule method
            name (module docstring).
        trace_probes: Rademacher probes of the Hutchinson trace (0 disables the trace).
        noise_samples: samples whose individual gradients estimate the noise ``s_i²`` (0
            disables the noise quantities).
        max_iter: Lanczos iterations cap (default ``20 + 4k``).
        tol: Lanczos relative residual tolerance.
        mode: ``"eval"`` (default) or ``"train"``: the module mode the loss is evaluated in.
        seed: seed of the callback's own generator (probes); event ``e`` uses ``seed + step``.
        strict: raise :class:`~lightning_spectral.errors.SpectralComputeError` instead of
            logging NaN with one warning.
        prefix: prepended to every tag and to the dashboard category.
        prog_bar: tags or glob patterns (with the prefix) also shown in the progress bar.

    Values are computed on global rank zero and broadcast into every rank's
    ``trainer.callback_metrics``.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        k: int = 5,
        batches: int = 1,
        loss: Literal["training_step", "cross_entropy", "mse"] | str = "training_step",
        trace_probes: int = 16,
        noise_samples: int = 32,
        max_iter: int | None = None,
        tol: float = 1e-3,
        mode: Literal["eval", "train"] = "eval",
        seed: int = 0,
        strict: bool = False,
        prefix: str = "",
        prog_bar: str | list[str] | None = None,
        which: Literal["largest", "magnitude"] = "largest",
    ) -> None:
        super().__init__(strict=strict, prefix=prefix, prog_bar=prog_bar)
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        self.k = check_int("k", k)
        self.batches = check_int("batches", batches)
        self.trace_probes = check_int("trace_probes", trace_probes, 0)
        self.noise_samples = check_int("noise_samples", noise_samples, 0)
        self.max_iter = check_int("max_iter", max_iter, self.k, optional=True)
        if not isinstance(loss, str) or not loss:
            raise SpectralConfigError(
                f"loss must be one of {list(_BUILTIN_LOSSES)} or a method name, got {loss!r}"
            )
        self.loss = loss
        self.tol = check_float("tol", tol, 0.0, low_open=True)
        self.mode: Literal["eval", "train"] = check_choice("mode", mode, ("eval", "train"))
        self.which: Literal["largest", "magnitude"] = check_choice(
            "which", which, ("largest", "magnitude")
        )
        self.seed = int(seed)
        self._schedule = StepSchedule(self.every_n_steps, first=self.every_n_steps)
        self._reset()

    # ------------------------------------------------------------------ Lightning plumbing
    @override
    def _state_key_config(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"prefix": self.prefix} if self.prefix else {}
        if self.which != "largest":  # only when not the default: older checkpoints still resume
            extra["which"] = self.which
        return dict(every_n_steps=self.every_n_steps, k=self.k, loss=self.loss,
                    batches=self.batches, mode=self.mode, **extra)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "events": self._events}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self._events = int(state_dict.get("events", 0))
        # the schedule continues after the last event of the interrupted run
        self._schedule.load_state_dict(
            self._schedule.after(self._last_step) if self._last_step >= 0 else None
        )

    def _reset(self) -> None:
        self._schedule.reset()
        self._kept: list[Any] = []
        self._last_step = -1
        self._events = 0
        self._layout_done = False

    def _install(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if strategy_kind(trainer) != "plain":
            raise SpectralConfigError(
                f"CurvatureMonitor computes Hessian products on global rank zero alone, which a "
                f"sharded model ({type(trainer.strategy).__name__}) cannot run: every forward "
                "needs all ranks. Use it with a single device or DDP"
            )
        if self.loss in _BUILTIN_LOSSES:
            return
        if not callable(getattr(pl_module, self.loss, None)):
            names = sorted(n for n in dir(type(pl_module))
                           if "loss" in n.lower() and not n.startswith("_"))
            raise SpectralConfigError(
                f"CurvatureMonitor(loss={self.loss!r}): {type(pl_module).__name__} has no method "
                f"{self.loss!r}; use one of {list(_BUILTIN_LOSSES)} or a method name"
                + (f" (methods with 'loss' in the name: {names})" if names else "")
            )

    def _uninstall(self) -> None:
        self._kept = []

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if len(self._kept) < self.batches and _batch_len(batch) > 0:
            self._kept.append(_map_tensors(batch, lambda t: t.detach().clone()))
        step = int(trainer.global_step)
        if not self._kept or not self._schedule.due(step):
            return
        self._schedule.done(step)
        self._last_step = step
        self._events += 1
        log_step = logging_step(trainer, after_step=True)
        if not getattr(trainer, "is_global_zero", True):
            # only rank zero computes; every rank receives its values (callback_metrics)
            self._log(trainer, {}, log_step, computed_on_every_rank=False)
            return
        try:
            host = self._event(trainer, pl_module, step)
        except BaseException:
            self._log(trainer, {}, log_step, computed_on_every_rank=False)  # release the ranks
            raise
        self._log(trainer, host, log_step, computed_on_every_rank=False)

    def _event(self, trainer: Any, pl_module: Any, step: int) -> dict[str, float]:
        """Rank zero: one event's values on the host (unprefixed tags)."""
        lr = float("nan")
        optimizers = getattr(trainer, "optimizers", None) or []
        if optimizers and optimizers[0].param_groups:
            lr = float(optimizers[0].param_groups[0].get("lr", float("nan")))
        scalars = self.compute(pl_module, lr=lr, step=step)
        host, _ = report.to_host(scalars)
        if not self._layout_done:
            self._layout_done = True
            self._layout(trainer, {"hessian": report.multiline_layout({
                "top eigenvalues": [r"hessian/eig_\d+"],
                "trace": [r"hessian/trace$"],
                "noise energy s2 along q_i": [r"hessian/noise_s2_\d+"],
                "inverse temperature beta_i": [r"hessian/beta_\d+"],
                "stationary spread sigma_i": [r"hessian/sigma_\d+"],
            })})
        return host

    # ------------------------------------------------------------------ computation
    def _loss_of(self, pl_module: Any, batch: Any) -> torch.Tensor:
        if self.loss == "training_step":
            step_fn = unwrapped_training_step(pl_module)
            with _Silenced(pl_module):
                out = step_fn(batch, 0)
            if isinstance(out, dict):
                out = out.get("loss")
            if not isinstance(out, torch.Tensor):
                raise TypeError("training_step returned no loss tensor (got "
                                f"{type(out).__name__}); pass loss='cross_entropy' or a method")
            return out
        if self.loss in ("cross_entropy", "mse"):
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise TypeError(f"loss={self.loss!r} needs batches of the form (x, y, ...)")
            pred = pl_module(batch[0])
            if self.loss == "cross_entropy":
                return F.cross_entropy(pred, batch[1])
            return F.mse_loss(pred, batch[1].to(pred.dtype))
        return getattr(pl_module, self.loss)(batch)

    def _nan_scalars(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"))
        out = {f"hessian/eig_{i + 1}": nan for i in range(self.k)}
        out["hessian/loss"] = nan
        if self.trace_probes:
            out["hessian/trace"] = out["hessian/trace_se"] = nan
        if self.noise_samples:
            for i in range(self.k):
                for q in ("noise_s2", "beta", "sigma"):
                    out[f"hessian/{q}_{i + 1}"] = nan
        return out

    def compute(self, pl_module: Any, lr: float = float("nan"), step: int = 0,
                batches: list[Any] | None = None) -> dict[str, torch.Tensor]:
        """All tags of one event as 0-d tensors on the model's device (NaN where undefined).

        Uses ``batches`` (default: the kept training batches). The module's modes, buffers,
        ``.grad``, ``log`` methods and the global RNG are unchanged afterwards, also when the
        computation is interrupted by an exception.
        """
        batches = self._kept if batches is None else batches
        out = self._nan_scalars()
        if not batches:
            self._fail.problem("no-data", "no training batch kept yet",
                               consequence="every hessian/ tag is logged as NaN")
            return out
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params:
            self._fail.problem("no-params", "the module has no parameter that requires grad",
                               consequence="every hessian/ tag is logged as NaN")
            return out
        gen = torch.Generator().manual_seed(self.seed + int(step))

        def closure() -> torch.Tensor:
            losses = [self._loss_of(pl_module, b) for b in batches]
            return torch.stack([loss.reshape(()) for loss in losses]).mean()

        try:
            with _Preserve(pl_module, self.mode), torch.enable_grad(), paused(), math_attention():
                vals, vecs = hessian_eigenpairs(closure, params, k=self.k, max_iter=self.max_iter,
                                                tol=self.tol, generator=gen, which=self.which)
                # Lanczos synchronises every iteration anyway; one more check is free
                if not math.isfinite(float(vals[0])):
                    self._fail.problem("non-finite", "non-finite Hessian-vector products (is the "
                                       f"loss NaN/Inf at step {step}?)",
                                       consequence="every hessian/ tag is logged as NaN")
                    return out
                with torch.no_grad():
                    loss_value = closure().detach()
                for i in range(self.k):
                    out[f"hessian/eig_{i + 1}"] = vals[i]
                out["hessian/loss"] = loss_value
                if self.trace_probes:
                    tr, se = hessian_trace(closure, params, n_probes=self.trace_probes,
                                           generator=gen)
                    out["hessian/trace"], out["hessian/trace_se"] = tr, se
                if self.noise_samples:
                    try:
                        self._noise(pl_module, batches, params, vals, vecs, lr, out)
                    except Exception as exc:  # e.g. BatchNorm in train mode on one sample
                        self._fail.problem(
                            "noise-" + type(exc).__name__,
                            f"objective-noise computation failed: {exc}",
                            consequence="the noise tags (noise_s2, beta, sigma) are logged as "
                            "NaN; the eigenvalues, trace and loss as computed",
                        )
        except Exception as exc:  # fail soft: NaN + one warning (strict re-raises)
            if self.strict and isinstance(exc, SpectralComputeError):
                raise  # already reported by a fail-soft check above
            self._fail.problem(type(exc).__name__, f"curvature computation failed: {exc}",
                               consequence="every hessian/ tag is logged as NaN")
            return self._nan_scalars()
        return out

    def _noise(self, pl_module: Any, batches: list[Any], params: list[torch.Tensor],
               vals: torch.Tensor, vecs: torch.Tensor, lr: float,
               out: dict[str, torch.Tensor]) -> None:
        closures: list[Callable[[], torch.Tensor]] = []
        for b in batches:
            n = _batch_len(b)
            for i in range(n):
                if len(closures) >= self.noise_samples:
                    break
                sample = _slice(b, i, n)
                # the default argument binds this sample; mypy cannot type such a lambda
                closures.append(lambda s=sample: self._loss_of(pl_module, s))  # type: ignore[misc]
        if len(closures) < 2:
            self._fail.problem("noise-samples", "need at least two samples for the noise",
                               consequence="the noise tags (noise_s2, beta, sigma) are logged "
                               "as NaN; the eigenvalues, trace and loss as computed")
            return
        grads = flat_gradients(closures, params)
        batch_size = max(1, _batch_len(batches[0]))
        ok_lr = math.isfinite(lr) and lr > 0
        noise = objective_noise(grads, vals, vecs, lr if ok_lr else 1.0, batch_size=batch_size)
        for i in range(self.k):
            out[f"hessian/noise_s2_{i + 1}"] = noise.s2[i]
            nan = torch.full_like(noise.s2[i], float("nan"))
            out[f"hessian/beta_{i + 1}"] = noise.beta[i] if ok_lr else nan
            out[f"hessian/sigma_{i + 1}"] = noise.sigma[i] if ok_lr else nan
