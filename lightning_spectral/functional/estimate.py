"""Weight statistics of a large matrix without its full SVD (docs/definitions.md#large-weights).

A full ``torch.linalg.svdvals`` of a ``d×d`` weight costs ``O(d³)`` (about 10 s at ``d = 4096``
on a 2-core CPU). The statistics that :class:`~lightning_spectral.SpectralMonitor` logs per
weight need much less than every singular value:

* ``σ_1`` — a few steps of the **Lanczos** method on ``WᵀW`` (:func:`top_singular_value`),
  warm-started from the previous call's Ritz vector; with ``‖W‖_F²`` (exact, one pass) it gives
  the stable rank ``‖W‖_F² / σ_1²``.
* the effective rank and the truncation ranks ``k(τ)`` — functions of the whole distribution of
  ``σ²`` — from a **block Krylov sketch** (:func:`spectrum_sketch`): Rayleigh–Ritz on the block
  Krylov space of ``WᵀW`` (smaller side) started from ``b`` random probe vectors gives Ritz values
  (the nodes) and, from the probes' coordinates, block Gauss quadrature weights: how many
  eigenvalues each node stands for (stochastic Lanczos quadrature). Converged, isolated Ritz values
  — the top of the spectrum — count as exactly one eigenvalue each; the rest of the spectrum is
  represented by the quadrature, normalised to the exact count and energy that remain.

Sources: N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
probabilistic algorithms for constructing approximate matrix decompositions", SIAM Review 53(2),
2011; C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster approximate
singular value decomposition", NeurIPS 2015; S. Ubaru, J. Chen, Y. Saad, "Fast estimation of
tr(f(A)) via stochastic Lanczos quadrature", SIAM J. Matrix Anal. Appl. 38(4), 2017;
T. Chen, T. Trogdon, S. Ubaru, "Analysis of stochastic Lanczos quadrature for spectrum
approximation", ICML 2021. The error of each estimate is stated in docs/definitions.md.

Determinism: the random vectors come from a local ``torch.Generator`` on the input's device
seeded with ``seed`` (default :data:`ESTIMATE_SEED`); the global RNG is never used. The same
input, seed and device give the same result.

Unlike the exact functions of this package these routines synchronise with the host (a few
scalars per Lanczos step, one mask per Krylov block): they decide when to stop. They are meant
for matrices whose SVD costs seconds, where that does not matter.

Kept in one module, longer than most: the σ_1 iteration and the spectrum sketch share the
matrix view, the Krylov machinery and the seeded probes, and :func:`estimate_weight` combines
them; a fifth of the length is worked examples run as doctests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lightning_spectral.functional._utils import resolve_dtype
from lightning_spectral.functional.weights import weight_matrix

__all__ = [
    "ESTIMATE_SEED",
    "TopSingular",
    "SpectrumSketch",
    "WeightEstimate",
    "top_singular_value",
    "spectrum_sketch",
    "estimate_weight",
]

ESTIMATE_SEED = 0x5EC7_2A11
"""Default seed of the probe vectors: fixed, so repeated calls give equal results; an unusual
value, so that the probes are not the first draws of a generator seeded 0, 1 or 42 like a
model's initialisation."""
#: share of a seeded random unit vector mixed into a warm start (keeps every direction reachable)
_WARM_MIX = 1e-3
#: a Ritz value whose residual is at most this fraction of the largest Ritz value is converged
_CONVERGED = 1e-4
#: ... and counts as exactly one eigenvalue when its residual is also at most this fraction of
#: the distance to the nearest other Ritz value (isolated)
_ISOLATED = 0.1
#: Ritz values closer than this many ε of the largest are equal up to rounding (not isolated)
_ROUNDING = 100
#: relative excess of an estimated count over an integer that is still rounding, not a count
_COUNT_SLACK = 1e-5
#: largest convergence ratio assumed by the stopping rule of the Lanczos iteration for σ_1
_RATIO_CAP = 0.95
#: default step limit of the Lanczos iteration for σ_1
_MAX_ITER = 100


