"""Truncated-SVD compression of a model and its measured accuracy/size trade-off.

The decomposition and the truncation rules are defined in docs/definitions.md#weights.

:func:`compress` replaces each chosen ``nn.Linear`` by two ``nn.Linear`` of rank ``k`` and each
``nn.Conv2d`` (``groups=1``) by a rank-``k`` convolution followed by a ``1×1`` convolution, on a
copy of the model. With ``W = U diag(σ) Vᵀ`` (the reshape ``(out, in·kh·kw)`` of
docs/definitions.md#weight-matrix), the factors are ``A = diag(σ_{≤k})^{1/2} V_{≤k}ᵀ`` (first
layer, no bias) and ``B = U_{≤k} diag(σ_{≤k})^{1/2}`` (second layer, the original bias), so
``BA = W_k``, the best rank-``k`` approximation, and ``‖W − BA‖_F = (Σ_{i>k} σ_i²)^{1/2}`` by
Eckart–Young–Mirsky (#eckart-young).

:func:`compression_curve` measures a task metric (accuracy by default) against parameter count
over several truncation energies.

PyTorch's fused inference paths read some weights directly instead of calling the module that
holds them. :func:`compress` keeps those models working:

- ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``, ``nn.Transformer``) in eval
  mode run one fused kernel, ``torch._transformer_encoder_layer_fwd``, that takes
  ``linear1.weight`` and ``linear2.weight`` as dense matrices. A layer whose ``linear1`` or
  ``linear2`` was factored gets that fast path switched off (on the copy, per layer: its
  ``activation_relu_or_gelu`` flag, which only gates the fast path, is set to 0), and an
  ``nn.TransformerEncoder`` holding such a layer stops converting padded batches to nested
  tensors (``use_nested_tensor = False``). The layer then runs PyTorch's standard path, which
  calls ``linear1``/``linear2`` as modules: the same function, with the factored layers' savings.
  Handing the fused kernel the product ``BA`` instead would rebuild a full-size matrix at every
  call and undo the saving the factorisation is for. :attr:`CompressionReport.fused_path_off`
  names the layers changed.
- ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly on every path (fused or not), so
  its projections are never factored (naming one in ``layers`` raises
  :class:`SpectralConfigError`); the rest of the model is compressed as usual.

Kept in one module, longer than most: :func:`compression_curve` is :func:`compress` swept
over truncation energies and evaluated, reading the :class:`CompressionReport` it returns;
the rest is the factorisation and the fused-path handling described above.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import skip_init

from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.functional.weights import eckart_young_error, truncation_rank

__all__ = [
    "LayerCompression",
    "CompressionReport",
    "CompressionCurve",
    "compress",
    "compression_curve",
    "accuracy",
]


@dataclass
class LayerCompression:
    """What :func:`compress` did to one layer.

    ``flops_*`` count ``2 ×`` multiply-adds of the weights (biases ignored) per input row for a
    Linear and per output position for a Conv2d; when ``compress`` got an ``example_input`` they
    are per example (times the measured number of output positions). ``bound_error`` is the
    Eckart–Young value ``(Σ_{i>k} σ_i²)^{1/2}`` and ``measured_error`` the Frobenius norm
    ``‖W − BA‖_F`` of the factors actually installed (float64); ``*_rel`` divide by ``‖W‖_F``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    full_rank: int
    rank: int
    status: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    bound_error: float
    measured_error: float
    bound_error_rel: float
    measured_error_rel: float

    @property
    def compressed(self) -> bool:
        return self.status == "compressed"


