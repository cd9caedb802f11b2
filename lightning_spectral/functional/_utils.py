"""Shared numerics of :mod:`lightning_spectral.functional` (docs/definitions.md#conventions).

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
    """Working precision of a spectral computation (docs/definitions.md#precision).

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
    evaluated in half precision (docs/definitions.md#precision).
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (2^-23 for float32, 2^-52 for float64)."""
    return torch.finfo(dtype).eps


def gram_round_off(m: int, summed: int, work: torch.dtype) -> int:
    """The factor ``k`` of the cutoff ``λ_max · k · ε`` for a spectrum taken from a Gram product.

    ``m`` is the side of the Gram matrix and ``summed`` the length of the sums that formed its
    entries (the other side of the factor). With a float32 working precision the product comes
    from :func:`gram_matmul`, whose float32 sums never run over more than ``4m`` terms (the
    partial sums are added in float64): its round-off stays at the level of the eigensolver's,
    so ``k = m``, as for any given matrix. With a float64 working precision there is no wider
    type to accumulate in; the round-off of a sum of ``summed`` terms is up to ``summed · ε`` of
    the largest entry, so ``k = max(m, summed)`` (at most ``16384 · 2⁻⁵² ≈ 3.6e-12`` of
    ``λ_max`` for 16,384 rows: nothing a float64 entropy or rank resolves is lost).
    """
    return m if work == torch.float32 else max(m, summed)


# Gram sides below this are formed in float64 directly (as cheap as the chunked float32 product,
# and there the cutoff m·ε leaves too little room for float32 sums of 4m terms)
_MIN_SIDE = 32
_CHUNK_PER_SIDE = 4


def _float32_matmul_is_ieee(device_type: str) -> bool:
    """True only when float32 matmuls on ``device_type`` are plain IEEE float32 products.

    False under autocast, and when the float32 matmul precision was lowered (TF32, bfloat16
    passes: ``torch.set_float32_matmul_precision``, ``allow_tf32``, the ``fp32_precision``
    settings) or cannot be read (PyTorch raises when legacy and new settings are mixed).
    Reads Python-side flags only: no host synchronisation.
    """
    try:
        if torch.is_autocast_enabled(device_type):
            return False
        return torch.get_float32_matmul_precision() == "highest"
    except (RuntimeError, TypeError, ValueError):
        return False


def gram_matmul(a: torch.Tensor, b: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """``a @ b`` (``(..., p, L) @ (..., L, q)``) with float64 accumulation, returned in float64.

    A float32 product summed over ``L`` terms in float32 has a round-off that grows with ``L``:
    the ``d×d`` Gram of a tall batch (``L = n`` rows) left spurious eigenvalues far above the
    cutoff ``λ_max · m · ε`` of an ``m×m`` spectrum (a rank-one 4096×8 batch had VNE 3.4e-4).
    Here the float32 sums never run over more than ``4m`` terms, ``m = side`` the side of the
    spectrum the product feeds (default ``max(p, q)``): the ``L`` terms are split into chunks of
    that length, each chunk's product is a float32 matmul (one batched call, at float32 speed:
    1.0–1.2× the plain product on CPU), and the partial products are added in float64. The
    round-off of a float32 sum of ``4m`` terms (typically ``~(4m)^{1/2} ε`` relative) stays
    below the cutoff ``m ε`` for ``m ≥ 32``, whatever ``L`` and whatever the order in which the
    matmul kernel accumulates. Sides below 32, float64 inputs, and float32 inputs whose matmuls
    may not be IEEE float32 (autocast, TF32 or bfloat16 matmul precision; see
    :func:`_float32_matmul_is_ieee`) are computed directly in float64 instead, which is exact to
    float32 rounding (products of float32 numbers are exact in float64) but 1.5–6× the cost of
    a float32 product on CPU (and far more on GPUs with slow float64 units).
    Differentiable; no host synchronisation (every choice depends on shapes and global flags).
    """
    length = a.shape[-1]
    side = max(a.shape[-2], b.shape[-1]) if side is None else side
    c = _CHUNK_PER_SIDE * side
    chunked = (
        a.dtype == torch.float32
        and b.dtype == torch.float32
        and side >= _MIN_SIDE
        and _float32_matmul_is_ieee(a.device.type)
    )
    if not chunked:
        return a.to(torch.float64) @ b.to(torch.float64)
    if length <= c:
        return (a @ b).to(torch.float64)  # a single chunk
    count = length // c
    cut = count * c
    # splitting a dimension is always a view: a (..., p, L) -> (..., count, p, c) and
    # b (..., L, q) -> (..., count, c, q); one batched float32 matmul gives the partial products
    a_chunks = a[..., :cut].unflatten(-1, (count, c)).movedim(-2, -3)
    b_chunks = b[..., :cut, :].unflatten(-2, (count, c))
    out = (a_chunks @ b_chunks).sum(dim=-3, dtype=torch.float64)
    if cut < length:
        out = out + (a[..., cut:] @ b[..., cut:, :]).to(torch.float64)
    return out


def apply_cutoff(eigvals: torch.Tensor, factor: int | None = None) -> torch.Tensor:
    """Clip at 0 and zero every ``λ_i <= λ_max · k · ε`` (docs/definitions.md#cutoff).

    Works on the last dimension (the ``m`` computed values); ``k = factor``, by default ``m``
    (the round-off of an eigendecomposition of a given matrix, or of an SVD); pass
    :func:`gram_round_off` for a spectrum formed from a Gram product. Differentiable through the
    values that are kept (the threshold itself is treated as a constant). Non-finite spectra stay
    non-finite: a NaN propagates, and a ``+inf`` value is kept (the threshold is computed from
    ``λ_max`` clamped to the largest finite number), so the entropy of such a spectrum is NaN.
    """
    lam = eigvals.clamp_min(0)
    m = lam.shape[-1]
    if m == 0:
        return lam
    k = m if factor is None else factor
    finfo = torch.finfo(lam.dtype)
    lam_max = lam.detach().amax(dim=-1, keepdim=True).clamp_max(finfo.max)
    # ``<=`` is false for NaN, so a NaN (a non-finite input) propagates instead of being zeroed
    return lam.masked_fill(lam <= lam_max * (k * finfo.eps), 0.0)


def entropy_and_total(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S(λ), Σλ)`` over the last dimension; see :func:`entropy_of_spectrum`."""
    total = lam.sum(dim=-1, keepdim=True)
    # clamp_min keeps NaN/Inf totals non-finite (so the entropy becomes NaN) and turns a zero
    # total into a tiny positive one (then p = 0 everywhere and the entropy is exactly 0)
    p = lam / total.clamp_min(torch.finfo(lam.dtype).tiny)
    # log only ever sees p > 0; at p = 0 the product p·log(1) has value 0 and gradient 0
    plogp = p * p.masked_fill(p == 0, 1.0).log()
    # ``0.0 - x`` (not ``-x``) so that an empty support gives +0.0, not -0.0
    return 0.0 - plogp.sum(dim=-1), total[..., 0]


def entropy_of_spectrum(lam: torch.Tensor) -> torch.Tensor:
    """``S(λ) = −Σ p_i log p_i`` with ``p = λ / Σλ`` over the last dimension.

    The entropy of docs/definitions.md#entropy. ``λ`` must already be non-negative (apply
    :func:`apply_cutoff` first). Returns 0 for a spectrum of zero total mass and NaN when ``λ``
    holds NaN or Inf. The value *and the gradient* of ``p log p`` at ``p = 0`` are 0: the
    logarithm only ever sees positive values.
    """
    return entropy_and_total(lam)[0]
