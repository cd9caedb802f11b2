"""Layer matrix decomposition of weights (SPEC.md §1.4, §5).

A weight tensor of shape ``(out, in, k1, ...)`` is read as the matrix
``W.reshape(out, in·k1·...)`` (SPEC.md §0.1); a Linear weight is already ``(out, in)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_spectral.functional._utils import check_vector, eps, resolve_dtype

__all__ = [
    "weight_matrix",
    "singular_values",
    "singular_values_many",
    "truncation_rank",
    "eckart_young_error",
]


def weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """The matrix view ``W.reshape(out, -1)`` of a weight tensor (SPEC.md §0.1)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.ndim < 2:
        raise ValueError(
            f"w must be a weight of shape (out, in) or (out, in, k1, ...), got shape "
            f"{tuple(w.shape)}"
        )
    return w.reshape(w.shape[0], -1)


def singular_values(w: torch.Tensor, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Singular values ``σ_1 >= ... >= σ_r`` of the weight matrix (SPEC.md §5.1).

    ``r = min(out, in·k1·...)``; conv kernels are reshaped to ``(out, in·kh·kw)``. Computed with
    ``torch.linalg.svdvals`` in float32 (float64 inputs or ``dtype="float64"``: float64) on
    the weight's device. Non-finite weights give NaN.
    """
    mat = weight_matrix(w)
    mat = mat.to(resolve_dtype(dtype, mat))
    bad = ~torch.isfinite(mat).all()
    mat = torch.where(torch.isfinite(mat), mat, torch.zeros_like(mat))
    s = torch.linalg.svdvals(mat)
    return torch.where(bad, torch.full_like(s, float("nan")), s)


def singular_values_many(
    weights: Sequence[torch.Tensor], dtype: torch.dtype | str | None = None
) -> list[torch.Tensor]:
    """Singular values of several weights, one batched ``svdvals`` per distinct matrix shape.

    Returns one tensor per weight, in the order given. Equal-shape matrices (e.g. the blocks of
    a transformer) are stacked and decomposed in one call, which beats a Python loop.
    """
    mats = [weight_matrix(w).detach() for w in weights]
    out: list[torch.Tensor | None] = [None] * len(mats)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((tuple(m.shape), m.device, m.dtype), []).append(i)
    for idx in groups.values():
        stack = torch.stack([mats[i] for i in idx]).to(resolve_dtype(dtype, mats[idx[0]]))
        bad = ~torch.isfinite(stack).all(dim=-1).all(dim=-1)
        stack = torch.where(torch.isfinite(stack), stack, torch.zeros_like(stack))
        s = torch.linalg.svdvals(stack)
        s = torch.where(bad[:, None], torch.full_like(s, float("nan")), s)
        for j, i in enumerate(idx):
            out[i] = s[j]
    return out  # type: ignore[return-value]


def truncation_rank(s: torch.Tensor, energy: float = 0.9) -> torch.Tensor:
    """Smallest ``k`` with ``Σ_{i<=k} σ_i² >= τ Σ_i σ_i²`` (SPEC.md §5.3); 0 for ``W = 0``.

    ``s`` are singular values (any order; sorted descending here), shape ``(..., r)``;
    ``energy`` is ``τ ∈ (0, 1]``. This is the layer's memory-capacity estimate (§5.3).
    Computed in float64 with a relative slack of ``r · ε₆₄`` against round-off, so that
    ``σ = (2, 1, 1)`` gives ``k(2/3) = 1``, ``k(0.7) = 2``, ``k(1) = 3``. Returns int64.
    """
    check_vector(s, "s", "(..., r)")
    tau = float(energy)
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"energy must lie in (0, 1], got {energy!r}")
    s2 = s.detach().to(torch.float64).abs().sort(dim=-1, descending=True).values.square()
    r = s2.shape[-1]
    cum = s2.cumsum(dim=-1)
    total = cum[..., -1:] if r else s2.sum(dim=-1, keepdim=True)
    target = tau * total * (1.0 - max(r, 1) * eps(torch.float64))
    reached = cum >= target
    k = (~reached).sum(dim=-1) + 1
    k = torch.clamp(k, max=r)
    return torch.where(total[..., 0] > 0, k, torch.zeros_like(k))


def eckart_young_error(s: torch.Tensor, k: int, relative: bool = False) -> torch.Tensor:
    """Error of the best rank-``k`` approximation, ``(Σ_{i>k} σ_i²)^{1/2}`` (SPEC.md §5.2).

    By Eckart–Young–Mirsky this is ``min_{rank B <= k} ‖W − B‖_F`` (0 when ``k >= r``).
    ``relative=True`` divides by ``‖W‖_F = (Σσ_i²)^{1/2}`` (NaN for ``W = 0``). ``k`` must be a
    non-negative integer.
    """
    check_vector(s, "s", "(..., r)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    s2 = s.sort(dim=-1, descending=True).values.square()
    tail = s2[..., k:].sum(dim=-1).sqrt()
    if not relative:
        return tail
    norm = s2.sum(dim=-1).sqrt()
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm > 0, tail / safe, torch.full_like(norm, float("nan")))
