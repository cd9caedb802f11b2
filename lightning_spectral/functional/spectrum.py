"""Spectra of representations (SPEC.md §1, §2).

All functions accept a representation batch ``h`` of shape ``(n, d)`` — rows are samples,
columns features — or ``(..., n, d)`` for independent problems solved in one batched call.
They compute on ``h``'s device, in float32 by default (float64 inputs stay float64, and
``dtype="float64"`` asks for it), and never synchronise with the host: NaN/Inf input gives a NaN
result for that problem, not an exception.
"""

from __future__ import annotations

import torch

from lightning_spectral.functional._utils import (
    apply_cutoff,
    check_matrix,
    check_vector,
    entropy_of_spectrum,
    eps,
    finite_rows_mask,
    nan_where,
    resolve_dtype,
)

__all__ = [
    "normalize_rows",
    "gram_eigvals",
    "autocorrelation_eigvals",
    "covariance_eigvals",
    "vne",
    "effective_rank",
    "stable_rank",
    "condition_number",
    "spectral_distribution",
]

_ROW_NORM_FLOOR = 1e-12


def normalize_rows(h: torch.Tensor) -> torch.Tensor:
    """``h_i / ‖h_i‖₂`` for every row; rows of norm below 1e-12 become zero rows (SPEC.md §0.2).

    Differentiable, including at the zero rows (their gradient is 0).
    """
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    keep = norm >= _ROW_NORM_FLOOR
    safe = torch.where(keep, norm, torch.ones_like(norm))
    return torch.where(keep, h / safe, torch.zeros_like(h))


