"""Permutation symmetry of feed-forward chains (docs/definitions.md#symmetry).

Permuting the units of a hidden layer — its incoming rows and bias, and the matching input
columns of the next layer — leaves the network function unchanged. This module counts those
equivalent copies, puts a network into a canonical order, aligns one network onto another by
weight matching, measures the loss barrier on the straight line between two networks, and the
distance from a network to its nearest permuted copy.

**Supported models** (anything else raises :class:`~lightning_spectral.errors.SpectralConfigError`
naming the offending module): an ``nn.Sequential`` (nested ``nn.Sequential`` are flattened)
whose *affine* layers are ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (``groups=1``), with only the
following between two consecutive affine layers:

- element-wise activations (ReLU, LeakyReLU, ELU, GELU, SiLU, Tanh, Sigmoid, Softplus, …, and
  ``PReLU`` with a single shared slope), ``Identity`` and dropout layers;
- ``BatchNorm1d/2d/3d`` — handled: its affine parameters and running statistics are permuted
  with the units they normalise;
- pooling (Max/Avg, adaptive too) between convolutions, and one ``Flatten`` between the last
  convolution and the first ``Linear``: the ``Linear``'s input columns are then permuted in
  blocks of ``in_features / channels`` (one block per channel).

Modules before the first and after the last affine layer are unrestricted (inputs and outputs
are never permuted). Normalisations that mix units (LayerNorm, GroupNorm), grouped
convolutions, transposed convolutions and attention are refused.

Kept in one module, longer than most: counting, canonical order, permutation, alignment and
the permutation distance all work on the one parsed chain of hidden layers (``_parse``, which
also decides what is supported), and the barrier functions exist to compare a model with its
alignment; much of the length is worked examples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast, overload

import numpy as np
import torch
from torch import nn

from lightning_spectral.errors import SpectralConfigError

__all__ = [
    "barrier_height",
    "log_equivalent_optima",
    "permutation_count_log10",
    "canonical_order",
    "align",
    "alignment_permutations",
    "permute_hidden_units",
    "interpolation_losses",
    "interpolation_barrier",
    "BarrierResult",
    "permutation_distance",
]

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# the module types in _AFFINE and _BATCHNORM, for annotations
_AffineModule = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
_NormModule = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.PReLU,
)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
# modules f with f(-x) = -f(x) channel by channel (BatchNorm too, once its bias is flipped)
_ODD = (
    nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Identity, nn.Flatten,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, *_DROPOUT, *_BATCHNORM,
)

_SUPPORTED_TEXT = (
    "supported between two Linear/Conv layers: element-wise activations, Identity, Dropout, "
    "BatchNorm, pooling (between convolutions) and one Flatten (Conv -> Linear)"
)


@dataclass
class _Hidden:
    """One hidden layer: the units written by ``producer`` and read by ``consumer``."""

    producer: _AffineModule
    consumer: _AffineModule
    norms: list[_NormModule]
    width: int
    block: int  # consumer input columns per unit (>1 after Flatten of a convolution)
    odd: bool


def _flatten(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.Sequential):
            out.extend(_flatten(child))
        else:
            out.append(child)
    return out


def _width_out(m: _AffineModule) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _width_in(m: _AffineModule) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _is_odd(m: nn.Module) -> bool:
    if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
        return m.min_val == -m.max_val
    return isinstance(m, _ODD)


def _parse(model: nn.Module, name: str = "model") -> list[_Hidden]:
    """The hidden layers of a supported chain, in forward order (raises on anything else)."""
    if not isinstance(model, nn.Sequential):
        raise SpectralConfigError(
            f"{name} must be an nn.Sequential chain of Linear/Conv layers, got "
            f"{type(model).__name__} (wrap the parts, e.g. nn.Sequential(model.features, "
            f"model.classifier), when they run in that order)"
        )
    mods = _flatten(model)
    idx = [i for i, m in enumerate(mods) if isinstance(m, _AFFINE)]
    if not idx:
        raise SpectralConfigError(f"{name} has no nn.Linear or nn.Conv1d/2d/3d layer")
    for i in idx:
        m = mods[i]
        if not isinstance(m, nn.Linear) and m.groups != 1:
            raise SpectralConfigError(
                f"{name}: grouped convolution {type(m).__name__}(groups={m.groups}) at position "
                f"{i} is not supported (only groups=1)"
            )
    hidden: list[_Hidden] = []
    for a, b in zip(idx[:-1], idx[1:], strict=True):
        prod, cons = cast(_AffineModule, mods[a]), cast(_AffineModule, mods[b])  # in _AFFINE
        width = _width_out(prod)
        norms: list[_NormModule] = []
        flattened = False
        odd = True
        for j in range(a + 1, b):
            m = mods[j]
            where = f"{name}: {type(m).__name__} at position {j} (between layers {a} and {b})"
            if isinstance(m, _BATCHNORM):
                if m.num_features != width:
                    raise SpectralConfigError(f"{where} has {m.num_features} features, not {width}")
                norms.append(m)
            elif isinstance(m, nn.PReLU):
                if m.num_parameters != 1:
                    raise SpectralConfigError(
                        f"{where}: PReLU with per-channel slopes is not supported "
                        f"(num_parameters={m.num_parameters}); {_SUPPORTED_TEXT}"
                    )
            elif isinstance(m, nn.Flatten):
                if flattened or not isinstance(cons, nn.Linear):
                    raise SpectralConfigError(f"{where}: unsupported Flatten; {_SUPPORTED_TEXT}")
                flattened = True
            elif isinstance(m, _POOLS):
                if isinstance(prod, nn.Linear):
                    raise SpectralConfigError(
                        f"{where}: pooling after a Linear layer mixes units; {_SUPPORTED_TEXT}"
                    )
            elif not isinstance(m, _ACTIVATIONS + _DROPOUT + (nn.Identity,)):
                raise SpectralConfigError(f"{where} is not supported; {_SUPPORTED_TEXT}")
            odd = odd and _is_odd(m)
        block = 1
        if isinstance(prod, nn.Linear) or not isinstance(cons, nn.Linear):
            if isinstance(prod, nn.Linear) and not isinstance(cons, nn.Linear):
                raise SpectralConfigError(
                    f"{name}: a Linear layer (position {a}) feeding a convolution (position {b}) "
                    "is not supported"
                )
            if _width_in(cons) != width:
                raise SpectralConfigError(
                    f"{name}: layer {a} writes {width} units but layer {b} reads "
                    f"{_width_in(cons)}"
                )
        else:  # convolution -> Linear: needs a Flatten, channel-major blocks
            if not flattened:
                raise SpectralConfigError(
                    f"{name}: convolution at position {a} feeds Linear at position {b} without "
                    "an nn.Flatten between them"
                )
            if cons.in_features % width:
                raise SpectralConfigError(
                    f"{name}: Linear at position {b} reads {cons.in_features} inputs, not a "
                    f"multiple of the {width} channels of layer {a}"
                )
            block = cons.in_features // width
        hidden.append(_Hidden(prod, cons, norms, width, block, odd))
    return hidden


def log_equivalent_optima(widths: Sequence[int], odd: bool | Sequence[bool] = False) -> float:
    """``log N_eq = Σ_l [log(n_l!) + n_l log 2 · odd_l]`` in nats.

    See docs/definitions.md#equivalent-optima. ``widths`` are the hidden widths ``n_1, …, n_{L−1}``;
    ``odd`` (one flag, or one per layer) adds the sign-flip factor ``2^{n_l}`` of odd activations
    such as tanh. Example: widths ``(3, 2)`` give ``log(3!·2!) = log 12``.

    Examples:
        >>> import math
        >>> from lightning_spectral.functional import log_equivalent_optima
        >>> round(log_equivalent_optima([3, 2]), 4), round(math.log(12), 4)
        (2.4849, 2.4849)
        >>> round(log_equivalent_optima([3, 2], odd=True), 4)  # log(12 · 2⁵)
        5.9506
    """
    widths = [int(w) for w in widths]
    if any(w < 0 for w in widths):
        raise ValueError(f"widths must be non-negative, got {widths}")
    flags = [bool(odd)] * len(widths) if isinstance(odd, bool) else [bool(o) for o in odd]
    if len(flags) != len(widths):
        raise ValueError(f"odd has {len(flags)} flags for {len(widths)} widths")
    return float(
        sum(math.lgamma(w + 1) + (w * math.log(2) if f else 0.0)
            for w, f in zip(widths, flags, strict=True))
    )


def permutation_count_log10(model: nn.Module, sign_flips: bool = True) -> float:
    """``log10`` of the number of permutation-equivalent parameter settings.

    See docs/definitions.md#equivalent-optima: ``Σ_l log10(n_l!)`` over the hidden layers of a
    supported chain, plus ``n_l log10 2`` for each layer whose units pass only through odd modules
    (tanh, softsign, average pooling, BatchNorm, dropout, identity) before the next affine layer,
    when ``sign_flips``. A 64-128-64-10 ReLU MLP gives ``log10(128!·64!) ≈ 304.7``.

    Examples:
        Hidden widths 3 and 2: ``3!·2! = 12`` orderings, times ``2⁵`` sign flips with tanh:

        >>> from torch import nn
        >>> from lightning_spectral.functional import permutation_count_log10
        >>> relu = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(),
        ...                      nn.Linear(2, 1))
        >>> round(permutation_count_log10(relu), 4)  # log10 12
        1.0792
        >>> tanh = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.Tanh(),
        ...                      nn.Linear(2, 1))
        >>> round(permutation_count_log10(tanh), 4)  # log10(12 · 32)
        2.5843
    """
    hidden = _parse(model)
    return log_equivalent_optima(
        [h.width for h in hidden], [h.odd and sign_flips for h in hidden]
    ) / math.log(10)


# ---------------------------------------------------------------------------------------------
# permuting units


def _permute_rows(t: torch.Tensor | None, perm: torch.Tensor) -> None:
    if t is not None:
        t.data = t.data[perm.to(t.device)].clone()


def _permute_hidden(h: _Hidden, perm: torch.Tensor) -> None:
    """Apply ``new unit i = old unit perm[i]`` to one hidden layer, in place."""
    _permute_rows(h.producer.weight, perm)
    _permute_rows(h.producer.bias, perm)
    for bn in h.norms:
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            _permute_rows(t, perm)
    w = h.consumer.weight
    p = perm.to(w.device)
    if h.block == 1:
        w.data = w.data[:, p].clone()
    else:
        out = w.shape[0]
        w.data = w.data.reshape(out, h.width, h.block)[:, p].reshape(out, -1).clone()


def permute_hidden_units(model: nn.Module, perms: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with hidden layer ``l``'s units re-ordered: new unit ``i`` = old
    unit ``perms[l][i]`` (rows, bias, BatchNorm entries and the next layer's input columns).

    ``perms`` holds one permutation per hidden layer, in forward order. The function computed by
    the copy equals the original's.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_spectral.functional import permute_hidden_units
        >>> net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> nn.utils.vector_to_parameters(torch.arange(1.0, 11.0), net.parameters())
        >>> out = permute_hidden_units(net, [torch.tensor([2, 0, 1])])
        >>> out[0].weight.flatten().tolist(), out[0].bias.tolist(), out[2].weight.flatten().tolist()
        ([3.0, 1.0, 2.0], [6.0, 4.0, 5.0], [9.0, 7.0, 8.0])
        >>> x = torch.linspace(-1.0, 1.0, 5)[:, None]
        >>> torch.allclose(net(x), out(x))
        True
    """
    out = copy.deepcopy(model)
    hidden = _parse(out)
    if len(perms) != len(hidden):
        raise ValueError(f"expected {len(hidden)} permutations (one per hidden layer), "
                         f"got {len(perms)}")
    for h, p in zip(hidden, perms, strict=True):
        p = torch.as_tensor(p, dtype=torch.long)
        if p.shape != (h.width,) or not torch.equal(torch.sort(p).values, torch.arange(h.width)):
            raise ValueError(f"a permutation of {h.width} units expected, got {p.tolist()}")
        with torch.no_grad():
            _permute_hidden(h, p)
    return out


