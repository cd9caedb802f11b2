"""Neural collapse NC1–NC4 (docs/definitions.md#collapse) and its streaming form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spectral.functional.collapse import (
    CollapseStats,
    _collapse_update,
    collapse_from_stats,
    collapse_keys,
    neural_collapse,
)
from lightning_spectral.functional.interplay import information_interplay

ALL_KEYS = (
    "nc1", "nc2_equinorm", "nc2_equiangular", "nc2_cos_std", "nc2_etf",
    "nc2_equinorm_w", "nc2_equiangular_w", "nc2_etf_w", "nc3", "nc3_wh", "nc4",
)  # fmt: skip
H_KEYS = ALL_KEYS[:5]

# ----------------------------------------------------------------------------- reference


def np_collapse(h: np.ndarray, y: np.ndarray, w=None, b=None) -> dict[str, float]:
    """Every metric of docs/definitions.md#collapse-metrics, per sample, dense, float64 NumPy."""
    h = h.astype(np.float64)
    classes = np.unique(y)
    c = len(classes)
    n, d = h.shape
    mu = np.stack([h[y == k].mean(axis=0) for k in classes])
    mu_g = mu.mean(axis=0)
    m = mu - mu_g
    sigma_w = (
        sum(
            np.outer(
                h[i] - mu[np.searchsorted(classes, y[i])], h[i] - mu[np.searchsorted(classes, y[i])]
            )
            for i in range(n)
        )
        / n
    )
    sigma_b = m.T @ m / c
    lam, v = np.linalg.eigh(sigma_b)
    keep = lam > lam.max() * max(d, c) * np.finfo(np.float64).eps
    pinv = (v[:, keep] / lam[keep]) @ v[:, keep].T
    etf = (np.eye(c) - np.ones((c, c)) / c) / np.sqrt(c - 1)

    def equinorm(x):
        nrm = np.linalg.norm(x, axis=1)
        return nrm.std(ddof=1) / nrm.mean()

    def cosines(x):
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        return u @ u.T

    def equiangular(x):
        cs = cosines(x)
        off = ~np.eye(c, dtype=bool)
        return np.abs(cs[off] + 1 / (c - 1)).sum() / (c * (c - 1))

    def etf_dist(g):
        return np.linalg.norm(g / np.linalg.norm(g) - etf)

    out = {
        "nc1": np.trace(sigma_w @ pinv) / c,
        "nc2_equinorm": equinorm(m),
        "nc2_equiangular": equiangular(m),
        "nc2_cos_std": cosines(m)[np.triu_indices(c, 1)].std(ddof=1) if c >= 3 else np.nan,
        "nc2_etf": etf_dist(m @ m.T),
    }
    if w is not None:
        wc = w[classes].astype(np.float64)
        bb = np.zeros(w.shape[0]) if b is None else b
        out.update(
            nc2_equinorm_w=equinorm(wc),
            nc2_equiangular_w=equiangular(wc),
            nc2_etf_w=etf_dist(wc @ wc.T),
            nc3=np.linalg.norm(wc / np.linalg.norm(wc) - m / np.linalg.norm(m)) ** 2,
            nc3_wh=etf_dist(wc @ m.T),
        )
        agree = 0
        for i in range(n):
            decided = int(np.argmax(w @ h[i] + bb))
            nearest = int(classes[np.argmin(np.linalg.norm(h[i] - mu, axis=1))])
            agree += decided == nearest
        out["nc4"] = agree / n
    return {k: float(v) for k, v in out.items()}


