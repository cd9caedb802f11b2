"""One-dimensional absolute-value and ReLU networks as Lasso problems ("mirrors").

The definitions are in docs/definitions.md#mirrors. For 1-D data, a two-layer network
``f(x) = Σ α_k |w_k x + b_k| + ξ`` trained with weight decay (#mirrors-depth2), its ReLU
counterpart ``f(x) = Σ α_k (w_k x + b_k)₊ + ξ`` (#mirrors-relu), and a three-layer network of
parallel units ``f(x) = Σ α_k |v_k |w_k x + b_k| + c_k| + ξ`` with the cubic penalty of
#mirrors-depth3, have global minima equal to a *convex* Lasso (#mirrors-lasso) over a fixed
dictionary built from the data:

- depth 2: ``A_nj = |x_n − x_j|``, one column per distinct data point (``P ≤ N``);
- depth 2, ReLU: ``A = [(x_n − x_j)₊ | (x_j − x_n)₊]``, two columns per distinct data point
  (``P ≤ 2N``);
- depth 3: ``φ_{a₁,a₂}(x) = ||x − a₁| − a₂|`` at the vertices of the breakpoint arrangement —
  reflection features ``(x_i, |x_j − x_i|)`` and midpoint features ``((x_i+x_j)/2, |x_i−x_j|/2)``
  (``P ≤ 1.5 N² − 0.5 N``).

So "is my network at its global optimum?" becomes a number: :func:`convex_gap` is
``(J(network) − Lasso optimum) / Lasso optimum``, which is never negative (up to the solver's
stated tolerance) for a network of the stated form of any width.

Every feature is stored as a pair ``(a₁, a₂)``: the two-layer feature ``|x − a₁|`` is
``φ_{a₁,0}``, so both depths share one representation (``params`` of shape ``(P, 2)``). A ReLU
feature ``(s (x − a))₊`` is stored as ``(a, s)``, ``s ∈ {+1, −1}`` its direction
(``activation="relu"`` throughout).

The Lasso solver is our own: a primal–dual interior-point method on a working set of columns,
grown from the KKT violators of the full dictionary, snapped to an exact sparse solution (a
vertex from ``scipy.optimize.linprog``, then the KKT equations of its sign pattern), in
float64 NumPy on the host (a small, sequential, host-side computation; the rest of this
module is torch). It stops on the relative duality gap ``(P − D)/P ≤ tol`` of the full problem, and
reports that gap and the KKT violation it reached.

The module is longer than most because it holds both sides of one equivalence: the dictionary
and the Lasso fit, and the network forward, objective and reconstruction that :func:`convex_gap`
compares with them, all on the one ``(a₁, a₂)`` feature representation and its input checks;
the solver itself is private (``_lasso``), and much of the length is worked examples.

*Source:* E. Zeger, Y. Wang, A. Mishkin, T. Ergen, E. Candès, M. Pilanci, "A Library of
Mirrors: Deep Neural Nets in Low Dimensions are Convex Lasso Models with Reflection Features",
arXiv:2403.01046 (2024).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_spectral.functional._lasso import solve_lasso

if TYPE_CHECKING:
    from lightning_spectral.models import MirrorNet, ReluMirrorNet

__all__ = [
    "MirrorFit",
    "reflection_dictionary",
    "mirror_features",
    "lasso_mirror_fit",
    "mirror_network",
    "network_objective",
    "mirror_forward",
    "check_depth",
    "convex_gap",
]

_DEPTHS = (2, 3)
_ACTIVATIONS = ("abs", "relu")


# ------------------------------------------------------------------------------------------
# input validation


def _as_numpy_1d(value: Any, name: str) -> np.ndarray:
    """A float64 host copy of a 1-D input; ``(N, 1)`` is accepted and flattened."""
    if isinstance(value, torch.Tensor):
        arr = value.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be one-dimensional data of shape (N,) or (N, 1) (the Lasso equivalence "
            f"covers 1-D inputs only), got shape {tuple(arr.shape)}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or Inf values")
    return np.ascontiguousarray(arr, dtype=np.float64)


def check_depth(depth: int) -> int:
    """``depth`` as an ``int`` if it is 2 or 3 (the depths of the mirror networks), else
    ``ValueError``.

    Examples:
        >>> from lightning_spectral.functional import check_depth
        >>> check_depth(3)
        3
        >>> check_depth(4)
        Traceback (most recent call last):
            ...
        ValueError: depth must be 2 or 3, got 4
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth not in _DEPTHS:
        raise ValueError(f"depth must be 2 or 3, got {depth!r}")
    return int(depth)


