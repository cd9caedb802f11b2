"""RankMe (Garrido et al., ICML 2023): Roy–Vetterli effective rank of the singular values.

Checked against the published formula evaluated with numpy's float64 SVD of the raw embedding
matrix, against its known values, and against the effective rank of ``σ²`` it differs from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_spectral.functional.spectrum import (
    autocorrelation_eigvals,
    effective_rank,
    rankme,
    rankme_from_eigvals,
    vne,
)

F32 = torch.float32
F64 = torch.float64


def published(h: np.ndarray, eps: float = 1e-7) -> float:
    """The paper's formula: ``σ = svd(H)``, ``p = σ/‖σ‖₁ + ε``, ``exp(−Σ p log p)``."""
    s = np.linalg.svd(np.asarray(h, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (300, 40), (40, 300), (7, 7), (1, 5)])
def test_matches_published_formula_float64(shape: tuple[int, int]) -> None:
    n, d = shape
    # columns of different scales: a spread spectrum, no row normalisation involved
    h = randn(n, d, seed=n + d) * torch.logspace(-1, 1, d, dtype=F64)
    assert rankme(h).item() == pytest.approx(published(h.numpy()), rel=1e-10)
    for eps in (0.0, 1e-3):
        assert rankme(h, eps=eps).item() == pytest.approx(published(h.numpy(), eps), rel=1e-10)


@pytest.mark.parametrize("shape", [(256, 32), (32, 256), (2048, 64)])
def test_matches_published_formula_float32(shape: tuple[int, int]) -> None:
    n, d = shape
    h = randn(n, d, seed=3) * torch.linspace(0.3, 3.0, d, dtype=F64)
    got = rankme(h.float())
    assert got.dtype == F32
    assert got.item() == pytest.approx(published(h.numpy()), rel=1e-5)


def test_rows_are_not_normalised_nor_centred() -> None:
    h = randn(50, 8, seed=1)
    scaled = h * torch.logspace(-2, 2, 50, dtype=F64)[:, None]
    assert rankme(scaled).item() == pytest.approx(published(scaled.numpy()), rel=1e-10)
    assert abs(rankme(scaled).item() - rankme(h).item()) > 1e-2  # row scales matter
    shifted = h + 5.0
    assert rankme(shifted).item() == pytest.approx(published(shifted.numpy()), rel=1e-10)
    assert rankme(shifted).item() < rankme(h).item()  # a common mean is not removed


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("d", [1, 3, 16, 100])
def test_known_values_isotropic_and_rank_one(d: int, dtype: torch.dtype) -> None:
    tol = 1e-6 if dtype == F32 else 1e-12
    eye = torch.eye(d, dtype=dtype)
    assert rankme(eye, eps=0).item() == pytest.approx(d, rel=tol)
    p = 1.0 / d + 1e-7  # with the paper's ε: every p_k = 1/d + ε
    assert rankme(eye).item() == pytest.approx(math.exp(-d * p * math.log(p)), rel=tol)
    # rank one, rows parallel and antiparallel with different norms, n > d and n < d
    for n in (d + 5, max(1, d // 2)):
        g = torch.Generator().manual_seed(n)
        u = torch.randn(1, d, generator=g, dtype=F64)
        c = torch.randn(n, 1, generator=g, dtype=F64)
        h = (c * u).to(dtype)
        m = min(n, d)
        assert rankme(h, eps=0).item() == pytest.approx(1.0, abs=tol)
        e = 1e-7
        want = math.exp(-((1 + e) * math.log(1 + e) + (m - 1) * e * math.log(e)))
        assert rankme(h).item() == pytest.approx(want, rel=tol)


def test_differs_from_effective_rank_of_squared_singular_values() -> None:
    # σ = (4, 2, 1, 1): erank uses σ²/Σσ² = (16, 4, 1, 1)/22, RankMe σ/Σσ = (4, 2, 1, 1)/8
    h = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=F64))
    s = np.array([4.0, 2.0, 1.0, 1.0])
    p1, p2 = s / s.sum(), s**2 / (s**2).sum()
    want_rankme = math.exp(-(p1 * np.log(p1)).sum())
    want_erank = math.exp(-(p2 * np.log(p2)).sum())
    assert rankme(h, eps=0).item() == pytest.approx(want_rankme, rel=1e-12)
    lam = autocorrelation_eigvals(h, normalize=False)
    assert effective_rank(lam).item() == pytest.approx(want_erank, rel=1e-12)
    assert rankme(h, eps=0).item() > effective_rank(lam).item()
    # the monitor's erank is exp(VNE) of the row-normalised batch: here rows are ±e_j, isotropic
    assert math.exp(vne(h).item()) == pytest.approx(4.0, rel=1e-12)


def test_from_eigvals_is_scale_free_and_batched() -> None:
    h = randn(3, 40, 12, seed=5)
    lam = autocorrelation_eigvals(h, normalize=False)  # eigenvalues of HᵀH/n
    out = rankme_from_eigvals(lam)
    assert out.shape == (3,)
    torch.testing.assert_close(out, rankme(h))
    torch.testing.assert_close(rankme_from_eigvals(lam * 40.0), out)  # of HᵀH: same value
    for i in range(3):
        assert out[i].item() == pytest.approx(published(h[i].numpy()), rel=1e-10)
    s = torch.linalg.svdvals(h)  # σ² is a valid input as well
    torch.testing.assert_close(rankme_from_eigvals(s**2), out)


def test_degenerate_inputs() -> None:
    assert rankme(torch.zeros(5, 3)).item() == 0.0  # zero mass [convention], as erank
    assert rankme(torch.empty(0, 4)).item() == 0.0
    assert rankme_from_eigvals(torch.zeros(4)).item() == 0.0
    bad = torch.ones(4, 3)
    bad[1, 2] = math.nan
    assert math.isnan(rankme(bad).item())
    assert math.isnan(rankme_from_eigvals(torch.tensor([1.0, math.nan])).item())
    with pytest.raises(ValueError, match="shape"):
        rankme(torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        rankme_from_eigvals(torch.tensor(1.0))
    assert rankme(torch.ones(4, 3, dtype=torch.float16)).dtype == F32


def test_gradcheck_float64() -> None:
    h = randn(9, 5, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(rankme, (h,))
    assert torch.autograd.gradcheck(lambda x: rankme(x, eps=0.0), (h,))
    w = randn(5, 9, seed=8).requires_grad_()  # the n×n side
    assert torch.autograd.gradcheck(rankme, (w,))
    # a rank-deficient input: the cut values get zero gradient, the rest stays finite
    r = (randn(9, 2, seed=9) @ randn(2, 5, seed=10)).requires_grad_()
    (g,) = torch.autograd.grad(rankme(r), r)
    assert torch.isfinite(g).all()


def test_no_host_sync_on_meta() -> None:
    h = torch.empty(2, 30, 8, device="meta")
    assert rankme(h).shape == (2,)
    assert rankme_from_eigvals(torch.empty(2, 8, device="meta")).shape == (2,)