def simplex(c: int, d: int, radius: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Centred simplex-ETF class means ``m_c`` (rows, norm ``radius``) in R^d."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    p = torch.eye(c, dtype=torch.float64) - 1.0 / c
    coords = p @ torch.linalg.eigh(p).eigenvectors[:, 1:]  # the simplex in its own C−1 dims
    coords = coords / coords.norm(dim=1, keepdim=True) * radius
    return coords @ q[: c - 1]


def floats(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


# ----------------------------------------------------------------------------- known values


@pytest.mark.parametrize("c,d,per", [(2, 3, 2), (3, 5, 4), (5, 8, 3), (10, 12, 2), (4, 3, 2)])
def test_perfect_etf(c, d, per):
    if c - 1 > d:
        pytest.skip("a simplex of C points needs d >= C - 1")
    m = simplex(c, d, radius=2.3)
    mu_g = torch.linspace(-1, 2, d, dtype=torch.float64)
    y = torch.arange(c).repeat_interleave(per)
    h = mu_g + m[y]
    w = 0.7 * m
    b = -w @ mu_g
    out = floats(neural_collapse(h, y, w, b, dtype=torch.float64))
    assert tuple(out) == ALL_KEYS
    for key in ALL_KEYS[:-1]:
        if key == "nc2_cos_std" and c < 3:
            assert math.isnan(out[key])
        else:
            assert out[key] == pytest.approx(0.0, abs=1e-7), key
    assert out["nc4"] == 1.0
    # W = −s·M flips self-duality to its maximum
    assert float(neural_collapse(h, y, -w, b)["nc3"]) == pytest.approx(4.0, abs=1e-5)


@pytest.mark.parametrize("c,sigma,radius", [(3, 0.1, 1.0), (4, 0.5, 2.0), (6, 1.0, 3.0)])
def test_isotropic_noise_nc1(c, sigma, radius):
    """Samples μ_c ± σ u_k (u_k orthonormal basis of the ETF span): nc1 = σ²(C−1)/(C r²)."""
    d = c + 3
    m = simplex(c, d, radius=radius, seed=c)
    basis = torch.linalg.svd(m, full_matrices=False).Vh[: c - 1]  # span of the centred means
    rows, labels = [], []
    for k in range(c):
        for u in basis:
            rows += [m[k] + sigma * u, m[k] - sigma * u]
            labels += [k, k]
    h, y = torch.stack(rows) + 5.0, torch.tensor(labels)
    want = sigma**2 * (c - 1) / (c * radius**2)
    assert float(neural_collapse(h, y, dtype="float64")["nc1"]) == pytest.approx(want, rel=1e-9)


def test_hand_example():
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    out = floats(neural_collapse(h, torch.tensor([0, 1, 2])))
    assert out["nc2_equiangular"] == pytest.approx(0.304738, abs=5e-7)
    want = (2 * 0.5 + 4 * abs(0.5 - 1 / math.sqrt(2))) / 6
    assert out["nc2_equiangular"] == pytest.approx(want, abs=1e-12)
    norms = np.array([math.sqrt(2), math.sqrt(2), 2.0])
    assert out["nc2_equinorm"] == pytest.approx(norms.std(ddof=1) / norms.mean(), abs=1e-12)
    assert out["nc1"] == 0.0  # one sample per class: no within-class scatter


# ----------------------------------------------------------------------------- reference agreement


@pytest.mark.parametrize(
    "n,d,k,seed,with_bias",
    [(60, 5, 4, 0, True), (50, 8, 10, 1, False), (40, 2, 5, 2, True), (30, 12, 3, 3, True)],
)
def test_matches_numpy_reference(n, d, k, seed, with_bias):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    means = 2 * torch.randn(k, d, dtype=torch.float64, generator=g)
    h = means[y] + torch.randn(n, d, dtype=torch.float64, generator=g)
    w = torch.randn(k + 2, d, dtype=torch.float64, generator=g)  # K > max y
    b = torch.randn(k + 2, dtype=torch.float64, generator=g) if with_bias else None
    ref = np_collapse(h.numpy(), y.numpy(), w.numpy(), None if b is None else b.numpy())
    out = floats(neural_collapse(h, y, w, b, dtype="float64"))
    assert set(out) == set(ref)
    for key in ref:
        if math.isnan(ref[key]):
            assert math.isnan(out[key]), key
        else:
            assert out[key] == pytest.approx(ref[key], rel=1e-8, abs=1e-10), key
    out32 = floats(neural_collapse(h.float(), y, w.float(), None if b is None else b.float()))
    for key in ref:
        if not math.isnan(ref[key]):
            assert out32[key] == pytest.approx(ref[key], rel=2e-4, abs=1e-4), key


def test_absent_classes_unweighted_global_mean():
    """Only present classes count; μ_G is the unweighted mean of class means (unbalanced)."""
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([0] * 20 + [3] * 3 + [5] * 7)
    h = torch.randn(30, 4, dtype=torch.float64, generator=g) + 3 * (y[:, None] == 3)
    w = torch.randn(8, 4, dtype=torch.float64, generator=g)
    ref = np_collapse(h.numpy(), y.numpy(), w.numpy())
    out = floats(neural_collapse(h, y, w))
    for key in ref:
        assert out[key] == pytest.approx(ref[key], rel=1e-8, abs=1e-10), key


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(4, 25),
    d=st.integers(1, 6),
    k=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_fuzz_against_reference(n, d, k, seed, scale):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    h = scale * torch.randn(n, d, dtype=torch.float64, generator=g)
    w = torch.randn(k, d, dtype=torch.float64, generator=g)
    out = floats(neural_collapse(h, y, w))
    if len(torch.unique(y)) < 2:
        assert all(math.isnan(v) for v in out.values())
        return
    ref = np_collapse(h.numpy(), y.numpy(), w.numpy())
    for key in ref:
        if math.isnan(ref[key]) or not math.isfinite(ref[key]):
            continue
        # the pseudo-inverse of a nearly singular Σ_B is ill-conditioned: compare loosely there
        tol = 1e-6 if key != "nc1" else 1e-4
        assert out[key] == pytest.approx(ref[key], rel=tol, abs=1e-9), key


# ----------------------------------------------------------------------------- degenerate


def test_keys_and_nan_rules():
    h = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert tuple(neural_collapse(h, y)) == H_KEYS == collapse_keys(False)
    assert tuple(neural_collapse(h, y, torch.randn(3, 3))) == ALL_KEYS == collapse_keys(True)
    one = floats(neural_collapse(h, torch.zeros(6, dtype=torch.long), torch.randn(3, 3)))
    assert tuple(one) == ALL_KEYS and all(math.isnan(v) for v in one.values())
    # identical class means: Σ_B = 0 → nc1 NaN, zero mean norms → cosine metrics NaN
    same = floats(neural_collapse(torch.ones(4, 3), torch.tensor([0, 0, 1, 1])))
    assert all(math.isnan(same[k]) for k in H_KEYS)
    # two classes: the pairwise cosine std is undefined
    two = floats(neural_collapse(h[:4], y[:4]))
    assert math.isnan(two["nc2_cos_std"]) and math.isfinite(two["nc1"])
    # a zero head row makes the head cosines NaN but not the feature metrics
    w = torch.randn(3, 3)
    w[1] = 0
    zw = floats(neural_collapse(h, y, w))
    assert math.isnan(zw["nc2_equiangular_w"]) and math.isfinite(zw["nc2_equiangular"])


def test_nc4_ties_take_lowest_index():
    # classifier logits tie between classes 0 and 1 → argmax picks 0; the sample sits at the
    # midpoint of class means 0 and 1 → the nearest centre is 0 as well
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2])
    w = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    ref = np_collapse(h.numpy(), y.numpy(), w.numpy())
    out = floats(neural_collapse(h, y, w))
    assert out["nc4"] == ref["nc4"]


