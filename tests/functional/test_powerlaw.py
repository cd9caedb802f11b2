"""Power-law exponent α of eigenvalue spectra (lightning_spectral.functional.powerlaw).

Known values (exact Pareto samples), closed forms against numpy and scipy in float64, the
x_min search against an independent loop over the candidates (written from the documented
conventions), batching, degenerate input, and host synchronisations. WeightWatcher's own fit is
compared only when it is installed (``make bench`` installs it).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math

import numpy as np
import pytest
import scipy.stats
import torch

from lightning_spectral.functional.powerlaw import PowerLawFit, powerlaw_alpha, weight_alpha
from lightning_spectral.testing import count_host_syncs

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- references
def ref_search(evals: np.ndarray, threshold: float = 1e-5, small_n: int = 20,
               two_sided: bool = False) -> tuple[float, float, float, int]:
    """``(α, x_min, D, n_tail)`` by an explicit loop over the candidates, in float64.

    Candidates: the ascending eigenvalues above ``threshold``, all but the largest; candidate
    ``i`` has the tail ``x[i:]``. Below ``small_n`` kept values: ``α = 1 + (n−1)/S``, only tails
    with ``n ≥ 8`` and ``S > 1e-12``, falling back to the whole spectrum.
    """
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > threshold]
    size = len(x)
    small = size < small_n
    best = (math.inf, None)
    for i in range(size - 1):
        n = size - i
        s = float(np.sum(np.log(x[i:] / x[i])))
        if small and (n < 8 or s <= 1e-12):
            continue
        alpha = 1.0 + ((n - 1) if small else n) / s if s > 0 else math.inf
        cdf = 1.0 - (x[i:] / x[i]) ** (1.0 - alpha) if s > 0 else np.zeros(n)
        steps = np.arange(n) / n
        if two_sided:
            d = max(np.max(cdf - steps), np.max(steps + 1.0 / n - cdf))
        else:
            d = float(np.max(np.abs(cdf - steps)))
        if d < best[0]:
            best = (d, (alpha, x[i], d, n))
    if best[1] is None:  # small-sample fallback: the whole spectrum is the tail
        s = float(np.sum(np.log(x / x[0])))
        alpha = 1.0 + (size - 1) / s if s > 1e-12 else math.inf
        cdf = 1.0 - (x / x[0]) ** (1.0 - alpha) if s > 1e-12 else np.zeros(size)
        d = float(np.max(np.abs(cdf - np.arange(size) / size)))
        return alpha, x[0], d, size
    return best[1]


def pareto(alpha: float, n: int, xmin: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Exact Pareto sample, density ∝ x^{−α} on [xmin, ∞): x = xmin · U^{−1/(α−1)}."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return xmin * (1.0 - u).pow(-1.0 / (alpha - 1.0))


@functools.cache
def spectra(seed: int = 0) -> list[np.ndarray]:
    """Varied spectra: Marchenko–Pastur-like, heavy-tailed, log-normal, with zeros and ties."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, m in enumerate((9, 15, 19, 20, 37, 120, 300)):
        w = torch.randn(m, 2 * m, generator=g, dtype=torch.float64) / math.sqrt(2 * m)
        out.append(torch.linalg.svdvals(w).square().numpy())
        out.append(rng.pareto(1.5 + 0.5 * k, m) + 0.3)
        out.append(np.exp(rng.standard_normal(m)))
    with_zeros = np.concatenate([np.zeros(40), rng.pareto(2.0, 60) + 1.0])
    ties = np.round(rng.pareto(2.0, 80) + 1.0, 1)
    return out + [with_zeros, ties]


# ------------------------------------------------------------------------------ known values
@pytest.mark.parametrize("alpha", [2.5, 3.0, 4.0])
def test_recovers_the_exponent_of_an_exact_pareto_sample(alpha):
    fit = powerlaw_alpha(pareto(alpha, 2000, xmin=1.0, seed=0))
    assert isinstance(fit, PowerLawFit)
    assert abs(fit.alpha.item() / alpha - 1.0) < 0.03, fit
    assert 1.0 <= fit.xmin.item() < 1.2, fit  # near the true x_min = 1
    assert fit.n_tail.item() >= 1500
    assert 0.0 < fit.D.item() < 0.05