class TopSingular(NamedTuple):
    """Result of :func:`top_singular_value`.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import TopSingular, top_singular_value
        >>> top = top_singular_value(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
        >>> isinstance(top, TopSingular), round(float(top.value), 4), top.vector.shape
        (True, 3.0, torch.Size([3]))
    """

    value: torch.Tensor
    """``σ̃_1`` (0-d): the largest Ritz value's square root; never above ``σ_1`` beyond rounding."""
    vector: torch.Tensor | None
    """Unit estimate ``ṽ_1`` of the top right singular vector, shape ``(n,)``: the warm start of
    the next call (``None`` for a non-finite or empty matrix)."""
    iterations: int
    """Products with ``WᵀW`` made (each one ``W x`` and one ``Wᵀ y``)."""
    residual: torch.Tensor
    """``‖WᵀW ṽ − σ̃² ṽ‖`` (0-d): some ``σ_i²`` lies within this distance of ``σ̃²``."""


def _nan(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((), math.nan, dtype=dtype, device=device)


def _prepare(
    w: torch.Tensor, dtype: torch.dtype | str | None
) -> tuple[torch.Tensor, torch.dtype, torch.Tensor]:
    """The detached matrix view in the working dtype and ``‖W‖_F²`` in float64.

    ``‖W‖_F²`` is the float64 sum of the squared row norms (each row's norm in the working
    dtype): accurate to a few ε of the working dtype, one pass over ``W``, no temporary copy.
    It is non-finite exactly when an entry is NaN/Inf (or a row norm overflows), which makes it
    the non-finite check as well.
    """
    mat = weight_matrix(w).detach()
    work = resolve_dtype(dtype, mat)
    mat = mat.to(work)
    if mat.numel() == 0:
        return mat, work, torch.zeros((), dtype=torch.float64, device=mat.device)
    energy = torch.linalg.vector_norm(mat, dim=1).to(torch.float64).square().sum()
    return mat, work, energy


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _check_options(tol: float | None = None, probes: int | None = None,
                   steps: int | None = None, max_iter: int | None = None) -> None:
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    for name, v, low in (("probes", probes, 2), ("steps", steps, 1), ("max_iter", max_iter, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def top_singular_value(
    w: torch.Tensor,
    v0: torch.Tensor | None = None,
    *,
    tol: float = 1e-4,
    max_iter: int = _MAX_ITER,
    seed: int = ESTIMATE_SEED,
    dtype: torch.dtype | str | None = None,
) -> TopSingular:
    """Largest singular value ``σ_1`` of the weight matrix by the Lanczos method on ``WᵀW``.

    See docs/definitions.md#large-weights. The Krylov space of ``WᵀW`` is built from ``v0`` (the
    previous call's :attr:`TopSingular.vector`: a *warm start*; a share ``1e-3`` of a seeded
    random vector is mixed in) or, without ``v0`` (or with one of the wrong length, zero or
    non-finite), from a seeded random vector, with full reorthogonalisation. The largest Ritz
    value ``σ̃`` only grows towards ``σ_1`` (``σ̃ ≤ σ_1`` always: Ritz values interlace); the
    iteration stops when the error still expected — the last step ``Δ`` continued as a geometric
    series, ``Δ / (1 − ρ)`` with ``ρ`` the ratio of the last two steps (capped at 0.95) — is at
    most ``tol · σ̃`` (at least three steps), when the space becomes invariant, or after
    ``max_iter`` steps. The returned residual bounds the distance of ``σ̃²`` to the spectrum.

    ``w``: ``(out, in, ...)``, read as ``W.reshape(out, -1)`` (#weight-matrix); computed in float32
    (float64 for float64 input or ``dtype="float64"``) on ``w``'s device, without gradients. A
    weight holding NaN/Inf gives ``σ̃ = NaN`` and ``vector=None`` (no exception); ``W = 0`` gives 0.

    Examples:
        The returned vector warm-starts the next call, here after a small change of ``W``:

        >>> import torch
        >>> from lightning_spectral.functional import top_singular_value
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(300, 300, generator=g) / 300**0.5
        >>> cold = top_singular_value(w)
        >>> step = w + 1e-3 * torch.randn(300, 300, generator=g) / 300**0.5
        >>> warm = top_singular_value(step, cold.vector)
        >>> warm.iterations < cold.iterations
        True
        >>> exact = float(torch.linalg.svdvals(step)[0])
        >>> abs(float(warm.value) / exact - 1) < 1e-3
        True
    """
    _check_options(tol=tol, max_iter=max_iter)
    mat, work, energy = _prepare(w, dtype)
    return _top(mat, work, energy, v0, tol, max_iter, seed)


def _top(mat: torch.Tensor, work: torch.dtype, energy: torch.Tensor, v0: torch.Tensor | None,
         tol: float, max_iter: int, seed: int) -> TopSingular:
    """:func:`top_singular_value` of a prepared matrix (see :func:`_prepare`)."""
    device = mat.device
    m, n = mat.shape
    if m == 0 or n == 0:
        zero = torch.zeros((), dtype=work, device=device)
        return TopSingular(zero, None, 0, zero)
    if not bool(torch.isfinite(energy)):
        return TopSingular(_nan(work, device), None, 0, _nan(work, device))
    gen = _generator(device, seed)
    rand = torch.randn(n, generator=gen, dtype=work, device=device)
    rand = rand / rand.norm()
    q = rand
    if v0 is not None and isinstance(v0, torch.Tensor) and v0.numel() == n:
        start = v0.detach().reshape(n).to(device=device, dtype=work)
        norm = float(start.norm())
        if math.isfinite(norm) and norm > 0:
            q = start / norm + _WARM_MIX * rand
            q = q / q.norm()
    eps = torch.finfo(work).eps
    basis = torch.empty(max_iter, n, dtype=work, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    sigmas: list[float] = []
    theta = 0.0
    s_top = torch.ones(1, dtype=torch.float64)
    beta = 0.0
    steps = 0
    for k in range(max_iter):
        basis[k] = q
        x = mat.T @ (mat @ q)
        steps = k + 1
        alpha = float(q @ x)
        x = x - alpha * q - (beta * basis[k - 1] if k > 0 else 0.0)
        done = basis[: k + 1]
        for _ in range(2):  # full reorthogonalisation (classical Gram–Schmidt, twice)
            x = x - done.T @ (done @ x)
        beta = float(x.norm())
        alphas.append(alpha)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        vals, vecs = torch.linalg.eigh(tri)
        theta, s_top = float(vals[-1]), vecs[:, -1]
        sigmas.append(math.sqrt(max(theta, 0.0)))
        invariant = beta <= eps * max(abs(theta), 1e-300) or not math.isfinite(beta)
        if invariant or _remaining(sigmas) <= tol * sigmas[-1]:
            break
        betas.append(beta)
        q = x / beta
    vec = s_top.to(device=device, dtype=work) @ basis[:steps]
    norm = vec.norm()
    vec = vec / norm if float(norm) > 0 else rand
    residual = torch.tensor(beta * abs(float(s_top[-1])), dtype=work, device=device)
    value = torch.tensor(math.sqrt(max(theta, 0.0)), dtype=work, device=device)
    return TopSingular(value, vec, steps, residual)


def _remaining(sigmas: list[float]) -> float:
    """Estimated error left in the last of the growing Ritz values ``sigmas``: the last step
    ``Δ`` summed as a geometric series, ``Δ / (1 − ρ)`` with ``ρ`` the ratio of the last two
    steps, capped at 0.95 (``inf`` before three values)."""
    if len(sigmas) < 3:
        return math.inf
    step, before = sigmas[-1] - sigmas[-2], sigmas[-2] - sigmas[-3]
    if step <= 0:
        return 0.0
    ratio = min(step / before, _RATIO_CAP) if before > 0 else _RATIO_CAP
    return step / (1.0 - ratio)


@dataclass(frozen=True)
class SpectrumSketch:
    """A discrete stand-in for the spectrum ``σ_1² ≥ … ≥ σ_r²`` of a weight (``r = min(m, n)``).

    ``weights[j]`` eigenvalues sit at ``nodes[j]``; ``Σ weights = r`` and
    ``Σ weights · nodes = ‖W‖_F²`` (exactly, up to rounding, unless the quadrature part was
    empty). Built by :func:`spectrum_sketch`; see docs/definitions.md#large-weights.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import SpectrumSketch, spectrum_sketch
        >>> sk = spectrum_sketch(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
        >>> isinstance(sk, SpectrumSketch), sk.size, [round(x, 4) for x in sk.nodes.tolist()]
        (True, 4, [16.0, 9.0, 4.0, 1.0])
        >>> sk.weights.tolist(), float(sk.energy)
        ([1.0, 1.0, 1.0, 1.0], 30.0)
    """

    nodes: torch.Tensor
    """Ritz values ``θ_j ≥ 0`` of ``WᵀW`` (smaller side), descending, shape ``(K,)``."""
    weights: torch.Tensor
    """How many eigenvalues each node stands for, shape ``(K,)``, float64."""
    exact: torch.Tensor
    """True for the converged, isolated Ritz values, counted as exactly one eigenvalue each."""
    energy: torch.Tensor
    """``‖W‖_F² = Σ σ_i²`` (0-d, exact; NaN for a non-finite weight)."""
    size: int
    """``r = min(m, n)``, the number of singular values."""
    krylov_dim: int
    """Dimension ``K`` of the Krylov space (``≤ probes · steps``)."""

    def effective_rank(self) -> torch.Tensor:
        """``exp(S(σ²))`` of the sketch: ``S = −Σ_j w_j p_j log p_j``, ``p_j = θ_j / ‖W‖_F²``.

        0 for ``W = 0``, NaN for a non-finite weight (docs/definitions.md#erank)."""
        total = (self.weights * self.nodes).sum()
        p = self.nodes / torch.where(total > 0, total, torch.ones_like(total))
        plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
        erank = torch.exp(-(self.weights * plogp).sum()).clamp(1.0, max(self.size, 1))
        erank = torch.where(total > 0, erank, torch.zeros_like(erank))
        return torch.where(torch.isfinite(self.energy), erank, torch.full_like(erank, math.nan))

    def truncation_rank(self, energy: float = 0.9) -> torch.Tensor:
        """``k(τ)`` of the sketch: the nodes in descending order are taken whole while their
        energy stays below ``τ ‖W‖_F²``; the node that crosses contributes the count its
        missing energy needs (``(τ E − E_before) / θ_j`` eigenvalues of value ``θ_j``), rounded
        up (an excess below a relative ``1e-5``, the rounding of the nodes, is ignored). 0 for
        ``W = 0``, NaN for a non-finite weight (docs/definitions.md#capacity)."""
        tau = float(energy)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {energy!r}")
        th, wt = self.nodes, self.weights
        total = (wt * th).sum()
        if th.numel() == 0 or not bool(torch.isfinite(total)) or float(total) <= 0:
            zero = torch.zeros((), dtype=torch.float64, device=th.device)
            return torch.where(torch.isfinite(self.energy), zero, torch.full_like(zero, math.nan))
        cum_e = (wt * th).cumsum(0) / total
        cum_n = wt.cumsum(0)
        target = tau * (1.0 - 1e-12)
        j = min(int((cum_e < target).sum()), th.numel() - 1)
        before_e = cum_e[j - 1] if j > 0 else torch.zeros_like(total)
        before_n = cum_n[j - 1] if j > 0 else torch.zeros_like(total)
        if bool(self.exact[j]):
            count = before_n + 1.0  # a single eigenvalue: taken whole
        else:
            need = (target - before_e) * total / th[j].clamp_min(1e-300)
            count = before_n + need.clamp(0.0, float(wt[j]))
        # rounded up, ignoring an excess within the nodes' rounding (a relative 1e-5)
        return torch.ceil(count * (1.0 - _COUNT_SLACK)).clamp(1.0, float(self.size))


def _ritz_gaps(theta: torch.Tensor) -> torch.Tensor:
    """Distance of each value to the nearest other value (``inf`` for a single value)."""
    order = theta.argsort()
    st = theta[order]
    gaps = torch.full_like(st, math.inf)
    if st.numel() > 1:
        d = st[1:] - st[:-1]
        gaps[1:] = torch.minimum(gaps[1:], d)
        gaps[:-1] = torch.minimum(gaps[:-1], d)
    out = torch.empty_like(gaps)
    out[order] = gaps
    return out


def spectrum_sketch(
    w: torch.Tensor,
    *,
    probes: int = 32,
    steps: int = 12,
    seed: int = ESTIMATE_SEED,
    dtype: torch.dtype | str | None = None,
) -> SpectrumSketch:
    """A :class:`SpectrumSketch` of the weight's ``σ²`` from a block Krylov space of ``WᵀW``.

    See docs/definitions.md#large-weights. ``probes`` (``b``) random vectors, uniform on the
    sphere of radius ``√r``, start a block Krylov space of ``WᵀW`` on the smaller side
    (``r = min(m, n)``) of dimension at most ``b · steps`` (``steps`` products of ``WᵀW`` with a
    block: ``2 · steps`` passes over ``W``). Rayleigh–Ritz gives the nodes ``θ_j`` and the block
    Gauss quadrature of the probes gives each node's weight (``Σ_probes (s_jᵀ Q z)² / b``);
    converged isolated nodes count one each, and the other weights are rescaled so that the
    sketch holds exactly ``r`` eigenvalues and the exact energy ``‖W‖_F²``. ``r ≤ b · steps``
    explores the whole space: the sketch is then the exact spectrum (up to rounding).

    Computed in float32 (float64 for float64 input or ``dtype="float64"``; the small projected
    problem always in float64) on ``w``'s device. NaN/Inf in ``w`` gives an empty sketch whose
    statistics are NaN (no exception).

    Examples:
        ``c·I`` of side 600 (larger than the Krylov space): the quadrature finds one cluster of
        600 equal values, so ``erank = 600`` and ``k(0.9) = ⌈0.9 · 600⌉``:

        >>> import torch
        >>> from lightning_spectral.functional import spectrum_sketch
        >>> sk = spectrum_sketch(2 * torch.eye(600))
        >>> sk.krylov_dim, round(float(sk.weights.sum()), 6)
        (32, 600.0)
        >>> round(float(sk.effective_rank()), 3), float(sk.truncation_rank(0.9))
        (600.0, 540.0)
    """
    _check_options(probes=probes, steps=steps)
    mat, work, energy = _prepare(w, dtype)
    return _sketch(mat, work, energy, probes, steps, seed)


def _sketch(mat: torch.Tensor, work: torch.dtype, energy: torch.Tensor, probes: int, steps: int,
            seed: int) -> SpectrumSketch:
    """:func:`spectrum_sketch` of a prepared matrix (see :func:`_prepare`)."""
    device = mat.device
    m, n = mat.shape
    g = mat if n <= m else mat.T  # (p, r): WᵀW on the smaller side is gᵀg
    r = g.shape[1]
    empty = torch.zeros(0, dtype=torch.float64, device=device)
    if r == 0 or g.shape[0] == 0:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return SpectrumSketch(empty, empty, empty.bool(), zero, r, 0)
    if not bool(torch.isfinite(energy)):
        return SpectrumSketch(empty, empty, empty.bool(), _nan(torch.float64, device), r, 0)
    b = min(probes, r)
    gen = _generator(device, seed)
    z = torch.randn(b, r, generator=gen, dtype=work, device=device)
    z = z * (math.sqrt(r) / z.norm(dim=1, keepdim=True).clamp_min(1e-30))
    eps = torch.finfo(work).eps
    first = torch.linalg.qr(z.T).Q.T  # (b, r), orthonormal rows spanning the probes
    blocks = [first]
    images: list[torch.Tensor] = []
    remainder = torch.zeros(0, r, dtype=work, device=device)
    for k in range(steps):
        x = (blocks[-1] @ g.T) @ g  # (WᵀW Q_k)ᵀ, rows
        images.append(x)
        if sum(blk.shape[0] for blk in blocks) >= r:
            break  # the whole space is explored
        done = torch.cat(blocks)
        ref = x.norm()
        for _ in range(2):  # block classical Gram–Schmidt, twice
            x = x - (x @ done.T) @ done
        remainder = x  # the part of the last block's image outside the space
        if k == steps - 1:
            break
        _, sv, vh = torch.linalg.svd(x, full_matrices=False)
        keep = sv > math.sqrt(eps) * ref
        if not bool(keep.any()):
            break  # the Krylov space is invariant
        blocks.append(vh[keep][: r - done.shape[0]])
    q = torch.cat(blocks).to(torch.float64)
    aq = torch.cat(images).to(torch.float64)
    kdim = q.shape[0]
    t = q @ aq.T
    t = 0.5 * (t + t.T)
    theta, s = torch.linalg.eigh(t)
    theta, s = theta.flip(0).clamp_min(0.0), s.flip(1)
    if kdim == r:  # the whole space: the Ritz values are the eigenvalues
        every = torch.ones_like(theta)
        return SpectrumSketch(theta, every, every.bool(), energy, r, kdim)
    coords = s.T @ (q @ z.to(torch.float64).T)  # (K, b): probe coordinates on the Ritz vectors
    w_q = coords.square().sum(dim=1) / b
    # residual of Ritz pair j: only the last block's images leave the space, so
    # ‖WᵀW y_j − θ_j y_j‖ = ‖remainderᵀ s_j[last block]‖
    last = blocks[-1].shape[0]
    if remainder.shape[0]:
        rem = remainder.to(torch.float64)
        res = (rem.T @ s[kdim - last:]).norm(dim=0)
    else:
        res = torch.zeros_like(theta)
    top = theta[0] if kdim else torch.zeros((), dtype=torch.float64, device=device)
    # isolated: the nearest other node is farther than the residual allows and farther than
    # rounding (equal eigenvalues found by several probes are a cluster, not single values)
    gaps = _ritz_gaps(theta)
    isolated = (res <= _ISOLATED * gaps) & (gaps > _ROUNDING * eps * top)
    exact = (res <= _CONVERGED * top) & isolated & (theta > 0)
    ones = torch.ones_like(w_q)
    rest = ~exact
    rest_count = r - float(exact.sum())
    rest_energy = float(energy) - float(theta[exact].sum())
    weights = _normalise(theta, torch.where(exact, ones, w_q), rest, rest_count, rest_energy)
    return SpectrumSketch(theta, weights, exact, energy, r, kdim)


def _normalise(theta: torch.Tensor, weights: torch.Tensor, rest: torch.Tensor,
               count: float, energy: float) -> torch.Tensor:
    """Rescale the quadrature weights (``rest``) to hold ``count`` eigenvalues of total
    ``energy``: ``w_j (a + c θ_j)`` with ``a, c`` solving the two conditions (the exact trace of
    ``I`` and of ``WᵀW`` as control variates); a plain rescaling to ``count`` where that would
    make a weight negative."""
    w = weights[rest]
    th = theta[rest]
    if w.numel() == 0 or count <= 0:
        return weights.masked_fill(rest, 0.0)
    s0, s1, s2 = float(w.sum()), float((w * th).sum()), float((w * th * th).sum())
    det = s0 * s2 - s1 * s1
    scaled = w * (count / s0) if s0 > 0 else w
    if det > 1e-12 * max(s0 * s2, 1e-300) and energy > 0:
        a = (count * s2 - energy * s1) / det
        c = (energy * s0 - count * s1) / det
        factor = a + c * th
        if bool((factor >= 0).all()):
            scaled = w * factor
    out = weights.clone()
    out[rest] = scaled
    return out


@dataclass(frozen=True)
class WeightEstimate:
    """Result of :func:`estimate_weight`: the logged weight statistics, estimated.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import WeightEstimate, estimate_weight
        >>> e = estimate_weight(torch.diag(torch.tensor([2.0, 1.0, 1.0])))
        >>> isinstance(e, WeightEstimate), round(float(e.sv_max), 4), round(float(e.stable_rank), 4)
        (True, 2.0, 1.5)
        >>> round(float(e.effective_rank), 4), float(e.truncation_rank(0.7))
        (2.3811, 2.0)
    """

    sv_max: torch.Tensor
    """``σ̃_1``: the larger of the Lanczos value and the sketch's top node (both lower bounds)."""
    frobenius_sq: torch.Tensor
    """``‖W‖_F²`` (exact)."""
    stable_rank: torch.Tensor
    """``‖W‖_F² / σ̃_1²`` (#stable-rank); NaN for ``W = 0``."""
    sketch: SpectrumSketch
    """The spectrum sketch behind the effective rank and the truncation ranks."""
    vector: torch.Tensor | None
    """Warm start for the next call (:attr:`TopSingular.vector`)."""
    iterations: int
    """Lanczos steps spent on ``σ_1``."""

    @property
    def effective_rank(self) -> torch.Tensor:
        """``exp(S(σ²))`` estimated from the sketch (#erank)."""
        return self.sketch.effective_rank().to(self.sv_max.dtype)

    def truncation_rank(self, energy: float = 0.9) -> torch.Tensor:
        """``k(τ)`` estimated from the sketch (#capacity)."""
        return self.sketch.truncation_rank(energy).to(self.sv_max.dtype)


def estimate_weight(
    w: torch.Tensor,
    v0: torch.Tensor | None = None,
    *,
    tol: float = 1e-4,
    probes: int = 32,
    steps: int = 12,
    seed: int = ESTIMATE_SEED,
    dtype: torch.dtype | str | None = None,
) -> WeightEstimate:
    """``σ_1``, stable rank, effective rank and truncation ranks of a weight, estimated.

    :func:`top_singular_value` (warm-started from ``v0``) and :func:`spectrum_sketch`, with the
    exact ``‖W‖_F²``; see docs/definitions.md#large-weights for the errors. NaN/Inf in ``w``
    gives NaN statistics and ``vector=None``; ``W = 0`` gives ``σ_1 = 0``, stable rank NaN,
    effective rank 0 and ``k(τ) = 0``, as the exact functions do.

    Examples:
        A ``1024×1024`` weight with singular values ``σ_i = i^{-1/2}`` (energy spread like a
        heavy tail), against the full SVD:

        >>> import torch
        >>> from lightning_spectral.functional import estimate_weight, truncation_rank
        >>> g = torch.Generator().manual_seed(0)
        >>> u = torch.linalg.qr(torch.randn(1024, 1024, generator=g)).Q
        >>> v = torch.linalg.qr(torch.randn(1024, 1024, generator=g)).Q
        >>> s = torch.arange(1, 1025.0) ** -0.5
        >>> w = (u * s) @ v.T
        >>> e = estimate_weight(w)
        >>> exact = torch.linalg.svdvals(w)
        >>> abs(float(e.sv_max / exact[0]) - 1) < 1e-4
        True
        >>> srank = float((exact**2).sum() / exact[0] ** 2)
        >>> abs(float(e.stable_rank) / srank - 1) < 1e-4
        True
        >>> k = float(truncation_rank(exact, 0.9))
        >>> k, abs(float(e.truncation_rank(0.9)) / k - 1) < 0.03
        (483.0, True)
    """
    _check_options(tol=tol, probes=probes, steps=steps)
    mat, work, energy = _prepare(w, dtype)
    top = _top(mat, work, energy, v0, tol, _MAX_ITER, seed)
    sketch = _sketch(mat, work, energy, probes, steps, seed + 1)
    work = top.value.dtype
    node = sketch.nodes[0].sqrt().to(work) if sketch.nodes.numel() else top.value
    sv_max = torch.maximum(top.value, node) if bool(torch.isfinite(top.value)) else top.value
    fro = sketch.energy.to(work)
    top2 = sv_max.square()
    stable = torch.where(top2 > 0, fro / torch.where(top2 > 0, top2, 1.0),
                         torch.full_like(fro, math.nan))
    return WeightEstimate(sv_max, fro, stable, sketch, top.vector, top.iterations)
