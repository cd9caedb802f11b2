"""Spectra of representations (lightning_spectral.functional.spectrum).

The quantities are those of docs/definitions.md#conventions, #spectra and #vne.

Every quantity is checked against a value known from theory and against an independent float64
computation (conftest.py's ``ref``: scipy SVD of the normalised rows, numpy covariance).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_spectral.functional._utils import apply_cutoff, entropy_of_spectrum
from lightning_spectral.functional.spectrum import (
    autocorrelation_eigvals,
    condition_number,
    covariance_eigvals,
    effective_rank,
    gram_eigvals,
    normalize_rows,
    spectral_distribution,
    vne,
)

F32 = torch.float32
F64 = torch.float64
EPS32 = float(torch.finfo(F32).eps)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    q, r = torch.linalg.qr(randn(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def isotropic_rows(d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ±q_j of a random orthogonal Q, each with a random non-zero scale.

    Their VNE is log d (docs/definitions.md#vne-values).
    """
    q = orthogonal(d, seed)
    g = gen(seed + 1)
    rows = torch.cat([q, -q, q])  # every direction three times: ZᵀZ = 3·I_d
    scales = torch.exp(torch.empty(3 * d, 1, dtype=F64).uniform_(-6, 6, generator=g))
    signs = torch.where(torch.rand(3 * d, 1, generator=g, dtype=F64) < 0.5, -1.0, 1.0)
    perm = torch.randperm(3 * d, generator=g)
    return (rows * scales * signs)[perm].to(dtype)


# ----------------------------------------------------------------------------------------------
# known values (docs/definitions.md#spectra, #vne-values)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("d", [1, 2, 5, 16, 33])
def test_vne_identity_is_log_d(d: int, dtype: torch.dtype) -> None:
    h = torch.eye(d, dtype=dtype)
    assert vne(h).item() == pytest.approx(math.log(d), abs=1e-6)
    lam = autocorrelation_eigvals(h)
    torch.testing.assert_close(lam, torch.full((d,), 1.0 / d, dtype=dtype))
    assert effective_rank(lam).item() == pytest.approx(d, rel=1e-5)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("d", [2, 7, 24])
def test_vne_rows_of_orthogonal_matrix_any_scales(d: int, dtype: torch.dtype) -> None:
    h = isotropic_rows(d, seed=d, dtype=dtype)
    assert vne(h).item() == pytest.approx(math.log(d), abs=1e-5)
    # d×d side (n = 3d > d) and n×n side (first d rows of a rotated copy, n = d <= d)
    h_square = (orthogonal(d, seed=99) * torch.linspace(1e-3, 1e3, d, dtype=F64)[:, None])
    assert vne(h_square.to(dtype)).item() == pytest.approx(math.log(d), abs=1e-5)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape", [(2, 9), (9, 2), (12, 12), (40, 5), (5, 40), (1, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_rank_one_gives_exactly_zero(shape: tuple[int, int], normalize: bool,
                                     dtype: torch.dtype) -> None:
    n, d = shape
    g = gen(n * 100 + d)
    u = torch.randn(1, d, generator=g, dtype=F64)
    c = torch.randn(n, 1, generator=g, dtype=F64) * 10 ** torch.empty(n, 1, dtype=F64).uniform_(
        -5, 5, generator=g
    )  # parallel and antiparallel rows of wildly different norms
    h = (c * u).to(dtype)
    assert vne(h, normalize=normalize).item() == 0.0
    assert effective_rank(autocorrelation_eigvals(h, normalize=normalize)).item() == 1.0


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("sizes", [(3,), (1, 1), (2, 2, 2), (5, 1, 2), (10, 3, 3, 1)])
def test_orthogonal_clusters(sizes: tuple[int, ...], dtype: torch.dtype, ref) -> None:
    d = 6
    q = orthogonal(d, seed=len(sizes))
    g = gen(sum(sizes))
    rows = []
    for j, n_j in enumerate(sizes):
        scale = torch.exp(torch.empty(n_j, 1, dtype=F64).uniform_(-3, 3, generator=g))
        rows.append(q[j] * scale * torch.where(torch.rand(n_j, 1, generator=g) < 0.5, -1, 1))
    h = torch.cat(rows)[torch.randperm(sum(sizes), generator=g)].to(dtype)
    n = sum(sizes)
    expected = -sum(n_j / n * math.log(n_j / n) for n_j in sizes)
    assert vne(h).item() == pytest.approx(expected, abs=1e-6)
    assert vne(h).item() == pytest.approx(ref.vne(h.double().numpy()), abs=1e-6)
    if len(set(sizes)) == 1:
        assert vne(h).item() == pytest.approx(math.log(len(sizes)), abs=1e-6)
    assert effective_rank(autocorrelation_eigvals(h)).item() == pytest.approx(
        math.exp(expected), rel=1e-5
    )