def _unit_key(h: _Hidden) -> torch.Tensor:
    """``κ_j = ‖[W_l[j,:], b_l[j]]‖₂`` (docs/definitions.md#canonical-order), float64."""
    w = h.producer.weight.detach().reshape(h.width, -1).double()
    sq = (w**2).sum(dim=1)
    if h.producer.bias is not None:
        sq = sq + h.producer.bias.detach().double() ** 2
    return sq.sqrt()


def canonical_order(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each hidden layer's units sorted by their norm key.

    See docs/definitions.md#canonical-order. Units are ordered by ``κ_j = ‖[W_l[j,:], b_l[j]]‖₂``
    descending with a stable sort (ties keep their order); rows of ``W_l``, entries of ``b_l`` (and
    of a following BatchNorm) and columns of ``W_{l+1}`` are permuted alike, so the function is
    unchanged. Row norms do not change when the previous layer's columns are permuted, so the result
    does not depend on the order in which layers are processed, and permutation-equivalent networks
    with distinct keys map to the same parameters.

    Examples:
        Two hidden units with keys 1 and 2 swap places:

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spectral.functional import canonical_order
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0, 3.0, 0.0]),
        ...                               net.parameters())
        >>> out = canonical_order(net)
        >>> out[0].weight.flatten().tolist(), out[2].weight.flatten().tolist()
        ([2.0, 1.0], [3.0, 1.0])
        >>> x = torch.linspace(-1.0, 1.0, 5)[:, None]
        >>> torch.allclose(net(x), out(x))
        True
    """
    out = copy.deepcopy(model)
    hidden = _parse(out)
    keys = [_unit_key(h) for h in hidden]  # all from the original rows
    with torch.no_grad():
        for h, key in zip(hidden, keys, strict=True):
            perm = torch.sort(key.cpu(), descending=True, stable=True).indices
            _permute_hidden(h, perm)
    return out


# ---------------------------------------------------------------------------------------------
# weight matching


@overload
def _np(t: torch.Tensor) -> np.ndarray: ...
@overload
def _np(t: None) -> None: ...
@overload
def _np(t: torch.Tensor | None) -> np.ndarray | None: ...
def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy()


class _Layer:
    """float64 NumPy view of one affine layer for matching: weight as (out, in, rest)."""

    def __init__(self, module: _AffineModule, in_block: int) -> None:
        w = _np(module.weight)
        out = w.shape[0]
        self.w = w.reshape(out, -1, in_block) if isinstance(module, nn.Linear) else (
            w.reshape(out, w.shape[1], -1))
        self.b = _np(module.bias)


def _structure_check(ha: list[_Hidden], hb: list[_Hidden]) -> None:
    if len(ha) != len(hb):
        raise SpectralConfigError(
            f"models differ in structure: {len(ha)} vs {len(hb)} hidden layers"
        )
    for i, (x, y) in enumerate(zip(ha, hb, strict=True)):
        for ma, mb in ((x.producer, y.producer), (x.consumer, y.consumer)):
            if type(ma) is not type(mb) or ma.weight.shape != mb.weight.shape:
                raise SpectralConfigError(
                    f"models differ at hidden layer {i}: {type(ma).__name__}"
                    f"{tuple(ma.weight.shape)} vs {type(mb).__name__}{tuple(mb.weight.shape)}"
                )
        if len(x.norms) != len(y.norms):
            raise SpectralConfigError(f"models differ in BatchNorm at hidden layer {i}")


def alignment_permutations(
    model_a: nn.Module, model_b: nn.Module, max_sweeps: int = 20
) -> list[torch.Tensor]:
    """Per hidden layer, the permutation of ``model_b``'s units that best matches ``model_a``.

    Weight matching: maximise ``Σ_l ⟨θ_a^l, π(θ_b)^l⟩`` — the inner products of every affine
    layer's weights and biases (and BatchNorm affine parameters) after ``model_b``'s units are
    permuted — which is the same as minimising ``‖θ_a − π(θ_b)‖₂²``. A first pass goes layer by
    layer from the input, matching incoming weights given the previous permutation; then
    coordinate-descent sweeps re-solve each layer with both its incoming and outgoing weights
    (each a linear assignment, :func:`scipy.optimize.linear_sum_assignment`) until no permutation
    changes (at most ``max_sweeps``); the objective never decreases.

    Returns ``perms[l]`` with ``new unit i = model_b's unit perms[l][i]``, for
    :func:`permute_hidden_units`.

    Examples:
        A shuffled copy (new unit ``i`` = old unit ``[2, 0, 1][i]``) is undone by the inverse
        permutation:

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spectral.functional import alignment_permutations, permute_hidden_units
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> n = sum(p.numel() for p in net.parameters())
        >>> nn.utils.vector_to_parameters(torch.randn(n, generator=g), net.parameters())
        >>> shuffled = permute_hidden_units(net, [torch.tensor([2, 0, 1])])
        >>> [p.tolist() for p in alignment_permutations(net, shuffled)]
        [[1, 2, 0]]
    """
    from scipy.optimize import linear_sum_assignment

    ha, hb = _parse(model_a, "model_a"), _parse(model_b, "model_b")
    _structure_check(ha, hb)
    L = len(ha)
    if L == 0:
        return []

    def layers(hidden: list[_Hidden]) -> list[_Layer]:
        mods = [h.producer for h in hidden] + [hidden[-1].consumer]
        blocks = [1] + [h.block for h in hidden]
        return [_Layer(m, blk) for m, blk in zip(mods, blocks, strict=True)]

    la, lb = layers(ha), layers(hb)
    bn_a = [[_np(t) for bn in h.norms for t in (bn.weight, bn.bias) if t is not None] for h in ha]
    bn_b = [[_np(t) for bn in h.norms for t in (bn.weight, bn.bias) if t is not None] for h in hb]
    perms: list[np.ndarray | None] = [None] * L

    def incoming(layers_: list[_Layer], bns: list[list[np.ndarray]], l: int,
                 prev: np.ndarray | None) -> np.ndarray:
        w = layers_[l].w if prev is None else layers_[l].w[:, prev]
        cols = [w.reshape(w.shape[0], -1)]
        if layers_[l].b is not None:
            cols.append(cast(np.ndarray, layers_[l].b)[:, None])
        cols += [t[:, None] for t in bns[l]]
        return np.concatenate(cols, axis=1)

    def outgoing(layers_: list[_Layer], l: int, nxt: np.ndarray | None) -> np.ndarray:
        w = layers_[l + 1].w if nxt is None else layers_[l + 1].w[nxt]
        return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)  # (units of l, rest)

    def solve(sim: np.ndarray) -> np.ndarray:
        rows, cols = linear_sum_assignment(sim, maximize=True)
        perm = np.empty(sim.shape[0], dtype=np.int64)
        perm[rows] = cols
        return perm

    for l in range(L):  # first pass: incoming weights only
        prev = perms[l - 1] if l > 0 else None
        perms[l] = solve(incoming(la, bn_a, l, None) @ incoming(lb, bn_b, l, prev).T)
    for _ in range(max_sweeps):
        changed = False
        for l in range(L):
            prev = perms[l - 1] if l > 0 else None
            nxt = perms[l + 1] if l + 1 < L else None
            sim = incoming(la, bn_a, l, None) @ incoming(lb, bn_b, l, prev).T
            sim = sim + outgoing(la, l, None) @ outgoing(lb, l, nxt).T
            cur = cast(np.ndarray, perms[l])  # set by the first pass
            new = solve(sim)
            gain = sim[np.arange(len(new)), new].sum() - sim[np.arange(len(cur)), cur].sum()
            if not np.array_equal(new, cur) and gain > 1e-12 * max(1.0, abs(sim).max()):
                perms[l] = new
                changed = True
        if not changed:
            break
    return [torch.as_tensor(p, dtype=torch.long) for p in perms]


def align(model_a: nn.Module, model_b: nn.Module, max_sweeps: int = 20) -> nn.Module:
    """A copy of ``model_b`` with its hidden units permuted to best match ``model_a``.

    Uses :func:`alignment_permutations` (weight matching with linear assignment, layer by
    layer). The copy computes the same function as ``model_b``; if ``model_b`` is a permuted
    copy of ``model_a`` (with distinct units), ``model_a``'s parameters are recovered exactly.
    Neither input is modified.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_spectral.functional import align, permute_hidden_units
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> n = sum(p.numel() for p in net.parameters())
        >>> nn.utils.vector_to_parameters(torch.randn(n, generator=g), net.parameters())
        >>> shuffled = permute_hidden_units(net, [torch.tensor([2, 0, 1])])
        >>> aligned = align(net, shuffled)
        >>> all(torch.equal(p, q) for p, q in zip(net.parameters(), aligned.parameters()))
        True
    """
    return permute_hidden_units(model_b, alignment_permutations(model_a, model_b, max_sweeps))


# ---------------------------------------------------------------------------------------------
# distance to the nearest permuted copy


def permutation_distance(model: nn.Module) -> torch.Tensor:
    """``δ = min_{l, a<b} ‖θ − τ_ab^l θ‖₂``, a float64 0-d tensor.

    See docs/definitions.md#permutation-distance:
    ``‖θ − τθ‖₂² = 2(‖W_l[a] − W_l[b]‖² + (b_l[a] − b_l[b])² + ‖W_{l+1}[:,a] − W_{l+1}[:,b]‖²)``;
    the input columns of a Linear after ``Flatten`` are compared block by block and BatchNorm
    affine parameters of the unit are included (they move with it). NaN when no hidden layer has
    two units.

    Examples:
        Two hidden units with incoming weights 1 and 2 and equal biases and outgoing weights:
        ``δ² = 2 (2 − 1)²``; identical units give 0:

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spectral.functional import permutation_distance
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
        ...                               net.parameters())
        >>> round(float(permutation_distance(net)), 4)
        1.4142
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
        ...                               net.parameters())
        >>> float(permutation_distance(net))
        0.0
    """
    hidden = _parse(model)
    best = math.inf
    for h in hidden:
        if h.width < 2:
            continue
        rows = [h.producer.weight.detach().reshape(h.width, -1).double().cpu()]
        if h.producer.bias is not None:
            rows.append(h.producer.bias.detach().double().cpu()[:, None])
        for bn in h.norms:
            rows += [t.detach().double().cpu()[:, None] for t in (bn.weight, bn.bias)
                     if t is not None]
        w = h.consumer.weight.detach().double().cpu()
        if h.block == 1:
            cols = w.reshape(w.shape[0], h.width, -1)
        else:
            cols = w.reshape(w.shape[0], h.width, h.block)
        rows.append(cols.transpose(0, 1).reshape(h.width, -1))
        feats = torch.cat(rows, dim=1)
        d2 = torch.cdist(feats, feats) ** 2
        d2.fill_diagonal_(math.inf)
        best = min(best, float(d2.min()))
    if math.isinf(best):
        return torch.tensor(float("nan"), dtype=torch.float64)
    return torch.tensor(math.sqrt(2 * best), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# interpolation barrier

DataLike = Any  # (inputs, targets) or an iterable of such batches


def _batches(data: DataLike) -> list[tuple[Any, Any]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [(data[0], data[1])]
    batches = list(data) if isinstance(data, Iterable) else []
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) >= 2 for b in batches):
        raise ValueError("data must be an (inputs, targets) pair or an iterable of such batches")
    return [(b[0], b[1]) for b in batches]


def _mean_loss(model: nn.Module, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
               batches: list[tuple[Any, Any]]) -> float:
    total, count = 0.0, 0
    device = next(iter(model.parameters())).device
    for x, y in batches:
        x = x.to(device) if isinstance(x, torch.Tensor) else x
        y = y.to(device) if isinstance(y, torch.Tensor) else y
        n = len(x)
        total += float(loss_fn(model(x), y)) * n
        count += n
    return total / count


def interpolation_losses(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    data: DataLike,
    points: int = 11,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, L(t))``: the loss of ``θ(t) = (1 − t) θ_a + t θ_b`` at ``points`` evenly spaced ``t``.

    Every floating-point entry of the state dict (parameters and buffers such as BatchNorm
    running statistics) is interpolated; integer buffers are taken from ``model_a``. The loss is
    ``loss_fn(model(x), y)`` (a mean over the batch), averaged over ``data`` weighted by batch
    size, in eval mode under ``torch.no_grad``. The inputs are not modified.

    Examples:
        From the weight 0 to the weight 2 of ``f(x) = w x``, with the squared error at
        ``(x, y) = (1, 1)``: ``L(t) = (2t − 1)²``:

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spectral.functional import interpolation_losses
        >>> a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> nn.utils.vector_to_parameters(torch.tensor([0.0]), a.parameters())
        >>> nn.utils.vector_to_parameters(torch.tensor([2.0]), b.parameters())
        >>> data = (torch.ones(1, 1), torch.ones(1, 1))
        >>> ts, losses = interpolation_losses(a, b, nn.functional.mse_loss, data, points=3)
        >>> ts.tolist(), losses.tolist()
        ([0.0, 0.5, 1.0], [1.0, 0.0, 1.0])
    """
    if not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise SpectralConfigError("model_a and model_b have different state_dict keys or shapes")
    batches = _batches(data)
    probe = copy.deepcopy(model_a).eval()
    ts = torch.linspace(0, 1, points, dtype=torch.float64)
    losses = torch.empty(points, dtype=torch.float64)
    with torch.no_grad():
        for i, t in enumerate(ts.tolist()):
            mixed = {
                k: (torch.lerp(sa[k], sb[k].to(sa[k].device), t) if sa[k].is_floating_point()
                    else sa[k])
                for k in sa
            }
            probe.load_state_dict(mixed)
            losses[i] = _mean_loss(probe, loss_fn, batches)
    return ts, losses


