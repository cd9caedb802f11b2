"""Shared numerics of :mod:`lightning_spectral.functional` (SPEC.md §0).

Nothing here synchronises with the host: degenerate cases are handled with ``torch.where`` so
that every function can run on a GPU inside a training step without a device-to-host copy.
"""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "fp64": torch.float64,
}


def resolve_dtype(dtype: torch.dtype | str | None, like: torch.Tensor | None = None) -> torch.dtype:
    """Working precision of a spectral computation (SPEC.md §0.5).

    ``None`` keeps float64 inputs in float64 and computes everything else (float32, float16,
    bfloat16, integers) in float32. Eigenvalues are never computed in half precision.
    """
    if dtype is None:
        if like is not None and like.dtype == torch.float64:
            return torch.float64
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        return _DTYPES[key]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"dtype must be torch.float32 or torch.float64 (spectra are never computed in "
            f"half precision), got {dtype}"
        )
    return dtype


def check_matrix(x: torch.Tensor, name: str, want: str = "(..., n, d)") -> None:
    """Raise ``ValueError`` naming the shape got and the shape wanted unless ``x.ndim >= 2``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(x.shape)}")


def check_vector(x: torch.Tensor, name: str, want: str = "(..., m)") -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor with at least one dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(x.shape)}")


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (2^-23 for float32, 2^-52 for float64)."""
    return torch.finfo(dtype).eps


def apply_cutoff(eigvals: torch.Tensor) -> torch.Tensor:
    """Clip at 0 and zero every ``λ_i <= λ_max · m · ε`` (SPEC.md §0.3).

    Works on the last dimension (the ``m`` computed values); differentiable through the values
    that are kept (the threshold itself is treated as a constant).
    """
    lam = eigvals.clamp_min(0)
    m = lam.shape[-1]
    if m == 0:
        return lam
    lam_max = lam.detach().amax(dim=-1, keepdim=True)
    threshold = lam_max * (m * eps(lam.dtype))
    # written as ``<=`` so that NaN (a non-finite input) propagates instead of being zeroed
    return torch.where(lam <= threshold, torch.zeros_like(lam), lam)


def entropy_of_spectrum(lam: torch.Tensor) -> torch.Tensor:
    """``S(λ) = −Σ p_i log p_i`` with ``p = λ / Σλ`` over the last dimension (SPEC.md §0.4).

    ``λ`` must already be non-negative (apply :func:`apply_cutoff` first). Returns 0 for a
    spectrum of zero total mass. The value *and the gradient* of ``p log p`` at ``p = 0`` are 0:
    the logarithm only ever sees the masked values.
    """
    total = lam.sum(dim=-1, keepdim=True)
    positive_total = total > 0
    p = lam / torch.where(positive_total, total, torch.ones_like(total))
    support = p > 0
    safe_p = torch.where(support, p, torch.ones_like(p))
    plogp = torch.where(support, p * torch.log(safe_p), torch.zeros_like(p))
    # ``+ 0.0`` turns the -0.0 of an empty support into 0.0
    entropy = -plogp.sum(dim=-1) + 0.0
    return nan_where(torch.isnan(total[..., 0]), entropy)


def nan_where(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` with NaN wherever ``mask`` (broadcast over trailing dims) is true; no sync."""
    while mask.ndim < value.ndim:
        mask = mask.unsqueeze(-1)
    return torch.where(mask, torch.full_like(value, float("nan")), value)


def finite_rows_mask(x: torch.Tensor) -> torch.Tensor:
    """True for each matrix in the leading batch of ``x`` (…, n, d) that holds a NaN or Inf."""
    return ~torch.isfinite(x).all(dim=-1).all(dim=-1)