def gram_eigvals(z: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``zᵀz · scale`` on the smaller Gram side (SPEC.md §0.5), descending.

    ``z`` has shape ``(..., n, d)``; returns ``(..., min(n, d))``. With ``n <= d`` the ``n×n``
    matrix ``z zᵀ`` is used, otherwise ``zᵀ z`` (``d×d``); their non-zero eigenvalues coincide.
    Non-finite problems give NaN without raising (they are zeroed before ``eigvalsh``).
    """
    n, d = z.shape[-2], z.shape[-1]
    bad = finite_rows_mask(z)
    z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    gram = z @ z.mT if n <= d else z.mT @ z
    ev = torch.linalg.eigvalsh(gram * scale).flip(-1)
    return nan_where(bad, ev)


def _working(h: torch.Tensor, dtype: torch.dtype | str | None) -> torch.Tensor:
    check_matrix(h, "h")
    return h.to(resolve_dtype(dtype, h))


def autocorrelation_eigvals(
    h: torch.Tensor, normalize: bool = True, dtype: torch.dtype | str | None = None
) -> torch.Tensor:
    """Eigenvalues of the autocorrelation ``C = (1/n) ZᵀZ`` of the rows (SPEC.md §1.1).

    ``Z = normalize_rows(h)`` when ``normalize`` (then, without zero rows, the eigenvalues sum
    to 1), else ``Z = h``. Returns the ``min(n, d)`` leading eigenvalues, descending, computed
    on the smaller Gram side; shape ``(..., min(n, d))``. Eigenvalues are returned as computed
    (tiny negative round-off included); entropies and ranks apply the cutoff of §0.3.
    """
    z = _working(h, dtype)
    n = z.shape[-2]
    if n == 0:
        return z.new_empty(*z.shape[:-2], 0)
    if not normalize:
        return gram_eigvals(z, 1.0 / n)
    bad = finite_rows_mask(z)  # before normalising, which would hide a NaN row as a zero row
    return nan_where(bad, gram_eigvals(normalize_rows(z), 1.0 / n))


def covariance_eigvals(h: torch.Tensor, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Eigenvalues of the unbiased covariance ``H_cᵀH_c / (n − 1)`` (SPEC.md §1.2), descending.

    ``H_c`` is ``h`` minus its row mean; no row normalisation. Shape ``(..., min(n, d))``;
    every entry is NaN when ``n < 2``.
    """
    x = _working(h, dtype)
    n = x.shape[-2]
    k = min(n, x.shape[-1])
    if n < 2:
        return torch.full((*x.shape[:-2], k), float("nan"), dtype=x.dtype, device=x.device)
    centred = x - x.mean(dim=-2, keepdim=True)
    return gram_eigvals(centred, 1.0 / (n - 1))


def vne(
    h: torch.Tensor, normalize: bool = True, dtype: torch.dtype | str | None = None
) -> torch.Tensor:
    """Von Neumann entropy of the autocorrelation of the rows of ``h`` (SPEC.md §2.1), in nats.

    ``VNE(H) = S(λ(C_auto))`` with the trace renormalisation ``ρ = C / tr C`` and the cutoff of
    §0.3: ``VNE = log d`` for isotropic rows, 0 for rank one, 0 for ``H = 0`` or ``n = 1``, and
    ``0 <= VNE <= log min(n, d)``. Differentiable: ``eigvalsh``'s backward for eigenvalues alone
    is ``V diag(∂L/∂λ) Vᵀ``, which has no ``1/(λ_i − λ_j)`` terms, so repeated eigenvalues are
    harmless, and eigenvalues at or below the cutoff get exactly zero gradient (§2.4).
    Returns a tensor of shape ``h.shape[:-2]``; NaN where the input holds NaN/Inf.
    """
    lam = autocorrelation_eigvals(h, normalize=normalize, dtype=dtype)
    if lam.shape[-1] == 0:
        return torch.full(lam.shape[:-1], float("nan"), dtype=lam.dtype, device=lam.device)
    return entropy_of_spectrum(apply_cutoff(lam))


def effective_rank(eigvals: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank ``exp(S(λ))`` of a PSD spectrum (SPEC.md §1.3).

    ``eigvals`` has shape ``(..., m)``; the cutoff of §0.3 is applied first. ``k`` equal non-zero
    values give exactly ``k``; a spectrum of zero total mass gives 0. For a weight matrix pass
    ``σ²`` (the eigenvalues of ``WᵀW``), not ``σ``, so that ``erank = exp(VNE)``.
    """
    check_vector(eigvals, "eigvals")
    lam = apply_cutoff(eigvals)
    if lam.shape[-1] == 0:
        return lam.sum(dim=-1)
    erank = torch.exp(entropy_of_spectrum(lam))
    return torch.where(lam.sum(dim=-1) == 0, torch.zeros_like(erank), erank)


def stable_rank(w: torch.Tensor, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Stable rank ``‖W‖_F² / ‖W‖₂²`` of a weight (SPEC.md §1.4), NaN when ``W = 0``.

    A weight of shape ``(out, in, k1, ...)`` is read as ``W.reshape(out, in·k1·...)``.
    """
    from lightning_spectral.functional.weights import singular_values

    s = singular_values(w, dtype=dtype)
    s2 = s.square()
    top = s2[..., 0] if s2.shape[-1] else s2.sum(dim=-1)
    ratio = s2.sum(dim=-1) / top
    return torch.where(top > 0, ratio, torch.full_like(ratio, float("nan")))


def condition_number(eigvals: torch.Tensor) -> torch.Tensor:
    """Condition number ``λ_max / λ_min`` of a PSD spectrum (SPEC.md §1.5).

    Over the values given (last dimension): ``+inf`` when ``λ_min <= λ_max · m · ε`` (§0.3),
    NaN when ``λ_max = 0`` (or the spectrum is empty).
    """
    check_vector(eigvals, "eigvals")
    m = eigvals.shape[-1]
    if m == 0:
        return torch.full(eigvals.shape[:-1], float("nan"), dtype=eigvals.dtype,
                          device=eigvals.device)
    lam_max = eigvals.amax(dim=-1)
    lam_min = eigvals.amin(dim=-1)
    threshold = lam_max * (m * eps(eigvals.dtype))
    safe_min = torch.where(lam_min > threshold, lam_min, torch.ones_like(lam_min))
    inf = torch.full_like(lam_max, float("inf"))
    kappa = torch.where(lam_min > threshold, lam_max / safe_min, inf)
    return torch.where(lam_max > 0, kappa, torch.full_like(kappa, float("nan")))


def spectral_distribution(eigvals: torch.Tensor) -> torch.Tensor:
    """The logged eigenvalue distribution ``p = λ / Σλ`` (SPEC.md §1.6), after the cutoff.

    Pass ``σ²`` for a weight. A spectrum of zero mass gives zeros.
    """
    check_vector(eigvals, "eigvals")
    lam = apply_cutoff(eigvals)
    total = lam.sum(dim=-1, keepdim=True)
    return lam / torch.where(total > 0, total, torch.ones_like(total))
