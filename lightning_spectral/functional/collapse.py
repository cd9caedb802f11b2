"""Neural collapse metrics NC1–NC4 (docs/definitions.md#collapse).

Written TorchMetrics-style: :func:`_collapse_update` turns a batch into sufficient statistics
(per-class counts ``N_c``, per-class sums ``s_c`` and the total second moment
``Q = Σ_i h_i h_iᵀ``, all float64) and :func:`collapse_from_stats` turns statistics plus the head
``W, b`` into the metrics. The public :func:`neural_collapse` and the streaming
:class:`lightning_spectral.CollapseMonitor` call the same two helpers, so the streamed metrics are
the one-shot metrics of the same rows.

NC4 compares each sample's classifier decision with its nearest class mean, so it needs rows;
:func:`collapse_from_stats` takes them as a separate, bounded sample (``rows``, ``row_labels``),
scored against the class means of *all* the statistics.

*Sources:* Papyan, Han & Donoho, PNAS 2020 (arXiv:2008.08186); Han, Papyan & Donoho, ICLR 2022
(arXiv:2106.02073); Zhu et al., NeurIPS 2021 (arXiv:2105.02375).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_spectral.functional._utils import check_matrix, eps, resolve_dtype

__all__ = ["neural_collapse", "collapse_from_stats", "collapse_keys", "CollapseStats"]

_KEYS_H = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_cos_std", "nc2_etf")
_KEYS_W = ("nc2_equinorm_w", "nc2_equiangular_w", "nc2_etf_w", "nc3", "nc3_wh", "nc4")
_ORDER = (
    "nc1", "nc2_equinorm", "nc2_equiangular", "nc2_cos_std", "nc2_etf",
    "nc2_equinorm_w", "nc2_equiangular_w", "nc2_etf_w", "nc3", "nc3_wh", "nc4",
)  # fmt: skip


def collapse_keys(with_weight: bool = True) -> tuple[str, ...]:
    """The keys of the metrics table (docs/definitions.md#collapse-metrics), in table order.

    Without the ``W`` keys if asked.

    Examples:
        >>> from lightning_spectral.functional import collapse_keys
        >>> collapse_keys(with_weight=False)
        ('nc1', 'nc2_equinorm', 'nc2_equiangular', 'nc2_cos_std', 'nc2_etf')
        >>> len(collapse_keys())
        11
    """
    return _ORDER if with_weight else _KEYS_H


@dataclass
class CollapseStats:
    """Sufficient statistics of docs/definitions.md#collapse-stats (float64): ``counts``
    ``(K,)``, ``sums`` ``(K, d)``, ``second_moment`` ``Q = Σ h hᵀ`` ``(d, d)``.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import CollapseStats
        >>> stats = CollapseStats.zeros(num_classes=3, dim=2)
        >>> stats.counts.tolist(), tuple(stats.sums.shape), stats.second_moment.dtype
        ([0.0, 0.0, 0.0], (3, 2), torch.float64)
    """

    counts: torch.Tensor
    sums: torch.Tensor
    second_moment: torch.Tensor

    @classmethod
    def zeros(
        cls, num_classes: int, dim: int, device: torch.device | str | None = None
    ) -> CollapseStats:
        f64 = torch.float64
        return cls(
            torch.zeros(num_classes, dtype=f64, device=device),
            torch.zeros(num_classes, dim, dtype=f64, device=device),
            torch.zeros(dim, dim, dtype=f64, device=device),
        )


def _check_labels(labels: torch.Tensor, n: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape (N,) = ({n},), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")


def _collapse_update(
    features: torch.Tensor,
    labels: torch.Tensor,
    stats: CollapseStats,
) -> CollapseStats:
    """Add a batch to the statistics in place (and return them): ``N_c += #{y_i = c}``,
    ``s_c += Σ_{y_i=c} h_i``, ``Q += HᵀH``, in float64 (the streaming form of
    docs/definitions.md#collapse-stats).

    ``features`` ``(n, d)`` of any float dtype, ``labels`` ``(n,)`` integers already checked to lie
    in ``[0, K)``. No host synchronisation.
    """
    h = features.detach().to(device=stats.sums.device, dtype=torch.float64)
    y = labels.detach().to(device=stats.sums.device, dtype=torch.long)
    # the counts by adding ones (exact integers): ``bincount`` reads the largest label on the host
    # on CUDA to size its output
    ones = torch.ones((), dtype=torch.float64, device=h.device).expand(y.shape[0])
    stats.counts.index_add_(0, y, ones)
    stats.sums.index_add_(0, y, h)
    stats.second_moment.addmm_(h.mT, h)
    return stats


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """``isfinite(x).all()`` as a 0-d bool tensor, in one reduction pass: ``aminmax`` keeps a NaN
    (and ±inf reaches the minimum or the maximum). About 10× cheaper than the elementwise test on
    a CPU; no host synchronisation."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    return torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all()


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with NaN where ``den`` is 0 (or NaN)."""
    ok = den > 0
    return torch.where(
        ok, num / torch.where(ok, den, torch.ones_like(den)), num.new_tensor(math.nan)
    )


def _norms_equality(x: torch.Tensor) -> torch.Tensor:
    """``std(‖x_c‖) / mean(‖x_c‖)`` over the rows, ``ddof = 1``; NaN for a zero mean norm."""
    norms = torch.linalg.vector_norm(x, dim=1)
    return _safe_div(norms.std(correction=1), norms.mean())


def _cosines(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine matrix of the rows and a flag that is true when some row is zero."""
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = ~(norms > 0).all()
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    return unit @ unit.mT, zero


def _equiangularity(cos: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(1/(C(C−1))) Σ_{c≠c'} |cos(x_c, x_c') + 1/(C−1)|``; NaN when some row is zero."""
    c = cos.shape[0]
    off = ~torch.eye(c, dtype=torch.bool, device=cos.device)
    value = (cos + 1.0 / (c - 1))[off].abs().sum() / (c * (c - 1))
    return torch.where(zero, value.new_tensor(math.nan), value)


def _etf_target(c: int, like: torch.Tensor) -> torch.Tensor:
    """``ETF_C = (I_C − 11ᵀ/C) / √(C − 1)``, unit Frobenius norm.

    See docs/definitions.md#collapse-stats.
    """
    eye = torch.eye(c, dtype=like.dtype, device=like.device)
    return (eye - 1.0 / c) / math.sqrt(c - 1)


def _etf_distance(gram: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖gram/‖gram‖_F − target‖_F``; NaN when ``‖gram‖_F = 0``."""
    norm = torch.linalg.matrix_norm(gram)
    scaled = gram / torch.where(norm > 0, norm, torch.ones_like(norm))
    value = torch.linalg.matrix_norm(scaled - target)
    return torch.where(norm > 0, value, value.new_tensor(math.nan))


def _nc1(sigma_w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``(1/C) tr(Σ_W Σ_B⁺)`` with ``Σ_B = MᵀM / C`` (docs/definitions.md#collapse-metrics).

    The pseudo-inverse keeps the eigenvalues ``λ_k > λ_max · max(d, C) · ε``. Computed on the
    smaller side: with ``C < d`` from the eigenpairs ``(λ_k, u_k)`` of ``MMᵀ/C`` (same non-zero
    eigenvalues; ``v_k = Mᵀu_k / √(Cλ_k)``), ``nc1 = (1/C) Σ_k u_kᵀ M Σ_W Mᵀ u_k / (C λ_k²)``.
    NaN when ``Σ_B = 0``.
    """
    c, d = m.shape
    threshold_factor = max(d, c) * eps(m.dtype)
    if c < d:
        lam, u = torch.linalg.eigh(m @ m.mT / c)
        keep = lam > lam.amax() * threshold_factor
        safe = torch.where(keep, lam, torch.ones_like(lam))
        proj = m.mT @ u  # (d, C): column k = Mᵀ u_k
        quad = (proj * (sigma_w @ proj)).sum(dim=0)  # u_kᵀ M Σ_W Mᵀ u_k
        terms = torch.where(keep, quad / (c * safe.square()), torch.zeros_like(quad))
    else:
        lam, v = torch.linalg.eigh(m.mT @ m / c)
        keep = lam > lam.amax() * threshold_factor
        safe = torch.where(keep, lam, torch.ones_like(lam))
        quad = (v * (sigma_w @ v)).sum(dim=0)  # v_kᵀ Σ_W v_k
        terms = torch.where(keep, quad / safe, torch.zeros_like(quad))
    value = terms.sum() / c
    return torch.where(lam.amax() > 0, value, value.new_tensor(math.nan))


def _nearest_class_mean(rows: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``means`` for each row (ties: lowest).

    The distances are taken from the differences ``h_i − μ_c`` (never from the expansion
    ``‖h‖² − 2h·μ + ‖μ‖²``, whose cancellation could flip a near tie), by one ``cdist`` call
    that keeps no ``(n, C, d)`` intermediate.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros(0, dtype=torch.long)
    dist = torch.cdist(rows, means, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.argmin(dim=1)


def collapse_from_stats(
    stats: CollapseStats,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    row_labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    geometry: bool = False,
) -> dict[str, torch.Tensor]:
    """The collapse metrics from streamed statistics (+ head, + a sample of rows for NC4).

    ``stats`` is a :class:`CollapseStats` (e.g. ``ClassStatsAccumulator.stats`` of
    :mod:`lightning_spectral.stats`, summed over batches and ranks); ``weight`` ``(K, d)`` and
    ``bias`` ``(K,)`` are the classifier head. :func:`neural_collapse` is this function applied to
    the statistics of its rows.

    The metrics are those of docs/definitions.md#collapse-metrics. Only classes with ``N_c > 0`` are
    used (``C`` of them, in increasing label order); fewer than two gives NaN everywhere. Keys
    needing ``weight`` are absent when it is None; ``nc4`` is NaN when ``rows`` is None or empty.
    With ``geometry=True`` the dict also holds ``_cosine`` (the ``C×C`` cosine matrix of the centred
    class means) and ``_classes`` (the present labels), for plotting. Computed in float64, returned
    in ``dtype``. One host synchronisation (the number of present classes). Non-finite statistics,
    head or rows give NaN everywhere.

    Examples:
        >>> import math, torch
        >>> from lightning_spectral.functional import collapse_from_stats, neural_collapse
        >>> from lightning_spectral.stats import ClassStatsAccumulator
        >>> angles = torch.tensor([0.0, 2.0, 4.0]) * math.pi / 3
        >>> w = torch.stack([angles.cos(), angles.sin()], dim=1)  # a simplex-ETF head, C = 3
        >>> y = torch.arange(3).repeat(4)
        >>> h = w[y] + 0.3 * w[(y + 1) % 3] * torch.linspace(-1, 1, 12)[:, None]
        >>> acc = ClassStatsAccumulator(num_classes=3, dim=2)
        >>> for part in (slice(0, 6), slice(6, 12)):  # streamed in two batches
        ...     acc.update(h[part], y[part])
        >>> out = collapse_from_stats(acc.stats, w, rows=h, row_labels=y)
        >>> round(float(out["nc1"]), 4), float(out["nc4"])
        (0.0224, 1.0)
        >>> round(float(neural_collapse(h, y, w)["nc1"]), 4)  # the same rows at once
        0.0224
    """
    counts = stats.counts
    device = counts.device
    present = torch.nonzero(counts > 0).flatten()
    c = int(present.numel())
    keys = _ORDER if weight is not None else _KEYS_H
    nan = torch.full((), math.nan, dtype=torch.float64, device=device)
    out: dict[str, torch.Tensor] = {}
    if c < 2:
        out = {k: nan for k in keys}
        if geometry:
            out["_cosine"] = torch.full((c, c), math.nan, dtype=torch.float64, device=device)
            out["_classes"] = present
        return {k: (v.to(dtype) if k != "_classes" else v) for k, v in out.items()}

    # non-finite statistics or head give NaN everywhere (masked at the end); zero them first so
    # that the eigensolvers cannot fail
    finite = torch.isfinite(stats.sums).all() & torch.isfinite(stats.second_moment).all()
    if weight is not None:
        finite = finite & torch.isfinite(weight).all()
        if bias is not None:
            finite = finite & torch.isfinite(bias).all()
        weight = torch.nan_to_num(weight.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        bias = None if bias is None else torch.nan_to_num(bias.detach(), 0.0, 0.0, 0.0)
    if rows is not None:
        finite = finite & _all_finite(rows)
    sums = torch.nan_to_num(stats.sums, nan=0.0, posinf=0.0, neginf=0.0)
    second = torch.nan_to_num(stats.second_moment, nan=0.0, posinf=0.0, neginf=0.0)

    n_c = counts[present]
    total = n_c.sum()
    mu = sums[present] / n_c[:, None]  # (C, d)
    mu_g = mu.mean(dim=0)
    m = mu - mu_g
    within = second - (mu * n_c[:, None]).mT @ mu
    sigma_w = (within + within.mT) / (2 * total)
    target = _etf_target(c, m)

    out["nc1"] = _nc1(sigma_w, m)
    out["nc2_equinorm"] = _norms_equality(m)
    cos_m, zero_m = _cosines(m)
    out["nc2_equiangular"] = _equiangularity(cos_m, zero_m)
    if c >= 3:
        iu = torch.triu_indices(c, c, offset=1, device=device)
        pair_std = cos_m[iu[0], iu[1]].std(correction=1)
        out["nc2_cos_std"] = torch.where(zero_m, nan, pair_std)
    else:
        out["nc2_cos_std"] = nan
    out["nc2_etf"] = _etf_distance(m @ m.mT, target)

    if weight is not None:
        w_all = weight.detach().to(device=device, dtype=torch.float64)
        w = w_all[present]
        out["nc2_equinorm_w"] = _norms_equality(w)
        cos_w, zero_w = _cosines(w)
        out["nc2_equiangular_w"] = _equiangularity(cos_w, zero_w)
        out["nc2_etf_w"] = _etf_distance(w @ w.mT, target)
        w_norm = torch.linalg.matrix_norm(w)
        m_norm = torch.linalg.matrix_norm(m)
        ok = (w_norm > 0) & (m_norm > 0)
        dual = w / torch.where(ok, w_norm, 1.0) - m / torch.where(ok, m_norm, 1.0)
        out["nc3"] = torch.where(ok, dual.square().sum(), nan)
        out["nc3_wh"] = _etf_distance(w @ m.mT, target)
        if rows is not None and row_labels is not None and rows.shape[0] > 0:
            # a float64 copy, non-finite entries zeroed (the result is masked then)
            h = rows.detach().to(device=device, dtype=torch.float64, copy=True)
            h.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            logits = h @ w_all.mT
            if bias is not None:
                logits = logits + bias.detach().to(device=device, dtype=torch.float64)
            decided = logits.argmax(dim=1)
            nearest = present[_nearest_class_mean(h, mu)]
            out["nc4"] = (decided == nearest).to(torch.float64).mean()
        else:
            out["nc4"] = nan
    result = {k: torch.where(finite, out[k], nan).to(dtype) for k in keys}
    if geometry:
        result["_cosine"] = torch.where(zero_m, torch.full_like(cos_m, math.nan), cos_m).to(dtype)
        result["_classes"] = present
    return result


def neural_collapse(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
) -> dict[str, torch.Tensor]:
    """Neural-collapse metrics (docs/definitions.md#collapse) as a dict of 0-d tensors.

    ``features`` ``H`` ``(N, d)``, integer ``labels`` ``(N,)``, optional head ``weight`` ``W``
    ``(K, d)`` with ``K > max y`` and ``bias`` ``b`` ``(K,)`` (0 when absent). Keys, in the order
    of the table in docs/definitions.md#collapse-metrics: ``nc1`` ``(1/C) tr(Σ_W Σ_B⁺)``,
    ``nc2_equinorm``, ``nc2_equiangular``, ``nc2_cos_std``, ``nc2_etf``, and with ``weight``:
    ``nc2_equinorm_w``, ``nc2_equiangular_w``, ``nc2_etf_w``, ``nc3``
    (``‖W_C/‖W_C‖_F − M/‖M‖_F‖_F²``, in ``[0, 4]``), ``nc3_wh`` and ``nc4`` (agreement of the
    classifier with the nearest class mean, over all ``N`` rows). All are 0 at a perfect
    simplex-ETF collapse, except ``nc4 = 1``.

    Conventions (docs/definitions.md#collapse): only classes present in ``labels`` are used; the
    global mean is the unweighted mean of class means; ``Σ_W`` divides by ``N``; statistics are
    accumulated and the metrics computed in float64, returned in ``dtype`` (float32 by default,
    float64 for float64 features). Fewer than two classes gives NaN everywhere.

    Examples:
        >>> import math, torch
        >>> from lightning_spectral.functional import neural_collapse
        >>> angles = torch.tensor([0.0, 2.0, 4.0]) * math.pi / 3
        >>> w = torch.stack([angles.cos(), angles.sin()], dim=1)  # a simplex-ETF head, C = 3
        >>> y = torch.arange(3).repeat(4)
        >>> out = neural_collapse(w[y], y, w)  # every feature on its class's head row
        >>> float(out["nc1"]) < 1e-6, float(out["nc4"])
        (True, 1.0)
        >>> h = w[y] + 0.3 * w[(y + 1) % 3] * torch.linspace(-1, 1, 12)[:, None]
        >>> round(float(neural_collapse(h, y, w)["nc1"]), 4)
        0.0224
    """
    check_matrix(features, "features", "(N, d)")
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, d), got shape {tuple(features.shape)}")
    n, d = features.shape
    _check_labels(labels, n)
    out_dtype = resolve_dtype(dtype, features)
    if weight is not None:
        check_matrix(weight, "weight", "(K, d)")
        if weight.ndim != 2 or weight.shape[1] != d:
            raise ValueError(
                f"weight must have shape (K, d) with d = {d}, got shape {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape (K,) = ({weight.shape[0]},), got shape {tuple(bias.shape)}"
            )
    elif bias is not None:
        raise ValueError("bias was given without weight")
    if n:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0:
            raise ValueError(f"labels must be non-negative, got a minimum of {lo}")
        if weight is not None and hi >= weight.shape[0]:
            raise ValueError(
                f"labels must lie in [0, K) = [0, {weight.shape[0]}) (K = rows of weight), "
                f"got a maximum of {hi}"
            )
        num_classes = weight.shape[0] if weight is not None else hi + 1
    else:
        num_classes = weight.shape[0] if weight is not None else 0
    stats = CollapseStats.zeros(num_classes, d, device=features.device)
    _collapse_update(features, labels, stats)
    return collapse_from_stats(
        stats, weight, bias, rows=features, row_labels=labels, dtype=out_dtype
    )
