"""1-D absolute-value networks as Lasso problems with reflection features.

The definitions are in docs/definitions.md#mirrors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from lightning_spectral.functional.mirrors import (
    convex_gap,
    lasso_mirror_fit,
    mirror_features,
    mirror_network,
    network_objective,
    reflection_dictionary,
)
from lightning_spectral.models import MirrorNet

# ------------------------------------------------------------------------------ helpers


def _phi_dense(x: np.ndarray, a1: float, a2: float) -> np.ndarray:
    return np.abs(np.abs(x - a1) - a2)


def _min_l1_interpolation(A: np.ndarray, y: np.ndarray) -> float:
    """Independent LP via linprog: min ‖z‖₁ s.t. A z + ξ1 = y, the β → 0 limit of the Lasso.

    See docs/definitions.md#mirrors-lasso.
    """
    n, p = A.shape
    # variables: z⁺ (p), z⁻ (p), ξ⁺, ξ⁻
    c = np.concatenate([np.ones(2 * p), [0.0, 0.0]])
    A_eq = np.hstack([A, -A, np.ones((n, 1)), -np.ones((n, 1))])
    res = linprog(c, A_eq=A_eq, b_eq=y, bounds=(0, None), method="highs")
    assert res.status == 0
    return float(res.fun)


def _lasso_scipy(A: np.ndarray, y: np.ndarray, beta: float) -> float:
    """Independent solve of the Lasso: smooth bound-constrained reformulation, L-BFGS-B."""
    n, p = A.shape

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        zp, zm, xi = v[:p], v[p : 2 * p], v[-1]
        r = A @ (zp - zm) + xi - y
        val = 0.5 * r @ r + beta * (zp.sum() + zm.sum())
        g = A.T @ r
        return val, np.concatenate([g + beta, -g + beta, [r.sum()]])

    v0 = np.zeros(2 * p + 1)
    bounds = [(0, None)] * (2 * p) + [(None, None)]
    res = minimize(fun, v0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 50_000, "maxfun": 100_000, "ftol": 1e-15, "gtol": 1e-12})
    return float(res.fun)


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(-1, 1, n))
    y = np.sin(3 * x) + 0.2 * rng.standard_normal(n)
    return x, y


# ------------------------------------------------------------------------------ dictionary


def test_depth2_dictionary_is_distance_matrix():
    x = np.array([0.3, -1.0, 2.0, 0.5])
    A, params = reflection_dictionary(torch.tensor(x), depth=2)
    assert A.dtype == torch.float64 and A.shape == (4, 4)
    np.testing.assert_array_equal(A.numpy(), np.abs(x[:, None] - x[None, :]))
    np.testing.assert_array_equal(params.numpy(), np.stack([x, np.zeros(4)], 1))


def test_depth3_dictionary_reflections_and_midpoints():
    x = np.array([0.0, 2.0, 3.0, 7.0])
    A, params = reflection_dictionary(x, depth=3)
    p = params.numpy()
    pairs = {tuple(row) for row in p}
    assert len(pairs) == len(p), "duplicate (a1, a2) pairs must be dropped"
    for i in range(4):
        for j in range(4):
            assert (x[i], abs(x[j] - x[i])) in pairs
            if i < j:
                assert ((x[i] + x[j]) / 2, abs(x[i] - x[j]) / 2) in pairs
    # the first columns are the depth-2 dictionary
    np.testing.assert_array_equal(A[:, :4].numpy(), reflection_dictionary(x, 2)[0].numpy())
    # every column is φ_{a1,a2} evaluated at the data (dense formula)
    for j, (a1, a2) in enumerate(p):
        np.testing.assert_array_equal(A[:, j].numpy(), _phi_dense(x, a1, a2))
    # growth: at most 1.5 M² − 0.5 M columns (here 16 reflections + 6 midpoints, minus dups)
    assert A.shape[1] <= 1.5 * 16 - 2
    # (x_i = 2, |x_j - x_i| = 1) and (3, 1) and ... ; (3, 1) from x_j = 2 and x_j = 4? no 4:
    # duplicates do occur for mirror-symmetric data
    A2, p2 = reflection_dictionary(np.array([0.0, 1.0, 2.0]), depth=3)
    assert len({tuple(r) for r in p2.numpy()}) == p2.shape[0] < 9 + 3


def test_duplicate_x_values_add_no_feature_and_n1_shape():
    x = np.array([[0.0], [1.0], [1.0], [3.0]])  # (N, 1) accepted, repeated value allowed
    A, params = reflection_dictionary(x, depth=2)
    assert A.shape == (4, 3)
    assert reflection_dictionary(x, 3)[0].shape[0] == 4


def test_mirror_features_matches_dictionary():
    x = np.array([-1.0, 0.0, 0.5, 2.0])
    A, params = reflection_dictionary(x, 3)
    np.testing.assert_array_equal(mirror_features(x, params).numpy(), A.numpy())


# ------------------------------------------------------------------------------ Lasso optimum


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_lasso_optimum_matches_independent_solve(depth, beta):
    x, y = _data(7, seed=depth)
    fit = lasso_mirror_fit(x, y, beta, depth)
    assert fit.converged and fit.gap <= 1e-9 * fit.objective
    ref = _lasso_scipy(fit.dictionary.numpy(), y, beta)
    # L-BFGS-B can only be above the optimum; the two agree to its accuracy
    assert fit.objective <= ref + 1e-9
    assert ref - fit.objective <= 1e-6 * fit.objective


def test_lasso_matches_sklearn_with_its_scaling():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _data(9, seed=3)
    beta = 0.1
    fit = lasso_mirror_fit(x, y, beta, depth=2)
    # sklearn: (1/(2N))‖y − Xw − b‖² + α‖w‖₁ with the intercept unpenalised → α = β/N
    model = sklearn.Lasso(alpha=beta / len(x), fit_intercept=True, tol=1e-12, max_iter=10**6)
    model.fit(fit.dictionary.numpy(), y)
    r = y - model.predict(fit.dictionary.numpy())
    sk_obj = 0.5 * r @ r + beta * np.abs(model.coef_).sum()
    assert abs(sk_obj - fit.objective) <= 1e-7 * fit.objective


@pytest.mark.parametrize("depth", [2, 3])
def test_kkt_conditions_hold(depth):
    x, y = _data(8, seed=10 + depth)
    beta = 0.05
    fit = lasso_mirror_fit(x, y, beta, depth)
    A, z, xi = fit.dictionary.numpy(), fit.coef.numpy(), fit.intercept
    r = y - A @ z - xi
    np.testing.assert_allclose(r, fit.residual.numpy(), atol=1e-12)
    assert abs(r.sum()) <= 1e-10
    corr = A.T @ r
    assert np.all(np.abs(corr) <= beta * (1 + 1e-6))
    on = z != 0
    assert on.any()
    np.testing.assert_allclose(corr[on], beta * np.sign(z[on]), rtol=1e-6)
    assert fit.kkt <= 1e-6
    # the intercept is the unpenalised optimum given z
    assert xi == pytest.approx(np.mean(y - A @ z), abs=1e-12)


def test_depth3_optimum_never_above_depth2():
    x, y = _data(10, seed=5)
    for beta in (0.01, 0.1):
        f2 = lasso_mirror_fit(x, y, beta, 2)
        f3 = lasso_mirror_fit(x, y, beta, 3)
        assert f3.objective <= f2.objective * (1 + 1e-9)


# ------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("depth", [2, 3])
def test_rebuilt_network_reaches_lasso_objective(depth):
    x, y = _data(9, seed=20 + depth)
    beta = 0.03
    fit = lasso_mirror_fit(x, y, beta, depth)
    net = mirror_network(fit)
    assert net.depth == depth and net.width == max(int((fit.coef != 0).sum()), 1)
    J = float(network_objective(net, torch.tensor(x), torch.tensor(y), beta).detach())
    assert J == pytest.approx(fit.objective, rel=1e-12, abs=1e-14)
    # the network function is the Lasso model
    grid = torch.linspace(-1.5, 1.5, 101, dtype=torch.float64)
    np.testing.assert_allclose(net(grid).detach().numpy(), fit.predict(grid).numpy(),
                               atol=1e-12)
    assert convex_gap(net, x, y, beta, fit=fit) == pytest.approx(0.0, abs=1e-12)


def test_network_objective_formulas_by_hand():
    net2 = MirrorNet(2, depth=2, dtype=torch.float64)
    net3 = MirrorNet(1, depth=3, dtype=torch.float64)
    with torch.no_grad():
        net2.w.copy_(torch.tensor([1.0, -2.0]))
        net2.b.copy_(torch.tensor([0.0, 1.0]))
        net2.alpha.copy_(torch.tensor([3.0, 0.5]))
        net2.xi.fill_(-1.0)
        for name, val in dict(w=2.0, b=-2.0, v=-1.0, c=3.0, alpha=0.5, xi=0.25).items():
            getattr(net3, name).data.fill_(val)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # f2(0) = 3·0 + 0.5·1 − 1 = −0.5 ; f2(1) = 3·1 + 0.5·|−1| − 1 = 2.5
    J2 = 0.5 * ((-0.5 - 1) ** 2 + 2.5**2) + 0.7 / 2 * (1 + 4 + 9 + 0.25)
    assert float(network_objective(net2, x, y, 0.7).detach()) == pytest.approx(J2, rel=1e-14)
    # f3(x) = 0.5·|−|2x − 2| + 3| + 0.25: f3(0) = 0.75, f3(1) = 1.75
    J3 = 0.5 * ((0.75 - 1) ** 2 + 1.75**2) + 0.7 / 3 * (8 + 1 + 0.125)
    assert float(network_objective(net3, x, y, 0.7).detach()) == pytest.approx(J3, rel=1e-14)
    # forward keeps the input's layout
    assert net3(x[:, None]).shape == (2, 1) and net3(x).shape == (2,)


@pytest.mark.parametrize("depth", [2, 3])
def test_gap_never_negative_random_and_trained_networks(depth):
    x, y = _data(12, seed=40 + depth)
    beta = 0.05
    fit = lasso_mirror_fit(x, y, beta, depth)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    gen = torch.Generator().manual_seed(depth)
    for _ in range(20):
        net = MirrorNet(6, depth, generator=gen)
        assert convex_gap(net, x, y, beta, fit=fit) >= -1e-9
    # a perturbed optimum is above the optimum
    opt = mirror_network(fit)
    with torch.no_grad():
        opt.alpha.mul_(1.01)
    assert convex_gap(opt, x, y, beta, fit=fit) > 0
    # training: the gap shrinks and stays >= -tol
    net = MirrorNet(12, depth, generator=torch.Generator().manual_seed(7))
    optim = torch.optim.Adam(net.parameters(), lr=0.02)
    gaps = []
    for step in range(400):
        optim.zero_grad()
        loss = network_objective(net, xt, yt, beta)
        loss.backward()
        optim.step()
        if step % 50 == 49:
            gaps.append(convex_gap(net, x, y, beta, fit=fit))
    assert min(gaps) >= -1e-9
    assert gaps[-1] < gaps[0] and gaps[-1] < 0.5


# ------------------------------------------------------------------------------ known values


def test_spec_74_reflections_alone_are_not_exact():
    x = np.array([0.0, 2.0, 3.0, 7.0])
    y = np.array([0.0, 1.0, 0.0, 4.0])
    np.testing.assert_allclose(_phi_dense(x, 1.5, 1.5), y)
    A, params = reflection_dictionary(x, 3)
    p = params.numpy()
    is_refl = np.array([np.any(np.isclose(a1, x)) and np.any(np.isclose(abs(x - a1), a2))
                        for a1, a2 in p])
    assert _min_l1_interpolation(A.numpy()[:, is_refl], y) == pytest.approx(1.2, abs=1e-9)
    assert _min_l1_interpolation(A.numpy(), y) == pytest.approx(1.0, abs=1e-9)
    # the Lasso as β → 0 approaches the LP value (its ‖z‖₁, and objective/β)
    for beta in (1e-3, 1e-5):
        fit = lasso_mirror_fit(x, y, beta, 3)
        assert fit.l1_norm == pytest.approx(1.0, abs=5 * beta)
        assert fit.objective / beta == pytest.approx(1.0, abs=5 * beta)


def test_spec_75_two_layer_known_interpolant():
    x = np.array([-2.0, -1.0, 0.5, 1.5, 3.0])
    y = 3 * np.abs(x - 0.5) - 1
    A, _ = reflection_dictionary(x, 2)
    assert _min_l1_interpolation(A.numpy(), y) == pytest.approx(3.0, abs=1e-9)
    fit = lasso_mirror_fit(x, y, 1e-6, 2)
    np.testing.assert_allclose(fit.coef.numpy(), [0, 0, 3, 0, 0], atol=1e-4)
    assert fit.intercept == pytest.approx(-1.0, abs=1e-4)
    assert fit.l1_norm == pytest.approx(3.0, abs=1e-4)


def test_spec_75_mirror_about_three():
    x = np.arange(7.0)
    y = _phi_dense(x, 3.0, 2.0)
    A2, _ = reflection_dictionary(x, 2)
    A3, _ = reflection_dictionary(x, 3)
    assert _min_l1_interpolation(A2.numpy(), y) == pytest.approx(3.0, abs=1e-9)
    assert _min_l1_interpolation(A3.numpy(), y) == pytest.approx(1.0, abs=1e-9)
    f2 = lasso_mirror_fit(x, y, 1e-5, 2)
    f3 = lasso_mirror_fit(x, y, 1e-5, 3)
    assert f2.l1_norm == pytest.approx(3.0, abs=1e-3)
    assert f3.l1_norm == pytest.approx(1.0, abs=1e-3)
    assert f3.support.numel() == 1
    a1, a2 = f3.params[f3.support[0]].tolist()
    assert (a1, a2) == (3.0, 2.0)


@pytest.mark.parametrize("depth", [2, 3])
def test_certificate_sup_over_continuous_parameters(depth):
    """sup_{a1,a2} |rᵀφ_{a1,a2}(x)| ≤ β over a fine grid of the whole parameter plane."""
    x, y = _data(9, seed=60 + depth)
    beta = 0.04
    fit = lasso_mirror_fit(x, y, beta, depth)
    r = fit.residual.numpy()
    a1 = np.linspace(-3.0, 3.0, 601)
    a2 = np.linspace(0.0, 4.0, 401) if depth == 3 else np.array([0.0])
    P1, P2 = np.meshgrid(a1, a2, indexing="ij")
    feats = np.abs(np.abs(x[:, None] - P1.reshape(1, -1)) - P2.reshape(1, -1))
    sup = np.max(np.abs(r @ feats))
    assert sup <= beta * (1 + 1e-6)


def test_depth2_residual_violates_depth3_certificate():
    x = np.arange(7.0)
    y = _phi_dense(x, 3.0, 2.0)
    beta = 0.01
    f2 = lasso_mirror_fit(x, y, beta, 2)
    A3, _ = reflection_dictionary(x, 3)
    assert np.max(np.abs(A3.numpy().T @ f2.residual.numpy())) > beta * 1.1


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "x, y, beta, depth, match",
    [
        (np.zeros((4, 2)), np.zeros(4), 0.1, 2, "one-dimensional"),
        (np.arange(4.0), np.zeros(4), -0.1, 2, "beta"),
        (np.arange(4.0), np.zeros(4), 0.0, 2, "beta"),
        (np.array([1.0]), np.array([2.0]), 0.1, 2, "at least 2 distinct"),
        (np.array([1.0, 1.0]), np.array([2.0, 3.0]), 0.1, 3, "at least 2 distinct"),
        (np.arange(4.0), np.zeros(3), 0.1, 2, "same number"),
        (np.array([0.0, np.nan]), np.zeros(2), 0.1, 2, "NaN"),
        (np.arange(4.0), np.zeros(4), 0.1, 4, "depth"),
    ],
)
def test_bad_input_raises(x, y, beta, depth, match):
    with pytest.raises(ValueError, match=match):
        lasso_mirror_fit(x, y, beta, depth)


def test_bad_input_network_side():
    net = MirrorNet(3, 2)
    with pytest.raises(ValueError, match="1-D inputs"):
        net(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="beta"):
        network_objective(net, torch.zeros(4), torch.zeros(4), -1.0)
    with pytest.raises(ValueError, match="depth"):
        MirrorNet(3, depth=5)
    with pytest.raises(ValueError, match="width"):
        MirrorNet(0)
    with pytest.raises(ValueError, match="one-dimensional"):
        reflection_dictionary(np.zeros((3, 3)), 2)
    x, y = _data(5, seed=0)
    fit = lasso_mirror_fit(x, y, 0.1, 2)
    with pytest.raises(ValueError, match="depth"):
        convex_gap(MirrorNet(3, 3), x, y, 0.1, fit=fit)
    with pytest.raises(ValueError, match="beta"):
        convex_gap(net, x, y, 0.2, fit=fit)
    with pytest.raises(ValueError, match="different data"):
        convex_gap(net, x, y + 1, 0.1, fit=fit)


def test_init_uses_own_generator_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = MirrorNet(5, 3, generator=torch.Generator().manual_seed(1))
    b = MirrorNet(5, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    bp = a.breakpoints()
    assert bp.ndim == 1 and torch.all(bp[1:] >= bp[:-1])


def test_repeated_x_values_match_independent_solve():
    x = np.array([0.0, 0.5, 0.5, 1.0, 2.0, 2.0, 3.0])
    y = np.array([1.0, 0.0, 0.4, 0.3, 1.0, 1.2, 0.0])
    fit = lasso_mirror_fit(x, y, 0.05, 3)
    ref = _lasso_scipy(fit.dictionary.numpy(), y, 0.05)
    assert fit.objective <= ref + 1e-9 and ref - fit.objective <= 1e-6 * fit.objective
    net = mirror_network(fit)
    J = float(network_objective(net, torch.tensor(x), torch.tensor(y), 0.05).detach())
    assert J == pytest.approx(fit.objective, rel=1e-12)


@pytest.mark.slow
def test_hundred_points_depth3_converges_to_tolerance():
    x, y = _data(100, seed=7)
    fit = lasso_mirror_fit(x, y, 0.01, 3, keep_dictionary=False)
    assert fit.dictionary is None and fit.params.shape[0] > 10_000
    assert fit.converged and fit.gap <= 1e-9 * fit.objective
    assert fit.support.numel() <= 100
    assert mirror_network(fit).width == fit.support.numel()