def test_validation_messages():
    h = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=r"\(N,\) = \(5,\)"):
        neural_collapse(h, y[:4])
    with pytest.raises(ValueError, match="integers"):
        neural_collapse(h, y.float())
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        neural_collapse(h, y, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"d = 3"):
        neural_collapse(h, y, torch.randn(3, 4))
    with pytest.raises(ValueError, match="non-negative"):
        neural_collapse(h, y - 1)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        neural_collapse(h[None], y)


def test_invariances():
    g = torch.Generator().manual_seed(9)
    y = torch.randint(0, 4, (40,), generator=g)
    h = (
        torch.randn(40, 6, dtype=torch.float64, generator=g)
        + 2 * torch.randn(4, 6, generator=g, dtype=torch.float64)[y]
    )
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    base = floats(neural_collapse(h, y, w, b))
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
    perm = torch.randperm(40, generator=g)
    for hh, yy, ww in ((h @ q, y, w @ q), (3.0 * h, y, w / 3.0), (h[perm], y[perm], w)):
        out = floats(neural_collapse(hh, yy, ww, b))
        for key in base:
            assert out[key] == pytest.approx(base[key], rel=1e-8, abs=1e-10), key


# ----------------------------------------------------------------------------- streaming


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 6, (101,), generator=g)
    h = torch.randn(101, 7, generator=g) + torch.randn(6, 7, generator=g)[y]
    w, b = torch.randn(6, 7, generator=g), torch.randn(6, generator=g)
    stats = CollapseStats.zeros(6, 7)
    for chunk in torch.arange(101).split(17):
        _collapse_update(h[chunk], y[chunk], stats)
    assert stats.counts.dtype == torch.float64 and float(stats.counts.sum()) == 101
    streamed = collapse_from_stats(stats, w, b, rows=h, row_labels=y, dtype=torch.float64)
    one_shot = neural_collapse(h, y, w, b, dtype="float64")
    for key in one_shot:
        assert float(streamed[key]) == pytest.approx(float(one_shot[key]), rel=1e-12), key
    # NC4 from a bounded row sample scores those rows against the class means of all rows
    sub = torch.arange(0, 101, 3)
    partial = collapse_from_stats(stats, w, b, rows=h[sub], row_labels=y[sub])
    ref = np_collapse(h.numpy(), y.numpy(), w.numpy(), b.numpy())
    mu = torch.stack([h[y == k].mean(0) for k in range(6)])
    nearest = torch.cdist(h[sub].double(), mu.double()).argmin(1)
    decided = (h[sub] @ w.T + b).argmax(1)
    assert float(partial["nc4"]) == pytest.approx(float((nearest == decided).double().mean()))
    assert float(partial["nc1"]) == pytest.approx(ref["nc1"], rel=1e-5)
    assert math.isnan(float(collapse_from_stats(stats, w, b)["nc4"]))  # no rows, no NC4