@dataclass
class CompressionReport:
    """Per-layer outcome of :func:`compress` and the model-level parameter counts."""

    layers: list[LayerCompression]
    params_before: int
    params_after: int
    flops_per: str
    selection: dict[str, Any] = field(default_factory=dict)
    #: modules of the copy whose PyTorch fused fast path was switched off because a layer they
    #: read directly was factored (``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``)
    fused_path_off: list[str] = field(default_factory=list)

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else float("nan")

    def to_rows(self) -> list[dict[str, Any]]:
        return [asdict(layer) for layer in self.layers]

    def to_markdown(self) -> str:
        head = ("| layer | kind | shape | rank k / r | status | params before → after | "
                "FLOPs before → after | EY bound (rel) | measured (rel) |")
        lines = [head, "|" + "---|" * 9]
        for c in self.layers:
            shape = "×".join(str(n) for n in c.shape)
            lines.append(
                f"| {c.name} | {c.kind} | {shape} | {c.rank} / {c.full_rank} | {c.status} | "
                f"{c.params_before} → {c.params_after} | {c.flops_before} → {c.flops_after} | "
                f"{c.bound_error_rel:.4g} | {c.measured_error_rel:.4g} |"
            )
        lines.append(
            f"\nModel parameters {self.params_before} → {self.params_after} "
            f"({self.param_ratio:.3f}); FLOPs {self.flops_per}."
        )
        if self.fused_path_off:
            lines.append(
                "PyTorch's fused fast path switched off (factored layers inside): "
                + ", ".join(self.fused_path_off) + "."
            )
        return "\n".join(lines)


def _attention_owned(named: Mapping[str, nn.Module]) -> set[str]:
    """Names of the modules owned by an ``nn.MultiheadAttention`` (its ``out_proj``): attention
    reads their weights directly, so they can never be replaced by two layers."""
    owned: set[str] = set()
    for name, mod in named.items():
        if isinstance(mod, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            owned.update(f"{prefix}{sub}" for sub, _ in mod.named_modules() if sub)
    return owned


def _factored(module: Any) -> bool:
    """True when a fused path's weight holder was replaced (it has no dense ``weight``)."""
    return not isinstance(getattr(module, "weight", None), torch.Tensor)


def _keep_fused_paths_working(model: nn.Module) -> list[str]:
    """Switch PyTorch's fused fast path off wherever it would read a factored layer's weight.

    ``nn.TransformerEncoderLayer.forward`` takes its fast path only while
    ``activation_relu_or_gelu`` is non-zero (the flag is read for nothing else: the standard
    path calls ``self.activation``); ``nn.TransformerEncoder.forward`` builds nested tensors
    (and reads ``layers[0].linear1.weight``) only while ``use_nested_tensor`` is true. Returns
    the names of the modules changed.
    """
    changed: list[str] = []
    off: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and (
            _factored(mod.linear1) or _factored(mod.linear2)
        ):
            if getattr(mod, "activation_relu_or_gelu", 0):
                mod.activation_relu_or_gelu = 0
                changed.append(name)
            off.add(id(mod))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.TransformerEncoder) and any(id(m) in off for m in mod.layers):
            if getattr(mod, "use_nested_tensor", False):
                mod.use_nested_tensor = False
                changed.append(name)
    return sorted(changed)


def _kind(module: nn.Module) -> str | None:
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Conv2d:
        return "conv2d"
    return None


def _choose_rank(
    s: torch.Tensor, energy: float | None, rank: int | Mapping[str, int] | None,
    max_error: float | None, name: str,
) -> int:
    r = s.numel()
    if energy is not None:
        return int(truncation_rank(s, energy))
    if rank is not None:
        k = rank.get(name, r) if isinstance(rank, Mapping) else rank
        return min(int(k), r)
    assert max_error is not None
    s2 = s.double().square()
    total = float(s2.sum())
    if total == 0:
        return 0
    # tail[k] = Σ_{i>k} σ_i² for k = 0..r; smallest k with sqrt(tail[k]/total) <= max_error
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    ok = (tail / total).sqrt() <= max_error * (1 + 1e-12)
    return int(torch.nonzero(ok)[0])


def _validate(
    energy: float | None, rank: int | Mapping[str, int] | None, max_error: float | None
) -> None:
    given = [n for n, v in (("energy", energy), ("rank", rank), ("max_error", max_error))
             if v is not None]
    if len(given) != 1:
        raise SpectralConfigError(
            f"compress needs exactly one of energy=, rank=, max_error=; got {given or 'none'}"
        )
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise SpectralConfigError(f"energy must lie in (0, 1], got {energy!r}")
    if max_error is not None and not (0.0 <= float(max_error) <= 1.0):
        raise SpectralConfigError(f"max_error (relative) must lie in [0, 1], got {max_error!r}")
    if rank is not None:
        values = rank.values() if isinstance(rank, Mapping) else [rank]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SpectralConfigError(f"rank must be a non-negative integer, got {v!r}")