class BarrierResult(NamedTuple):
    """Loss barrier on the line between two models, before and after aligning ``model_b``.

    Returned by :func:`interpolation_barrier`.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import BarrierResult, barrier_height
        >>> t = torch.linspace(0.0, 1.0, 3)
        >>> before, after = torch.tensor([0.0, 1.0, 0.0]), torch.zeros(3)
        >>> r = BarrierResult(t, before, after, barrier_height(t, before), barrier_height(t, after))
        >>> r.barrier_before, r.barrier_after
        (1.0, 0.0)
    """

    t: torch.Tensor
    losses_before: torch.Tensor
    losses_after: torch.Tensor
    barrier_before: float
    barrier_after: float


def barrier_height(ts: torch.Tensor, losses: torch.Tensor) -> float:
    """``max_t [L(t) − ((1 − t) L(0) + t L(1))]``: the height of ``losses`` above their chord.

    ``ts`` and ``losses`` as returned by :func:`interpolation_losses` (``ts`` from 0 to 1); the
    barrier of docs/definitions.md#barrier. A host float (one synchronisation).

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import barrier_height
        >>> t = torch.linspace(0.0, 1.0, 3)
        >>> barrier_height(t, torch.tensor([1.0, 2.0, 1.0]))  # 1 above the chord
        1.0
        >>> barrier_height(t, torch.tensor([0.0, 0.5, 1.0]))  # on the chord: no barrier
        0.0
    """
    chord = (1 - ts) * losses[0] + ts * losses[-1]
    return float((losses - chord).max())


