"""The 1-D two-layer ReLU network as a Lasso over ``[(x − x_j)₊ | (x_j − x)₊]``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

import lightning_spectral.functional as LF
from lightning_spectral.functional.mirrors import (
    convex_gap,
    lasso_mirror_fit,
    mirror_features,
    mirror_network,
    network_objective,
    reflection_dictionary,
)
from lightning_spectral.models import MirrorNet, ReluMirrorNet

F64 = torch.float64


def _relu_dense(x: np.ndarray, a: float, s: float) -> np.ndarray:
    return np.maximum(s * (x - a), 0.0)


def _min_l1_interpolation(A: np.ndarray, y: np.ndarray) -> float:
    """Independent LP: min ‖z‖₁ s.t. A z + ξ1 = y (the Lasso as β → 0), via linprog."""
    n, p = A.shape
    c = np.concatenate([np.ones(2 * p), [0.0, 0.0]])
    A_eq = np.hstack([A, -A, np.ones((n, 1)), -np.ones((n, 1))])
    res = linprog(c, A_eq=A_eq, b_eq=y, bounds=(0, None), method="highs")
    assert res.status == 0
    return float(res.fun)


def _lasso_scipy(A: np.ndarray, y: np.ndarray, beta: float) -> float:
    """Independent Lasso solve: smooth bound-constrained reformulation, L-BFGS-B."""
    n, p = A.shape

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        zp, zm, xi = v[:p], v[p : 2 * p], v[-1]
        r = A @ (zp - zm) + xi - y
        g = A.T @ r
        val = 0.5 * r @ r + beta * (zp.sum() + zm.sum())
        return val, np.concatenate([g + beta, -g + beta, [r.sum()]])

    bounds = [(0, None)] * (2 * p) + [(None, None)]
    res = minimize(fun, np.zeros(2 * p + 1), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 50_000, "maxfun": 100_000, "ftol": 1e-15, "gtol": 1e-12})
    return float(res.fun)


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(-1, 1, n))
    return x, np.sin(3 * x) + 0.2 * rng.standard_normal(n)


# ------------------------------------------------------------------------------ dictionary


def test_relu_dictionary_columns_and_params():
    x = np.array([0.3, -1.0, 2.0, 0.5, 0.3])  # a repeated value adds no column
    A, params = reflection_dictionary(x, depth=2, activation="relu")
    u = np.array([0.3, -1.0, 2.0, 0.5])
    assert A.dtype == F64 and A.shape == (5, 8)
    diff = x[:, None] - u[None, :]
    want = np.hstack([np.maximum(diff, 0), np.maximum(-diff, 0)])
    np.testing.assert_array_equal(A.numpy(), want)
    np.testing.assert_array_equal(params.numpy(), np.stack(
        [np.concatenate([u, u]), np.concatenate([np.ones(4), -np.ones(4)])], 1))
    grid = np.linspace(-2, 3, 11)
    feats = mirror_features(grid, params, activation="relu").numpy()
    for j, (a, s) in enumerate(params.numpy()):
        np.testing.assert_array_equal(feats[:, j], _relu_dense(grid, a, s))


def test_relu_requires_depth_two_and_known_activation():
    x, y = _data(5, seed=0)
    with pytest.raises(ValueError, match="depth=2"):
        reflection_dictionary(x, depth=3, activation="relu")
    with pytest.raises(ValueError, match="depth=2"):
        lasso_mirror_fit(x, y, 0.1, depth=3, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        reflection_dictionary(x, depth=2, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        mirror_features(x, np.zeros((1, 2)), activation="gelu")


# ------------------------------------------------------------------------------ the Lasso


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_lasso_optimum_matches_independent_solve(beta):
    x, y = _data(8, seed=1)
    fit = lasso_mirror_fit(x, y, beta, depth=2, activation="relu")
    assert fit.activation == "relu" and fit.converged
    assert fit.gap <= 1e-9 * fit.objective and fit.kkt <= 1e-6
    ref = _lasso_scipy(fit.dictionary.numpy(), y, beta)
    assert fit.objective <= ref + 1e-9
    assert ref - fit.objective <= 1e-6 * fit.objective


def test_kkt_and_certificate_over_all_breakpoints_and_directions():
    x, y = _data(9, seed=2)
    beta = 0.04
    fit = lasso_mirror_fit(x, y, beta, depth=2, activation="relu")
    A, z, r = fit.dictionary.numpy(), fit.coef.numpy(), fit.residual.numpy()
    assert abs(r.sum()) <= 1e-10
    corr = A.T @ r
    on = z != 0
    assert on.any()
    np.testing.assert_allclose(corr[on], beta * np.sign(z[on]), rtol=1e-6)
    # sup over a continuous breakpoint a and both directions of |rᵀ(s(x − a))₊| is at most β
    a = np.linspace(-3.0, 3.0, 6001)
    for s in (1.0, -1.0):
        feats = np.maximum(s * (x[:, None] - a[None, :]), 0.0)
        assert np.max(np.abs(r @ feats)) <= beta * (1 + 1e-6)


def test_absolute_value_optimum_never_above_relu():
    # (x − a)₊ = ½|x − a| + ½(x − a) and a linear function is one |x − min x| on the data, so
    # any ReLU solution maps to an absolute-value one with no larger ℓ1 norm
    x, y = _data(10, seed=3)
    for beta in (0.01, 0.1):
        f_abs = lasso_mirror_fit(x, y, beta, depth=2)
        f_relu = lasso_mirror_fit(x, y, beta, depth=2, activation="relu")
        assert f_abs.objective <= f_relu.objective * (1 + 1e-9)


def test_known_minimum_l1_interpolants():
    x = np.array([-2.0, -1.0, 0.5, 1.5, 3.0])
    A, _ = reflection_dictionary(x, depth=2, activation="relu")
    A = A.numpy()
    # the V 3|x − 0.5| − 1 costs 3 with |·| but needs both directions with ReLU
    assert _min_l1_interpolation(A, 3 * np.abs(x - 0.5) - 1) == pytest.approx(6.0, abs=1e-9)
    # one ReLU, 3(x − 0.5)₊ − 1: cost 3; a line 2x + 1: cost 2 (one column, linear on the data)
    assert _min_l1_interpolation(A, 3 * np.maximum(x - 0.5, 0) - 1) == pytest.approx(3.0, abs=1e-9)
    assert _min_l1_interpolation(A, 2 * x + 1) == pytest.approx(2.0, abs=1e-9)
    # small β approaches the interpolant: ‖z‖₁ → 6, ξ → the V's offset, one unit per side
    fit = lasso_mirror_fit(x, 3 * np.abs(x - 0.5) - 1, 1e-6, depth=2, activation="relu")
    assert fit.l1_norm == pytest.approx(6.0, abs=1e-4)
    assert fit.breakpoints().tolist() == [0.5]
    assert sorted(fit.params[fit.support][:, 1].tolist()) == [-1.0, 1.0]


# ------------------------------------------------------------------------------ the network


def test_rebuilt_network_reproduces_the_lasso_exactly():
    x, y = _data(9, seed=4)
    beta = 0.03
    fit = lasso_mirror_fit(x, y, beta, depth=2, activation="relu")
    net = mirror_network(fit)
    assert isinstance(net, ReluMirrorNet) and not isinstance(net, MirrorNet)
    assert net.width == max(int((fit.coef != 0).sum()), 1)
    # predictions: on the data and everywhere else
    grid = torch.linspace(-3.0, 3.0, 241, dtype=F64)
    np.testing.assert_allclose(net(grid).detach().numpy(), fit.predict(grid).numpy(), atol=1e-12)
    np.testing.assert_allclose(net(torch.tensor(x)).detach().numpy(), y - fit.residual.numpy(),
                               atol=1e-12)
    # objective: J(network) = ½‖r‖² + β‖z‖₁ = the Lasso objective
    J = float(network_objective(net, torch.tensor(x), torch.tensor(y), beta).detach())
    assert J == pytest.approx(fit.objective, rel=1e-12, abs=1e-14)
    assert convex_gap(net, x, y, beta, fit=fit) == pytest.approx(0.0, abs=1e-12)
    # a kink shared by both directions appears once per unit in the network, once in the fit
    np.testing.assert_allclose(np.unique(net.breakpoints().numpy().round(12)),
                               fit.breakpoints().numpy(), atol=1e-12)


def test_network_objective_by_hand():
    net = ReluMirrorNet(2, dtype=F64)
    with torch.no_grad():
        net.w.copy_(torch.tensor([1.0, -2.0]))
        net.b.copy_(torch.tensor([0.0, 1.0]))
        net.alpha.copy_(torch.tensor([3.0, 0.5]))
        net.xi.fill_(-1.0)
    x = torch.tensor([0.0, 1.0], dtype=F64)
    y = torch.tensor([1.0, 0.0], dtype=F64)
    # f(0) = 3·0 + 0.5·(1)₊ − 1 = −0.5 ; f(1) = 3·1 + 0.5·(−1)₊ − 1 = 2
    J = 0.5 * ((-0.5 - 1) ** 2 + 2.0**2) + 0.7 / 2 * (1 + 4 + 9 + 0.25)
    assert float(network_objective(net, x, y, 0.7).detach()) == pytest.approx(J, rel=1e-14)
    assert net(x[:, None]).shape == (2, 1) and net(x).shape == (2,)
    np.testing.assert_allclose(net.breakpoints().numpy(), [0.0, 0.5])


def test_gap_never_negative_random_and_trained_networks():
    x, y = _data(12, seed=5)
    beta = 0.05
    fit = lasso_mirror_fit(x, y, beta, depth=2, activation="relu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert convex_gap(ReluMirrorNet(6, generator=gen), x, y, beta, fit=fit) >= -1e-9
    net = ReluMirrorNet(16, generator=torch.Generator().manual_seed(1))
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    optim = torch.optim.Adam(net.parameters(), lr=0.02)
    gaps = []
    for step in range(400):
        optim.zero_grad()
        network_objective(net, xt, yt, beta).backward()
        optim.step()
        if step % 100 == 99:
            gaps.append(convex_gap(net, x, y, beta, fit=fit))
    assert min(gaps) >= -1e-9
    assert gaps[-1] < gaps[0]
    # convex_gap solves the ReLU Lasso itself when no fit is given
    assert convex_gap(net, x, y, beta) == pytest.approx(gaps[-1], rel=1e-6, abs=1e-9)


def test_mismatched_fit_and_network_raise():
    x, y = _data(6, seed=6)
    fit_abs = lasso_mirror_fit(x, y, 0.1, depth=2)
    with pytest.raises(ValueError, match="activation"):
        convex_gap(ReluMirrorNet(3), x, y, 0.1, fit=fit_abs)
    fit_relu = lasso_mirror_fit(x, y, 0.1, depth=2, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        convex_gap(MirrorNet(3, depth=2), x, y, 0.1, fit=fit_relu)
    with pytest.raises(ValueError, match="width"):
        ReluMirrorNet(0)
    with pytest.raises(TypeError, match="ReluMirrorNet"):
        network_objective(torch.nn.Linear(1, 1), torch.zeros(2), torch.zeros(2), 0.1)


def test_exported_names():
    import lightning_spectral
    from lightning_spectral.functional import mirrors

    assert lightning_spectral.ReluMirrorNet is ReluMirrorNet
    assert lightning_spectral.MirrorNet is MirrorNet
    assert mirrors.MirrorNet is MirrorNet  # the old import path still resolves
    assert "ReluMirrorNet" not in LF.__all__  # functional defines no nn.Module
    assert LF.mirror_network is mirror_network
