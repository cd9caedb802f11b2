"""Heavy-tailed self-regularisation: the power-law exponent α of a layer's eigenvalue spectrum.

Martin & Mahoney read the empirical spectral density (ESD) of a weight matrix ``W`` — the
eigenvalues ``λ_i = σ_i²`` of ``WᵀW`` — and fit a power law ``p(λ) ∝ λ^{−α}`` to its tail
``λ ≥ λ_min``. Well-trained layers have heavy tails with ``α`` roughly in ``[2, 6]``; smaller
``α`` means more correlation learned, and ``α̂ = α · log10 λ_max`` ("alpha weighted") averaged
over layers predicts the test accuracy of a family of models without data:

- C. H. Martin and M. W. Mahoney, "Implicit self-regularization in deep neural networks:
  evidence from random matrix theory and implications for learning", JMLR 22(165), 2021.
- C. H. Martin, T. S. Peng and M. W. Mahoney, "Predicting trends in the quality of
  state-of-the-art neural networks without access to training or testing data", Nature
  Communications 12, 4122, 2021.

The fit is the continuous power-law fit of Clauset, Shalizi & Newman (SIAM Review 51, 2009):
for each candidate ``x_min`` the maximum-likelihood exponent over the tail ``λ ≥ x_min``,

    α(x_min) = 1 + n / Σ_{λ_j ≥ x_min} log(λ_j / x_min),      n = #{λ_j ≥ x_min},

and the Kolmogorov–Smirnov distance ``D(x_min)`` between the tail's empirical CDF and the
fitted CDF ``F(λ) = 1 − (λ / x_min)^{1−α}``; the candidate of least ``D`` is kept.

The conventions are those of WeightWatcher 0.7.7's default ``analyze()`` (its own fit,
``pl_package="ww"``; ``fix_fingers`` off, ``xmax=None``), so that the numbers can be compared:

- ``λ_i = σ_i²`` of ``W`` itself: no ``1/N`` normalisation (the papers' ``X = WᵀW / N``
  multiplies every ``λ`` by ``1/N``, which leaves ``α`` and ``D`` unchanged, divides ``x_min``
  by ``N`` and lowers ``α̂`` by ``α · log10 N``);
- eigenvalues ``≤ threshold = 1e-5`` (an absolute level) are dropped before fitting;
- the candidates ``x_min`` are the sorted kept eigenvalues themselves, all but the largest,
  ties included (candidate ``k`` in ascending order has the tail ``λ_k, …, λ_{m−1}``, so
  ``n_k = m − k``); there is no upper cut (``x_max = λ_max``);
- ``D`` is WeightWatcher's ``max_j |F(λ_j) − j/n|`` over the tail in ascending order
  (``j = 0 … n−1``): the distance to the lower step of the empirical CDF only.
  ``ks="two_sided"`` gives the textbook statistic ``max_j max(F − j/n, (j+1)/n − F)``
  (what ``scipy.stats.kstest`` returns), which can choose a different ``x_min``;
- fewer than ``small_n = 20`` kept eigenvalues switch to WeightWatcher's small-sample fit:
  the bias-corrected ``α = 1 + (n − 1) / Σ log(λ_j / x_min)``, and only tails of ``n ≥ 8``
  whose log sum exceeds 1e-12 as candidates, still chosen by least ``D`` (its small-sample code
  also ranks them by ``D − 0.868/√n``, but the caller then overrides that choice with the
  arg-min of ``D``, which is what it returns); if no candidate qualifies, the whole kept
  spectrum is the tail;
- ``α̂ = α · log10 λ_max`` with ``λ_max`` the largest eigenvalue.

Not reproduced: WeightWatcher's non-default options (``fix_fingers="xmin_peak"`` or
``"clip_xmax"``, an integer ``xmax`` that drops the top eigenvalues, the truncated power law
``fit="TPL"``, and ``pl_package="powerlaw"``, whose candidates are the *distinct* values), and
its layer filter (``analyze()`` skips matrices with fewer than 8 or more than 15000
eigenvalues; here any spectrum with two kept eigenvalues is fitted). ``threshold=0`` keeps every
positive eigenvalue.

Degenerate input never raises: a spectrum with NaN/Inf, or with fewer than two eigenvalues
above ``threshold`` (e.g. all zeros), gives NaN everywhere. A tail of equal eigenvalues has
``Σ log(λ_j / x_min) = 0`` and gives ``α = +inf`` (the MLE's limit; WeightWatcher's standard
fit returns the same ``inf``, its small-sample fit returns ``α = 0`` in that case), and then
``α̂ = 0`` when ``λ_max = 1``. WeightWatcher reports a failed fit as ``α = −1``.

Everything runs on the input's device with no host synchronisation and in one batched
computation: the ``D`` of every candidate of every spectrum of the leading batch is evaluated at
once, in blocks of candidates (about ``2¹⁶`` entries on the CPU, ``2²²`` on accelerators),
which is ``O(m²)`` work per spectrum of ``m`` eigenvalues. The fit is computed in float64
(float32 on MPS) whatever the input precision, because the arg-min over nearly equal ``D`` is
sensitive to round-off; results come back in the input's floating dtype (float32 for integer or
half input). Nothing here is differentiable (the input is detached).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from lightning_spectral.functional._utils import as_spectrum, check_vector, resolve_dtype
from lightning_spectral.functional.weights import singular_values, weight_matrix

__all__ = ["PowerLawFit", "powerlaw_alpha", "weight_alpha"]

#: WeightWatcher's ``EVALS_THRESH``: eigenvalues at or below it are not fitted.
DEFAULT_THRESHOLD = 1e-5
#: WeightWatcher's ``SMALL_N_CUTOFF``: fewer kept eigenvalues use the small-sample fit.
DEFAULT_SMALL_N = 20
_SMALL_MIN_TAIL = 8  # WeightWatcher's k_min of the small-sample fit
_SMALL_MIN_LOGSUM = 1e-12
_BLOCK_CPU = 1 << 16  # entries of one (batch, candidates, tail) block: fits a CPU cache
_BLOCK_DEVICE = 1 << 22  # on an accelerator: few large launches

KSMode = Literal["weightwatcher", "two_sided"]


class PowerLawFit(NamedTuple):
    """The fit of :func:`powerlaw_alpha`; every field has the spectra's batch shape ``(...)``.

    Examples:
        The tail ``(1, e)`` above ``x_min = 1`` has ``α = 1 + 2 / (log 1 + log e) = 3`` and
        ``α̂ = 3 log10 e``:

        >>> import math
        >>> import torch
        >>> from lightning_spectral.functional import powerlaw_alpha
        >>> fit = powerlaw_alpha(torch.tensor([1.0, math.e], dtype=torch.float64), xmin=1.0)
        >>> fit._fields
        ('alpha', 'xmin', 'D', 'alpha_weighted', 'n_tail')
        >>> round(float(fit.alpha), 4), round(float(fit.alpha_weighted), 4), int(fit.n_tail)
        (3.0, 1.3029, 2)
    """

    alpha: torch.Tensor
    """Power-law exponent ``α`` of the tail (NaN: undefined; ``+inf``: a tail of equal values)."""
    xmin: torch.Tensor
    """Start of the tail ``x_min`` (an eigenvalue, or the ``xmin`` that was given)."""
    D: torch.Tensor
    """Kolmogorov–Smirnov distance of the fit over the tail (convention: ``ks``)."""
    alpha_weighted: torch.Tensor
    """``α̂ = α · log10 λ_max`` (``λ_max``: the largest eigenvalue)."""
    n_tail: torch.Tensor
    """Number of eigenvalues in the fitted tail (a float tensor, NaN where undefined)."""


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def _check_options(threshold: float, ks: str, small_n: int) -> float:
    if ks not in ("weightwatcher", "two_sided"):
        raise ValueError(f"ks must be 'weightwatcher' or 'two_sided', got {ks!r}")
    if isinstance(small_n, bool) or not isinstance(small_n, int) or small_n < 0:
        raise ValueError(f"small_n must be a non-negative integer, got {small_n!r}")
    thr = float(threshold)
    if not (thr >= 0.0 and thr < float("inf")):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return thr


def _deviation(f: torch.Tensor, ecdf: torch.Tensor, inv_n: torch.Tensor, ks: str) -> torch.Tensor:
    """Pointwise KS deviation at the tail points: ``|F − j/n|`` or ``max(F − j/n, (j+1)/n − F)``."""
    if ks == "weightwatcher":
        return (f - ecdf).abs()
    return torch.maximum(f - ecdf, ecdf + inv_n - f)


def _block_entries(device: torch.device) -> int:
    """Entries of one ``(batch, candidates, tail)`` block: cache-sized on the CPU (the loop's
    per-block dispatch is cheap there), large on accelerators (where launches dominate)."""
    return _BLOCK_CPU if device.type == "cpu" else _BLOCK_DEVICE


def _fit_search(
    lam: torch.Tensor, kept: torch.Tensor, n_kept: torch.Tensor, ks: str, small_n: int
) -> tuple[torch.Tensor, ...]:
    """Search every candidate ``x_min`` of ascending spectra ``lam`` ``(B, m)``.

    Candidate ``k`` (0-based, ascending) has the tail ``j = k … m−1`` of ``n_k = m − k`` values.
    The candidates are processed in blocks ``[k0, k1)`` against the columns ``j ≥ k0`` only
    (the upper triangle); for ``j < k`` the clamped log-ratio is 0, where both the fitted CDF
    and the clamped empirical CDF are 0 (and the two-sided deviation is ``1/n``, the value it
    takes at ``j = k``), so those entries never change a maximum.
    """
    b_size, m = lam.shape
    work = lam.dtype
    pos = torch.arange(m, dtype=work, device=lam.device)  # candidate / tail positions
    n_all = m - pos  # tail size of candidate k
    # log(λ / λ_max) ≤ 0 keeps the sums small. The entries below the threshold (a prefix of the
    # ascending order) are never in the tail of a valid candidate; they take the smallest kept
    # log so that the logs stay ascending and their clamped differences are 0
    logs = torch.where(kept, (lam / lam[:, -1:]).log(), float("inf"))
    logs = torch.where(kept, logs, logs.amin(dim=-1, keepdim=True))
    small = (n_kept < small_n).unsqueeze(-1)  # (B, 1): small-sample fit for this spectrum
    numer = n_all - small.to(work)  # (B, m): n, or n − 1 for the bias-corrected small-sample α

    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    budget = _block_entries(lam.device)
    k0 = 0
    while k0 < m:
        k1 = min(m, k0 + max(1, budget // max(1, b_size * (m - k0))))
        n = n_all[k0:k1].unsqueeze(1)  # (b, 1)
        # (B, b, m − k0): log(λ_j / x_min) for j ≥ k, 0 before (λ ascending)
        t = logs[:, k0:].unsqueeze(1) - logs[:, k0:k1].unsqueeze(2)
        t.clamp_min_(0.0)
        s = t.sum(dim=-1)  # (B, b)
        alpha = 1.0 + numer[:, k0:k1] / s  # s = 0: +inf (a tail of equal values)
        # (1 − α)·log-ratio; a tail of equal values (α = inf, ratio 0) gives 0, not NaN
        t.mul_((1.0 - alpha).nan_to_num_(neginf=0.0).unsqueeze(-1))
        torch.expm1(t, out=t)  # −F(λ_j), F = 1 − (λ_j/x_min)^{1−α}
        t.add_((pos[k0:] - pos[k0:k1].unsqueeze(1)).clamp_min_(0.0).div_(n))  # E − F, E = j/n
        if ks == "weightwatcher":
            d = t.abs_().amax(dim=-1)
        else:  # max(F − E, E + 1/n − F)
            d = torch.maximum(t.amax(dim=-1) + 1.0 / n.squeeze(1), t.amin(dim=-1).neg_())
        # (WeightWatcher sets D = 1 where α ≤ 1, which cannot happen here: s ≥ 0)
        parts.append((alpha, d, s))
        k0 = k1
    alphas, dists, sums = (
        torch.cat(p, dim=-1) if len(p) > 1 else p[0] for p in zip(*parts, strict=True)
    )

    first = (m - n_kept).unsqueeze(-1)  # (B, 1): position of the smallest kept eigenvalue
    ok = (pos >= first) & (pos <= m - 2)
    ok = torch.where(small, ok & (n_all >= _SMALL_MIN_TAIL) & (sums > _SMALL_MIN_LOGSUM), ok)
    best = dists.masked_fill(~ok, float("inf")).argmin(dim=-1, keepdim=True)  # first minimum
    # small-sample fit with no admissible candidate: the whole kept spectrum is the tail
    fallback = ~ok.any(dim=-1, keepdim=True)
    best = torch.where(fallback, first.clamp(0, m - 1), best)
    alpha, x, d, s = torch.stack([alphas, lam, dists, sums]).gather(
        -1, best.unsqueeze(0).expand(4, b_size, 1))[..., 0]
    alpha = torch.where(fallback[:, 0] & (s <= _SMALL_MIN_LOGSUM), float("inf"), alpha)
    return alpha, x, d, m - best[:, 0]


def _fit_fixed(
    lam: torch.Tensor, kept: torch.Tensor, xmin: torch.Tensor, ks: str
) -> tuple[torch.Tensor, ...]:
    """Plain MLE and KS distance over the tail ``λ ≥ xmin`` (``xmin`` ``(B,)``)."""
    m = lam.shape[-1]
    work = lam.dtype
    x = xmin.unsqueeze(-1)
    x_ok = (x > 0) & torch.isfinite(x)
    tail = kept & (lam >= x) & x_ok
    n = tail.sum(dim=-1, keepdim=True)
    nf = n.to(work)
    logs = torch.where(tail, (lam / torch.where(x_ok, x, 1.0)).log().clamp_min(0.0), 0.0)
    s = logs.sum(dim=-1, keepdim=True)
    alpha = 1.0 + nf / s
    expo = torch.where(logs > 0, (1.0 - alpha) * logs, 0.0)
    cdf = -torch.expm1(expo)
    rank = (torch.arange(m, device=lam.device) - (m - n)).to(work)  # j within the tail
    safe_n = nf.clamp_min(1.0)
    d = _deviation(cdf, rank / safe_n, 1.0 / safe_n, ks).masked_fill(~tail, 0.0).amax(dim=-1)
    alpha = alpha[:, 0]
    d = torch.where(alpha > 1.0, d, 1.0)
    return alpha, x[:, 0].expand(lam.shape[0]), d, n[:, 0]


def powerlaw_alpha(
    eigenvalues: torch.Tensor,
    *,
    xmin: float | torch.Tensor | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    ks: KSMode = "weightwatcher",
    small_n: int = DEFAULT_SMALL_N,
) -> PowerLawFit:
    """Power-law fit of the tail of eigenvalue spectra: ``α``, ``x_min``, ``D``, ``α̂``.

    ``eigenvalues`` ``(..., m)``, in any order: e.g. ``σ²`` of a weight matrix (see
    :func:`weight_alpha`); the leading dimensions are independent spectra fitted in one batched
    call. Eigenvalues ``≤ threshold`` are not fitted, so a batch of spectra of different lengths
    can be zero-padded to one ``m``.

    With ``xmin=None`` (the default), every kept eigenvalue but the largest is tried as
    ``x_min``; each gets ``α(x_min) = 1 + n / Σ_{λ_j ≥ x_min} log(λ_j / x_min)`` and the KS
    distance ``D(x_min)`` to ``F(λ) = 1 − (λ/x_min)^{1−α}``, and the least ``D`` wins — the
    conventions of WeightWatcher's default ``analyze()``, listed in the module docstring
    (including its small-sample fit below ``small_n`` kept eigenvalues; ``small_n=0`` turns it
    off). With ``xmin`` given (a number, or a tensor broadcastable to the batch shape), the tail
    is ``λ ≥ xmin`` and ``α = 1 + n / Σ log(λ_j / xmin)`` is the plain MLE at that ``xmin``.

    ``ks="weightwatcher"`` measures ``D = max_j |F(λ_j) − j/n|`` over the ascending tail;
    ``ks="two_sided"`` the textbook ``max_j max(F(λ_j) − j/n, (j+1)/n − F(λ_j))``.

    Returns a :class:`PowerLawFit` of tensors of the batch shape. NaN where the spectrum holds
    NaN/Inf or fewer than two eigenvalues lie above ``threshold`` (or, with ``xmin`` given,
    in the tail); ``α = +inf`` for a tail of equal eigenvalues. No host synchronisation.

    Examples:
        The quantiles of a Pareto law ``p(λ) ∝ λ^{−3}`` on ``λ ≥ 1`` are fitted with ``α ≈ 3``
        over the whole spectrum:

        >>> import torch
        >>> from lightning_spectral.functional import powerlaw_alpha
        >>> u = (torch.arange(200, dtype=torch.float64) + 0.5) / 200
        >>> fit = powerlaw_alpha((1 - u) ** -0.5)  # λ = (1 − u)^{−1/(α−1)}
        >>> round(float(fit.alpha), 1), int(fit.n_tail)
        (3.0, 200)
    """
    check_vector(eigenvalues, "eigenvalues", "(..., m)")
    thr = _check_options(threshold, ks, small_n)
    out_dtype = as_spectrum(eigenvalues).dtype
    work = _work_dtype(eigenvalues)
    batch = eigenvalues.shape[:-1]
    m = eigenvalues.shape[-1]
    nan = float("nan")
    if batch.numel() == 0 or m == 0:
        empty = torch.full(batch, nan, dtype=out_dtype, device=eigenvalues.device)
        return PowerLawFit(empty, empty.clone(), empty.clone(), empty.clone(), empty.clone())

    lam = eigenvalues.detach().to(work).reshape(-1, m)
    total = lam.sum(dim=-1)
    bad = (total * 0.0) != 0.0  # NaN or ±Inf somewhere (one reduction, no isfinite pass)
    lam = lam.masked_fill(bad.unsqueeze(-1), 0.0).sort(dim=-1).values
    kept = lam > thr
    n_kept = kept.sum(dim=-1)

    if xmin is None:
        alpha, x, d, n_tail = _fit_search(lam, kept, n_kept, ks, small_n)
        undefined = bad | (n_kept < 2)
    else:
        if isinstance(xmin, torch.Tensor):
            xt = torch.broadcast_to(xmin.detach().to(lam.device, work), batch).reshape(-1)
        else:
            value = float(xmin)
            if not (value > 0.0 and value < float("inf")):
                raise ValueError(f"xmin must be a finite number > 0, got {xmin!r}")
            xt = torch.full((lam.shape[0],), value, dtype=work, device=lam.device)
        alpha, x, d, n_tail = _fit_fixed(lam, kept, xt, ks)
        undefined = bad | (n_tail < 2) | ~((xt > 0) & torch.isfinite(xt))

    log_max = lam[:, -1].log10()
    weighted = torch.where(log_max == 0, 0.0, alpha * log_max)
    out = torch.stack([alpha, x, d, weighted, n_tail.to(work)])
    out = torch.where(undefined, nan, out).to(out_dtype).reshape(5, *batch)
    return PowerLawFit(*out.unbind(0))


def _weightwatcher_conv_eigs(w: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """WeightWatcher's Conv2d ESD: σ² of the ``kh·kw`` per-tap ``out × in`` slices of
    ``W / √2`` (its default ``conv2d_norm``), pooled into one spectrum."""
    out_ch, in_ch = w.shape[0], w.shape[1]
    taps = w.detach().to(work).reshape(out_ch, in_ch, -1).permute(2, 0, 1)  # (kh·kw, out, in)
    total = taps.sum()
    bad = (total * 0.0) != 0.0  # a NaN/Inf entry: svdvals would raise; NaN comes out instead
    s = torch.linalg.svdvals(taps.masked_fill(bad, 0.0))
    return torch.where(bad, float("nan"), s.square() * 0.5).reshape(-1)


def weight_alpha(
    w: torch.Tensor,
    *,
    conv: Literal["reshape", "weightwatcher"] = "reshape",
    dtype: torch.dtype | str | None = None,
    xmin: float | torch.Tensor | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    ks: KSMode = "weightwatcher",
    small_n: int = DEFAULT_SMALL_N,
) -> PowerLawFit:
    """:func:`powerlaw_alpha` of a weight's eigenvalues ``λ_i = σ_i²`` (singular values of ``W``).

    ``w`` ``(out, in)`` or ``(out, in, k1, ...)``. With ``conv="reshape"`` (the default) a
    kernel is read as this package reads every weight, the one matrix ``W.reshape(out, -1)`` of
    ``min(out, in·k1·…)`` singular values. WeightWatcher reads a Conv2d kernel differently:
    it cuts it into ``kh·kw`` per-tap ``out × in`` matrices ``W[:, :, i, j]``, multiplies them
    by ``1/√2`` (its default ``conv2d_norm``) and fits the ``kh·kw · min(out, in)`` pooled
    eigenvalues as one ESD — a different spectrum, so a different ``α``. ``conv="weightwatcher"``
    reproduces that reading for 4-d kernels with ``out + in ≥ kh + kw`` (WeightWatcher slices
    the rare others the other way); other weights are unaffected. Dense weights are read
    identically by both.

    Singular values are computed with ``torch.linalg.svdvals`` in float32 (float64 inputs or
    ``dtype="float64"``: float64) on the weight's device; the fit itself always runs in float64.
    The other arguments are those of :func:`powerlaw_alpha`; the fields are 0-d tensors.

    Examples:
        A weight with singular values ``(1, e^{1/2})`` has eigenvalues ``λ = (1, e)``, hence
        ``α = 3`` above ``x_min = 1``:

        >>> import math
        >>> import torch
        >>> from lightning_spectral.functional import weight_alpha
        >>> w = torch.diag(torch.tensor([1.0, math.exp(0.5)], dtype=torch.float64))
        >>> round(float(weight_alpha(w, xmin=1.0).alpha), 4)
        3.0
    """
    if conv not in ("reshape", "weightwatcher"):
        raise ValueError(f"conv must be 'reshape' or 'weightwatcher', got {conv!r}")
    if conv == "weightwatcher" and isinstance(w, torch.Tensor) and w.ndim == 4:
        lam = _weightwatcher_conv_eigs(w, resolve_dtype(dtype, w))
    else:
        lam = singular_values(weight_matrix(w).detach(), dtype=dtype).square()
    return powerlaw_alpha(lam, xmin=xmin, threshold=threshold, ks=ks, small_n=small_n)