@pytest.mark.parametrize("dtype", [F32, F64])
def test_degenerate_inputs(dtype: torch.dtype) -> None:
    assert vne(torch.zeros(5, 3, dtype=dtype)).item() == 0.0
    assert vne(torch.zeros(3, 5, dtype=dtype), normalize=False).item() == 0.0
    assert vne(randn(1, 7, seed=1, dtype=dtype)).item() == 0.0
    assert vne(randn(1, 7, seed=1, dtype=dtype), normalize=False).item() == 0.0
    assert vne(randn(4, 1, seed=1, dtype=dtype)).item() == 0.0
    assert autocorrelation_eigvals(torch.zeros(5, 3, dtype=dtype)).tolist() == [0.0] * 3
    # a row of norm below 1e-12 is a zero row (docs/definitions.md#normalisation)
    # (n > d: d×d side, rows normalised explicitly; n <= d: n×n side, norms from the Gram)
    for d in (3, 8):
        base = randn(4, d, seed=2, dtype=dtype)
        tiny = torch.cat([base, torch.full((1, d), 1e-13, dtype=dtype)])
        assert autocorrelation_eigvals(tiny).sum().item() == pytest.approx(4 / 5, rel=1e-6)
        small = torch.cat([base, torch.full((1, d), 1e-11, dtype=dtype)])
        assert autocorrelation_eigvals(small).sum().item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (30, 8)])
def test_zero_rows_do_not_change_vne(shape: tuple[int, int]) -> None:
    h = randn(*shape, seed=3)
    padded = torch.cat([h[:2], torch.zeros(3, shape[1], dtype=F64), h[2:], torch.zeros(1, shape[1],
                                                                                   dtype=F64)])
    assert vne(padded).item() == pytest.approx(vne(h).item(), abs=1e-12)
    lam = autocorrelation_eigvals(padded)
    n, n0 = shape[0], shape[0] + 4
    assert lam.sum().item() == pytest.approx(n / n0, rel=1e-12)  # the trace is diluted ...
    assert effective_rank(lam).item() == pytest.approx(math.exp(vne(h).item()), rel=1e-10)


def test_trace_is_one_and_eigvals_match_both_gram_sides(ref) -> None:
    for n, d in [(5, 17), (17, 5), (9, 9)]:
        h = randn(n, d, seed=n + d)
        lam = autocorrelation_eigvals(h)
        assert lam.shape == (min(n, d),)
        assert lam.sum().item() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(lam.numpy(), ref.autocorr_eigs(h.numpy()), atol=1e-13)
        # the dense d×d autocorrelation of docs/definitions.md#autocorrelation, formed explicitly
        z = h / h.norm(dim=1, keepdim=True)
        dense = torch.linalg.eigvalsh(z.T @ z / n).flip(0)[: min(n, d)]
        torch.testing.assert_close(lam, dense, atol=1e-13, rtol=0)


def test_covariance_known_value_and_reference(ref) -> None:
    # rows ±e1, ±e2: mean 0, HᵀH = 2I, Σ = 2I / (n − 1) = (2/3) I
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=F64)
    torch.testing.assert_close(covariance_eigvals(h), torch.full((2,), 2 / 3, dtype=F64))
    # a shift of every row changes nothing (centred), unlike the autocorrelation
    torch.testing.assert_close(covariance_eigvals(h + 5.0), torch.full((2,), 2 / 3, dtype=F64))
    for n, d in [(3, 8), (20, 6), (7, 7)]:
        x = randn(n, d, seed=n * d) * 3 + 1
        np.testing.assert_allclose(covariance_eigvals(x).numpy(), ref.cov_eigs(x.numpy()),
                                   atol=1e-12)
        got32 = covariance_eigvals(x.float())
        assert got32.dtype == F32
        np.testing.assert_allclose(got32.numpy(), ref.cov_eigs(x.numpy()), atol=2e-4, rtol=1e-4)
    assert torch.isnan(covariance_eigvals(randn(1, 4, seed=0))).all()
    assert covariance_eigvals(randn(1, 4, seed=0)).shape == (1,)
    assert torch.isnan(covariance_eigvals(randn(2, 3, 1, 4, seed=0))).all()