def test_recovers_the_tail_above_a_body():
    # 1000 values spread below the tail, then the Pareto tail from x_min = 2
    g = torch.Generator().manual_seed(3)
    body = 0.1 + 1.9 * torch.rand(1000, generator=g, dtype=torch.float64)
    fit = powerlaw_alpha(torch.cat([body, pareto(3.0, 2000, xmin=2.0, seed=3)]))
    assert abs(fit.alpha.item() / 3.0 - 1.0) < 0.03, fit
    assert 1.9 < fit.xmin.item() < 2.3, fit


# ------------------------------------------------------------------------- closed forms
def test_mle_at_a_fixed_xmin_matches_numpy():
    x = pareto(2.5, 500, xmin=0.5, seed=1).numpy()
    for xmin in (0.5, 0.8, 2.0):
        tail = x[x >= xmin]
        want = 1.0 + len(tail) / np.sum(np.log(tail / xmin))
        fit = powerlaw_alpha(torch.from_numpy(x), xmin=xmin)
        assert fit.alpha.dtype == torch.float64
        assert fit.alpha.item() == pytest.approx(want, rel=1e-12)
        assert fit.n_tail.item() == len(tail)
        assert fit.xmin.item() == xmin
        assert fit.alpha_weighted.item() == pytest.approx(want * np.log10(x.max()), rel=1e-12)


@pytest.mark.parametrize("xmin", [1.0, 1.5])
def test_ks_distance_at_a_fixed_xmin_matches_scipy(xmin):
    x = pareto(3.0, 400, seed=2).numpy()
    fit2 = powerlaw_alpha(torch.from_numpy(x), xmin=xmin, ks="two_sided")
    fitw = powerlaw_alpha(torch.from_numpy(x), xmin=xmin)
    a = fit2.alpha.item()
    assert a == fitw.alpha.item()
    tail = x[x >= xmin]
    n = len(tail)

    def cdf(v):
        return 1.0 - (v / xmin) ** (1.0 - a)

    two = scipy.stats.kstest(tail, cdf).statistic
    plus = scipy.stats.kstest(tail, cdf, alternative="greater").statistic  # max (j+1)/n − F
    minus = scipy.stats.kstest(tail, cdf, alternative="less").statistic  # max F − j/n
    assert fit2.D.item() == pytest.approx(two, abs=1e-12)
    # WeightWatcher's distance, |F − j/n|, is max(D⁻, D⁺ − 1/n)
    assert fitw.D.item() == pytest.approx(max(minus, plus - 1.0 / n), abs=1e-12)


@pytest.mark.parametrize("two_sided", [False, True])
def test_xmin_search_matches_a_loop_over_candidates(two_sided):
    ks = "two_sided" if two_sided else "weightwatcher"
    for ev in spectra():
        want = ref_search(ev, two_sided=two_sided)
        fit = powerlaw_alpha(torch.from_numpy(ev), ks=ks)
        got = (fit.alpha.item(), fit.xmin.item(), fit.D.item(), fit.n_tail.item())
        assert got[0] == pytest.approx(want[0], rel=1e-9), (len(ev), got, want)
        assert got[1] == want[1] and got[3] == want[3], (len(ev), got, want)
        assert got[2] == pytest.approx(want[2], abs=1e-9)


def test_small_n_zero_turns_the_small_sample_fit_off():
    ev = spectra()[0]  # 9 eigenvalues
    assert len(ev) < 20
    plain = powerlaw_alpha(torch.from_numpy(ev), small_n=0)
    want = ref_search(ev, small_n=0)
    assert plain.alpha.item() == pytest.approx(want[0], rel=1e-9)
    assert plain.xmin.item() == want[1]
    assert plain.alpha.item() != powerlaw_alpha(torch.from_numpy(ev)).alpha.item()


def test_scale_moves_xmin_and_alpha_weighted_only():
    x = pareto(3.0, 300, seed=4)
    a, b = powerlaw_alpha(x), powerlaw_alpha(x * 100.0)
    assert b.alpha.item() == pytest.approx(a.alpha.item(), rel=1e-9)
    assert b.xmin.item() == pytest.approx(100.0 * a.xmin.item(), rel=1e-12)
    assert b.alpha_weighted.item() == pytest.approx(a.alpha_weighted.item() + 2 * a.alpha.item(),
                                                    rel=1e-9)


