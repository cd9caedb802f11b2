"""Matrix entropy, matrix mutual information, MIR and HDR (docs/definitions.md#interplay)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spectral.functional.interplay import (
    hdr,
    information_interplay,
    matrix_entropy,
    matrix_mutual_information,
    mir,
    predicted_labels,
)

# ----------------------------------------------------------------------------- references


def np_entropy(k: np.ndarray) -> float:
    """S(λ(K)) in float64 from the definition (docs/definitions.md#matrix-entropy, #cutoff)."""
    lam = np.clip(np.linalg.eigvalsh(k.astype(np.float64)), 0, None)
    lam[lam <= lam.max() * lam.size * np.finfo(np.float64).eps] = 0
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def np_interplay(f: np.ndarray, w: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Dense n×n MIR and HDR (docs/definitions.md#mir-hdr) in float64."""
    z = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    wy = w[y] / np.linalg.norm(w[y], axis=1, keepdims=True)
    gz, gw = z @ z.T, wy @ wy.T
    hz, hw, hzw = np_entropy(gz), np_entropy(gw), np_entropy(gz * gw)
    return (hz + hw - hzw) / min(hz, hw), abs(hz - hw) / max(hz, hw)


def collapse_mir(c: int) -> float:
    """MIR at collapse with ``c`` classes (docs/definitions.md#mir-collapse)."""
    return 1 / (c - 1) + (c - 2) * math.log(c - 2) / ((c - 1) * math.log(c - 1))


def etf_rows(c: int, d: int, seed: int = 0) -> torch.Tensor:
    """C simplex-ETF directions (unit rows, cosines −1/(C−1)) embedded in R^d by a rotation."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    p = torch.eye(c, dtype=torch.float64) - 1.0 / c
    p = p / p.norm(dim=1, keepdim=True)
    return p @ q[:c]


def random_problem(n: int, d: int, c: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, dtype=torch.float64, generator=g)
    w = torch.randn(c, d, dtype=torch.float64, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return f, w, y


# ----------------------------------------------------------------------------- matrix entropy


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_entropy_of_identity_is_log_n(n):
    assert float(matrix_entropy(torch.eye(n))) == pytest.approx(math.log(n), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_of_ones_is_exactly_zero(dtype):
    assert float(matrix_entropy(torch.ones(9, 9, dtype=dtype))) == 0.0


@pytest.mark.parametrize("k,size", [(2, 3), (3, 4), (5, 2)])
def test_entropy_of_k_blocks_is_log_k(k, size):
    blocks = torch.block_diag(*[torch.ones(size, size)] * k)
    assert float(matrix_entropy(blocks)) == pytest.approx(math.log(k), abs=1e-5)


def test_entropy_scale_invariant_and_nan_for_nonpositive_trace():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g)
    k = x @ x.T
    assert float(matrix_entropy(3.7 * k)) == pytest.approx(float(matrix_entropy(k)), abs=1e-12)
    assert math.isnan(float(matrix_entropy(torch.zeros(4, 4))))
    assert math.isnan(float(matrix_entropy(-torch.eye(3))))
    nan_k = k.clone()
    nan_k[0, 0] = float("nan")
    assert math.isnan(float(matrix_entropy(nan_k)))


@pytest.mark.parametrize("seed", range(4))
def test_entropy_matches_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5 + seed, dtype=torch.float64, generator=g)
    k = x @ x.T
    assert float(matrix_entropy(k)) == pytest.approx(np_entropy(k.numpy()), abs=1e-10)
    # float32 default precision agrees to float32 accuracy
    assert float(matrix_entropy(k.float())) == pytest.approx(np_entropy(k.numpy()), abs=1e-4)


def test_entropy_batched_and_shape_errors():
    ks = torch.stack([torch.eye(4), torch.ones(4, 4)])
    out = matrix_entropy(ks)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(math.log(4), abs=1e-6) and out[1].item() == 0.0
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\).*\(3, 4\)"):
        matrix_entropy(torch.ones(3, 4))
    with pytest.raises(ValueError, match="shape"):
        matrix_entropy(torch.ones(3))


# ----------------------------------------------------------------------------- mutual information


@pytest.mark.parametrize("seed", range(3))
def test_mutual_information_with_identity_is_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(10, 4, dtype=torch.float64, generator=g), dim=1)
    k = z @ z.T  # unit diagonal
    mi = matrix_mutual_information(k, torch.eye(10, dtype=torch.float64))
    assert float(mi) == pytest.approx(float(matrix_entropy(k)), abs=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_mutual_information_matches_numpy_and_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(9, 3, dtype=torch.float64, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(9, 5, dtype=torch.float64, generator=g), dim=1)
    k1, k2 = a @ a.T, b @ b.T
    ref = np_entropy(k1.numpy()) + np_entropy(k2.numpy()) - np_entropy((k1 * k2).numpy())
    mi = float(matrix_mutual_information(k1, k2))
    assert mi == pytest.approx(ref, abs=1e-10)
    assert -1e-10 <= mi <= min(np_entropy(k1.numpy()), np_entropy(k2.numpy())) + 1e-10
    with pytest.raises(ValueError, match="same shape"):
        matrix_mutual_information(k1, k2[:3, :3])


# ----------------------------------------------------------------------------- MIR / HDR


@pytest.mark.parametrize("c,expected", [(3, 0.5), (10, 0.952351), (4, None), (25, None)])
@pytest.mark.parametrize("m", [1, 4])
def test_collapse_values(c, expected, m):
    """docs/definitions.md#mir-collapse: z_i = ŵ_{y_i}, ETF head, balanced classes, zero mean."""
    w = etf_rows(c, d=c + 2) * 2.5
    y = torch.arange(c).repeat_interleave(m)
    f = w[y] * 0.3  # any positive scale per row is removed by the normalisation
    out = information_interplay(f, w, y, dtype="float64")
    want = collapse_mir(c)
    if expected is not None:
        assert want == pytest.approx(expected, abs=5e-7)
    assert float(out["mir"]) == pytest.approx(want, abs=1e-9)
    assert float(out["hdr"]) == pytest.approx(0.0, abs=1e-9)
    assert float(out["h_z"]) == pytest.approx(math.log(c - 1), abs=1e-9)
    h_zw = ((2 * c - 3) * math.log(c - 1) - (c - 2) * math.log(c - 2)) / (c - 1)
    assert float(out["h_zw"]) == pytest.approx(h_zw, abs=1e-9)
    # float32 default path
    assert float(mir(f.float(), w.float(), y)) == pytest.approx(want, abs=2e-5)


def test_hdr_zero_for_unbalanced_collapse_and_mir_nan_for_one_label():
    w = etf_rows(4, 6)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3])
    assert float(hdr(w[y] * 5, w, y, dtype="float64")) == pytest.approx(0.0, abs=1e-9)
    one = torch.zeros(5, dtype=torch.long)
    f = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert math.isnan(float(mir(f, w, one)))  # H(G_W) = 0
    assert math.isnan(float(mir(f[:0], w, one[:0])))  # no samples


@pytest.mark.parametrize(
    "n,d,c,seed",
    [(40, 3, 4, 0), (40, 5, 3, 1), (12, 8, 5, 2), (30, 2, 7, 3), (25, 6, 2, 4), (9, 20, 12, 5)],
)
def test_mir_hdr_match_dense_numpy(n, d, c, seed):
    """Every factor-side choice (d·r < n or not, C > d or not) equals the dense n×n formula."""
    f, w, y = random_problem(n, d, c, seed)
    ref_mir, ref_hdr = np_interplay(f.numpy(), w.numpy(), y.numpy())
    out = information_interplay(f, w, y)
    assert float(out["mir"]) == pytest.approx(ref_mir, abs=1e-9)
    assert float(out["hdr"]) == pytest.approx(ref_hdr, abs=1e-9)
    # float32 agrees to float32 accuracy
    assert float(mir(f.float(), w.float(), y)) == pytest.approx(ref_mir, abs=5e-4)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 30),
    d=st.integers(1, 6),
    c=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    rank_one=st.booleans(),
)
def test_bounds_fuzz(n, d, c, seed, rank_one):
    f, w, y = random_problem(n, d, c, seed)
    if rank_one:
        f = f[:1].expand(n, d) * torch.linspace(1, 2, n, dtype=torch.float64)[:, None]
    out = information_interplay(f, w, y)
    for key in ("mir", "hdr"):
        v = float(out[key])
        assert math.isnan(v) or -1e-9 <= v <= 1 + 1e-9
    if not math.isnan(float(out["mir"])):
        ref_mir, ref_hdr = np_interplay(f.numpy(), w.numpy(), y.numpy())
        assert float(out["mir"]) == pytest.approx(ref_mir, abs=1e-8)
        assert float(out["hdr"]) == pytest.approx(ref_hdr, abs=1e-8)


