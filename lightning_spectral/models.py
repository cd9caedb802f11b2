"""Trainable networks (``nn.Module``) that the callbacks and functions of this package study.

:class:`MirrorNet` (1-D absolute-value networks of depth 2 and 3) and :class:`ReluMirrorNet`
(its two-layer ReLU counterpart): the networks whose global optimum
:mod:`lightning_spectral.functional.mirrors` certifies with a convex Lasso
(docs/definitions.md#mirrors) and :class:`~lightning_spectral.MirrorCertificate` logs during
training. The mathematics stays in :mod:`lightning_spectral.functional`, which defines no
module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_spectral.functional.mirrors import check_depth, mirror_forward

__all__ = ["MirrorNet", "ReluMirrorNet"]



def _check_width(width: Any) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return int(width)


def _x_bounds(x_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(x_range[0]), float(x_range[1])
    if not hi > lo:
        raise ValueError(f"x_range must be (low, high) with low < high, got {x_range!r}")
    return lo, hi


def _drawer(ref: torch.Tensor, generator: torch.Generator | None) -> Any:
    """``draw(fn, *shape)``: ``fn`` (``torch.randn``/``torch.rand``) in float64 from
    ``generator``, moved to ``ref``'s device and dtype (the same numbers on every device)."""

    def draw(fn: Any, *shape: int) -> torch.Tensor:
        out = fn(*shape, generator=generator, dtype=torch.float64)
        return out.to(ref.device, ref.dtype)

    return draw


