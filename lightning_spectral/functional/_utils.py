"""Shared numerics of :mod:`lightning_spectral.functional` (SPEC.md §0).

Nothing here synchronises with the host: degenerate cases are handled with ``torch.where`` so
that every function can run on a GPU inside a training step without a device-to-host copy.
The helpers are written with as few tensor operations as possible, because the monitors call
them once per layer per logging event and, for small layers, per-operation dispatch dominates.
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


def as_spectrum(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float32/float64 tensor: float64 stays, everything else becomes float32.

    Spectra handed in by users may be integer or half precision; entropies and ranks are never
    evaluated in half precision (SPEC.md §0.5).
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (2^-23 for float32, 2^-52 for float64)."""
    return torch.finfo(dtype).eps


def apply_cutoff(eigvals: torch.Tensor) -> torch.Tensor:
    """Clip at 0 and zero every ``λ_i <= λ_max · m · ε`` (SPEC.md §0.3).

    Works on the last dimension (the ``m`` computed values); differentiable through the values
    that are kept (the threshold itself is treated as a constant). Non-finite spectra stay
    non-finite: a NaN propagates, and a ``+inf`` value is kept (the threshold is computed from
    ``λ_max`` clamped to the largest finite number), so the entropy of such a spectrum is NaN.
    """
    lam = eigvals.clamp_min(0)
    m = lam.shape[-1]
    if m == 0:
        return lam
    finfo = torch.finfo(lam.dtype)
    lam_max = lam.detach().amax(dim=-1, keepdim=True).clamp_max(finfo.max)
    # ``<=`` is false for NaN, so a NaN (a non-finite input) propagates instead of being zeroed
    return lam.masked_fill(lam <= lam_max * (m * finfo.eps), 0.0)


def entropy_and_total(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S(λ), Σλ)`` over the last dimension; see :func:`entropy_of_spectrum` (SPEC.md §0.4)."""
    total = lam.sum(dim=-1, keepdim=True)
    # clamp_min keeps NaN/Inf totals non-finite (so the entropy becomes NaN) and turns a zero
    # total into a tiny positive one (then p = 0 everywhere and the entropy is exactly 0)
    p = lam / total.clamp_min(torch.finfo(lam.dtype).tiny)
    # log only ever sees p > 0; at p = 0 the product p·log(1) has value 0 and gradient 0
    plogp = p * p.masked_fill(p == 0, 1.0).log()
    # ``0.0 - x`` (not ``-x``) so that an empty support gives +0.0, not -0.0
    return 0.0 - plogp.sum(dim=-1), total[..., 0]


def entropy_of_spectrum(lam: torch.Tensor) -> torch.Tensor:
    """``S(λ) = −Σ p_i log p_i`` with ``p = λ / Σλ`` over the last dimension (SPEC.md §0.4).

    ``λ`` must already be non-negative (apply :func:`apply_cutoff` first). Returns 0 for a
    spectrum of zero total mass and NaN when ``λ`` holds NaN or Inf. The value *and the
    gradient* of ``p log p`` at ``p = 0`` are 0: the logarithm only ever sees positive values.
    """
    return entropy_and_total(lam)[0]


def nan_where(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` with NaN wherever ``mask`` (broadcast over trailing dims) is true; no sync."""
    while mask.ndim < value.ndim:
        mask = mask.unsqueeze(-1)
    return torch.where(mask, float("nan"), value)


def finite_rows_mask(x: torch.Tensor) -> torch.Tensor:
    """True for each matrix in the leading batch of ``x`` (…, n, d) that holds a NaN or Inf.

    (Despite its name it returns the *non-finite* mask, one entry per matrix.)
    """
    return ~torch.isfinite(x).all(dim=-1).all(dim=-1)
