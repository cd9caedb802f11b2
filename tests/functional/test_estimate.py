"""Estimated weight statistics of large matrices (docs/definitions.md#large-weights).

(lightning_spectral.functional.estimate.) Matrices with known spectra ``W = U diag(s) Vᵀ``
(``U``, ``V`` from the QR of seeded Gaussians) are compared with the statistics of a float64
``torch.linalg.svdvals`` computed here from docs/definitions.md (#stable-rank, #erank,
#capacity), and with closed-form values where the spectrum gives them.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_spectral.functional.estimate import (
    ESTIMATE_SEED,
    estimate_weight,
    spectrum_sketch,
    top_singular_value,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F32 = torch.float32
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen(seed), dtype=F64)).Q


def known(s: torch.Tensor, m: int | None = None, n: int | None = None, seed: int = 0,
          dtype: torch.dtype = F32) -> torch.Tensor:
    """``U diag(s) Vᵀ`` of shape ``(m, n)`` (default square), built in float64."""
    r = s.numel()
    m, n = m or r, n or r
    u, v = orthonormal(m, r, seed), orthonormal(n, r, seed + 1)
    return ((u * s.to(F64)) @ v.T).to(dtype)


def reference(w: torch.Tensor) -> dict[str, float]:
    """The logged statistics of ``w`` from a float64 ``svdvals`` (docs/definitions.md)."""
    s = torch.linalg.svdvals(w.to(F64).reshape(w.shape[0], -1))
    s2 = s.square()
    total = float(s2.sum())
    p = s2 / total
    p = p[p > 0]
    cum = torch.cumsum(s2, 0) / total
    return {
        "sv_max": float(s[0]),
        "stable_rank": total / float(s2[0]),
        "erank": math.exp(float(-(p * p.log()).sum())),
        "rank90": float(int((cum < 0.9 - 1e-12).sum()) + 1),
        "rank99": float(int((cum < 0.99 - 1e-12).sum()) + 1),
    }


def estimated(w: torch.Tensor, **kwargs) -> dict[str, float]:
    e = estimate_weight(w, **kwargs)
    return {
        "sv_max": float(e.sv_max),
        "stable_rank": float(e.stable_rank),
        "erank": float(e.effective_rank),
        "rank90": float(e.truncation_rank(0.9)),
        "rank99": float(e.truncation_rank(0.99)),
    }


def gaussian_plus_low_rank(d: int, seed: int = 3) -> torch.Tensor:
    """Like a trained weight: a Gaussian bulk (Marchenko–Pastur) plus a power-law spike part."""
    bulk = torch.randn(d, d, generator=gen(seed), dtype=F64) / math.sqrt(d)
    i = torch.arange(1, 33, dtype=F64)
    spikes = known(3.0 * i**-0.6, d, d, seed=seed + 10, dtype=F64)
    return (0.5 * bulk + spikes).to(F32)


def index(d: int) -> torch.Tensor:
    return torch.arange(1, d + 1, dtype=F64)


# (name, matrix builder, relative tolerance on erank / on rank90 and rank99)
CASES = {
    "powerlaw_half": (lambda: known(index(512) ** -0.5), 0.01, 0.02),
    "powerlaw_one": (lambda: known(index(512) ** -1.0), 0.01, 0.03),
    "flat": (lambda: known(torch.ones(512)), 1e-4, 0.0),
    "rank_deficient": (lambda: known(torch.cat([torch.linspace(2, 1, 60, dtype=F64),
                                                 torch.zeros(452, dtype=F64)])), 1e-4, 0.0),
    "gap_1.0001": (lambda: known(torch.cat([torch.tensor([1.0001], dtype=F64),
                                             torch.ones(511, dtype=F64)])), 1e-4, 0.0),
    "bulk_and_spikes": (lambda: gaussian_plus_low_rank(1024), 0.01, 0.025),
    "wide_conv": (lambda: known(index(448) ** -0.7, 448, 1152).reshape(448, 128, 3, 3),
                  0.01, 0.03),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimates_against_float64_svd(case: str) -> None:
    build, tol_erank, tol_rank = CASES[case]
    w = build()
    want = reference(w)
    got = estimated(w)
    for key in ("sv_max", "stable_rank"):
        assert got[key] == pytest.approx(want[key], rel=0.01), key
    assert got["erank"] == pytest.approx(want["erank"], rel=max(tol_erank, 1e-5))
    for key in ("rank90", "rank99"):
        # ranks are integers: allow the relative tolerance, and at least exactness at 0
        assert abs(got[key] - want[key]) <= tol_rank * want[key] + 1e-9, (key, got, want)


def test_sigma_max_meets_its_tolerance_and_never_overshoots() -> None:
    w = gaussian_plus_low_rank(512, seed=5)
    s1 = float(torch.linalg.svdvals(w.to(F64))[0])
    top = top_singular_value(w, tol=1e-6)
    assert float(top.value) <= s1 * (1 + 1e-6)  # a Ritz value: a lower bound up to rounding
    assert float(top.value) == pytest.approx(s1, rel=1e-5)
    # the residual bounds the distance of σ̃² to the spectrum (here: to σ_1²)
    assert abs(float(top.value) ** 2 - s1**2) <= float(top.residual) + 1e-5 * s1**2
    v = top.vector
    assert v is not None and v.shape == (512,)
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float((w @ v).norm()) == pytest.approx(s1, rel=1e-5)


def test_warm_start_needs_fewer_iterations() -> None:
    d = 512
    w = torch.randn(d, d, generator=gen(11)) / math.sqrt(d)  # a Marchenko–Pastur edge: slow
    cold = top_singular_value(w)
    step = w + 1e-3 * torch.randn(d, d, generator=gen(12)) / math.sqrt(d)  # like one SGD step
    warm = top_singular_value(step, cold.vector)
    again_cold = top_singular_value(step)
    s1 = float(torch.linalg.svdvals(step.to(F64))[0])
    assert warm.iterations < again_cold.iterations
    assert 3 * warm.iterations <= again_cold.iterations
    assert float(warm.value) == pytest.approx(s1, rel=1e-3)
    assert float(again_cold.value) == pytest.approx(s1, rel=1e-3)


def test_start_vectors_that_cannot_be_used_fall_back_to_a_cold_start() -> None:
    w = known(index(256) ** -0.5)
    cold = top_singular_value(w)
    for v0 in (torch.zeros(256), torch.full((256,), math.nan), torch.ones(17)):
        top = top_singular_value(w, v0)
        assert torch.equal(top.value, cold.value) and top.iterations == cold.iterations


def test_tolerance_controls_the_iterations() -> None:
    w = torch.randn(384, 384, generator=gen(2)) / math.sqrt(384)
    loose = top_singular_value(w, tol=1e-2)
    tight = top_singular_value(w, tol=1e-6)
    assert loose.iterations < tight.iterations
    s1 = float(torch.linalg.svdvals(w.to(F64))[0])
    assert float(loose.value) == pytest.approx(s1, rel=0.01)


def test_known_values_flat_and_rank_deficient() -> None:
    # c·I-like spectra: srank = erank = n, k(τ) = ⌈τ n⌉ (docs/definitions.md#capacity)
    got = estimated(known(2.0 * torch.ones(640)))
    assert got["sv_max"] == pytest.approx(2.0, rel=1e-5)
    assert got["stable_rank"] == pytest.approx(640, rel=1e-4)
    assert got["erank"] == pytest.approx(640, rel=1e-4)
    assert got["rank90"] == math.ceil(0.9 * 640) and got["rank99"] == math.ceil(0.99 * 640)
    # rank 40 of 600, equal values: everything is 40 and ⌈τ 40⌉
    s = torch.cat([torch.ones(40, dtype=F64), torch.zeros(560, dtype=F64)])
    got = estimated(known(s))
    assert got["erank"] == pytest.approx(40, rel=1e-4)
    assert got["stable_rank"] == pytest.approx(40, rel=1e-4)
    assert (got["rank90"], got["rank99"]) == (36, 40)


def test_small_matrix_sketch_is_the_exact_spectrum() -> None:
    # r ≤ probes · steps: the Krylov space is everything, the nodes are the eigenvalues
    w = torch.randn(200, 90, generator=gen(4), dtype=F64)
    sk = spectrum_sketch(w)
    want = torch.linalg.svdvals(w).square()
    assert sk.size == 90 and sk.krylov_dim == 90
    assert torch.allclose(sk.nodes, want, rtol=1e-10)
    assert torch.equal(sk.weights, torch.ones(90, dtype=F64)) and bool(sk.exact.all())
    ref = reference(w)
    assert float(sk.effective_rank()) == pytest.approx(ref["erank"], rel=1e-10)
    assert float(sk.truncation_rank(0.9)) == ref["rank90"]


def test_sketch_holds_the_exact_count_and_energy() -> None:
    w = gaussian_plus_low_rank(768)
    sk = spectrum_sketch(w)
    assert float(sk.weights.sum()) == pytest.approx(768, rel=1e-9)
    energy = float(w.to(F64).square().sum())
    assert float(sk.energy) == pytest.approx(energy, rel=1e-6)
    assert float((sk.weights * sk.nodes).sum()) == pytest.approx(energy, rel=1e-6)
    assert bool((sk.weights >= 0).all())
    assert sk.krylov_dim <= 32 * 12
    assert bool((sk.nodes[:-1] >= sk.nodes[1:]).all())
    # the spikes are found and counted one each: every exact node is an eigenvalue
    exact = torch.linalg.svdvals(w.to(F64)).square()
    found = sk.nodes[sk.exact]
    assert found.numel() >= 16
    nearest = (found[:, None] - exact[None, :]).abs().min(dim=1).values
    assert bool((nearest <= 1e-5 * exact[0]).all())


def test_one_row_and_one_column() -> None:
    row = torch.arange(1.0, 9.0).reshape(1, 8)
    for w in (row, row.T.contiguous()):
        e = estimate_weight(w)
        assert float(e.sv_max) == pytest.approx(float(row.norm()), rel=1e-6)
        assert float(e.stable_rank) == pytest.approx(1.0, rel=1e-6)
        assert float(e.effective_rank) == pytest.approx(1.0, rel=1e-6)
        assert float(e.truncation_rank(0.9)) == 1.0 == float(e.truncation_rank(0.99))


def test_zero_matrix() -> None:
    e = estimate_weight(torch.zeros(300, 200))
    assert float(e.sv_max) == 0.0 and math.isnan(float(e.stable_rank))
    assert float(e.effective_rank) == 0.0
    assert float(e.truncation_rank(0.9)) == 0.0 == float(e.truncation_rank(0.99))
    assert float(top_singular_value(torch.zeros(5, 7)).value) == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_gives_nan_without_raising(bad: float) -> None:
    w = torch.randn(300, 300, generator=gen(0))
    w[7, 3] = bad
    e = estimate_weight(w, v0=torch.randn(300, generator=gen(1)))
    for value in (e.sv_max, e.stable_rank, e.effective_rank, e.truncation_rank(0.9),
                  e.truncation_rank(0.99), e.frobenius_sq):
        assert math.isnan(float(value))
    assert e.vector is None
    top = top_singular_value(w)
    assert math.isnan(float(top.value)) and top.vector is None
    sk = spectrum_sketch(w)
    assert math.isnan(float(sk.effective_rank())) and math.isnan(float(sk.truncation_rank()))


def test_float64_path() -> None:
    w = known(index(512) ** -0.5, dtype=F64)
    e = estimate_weight(w)
    assert e.sv_max.dtype == F64 and e.effective_rank.dtype == F64
    assert e.vector is not None and e.vector.dtype == F64
    want = reference(w)
    assert float(e.sv_max) == pytest.approx(want["sv_max"], rel=1e-8)
    assert float(e.stable_rank) == pytest.approx(want["stable_rank"], rel=1e-8)
    assert float(e.effective_rank) == pytest.approx(want["erank"], rel=0.01)
    # dtype="float64" on float32 input computes in float64 too
    assert estimate_weight(w.to(F32), dtype="float64").sv_max.dtype == F64
    assert estimate_weight(w.to(F32)).sv_max.dtype == F32


def test_deterministic_and_leaves_the_global_rng_alone() -> None:
    w = gaussian_plus_low_rank(512)
    state = torch.get_rng_state()
    a, b = estimate_weight(w), estimate_weight(w)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.sv_max, b.sv_max) and torch.equal(a.sketch.nodes, b.sketch.nodes)
    assert torch.equal(a.sketch.weights, b.sketch.weights)
    other = estimate_weight(w, seed=ESTIMATE_SEED + 1)
    assert not torch.equal(other.sketch.weights, a.sketch.weights)  # the probes come from seed


def test_more_probes_and_steps_tighten_the_estimate() -> None:
    w = gaussian_plus_low_rank(512, seed=9)
    want = reference(w)["rank90"]
    rough = abs(float(spectrum_sketch(w, probes=4, steps=3).truncation_rank(0.9)) - want)
    fine = abs(float(spectrum_sketch(w, probes=64, steps=8).truncation_rank(0.9)) - want)
    assert fine <= max(rough, 1.0) and fine <= 0.02 * want


def test_no_gradient_is_kept() -> None:
    w = torch.randn(128, 96, generator=gen(1), requires_grad=True)
    e = estimate_weight(w)
    assert not e.sv_max.requires_grad and not e.stable_rank.requires_grad
    assert e.vector is not None and not e.vector.requires_grad


@pytest.mark.parametrize("kwargs", [dict(tol=0.0), dict(tol=1.5), dict(probes=1),
                                    dict(steps=0), dict(probes=2.5), dict(steps=True)])
def test_bad_options_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        estimate_weight(torch.ones(4, 4), **kwargs)


def test_bad_energy_raises() -> None:
    sk = spectrum_sketch(torch.ones(4, 4))
    with pytest.raises(ValueError, match="energy"):
        sk.truncation_rank(0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_matches_cpu() -> None:
    w = gaussian_plus_low_rank(1024)
    got = estimate_weight(w.cuda())
    assert got.sv_max.device.type == "cuda"
    want = reference(w)
    assert float(got.sv_max) == pytest.approx(want["sv_max"], rel=0.01)
    assert float(got.stable_rank) == pytest.approx(want["stable_rank"], rel=0.01)
    assert float(got.effective_rank) == pytest.approx(want["erank"], rel=0.01)
    assert float(got.truncation_rank(0.9)) == pytest.approx(want["rank90"], rel=0.03)


def test_quantity_table_marks_the_estimated_quantities() -> None:
    from lightning_spectral.functional.quantities import (
        ESTIMATED_QUANTITIES,
        estimate_quantities,
        quantity,
    )

    assert ESTIMATED_QUANTITIES == ("weight_stable_rank", "weight_erank", "weight_sv_max",
                                    "weight_rank90", "weight_rank99")
    assert quantity("weight_alpha").estimate is None and quantity("vne").estimate is None
    e = estimate_weight(known(index(512) ** -0.5))
    got = estimate_quantities(ESTIMATED_QUANTITIES, [e, e])
    assert got.shape == (2, 5) and got.dtype == F32
    want = torch.stack([e.stable_rank, e.effective_rank, e.sv_max, e.truncation_rank(0.9),
                        e.truncation_rank(0.99)])
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    with pytest.raises(ValueError, match="weight_alpha"):
        estimate_quantities(["weight_sv_max", "weight_alpha"], [e])