# ------------------------------------------------------------------------------ batching
def test_batched_equals_per_item_and_zero_padding_is_neutral():
    evs = spectra(1)[:12]
    m = max(len(e) for e in evs)
    padded = torch.zeros(len(evs), m, dtype=torch.float64)
    for i, e in enumerate(evs):
        padded[i, : len(e)] = torch.from_numpy(np.random.default_rng(i).permutation(e))
    batched = powerlaw_alpha(padded.reshape(3, 4, m))
    assert batched.alpha.shape == (3, 4)
    for i, e in enumerate(evs):
        one = powerlaw_alpha(torch.from_numpy(e))
        assert batched.xmin.reshape(-1)[i] == one.xmin  # the same eigenvalue is chosen
        for field in PowerLawFit._fields:  # the sums may be taken in another order
            got = getattr(batched, field).reshape(-1)[i]
            torch.testing.assert_close(got, getattr(one, field), rtol=1e-12, atol=0.0)


def test_fixed_xmin_broadcasts_over_the_batch():
    x = torch.stack([pareto(2.5, 200, seed=5), pareto(4.0, 200, seed=6)])
    both = powerlaw_alpha(x, xmin=torch.tensor([1.0, 1.5], dtype=torch.float64))
    for i, xmin in enumerate((1.0, 1.5)):
        one = powerlaw_alpha(x[i], xmin=xmin)
        assert both.alpha[i].item() == pytest.approx(one.alpha.item(), rel=1e-12)
        assert both.xmin[i].item() == xmin and both.n_tail[i] == one.n_tail


def test_dtype_and_device_follow_the_input():
    x = pareto(3.0, 100)
    assert powerlaw_alpha(x.float()).alpha.dtype == torch.float32
    assert powerlaw_alpha(x.half()).alpha.dtype == torch.float32
    assert powerlaw_alpha((x * 10).long()).alpha.dtype == torch.float32
    assert powerlaw_alpha(x.float()).alpha.item() == pytest.approx(
        powerlaw_alpha(x).alpha.item(), rel=1e-5)


# ------------------------------------------------------------------------------ degenerate
def test_equal_eigenvalues_give_infinite_alpha_not_nan():
    for m in (30, 10):  # standard and small-sample fit
        fit = powerlaw_alpha(torch.full((m,), 2.0))
        assert fit.alpha.item() == math.inf
        assert fit.xmin.item() == 2.0
        assert not any(torch.isnan(v).item() for v in fit)
    fit = powerlaw_alpha(torch.ones(30))
    assert fit.alpha.item() == math.inf and fit.alpha_weighted.item() == 0.0  # log10(1) = 0
    assert fit.D.item() == 0.5  # the last candidate, a tail of 2: |0 − 1/2|


def test_undefined_spectra_give_nan_without_raising():
    rows = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],  # all zeros: nothing above the threshold
        [0.0, 1e-6, 0.0, 5.0],  # one eigenvalue above the threshold
        [1.0, float("nan"), 2.0, 3.0],
        [1.0, float("inf"), 2.0, 3.0],
        [1.0, 2.0, 3.0, 4.0],  # fine
    ])
    fit = powerlaw_alpha(rows)
    for field in fit:
        assert torch.isnan(field[:4]).all()
        assert torch.isfinite(field[4])
    assert powerlaw_alpha(torch.empty(0)).alpha.isnan().all()
    assert powerlaw_alpha(torch.empty(2, 0)).alpha.shape == (2,)
    assert powerlaw_alpha(torch.empty(0, 5)).alpha.shape == (0,)
    # a fixed xmin above every eigenvalue leaves no tail
    assert powerlaw_alpha(torch.tensor([1.0, 2.0, 3.0]), xmin=10.0).alpha.isnan().item()
    assert powerlaw_alpha(torch.tensor([1.0, 2.0]), xmin=torch.tensor(-1.0)).alpha.isnan().item()