def test_effective_rank_known_values() -> None:
    for k in [1, 2, 3, 7, 50, 257]:
        for dtype in (F32, F64):
            lam = torch.cat([torch.full((k,), 0.37, dtype=dtype), torch.zeros(5, dtype=dtype)])
            assert effective_rank(lam).item() == pytest.approx(k, rel=2e-6)
            perm = lam[torch.randperm(lam.numel(), generator=gen(k))]
            assert effective_rank(perm).item() == pytest.approx(k, rel=2e-6)
    assert effective_rank(torch.zeros(4)).item() == 0.0
    assert effective_rank(torch.tensor([0.0, -1e-9])).item() == 0.0
    assert effective_rank(torch.tensor([1.0, 0.0])).item() == 1.0
    # cutoff (docs/definitions.md#cutoff): 1e-9 <= 1 · 2 · 2^-23 is cut in float32 but not in
    # float64
    assert effective_rank(torch.tensor([1.0, 1e-9])).item() == 1.0
    assert effective_rank(torch.tensor([1.0, 1e-9], dtype=F64)).item() > 1.0
    # p = (1/2, 1/4, 1/4): S = 1.5 log 2
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])).item() == pytest.approx(
        math.exp(1.5 * math.log(2)), rel=1e-6
    )
    # batched, integer and half input (computed in float32)
    out = effective_rank(torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert out.dtype == F32 and out.tolist() == pytest.approx([2.0, 0.0])
    assert effective_rank(torch.ones(3, dtype=torch.float16)).dtype == F32


def test_effective_rank_is_exp_vne_and_matches_reference(ref) -> None:
    for n, d in [(6, 20), (20, 6)]:
        h = randn(n, d, seed=7)
        lam = autocorrelation_eigvals(h)
        assert effective_rank(lam).item() == pytest.approx(math.exp(vne(h).item()), rel=1e-12)
        assert effective_rank(lam).item() == pytest.approx(math.exp(ref.vne(h.numpy())),
                                                           rel=1e-10)


def test_condition_number_cases() -> None:
    assert condition_number(torch.tensor([4.0, 2.0, 1.0])).item() == 4.0
    assert condition_number(torch.tensor([1.0, 4.0, 2.0])).item() == 4.0  # any order
    assert condition_number(torch.tensor([3.0])).item() == 1.0
    assert condition_number(torch.tensor([1.0, 0.0])).item() == math.inf
    assert condition_number(torch.tensor([1.0, -1e-12])).item() == math.inf
    # λ_min <= λ_max · m · ε: infinite in float32 (ε = 2^-23), resolved in float64
    assert condition_number(torch.tensor([1.0, 1e-9])).item() == math.inf
    assert condition_number(torch.tensor([1.0, 1e-9], dtype=F64)).item() == pytest.approx(1e9)
    boundary = 2 * EPS32
    assert condition_number(torch.tensor([1.0, boundary])).item() == math.inf
    assert condition_number(torch.tensor([1.0, 2 * boundary])).item() == pytest.approx(
        1 / (2 * boundary)
    )
    assert math.isnan(condition_number(torch.zeros(3)).item())
    assert math.isnan(condition_number(torch.tensor([-1.0, -2.0])).item())
    assert math.isnan(condition_number(torch.empty(0)).item())
    assert math.isnan(condition_number(torch.tensor([1.0, math.nan])).item())
    assert math.isnan(condition_number(torch.tensor([math.inf, 1.0])).item())
    out = condition_number(torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    assert out[0].item() == 2.0 and math.isnan(out[1].item())


def test_condition_number_matches_numpy_cond() -> None:
    h = randn(30, 5, seed=11)
    lam = covariance_eigvals(h)
    cov = np.cov(h.numpy(), rowvar=False)
    assert condition_number(lam).item() == pytest.approx(np.linalg.cond(cov), rel=1e-10)


def test_spectral_distribution() -> None:
    p = spectral_distribution(torch.tensor([3.0, 1.0, 0.0, -1e-9]))
    assert p.tolist() == [0.75, 0.25, 0.0, 0.0]
    assert spectral_distribution(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert torch.isnan(spectral_distribution(torch.tensor([1.0, math.nan]))).all()
    h = randn(8, 5, seed=4)
    torch.testing.assert_close(
        spectral_distribution(autocorrelation_eigvals(h, normalize=False)),
        autocorrelation_eigvals(h, normalize=False) / autocorrelation_eigvals(h, normalize=False)
        .sum(),
    )


def test_normalize_rows() -> None:
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0], [math.nan, 1.0], [-2e-6, 0.0]])
    z = normalize_rows(h)
    assert z[0].tolist() == pytest.approx([0.6, 0.8])
    assert z[1].tolist() == [0.0, 0.0]
    assert z[2].tolist() == [0.0, 0.0]
    assert torch.isnan(z[3]).all()
    assert z[4].tolist() == [-1.0, 0.0]