class MirrorNet(nn.Module):
    """A 1-D absolute-value network of exactly the two- or three-layer form of the Lasso mirrors.

    See docs/definitions.md#mirrors-depth2, #mirrors-depth3:

    - ``depth=2``: ``f(x) = Σ_k α_k |w_k x + b_k| + ξ``;
    - ``depth=3``: ``f(x) = Σ_k α_k |v_k |w_k x + b_k| + c_k| + ξ`` (parallel units, one scalar
      per unit in the middle layer).

    Parameters are vectors of length ``width`` (``w``, ``b``, ``alpha`` and, at depth 3, ``v``,
    ``c``) and the scalar ``xi``. ``forward`` accepts ``(N,)`` or ``(N, 1)`` and returns the
    same shape. Train it with :func:`network_objective` as the loss to target exactly the
    objective that :func:`convex_gap` certifies.

    Initialisation (:meth:`reset_parameters`): ``w, v ~ N(0, 1)``, first kinks ``−b/w`` uniform
    in ``x_range``, second-layer offsets ``−c/(v|w|)`` uniform in ``[0, (hi − lo)/2]``,
    ``α ~ N(0, 1)/√width``, ``ξ = 0``; pass ``generator`` to keep the global RNG untouched.
    """

    activation = "abs"

    def __init__(
        self,
        width: int,
        depth: int = 2,
        x_range: tuple[float, float] = (-1.0, 1.0),
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.width = _check_width(width)
        self.depth = check_depth(depth)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.w = nn.Parameter(torch.empty(width, **kw))
        self.b = nn.Parameter(torch.empty(width, **kw))
        if self.depth == 3:
            self.v = nn.Parameter(torch.empty(width, **kw))
            self.c = nn.Parameter(torch.empty(width, **kw))
        self.alpha = nn.Parameter(torch.empty(width, **kw))
        self.xi = nn.Parameter(torch.zeros((), **kw))
        self.reset_parameters(x_range=x_range, generator=generator)

    @torch.no_grad()
    def reset_parameters(
        self, x_range: tuple[float, float] = (-1.0, 1.0), generator: torch.Generator | None = None
    ) -> None:
        """Draw fresh parameters (see the class docstring); ``generator`` for reproducibility."""
        lo, hi = _x_bounds(x_range)
        m = self.width
        draw = _drawer(self.w, generator)
        self.w.copy_(draw(torch.randn, m))
        self.b.copy_(-self.w * (lo + (hi - lo) * draw(torch.rand, m)))
        if self.depth == 3:
            self.v.copy_(draw(torch.randn, m))
            self.c.copy_(-self.v * self.w.abs() * (0.5 * (hi - lo)) * draw(torch.rand, m))
        self.alpha.copy_(draw(torch.randn, m) / math.sqrt(m))
        self.xi.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mirror_forward(self, x, None)

    def breakpoints(self) -> torch.Tensor:
        """Kinks of the network function: ``a₁ = −b/w`` and, at depth 3, ``a₁ ± a₂`` with
        ``a₂ = −c/(v|w|)`` when ``a₂ > 0`` (units with ``w = 0`` or ``v = 0`` are constant)."""
        with torch.no_grad():
            w = self.w.double()
            ok = w != 0
            a1 = -self.b.double()[ok] / w[ok]
            if self.depth == 2:
                return torch.sort(a1).values.cpu()
            v = self.v.double()[ok]
            okv = v != 0
            a2 = -self.c.double()[ok][okv] / (v[okv] * w[ok][okv].abs())
            base = a1[okv]
            pos = a2 > 0
            pts = torch.cat([a1, (base + a2)[pos], (base - a2)[pos]])
            return torch.sort(pts).values.cpu()

    def extra_repr(self) -> str:
        return f"width={self.width}, depth={self.depth}"


class ReluMirrorNet(nn.Module):
    """The 1-D two-layer ReLU network ``f(x) = Σ_k α_k (w_k x + b_k)₊ + ξ``.

    The ReLU counterpart of ``MirrorNet(width, depth=2)``: same parameters (``w``, ``b``,
    ``alpha`` of length ``width`` and the scalar ``xi``), same initialisation (``w ~ N(0, 1)``,
    kinks ``−b/w`` uniform in ``x_range``, ``α ~ N(0, 1)/√width``, ``ξ = 0``), same objective
    ``½‖f(x) − y‖² + (β/2) Σ_k (w_k² + α_k²)`` (:func:`network_objective`), certified by the
    Lasso over ``[(x_n − x_j)₊ | (x_j − x_n)₊]``
    (``lasso_mirror_fit(x, y, beta, depth=2, activation="relu")``, :func:`convex_gap`).
    ``forward`` accepts ``(N,)`` or ``(N, 1)`` and returns the same shape. A separate class, not
    a ``MirrorNet``, so that code looking for absolute-value networks never mistakes it for one.
    """

    depth = 2
    activation = "relu"

    def __init__(
        self,
        width: int,
        x_range: tuple[float, float] = (-1.0, 1.0),
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.width = _check_width(width)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.w = nn.Parameter(torch.empty(width, **kw))
        self.b = nn.Parameter(torch.empty(width, **kw))
        self.alpha = nn.Parameter(torch.empty(width, **kw))
        self.xi = nn.Parameter(torch.zeros((), **kw))
        self.reset_parameters(x_range=x_range, generator=generator)

    @torch.no_grad()
    def reset_parameters(
        self, x_range: tuple[float, float] = (-1.0, 1.0), generator: torch.Generator | None = None
    ) -> None:
        """Draw fresh parameters (see the class docstring); ``generator`` for reproducibility."""
        lo, hi = _x_bounds(x_range)
        m = self.width
        draw = _drawer(self.w, generator)
        self.w.copy_(draw(torch.randn, m))
        self.b.copy_(-self.w * (lo + (hi - lo) * draw(torch.rand, m)))
        self.alpha.copy_(draw(torch.randn, m) / math.sqrt(m))
        self.xi.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mirror_forward(self, x, None)

    def breakpoints(self) -> torch.Tensor:
        """Kinks of the network function, ``−b/w`` (units with ``w = 0`` are constant)."""
        with torch.no_grad():
            w = self.w.double()
            ok = w != 0
            return torch.sort(-self.b.double()[ok] / w[ok]).values.cpu()

    def extra_repr(self) -> str:
        return f"width={self.width}, activation=relu"
