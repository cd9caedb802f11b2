"""Round-off of Gram-side spectra on tall and wide inputs: known values must be exact.

A Gram product ``ZᵀZ`` sums ``max(n, d)`` terms. Accumulated in float32, its round-off grows with
that length and left spurious eigenvalues above the cutoff ``λ_max·min(n, d)·ε`` (a rank-one
4096×8 batch had VNE 3.4e-4, MIR at collapse read 0.50004). The known values below must hold to
1e-6 in float32 and 1e-12 in float64 for ``n`` up to 16,384 rows and ``d`` from 3 to 4,096.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_spectral.functional import _utils
from lightning_spectral.functional._utils import apply_cutoff, entropy_of_spectrum, gram_matmul
from lightning_spectral.functional.interplay import information_interplay
from lightning_spectral.functional.spectrum import (
    autocorrelation_eigvals,
    effective_rank,
    vne,
)

F32 = torch.float32
F64 = torch.float64
TOL = {F32: 1e-6, F64: 1e-12}

# (n, d): every n with the small widths (d×d side), the wide 4096 with the n×n side, and one
# tall-and-wide case; 4096×4096 and 16384×4096 (eigvalsh of 4096×4096) are left to the benchmark
GRID = [(n, d) for n in (6, 512, 4096, 16384) for d in (3, 8, 64)]
GRID += [(6, 4096), (512, 4096), (16384, 512)]


def _directions(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` orthonormal directions in ``R^d`` as rows (float64)."""
    q, r = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))
    return (q * torch.sign(torch.diagonal(r))).mT