def test_vne_without_normalisation_matches_reference(ref) -> None:
    for n, d in [(5, 12), (12, 5)]:
        h = randn(n, d, seed=n) * torch.logspace(-2, 2, n, dtype=F64)[:, None]
        assert vne(h, normalize=False).item() == pytest.approx(ref.vne(h.numpy(), False),
                                                               abs=1e-12)
        # row rescaling changes the unnormalised VNE (so the option really is honoured)
        assert abs(vne(h, normalize=False).item() - vne(h).item()) > 1e-3
        lam = autocorrelation_eigvals(h, normalize=False)
        np.testing.assert_allclose(lam.numpy(), ref.autocorr_eigs(h.numpy(), False),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gram_eigvals(h, 1.0 / n), lam)


# ----------------------------------------------------------------------------------------------
# agreement with float64 references on random inputs, both Gram sides, batched


@pytest.mark.parametrize("shape", [(8, 40), (40, 8), (16, 16), (1, 5), (5, 1)])
def test_agreement_with_float64_reference(shape: tuple[int, int], ref) -> None:
    n, d = shape
    h = randn(n, d, seed=n * 31 + d) * 10 ** torch.empty(n, 1, dtype=F64).uniform_(
        -4, 4, generator=gen(1)
    )
    want = ref.autocorr_eigs(h.numpy())
    np.testing.assert_allclose(autocorrelation_eigvals(h).numpy(), want, atol=1e-13)
    assert vne(h).item() == pytest.approx(ref.vne(h.numpy()), abs=1e-11)
    # float32 (the default for float32 input, and on request via dtype for float64 input)
    got32 = autocorrelation_eigvals(h.float())
    assert got32.dtype == F32
    np.testing.assert_allclose(got32.numpy(), want, atol=3e-6)
    assert vne(h, dtype="float32").dtype == F32
    assert vne(h.float()).item() == pytest.approx(ref.vne(h.numpy()), abs=5e-5)


def test_batched_equals_loop() -> None:
    for n, d in [(6, 11), (11, 6)]:
        h = randn(2, 3, n, d, seed=n)
        h[0, 1, 2] = 0.0  # a zero row in one problem
        for fn in (autocorrelation_eigvals, covariance_eigvals, vne,
                   lambda x: autocorrelation_eigvals(x, normalize=False),
                   lambda x: vne(x, normalize=False)):
            batched = fn(h)
            assert batched.shape[:2] == (2, 3)
            for i in range(2):
                for j in range(3):
                    torch.testing.assert_close(batched[i, j], fn(h[i, j]), atol=1e-13, rtol=0)
        lam = autocorrelation_eigvals(h)
        loop = torch.stack([effective_rank(lam[i, j]) for i in range(2) for j in range(3)])
        torch.testing.assert_close(effective_rank(lam).reshape(-1), loop)
        loop = torch.stack([condition_number(lam[i, j]) for i in range(2) for j in range(3)])
        torch.testing.assert_close(condition_number(lam).reshape(-1), loop)


