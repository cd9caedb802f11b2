"""Permutation symmetry: counts, canonical order, alignment, barrier, distance.

The quantities are those of docs/definitions.md#symmetry.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.functional.symmetry import (
    align,
    alignment_permutations,
    canonical_order,
    interpolation_barrier,
    interpolation_losses,
    log_equivalent_optima,
    permutation_count_log10,
    permutation_distance,
    permute_hidden_units,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(widths, act=nn.ReLU, bn=False, seed=0, dtype=torch.float64) -> nn.Sequential:
    torch_gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=torch_gen))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=torch_gen))
        layers.append(lin)
        if i < len(widths) - 2:
            if bn:
                norm = nn.BatchNorm1d(widths[i + 1])
                with torch.no_grad():
                    for t in (norm.weight, norm.bias, norm.running_mean):
                        t.copy_(torch.randn(t.shape, generator=torch_gen))
                    norm.running_var.copy_(torch.rand(widths[i + 1], generator=torch_gen) + 0.5)
                layers.append(norm)
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def _cnn(seed=0) -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 3),
    ).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*net.parameters(), net[1].running_mean]:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5)
        net[1].running_var.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
    return net


def _random_perms(model: nn.Sequential, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    widths = [m.out_features if isinstance(m, nn.Linear) else m.out_channels
              for m in model if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    return [torch.randperm(w, generator=gen) for w in widths]


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- counts


def test_log_equivalent_optima_known_values():
    assert log_equivalent_optima([3, 2]) == pytest.approx(math.log(12))
    assert log_equivalent_optima([3, 2], odd=True) == pytest.approx(math.log(12 * 2**5))
    assert log_equivalent_optima([3, 2], odd=[True, False]) == pytest.approx(math.log(12 * 8))
    assert log_equivalent_optima([]) == 0.0
    with pytest.raises(ValueError, match="flags"):
        log_equivalent_optima([3, 2], odd=[True])


def test_permutation_count_log10_against_exact_integers():
    relu = _mlp((64, 128, 64, 10))
    exact = math.log10(math.factorial(128) * math.factorial(64))
    assert permutation_count_log10(relu) == pytest.approx(exact, rel=1e-12)
    assert exact == pytest.approx(304.7, abs=0.05)  # the value quoted in the docstring
    tanh = _mlp((4, 3, 2, 1), act=nn.Tanh)
    assert permutation_count_log10(tanh) == pytest.approx(math.log10(12 * 2**5))
    assert permutation_count_log10(tanh, sign_flips=False) == pytest.approx(math.log10(12))
    # max pooling is not odd: no sign flips for the conv layers; tanh layer still flips
    assert permutation_count_log10(_cnn()) == pytest.approx(
        math.log10(math.factorial(4) * math.factorial(5) * math.factorial(6) * 2**6)
    )


def test_sign_flip_is_a_symmetry_for_tanh():
    # the factor 2^{n_l} of docs/definitions.md#equivalent-optima is real: flipping
    # (w_j, b_j, a_j) keeps the function
    net = _mlp((3, 4, 2), act=nn.Tanh)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flipped = _mlp((3, 4, 2), act=nn.Tanh)
    flipped.load_state_dict(net.state_dict())
    with torch.no_grad():
        flipped[0].weight[1] *= -1
        flipped[0].bias[1] *= -1
        flipped[2].weight[:, 1] *= -1
    torch.testing.assert_close(flipped(x), net(x))


# ----------------------------------------------------------------------------- canonical order


@pytest.mark.parametrize("make", [lambda: _mlp((5, 7, 6, 3)), lambda: _mlp((5, 7, 6, 3), bn=True),
                                  _cnn])
def test_canonical_order_keeps_outputs_and_is_permutation_invariant(make):
    net = make().eval()
    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if isinstance(net[0], nn.Conv2d):
        x = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    canon = canonical_order(net)
    torch.testing.assert_close(canon(x), net(x), rtol=1e-12, atol=1e-12)
    # keys are descending in every hidden layer
    affine = [m for m in canon if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    for m in affine:
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        key = torch.sqrt((w**2).sum(1) + m.bias.detach() ** 2)
        assert bool((key[:-1] >= key[1:]).all())
    # every permuted copy maps to the same canonical parameters
    shuffled = permute_hidden_units(net, _random_perms(net, seed=3))
    assert not _same_params(shuffled, net)
    assert _same_params(canonical_order(shuffled), canon)
    assert _same_params(canonical_order(canon), canon)  # idempotent


def test_canonical_order_stable_on_ties():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[10.0, 20.0, 30.0]]))
    canon = canonical_order(net)
    # keys (1, 2, 1): unit 1 first, then units 0 and 2 in their original order
    assert canon[2].weight.tolist() == [[20.0, 10.0, 30.0]]


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("make", [lambda: _mlp((5, 9, 7, 3)), lambda: _mlp((5, 9, 7, 3), bn=True),
                                  _cnn])
def test_align_recovers_a_permuted_copy_exactly(make):
    a = make()
    b = permute_hidden_units(a, _random_perms(a, seed=7))
    assert not _same_params(a, b)
    aligned = align(a, b)
    assert _same_params(aligned, a)
    assert not _same_params(b, a)  # inputs untouched


def test_align_keeps_model_b_function_and_never_increases_distance():
    a, b = _mlp((4, 8, 6, 2), seed=1).eval(), _mlp((4, 8, 6, 2), seed=2).eval()
    x = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    aligned = align(a, b)
    torch.testing.assert_close(aligned(x), b(x), rtol=1e-12, atol=1e-12)

    def dist(m):
        return sum(float(((p - q) ** 2).sum().detach()) for p, q in
                   zip(a.parameters(), m.parameters(), strict=True))

    assert dist(aligned) <= dist(b) + 1e-12


def test_weight_matching_single_hidden_layer_matches_brute_force():
    # one hidden layer: ⟨θ_a, π θ_b⟩ is one linear assignment; brute force over all 6! perms
    a, b = _mlp((3, 6, 2), seed=4), _mlp((3, 6, 2), seed=5)
    wa = [t.detach().numpy() for t in (a[0].weight, a[0].bias, a[2].weight)]
    wb = [t.detach().numpy() for t in (b[0].weight, b[0].bias, b[2].weight)]

    def score(perm):
        p = list(perm)
        return (np.sum(wa[0] * wb[0][p]) + np.sum(wa[1] * wb[1][p])
                + np.sum(wa[2] * wb[2][:, p]))

    best = max(itertools.permutations(range(6)), key=score)
    (perm,) = alignment_permutations(a, b)
    assert score(perm.tolist()) == pytest.approx(score(best), rel=1e-12)


def test_unsupported_structures_are_refused_clearly():
    with pytest.raises(SpectralConfigError, match="LayerNorm at position 1"):
        align(*(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)),) * 2)
    with pytest.raises(SpectralConfigError, match="nn.Sequential"):
        canonical_order(nn.Linear(3, 4))
    with pytest.raises(SpectralConfigError, match="grouped convolution"):
        canonical_order(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),
                                      nn.Conv2d(4, 2, 1)))
    with pytest.raises(SpectralConfigError, match="without an nn.Flatten"):
        canonical_order(nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(SpectralConfigError, match="differ"):
        align(_mlp((3, 4, 2)), _mlp((3, 5, 2)))
    # modules before the first / after the last affine layer are unrestricted
    net = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2),
                        nn.Softmax(dim=-1))
    assert permutation_count_log10(net) == pytest.approx(math.log10(24))


def test_batchnorm_train_mode_outputs_unchanged_by_permutation():
    net = _mlp((5, 6, 4, 3), bn=True).train()
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    other = permute_hidden_units(net, _random_perms(net, 11)).train()
    torch.testing.assert_close(other(x), net(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- distance


def test_permutation_distance_hand_value_and_brute_force():
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [3.0], [-4.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 2.0]]))
    # units 0, 1: 2 (4 + 0.25 + 0) = 8.5 is the smallest swap
    assert float(permutation_distance(net)) == pytest.approx(math.sqrt(8.5))
    # brute force ‖θ − τθ‖ over every swap of every hidden layer of a deeper net
    deep = _mlp((3, 5, 4, 2), seed=9)
    theta = nn.utils.parameters_to_vector(deep.parameters()).detach()
    best = math.inf
    for layer, width in enumerate((5, 4)):
        for i, j in itertools.combinations(range(width), 2):
            perms = [torch.arange(5), torch.arange(4)]
            perms[layer][[i, j]] = perms[layer][[j, i]]
            swapped = permute_hidden_units(deep, perms)
            best = min(best, float((theta - nn.utils.parameters_to_vector(
                swapped.parameters()).detach()).norm()))
    assert float(permutation_distance(deep)) == pytest.approx(best, rel=1e-12)


def test_permutation_distance_nan_without_two_units():
    assert math.isnan(float(permutation_distance(_mlp((3, 1, 2)))))


# ----------------------------------------------------------------------------- barrier


def _trained_mlp(seed: int, steps: int = 80) -> tuple[nn.Sequential, tuple]:
    """A small ReLU MLP trained on a fixed synthetic 5-class problem (Gaussian blobs)."""
    data_gen = torch.Generator().manual_seed(123)
    centres = torch.randn(5, 12, generator=data_gen) * 2
    y = torch.arange(300) % 5
    x = centres[y] + torch.randn(300, 12, generator=data_gen) * 1.5
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), (x, y)


def test_interpolation_barrier_before_and_after_alignment():
    a, data = _trained_mlp(0)
    loss = nn.functional.cross_entropy
    permuted = permute_hidden_units(a, _random_perms(a, 5))
    res = interpolation_barrier(a, permuted, loss, data, points=5)
    with torch.no_grad():
        la = float(loss(a(data[0]), data[1]))
    assert res.losses_before[0].item() == pytest.approx(la, rel=1e-6)
    assert res.losses_before[-1].item() == pytest.approx(la, rel=1e-6)
    assert res.barrier_before > 0.1  # averaging mismatched units hurts
    assert res.barrier_after == pytest.approx(0.0, abs=1e-6)  # aligned: one model
    # two independently trained nets: alignment lowers the barrier
    b, _ = _trained_mlp(1)
    res2 = interpolation_barrier(a, b, loss, [data], points=5)
    assert res2.barrier_after < res2.barrier_before
    # barrier is the height above the chord, by hand
    t, l_t = interpolation_losses(a, b, loss, data, points=5)
    chord = (1 - t) * l_t[0] + t * l_t[-1]
    assert res2.barrier_before == pytest.approx(float((l_t - chord).max()))