def clusters(n: int, d: int, k: int, seed: int, dtype: torch.dtype,
             positive: bool = False) -> torch.Tensor:
    """``n`` rows in ``k`` equal clusters along orthonormal directions, random row scales.

    ``positive`` keeps every row on the positive side of its direction (and, for ``k = 1``,
    a direction with positive entries: ReLU-like data, where float32 round-off is the most
    systematic); otherwise rows are parallel and antiparallel at random.
    """
    g = torch.Generator().manual_seed(seed)
    if positive and k == 1:
        q = (torch.rand(1, d, generator=g, dtype=F64) + 0.5)
    else:
        q = _directions(d, k, g)
    labels = torch.arange(n) % k
    scale = torch.exp(torch.empty(n, 1, dtype=F64).uniform_(-3, 3, generator=g))
    if not positive:
        scale = scale * torch.where(torch.rand(n, 1, generator=g, dtype=F64) < 0.5, -1.0, 1.0)
    h = q[labels] * scale
    return h[torch.randperm(n, generator=g)].to(dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rank_one_and_clusters_exact_on_the_grid(shape: tuple[int, int],
                                                 dtype: torch.dtype) -> None:
    n, d = shape
    tol = TOL[dtype]
    for k, positive in ((1, True), (1, False), (min(4, d), False), (2, True)):
        if n % k:
            continue
        h = clusters(n, d, k, seed=n + 7 * d + k, dtype=dtype, positive=positive)
        lam = autocorrelation_eigvals(h)
        assert lam.dtype == dtype
        want = math.log(k)
        assert abs(entropy_of_spectrum(apply_cutoff(lam)).item() - want) <= tol, (k, positive)
        assert effective_rank(lam).item() == pytest.approx(k, rel=tol)
        if n * d <= 2**20 or k == 1:  # vne is this entropy; once per shape for the large ones
            assert abs(vne(h).item() - want) <= tol
    # without row normalisation: rows of wildly different norms along one direction
    h = clusters(n, d, 1, seed=n + d, dtype=dtype)
    assert vne(h, normalize=False).item() == 0.0


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape", [(6, 3), (512, 64), (6, 4096), (4096, 8)])
def test_unresolved_eigenvalues_are_returned_as_exact_zeros(shape: tuple[int, int],
                                                           dtype: torch.dtype) -> None:
    n, d = shape
    for k in (1, 2):
        lam = autocorrelation_eigvals(clusters(n, d, k, seed=k, dtype=dtype))
        assert lam.shape == (min(n, d),)
        assert int((lam > 0).sum()) == k and (lam >= 0).all()
        assert lam.sum().item() == pytest.approx(1.0, abs=TOL[dtype])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_batched_tall_problems_match_single_calls(dtype: torch.dtype) -> None:
    hs = torch.stack([clusters(2048, 64, k, seed=k, dtype=dtype) for k in (1, 2, 4)])
    out = vne(hs)
    for i, k in enumerate((1, 2, 4)):
        assert abs(out[i].item() - math.log(k)) <= TOL[dtype]
        assert out[i].item() == pytest.approx(vne(hs[i]).item(), abs=TOL[dtype])


def _etf_collapse(num_classes: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    """Features at neural collapse on a simplex-ETF head, balanced classes."""
    g = torch.Generator().manual_seed(seed)
    m = torch.eye(num_classes, dtype=F64) - 1.0 / num_classes
    q = torch.linalg.qr(torch.randn(d, num_classes, generator=g, dtype=F64))[0]
    w = m @ q.mT
    w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    scale = torch.exp(torch.empty(n, 1, dtype=F64).uniform_(-2, 2, generator=g))
    return (w[labels] * scale).to(dtype), (3 * w).to(dtype), labels


def _mir_at_collapse(c: int) -> float:
    return 1 / (c - 1) + (c - 2) * math.log(c - 2) / ((c - 1) * math.log(c - 1))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(("num_classes", "n", "d"),
                         [(3, 6000, 8), (4, 16000, 8), (10, 16000, 16), (3, 600, 1024)])
def test_mir_hdr_at_collapse_exact(num_classes: int, n: int, d: int, dtype: torch.dtype) -> None:
    f, w, y = _etf_collapse(num_classes, n, d, dtype, seed=num_classes)
    out = information_interplay(f, w, y)
    tol = TOL[dtype]
    assert abs(out["mir"].item() - _mir_at_collapse(num_classes)) <= tol
    assert abs(out["hdr"].item()) <= tol
    assert abs(out["h_z"].item() - math.log(num_classes - 1)) <= tol
    assert abs(out["h_w"].item() - math.log(num_classes - 1)) <= tol


def test_gram_matmul_float32_chunks_match_float64_product() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in ((5000, 40), (40, 5000), (3, 1000, 33)):
        x = torch.randn(*shape, generator=g)
        # tall: Gram of the columns; wide: Gram of the rows (chunked over the long side)
        a, b = (x.mT, x) if shape[-2] > shape[-1] else (x, x.mT)
        got = gram_matmul(a, b)
        want = a.double() @ b.double()
        assert got.dtype == F64 and got.shape == want.shape
        scale = want.abs().amax()
        assert ((got - want).abs().amax() / scale).item() < 1e-6
    # a remainder chunk, and the chunks of an explicit spectrum side (4·75 = 300 terms)
    x = torch.randn(1000, 33, generator=g)
    torch.testing.assert_close(gram_matmul(x.mT, x, side=75), x.double().mT @ x.double(),
                               rtol=1e-6, atol=1e-4)
    # sides below 32: one float64 product, exact to float32 rounding of the inputs
    x = torch.randn(3000, 8, generator=g)
    torch.testing.assert_close(gram_matmul(x.mT, x), x.double().mT @ x.double(), rtol=1e-12,
                               atol=1e-12)


def test_gram_matmul_falls_back_to_float64_when_float32_matmuls_are_lowered() -> None:
    assert _utils._float32_matmul_is_ieee("cpu")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 where available
        assert not _utils._float32_matmul_is_ieee("cpu")
        h = clusters(4096, 64, 1, seed=3, dtype=F32, positive=True)
        assert vne(h).item() == 0.0
    finally:
        torch.set_float32_matmul_precision(before)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _utils._float32_matmul_is_ieee("cpu")
        h = clusters(4096, 64, 2, seed=4, dtype=F32)
        assert abs(vne(h).item() - math.log(2)) <= 1e-6


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(2048, 48), (48, 2048)])
def test_float32_gradient_of_chunked_products_matches_float64(shape: tuple[int, int],
                                                              normalize: bool) -> None:
    # 2048 = 10 chunks of 4·48 terms + a remainder of 128: both parts of the chunked product
    g = torch.Generator().manual_seed(1)
    scales = torch.linspace(0.2, 2, shape[1], dtype=F64)
    h64 = torch.randn(*shape, generator=g, dtype=F64) * scales
    h32 = h64.float().requires_grad_()
    (g32,) = torch.autograd.grad(vne(h32, normalize=normalize), h32)
    h64 = h64.requires_grad_()
    (g64,) = torch.autograd.grad(vne(h64, normalize=normalize), h64)
    assert vne(h32.detach(), normalize=normalize).item() == pytest.approx(
        vne(h64.detach(), normalize=normalize).item(), abs=1e-6)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-3 * g64.abs().max().item())


def test_float64_tall_gradcheck() -> None:
    h = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    h.requires_grad_()
    assert torch.autograd.gradcheck(vne, (h,))
    assert torch.autograd.gradcheck(lambda x: vne(x, normalize=False), (h,))