def test_nonfinite_problem_in_batch_leaves_others_intact() -> None:
    for n, d in [(5, 9), (9, 5)]:
        h = randn(4, n, d, seed=2)
        h[1, 0, 0] = math.nan
        h[2, 3, 1] = math.inf
        h[3, 2, 2] = -math.inf
        for fn in (autocorrelation_eigvals, covariance_eigvals, vne,
                   lambda x: vne(x, normalize=False)):
            out = fn(h)
            assert torch.isfinite(out[0]).all()
            torch.testing.assert_close(out[0], fn(h[0]))
            assert torch.isnan(out[1:]).all()


def test_nonfinite_inputs_give_nan_without_raising(ref) -> None:
    bad = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [1.0, 1.0]])
    assert math.isnan(vne(bad).item())
    assert torch.isnan(autocorrelation_eigvals(bad)).all()
    assert torch.isnan(covariance_eigvals(bad)).all()
    # a huge finite row whose norm overflows in float32 is reported, not silently dropped
    huge = torch.tensor([[1e30, 1e30], [1.0, 0.0], [0.0, 1.0]])
    assert math.isnan(vne(huge).item())
    assert math.isnan(vne(huge.T.contiguous()).item())  # the n×n side too
    assert vne(huge.double()).item() == pytest.approx(ref.vne(huge.double().numpy()), abs=1e-12)
    for x in (torch.tensor([1.0, math.nan]), torch.tensor([1.0, math.inf])):
        assert math.isnan(effective_rank(x).item())
        assert math.isnan(entropy_of_spectrum(apply_cutoff(x)).item())
        assert math.isnan(condition_number(x).item())
        assert torch.isnan(spectral_distribution(x)).all()


# ----------------------------------------------------------------------------------------------
# invariances (docs/definitions.md#invariances): row permutation, orthogonal rotation, row
# rescaling


@pytest.mark.parametrize("shape", [(7, 12), (12, 7)])
def test_invariances(shape: tuple[int, int]) -> None:
    n, d = shape
    h = randn(n, d, seed=5)
    perm = torch.randperm(n, generator=gen(6))
    q = orthogonal(d, seed=7)
    scale = torch.exp(randn(n, 1, seed=8) * 3) * torch.where(randn(n, 1, seed=9) < 0, -1.0, 1.0)
    for fn in (autocorrelation_eigvals, covariance_eigvals,
               lambda x: autocorrelation_eigvals(x, normalize=False)):
        base = fn(h)
        torch.testing.assert_close(fn(h[perm]), base, atol=1e-12, rtol=0)
        torch.testing.assert_close(fn(h @ q), base, atol=1e-12, rtol=0)
    base = vne(h)
    for variant in (h[perm], h @ q, h * scale, (h * scale)[perm] @ q):
        assert vne(variant).item() == pytest.approx(base.item(), abs=1e-12)
        torch.testing.assert_close(autocorrelation_eigvals(variant), autocorrelation_eigvals(h),
                                   atol=1e-12, rtol=0)
    # the unnormalised quantities are not scale invariant (the test can tell them apart)
    assert abs(vne(h * scale, normalize=False).item() - vne(h, normalize=False).item()) > 1e-3


# ----------------------------------------------------------------------------------------------
# hypothesis fuzz: shapes, scales 1e-6…1e6, rank-deficient and degenerate inputs