def test_geometry_extras():
    m = simplex(4, 5)
    y = torch.arange(4).repeat(3)
    out = collapse_from_stats(_collapse_update(m[y], y, CollapseStats.zeros(6, 5)), geometry=True)
    assert out["_classes"].tolist() == [0, 1, 2, 3]
    target = torch.full((4, 4), -1 / 3, dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(out["_cosine"].double(), target, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- synthetic collapse


def test_synthetic_collapse_trajectory():
    """ETF class means + noise of decreasing size: NC1–NC3 → 0, NC4 → 1, MIR/HDR → collapse values.

    The MIR/HDR limits are those of docs/definitions.md#mir-collapse.
    """
    c, d, per = 5, 12, 40
    g = torch.Generator().manual_seed(0)
    m = simplex(c, d, radius=1.0, seed=3)
    w = 1.5 * m  # ETF head, self-dual with the means
    y = torch.arange(c).repeat_interleave(per)
    noise = torch.randn(c * per, d, dtype=torch.float64, generator=g)
    noise = noise - torch.stack([noise[y == k].mean(0) for k in range(c)])[y]  # keep means exact
    delta = torch.randn(c, d, dtype=torch.float64, generator=g)  # off-ETF class-mean error
    track: dict[str, list[float]] = {k: [] for k in ("nc1", "nc2_etf", "nc3", "nc4", "mir", "hdr")}
    sigmas = [1.0, 0.3, 0.1, 0.01, 1e-4]
    for sigma in sigmas:
        # within-class noise, class-mean error and head error all shrink together
        h = (m + 0.3 * sigma * delta)[y] + sigma * noise
        w_s = w + sigma * 0.1 * torch.randn(c, d, dtype=torch.float64, generator=g)
        nc = floats(neural_collapse(h, y, w_s))
        inter = floats(information_interplay(h, w_s, y))
        for k in ("nc1", "nc2_etf", "nc3", "nc4"):
            track[k].append(nc[k])
        track["mir"].append(inter["mir"])
        track["hdr"].append(inter["hdr"])
    for key in ("nc1", "nc2_etf", "nc3"):
        assert all(a > b for a, b in zip(track[key], track[key][1:], strict=False)), track[key]
        assert track[key][-1] < 1e-3 * track[key][0], (key, track[key])
    assert track["nc4"][-1] == 1.0
    mir_collapse = 1 / (c - 1) + (c - 2) * math.log(c - 2) / ((c - 1) * math.log(c - 1))
    assert abs(track["mir"][-1] - mir_collapse) < 1e-4
    assert abs(track["mir"][0] - mir_collapse) > 10 * abs(track["mir"][-1] - mir_collapse)
    assert track["hdr"][-1] < 1e-4 and track["hdr"][0] > 10 * track["hdr"][-1]


def test_non_finite_input_gives_nan_not_an_exception():
    h = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(12) % 3
    w = torch.randn(3, 4)
    for bad in (float("nan"), float("inf")):
        hb = h.clone()
        hb[5, 2] = bad
        out = floats(neural_collapse(hb, y, w))
        assert tuple(out) == ALL_KEYS and all(math.isnan(v) for v in out.values())
    wb = w.clone()
    wb[1, 0] = float("nan")
    assert all(math.isnan(v) for v in floats(neural_collapse(h, y, wb)).values())


def test_nearest_class_mean_equals_the_exact_differences():
    """NC4's nearest class mean is the argmin of ‖h − μ_c‖² from the differences (no
    ‖h‖² − 2h·μ + ‖μ‖² cancellation): equal to the brute-force float64 argmin on many rows, far
    from the origin (where the expansion would lose digits), with exact ties at the lowest
    index."""
    from lightning_spectral.functional.collapse import _nearest_class_mean

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 16, dtype=torch.float64, generator=g) + 1e4
    h = mu[torch.randint(0, 7, (3000,), generator=g)] + torch.randn(
        3000, 16, dtype=torch.float64, generator=g
    )
    brute = ((h[:, None, :] - mu[None, :, :]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(_nearest_class_mean(h, mu), brute)
    # exactly equidistant rows go to the lowest index
    centres = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 7.0]], dtype=torch.float64)
    rows = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert _nearest_class_mean(rows, centres).tolist() == [0, 1, 1]
    assert _nearest_class_mean(h[:0], mu).shape == (0,)
