"""Loss curvature and objective noise (docs/definitions.md#curvature).

Everything here works on a *loss closure*: ``loss_fn`` is a zero-argument callable returning the
scalar loss, and ``params`` the list of tensors (requiring grad) the Hessian is taken over. A
parameter vector is flattened over ``params`` in the order given (``P`` = total count).

* :func:`hessian_vector_product` — ``H v`` by double backward (Pearlmutter's trick).
* :func:`hessian_eigenpairs` — the ``k`` algebraically largest eigenpairs of ``H``
  (``which="largest"``, sharpness) or the ``k`` largest in magnitude (``which="magnitude"``,
  PyHessian's "top eigenvalues", which include strong negative curvature), by Lanczos with full
  re-orthogonalisation (exact in exact arithmetic once the Krylov space is exhausted).
* :func:`hessian_trace` — Hutchinson's estimator ``tr H ≈ mean_j z_jᵀ H z_j`` with Rademacher
  probes, and its standard error.
* :func:`objective_noise` — the gradient-noise energy ``s_i²`` along each eigen-direction
  ``q_i``, the effective inverse temperature ``β_i = 1/(η λ_i s_i²)`` and the stationary spread
  ``σ_i = (η s_i²/(2n))^{1/2}`` (docs/definitions.md#objective-noise).

Random probes come from the caller's ``torch.Generator`` (or one seeded with ``seed``); the global
RNG is never touched. Nothing here writes ``.grad``: gradients are taken with
:func:`torch.autograd.grad`, so an optimiser's accumulated gradients are left alone.

Longer than most modules mainly through its worked examples (run as doctests); the Lanczos
iteration, Hutchinson's trace and the noise estimate share one Hessian-vector product and one
parameter flattening, which is why they live together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, cast

import numpy as np
import torch

__all__ = [
    "flatten_tensors",
    "hessian_vector_product",
    "hessian_eigenpairs",
    "hessian_trace",
    "flat_gradients",
    "objective_noise",
    "ObjectiveNoise",
]

#: the orders :func:`hessian_eigenpairs` can pick its ``k`` eigenpairs by
_WHICH: tuple[str, ...] = ("largest", "magnitude")

LossFn = Callable[[], torch.Tensor]


def flatten_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``tensors`` into one flat vector (the parameter ordering used everywhere).

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import flatten_tensors
        >>> flatten_tensors([torch.ones(2, 2), torch.zeros(3)]).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    """
    return torch.cat([t.reshape(-1) for t in tensors])


def _check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params must be a non-empty list of tensors that require grad")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
    return params


def _working_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32


