"""The streaming accumulators of lightning_spectral.stats on a single process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_spectral.stats import ClassStatsAccumulator, RowReservoir, distributed_world_size

pytestmark = pytest.mark.usefixtures("one_thread")


def data(n: int = 60, d: int = 5, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3 + 1
    labels = torch.arange(n) % k
    return features, labels


def numpy_stats(features: np.ndarray, labels: np.ndarray, k: int):
    """Per-class means, within-class scatter and total second moment, float64."""
    d = features.shape[1]
    means = np.stack([features[labels == c].mean(axis=0) for c in range(k)])
    within = np.zeros((d, d))
    for c in range(k):
        centred = features[labels == c] - means[c]
        within += centred.T @ centred
    return means, within, features.T @ features


# ------------------------------------------------------------------ ClassStatsAccumulator
def test_accumulator_matches_numpy_float64_in_chunks():
    features, labels = data()
    acc = ClassStatsAccumulator(3, 5)
    for start in range(0, 60, 7):  # uneven chunks
        acc.update(features[start : start + 7].float(), labels[start : start + 7])
    s = acc.stats
    assert s.counts.dtype == torch.float64
    np.testing.assert_array_equal(s.counts.numpy(), [20.0, 20.0, 20.0])
    assert float(acc.total()) == 60.0

    f32 = features.float().double().numpy()  # what the accumulator saw
    means, within, q = numpy_stats(f32, labels.numpy(), 3)
    got_means = (s.sums / s.counts[:, None]).numpy()
    np.testing.assert_allclose(got_means, means, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.second_moment.numpy(), q, rtol=1e-12, atol=1e-10)
    # within-class scatter from the sufficient statistics: Q - Σ_c n_c μ_c μ_cᵀ
    scatter = s.second_moment.numpy() - np.einsum("c,ci,cj->ij", s.counts.numpy(), got_means,
                                                  got_means)
    np.testing.assert_allclose(scatter, within, rtol=1e-9, atol=1e-9)


def test_accumulator_all_reduce_is_a_no_op_on_one_process():
    assert distributed_world_size() == 1
    features, labels = data()
    acc = ClassStatsAccumulator(3, 5, num_problems=2)
    acc.update(features, labels)
    acc.flag(1, 3.0)
    before = acc.state_dict()
    acc.all_reduce()
    after = acc.state_dict()
    for key in ("counts", "sums", "second_moment", "problems"):
        assert torch.equal(before[key], after[key]), key
    assert after["problems"].tolist() == [0.0, 3.0]


def test_accumulator_flat_round_trip():
    features, labels = data()
    acc = ClassStatsAccumulator(3, 5, num_problems=1)
    acc.update(features, labels)
    acc.flag(0)
    counts, sums, q = (t.clone() for t in (acc.stats.counts, acc.stats.sums,
                                            acc.stats.second_moment))
    acc._unflat(acc._flat() * 2)  # what a two-rank all_reduce of equal ranks produces
    assert torch.equal(acc.stats.counts, 2 * counts)
    assert torch.equal(acc.stats.sums, 2 * sums)
    assert torch.equal(acc.stats.second_moment, 2 * q)
    assert acc.problems.tolist() == [2.0]


def test_accumulator_state_dict_round_trip_and_shape_check():
    features, labels = data()
    acc = ClassStatsAccumulator(3, 5, num_problems=1)
    acc.update(features, labels)
    acc.flag(0, 2.0)
    state = acc.state_dict()
    assert state["counts"].device.type == "cpu"
    other = ClassStatsAccumulator(3, 5, num_problems=1)
    other.load_state_dict(state)
    assert torch.equal(other.stats.counts, acc.stats.counts)
    assert torch.equal(other.stats.sums, acc.stats.sums)
    assert torch.equal(other.stats.second_moment, acc.stats.second_moment)
    assert other.problems.tolist() == [2.0]
    # the state is a copy: updating the source leaves the restored accumulator alone
    acc.update(features, labels)
    assert float(other.total()) == 60.0
    with pytest.raises(ValueError, match="3 classes × 5 features"):
        ClassStatsAccumulator(4, 5).load_state_dict(state)


def test_accumulator_reset():
    features, labels = data()
    acc = ClassStatsAccumulator(3, 5, num_problems=1)
    acc.update(features, labels)
    acc.flag(0)
    acc.reset()
    assert float(acc.total()) == 0.0
    assert not acc.stats.sums.any() and not acc.stats.second_moment.any()
    assert acc.problems.tolist() == [0.0]


# ------------------------------------------------------------------------------ RowReservoir
def test_reservoir_keeps_everything_below_the_budget():
    features, labels = data(n=10)
    res = RowReservoir(max_samples=16, dim=5)
    res.update(features, labels)
    assert len(res) == 10
    rows, got = res.sample()
    assert rows.dtype == torch.float32 and rows.shape == (10, 5)
    # the same set of pairs, in key order
    pairs = {(tuple(r.tolist()), int(y)) for r, y in zip(features.float(), labels, strict=True)}
    assert {(tuple(r.tolist()), int(y)) for r, y in zip(rows, got, strict=True)} == pairs


def test_reservoir_is_bounded_and_keeps_the_smallest_keys():
    features, labels = data(n=500)
    res = RowReservoir(max_samples=32, dim=5, seed=3)
    for start in range(0, 500, 13):
        res.update(features[start : start + 13], labels[start : start + 13])
        assert res._buffered < 2 * 32 + 13  # compacted once the buffer holds twice the budget
    rows, got = res.sample()
    assert rows.shape == (32, 5) and len(res) == 32
    keys = res.keys_for(features.float(), labels)
    expected = torch.sort(keys, stable=True).indices[:32]
    assert torch.equal(rows, features.float()[expected])
    assert torch.equal(got, labels[expected])


def test_reservoir_does_not_depend_on_arrival_order_and_ignores_the_global_rng():
    features, labels = data(n=300)
    a = RowReservoir(max_samples=20, dim=5)
    a.update(features, labels)
    torch.manual_seed(123)
    b = RowReservoir(max_samples=20, dim=5)
    perm = torch.randperm(300)
    for chunk in perm.split(17):
        b.update(features[chunk], labels[chunk])
    assert torch.equal(a.sample()[0], b.sample()[0])
    assert torch.equal(a.sample()[1], b.sample()[1])
    # a different seed is a different sample
    c = RowReservoir(max_samples=20, dim=5, seed=1)
    c.update(features, labels)
    assert not torch.equal(a.sample()[0], c.sample()[0])


def test_reservoir_gather_equals_sample_on_one_process_and_state_round_trip():
    features, labels = data(n=100)
    res = RowReservoir(max_samples=8, dim=5)
    res.update(features, labels)
    rows, got = res.sample()
    g_rows, g_labels = res.gather()
    assert torch.equal(rows, g_rows) and torch.equal(got, g_labels)
    state = res.state_dict()
    other = RowReservoir(max_samples=8, dim=5)
    other.load_state_dict(state)
    assert torch.equal(other.sample()[0], rows) and torch.equal(other.sample()[1], got)
    with pytest.raises(ValueError, match="5 features"):
        RowReservoir(max_samples=8, dim=4).load_state_dict(state)


def test_reservoir_reset_and_bad_budget():
    features, labels = data(n=10)
    res = RowReservoir(max_samples=4, dim=5)
    res.update(features, labels)
    res.reset()
    assert len(res) == 0
    rows, got = res.sample()
    assert rows.shape == (0, 5) and got.shape == (0,)
    with pytest.raises(ValueError, match="max_samples"):
        RowReservoir(max_samples=0, dim=5)


def test_reservoir_drops_on_arrival_only_pairs_that_cannot_enter_the_sample():
    """Once full, a CPU reservoir drops pairs whose key is not below its largest kept key; the
    sample is still the bottom-k of every pair seen, duplicates (equal keys) included."""
    features, labels = data(n=200)
    features, labels = features.repeat(5, 1), labels.repeat(5)  # every pair five times
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    res = RowReservoir(max_samples=64, dim=5)
    for chunk in order.split(37):
        res.update(features[chunk], labels[chunk])
        assert res._buffered < 3 * 64
    assert res._threshold is not None  # the sample filled up, so arrivals were filtered
    rows, got = res.sample()
    keys = res.keys_for(features.float(), labels)
    expected = torch.sort(keys, stable=True).indices[:64]
    assert torch.equal(rows, features.float()[expected])
    assert torch.equal(got, labels[expected])
    # the same sample when everything arrives at once (no filtering)
    one = RowReservoir(max_samples=64, dim=5)
    one.update(features, labels)
    assert torch.equal(one.sample()[0], rows) and torch.equal(one.sample()[1], got)


def test_reservoir_non_finite_rows_never_set_the_threshold():
    features, labels = data(n=120)
    bad = torch.full((40, 5), float("nan"), dtype=torch.float64)
    res = RowReservoir(max_samples=8, dim=5)
    res.update(bad, torch.zeros(40, dtype=torch.long))  # compacted: 8 NaN-keyed rows held
    assert res._threshold is None
    res.update(features, labels)
    rows, _ = res.sample()
    assert rows.shape == (8, 5) and bool(torch.isfinite(rows).all())
    keys = res.keys_for(features.float(), labels)
    assert torch.equal(rows, features.float()[torch.sort(keys, stable=True).indices[:8]])
    res.reset()
    assert res._threshold is None and len(res) == 0