@st.composite
def representations(draw) -> tuple[torch.Tensor, int]:
    """``(h, rank bound)`` with rows of random scales; kinds generic/low-rank/zeros/duplicates."""
    n = draw(st.integers(1, 24))
    d = draw(st.integers(1, 24))
    kind = draw(st.sampled_from(["generic", "low_rank", "zero_rows", "duplicates", "zeros"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = gen(seed)
    if kind == "low_rank":
        r = draw(st.integers(1, max(1, min(n, d) - 1)))
        h = torch.randn(n, r, generator=g, dtype=F64) @ torch.randn(r, d, generator=g, dtype=F64)
    else:
        h = torch.randn(n, d, generator=g, dtype=F64)
    if kind == "zero_rows":
        h[torch.rand(n, generator=g) < 0.5] = 0.0
    if kind == "duplicates":
        h = h[torch.randint(0, max(1, n // 2), (n,), generator=g)]
    if kind == "zeros":
        h = torch.zeros(n, d, dtype=F64)
    exps = torch.empty(n, 1, dtype=F64).uniform_(-6, 6, generator=g)
    h = h * 10**exps
    rank = int(torch.linalg.matrix_rank(h).item()) if h.abs().sum() > 0 else 0
    return h, rank


@FUZZ
@given(data=representations(), dtype=st.sampled_from([F32, F64]))
def test_fuzz_invariants(data: tuple[torch.Tensor, int], dtype: torch.dtype) -> None:
    h64, rank = data
    h = h64.to(dtype)
    n, d = h.shape
    m = min(n, d)
    tol = 1e-4 if dtype == F32 else 1e-10
    lam = autocorrelation_eigvals(h)
    assert lam.dtype == dtype and lam.shape == (m,)
    assert torch.isfinite(lam).all()
    assert (lam[:-1] >= lam[1:]).all()  # descending
    assert lam.min().item() >= -tol
    nonzero_rows = int((torch.linalg.vector_norm(h, dim=1) >= 1e-12).sum())
    assert lam.sum().item() == pytest.approx(nonzero_rows / n, abs=tol)  # trace
    v = vne(h).item()
    assert math.isfinite(v)
    assert -tol <= v <= math.log(m) + tol
    if rank >= 1:
        assert v <= math.log(rank) + 10 * tol
    else:
        assert v == 0.0
    er = effective_rank(lam).item()
    if nonzero_rows:
        # erank = exp(VNE) (docs/definitions.md#erank)
        assert er == pytest.approx(math.exp(v), rel=1e-5)
        assert 1.0 - tol <= er <= m + tol
    else:
        assert er == 0.0  # zero mass [convention], while VNE = 0
    p = spectral_distribution(lam)
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert p.sum().item() == pytest.approx(1.0 if nonzero_rows else 0.0, abs=tol)
    kappa = condition_number(lam).item()
    assert math.isnan(kappa) if nonzero_rows == 0 else kappa >= 1.0
    raw = autocorrelation_eigvals(h, normalize=False)
    assert raw.shape == (m,) and torch.isfinite(raw).all()
    cov = covariance_eigvals(h)
    assert cov.shape == (m,)
    assert torch.isfinite(cov).all() if n >= 2 else torch.isnan(cov).all()
    # vs the float64 reference computed by another method
    assert v == pytest.approx(_ref_vne(h64), abs=2e-3 if dtype == F32 else 1e-8)


def _ref_vne(h: torch.Tensor) -> float:
    import scipy.linalg

    z = h.numpy()
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.where(norm < 1e-12, 0.0, z / np.where(norm < 1e-12, 1.0, norm))
    lam = scipy.linalg.svdvals(z) ** 2
    if lam.size == 0 or lam.max() == 0:
        return 0.0
    lam = lam[lam > lam.max() * lam.size * 2.0**-52]
    p = lam / lam.sum()
    return float(-(p * np.log(p)).sum())


@FUZZ
@given(
    n=st.integers(1, 20), d=st.integers(1, 20), batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_batched_equals_loop(n: int, d: int, batch: int, seed: int) -> None:
    h = torch.randn(batch, n, d, generator=gen(seed), dtype=F64)
    h[0, 0] = 0.0
    out = vne(h)
    lam = autocorrelation_eigvals(h)
    for b in range(batch):
        assert out[b].item() == pytest.approx(vne(h[b]).item(), abs=1e-12)
        torch.testing.assert_close(lam[b], autocorrelation_eigvals(h[b]), atol=1e-13, rtol=0)


@FUZZ
@given(lam=st.lists(st.floats(0, 1e6, allow_subnormal=False), min_size=1, max_size=30))
def test_fuzz_effective_rank_bounds(lam: list[float]) -> None:
    x = torch.tensor(lam, dtype=F64)
    er = effective_rank(x).item()
    kept = int((x > x.max() * x.numel() * 2.0**-52).sum()) if x.max() > 0 else 0
    if kept == 0:
        assert er == 0.0
    else:
        assert 1.0 - 1e-12 <= er <= kept * (1 + 1e-12)


# ----------------------------------------------------------------------------------------------
# gradients (docs/definitions.md#vne-gradient)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (5, 5)])
@pytest.mark.parametrize("normalize", [True, False])
def test_vne_gradcheck_generic(shape: tuple[int, int], normalize: bool) -> None:
    h = randn(*shape, seed=sum(shape)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: vne(x, normalize=normalize), (h,))
    assert torch.autograd.gradgradcheck(lambda x: vne(x, normalize=normalize), (h,))


def test_vne_gradcheck_batched() -> None:
    h = randn(2, 3, 5, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: vne(x).sum(), (h,))


def test_vne_gradient_with_repeated_eigenvalues() -> None:
    q = orthogonal(4, seed=12)
    # rows q1, q1, q2, q2, q3, q4 (random scales): spectrum (2, 2, 1, 1)/6, two repeated pairs
    h = torch.stack([q[0], 2 * q[0], -q[1], 3 * q[1], q[2], -0.5 * q[3]])
    lam = autocorrelation_eigvals(h)
    torch.testing.assert_close(lam, torch.tensor([2, 2, 1, 1], dtype=F64) / 6)
    h.requires_grad_()
    (grad,) = torch.autograd.grad(vne(h), h)
    assert torch.isfinite(grad).all()
    assert torch.autograd.gradcheck(vne, (h,))
    # fully degenerate: isotropic rows, the maximum of VNE, gradient zero
    iso = isotropic_rows(5, seed=3, dtype=F64).requires_grad_()
    (grad,) = torch.autograd.grad(vne(iso), iso)
    assert torch.isfinite(grad).all()
    assert grad.abs().max().item() < 1e-8
    assert torch.autograd.gradcheck(vne, (iso,))


def test_vne_gradient_at_rank_deficient_input_is_finite() -> None:
    # rank one: every eigenvalue but one is cut (zero value, zero gradient). A generic
    # perturbation raises the rank, where VNE has infinite slope, so finite differences are
    # undefined there; along a rank-preserving direction (rescaling row i) VNE is constant, so
    # the directional derivative Σ_j ∂VNE/∂h_ij · h_ij must vanish
    h = (randn(5, 1, seed=1) @ randn(1, 7, seed=2)).requires_grad_()
    (grad,) = torch.autograd.grad(vne(h), h)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close((grad * h).sum(dim=1), torch.zeros(5, dtype=F64), atol=1e-10,
                               rtol=0)


@pytest.mark.parametrize("shape", [(5, 4), (3, 6)])  # with 2 zero rows: d×d side, n×n side
@pytest.mark.parametrize("normalize", [True, False])
def test_vne_gradient_with_zero_rows(shape: tuple[int, int], normalize: bool) -> None:
    h = randn(*shape, seed=21)
    zeros = torch.zeros(2, shape[1], dtype=F64)
    full = torch.cat([h[:2], zeros, h[2:]]).requires_grad_()
    (grad,) = torch.autograd.grad(vne(full, normalize=normalize), full)
    assert torch.isfinite(grad).all()
    if normalize:
        assert (grad[2:4] == 0).all()

    def padded(x: torch.Tensor) -> torch.Tensor:
        return vne(torch.cat([x[:2], zeros, x[2:]]), normalize=normalize)

    assert torch.autograd.gradcheck(padded, (h.clone().requires_grad_(),))
    # the zero rows change nothing (the trace renormalisation also absorbs the 1/n of the
    # unnormalised form): same value and same gradient on the other rows
    plain = h.clone().requires_grad_()
    value = vne(plain, normalize=normalize)
    (grad_h,) = torch.autograd.grad(value, plain)
    assert value.item() == pytest.approx(vne(full, normalize=normalize).item(), abs=1e-12)
    torch.testing.assert_close(torch.cat([grad[:2], grad[4:]]), grad_h)


def test_vne_gradient_all_zero_rows() -> None:
    # all rows zero: value 0 and a finite (zero) gradient, the penalty stays usable
    z = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(vne(z), z)
    assert (grad == 0).all()


def test_vne_matches_entropy_gradient_formula() -> None:
    # ∂S/∂p_i = −(log p_i + 1) on the support (docs/definitions.md#vne-gradient). Through p = λ/Σλ
    # the gradient in λ is (−log p_i − S)/Σλ: it differs from −(log p_i + 1) only along the normal
    # (1, …, 1) of the simplex, so both agree on every trace-preserving direction.
    lam = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(entropy_of_spectrum(apply_cutoff(lam)), lam)
    p = lam.detach()[:3]
    s = -(p * p.log()).sum()
    torch.testing.assert_close(grad[:3], -p.log() - s)
    spec = -(p.log() + 1)
    tangent = torch.tensor([1.0, -2.0, 1.0], dtype=F64)
    torch.testing.assert_close((grad[:3] * tangent).sum(), (spec * tangent).sum())
    # without the cutoff, a zero entry: the value and the gradient of p log p at p = 0 are 0
    # (docs/definitions.md#entropy), so only the normalisation acts on it: ∂S/∂λ_4 = (1 − S)/Σλ,
    # finite
    (raw,) = torch.autograd.grad(entropy_of_spectrum(lam), lam)
    torch.testing.assert_close(raw[:3], grad[:3])
    assert raw[3].item() == pytest.approx(1 - s.item(), abs=1e-12)
    lam2 = (lam.detach() * 3).requires_grad_()  # scale: gradient scales by 1/Σλ
    (grad2,) = torch.autograd.grad(entropy_of_spectrum(apply_cutoff(lam2)), lam2)
    torch.testing.assert_close(grad2, grad / 3)
    assert grad[3].item() == 0.0


# ----------------------------------------------------------------------------------------------
# validation, dtype, device, no host sync


def test_shape_errors_name_got_and_wanted() -> None:
    for fn in (autocorrelation_eigvals, covariance_eigvals, vne):
        with pytest.raises(ValueError, match=r"h must have shape \(\.\.\., n, d\), got shape "
                                             r"\(5,\)"):
            fn(torch.ones(5))
    with pytest.raises(ValueError, match=r"\(\.\.\., m\), got shape \(\)"):
        effective_rank(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        condition_number(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vne(np.ones((3, 3)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float32 or .*float64"):
        vne(torch.ones(3, 3), dtype=torch.float16)
    with pytest.raises(ValueError, match="'float32' or 'float64'"):
        vne(torch.ones(3, 3), dtype="half")


def test_dtypes() -> None:
    h = randn(6, 4, seed=0)
    assert autocorrelation_eigvals(h).dtype == F64  # float64 input stays float64
    assert autocorrelation_eigvals(h.float()).dtype == F32  # default float32
    assert autocorrelation_eigvals(h.half()).dtype == F32  # never half precision
    assert autocorrelation_eigvals(h.bfloat16()).dtype == F32
    assert autocorrelation_eigvals(torch.ones(3, 2, dtype=torch.int64)).dtype == F32
    assert vne(h.float(), dtype=torch.float64).dtype == F64
    assert vne(h.float(), dtype="float64").dtype == F64
    assert covariance_eigvals(h, dtype="float32").dtype == F32
    assert vne(h.half()).item() == pytest.approx(vne(h).item(), abs=5e-3)


def test_meta_device_and_no_host_sync() -> None:
    # on "meta" any host synchronisation (.item(), bool(tensor), data-dependent branching)
    # raises, so running there proves the functions are sync-free and stay on the input device
    for shape in [(3, 8, 20), (3, 20, 8)]:
        h = torch.empty(*shape, device="meta")
        for fn in (autocorrelation_eigvals, covariance_eigvals,
                   lambda x: autocorrelation_eigvals(x, normalize=False)):
            out = fn(h)
            assert out.device.type == "meta" and out.shape == (3, 8)
        lam = autocorrelation_eigvals(h)
        for out in (vne(h), vne(h, normalize=False), effective_rank(lam), condition_number(lam)):
            assert out.device.type == "meta" and out.shape == (3,)
        assert spectral_distribution(lam).shape == (3, 8)


def test_empty_inputs() -> None:
    assert autocorrelation_eigvals(torch.empty(0, 4)).shape == (0,)
    assert autocorrelation_eigvals(torch.empty(2, 0, 4)).shape == (2, 0)
    assert math.isnan(vne(torch.empty(0, 3)).item())
    assert effective_rank(torch.empty(0)).item() == 0.0