def test_invariances():
    f, w, y = random_problem(30, 5, 4, 7)
    base = information_interplay(f, w, y)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    scales = torch.rand(30, 1, dtype=torch.float64) + 0.1
    for ff, ww, yy in ((f[perm], w, y[perm]), (f @ q, w @ q, y), (f * scales, w * 3.0, y)):
        out = information_interplay(ff, ww, yy)
        for key in ("mir", "hdr"):
            assert float(out[key]) == pytest.approx(float(base[key]), abs=1e-9)


def test_predicted_label_variant():
    f, w, y = random_problem(20, 4, 3, 11)
    b = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)
    pred = (f @ w.T + b).argmax(dim=1)
    assert torch.equal(predicted_labels(f, w, b), pred)
    assert float(mir(f, w, None, bias=b)) == pytest.approx(float(mir(f, w, pred)), abs=1e-12)
    ref_mir, _ = np_interplay(f.numpy(), w.numpy(), pred.numpy())
    assert float(mir(f, w, bias=b)) == pytest.approx(ref_mir, abs=1e-9)


def test_differentiable_and_gradient_matches_dense_path():
    f, w, y = random_problem(50, 3, 4, 3)  # d·r = 9 < 50: factor path
    f1 = f.clone().requires_grad_(True)
    w1 = w.clone().requires_grad_(True)
    mir(f1, w1, y).backward()

    def dense(ff, ww):
        z = torch.nn.functional.normalize(ff, dim=1)
        wy = torch.nn.functional.normalize(ww, dim=1)[y]
        gz, gw = z @ z.T, wy @ wy.T
        hz, hw = matrix_entropy(gz), matrix_entropy(gw)
        return (hz + hw - matrix_entropy(gz * gw)) / torch.minimum(hz, hw)

    f2 = f.clone().requires_grad_(True)
    w2 = w.clone().requires_grad_(True)
    dense(f2, w2).backward()
    torch.testing.assert_close(f1.grad, f2.grad, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-8, rtol=1e-6)