def _factor(module: nn.Module, kind: str, k: int, u: torch.Tensor, s: torch.Tensor,
            vh: torch.Tensor) -> tuple[nn.Sequential, torch.Tensor]:
    """The two-layer replacement of ``module`` at rank ``k`` and its installed ``BA`` (float64).

    The new layers are built with ``skip_init`` (no random initialisation, so the global RNG
    is untouched) and filled with the factors.
    """
    w = cast(torch.Tensor, module.weight)
    root = s[:k].sqrt()
    a = root[:, None] * vh[:k]  # (k, cols)
    b = u[:, :k] * root[None, :]  # (out, k)
    factory = {"device": w.device, "dtype": w.dtype}
    has_bias = module.bias is not None
    if kind == "linear":
        first: nn.Linear | nn.Conv2d = skip_init(nn.Linear, module.in_features, k, bias=False,
                                                 **factory)
        second: nn.Linear | nn.Conv2d = skip_init(nn.Linear, k, module.out_features,
                                                  bias=has_bias, **factory)
        first_w = a
    else:
        first = skip_init(
            nn.Conv2d, module.in_channels, k, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=1, bias=False,
            padding_mode=module.padding_mode, **factory,
        )
        second = skip_init(nn.Conv2d, k, module.out_channels, 1, bias=has_bias, **factory)
        first_w = a.reshape(k, *w.shape[1:])
    with torch.no_grad():
        first.weight.copy_(first_w.to(w.dtype))
        second.weight.copy_(b.reshape(second.weight.shape).to(w.dtype))
        if has_bias:
            old_bias = cast(torch.Tensor, module.bias)
            assert second.bias is not None  # built with bias=has_bias
            second.bias.copy_(old_bias.detach())
            second.bias.requires_grad_(old_bias.requires_grad)
    seq = nn.Sequential(first, second)
    seq.train(module.training)
    for p_new, p_old in ((first.weight, w), (second.weight, w)):
        p_new.requires_grad_(p_old.requires_grad)
    # what was actually installed (after the cast to the weight's dtype), in float64
    installed = (second.weight.detach().double().reshape(b.shape)
                 @ first.weight.detach().double().reshape(a.shape))
    return seq, installed