def test_invalid_arguments_raise():
    x = torch.rand(10)
    with pytest.raises(ValueError, match="shape"):
        powerlaw_alpha(torch.tensor(1.0))
    with pytest.raises(ValueError, match="ks"):
        powerlaw_alpha(x, ks="kuiper")
    with pytest.raises(ValueError, match="threshold"):
        powerlaw_alpha(x, threshold=-1.0)
    with pytest.raises(ValueError, match="small_n"):
        powerlaw_alpha(x, small_n=-1)
    with pytest.raises(ValueError, match="xmin"):
        powerlaw_alpha(x, xmin=0.0)
    with pytest.raises(ValueError, match="conv"):
        weight_alpha(torch.randn(4, 3), conv="taps")
    with pytest.raises(ValueError, match="shape"):
        weight_alpha(torch.randn(4))


def test_no_host_synchronisation():
    x = torch.rand(4, 64) ** -2.0
    w = torch.randn(32, 8, 3, 3)
    with count_host_syncs("cpu") as syncs:
        powerlaw_alpha(x)
        powerlaw_alpha(x, xmin=torch.ones(4), ks="two_sided")
        weight_alpha(w)
        weight_alpha(w, conv="weightwatcher")
    assert syncs.count == 0, syncs.describe()


# ------------------------------------------------------------------------------ weights
def test_weight_alpha_fits_the_squared_singular_values():
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=torch.float64) / 8.0
    lam = np.linalg.svd(w.numpy(), compute_uv=False) ** 2
    fit = weight_alpha(w)
    want = ref_search(lam)
    assert fit.alpha.item() == pytest.approx(want[0], rel=1e-9)
    assert fit.xmin.item() == pytest.approx(want[1], rel=1e-12)
    assert fit.alpha_weighted.item() == pytest.approx(want[0] * np.log10(lam.max()), rel=1e-9)
    # float32 weights: float32 singular values, fit in float64, float32 result
    assert weight_alpha(w.float()).alpha.dtype == torch.float32


def test_conv_kernels_reshape_or_weightwatcher_taps():
    torch.manual_seed(1)
    w = torch.randn(24, 8, 3, 3, dtype=torch.float64)
    flat = np.linalg.svd(w.reshape(24, -1).numpy(), compute_uv=False) ** 2  # 24 eigenvalues
    taps = np.concatenate([np.linalg.svd(w[:, :, i, j].numpy() / math.sqrt(2.0),
                                         compute_uv=False) ** 2
                           for i in range(3) for j in range(3)])  # 9 × 8 eigenvalues
    reshaped = weight_alpha(w)
    ww = weight_alpha(w, conv="weightwatcher")
    assert reshaped.alpha.item() == pytest.approx(ref_search(flat)[0], rel=1e-9)
    assert ww.alpha.item() == pytest.approx(ref_search(taps)[0], rel=1e-9)
    assert ww.alpha_weighted.item() == pytest.approx(
        ref_search(taps)[0] * np.log10(taps.max()), rel=1e-9)
    # dense weights are read the same way under both conventions
    d = torch.randn(30, 20)
    assert torch.equal(weight_alpha(d).alpha, weight_alpha(d, conv="weightwatcher").alpha)


def test_nonfinite_weight_gives_nan():
    w = torch.randn(16, 16)
    w[3, 4] = float("nan")
    assert weight_alpha(w).alpha.isnan().item()
    k = torch.randn(16, 8, 3, 3)
    k[0, 0, 1, 1] = float("inf")
    assert weight_alpha(k).alpha.isnan().item()
    assert weight_alpha(k, conv="weightwatcher").alpha.isnan().item()


# ------------------------------------------------------------------------------ WeightWatcher
def test_matches_weightwatchers_fit_when_installed():
    pytest.importorskip("pandas")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    for ev in spectra(2):
        with contextlib.redirect_stdout(io.StringIO()), np.errstate(divide="ignore"):
            ref = ww_powerlaw.WWFit(ev[ev > 1e-5])  # ties at the top: α = inf, as ours
        fit = powerlaw_alpha(torch.from_numpy(ev))
        assert fit.alpha.item() == pytest.approx(ref.alpha, rel=1e-9)
        assert fit.xmin.item() == ref.xmin
        assert fit.D.item() == pytest.approx(ref.D, abs=1e-9)
