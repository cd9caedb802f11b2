"""Layer matrix decomposition of weights (docs/definitions.md#weights).

(lightning_spectral.functional.weights, and stable_rank from spectrum.) Known values from
docs/definitions.md plus agreement with a dense float64 numpy SVD and its explicit rank-k
truncation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_spectral.functional.spectrum import effective_rank, stable_rank, vne
from lightning_spectral.functional.weights import (
    eckart_young_error,
    singular_values,
    singular_values_many,
    truncation_rank,
    weight_matrix,
)

F32 = torch.float32
F64 = torch.float64
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# reshape (docs/definitions.md#weight-matrix) and singular values (#singular-spectrum)


def test_weight_matrix_reshape_and_errors() -> None:
    w = randn(8, 3, 5, 5)
    assert weight_matrix(w).shape == (8, 75)
    torch.testing.assert_close(weight_matrix(w)[2], w[2].reshape(-1))
    assert weight_matrix(randn(4, 6)).shape == (4, 6)
    assert weight_matrix(randn(4, 2, 3)).shape == (4, 6)  # Conv1d
    with pytest.raises(ValueError, match=r"\(out, in\).*got shape \(5,\)"):
        weight_matrix(torch.ones(5))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        singular_values(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        singular_values(np.ones((2, 2)))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7), (8, 3, 3, 3), (4, 16, 3, 3), (1, 5)])
def test_singular_values_match_numpy(shape: tuple[int, ...]) -> None:
    w = randn(*shape, seed=sum(shape))
    want = np.linalg.svd(w.numpy().reshape(shape[0], -1), compute_uv=False)
    s = singular_values(w)
    assert s.dtype == F64 and s.shape == (min(shape[0], math.prod(shape[1:])),)
    np.testing.assert_allclose(s.numpy(), want, rtol=1e-12, atol=1e-12)
    s32 = singular_values(w.float())
    assert s32.dtype == F32
    np.testing.assert_allclose(s32.numpy(), want, rtol=1e-5, atol=1e-5)
    assert singular_values(w.float(), dtype="float64").dtype == F64
    assert singular_values(w.half()).dtype == F32
    assert (s[:-1] >= s[1:]).all()


def test_singular_values_known_and_invariant() -> None:
    q1 = torch.linalg.qr(randn(5, 5, seed=1))[0]
    q2 = torch.linalg.qr(randn(7, 7, seed=2))[0]
    sigma = torch.tensor([4.0, 3.0, 1.0, 0.5, 0.0], dtype=F64)
    w = q1 @ torch.cat([torch.diag(sigma), torch.zeros(5, 2, dtype=F64)], dim=1) @ q2
    torch.testing.assert_close(singular_values(w), sigma, atol=1e-12, rtol=0)
    # invariant to orthogonal changes of input/output basis and to permuting rows
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(singular_values(w[perm] @ q2.T), sigma, atol=1e-12, rtol=0)


def test_singular_values_nonfinite_and_differentiable() -> None:
    w = randn(4, 6, seed=4)
    w[1, 2] = math.nan
    assert torch.isnan(singular_values(w)).all()
    w[1, 2] = math.inf
    assert torch.isnan(singular_values(w)).all()
    x = randn(4, 6, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: singular_values(t).sum(), (x,))


def test_singular_values_many_groups_and_order() -> None:
    ws = [randn(6, 4, seed=1), randn(3, 2, 2, 2, seed=2), randn(6, 4, seed=3),
          randn(6, 4, seed=4).float(), randn(5, 9, seed=5)]
    ws[2][0, 0] = math.nan  # one bad weight in a stacked group
    out = singular_values_many(ws)
    assert len(out) == len(ws)
    for w, s in zip(ws, out, strict=True):
        want = singular_values(w)
        assert s.shape == want.shape and s.dtype == want.dtype
        torch.testing.assert_close(s, want, equal_nan=True)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[0]).all()
    assert all(s.dtype == F64 for s in singular_values_many(ws, dtype="float64"))
    assert singular_values_many([]) == []
    # detached: usable from a monitor without keeping graphs alive
    x = randn(3, 3, seed=6).requires_grad_()
    assert not singular_values_many([x])[0].requires_grad


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (16, 3, 3, 3), (1, 7), (40, 40)])
def test_gram_method_is_at_least_as_accurate_as_a_float32_svd(shape: tuple[int, ...]) -> None:
    """``method="gram"`` (float64 Gram, float32 result) against float64 ``svdvals``: no further
    from the reference than the float32 SVD, including a rank-deficient weight (zeros stay
    at round-off level) and a singular value spread of 1e6."""
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g, dtype=F64)
    mat = w.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    spread = torch.logspace(0, -6, s.numel(), dtype=F64)
    if s.numel() >= 4:
        spread[-(s.numel() // 4):] = 0.0  # rank deficient
    mat = (u * spread) @ vh
    ref = torch.linalg.svdvals(mat)
    (gram,) = singular_values_many([mat.reshape(shape).float()], method="gram")
    (svd,) = singular_values_many([mat.reshape(shape).float()], method="svd")
    assert gram.dtype == F32 and gram.shape == ref.shape
    assert bool((gram[:-1] >= gram[1:]).all())  # descending
    err_gram = float((gram.double() - ref).abs().max() / ref[0])
    err_svd = float((svd.double() - ref).abs().max() / ref[0])
    # the float32 rounding of the input bounds both; the Gram route adds at most √(m ε₆₄)
    assert err_gram <= max(err_svd, 1e-7) + math.sqrt(min(mat.shape) * 2.0**-52), (err_gram,
                                                                                    err_svd)
    torch.testing.assert_close(gram, svd, rtol=0.0, atol=1e-5 * float(ref[0]))


def test_gram_method_nonfinite_zero_and_float64() -> None:
    bad = torch.ones(4, 6)
    bad[1, 2] = math.inf
    zero = torch.zeros(3, 5)
    out = singular_values_many([bad, zero, torch.ones(4, 6)], method="gram")
    assert torch.isnan(out[0]).all() and out[0].shape == (4,)
    assert torch.equal(out[1], torch.zeros(3))
    torch.testing.assert_close(out[2], torch.tensor([24.0**0.5, 0, 0, 0]), rtol=0, atol=1e-6)
    # a float64 working precision keeps the SVD (no squaring of float64 values)
    w = randn(5, 7, seed=3)
    (s64,) = singular_values_many([w], dtype="float64", method="gram")
    assert torch.equal(s64, singular_values(w, dtype="float64"))
    with pytest.raises(ValueError, match="method"):
        singular_values_many([w], method="qr")  # type: ignore[arg-type]


def test_meta_device() -> None:
    w = torch.empty(8, 3, 3, 3, device="meta")
    assert singular_values(w).device.type == "meta"
    assert singular_values(w).shape == (8,)
    assert singular_values_many([w, w])[1].shape == (8,)
    assert stable_rank(w).device.type == "meta"
    s = torch.empty(5, device="meta")
    assert truncation_rank(s).device.type == "meta"
    assert eckart_young_error(s, 2, relative=True).device.type == "meta"


# ----------------------------------------------------------------------------------------------
# stable rank (docs/definitions.md#stable-rank) and effective rank of σ² (#erank)


def test_stable_rank_known_values() -> None:
    q = torch.linalg.qr(randn(4, 4, seed=1))[0]
    assert stable_rank(q).item() == pytest.approx(4.0, rel=1e-12)  # orthogonal: rank
    assert stable_rank(torch.diag(torch.tensor([3.0, 1.0, 1.0, 0.0]))).item() == pytest.approx(
        11 / 9, rel=1e-6
    )
    rank_one = randn(5, 1, seed=2) @ randn(1, 7, seed=3)
    assert stable_rank(rank_one).item() == pytest.approx(1.0, rel=1e-12)
    assert math.isnan(stable_rank(torch.zeros(3, 4)).item())
    bad = randn(3, 4, seed=4)
    bad[0, 0] = math.nan
    assert math.isnan(stable_rank(bad).item())
    assert stable_rank(randn(4, 5, seed=1).float()).dtype == F32


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 2, 3, 3)])
def test_stable_rank_matches_numpy_and_range(shape: tuple[int, ...]) -> None:
    w = randn(*shape, seed=7)
    mat = w.numpy().reshape(shape[0], -1)
    want = np.linalg.norm(mat, "fro") ** 2 / np.linalg.norm(mat, 2) ** 2
    got = stable_rank(w).item()
    assert got == pytest.approx(want, rel=1e-12)
    assert 1.0 <= got <= np.linalg.matrix_rank(mat)


def test_effective_rank_of_squared_singular_values_is_exp_vne() -> None:
    # docs/definitions.md#erank: erank of a weight uses σ², so that it equals exp(VNE) of the rows
    # read as a representation without normalisation (the spectrum of WᵀW/n is σ²/n)
    for shape in [(6, 10), (10, 6)]:
        w = randn(*shape, seed=8)
        er = effective_rank(singular_values(w).square()).item()
        assert er == pytest.approx(math.exp(vne(w, normalize=False).item()), rel=1e-10)
        s2 = np.linalg.svd(w.numpy(), compute_uv=False) ** 2
        p = s2 / s2.sum()
        assert er == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    # k equal singular values: erank k
    assert effective_rank(singular_values(3 * torch.eye(5)).square()).item() == pytest.approx(5)


# ----------------------------------------------------------------------------------------------
# truncation rank (docs/definitions.md#capacity)


def test_truncation_rank_spec_example() -> None:
    s = torch.tensor([2.0, 1.0, 1.0])
    assert truncation_rank(s, 2 / 3).item() == 1
    assert truncation_rank(s, 0.7).item() == 2
    assert truncation_rank(s, 1.0).item() == 3
    assert truncation_rank(s).item() == 3  # τ = 0.9 default: 5/6 < 0.9
    assert truncation_rank(s, 0.5).item() == 1
    assert truncation_rank(s, 5 / 6).item() == 2
    assert truncation_rank(torch.tensor([1.0, 2.0, 1.0]), 2 / 3).item() == 1  # any order
    assert truncation_rank(torch.tensor([2.0, -1.0, 1.0]), 0.7).item() == 2  # |σ|
    assert truncation_rank(s.double(), 0.7).dtype == F64
    assert truncation_rank(torch.tensor([2, 1, 1]), 0.7).dtype == F32


def test_truncation_rank_degenerate() -> None:
    assert truncation_rank(torch.zeros(4)).item() == 0
    assert truncation_rank(torch.empty(0)).item() == 0
    assert math.isnan(truncation_rank(torch.tensor([1.0, math.nan])).item())
    assert math.isnan(truncation_rank(torch.tensor([1.0, math.inf])).item())
    out = truncation_rank(torch.tensor([[2.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), 0.7)
    assert out.tolist() == [2.0, 0.0, 3.0]
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"energy must lie in \(0, 1\]"):
            truncation_rank(torch.ones(3), bad)
    with pytest.raises(ValueError, match=r"\(\.\.\., r\), got shape \(\)"):
        truncation_rank(torch.tensor(1.0))


def test_truncation_rank_at_exact_energy_fractions() -> None:
    # τ = (energy of the first k values) / (total energy) must give exactly k, although
    # float(τ) · total often rounds above the partial sum; the r·ε slack absorbs that
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        r = int(torch.randint(2, 12, (1,), generator=g))
        dtype = F32 if trial % 2 else F64
        s = (torch.rand(r, generator=g, dtype=F64) * 3 + 0.1).to(dtype)
        cum = s.double().sort(descending=True).values.square().cumsum(0)
        for k in range(1, r + 1):
            tau = (cum[k - 1] / cum[-1]).item()
            assert truncation_rank(s, tau).item() == k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    s=st.lists(st.floats(0, 1e3, allow_subnormal=False), min_size=1, max_size=20),
    tau=st.floats(0.01, 1.0),
)
def test_fuzz_truncation_rank_is_minimal(s: list[float], tau: float) -> None:
    x = torch.tensor(s, dtype=F64)
    k = int(truncation_rank(x, tau).item())
    s2 = np.sort(np.square(np.asarray(s, dtype=np.float64)))[::-1]
    total = s2.sum()
    if total == 0:
        assert k == 0
        return
    cum = np.cumsum(s2)
    slack = 1e-12 * total
    assert 1 <= k <= len(s)
    assert cum[k - 1] >= tau * total - slack  # k memories carry a fraction τ
    if k > 1:
        assert cum[k - 2] < tau * total + slack  # and k − 1 do not


# ----------------------------------------------------------------------------------------------
# Eckart–Young–Mirsky (docs/definitions.md#eckart-young)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (5, 2, 2, 2)])
def test_eckart_young_error_equals_truncation_residual(shape: tuple[int, ...], ref) -> None:
    w = randn(*shape, seed=11)
    mat = w.numpy().reshape(shape[0], -1)
    s = singular_values(w)
    r = s.numel()
    fro = np.linalg.norm(mat, "fro")
    for k in range(r + 2):
        residual = mat - ref.best_rank_k(mat, k)
        want_fro = np.linalg.norm(residual, "fro")
        assert eckart_young_error(s, k).item() == pytest.approx(want_fro, rel=1e-10, abs=1e-12)
        assert eckart_young_error(s, k, relative=True).item() == pytest.approx(
            want_fro / fro, rel=1e-10, abs=1e-12
        )
        # spectral-norm error of the truncation is σ_{k+1} (0 once k >= r)
        want_2 = np.linalg.norm(residual, 2)
        assert (s[k].item() if k < r else 0.0) == pytest.approx(want_2, rel=1e-10, abs=1e-12)
    # W_k is optimal: a random rank-k matrix does no better (checked at k = 2)
    g = np.random.default_rng(0)
    for _ in range(5):
        b = g.standard_normal((mat.shape[0], 2)) @ g.standard_normal((2, mat.shape[1]))
        assert np.linalg.norm(mat - b, "fro") >= eckart_young_error(s, 2).item()


def test_eckart_young_error_known_and_validation() -> None:
    s = torch.tensor([2.0, 1.0, 1.0])
    assert eckart_young_error(s, 0).item() == pytest.approx(math.sqrt(6))
    assert eckart_young_error(s, 1).item() == pytest.approx(math.sqrt(2))
    assert eckart_young_error(s, 1, relative=True).item() == pytest.approx(math.sqrt(2 / 6))
    assert eckart_young_error(s, 3).item() == 0.0
    assert eckart_young_error(torch.tensor([1.0, 2.0, 1.0]), 1).item() == pytest.approx(
        math.sqrt(2)
    )  # any order
    assert eckart_young_error(torch.zeros(3), 1).item() == 0.0
    assert math.isnan(eckart_young_error(torch.zeros(3), 1, relative=True).item())
    assert math.isnan(eckart_young_error(torch.tensor([1.0, math.nan]), 0).item())
    assert eckart_young_error(s, np.int64(1)).item() == pytest.approx(math.sqrt(2))
    batched = eckart_young_error(torch.tensor([[2.0, 1.0, 1.0], [3.0, 4.0, 0.0]]), 1)
    assert batched.tolist() == pytest.approx([math.sqrt(2), 3.0])
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="non-negative integer"):
            eckart_young_error(s, bad)  # type: ignore[arg-type]


@FUZZ
@given(
    out=st.integers(1, 12), inp=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["generic", "rank_one", "zeros", "duplicate_rows"]),
    exponent=st.floats(-6, 6), dtype=st.sampled_from([F32, F64]),
)
def test_fuzz_weight_invariants(out: int, inp: int, seed: int, kind: str, exponent: float,
                                dtype: torch.dtype) -> None:
    w = randn(out, inp, seed=seed)
    if kind == "rank_one":
        w = w[:, :1] @ w[:1, :]
    elif kind == "zeros":
        w = torch.zeros(out, inp, dtype=F64)
    elif kind == "duplicate_rows":
        w = w[torch.zeros(out, dtype=torch.long)]
    w = (w * 10**exponent).to(dtype)
    s = singular_values(w)
    r = min(out, inp)
    assert s.shape == (r,) and s.dtype == dtype
    assert torch.isfinite(s).all() and (s >= 0).all() and (s[:-1] >= s[1:]).all()
    want = np.linalg.svd(w.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(s.double().numpy(), want, rtol=0,
                               atol=(1e-5 if dtype == F32 else 1e-12) * max(want.max(), 1e-300))
    k = int(truncation_rank(s, 0.9).item())
    sr = stable_rank(w).item()
    er = effective_rank(s.square()).item()
    if kind == "zeros":
        assert k == 0 and math.isnan(sr) and er == 0.0
        return
    assert 1 <= k <= r
    tol = 1e-4 if dtype == F32 else 1e-10
    assert 1 - tol <= sr <= r + tol and 1 - tol <= er <= r + tol
    if kind in ("rank_one", "duplicate_rows"):
        assert k == 1
        assert sr == pytest.approx(1.0, abs=tol) and er == pytest.approx(1.0, abs=tol)
    errs = [eckart_young_error(s, j, relative=True).item() for j in range(r + 1)]
    assert errs[0] == pytest.approx(1.0, abs=tol) and errs[-1] == 0.0
    assert all(a >= b for a, b in zip(errs, errs[1:], strict=False))  # non-increasing in k
    assert errs[k] ** 2 <= 0.1 + tol  # k(0.9) leaves at most 10 % of the energy


def test_gram_method_in_blocks_of_the_longer_side(monkeypatch) -> None:
    """The float64 copy is made a block of columns at a time: the result does not depend on
    the block size, for wide and tall matrices and stacked groups."""
    import lightning_spectral.functional.weights as weights_module

    ws = [randn(2, 20, 50, seed=7).float(), randn(50, 20, seed=8).float()]
    whole = [singular_values_many([w], method="gram")[0] for w in ws]
    monkeypatch.setattr(weights_module, "_GRAM_BLOCK", 7)
    for w, want in zip(ws, whole, strict=True):
        got = singular_values_many([w], method="gram")[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        ref = torch.linalg.svdvals(weight_matrix(w).double()).float()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
