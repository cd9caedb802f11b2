"""Hessian eigenpairs, Hutchinson trace and objective noise (docs/definitions.md#curvature).

Every quantity is checked against a value known from theory (quadratic losses with a chosen
spectrum) and against an independent dense float64 computation (``torch.func.hessian`` +
``torch.linalg.eigvalsh``, or NumPy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.func import hessian as func_hessian

from lightning_spectral.functional.curvature import (
    flat_gradients,
    flatten_tensors,
    hessian_eigenpairs,
    hessian_trace,
    hessian_vector_product,
    objective_noise,
)

# torch.func.hessian scripts helpers internally; not ours to fix
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
    pytest.mark.usefixtures("one_thread"),  # dense checks crawl with oversubscribed threads
]


def _quadratic(eigs: list[float], seed: int = 0):
    """``loss(θ) = ½ θᵀ A θ`` with ``A = Q diag(eigs) Qᵀ``; returns (loss_fn, params, A, Q)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    a = (a + a.T) / 2
    theta = torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_(True)
    # split into two tensors to exercise the flattening over several params
    p1 = theta[: n // 2].detach().clone().requires_grad_(True)
    p2 = theta[n // 2 :].detach().clone().reshape(-1, 1).requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        t = torch.cat([p1, p2.reshape(-1)])
        return 0.5 * t @ a @ t

    return loss_fn, [p1, p2], a, q


def _mlp_problem(widths: tuple[int, ...], n: int = 48, seed: int = 0):
    """A float64 tanh MLP with cross-entropy on random data, and its dense Hessian."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1]).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=torch.float64)
                             / math.sqrt(widths[i]) * 1.5)
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen, dtype=torch.float64))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers)
    x = torch.randn(n, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (n,), generator=gen)
    params = list(net.parameters())
    names = [name for name, _ in net.named_parameters()]

    def loss_fn() -> torch.Tensor:
        return nn.functional.cross_entropy(net(x), y)

    def loss_flat(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, [p.numel() for p in params])
        d = {nm: c.reshape(p.shape) for nm, c, p in zip(names, chunks, params, strict=True)}
        return nn.functional.cross_entropy(functional_call(net, d, (x,)), y)

    flat = flatten_tensors([p.detach() for p in params])
    dense = func_hessian(loss_flat)(flat)
    return loss_fn, params, (dense + dense.T) / 2


# ----------------------------------------------------------------------------- known values


def test_quadratic_top_eigenpairs_are_exact():
    eigs = [5.0, 3.0, 2.5, 1.0, 0.5, -0.25, -4.0] + [0.1 * i for i in range(1, 14)]
    loss_fn, params, a, q = _quadratic(eigs)
    vals, vecs = hessian_eigenpairs(loss_fn, params, k=3, tol=1e-10)
    torch.testing.assert_close(vals, torch.tensor([5.0, 3.0, 2.5], dtype=torch.float64),
                               rtol=1e-10, atol=1e-10)
    assert vecs.shape == (3, len(eigs))
    torch.testing.assert_close(vecs.norm(dim=1), torch.ones(3, dtype=torch.float64))
    for i in range(3):  # ± the known eigenvector
        assert abs(float(vecs[i] @ q[:, i])) == pytest.approx(1.0, abs=1e-8)


def test_algebraically_largest_not_largest_magnitude():
    loss_fn, params, _, _ = _quadratic([2.0, 1.0, 0.5, -10.0, -20.0, 0.25])
    vals, _ = hessian_eigenpairs(loss_fn, params, k=2, tol=1e-10)
    torch.testing.assert_close(vals, torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_low_rank_hessian_restarts_to_find_repeated_zeros():
    # rank-2 Hessian: the first Krylov block breaks down after 3 vectors
    eigs = [3.0, 1.0] + [0.0] * 10
    loss_fn, params, _, _ = _quadratic(eigs, seed=3)
    vals, vecs = hessian_eigenpairs(loss_fn, params, k=4, tol=1e-10)
    torch.testing.assert_close(vals, torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64),
                               atol=1e-10, rtol=0)
    gram = vecs @ vecs.T  # orthonormal eigenvectors, even for the repeated zeros
    torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)


def test_trace_of_diagonal_hessian_is_exact_with_zero_error():
    # Rademacher probes: z_j^T D z_j = tr D for every probe
    d = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    theta = torch.ones(4, dtype=torch.float64, requires_grad=True)
    est, se = hessian_trace(lambda: 0.5 * (d * theta**2).sum(), [theta], n_probes=8)
    assert float(est) == pytest.approx(4.5, abs=1e-12)
    assert float(se) == pytest.approx(0.0, abs=1e-12)


def test_trace_single_probe_has_nan_error():
    theta = torch.ones(3, dtype=torch.float64, requires_grad=True)
    _, se = hessian_trace(lambda: (theta**2).sum(), [theta], n_probes=1)
    assert math.isnan(float(se))


# ----------------------------------------------------------------------------- dense Hessians


def test_hvp_matches_dense_hessian():
    loss_fn, params, dense = _mlp_problem((5, 7, 3), n=16)
    v = torch.randn(dense.shape[0], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    torch.testing.assert_close(hessian_vector_product(loss_fn, params, v), dense @ v,
                               rtol=1e-10, atol=1e-12)


def _check_against_dense(widths: tuple[int, ...], n: int) -> None:
    loss_fn, params, dense = _mlp_problem(widths, n=n)
    ref = torch.linalg.eigvalsh(dense).flip(0)
    vals, vecs = hessian_eigenpairs(loss_fn, params, k=5, max_iter=300, tol=1e-8)
    rel = ((vals - ref[:5]).abs() / ref[:5].abs()).max()
    assert float(rel) < 1e-4, (vals, ref[:5])
    # eigenvectors: Rayleigh quotients and residuals against the dense matrix
    hv = vecs @ dense
    torch.testing.assert_close((hv * vecs).sum(1), vals, rtol=1e-6, atol=1e-10)
    assert float((hv - vals[:, None] * vecs).norm(dim=1).max()) < 1e-3 * float(ref[0])
    est, se = hessian_trace(loss_fn, params, n_probes=64, seed=2)
    assert abs(float(est) - float(torch.trace(dense))) <= 3 * float(se)
    assert float(se) > 0


def test_eigenpairs_and_trace_match_dense_hessian_small():
    _check_against_dense((6, 16, 12, 4), n=40)  # 352 parameters


@pytest.mark.slow
def test_eigenpairs_and_trace_match_dense_hessian_few_thousand_params():
    _check_against_dense((16, 40, 24, 4), n=48)  # 1,772 parameters


def test_float32_model_matches_float64_to_float32_accuracy():
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    x = torch.randn(32, 6, generator=gen)
    net64 = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    vals, vecs = hessian_eigenpairs(lambda: net(x).pow(2).mean(), list(net.parameters()), k=2)
    ref, _ = hessian_eigenpairs(lambda: net64(x.double()).pow(2).mean(),
                                list(net64.parameters()), k=2, tol=1e-10)
    assert vals.dtype == torch.float32 and vecs.dtype == torch.float32
    torch.testing.assert_close(vals.double(), ref, rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- side effects


def test_no_global_rng_no_grad_writes_and_seeded():
    loss_fn, params, _ = _mlp_problem((4, 6, 3), n=12)
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    state = torch.random.get_rng_state()
    v1, _ = hessian_eigenpairs(loss_fn, params, k=2, seed=5)
    t1 = hessian_trace(loss_fn, params, n_probes=4, seed=5)
    t2 = hessian_trace(loss_fn, params, n_probes=4, generator=torch.Generator().manual_seed(5))
    t3 = hessian_trace(loss_fn, params, n_probes=4, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params)
    assert torch.equal(t1[0], t2[0]) and not torch.equal(t1[0], t3[0])
    v2, _ = hessian_eigenpairs(loss_fn, params, k=2, seed=5)
    assert torch.equal(v1, v2)


def test_input_validation():
    theta = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="exceeds the number of parameters P=3"):
        hessian_eigenpairs(lambda: (theta**2).sum(), [theta], k=4)
    with pytest.raises(ValueError, match="does not require grad"):
        hessian_trace(lambda: (theta**2).sum(), [torch.ones(3)])
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        hessian_vector_product(lambda: (theta**2).sum(), [theta], torch.ones(4))
    with pytest.raises(ValueError, match="n_probes"):
        hessian_trace(lambda: (theta**2).sum(), [theta], n_probes=0)


def test_unused_and_linear_params_have_zero_hessian_blocks():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)  # enters linearly
    c = torch.ones(2, requires_grad=True)  # unused
    v = torch.ones(6)
    hv = hessian_vector_product(lambda: (a**2).sum() + b.sum(), [a, b, c], v)
    torch.testing.assert_close(hv, torch.tensor([2.0, 2.0, 0, 0, 0, 0]))


# ----------------------------------------------------------------------------- objective noise


def test_objective_noise_known_values():
    # rows ε_j = ±c q_1: s_1² = c², s_2² = 0 (NaN β, σ), λ_3 < 0 (NaN β, σ)
    q = torch.eye(3, dtype=torch.float64)
    c, lr, lam = 0.5, 0.1, torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
    g = torch.tensor([[c, 0, 1.0], [-c, 0, -1.0]], dtype=torch.float64) + 3.0
    out = objective_noise(g, lam, q, lr)
    torch.testing.assert_close(out.s2, torch.tensor([c**2, 0.0, 1.0], dtype=torch.float64))
    assert float(out.beta[0]) == pytest.approx(1 / (lr * 2.0 * c**2))
    assert float(out.sigma[0]) == pytest.approx(math.sqrt(lr * c**2 / (2 * 2)))
    assert math.isnan(float(out.beta[1])) and math.isnan(float(out.sigma[1]))
    assert math.isnan(float(out.beta[2])) and math.isnan(float(out.sigma[2]))
    # σ = (2 n β λ)^{-1/2} — both forms of docs/definitions.md#objective-noise agree
    assert float(out.sigma[0]) == pytest.approx((2 * 2 * float(out.beta[0]) * 2.0) ** -0.5)
    half = objective_noise(g, lam, q, lr, batch_size=4, n=10)
    assert float(half.s2[0]) == pytest.approx(c**2 / 4)
    assert float(half.sigma[0]) == pytest.approx(math.sqrt(lr * c**2 / 4 / 20))


def test_objective_noise_against_numpy():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(9, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    q = q[:, :3].T
    lam = np.array([4.0, 1.5, 0.3])
    eta, n = 0.05, 9
    eps = g - g.mean(0)
    s2 = np.array([np.mean((eps @ qi) ** 2) for qi in q])
    beta = 1 / (eta * lam * s2)
    sigma = np.sqrt(eta * s2 / (2 * n))
    out = objective_noise(torch.tensor(g), torch.tensor(lam), torch.tensor(q), eta)
    np.testing.assert_allclose(out.s2.numpy(), s2, rtol=1e-12)
    np.testing.assert_allclose(out.beta.numpy(), beta, rtol=1e-12)
    np.testing.assert_allclose(out.sigma.numpy(), sigma, rtol=1e-12)


def test_flat_gradients_are_per_sample_gradients():
    net = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = list(net.parameters())
    rows = flat_gradients([lambda i=i: net(x[i : i + 1]).pow(2).sum() for i in range(4)], params)
    # independent: d/dW (Wx+b)^2 summed = 2 (Wx+b) x^T, d/db = 2 (Wx+b)
    with torch.no_grad():
        out = net(x)
    want = torch.cat([(2 * out[:, :, None] * x[:, None, :]).reshape(4, -1), 2 * out], dim=1)
    torch.testing.assert_close(rows, want)


def test_objective_noise_validation():
    with pytest.raises(ValueError, match="eigenvectors must have shape"):
        objective_noise(torch.zeros(3, 4), torch.ones(1), torch.zeros(1, 5), 0.1)
    with pytest.raises(ValueError, match="lr must be positive"):
        objective_noise(torch.zeros(3, 4), torch.ones(1), torch.zeros(1, 4), 0.0)


# ----------------------------------------------------------------------------- which="magnitude"


def _diagonal(diag: list[float]):
    """``loss(θ) = ½ Σ d_i θ_i²``: the Hessian is ``diag(d)`` exactly."""
    d = torch.tensor(diag, dtype=torch.float64)
    theta = torch.ones(len(diag), dtype=torch.float64, requires_grad=True)
    return (lambda: 0.5 * (d * theta**2).sum()), [theta]


def test_which_largest_and_magnitude_on_a_known_diagonal_hessian():
    # PyHessian's "top-2" of diag(1, −5, 0.5, 0.2) is [−5, 1]; the algebraic top-2 is [1, 0.5]
    loss_fn, params = _diagonal([1.0, -5.0, 0.5, 0.2])
    largest, _ = hessian_eigenpairs(loss_fn, params, k=2, tol=1e-12)
    default, _ = hessian_eigenpairs(loss_fn, params, k=2, tol=1e-12, which="largest")
    magnitude, vecs = hessian_eigenpairs(loss_fn, params, k=2, tol=1e-12, which="magnitude")
    f64 = torch.float64
    torch.testing.assert_close(largest, torch.tensor([1.0, 0.5], dtype=f64), rtol=0, atol=1e-12)
    torch.testing.assert_close(default, largest, rtol=0, atol=0)
    torch.testing.assert_close(magnitude, torch.tensor([-5.0, 1.0], dtype=f64), rtol=0,
                               atol=1e-12)
    # the eigenvectors are ± the coordinate axes of −5 and 1
    assert abs(float(vecs[0, 1])) == pytest.approx(1.0, abs=1e-10)
    assert abs(float(vecs[1, 0])) == pytest.approx(1.0, abs=1e-10)


def test_which_magnitude_before_the_krylov_space_is_exhausted():
    # 60 parameters, k=3, at most 32 products: the two ends converge first
    rest = [0.01 * i for i in range(1, 56)]
    loss_fn, params, _, q = _quadratic([4.0, -9.0, 3.0, -2.5, 1.5] + rest, seed=2)
    vals, vecs = hessian_eigenpairs(loss_fn, params, k=3, tol=1e-10, which="magnitude")
    torch.testing.assert_close(vals, torch.tensor([-9.0, 4.0, 3.0], dtype=torch.float64),
                               rtol=0, atol=1e-8)
    for row, col in ((0, 1), (1, 0), (2, 2)):  # ± the known eigenvectors
        assert abs(float(vecs[row] @ q[:, col])) == pytest.approx(1.0, abs=1e-6)
    top, _ = hessian_eigenpairs(loss_fn, params, k=3, tol=1e-10)
    torch.testing.assert_close(top, torch.tensor([4.0, 3.0, 1.5], dtype=torch.float64),
                               rtol=0, atol=1e-8)


def test_which_magnitude_ties_put_the_positive_eigenvalue_first():
    loss_fn, params = _diagonal([2.0, -3.0, 3.0, 0.5])
    vals, _ = hessian_eigenpairs(loss_fn, params, k=3, tol=1e-12, which="magnitude")
    torch.testing.assert_close(vals, torch.tensor([3.0, -3.0, 2.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_which_matches_a_dense_float64_hessian_of_a_tiny_net():
    """Reference: ``torch.autograd.functional.hessian`` + ``eigh`` (dense, float64)."""
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).double()  # 99 params
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(1.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    sizes = [p.numel() for p in params]

    def loss_of(*tensors: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, dict(zip(names, tensors, strict=True)), (x,))
        return (out - y).pow(2).mean()

    blocks = torch.autograd.functional.hessian(loss_of, tuple(p.detach() for p in params))
    dense = torch.cat([
        torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
        for i in range(len(params))
    ])
    dense = (dense + dense.T) / 2
    evals, evecs = torch.linalg.eigh(dense)
    k = 4
    by_size = sorted(range(len(evals)), key=lambda i: (-abs(float(evals[i])), -float(evals[i])))
    ref_mag = evals[by_size[:k]]
    ref_top = evals.flip(0)[:k]
    assert bool((ref_mag < 0).any()), "the example needs negative curvature among the top |λ|"
    assert not torch.allclose(ref_mag, ref_top)

    def closure() -> torch.Tensor:
        return loss_of(*params)

    mag, vecs = hessian_eigenpairs(closure, params, k=k, tol=1e-10, max_iter=99,
                                   which="magnitude")
    top, _ = hessian_eigenpairs(closure, params, k=k, tol=1e-10, max_iter=99)
    torch.testing.assert_close(mag, ref_mag, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(top, ref_top, rtol=1e-8, atol=1e-10)
    for i in range(k):  # each eigenvector is ± the dense one
        assert abs(float(vecs[i] @ evecs[:, by_size[i]])) == pytest.approx(1.0, abs=1e-6)


def test_which_is_validated():
    loss_fn, params = _diagonal([1.0, 2.0])
    with pytest.raises(ValueError, match="which must be one of"):
        hessian_eigenpairs(loss_fn, params, k=1, which="smallest")  # type: ignore[arg-type]