def _check_activation(activation: str, depth: int) -> str:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'abs' or 'relu', got {activation!r}")
    if activation == "relu" and depth != 2:
        raise ValueError(
            f"the ReLU dictionary is that of the two-layer ReLU network: pass depth=2 "
            f"with activation='relu', got depth={depth}"
        )
    return activation


def _check_beta(beta: float) -> float:
    try:
        value = float(beta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"beta must be a positive number, got {beta!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"beta must be a finite number > 0, got {beta!r} (beta → 0 is the minimum-ℓ1 "
            "interpolation, a linear program, not a Lasso)"
        )
    return value


def _check_xy(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    xs = _as_numpy_1d(x, "x")
    ys = _as_numpy_1d(y, "y")
    if xs.shape != ys.shape:
        raise ValueError(
            f"x and y must hold the same number of points, got {xs.size} and {ys.size}"
        )
    if np.unique(xs).size < 2:
        raise ValueError(
            f"need at least 2 distinct x values to build a dictionary, got {xs.size} point(s) "
            f"with {np.unique(xs).size} distinct value(s)"
        )
    return xs, ys


# ------------------------------------------------------------------------------------------
# dictionary


def _distinct_in_order(x: np.ndarray) -> np.ndarray:
    """Distinct values of ``x`` in order of first occurrence."""
    _, first = np.unique(x, return_index=True)
    return x[np.sort(first)]


def _feature_params(x: np.ndarray, depth: int) -> np.ndarray:
    """``(P, 2)`` array of ``(a₁, a₂)``: two-layer features first, then reflections, midpoints."""
    u = _distinct_in_order(x)
    m = u.size
    two = np.stack([u, np.zeros(m)], axis=1)
    if depth == 2:
        return two
    i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    off = i != j
    refl = np.stack([u[i[off]], np.abs(u[j[off]] - u[i[off]])], axis=1)
    iu, ju = np.triu_indices(m, k=1)
    mid = np.stack([(u[iu] + u[ju]) / 2.0, np.abs(u[iu] - u[ju]) / 2.0], axis=1)
    params = np.concatenate([two, refl, mid], axis=0)
    # drop duplicate (a1, a2) pairs, keeping the first occurrence; the key is rounded to 12
    # significant digits of the data scale so that pairs equal up to rounding coincide
    scale = max(float(np.max(np.abs(u))), 1e-300)
    keys = np.round(params / scale, 12) + 0.0
    _, first = np.unique(keys, axis=0, return_index=True)
    return params[np.sort(first)]


def _relu_params(x: np.ndarray) -> np.ndarray:
    """``(P, 2)`` array of ``(a, s)``: every ``(x − x_j)₊`` (``s = +1``), then every
    ``(x_j − x)₊`` (``s = −1``), ``x_j`` the distinct values in order of first occurrence."""
    u = _distinct_in_order(x)
    return np.concatenate(
        [np.stack([u, np.ones(u.size)], axis=1), np.stack([u, -np.ones(u.size)], axis=1)]
    )


def _relu_features(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """``(s_j (x_n − a_j))₊`` as an ``(N, P)`` float64 array."""
    out = np.subtract.outer(x, params[:, 0])
    out *= params[:, 1]
    np.maximum(out, 0.0, out=out)
    return out


def _params_for(x: np.ndarray, depth: int, activation: str) -> np.ndarray:
    return _relu_params(x) if activation == "relu" else _feature_params(x, depth)


def _features_for(x: np.ndarray, params: np.ndarray, activation: str) -> np.ndarray:
    return _relu_features(x, params) if activation == "relu" else _phi(x, params)


def _phi(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """``φ_{a₁,a₂}(x_n) = ||x_n − a₁| − a₂|`` as an ``(N, P)`` float64 array."""
    out = np.subtract.outer(x, params[:, 0])
    np.abs(out, out=out)
    out -= params[:, 1]
    np.abs(out, out=out)
    return out


def mirror_features(
    x: torch.Tensor | np.ndarray, params: torch.Tensor | np.ndarray, activation: str = "abs"
) -> torch.Tensor:
    """The features ``φ_{a₁,a₂}(x) = ||x − a₁| − a₂|`` at arbitrary points.

    See docs/definitions.md#mirrors-depth3. ``params`` is ``(P, 2)`` (as returned by
    :func:`reflection_dictionary`); ``a₂ = 0`` gives the two-layer feature ``|x − a₁|``
    (#mirrors-depth2). With ``activation="relu"`` the rows are ``(a, s)``
    and the features ``(s (x − a))₊``. Returns a float64 ``(N, P)`` tensor on the host.

    Examples:
        ``|0.5 − 0| = 0.5`` and ``||0.5 − 1| − 0.5| = 0``:

        >>> import torch
        >>> from lightning_spectral.functional import mirror_features
        >>> mirror_features(torch.tensor([0.5]), torch.tensor([[0.0, 0.0], [1.0, 0.5]])).tolist()
        [[0.5, 0.0]]
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'abs' or 'relu', got {activation!r}")
    xs = _as_numpy_1d(x, "x")
    p = params.detach().cpu().double().numpy() if isinstance(params, torch.Tensor) else (
        np.asarray(params, dtype=np.float64))
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"params must have shape (P, 2), got shape {tuple(p.shape)}")
    return torch.from_numpy(_features_for(xs, p, activation))


def reflection_dictionary(
    x: torch.Tensor | np.ndarray, depth: int = 3, activation: str = "abs"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lasso dictionary of a depth-``depth`` network, or of the two-layer ReLU network
    (``activation="relu"``); see docs/definitions.md#mirrors-depth2, #mirrors-depth3.

    Returns ``(A, params)``: ``A`` (float64, ``N × P``) with ``A[n, j] = φ_{params[j]}(x_n)``
    and ``params`` (float64, ``P × 2``) holding ``(a₁, a₂)`` of each column.

    - ``depth=2``: ``A_nj = |x_n − x_j|`` — one column per distinct ``x_j`` (order of first
      occurrence), ``params[j] = (x_j, 0)``; ``P ≤ N`` (growth O(N)).
    - ``depth=3``: the depth-2 columns first (``i = j``), then the reflection features
      ``(x_i, |x_j − x_i|)`` for ``i ≠ j``, then the midpoint features
      ``((x_i + x_j)/2, |x_i − x_j|/2)`` for ``i < j``; duplicate ``(a₁, a₂)`` pairs are dropped
      (first kept). ``P ≤ 1.5 M² − 0.5 M`` for ``M`` distinct points (growth O(N²)).
    - ``depth=2, activation="relu"`` (the two-layer ReLU network, :class:`ReluMirrorNet`):
      ``A = [(x_n − x_j)₊ | (x_j − x_n)₊]`` — first ``(x − x_j)₊`` for every distinct ``x_j``
      (``params[j] = (x_j, +1)``), then ``(x_j − x)₊`` (``params = (x_j, −1)``); ``P = 2M``.
      The columns ``(x − max x)₊`` and ``(min x − x)₊`` are zero on the data; the Lasso keeps
      their coefficients at 0.

    ``x`` must be 1-D (``(N,)`` or ``(N, 1)``) with at least 2 distinct finite values; repeated
    values are allowed (they add no feature). Raises ``ValueError`` otherwise.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import reflection_dictionary
        >>> A, params = reflection_dictionary(torch.tensor([0.0, 1.0, 2.0]), depth=2)
        >>> A.tolist()  # |x_n − x_j|
        [[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]
        >>> params.tolist()
        [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
        >>> A, params = reflection_dictionary(torch.tensor([0.0, 1.0, 2.0]), depth=3)
        >>> tuple(A.shape)  # 3 + 6 + 3 = 12 features, 2 of them duplicates
        (3, 10)
    """
    depth = check_depth(depth)
    activation = _check_activation(activation, depth)
    xs = _as_numpy_1d(x, "x")
    if np.unique(xs).size < 2:
        raise ValueError(
            f"need at least 2 distinct x values to build a dictionary, got {xs.size} point(s)"
        )
    params = _params_for(xs, depth, activation)
    return torch.from_numpy(_features_for(xs, params, activation)), torch.from_numpy(params)


# ------------------------------------------------------------------------------------------
# the Lasso solver (docs/definitions.md#mirrors-lasso)


@dataclass
class MirrorFit:
    """A solved Lasso over the dictionary of :func:`reflection_dictionary`.

    See docs/definitions.md#mirrors-lasso. ``objective`` is the primal value at the returned point,
    ``½‖A z + ξ1 − y‖² + β‖z‖₁``; ``dual`` a certified lower bound of the optimum, so
    ``gap = objective − dual ≥ 0`` bounds how far ``objective`` is above the true optimum
    (``gap ≤ tol · objective`` when ``converged``). ``kkt`` is the largest KKT violation relative to
    ``β``: ``max_j`` of ``(|a_jᵀr| − β)₊`` off the support and ``|a_jᵀr − β sign z_j|`` on it, and
    ``|1ᵀr|``, all divided by ``β``. ``activation`` is ``"abs"`` (#mirrors-depth2, #mirrors-depth3)
    or ``"relu"`` (the two-layer ReLU network; ``params`` rows are then ``(a, s)``). Tensors are
    float64 on the host.

    Examples:
        The fit of :func:`lasso_mirror_fit`'s example, ``0.85 |x| + 0.1``:

        >>> import torch
        >>> from lightning_spectral.functional import lasso_mirror_fit
        >>> x = torch.tensor([-1.0, 0.0, 1.0])
        >>> fit = lasso_mirror_fit(x, x.abs(), beta=0.1, depth=2)
        >>> round(float(fit.predict(torch.tensor([0.5]))[0]), 4)
        0.525
        >>> fit.breakpoints().tolist(), fit.l1_norm < 1
        ([0.0], True)
        >>> fit.gap <= fit.tol * fit.objective
        True
    """

    objective: float
    coef: torch.Tensor
    intercept: float
    dictionary: torch.Tensor | None
    params: torch.Tensor
    depth: int
    beta: float
    x: torch.Tensor
    y: torch.Tensor
    residual: torch.Tensor
    dual: float
    gap: float
    kkt: float
    tol: float
    rounds: int
    converged: bool
    activation: str = "abs"

    @property
    def support(self) -> torch.Tensor:
        """Indices of the non-zero coefficients."""
        return torch.nonzero(self.coef, as_tuple=False).reshape(-1)

    @property
    def l1_norm(self) -> float:
        """``‖z‖₁`` (the network's penalty is ``β‖z‖₁`` after rescaling)."""
        return float(self.coef.abs().sum())

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The Lasso model ``Σ_j z_j φ_j(x) + ξ`` at arbitrary points (float64, host)."""
        s = self.support
        if s.numel() == 0:
            return torch.full((_as_numpy_1d(x, "x").size,), self.intercept, dtype=torch.float64)
        return mirror_features(x, self.params[s], self.activation) @ self.coef[s] + self.intercept

    def breakpoints(self) -> torch.Tensor:
        """Sorted kink positions of the active features: ``a₁`` and ``a₁ ± a₂`` (``a₂ > 0``);
        for ReLU features ``(a, s)`` the ``a``."""
        p = self.params[self.support]
        if self.activation == "relu":
            return torch.unique(p[:, 0])
        a1, a2 = p[:, 0], p[:, 1]
        pos = a2 > 0
        pts = torch.cat([a1, (a1 + a2)[pos], (a1 - a2)[pos]])
        return torch.unique(pts)


def lasso_mirror_fit(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    beta: float,
    depth: int = 3,
    tol: float = 1e-9,
    max_iter: int = 100,
    keep_dictionary: bool = True,
    activation: str = "abs",
) -> MirrorFit:
    """Solve the Lasso over the depth-``depth`` dictionary of ``x``.

    ``min_{z, ξ} ½‖A z + ξ1 − y‖² + β‖z‖₁`` (docs/definitions.md#mirrors-lasso) with ``A`` from
    :func:`reflection_dictionary` and the intercept ``ξ`` unpenalised. Its optimum equals the global
    minimum of the network objective of #mirrors-depth2 (``depth=2``), of the ReLU network
    (``depth=2, activation="relu"``) or of #mirrors-depth3 (``depth=3``) for any width at least the
    support size; :func:`mirror_network` rebuilds such a network.

    Stopping rule: the relative duality gap ``(P − D)/P ≤ tol`` over the *whole* dictionary,
    ``D`` the dual value of the rescaled residual; the achieved gap and KKT violation are in the
    returned :class:`MirrorFit`. ``max_iter`` bounds the working-set rounds; when it is
    reached first, ``converged`` is False and a ``RuntimeWarning`` is emitted.
    ``keep_dictionary=False`` drops the ``N × P`` matrix from the result (it can be rebuilt from
    ``params``). Raises ``ValueError`` on non-1-D input, ``beta ≤ 0``, fewer than 2 distinct
    points, mismatched lengths, non-finite values, or ``activation="relu"`` with ``depth=3``.

    Examples:
        ``y = |x|`` at ``x = (−1, 0, 1)`` is the feature ``|x − 0|``; the penalty shrinks its
        coefficient to ``z = 1 − β / ‖a − ā‖² = 1 − 1.5 β``, the intercept takes up the mean,
        and the optimum is ``½ (1.5 β)² · 2/3 + β z``:

        >>> import torch
        >>> from lightning_spectral.functional import lasso_mirror_fit
        >>> x = torch.tensor([-1.0, 0.0, 1.0])
        >>> fit = lasso_mirror_fit(x, x.abs(), beta=0.1, depth=2)
        >>> fit.converged, fit.support.tolist()
        (True, [1])
        >>> round(float(fit.coef[1]), 4), round(fit.intercept, 4), round(fit.objective, 4)
        (0.85, 0.1, 0.0925)
    """
    depth = check_depth(depth)
    activation = _check_activation(activation, depth)
    beta = _check_beta(beta)
    xs, ys = _check_xy(x, y)
    if not (isinstance(tol, (int, float)) and 0 < float(tol) < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    params = _params_for(xs, depth, activation)
    A = _features_for(xs, params, activation)
    sol = solve_lasso(A, ys, beta, float(tol), int(max_iter))
    if not sol.converged:
        warnings.warn(
            f"lasso_mirror_fit: stopped after {sol.rounds} working-set rounds with relative "
            f"duality gap {(sol.primal - sol.dual) / max(sol.primal, 1e-300):.3g} > tol={tol:g}",
            RuntimeWarning,
            stacklevel=2,
        )
    residual = ys - A @ sol.z - sol.intercept
    return MirrorFit(
        objective=sol.primal,
        coef=torch.from_numpy(sol.z),
        intercept=sol.intercept,
        dictionary=torch.from_numpy(A) if keep_dictionary else None,
        params=torch.from_numpy(params),
        depth=depth,
        beta=beta,
        x=torch.from_numpy(xs),
        y=torch.from_numpy(ys),
        residual=torch.from_numpy(residual),
        dual=sol.dual,
        gap=sol.primal - sol.dual,
        kkt=sol.kkt,
        tol=float(tol),
        rounds=sol.rounds,
        converged=sol.converged,
        activation=activation,
    )


# ------------------------------------------------------------------------------------------
# the networks (docs/definitions.md#mirrors-depth2, #mirrors-depth3)


def _nets() -> tuple[type, ...]:
    """The network classes these functions accept (defined in :mod:`lightning_spectral.models`,
    imported on use: this package defines no ``nn.Module``)."""
    from lightning_spectral.models import MirrorNet, ReluMirrorNet

    return (MirrorNet, ReluMirrorNet)




def mirror_forward(
    model: MirrorNet | ReluMirrorNet, x: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """``f(x)`` of a :class:`MirrorNet` or of a :class:`ReluMirrorNet`, optionally with its
    parameters cast to ``dtype`` (differentiable; ``None`` keeps the parameters' dtype).

    ``x`` of shape ``(N,)`` or ``(N, 1)``; the output has the same shape. Raises ``TypeError``
    for a non-tensor ``x`` and ``ValueError`` for any other shape.

    Examples:
        The network rebuilt from :func:`lasso_mirror_fit`'s example computes ``0.85 |x| + 0.1``:

        >>> import torch
        >>> from lightning_spectral.functional import (
        ...     lasso_mirror_fit, mirror_forward, mirror_network)
        >>> x = torch.tensor([-1.0, 0.0, 1.0])
        >>> net = mirror_network(lasso_mirror_fit(x, x.abs(), beta=0.1, depth=2))
        >>> [round(v, 4) for v in mirror_forward(net, x, None).tolist()]
        [0.95, 0.1, 0.95]
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    squeeze_back = False
    if x.ndim == 2 and x.shape[1] == 1:
        squeeze_back = True
        flat = x[:, 0]
    elif x.ndim == 1:
        flat = x
    else:
        raise ValueError(
            f"MirrorNet takes 1-D inputs of shape (N,) or (N, 1), got shape {tuple(x.shape)}"
        )
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    w, b, alpha, xi = cast(model.w), cast(model.b), cast(model.alpha), cast(model.xi)
    flat = flat.to(device=w.device, dtype=w.dtype)
    pre = flat[:, None] * w + b
    h = torch.relu(pre) if model.activation == "relu" else torch.abs(pre)
    if model.depth == 3:
        h = torch.abs(h * cast(model.v) + cast(model.c))
    f = h @ alpha + xi
    return f[:, None] if squeeze_back else f


def _penalty(model: MirrorNet | ReluMirrorNet, dtype: torch.dtype | None) -> torch.Tensor:
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    w, alpha = cast(model.w), cast(model.alpha)
    if model.depth == 2:
        return 0.5 * (w.square().sum() + alpha.square().sum())
    v = cast(model.v)
    return (w.abs().pow(3).sum() + v.abs().pow(3).sum() + alpha.abs().pow(3).sum()) / 3.0


def network_objective(
    model: MirrorNet | ReluMirrorNet,
    x: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The training objective of a :class:`MirrorNet` or of a :class:`ReluMirrorNet`.

    Differentiable; see docs/definitions.md#mirrors-depth2, #mirrors-depth3.

    depth 2 (absolute value or ReLU): ``J = ½‖f(x) − y‖² + (β/2) Σ_k (w_k² + α_k²)``;
    depth 3: ``J = ½‖f(x) − y‖² + (β/3) Σ_k (|w_k|³ + |v_k|³ + |α_k|³)``.
    A sum over the data (not a mean); biases ``b``, ``c``, ``ξ`` are unpenalised. Computed in
    the parameters' dtype, or in ``dtype`` (e.g. ``torch.float64``) when given.
    Raises ``ValueError`` for ``beta < 0``, non-1-D ``x`` or mismatched lengths.

    Examples:
        No network reaches below the Lasso optimum (0.0925 in :func:`lasso_mirror_fit`'s
        example); the network rebuilt from the Lasso solution attains it:

        >>> import torch
        >>> from lightning_spectral.functional import (
        ...     lasso_mirror_fit, mirror_network, network_objective)
        >>> from lightning_spectral.models import MirrorNet
        >>> x = torch.tensor([-1.0, 0.0, 1.0])
        >>> fit = lasso_mirror_fit(x, x.abs(), beta=0.1, depth=2)
        >>> round(network_objective(mirror_network(fit), x, x.abs(), beta=0.1).item(), 4)
        0.0925
        >>> net = MirrorNet(4, depth=2, generator=torch.Generator().manual_seed(0))
        >>> network_objective(net, x, x.abs(), beta=0.1).item() > fit.objective
        True
    """
    if not isinstance(model, _nets()):
        raise TypeError(f"model must be a MirrorNet or ReluMirrorNet, got {type(model).__name__}")
    try:
        b = float(beta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}") from exc
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    f = mirror_forward(model, x, dtype)
    f = f.reshape(-1)
    yt = torch.as_tensor(y).to(device=f.device, dtype=f.dtype)
    if yt.ndim == 2 and yt.shape[1] == 1:
        yt = yt[:, 0]
    if yt.shape != f.shape:
        raise ValueError(f"y must have shape ({f.numel()},) or ({f.numel()}, 1), got shape "
                         f"{tuple(torch.as_tensor(y).shape)}")
    return 0.5 * (f - yt).square().sum() + b * _penalty(model, dtype)


def mirror_network(
    fit: MirrorFit, dtype: torch.dtype = torch.float64
) -> MirrorNet | ReluMirrorNet:
    """Rebuild the network of a Lasso solution (the reconstruction of docs/definitions.md#mirrors).

    One unit per non-zero coefficient ``z_j`` with feature ``(a₁, a₂)``:
    depth 2: ``t = |z|^{1/2}``, ``(w, b, α) = (t, −t a₁, sign(z) t)``;
    depth 3: ``t = |z|^{1/3}``, ``(w, b, v, c, α) = (t, −t a₁, t, −t² a₂, sign(z) t)``;
    ReLU (feature ``(a, s)``, a :class:`ReluMirrorNet`): ``t = |z|^{1/2}``,
    ``(w, b, α) = (s t, −s t a, sign(z) t)``, so that ``α (w x + b)₊ = z (s (x − a))₊``;
    and ``ξ`` = the intercept. Then the network reproduces ``fit.predict`` everywhere and
    ``network_objective(net, fit.x, fit.y, fit.beta)`` equals ``fit.objective`` (up to
    rounding). A solution with no non-zero coefficient gives one unit with all-zero parameters.

    Examples:
        The one active feature of :func:`lasso_mirror_fit`'s example, ``z = 0.85`` at
        ``a₁ = 0``, becomes one unit with ``w = α = √0.85``, ``b = 0``:

        >>> import torch
        >>> from lightning_spectral.functional import lasso_mirror_fit, mirror_network
        >>> x = torch.tensor([-1.0, 0.0, 1.0])
        >>> net = mirror_network(lasso_mirror_fit(x, x.abs(), beta=0.1, depth=2))
        >>> type(net).__name__, net.width
        ('MirrorNet', 1)
        >>> round(net.w.item() ** 2, 4), round(net.alpha.item() ** 2, 4), abs(net.b.item())
        (0.85, 0.85, 0.0)
    """
    from lightning_spectral.models import MirrorNet, ReluMirrorNet

    s = fit.support
    z = fit.coef[s]
    p = fit.params[s]
    width = max(int(s.numel()), 1)
    gen = torch.Generator().manual_seed(0)
    if fit.activation == "relu":
        relu = ReluMirrorNet(width, dtype=dtype, generator=gen)
        with torch.no_grad():
            for prm in relu.parameters():
                prm.zero_()
            k = int(s.numel())
            if k:
                t = z.abs().sqrt()
                st = p[:, 1] * t
                relu.w[:k] = st.to(dtype)
                relu.b[:k] = (-st * p[:, 0]).to(dtype)
                relu.alpha[:k] = (torch.sign(z) * t).to(dtype)
            relu.xi.fill_(fit.intercept)
        return relu
    net = MirrorNet(width, fit.depth, dtype=dtype, generator=gen)
    with torch.no_grad():
        for prm in net.parameters():
            prm.zero_()
        k = int(s.numel())
        if k:
            power = 0.5 if fit.depth == 2 else 1.0 / 3.0
            t = z.abs().pow(power)
            net.w[:k] = t.to(dtype)
            net.b[:k] = (-t * p[:, 0]).to(dtype)
            net.alpha[:k] = (torch.sign(z) * t).to(dtype)
            if fit.depth == 3:
                net.v[:k] = t.to(dtype)
                net.c[:k] = (-t * t * p[:, 1]).to(dtype)
        net.xi.fill_(fit.intercept)
    return net


def convex_gap(
    model: MirrorNet | ReluMirrorNet,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    beta: float,
    fit: MirrorFit | None = None,
    tol: float = 1e-9,
) -> float:
    """Relative distance of a network to its global optimum (docs/definitions.md#mirrors-values).

    ``(J(model) − J*) / J*`` with ``J`` from :func:`network_objective` (float64, no gradient)
    and ``J* = fit.objective`` the Lasso optimum (solved here when ``fit`` is not given, with
    ``tol``). No network of the stated form reaches below ``J*``, so the value is ``≥ −fit.gap /
    J*`` (``≥ −tol``). Returns ``0.0`` if both are 0 and ``inf`` if only ``J* = 0``.
    Raises ``ValueError`` when ``fit`` was solved for other data, ``beta``, depth or activation.

    Examples:
        The network rebuilt from the Lasso solution is at the global optimum; a freshly
        initialised one is above it:

        >>> import torch
        >>> from lightning_spectral.functional import convex_gap, lasso_mirror_fit, mirror_network
        >>> from lightning_spectral.models import MirrorNet
        >>> x = torch.tensor([-1.0, 0.0, 1.0])
        >>> fit = lasso_mirror_fit(x, x.abs(), beta=0.1, depth=2)
        >>> abs(convex_gap(mirror_network(fit), x, x.abs(), beta=0.1, fit=fit)) < 1e-6
        True
        >>> net = MirrorNet(4, depth=2, generator=torch.Generator().manual_seed(0))
        >>> convex_gap(net, x, x.abs(), beta=0.1, fit=fit) > 0
        True
    """
    if not isinstance(model, _nets()):
        raise TypeError(f"model must be a MirrorNet or ReluMirrorNet, got {type(model).__name__}")
    beta = _check_beta(beta)
    xs, ys = _check_xy(x, y)
    if fit is None:
        fit = lasso_mirror_fit(xs, ys, beta, model.depth, tol=tol, keep_dictionary=False,
                               activation=model.activation)
    else:
        if fit.depth != model.depth:
            raise ValueError(f"fit has depth {fit.depth} but the model has depth {model.depth}")
        if fit.activation != model.activation:
            raise ValueError(f"fit was solved for activation={fit.activation!r} but the model "
                             f"uses {model.activation!r}")
        if fit.beta != beta:
            raise ValueError(f"fit was solved for beta={fit.beta}, got beta={beta}")
        if fit.x.shape[0] != xs.size or not (
            np.array_equal(fit.x.numpy(), xs) and np.array_equal(fit.y.numpy(), ys)
        ):
            raise ValueError("fit was solved for different data (x, y)")
    with torch.no_grad():
        J = float(
            network_objective(model, torch.from_numpy(xs), torch.from_numpy(ys), beta,
                              dtype=torch.float64)
        )
    opt = fit.objective
    if opt <= 0:
        return 0.0 if J <= 0 else float("inf")
    return (J - opt) / opt


def __getattr__(name: str) -> Any:
    """``MirrorNet`` and ``ReluMirrorNet`` moved to :mod:`lightning_spectral.models`; the old
    import path still resolves (lazily, so that this module defines no ``nn.Module``)."""
    if name in ("MirrorNet", "ReluMirrorNet"):
        from lightning_spectral import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