class _HessianOperator:
    """``v ↦ H v`` for a fixed loss graph: one forward and one backward with ``create_graph``.

    Building the gradient graph once and re-using it for every product means each product costs
    one extra backward pass, and that stochastic layers (dropout) see one fixed mask, so every
    product is with the *same* matrix.
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor]) -> None:
        self.params = _check_params(params)
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        self.loss = loss.reshape(())
        grads = torch.autograd.grad(self.loss, self.params, create_graph=True, allow_unused=True)
        self.grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)
        ]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self.dtype = _working_dtype(self.params)
        self.device = self.params[0].device
        # parameters whose gradient still depends on them (others have zero Hessian blocks)
        self._live = [i for i, g in enumerate(self.grads) if g.requires_grad]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if not self._live:
            return torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        chunks = torch.split(v, self.sizes)
        dot = sum(
            (self.grads[i] * chunks[i].reshape(self.grads[i].shape).to(self.grads[i].dtype)).sum()
            for i in self._live
        )
        # a tensor: ``self._live`` is not empty
        hv = torch.autograd.grad(cast(torch.Tensor, dot), self.params, retain_graph=True,
                                 allow_unused=True)
        return flatten_tensors(
            [
                torch.zeros_like(p) if h is None else h.detach()
                for p, h in zip(self.params, hv, strict=True)
            ]
        ).to(self.dtype)


def hessian_vector_product(
    loss_fn: LossFn, params: Sequence[torch.Tensor], vector: torch.Tensor
) -> torch.Tensor:
    """``H v``, ``H = ∇²_θ loss_fn()`` over ``params``, by double backward.

    See docs/definitions.md#hessian. ``vector`` is flat, of length ``P`` (the total parameter
    count, in the order of ``params``). Returns a flat tensor of the same length. ``.grad`` of
    the parameters is not touched.

    Examples:
        The quadratic ``½ Σ_i a_i θ_i²`` has the Hessian ``diag(a)``:

        >>> import torch
        >>> from lightning_spectral.functional import hessian_vector_product
        >>> a = torch.tensor([1.0, 2.0, 3.0])
        >>> theta = torch.zeros(3, requires_grad=True)
        >>> loss_fn = lambda: 0.5 * (a * theta**2).sum()
        >>> hessian_vector_product(loss_fn, [theta], torch.ones(3)).tolist()
        [1.0, 2.0, 3.0]
    """
    op = _HessianOperator(loss_fn, params)
    if vector.ndim != 1 or vector.numel() != op.numel:
        raise ValueError(
            f"vector must have shape ({op.numel},) (the flattened params), got "
            f"{tuple(vector.shape)}"
        )
    return op.matvec(vector.to(device=op.device, dtype=op.dtype))


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(int(seed))


def _random(
    kind: str, n: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Gaussian or Rademacher vector from ``gen``, made on the generator's device, then moved."""
    gdev = gen.device
    if kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=gen, device=gdev).to(dtype) * 2 - 1
    else:
        v = torch.randn(n, generator=gen, device=gdev, dtype=dtype)
    return v.to(device)


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` Ritz values ``which`` picks, in the order they are returned:
    descending ``θ`` (``"largest"``), or descending ``|θ|`` with the larger ``θ`` first on ties
    (``"magnitude"``)."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")[:k]
    return np.lexsort((-theta, -np.abs(theta)))[:k]


def hessian_eigenpairs(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    k: int = 1,
    *,
    max_iter: int | None = None,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    seed: int = 0,
    which: Literal["largest", "magnitude"] = "largest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` algebraically largest (or largest-magnitude) Hessian eigenpairs, by Lanczos.

    ``which`` says which end of the spectrum "top ``k``" means:

    - ``"largest"`` (default): the ``k`` algebraically largest eigenvalues, in descending order
      (``λ_1 = λ_max``, the sharpness). For ``H = diag(1, −5, 0.5, 0.2)`` and ``k = 2``:
      ``[1, 0.5]``.
    - ``"magnitude"``: the ``k`` eigenvalues of largest ``|λ|``, in descending order of ``|λ|``
      (ties: the positive one first), as PyHessian's ``hessian.eigenvalues(top_n=k)`` (power
      iteration with deflation) reports them; a strongly negative eigenvalue (a saddle
      direction) is then among them. For the same ``H``: ``[−5, 1]``.

    Lanczos with full re-orthogonalisation (classical Gram–Schmidt applied twice) builds an
    orthonormal Krylov basis ``Q_m`` and the tridiagonal ``T_m = Q_mᵀ H Q_m``; the Ritz pairs of
    ``T_m`` approximate the extreme eigenpairs of ``H``. Iteration stops when each of the ``k``
    selected Ritz pairs has residual ``‖H y − θ y‖ = β_m |e_mᵀ s| ≤ tol · max|θ|``, when the Krylov
    space is exhausted (``m = P``, exact), or after ``max_iter`` products (default
    ``min(P, 20 + 4k)``). The eigenvalue error is then at most the residual (and typically its
    square over the spectral gap).

    The start vector is Gaussian from ``generator`` (default: a new one seeded with ``seed``).
    Memory: the basis holds ``m × P`` values of the working dtype (float64 when every parameter is
    float64, else float32). Each Krylov block finds every *distinct* eigenvalue once; when it
    breaks down before ``k`` values are found, a new random block is started (this recovers repeated
    eigenvalues such as the zeros of a low-rank Hessian).

    Convergence is tested on the ``k`` Ritz pairs that ``which`` selects: each must have
    residual ``‖H y − θ y‖ = β_m |e_mᵀ s| ≤ tol · max|θ|`` (both ends of the spectrum converge
    first in Lanczos, so either order costs about the same number of products).

    Returns ``(eigenvalues, eigenvectors)``: shapes ``(k,)`` in the order ``which`` defines and
    ``(k, P)`` with unit rows (the sign of each eigenvector is arbitrary); all NaN when a product
    is not finite (NaN/Inf loss).

    Examples:
        ``H = diag(1, −5, 0.5, 0.2)``, the Hessian of ``½ Σ_i a_i θ_i²``:

        >>> import torch
        >>> from lightning_spectral.functional import hessian_eigenpairs
        >>> a = torch.tensor([1.0, -5.0, 0.5, 0.2], dtype=torch.float64)
        >>> theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        >>> loss_fn = lambda: 0.5 * (a * theta**2).sum()
        >>> vals, vecs = hessian_eigenpairs(loss_fn, [theta], k=2)
        >>> [round(v, 4) for v in vals.tolist()]
        [1.0, 0.5]
        >>> [round(abs(v), 4) for v in vecs[0].tolist()]  # ± the first axis
        [1.0, 0.0, 0.0, 0.0]
        >>> vals, _ = hessian_eigenpairs(loss_fn, [theta], k=2, which="magnitude")
        >>> [round(v, 4) for v in vals.tolist()]
        [-5.0, 1.0]
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {list(_WHICH)}, got {which!r}")
    op = _HessianOperator(loss_fn, params)
    P = op.numel
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > P:
        raise ValueError(f"k={k} exceeds the number of parameters P={P}")
    m_max = min(P, 20 + 4 * k) if max_iter is None else min(P, int(max_iter))
    if m_max < k:
        raise ValueError(f"max_iter={max_iter} must be at least k={k}")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    gen = _generator(generator, seed)
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps

    Q = torch.zeros(m_max, P, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples Q[j] and Q[j+1]
    scale = 0.0

    def new_start(j: int) -> torch.Tensor | None:
        """A random unit vector orthogonal to ``Q[:j]`` (None if numerically impossible)."""
        for _ in range(3):
            v = _random("gauss", P, gen, device, dtype)
            for _ in range(2):
                v = v - Q[:j].T @ (Q[:j] @ v)
            nv = torch.linalg.vector_norm(v)
            if nv > 10 * eps * math.sqrt(P):
                return v / nv
        return None

    def ritz(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenpairs of the m×m tridiagonal T (host, float64, ascending)."""
        T = np.diag(np.asarray(alphas[:m], dtype=np.float64))
        if m > 1:
            off = np.asarray(betas[: m - 1], dtype=np.float64)
            T += np.diag(off, 1) + np.diag(off, -1)
        theta, S = np.linalg.eigh(T)
        return torch.from_numpy(theta), torch.from_numpy(S)

    q = new_start(0)
    assert q is not None
    m = 0
    for j in range(m_max):
        Q[j] = q
        w = op.matvec(q)
        alpha_t = torch.dot(w, q)
        w = w - alpha_t * q
        if j > 0:
            w = w - betas[j - 1] * Q[j - 1]
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        # α and β reach the host together: one device synchronisation per Hessian product
        alpha, beta = torch.stack((alpha_t, torch.linalg.vector_norm(w))).tolist()
        if not (math.isfinite(alpha) and math.isfinite(beta)):  # NaN/Inf loss or curvature
            nan = torch.full((k,), float("nan"), dtype=dtype, device=device)
            return nan, torch.full((k, P), float("nan"), dtype=dtype, device=device)
        alphas.append(alpha)
        m = j + 1
        scale = max(scale, abs(alpha), beta)
        if m == P:
            break
        breakdown = beta <= 100 * eps * max(scale, 1e-300) * math.sqrt(m)
        if m >= k:
            theta, S = ritz(m)
            # host-side convergence test on the small tridiagonal problem (numpy, no device)
            sel = _select(theta.numpy(), k, which)
            top = theta.numpy()[sel]
            resid = (0.0 if breakdown else beta) * np.abs(S.numpy()[-1, sel])
            if bool((resid <= tol * max(float(np.abs(top).max()), 1e-300)).all()):
                break
        if m == m_max:
            break
        if breakdown:
            nxt = new_start(m)
            if nxt is None:
                break
            betas.append(0.0)
            q = nxt
        else:
            betas.append(beta)
            q = w / beta
    theta, S = ritz(m)
    if m < k:  # pragma: no cover - guarded by the k <= P and m_max >= k checks
        raise RuntimeError("Lanczos produced fewer Ritz values than requested")
    order = torch.from_numpy(_select(theta.numpy(), k, which))
    vals = theta[order].to(dtype=dtype, device=device)
    vecs = (S[:, order].T.to(dtype=dtype, device=device)) @ Q[:m]
    vecs = vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True)
    return vals, vecs


def hessian_trace(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    n_probes: int = 64,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson estimate of ``tr H`` with Rademacher probes, and its standard error.

    ``tr H ≈ (1/N) Σ_j z_jᵀ H z_j`` with ``z_j ∈ {−1, +1}^P`` i.i.d. uniform (unbiased since
    ``E[z zᵀ] = I``); the standard error is ``std_{ddof=1}(z_jᵀ H z_j) / √N`` (NaN for
    ``N = 1``). The variance of one probe is ``2 Σ_{a≠b} H_ab²``, so a diagonal Hessian gives the
    exact trace with zero error. Probes come from ``generator`` (default: seeded with ``seed``).
    Returns two 0-d tensors on the parameters' device.

    Examples:
        A diagonal Hessian gives its exact trace with zero error:

        >>> import torch
        >>> from lightning_spectral.functional import hessian_trace
        >>> a = torch.tensor([1.0, -5.0, 0.5, 0.2], dtype=torch.float64)
        >>> theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        >>> est, err = hessian_trace(lambda: 0.5 * (a * theta**2).sum(), [theta], n_probes=8)
        >>> round(float(est), 4), round(float(err), 4)
        (-3.3, 0.0)
    """
    if not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    op = _HessianOperator(loss_fn, params)
    gen = _generator(generator, seed)
    samples = torch.empty(n_probes, dtype=op.dtype, device=op.device)
    for j in range(n_probes):
        z = _random("rademacher", op.numel, gen, op.device, op.dtype)
        samples[j] = torch.dot(z, op.matvec(z))
    est = samples.mean()
    if n_probes > 1:
        se = samples.std(correction=1) / math.sqrt(n_probes)
    else:
        se = torch.full_like(est, float("nan"))
    return est, se


def flat_gradients(loss_fns: Sequence[LossFn], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack the flattened gradient of each loss closure: shape ``(len(loss_fns), P)``.

    Use one closure per sample (per-sample gradients) or per mini-batch (per-batch gradients) as
    the input of :func:`objective_noise`. Uses :func:`torch.autograd.grad` (``.grad`` untouched).

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import flat_gradients
        >>> theta = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> flat_gradients([lambda: theta.sum(), lambda: (theta**2).sum()], [theta]).tolist()
        [[1.0, 1.0], [2.0, 4.0]]
    """
    params = _check_params(params)
    dtype = _working_dtype(params)
    rows = []
    for fn in loss_fns:
        grads = torch.autograd.grad(fn(), params, allow_unused=True)
        rows.append(
            flatten_tensors(
                [torch.zeros_like(p) if g is None else g
                 for p, g in zip(params, grads, strict=True)]
            ).to(dtype)
        )
    if not rows:
        raise ValueError("loss_fns must hold at least one closure")
    return torch.stack(rows)


class ObjectiveNoise(NamedTuple):
    """Per eigen-direction quantities (docs/definitions.md#objective-noise), each ``(k,)``.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import ObjectiveNoise, objective_noise
        >>> grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> noise = objective_noise(grads, torch.tensor([2.0, 1.0]), torch.eye(2), lr=0.1)
        >>> isinstance(noise, ObjectiveNoise), noise._fields
        (True, ('s2', 'beta', 'sigma'))
    """

    s2: torch.Tensor
    """Gradient-noise energy along ``q_i``: ``s_i² = (1/n) Σ_j (q_iᵀ ε_j)² / B``."""
    beta: torch.Tensor
    """Effective inverse temperature ``β_i = 1/(η λ_i s_i²)`` (NaN: ``λ_i ≤ 0`` or ``s_i = 0``)."""
    sigma: torch.Tensor
    """Stationary spread ``σ_i = (η s_i² / (2n))^{1/2}`` (NaN where ``λ_i ≤ 0``/``s_i = 0``)."""


def objective_noise(
    gradients: torch.Tensor,
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    lr: float,
    *,
    batch_size: int = 1,
    n: int | None = None,
) -> ObjectiveNoise:
    """Objective noise along the Hessian's eigen-directions (docs/definitions.md#objective-noise).

    ``gradients`` ``(n_rows, P)``: one gradient per sample (or per mini-batch), e.g. from
    :func:`flat_gradients`; ``eigenvalues`` ``(k,)`` and ``eigenvectors`` ``(k, P)`` (unit rows),
    e.g. from :func:`hessian_eigenpairs`; ``lr`` the learning rate ``η``.

    - ``ε_j = g_j − ḡ``; ``s_i² = (1/n_rows) Σ_j (q_iᵀ ε_j)² / batch_size`` — the biased (``1/n``)
      variance of the projected gradients; ``batch_size = B`` gives the noise of a size-``B``
      mini-batch gradient built from per-sample rows (leave it at 1 when the rows already are
      mini-batch gradients);
    - ``β_i = 1 / (η λ_i s_i²)``;
    - ``σ_i = (η s_i² / (2n))^{1/2}`` with ``n`` the sample count of the stationary density
      (default ``n_rows``);
    - ``β_i`` and ``σ_i`` are NaN where ``λ_i ≤ 0`` or ``s_i = 0``.

    Computed in float64 when the gradients are float64, else float32; no host synchronisation.

    Examples:
        Gradients ``±e_1`` around their mean 0: unit noise along ``q_1 = e_1``, none along
        ``q_2 = e_2`` (where ``β`` and ``σ`` are then NaN); ``β_1 = 1/(0.1 · 2 · 1) = 5``,
        ``σ_1 = (0.1 · 1 / (2 · 4))^{1/2}``:

        >>> import torch
        >>> from lightning_spectral.functional import objective_noise
        >>> grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
        >>> noise = objective_noise(grads, torch.tensor([2.0, 1.0]), torch.eye(2), lr=0.1)
        >>> [[round(v, 4) for v in t.tolist()] for t in noise]
        [[1.0, 0.0], [5.0, nan], [0.1118, nan]]
    """
    if gradients.ndim != 2:
        raise ValueError(f"gradients must have shape (n, P), got {tuple(gradients.shape)}")
    if eigenvectors.ndim != 2 or eigenvectors.shape[1] != gradients.shape[1]:
        raise ValueError(
            f"eigenvectors must have shape (k, {gradients.shape[1]}), got "
            f"{tuple(eigenvectors.shape)}"
        )
    if eigenvalues.ndim != 1 or eigenvalues.shape[0] != eigenvectors.shape[0]:
        raise ValueError(
            f"eigenvalues must have shape ({eigenvectors.shape[0]},), got "
            f"{tuple(eigenvalues.shape)}"
        )
    if gradients.shape[0] < 1:
        raise ValueError("gradients must hold at least one row")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    n_rows = gradients.shape[0]
    n_eff = n_rows if n is None else int(n)
    if n_eff < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    dtype = torch.float64 if gradients.dtype == torch.float64 else torch.float32
    g = gradients.to(dtype)
    q = eigenvectors.to(device=g.device, dtype=dtype)
    lam = eigenvalues.to(device=g.device, dtype=dtype)
    eps_rows = g - g.mean(dim=0, keepdim=True)
    proj = eps_rows @ q.T  # (n_rows, k)
    s2 = (proj**2).mean(dim=0) / batch_size
    bad = (lam <= 0) | (s2 <= 0) | ~torch.isfinite(lam) | ~torch.isfinite(s2)
    nan = torch.full_like(s2, float("nan"))
    safe_den = torch.where(bad, torch.ones_like(s2), lr * lam * s2)
    beta = torch.where(bad, nan, 1.0 / safe_den)
    sigma = torch.where(bad, nan, torch.sqrt(lr * s2.clamp_min(0) / (2 * n_eff)))
    return ObjectiveNoise(s2=s2, beta=beta, sigma=sigma)