def interpolation_barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    data: DataLike,
    points: int = 11,
    max_sweeps: int = 20,
) -> BarrierResult:
    """Loss barrier between two models, before and after :func:`align`.

    ``barrier = max_t [L(θ(t)) − ((1 − t) L(θ_a) + t L(θ_b))]`` (docs/definitions.md#barrier) over
    the grid of :func:`interpolation_losses` (the height of the loss above the chord; 0 for a convex
    path, and 0 for ``model_b = model_a``). A permuted copy of ``model_a`` typically shows a high
    barrier before alignment and exactly 0 after. Both models must be supported chains (module
    docstring). BatchNorm running statistics are interpolated as they are, not re-estimated.

    Examples:
        A shuffled copy of a network computes the same function, yet the straight line to it
        climbs a barrier; after alignment the line stays at the same loss:

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spectral.functional import interpolation_barrier, permute_hidden_units
        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> n = sum(p.numel() for p in net.parameters())
        >>> nn.utils.vector_to_parameters(torch.randn(n, generator=g), net.parameters())
        >>> shuffled = permute_hidden_units(net, [torch.tensor([2, 0, 1])])
        >>> x = torch.randn(16, 2, generator=g)
        >>> data = (x, net(x).detach())
        >>> result = interpolation_barrier(net, shuffled, nn.functional.mse_loss, data, points=5)
        >>> result.barrier_before > 0, result.barrier_after
        (True, 0.0)
    """
    ts, before = interpolation_losses(model_a, model_b, loss_fn, data, points)
    aligned = align(model_a, model_b, max_sweeps)
    _, after = interpolation_losses(model_a, aligned, loss_fn, data, points)
    return BarrierResult(ts, before, after, barrier_height(ts, before), barrier_height(ts, after))