def test_input_validation_messages():
    f, w, y = random_problem(6, 3, 4, 0)
    with pytest.raises(ValueError, match=r"weight must have shape \(C, d\) with d = 3"):
        mir(f, w[:, :2], y)
    with pytest.raises(ValueError, match=r"labels must have shape \(n,\)"):
        mir(f, w, y[:3])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        mir(f, w, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="integers"):
        hdr(f, w, y.double())
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        hdr(f[None], w, y)


def test_non_finite_input_gives_nan_not_an_exception():
    f, w, y = random_problem(20, 4, 3, 0)
    f[2, 1] = float("nan")
    out = information_interplay(f, w, y)
    assert all(math.isnan(float(v)) for v in out.values())
    f, w, y = random_problem(20, 4, 3, 0)
    w[0, 0] = float("inf")
    assert math.isnan(float(hdr(f, w, y)))


# ----------------------------------------------------------------------------- factor sides


def labelled_problem(n: int, d: int, c: int, seed: int, share: list[float] | None = None):
    """Float64 features and head with labels drawn with the class shares ``share``."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, dtype=torch.float64, generator=g) + 0.5
    w = torch.randn(c, d, dtype=torch.float64, generator=g)
    probs = torch.full((c,), 1.0 / c) if share is None else torch.tensor(share)
    y = torch.multinomial(probs, n, replacement=True, generator=g)
    return f, w, y


@pytest.mark.parametrize(
    "n,d,c,share",
    [
        (400, 6, 5, None),  # d·C = 30 < n: the Kronecker side, C <= d
        (300, 3, 9, None),  # C > d: r = d, d·r = 9 < n
        (200, 8, 4, [0.7, 0.2, 0.1, 0.0]),  # unbalanced, one class absent
        (120, 5, 3, [0.96, 0.02, 0.02]),  # one class holds almost every row
        (31, 6, 5, None),  # n just above d·r = 30
        (30, 6, 5, None),  # n = d·r: the n×n side
        (12, 6, 5, None),  # n < d·r
    ],
)
def test_every_side_equals_the_dense_float64_formula(n, d, c, share):
    """The spectra from the smaller factors (the class scatters S_c and Σ_c (a_c a_cᵀ) ⊗ S_c
    when d·r < n) equal the dense n×n float64 formula of docs/definitions.md#mir-hdr."""
    f, w, y = labelled_problem(n, d, c, seed=n + d + c, share=share)
    fn, wn = f.numpy(), w.numpy()[y.numpy()]
    z = fn / np.linalg.norm(fn, axis=1, keepdims=True)
    wy = wn / np.linalg.norm(wn, axis=1, keepdims=True)
    gz, gw = z @ z.T, wy @ wy.T
    want = {"h_z": np_entropy(gz), "h_w": np_entropy(gw), "h_zw": np_entropy(gz * gw)}
    ref_mir, ref_hdr = np_interplay(f.numpy(), w.numpy(), y.numpy())
    out = information_interplay(f, w, y)
    for key, value in want.items():
        assert float(out[key]) == pytest.approx(value, abs=1e-9), key
    assert float(out["mir"]) == pytest.approx(ref_mir, abs=1e-9)
    assert float(out["hdr"]) == pytest.approx(ref_hdr, abs=1e-9)
    # the float32 working precision agrees to float32 accuracy
    out32 = information_interplay(f.float(), w.float(), y)
    assert float(out32["mir"]) == pytest.approx(ref_mir, abs=2e-5)
    assert float(out32["hdr"]) == pytest.approx(ref_hdr, abs=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_scatter_equals_the_per_class_sums(dtype):
    """S_c from the rows grouped by class (several float32 chunks per class: d >= 32 and far
    more than 4d rows in a class) equals Σ_{y_i=c} z_i z_iᵀ summed in float64."""
    from lightning_spectral.functional.interplay import _class_scatter

    f, _, y = labelled_problem(3000, 40, 4, seed=1, share=[0.6, 0.3, 0.1, 0.0])
    largest = int(torch.bincount(y, minlength=4).max())
    for width in (largest, 3000):  # the largest class count, or any bound above it
        got = _class_scatter(f.to(dtype), y, 4, width)
        assert got.dtype == torch.float64 and got.shape == (4, 40, 40)
        f32 = f.to(dtype).double()
        for c in range(4):
            rows = f32[y == c]
            torch.testing.assert_close(got[c], rows.T @ rows, rtol=1e-6, atol=1e-6)
        assert float(got[3].abs().max()) == 0.0  # the absent class


def test_one_host_transfer_with_labels_none_without():
    """The label check and the class blocks' padding share one transfer; predicted labels need
    none (the padding then takes the row count as its bound)."""
    from lightning_spectral.testing import count_host_syncs

    f, w, y = labelled_problem(400, 6, 5, seed=2)
    with count_host_syncs("cpu") as syncs:
        out = information_interplay(f, w, y)
    assert syncs.count_under("lightning_spectral") == 1, syncs.describe()
    with count_host_syncs("cpu") as syncs:
        predicted = information_interplay(f, w)
    assert syncs.count_under("lightning_spectral") == 0, syncs.describe()
    again = information_interplay(f, w, predicted_labels(f, w))
    assert float(predicted["mir"]) == pytest.approx(float(again["mir"]), abs=1e-12)
    assert math.isfinite(float(out["mir"]))


def test_kronecker_side_gradient_matches_the_dense_path():
    f, w, y = labelled_problem(60, 3, 4, seed=5, share=[0.5, 0.3, 0.2, 0.0])  # d·r = 9 < 60
    f1, w1 = f.clone().requires_grad_(True), w.clone().requires_grad_(True)
    hdr(f1, w1, y).backward()

    def dense(ff, ww):
        z = torch.nn.functional.normalize(ff, dim=1)
        wy = torch.nn.functional.normalize(ww, dim=1)[y]
        hz, hw = matrix_entropy(z @ z.T), matrix_entropy(wy @ wy.T)
        return (hz - hw).abs() / torch.maximum(hz, hw)

    f2, w2 = f.clone().requires_grad_(True), w.clone().requires_grad_(True)
    dense(f2, w2).backward()
    torch.testing.assert_close(f1.grad, f2.grad, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-8, rtol=1e-6)
