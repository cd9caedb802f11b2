"""``MirrorCertificate``: how far a 1-D absolute-value network is from its global optimum.

A :class:`~lightning_spectral.models.MirrorNet` trained on 1-D data with the
objective of docs/definitions.md#mirrors-depth2 or #mirrors-depth3 has a global minimum equal to
a convex Lasso over reflection features (docs/definitions.md#mirrors).
The callback solves that Lasso once per data set and logs, every ``every_n_steps`` optimizer
steps, the network's objective, the optimum and the relative gap (never below ``−tol``).

The callback registers no hooks and changes no module mode: the network is evaluated under
``torch.no_grad()`` from its parameters. Every fit starts a fresh schedule (a callback reused
with a new ``Trainer`` logs again at step ``every_n_steps``); only a ``ckpt_path`` resume,
which restores the callback's state, continues the schedule of the interrupted run.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from lightning_spectral import report
from lightning_spectral._compat import STEP_OUTPUT, LightningModule, Trainer, override
from lightning_spectral.callbacks._base import (
    SpectralCallback,
    StepSchedule,
    check_float,
    check_int,
    logging_step,
)
from lightning_spectral.capture import paused
from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.functional.mirrors import (
    MirrorFit,
    lasso_mirror_fit,
    mirror_forward,
    network_objective,
)
from lightning_spectral.models import MirrorNet

__all__ = ["MirrorCertificate"]

TAGS = ("mirror/gap", "mirror/objective", "mirror/optimum")
FIGURE_TAG = "mirror/overlay"


class MirrorCertificate(SpectralCallback):
    """Log the convex-optimality gap of a :class:`MirrorNet` during training.

    The gap is defined in docs/definitions.md#mirrors-values.

    Args:
        every_n_steps: log every this many optimizer steps (``trainer.global_step``), first at
            step ``every_n_steps`` (never at step 0, also not during the micro-batches of an
            accumulated first step), and at the end of training.
        beta: (required) the regularisation ``β`` of the objective the network is trained on
            (depth 2: ``½‖f − y‖² + β/2 Σ(w² + α²)``; depth 3:
            ``½‖f − y‖² + β/3 Σ(|w|³+|v|³+|α|³)``).
        module: ``"auto"`` finds the one ``MirrorNet`` inside the LightningModule; otherwise the
            ``named_modules()`` name of it (``""`` for the LightningModule itself).
        max_samples: at most this many training points (a seeded subset of the training data
            set, drawn with the callback's own generator) enter the objective and the Lasso.
            The depth-3 dictionary has ``O(max_samples²)`` columns (≈ 60,000 at 200).
        tol: relative duality-gap tolerance of the Lasso solve.
        figure_every_n_steps: log the overlay figure (network, Lasso solution, breakpoints)
            at most every this many steps, and at the end of training; 0 disables figures.
        seed: seed of the subset drawn when the data set is larger than ``max_samples``.
        strict: raise instead of logging NaN with one warning when a value cannot be computed.
        figure_budget: a scheduled figure is skipped while drawing has used more than this
            fraction of the fit's wall time (default 0.01; the first and the last figure are
            always drawn). One figure costs ≈ 0.3 s on a CPU, a hundred steps of a small
            network; ``1.0`` draws every scheduled figure.

    Logged: ``mirror/gap`` = (J − J*)/J*, ``mirror/objective`` = J (network, float64),
    ``mirror/optimum`` = J* (Lasso), and the figure ``mirror/overlay`` (TensorBoard).
    Data are read from the training data set by index (map-style data sets; items ``(x, y)``
    or dicts with keys ``"x"`` and ``"y"``), never through the shuffling sampler, so training
    is bit-identical with and without the callback.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        beta: float | None = None,
        module: str = "auto",
        max_samples: int = 200,
        tol: float = 1e-9,
        figure_every_n_steps: int = 500,
        seed: int = 0,
        strict: bool = False,
        figure_budget: float = 0.01,
        prefix: str = "",
        prog_bar: str | list[str] | None = None,
    ) -> None:
        super().__init__(
            strict=strict, figure_budget=figure_budget, prefix=prefix, prog_bar=prog_bar
        )
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        if beta is None:
            raise SpectralConfigError(
                "MirrorCertificate needs beta: the β of the objective the network is trained on "
                "(network_objective(model, x, y, beta)); the certificate is about that objective"
            )
        self.beta = check_float("beta", beta, 0.0, low_open=True)
        if not isinstance(module, str):
            raise SpectralConfigError(f"module must be 'auto' or a module name, got {module!r}")
        self.module = module
        self.max_samples = check_int("max_samples", max_samples, 2)
        self.tol = check_float("tol", tol, 0.0, 1.0, low_open=True)
        self.figure_every_n_steps = check_int("figure_every_n_steps", figure_every_n_steps, 0)
        self.seed = int(seed)
        self._schedule = StepSchedule(self.every_n_steps, first=self.every_n_steps)
        self._net: MirrorNet | None = None
        self._net_name: str = ""
        # the Lasso of a data set, cached across fits by its fingerprint (data and depth)
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._fingerprint: str | None = None
        self._fit: MirrorFit | None = None
        self.solves = 0  # how many Lasso problems were solved (once per data set)
        self._reset()

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def _state_key_config(self) -> dict[str, Any]:
        return dict(module=self.module, beta=self.beta, every_n_steps=self.every_n_steps)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "last_figure_step": self._last_figure_step,
                "fingerprint": self._fingerprint}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self._last_figure_step = int(state_dict.get("last_figure_step", -1))
        # the schedule continues after the last event of the interrupted run
        self._schedule.load_state_dict(
            self._schedule.after(self._last_step) if self._last_step >= 0 else None
        )

    def _reset(self) -> None:
        self._schedule.reset()
        self._last_step = -1
        self._last_figure_step = -1

    def _install(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._net, self._net_name = _find_mirror_net(pl_module, self.module)

    def _uninstall(self) -> None:
        self._net = None  # hold no reference to the model after the fit

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._figures.start()
        if self._net is None:
            self._net, self._net_name = _find_mirror_net(pl_module, self.module)
        self._layout(trainer, {"mirror": report.multiline_layout({
            "objective vs convex optimum": [r"mirror/objective", r"mirror/optimum"],
            "relative gap to the global optimum": [r"mirror/gap"],
        })})
        self._load_data(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # data loaders may be reloaded between epochs: re-read, re-solve only if data changed
        reload_every = int(getattr(trainer, "reload_dataloaders_every_n_epochs", 0) or 0)
        if trainer.current_epoch > 0 and reload_every:
            self._load_data(trainer, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = int(trainer.global_step)
        if not self._schedule.due(step):
            return
        self._schedule.done(step)  # never twice for one step (accumulated micro-batches)
        self._last_step = step
        log_step = logging_step(trainer, after_step=True)
        self._event(trainer, step, log_step)
        if (getattr(trainer, "is_global_zero", True) and self.figure_every_n_steps
                and step % self.figure_every_n_steps == 0
                and self._figures.allowed(self.figure_budget)):
            self._log_figure(trainer, step, log_step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = int(trainer.global_step)
        log_step = logging_step(trainer)
        if step != self._last_step:
            self._last_step = step
            self._event(trainer, step, log_step)
        if (getattr(trainer, "is_global_zero", True) and self.figure_every_n_steps
                and step != self._last_figure_step):
            self._log_figure(trainer, step, log_step)

    def _event(self, trainer: Any, step: int, log_step: int) -> None:
        """One event on every rank: rank zero computes, every rank receives the values."""
        if not getattr(trainer, "is_global_zero", True):
            self._log(trainer, {}, log_step, computed_on_every_rank=False)
            return
        try:
            values = self._event_values(step)
        except BaseException:
            self._log(trainer, {}, log_step, computed_on_every_rank=False)  # release the ranks
            raise
        self._log(trainer, values, log_step, computed_on_every_rank=False)

    # ------------------------------------------------------------------ work

    @property
    def fit(self) -> MirrorFit | None:
        """The cached Lasso solution of the current data set (``None`` before training)."""
        return self._fit

    def _load_data(self, trainer: Any, pl_module: Any) -> None:
        if not getattr(trainer, "is_global_zero", True):
            return
        assert self._net is not None
        x, y = _training_points(trainer, pl_module, self.max_samples, self.seed)
        digest = hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()
                              + f"depth={self._net.depth}".encode()).hexdigest()
        if digest == self._fingerprint and self._fit is not None:
            return
        self._x, self._y, self._fingerprint = x, y, digest
        try:
            self._fit = lasso_mirror_fit(x, y, self.beta, self._net.depth, tol=self.tol,
                                         keep_dictionary=False)
            self.solves += 1
        except ValueError as exc:
            self._fit = None
            self._fail.problem("lasso", f"the Lasso could not be solved on the training data: "
                                        f"{exc}", consequence="every mirror/ tag is logged as NaN")

    def _event_values(self, step: int) -> dict[str, float]:
        net, fit = self._net, self._fit
        if net is None or fit is None or self._x is None or self._y is None:
            values = dict.fromkeys(TAGS, float("nan"))
        else:
            try:
                with torch.no_grad(), paused():
                    dev = net.w.device
                    J = network_objective(net, self._x.to(dev), self._y.to(dev), self.beta,
                                          dtype=torch.float64)
                host, _ = report.to_host({"J": J})
                obj, opt = host["J"], fit.objective
                if not np.isfinite(obj):
                    self._fail.problem(
                        "nonfinite", f"the network objective is not finite ({obj}) at step "
                        f"{step}", consequence="mirror/objective and mirror/gap are logged as "
                        "computed (not finite); mirror/optimum is finite",
                    )
                gap = (obj - opt) / opt if opt > 0 else (0.0 if obj <= 0 else float("inf"))
                values = {"mirror/gap": gap, "mirror/objective": obj, "mirror/optimum": opt}
            except Exception as exc:  # noqa: BLE001 - fail soft by design
                if isinstance(exc, SpectralConfigError) or self.strict:
                    raise
                self._fail.problem("event", f"could not evaluate the network: {exc}",
                                   consequence="every mirror/ tag is logged as NaN")
                values = dict.fromkeys(TAGS, float("nan"))
        return values

    def _log_figure(self, trainer: Any, step: int, log_step: int) -> None:
        with self._figures.timed():
            self._draw_figure(trainer, step, log_step)

    def _draw_figure(self, trainer: Any, step: int, log_step: int) -> None:
        net, fit = self._net, self._fit
        if net is None or fit is None or self._x is None or self._y is None:
            return
        if not report.tensorboard_writers(trainer):
            self._last_figure_step = step
            return
        from lightning_spectral.plots.mirrors import mirror_overlay

        try:
            xs = self._x.numpy()
            lo, hi = float(xs.min()), float(xs.max())
            pad = 0.05 * (hi - lo)
            grid = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
            with torch.no_grad(), paused():
                f_net = mirror_forward(net, grid.to(net.w.device), torch.float64).cpu().numpy()
                net_bp = net.breakpoints().numpy()
            fig = mirror_overlay(xs, self._y.numpy(), grid.numpy(), f_net,
                                 fit.predict(grid).numpy(), fit.breakpoints().numpy(), net_bp,
                                 title=f"step {step}: depth {net.depth}, β = {self.beta:g}")
            self._figure(trainer, FIGURE_TAG, fig, log_step)
            self._last_figure_step = step
        except Exception as exc:  # noqa: BLE001 - fail soft by design
            if self.strict:
                raise
            self._fail.problem("figure", f"could not draw the overlay figure: {exc}",
                               consequence="the figure is skipped; the scalars are logged")


# ---------------------------------------------------------------------- helpers


def _find_mirror_net(pl_module: Any, module: str) -> tuple[MirrorNet, str]:
    """The ``MirrorNet`` to certify: found by type (``"auto"``) or by name."""
    nets = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, MirrorNet)]
    if module == "auto":
        if len(nets) == 1:
            return nets[0][1], nets[0][0]
        if not nets:
            names = [n for n, _ in pl_module.named_modules() if n][:20]
            raise SpectralConfigError(
                "MirrorCertificate: no MirrorNet found in the LightningModule (the certificate "
                "covers only 1-D absolute-value networks; build the model "
                f"with lightning_spectral.MirrorNet). Modules found: {names or ['<none>']}"
            )
        raise SpectralConfigError(
            "MirrorCertificate: several MirrorNet modules found; name one with module=...: "
            f"{[n or '<root>' for n, _ in nets]}"
        )
    named = dict(pl_module.named_modules())
    if module not in named:
        raise SpectralConfigError(
            f"MirrorCertificate: no module named {module!r}; MirrorNet modules available: "
            f"{[n or '<root>' for n, _ in nets] or ['<none>']}"
        )
    if not isinstance(named[module], MirrorNet):
        available = [n or "<root>" for n, _ in nets] or ["<none>"]
        raise SpectralConfigError(
            f"MirrorCertificate: module {module!r} is a {type(named[module]).__name__}, not a "
            f"MirrorNet; MirrorNet modules available: {available}"
        )
    return named[module], module


def _train_dataset(trainer: Any, pl_module: Any) -> Any:
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        dm = getattr(trainer, "datamodule", None)
        source = dm if dm is not None and hasattr(dm, "train_dataloader") else pl_module
        loader = source.train_dataloader()
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    if isinstance(loader, dict) and loader:
        loader = next(iter(loader.values()))
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise SpectralConfigError(
            "MirrorCertificate: could not find the training data set (trainer.train_dataloader "
            f"is a {type(loader).__name__} without .dataset)"
        )
    return dataset


def _split_item(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, dict):
        if "x" not in item or "y" not in item:
            raise SpectralConfigError(
                f"MirrorCertificate: dict items need keys 'x' and 'y', got {sorted(item)}"
            )
        return torch.as_tensor(item["x"]), torch.as_tensor(item["y"])
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return torch.as_tensor(item[0]), torch.as_tensor(item[1])
    raise SpectralConfigError(
        f"MirrorCertificate: training items must be (x, y) pairs or dicts with 'x' and 'y', got "
        f"{type(item).__name__}"
    )


def _training_points(trainer: Any, pl_module: Any, max_samples: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` float64 host vectors: the training set, or a seeded subset of it."""
    dataset = _train_dataset(trainer, pl_module)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise SpectralConfigError(
            "MirrorCertificate: the training data set must be map-style (len and indexing); "
            f"got {type(dataset).__name__}"
        )
    n = len(dataset)
    if n > max_samples:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.sort(torch.randperm(n, generator=gen)[:max_samples]).values
    else:
        idx = torch.arange(n)
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        xs, ys = tensors[0][idx], tensors[1][idx]
    else:
        pairs = [_split_item(dataset[int(i)]) for i in idx]
        xs = torch.stack([p[0].reshape(-1) for p in pairs])
        ys = torch.stack([p[1].reshape(-1) for p in pairs])
    xs = xs.detach().to("cpu", torch.float64).reshape(len(idx), -1)
    ys = ys.detach().to("cpu", torch.float64).reshape(len(idx), -1)
    if xs.shape[1] != 1 or ys.shape[1] != 1:
        raise SpectralConfigError(
            "MirrorCertificate: the certificate covers 1-D regression only; "
            f"got inputs of {xs.shape[1]} and targets of {ys.shape[1]} values per sample"
        )
    return xs[:, 0].contiguous(), ys[:, 0].contiguous()