def _positions(model: nn.Module, names: Sequence[str], example_input: Any) -> dict[str, int]:
    """Output positions per example of each named conv, from one no-grad forward pass."""
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            # Conv2d: channel-first (n, c, h, w); Linear: channel-last (n, ..., out)
            inner = out.shape[2:] if _kind(mod) == "conv2d" else out.shape[1:-1]
            counts[name] = int(math.prod(inner))
        handles.append(modules[name].register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    return counts


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def compress(
    model: nn.Module,
    energy: float | None = None,
    *,
    rank: int | Mapping[str, int] | None = None,
    max_error: float | None = None,
    layers: Iterable[str] | None = None,
    skip_if_larger: bool = True,
    example_input: Any = None,
) -> tuple[nn.Module, CompressionReport]:
    """A truncated-SVD copy of ``model`` and a report (docs/definitions.md#eckart-young, #capacity).

    Exactly one rank rule: ``energy`` — ``k = k(τ)`` (#capacity) per layer; ``rank`` — an int for
    every layer or a ``{name: k}`` mapping (capped at ``r``; unnamed layers keep full rank);
    ``max_error`` — the smallest ``k`` whose relative Eckart–Young error
    ``(Σ_{i>k} σ_i²)^{1/2} / ‖W‖_F`` is at most ``max_error``.

    ``layers`` names the modules to factor (default: every ``nn.Linear`` and ``nn.Conv2d``
    except the projections owned by an ``nn.MultiheadAttention``, which reads their weights
    directly). A factored ``linear1``/``linear2`` of an ``nn.TransformerEncoderLayer`` switches
    that layer's fused eval-mode fast path off (module docstring), so the copy runs in eval mode
    as in training mode; the report's ``fused_path_off`` names the modules changed.
    A Conv2d with ``groups != 1`` is skipped (``status="skipped: groups=…"``), as is a weight
    holding NaN/Inf (``"skipped: non-finite weight"``) and a layer
    whose factorization would not reduce its parameters, ``k·(out + cols) + bias >=
    out·cols + bias`` (``status="skipped: no saving"``), unless ``skip_if_larger=False``. The rank
    is at least 1 (a rank-0 layer cannot run; ``W = 0`` gives ``k(τ) = 0``). The original model
    is not modified; the copy's modules keep their train/eval flags, dtypes and devices. With
    ``example_input`` the FLOPs are per example.

    Raises :class:`SpectralConfigError` for a bad rule or an unknown/unsupported layer name
    (the message lists the available layers).
    """
    _validate(energy, rank, max_error)
    named = dict(model.named_modules())
    owned = _attention_owned(named)
    candidates = [n for n, m in named.items() if _kind(m) is not None and n not in owned]
    if layers is None:
        chosen = candidates
    else:
        chosen = list(layers)
        attention = [n for n in chosen if n in owned]
        if attention:
            raise SpectralConfigError(
                f"compress: {attention} belong to an nn.MultiheadAttention, which reads their "
                "weight directly (out_proj.weight in F.multi_head_attention_forward and its "
                "fused fast path), so they cannot be factored; available: "
                f"{candidates}"
            )
        unknown = [n for n in chosen if n not in candidates]
        if unknown:
            raise SpectralConfigError(
                f"compress: layers {unknown} are not nn.Linear/nn.Conv2d modules of the model; "
                f"available: {candidates}"
            )
    if isinstance(rank, Mapping):
        unknown = [n for n in rank if n not in chosen]
        if unknown:
            raise SpectralConfigError(
                f"compress: rank names {unknown} are not among the chosen layers {chosen}"
            )

    positions = _positions(model, chosen, example_input) if example_input is not None else {}
    new_model = copy.deepcopy(model)
    params_before = sum(p.numel() for p in model.parameters())
    reports: list[LayerCompression] = []
    for name in chosen:
        module = named[name]
        kind = _kind(module)
        assert kind is not None
        w = module.weight.detach()
        mat = w.reshape(w.shape[0], -1).double()
        out_dim, cols = mat.shape
        r = min(out_dim, cols)
        bias = module.bias.numel() if module.bias is not None else 0
        per = positions.get(name, 1)
        before = out_dim * cols + bias
        flops_before = 2 * out_dim * cols * per
        norm = float(torch.linalg.matrix_norm(mat))
        skip = None
        if kind == "conv2d" and module.groups != 1:
            skip = f"skipped: groups={module.groups}"
        elif not bool(torch.isfinite(mat).all()):
            skip = "skipped: non-finite weight"
        if skip is not None:
            reports.append(LayerCompression(
                name, kind, tuple(w.shape), r, r, skip, before, before, flops_before,
                flops_before, 0.0, 0.0, 0.0, 0.0))
            continue
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        k = max(1, _choose_rank(s, energy, rank, max_error, name))  # rank 0 cannot run
        after = k * (out_dim + cols) + bias
        bound = float(eckart_young_error(s, k))

        def rel(x: float, norm: float = norm) -> float:
            return x / norm if norm > 0 else float("nan")

        if skip_if_larger and after >= before:
            reports.append(LayerCompression(
                name, kind, tuple(w.shape), r, k, "skipped: no saving", before, before,
                flops_before, flops_before, bound, 0.0, rel(bound), 0.0))
            continue
        seq, installed = _factor(module, kind, k, u, s, vh)
        measured = float(torch.linalg.matrix_norm(mat - installed))
        _set_submodule(new_model, name, seq)
        reports.append(LayerCompression(
            name, kind, tuple(w.shape), r, k, "compressed", before, after, flops_before,
            2 * k * (out_dim + cols) * per, bound, measured, rel(bound), rel(measured)))
    fused_off = _keep_fused_paths_working(new_model)
    params_after = sum(p.numel() for p in new_model.parameters())
    selection = {"energy": energy, "rank": rank, "max_error": max_error}
    flops_per = "per example" if example_input is not None else (
        "per input row (Linear) / per output position (Conv2d)")
    return new_model, CompressionReport(reports, params_before, params_after, flops_per,
                                        selection, fused_off)


# ------------------------------------------------------------------------------------------
# the measured trade-off


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy: the fraction of rows whose argmax equals the integer target."""
    return float((outputs.argmax(dim=-1) == targets).double().mean())


@dataclass
class CompressionCurve:
    """Table and figure of :func:`compression_curve`.

    ``baseline`` is the uncompressed model's row; ``rows`` one per energy, each with ``energy``,
    ``params``, ``param_ratio`` (of the whole model), ``metric`` and ``layers_compressed``.
    """

    baseline: dict[str, Any]
    rows: list[dict[str, Any]]
    figure: Any
    metric_name: str = "accuracy"

    def to_markdown(self) -> str:
        lines = [f"| energy τ | parameters | ratio | {self.metric_name} | layers factored |",
                 "|---|---|---|---|---|"]
        b = self.baseline
        lines.append(f"| original | {b['params']} | 1.000 | {b['metric']:.4f} | 0 |")
        for r in self.rows:
            lines.append(
                f"| {r['energy']:g} | {r['params']} | {r['param_ratio']:.3f} | "
                f"{r['metric']:.4f} | {r['layers_compressed']} |"
            )
        return "\n".join(lines)


def _evaluate(
    model: nn.Module, dataloader: Iterable[Any], metric: Callable[[torch.Tensor, torch.Tensor],
                                                                  Any],
) -> float:
    """``metric`` on the concatenated outputs and targets of ``dataloader``; modes restored."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    outs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()
        # a DataLoader draws its base seed from the global RNG: save and restore it
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for batch in dataloader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise SpectralConfigError(
                        "compression_curve expects batches (inputs, targets, ...), got "
                        f"{type(batch).__name__}"
                    )
                x, y = batch[0], batch[1]
                outs.append(model(x.to(device)).detach().cpu())
                targets.append(y.detach().cpu())
    finally:
        for m, mode in modes.items():
            m.train(mode)
    value = metric(torch.cat(outs), torch.cat(targets))
    return float(value)


def compression_curve(
    model: nn.Module,
    dataloader: Iterable[Any],
    energies: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999),
    metric: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    *,
    layers: Iterable[str] | None = None,
    metric_name: str | None = None,
    title: str | None = None,
) -> CompressionCurve:
    """Task metric against parameter count across truncation energies.

    The energies set the truncation rank ``k(τ)`` of docs/definitions.md#capacity. For each ``τ`` in
    ``energies`` the model is compressed with ``compress(model, energy=τ, layers=layers)`` and
    evaluated on ``dataloader`` (batches ``(inputs, targets, ...)``, inputs moved to the model's
    device). ``metric(outputs, targets) -> float`` is called once on the concatenated outputs of the
    whole loader; default :func:`accuracy`. The original model's modes are restored, and the global
    RNG state is saved and restored around each evaluation pass (iterating a ``DataLoader`` draws a
    seed from it). Returns a :class:`CompressionCurve` with the table and a matplotlib figure
    (accuracy vs parameters; the caller saves or logs it).
    """
    from lightning_spectral.plots.weights import compression_curve_figure

    fn = metric or accuracy
    name = cast(str, metric_name or (getattr(fn, "__name__", "metric") if metric else "accuracy"))
    energies = [float(e) for e in energies]
    for e in energies:
        if not (0.0 < e <= 1.0):
            raise SpectralConfigError(f"energies must lie in (0, 1], got {e!r}")
    layer_list = list(layers) if layers is not None else None
    total = sum(p.numel() for p in model.parameters())
    baseline = {"energy": None, "params": total, "param_ratio": 1.0,
                "metric": _evaluate(model, dataloader, fn), "layers_compressed": 0}
    rows = []
    for e in energies:
        small, report = compress(model, energy=e, layers=layer_list)
        rows.append({
            "energy": e,
            "params": report.params_after,
            "param_ratio": report.param_ratio,
            "metric": _evaluate(small, dataloader, fn),
            "layers_compressed": sum(c.compressed for c in report.layers),
        })
        del small
    fig = compression_curve_figure(rows, baseline, metric_name=name, title=title)
    return CompressionCurve(baseline, rows, fig, name)
