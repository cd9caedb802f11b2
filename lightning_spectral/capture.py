"""Which layers, and their outputs: the one capture path every callback uses.

A :class:`LayerCapture` resolves a layer selection against a model, registers one hook per
chosen module **once** (so a ``torch.compile``\\ d model sees them) and removes them again,
leaving the modules as found. The hooks do nothing unless the capture is switched on
(:meth:`LayerCapture.start`), so they cost one attribute test on every other step. It is the
only place in the package that registers hooks on a user's modules.

While on, each hook turns its module's output (or, with ``pre=True``, its first input) into
rows — a representation batch ``(n, d)`` (docs/definitions.md, "Rows of a layer") — through one
table from module type to reduction (:data:`REDUCTIONS`, documented in docs/metrics.md); adding
a module type is one entry. The rows then go either

- into a bounded buffer: a deterministic *bottom-k* subsample of at most ``max_samples`` rows
  per layer across every call of the window (micro-batches under gradient accumulation, a module
  called several times per forward). Each row gets a key from the capture's own
  :class:`torch.Generator` (seeded per window, never the global RNG) and the ``max_samples``
  rows with the smallest keys are kept, a uniform sample without replacement of all rows seen.
  When every row fits, all rows are kept in arrival order; or
- to a ``sink(name, rows)`` callable, once per call (the penalty keeps each call as a view with
  its graph; the collapse monitor pairs the head's input with the batch labels).

Forward passes that autograd re-runs during the backward pass (gradient checkpointing) are not
captured a second time, and nothing is captured inside :func:`paused` (a callback evaluating the
model itself, e.g. for Hessian products).

Nothing here imports Lightning.

Kept in one module, longer than most, on purpose: it is the package's only place where hooks are
registered, so the reduction table, layer resolution, the pause switch and :class:`LayerCapture`
stay together; splitting them would invite a second capture path.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lightning_spectral.errors import SpectralConfigError, SpectralWarning

__all__ = [
    "REDUCTIONS",
    "AUTO_TYPES",
    "Reduction",
    "LayerCapture",
    "resolve_layers",
    "resolve_one",
    "reduction_for",
    "module_rows",
    "weight_matrices",
    "rows_channel_last",
    "rows_channel_first",
    "first_tensor",
    "is_compiled",
    "in_backward",
    "paused",
]

Layout = Literal["channel_last", "channel_first", "inherit"]

#: module types captured by ``layers="auto"`` (Linear modules owned by a MultiheadAttention are
#: left out: attention calls them functionally, never as modules, and the attention module
#: itself is captured)
AUTO_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.MultiheadAttention,
    nn.RNNBase,
)


def first_tensor(output: object) -> torch.Tensor | None:
    """The tensor a module output stands for (else ``None``).

    A tensor is itself; a :class:`~torch.nn.utils.rnn.PackedSequence` gives its packed data
    (one row per real token, no padding); a tuple or list gives its first item that is a tensor
    or a packed sequence (the per-token outputs of ``nn.LSTM``/``nn.GRU``/``nn.RNN``, the
    attention output of ``nn.MultiheadAttention``).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, PackedSequence):
        return output.data
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
            if isinstance(item, PackedSequence):
                return item.data
    return None


def rows_channel_last(x: torch.Tensor, reduce: str = "flatten") -> torch.Tensor:
    """Channel-last rows: ``(B, …, d) → (B·…, d)``; ``(d,) → (1, d)``.

    ``reduce="mean"`` averages the middle (token) axes instead: ``(B, …, d) → (B, d)``.
    """
    if x.ndim == 2:  # already rows (the common case on a hot path): no view to make
        return x
    if x.ndim == 1:
        return x.reshape(1, -1)
    if reduce == "mean" and x.ndim > 2:
        return x.flatten(1, -2).mean(dim=1)
    return x.reshape(-1, x.shape[-1])


def rows_channel_first(
    x: torch.Tensor, reduce: str = "mean", spatial_dims: int | None = 2
) -> torch.Tensor:
    """Channel-first rows: ``(B, c, *spatial) → (B, c)`` by the spatial mean.

    ``reduce="flatten"`` gives ``(B, c·∏spatial)`` instead. With a fixed ``spatial_dims``, an
    unbatched output ``(c, *spatial)`` (``spatial_dims + 1`` axes) is read as one sample; with
    ``spatial_dims=None`` (batch norms, group norm) axis 0 is always the batch, so ``(B, c)``
    stays as it is.
    """
    if spatial_dims is not None and x.ndim == spatial_dims + 1:
        x = x.unsqueeze(0)
    if x.ndim < 2:
        return x.reshape(-1, 1)
    if reduce == "flatten":
        return x.reshape(x.shape[0], -1)
    if x.ndim == 2:
        return x
    return x.flatten(2).mean(dim=-1)


@dataclass(frozen=True)
class Reduction:
    """How a module type's output becomes rows.

    ``layout``: ``"channel_first"`` (``N × C × …`` feature maps: the rows are the samples, the
    columns the channels, averaged over the remaining axes), ``"channel_last"`` (``… × d``:
    every leading position is a row) or ``"inherit"`` (a container: the reduction of its last
    submodule that has one). ``spatial_dims``: the number of spatial axes of a channel-first
    output (``None``: any number, axis 0 always the batch).
    """

    layout: Layout
    spatial_dims: int | None = None


_CL = Reduction("channel_last")

#: module type -> reduction; the most derived listed type of a module wins. Documented as a
#: table in docs/metrics.md ("Which rows a layer gives").
REDUCTIONS: dict[type[nn.Module], Reduction] = {
    nn.Linear: _CL,
    nn.Bilinear: _CL,
    nn.Embedding: _CL,
    nn.EmbeddingBag: _CL,
    nn.LayerNorm: _CL,
    nn.MultiheadAttention: _CL,  # its attention output (L, N, E) / (N, L, E): one row per token
    nn.RNNBase: _CL,  # LSTM/GRU/RNN per-token outputs; packed sequences give their real tokens
    nn.TransformerEncoderLayer: _CL,
    nn.TransformerDecoderLayer: _CL,
    nn.TransformerEncoder: _CL,
    nn.TransformerDecoder: _CL,
    nn.Transformer: _CL,
    nn.Conv1d: Reduction("channel_first", 1),
    nn.Conv2d: Reduction("channel_first", 2),
    nn.Conv3d: Reduction("channel_first", 3),
    nn.ConvTranspose1d: Reduction("channel_first", 1),
    nn.ConvTranspose2d: Reduction("channel_first", 2),
    nn.ConvTranspose3d: Reduction("channel_first", 3),
    nn.BatchNorm1d: Reduction("channel_first", None),  # (N, C) or (N, C, L)
    nn.BatchNorm2d: Reduction("channel_first", 2),
    nn.BatchNorm3d: Reduction("channel_first", 3),
    nn.SyncBatchNorm: Reduction("channel_first", None),
    nn.GroupNorm: Reduction("channel_first", None),  # (N, C, *)
    nn.InstanceNorm1d: Reduction("channel_first", 1),
    nn.InstanceNorm2d: Reduction("channel_first", 2),
    nn.InstanceNorm3d: Reduction("channel_first", 3),
    nn.LocalResponseNorm: Reduction("channel_first", None),
    nn.Dropout1d: Reduction("channel_first", 1),
    nn.Dropout2d: Reduction("channel_first", 2),
    nn.Dropout3d: Reduction("channel_first", 3),
    nn.MaxPool1d: Reduction("channel_first", 1),
    nn.MaxPool2d: Reduction("channel_first", 2),
    nn.MaxPool3d: Reduction("channel_first", 3),
    nn.AvgPool1d: Reduction("channel_first", 1),
    nn.AvgPool2d: Reduction("channel_first", 2),
    nn.AvgPool3d: Reduction("channel_first", 3),
    nn.AdaptiveAvgPool1d: Reduction("channel_first", 1),
    nn.AdaptiveAvgPool2d: Reduction("channel_first", 2),
    nn.AdaptiveAvgPool3d: Reduction("channel_first", 3),
    nn.AdaptiveMaxPool1d: Reduction("channel_first", 1),
    nn.AdaptiveMaxPool2d: Reduction("channel_first", 2),
    nn.AdaptiveMaxPool3d: Reduction("channel_first", 3),
    nn.Sequential: Reduction("inherit"),
    nn.ModuleList: Reduction("inherit"),
}


def _own_reduction(module: nn.Module) -> Reduction | None:
    for klass in type(module).__mro__:
        if klass in REDUCTIONS:
            return REDUCTIONS[klass]
    return None


def reduction_for(module: nn.Module) -> Reduction | None:
    """The reduction of ``module``'s output (see :data:`REDUCTIONS` and docs/metrics.md).

    A listed type gives its entry. A container (``nn.Sequential``, or any module with
    submodules whose own type is not listed) takes the reduction of its last submodule, in
    definition order, whose type is listed. ``None`` means "decide by the output's shape":
    elementwise modules (activations, ``nn.Dropout``, ``nn.Identity``) and unknown leaf types,
    whose 4-D and 5-D outputs are read as channel-first feature maps and all others as
    channel-last.
    """
    own = _own_reduction(module)
    if own is not None and own.layout != "inherit":
        return own
    children = list(module.modules())[1:]
    for child in reversed(children):
        red = _own_reduction(child)
        if red is not None and red.layout != "inherit":
            return red
    return None


def module_rows(
    reduction: Reduction | None,
    output: object,
    conv_reduce: str = "mean",
    seq_reduce: str = "flatten",
) -> torch.Tensor | None:
    """A module output as rows ``(n, d)`` by its reduction (``None`` if it holds no floating
    tensor with a batch axis). The graph is kept; detach the result if it is to be stored."""
    out = first_tensor(output)
    if out is None or not out.is_floating_point() or out.ndim == 0:
        return None
    if reduction is None:
        reduction = Reduction("channel_first", None) if out.ndim >= 4 else _CL
    if reduction.layout == "channel_first":
        return rows_channel_first(out, conv_reduce, reduction.spatial_dims)
    return rows_channel_last(out, seq_reduce)


def weight_matrices(name: str, module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The weight matrices of a watched module: ``{tag suffix: (owner module, parameter name)}``.

    - ``nn.MultiheadAttention``: ``<name>.in_proj_weight`` (or ``<name>.q_proj_weight``,
      ``k_proj_weight``, ``v_proj_weight`` when key/value sizes differ) and
      ``<name>.out_proj.weight``;
    - ``nn.LSTM``/``nn.GRU``/``nn.RNN``: ``<name>.weight_ih_l<k>``, ``<name>.weight_hh_l<k>``
      (``_reverse`` for the backward direction, ``weight_hr_l<k>`` for projections);
    - any other module with a ``weight`` of two or more axes: ``<name>``.

    The parameters themselves are looked up when they are read (``getattr(owner, pname)``), so a
    lazy module resolved after its first forward, or a parameter replaced by a sharding strategy,
    is read as it is then.
    """
    if isinstance(module, nn.MultiheadAttention):
        out: dict[str, tuple[nn.Module, str]] = {}
        for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            if getattr(module, pname, None) is not None:
                out[f"{name}.{pname}"] = (module, pname)
        out[f"{name}.out_proj.weight"] = (module.out_proj, "weight")
        return out
    if isinstance(module, nn.RNNBase):
        return {
            f"{name}.{pname}": (module, pname)
            for pname, p in module.named_parameters(recurse=False)
            if pname.startswith("weight_") and p.ndim == 2
        }
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and (
        isinstance(weight, nn.parameter.UninitializedParameter) or weight.ndim >= 2
    ):
        return {name: (module, "weight")}
    return {}


def is_compiled(model: nn.Module) -> bool:
    """True if ``model`` or a submodule was ``torch.compile``\\ d (wrapped or in place)."""
    for module in model.modules():
        if type(module).__name__ == "OptimizedModule":
            return True
        if getattr(module, "_compiled_call_impl", None) is not None:
            return True
    return False


_PAUSED = [0]  # > 0 while some callback evaluates the model outside the training forward


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No capture records anything inside this block (nested blocks allowed): a callback that
    evaluates the model itself (Hessian products, a certificate) is not training data."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def in_backward() -> bool:
    """True while autograd runs a backward pass (where gradient checkpointing re-runs forwards)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _mha_owned(named: list[tuple[str, nn.Module]]) -> set[str]:
    """Names of the modules owned by a MultiheadAttention (its ``out_proj``)."""
    owned: set[str] = set()
    for name, mod in named:
        if isinstance(mod, nn.MultiheadAttention):
            owned.update(f"{name}.{sub}" for sub, _ in mod.named_modules() if sub)
    return owned


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Module names chosen by ``layers``, in ``named_modules()`` order.

    ``"auto"``: every :data:`AUTO_TYPES` module (Linear, Conv1d/2d/3d, MultiheadAttention,
    LSTM/GRU/RNN) except the projections owned by a MultiheadAttention. Otherwise a name or glob
    pattern (``fnmatch``, e.g. ``"encoder.*"``), or a list of them; any module type may be
    named. A pattern that matches nothing raises :class:`SpectralConfigError` listing the
    available module names.
    """
    named = [(name, mod) for name, mod in model.named_modules() if name]
    available = [name for name, _ in named]
    if isinstance(layers, str):
        if layers == "auto":
            owned = _mha_owned(named)
            chosen: list[str] = [
                name for name, mod in named if isinstance(mod, AUTO_TYPES) and name not in owned
            ]
            if not chosen:
                raise SpectralConfigError(
                    "layers='auto' found no nn.Linear, nn.Conv1d/2d/3d, nn.MultiheadAttention or "
                    "recurrent module; name the layers to watch instead. Available modules: "
                    f"{_listing(named)}"
                )
            return chosen
        patterns = [layers]
    else:
        patterns = list(layers)
        if not patterns:
            raise SpectralConfigError(f"layers is empty. Available modules: {_listing(named)}")
    chosen = []
    missing: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise SpectralConfigError(f"layer names must be strings, got {pattern!r}")
        hits = [n for n in available if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            missing.append(pattern)
        chosen.extend(h for h in hits if h not in chosen)
    if missing:
        raise SpectralConfigError(
            f"layer name/pattern {', '.join(repr(m) for m in missing)} matches no module. "
            f"Available modules: {_listing(named)}"
        )
    order = {name: i for i, name in enumerate(available)}
    return sorted(chosen, key=order.__getitem__)


def resolve_one(model: nn.Module, pattern: str, what: str = "layer") -> str:
    """The one module named (or matched by the glob) ``pattern``; else a listing error."""
    names = resolve_layers(model, [pattern])
    if len(names) != 1:
        raise SpectralConfigError(
            f"{what} {pattern!r} matches {len(names)} modules ({', '.join(names)}); name exactly "
            "one"
        )
    return names[0]


def _listing(named: Iterable[tuple[str, nn.Module]]) -> str:
    items = [f"{name} ({type(mod).__name__})" for name, mod in named]
    return ", ".join(items) if items else "(the model has no submodules)"


@dataclass
class _Buffer:
    rows: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    seen: int = 0


Sink = Callable[[str, torch.Tensor], None]


@dataclass
class LayerCapture:
    """Gated hooks on chosen layers of ``model``, keeping bounded row buffers (or feeding a sink).

    Args:
        model: the network; hooks go on its submodules named by ``layers``.
        layers: ``"auto"``, a name/glob pattern, or a list of them (see :func:`resolve_layers`).
        max_samples: at most this many rows are kept per layer per window (≥ 1).
        conv_reduce: ``"mean"`` (global average pooling) or ``"flatten"`` for channel-first
            outputs.
        seq_reduce: ``"flatten"`` (each token a row) or ``"mean"`` for channel-last outputs.
        detach: detach the captured rows (default); ``False`` keeps the graph for a loss.
        pre: capture each module's first *input* (a forward pre-hook) instead of its output;
            the input is read channel-last (the features a classifier head receives).
        sink: when given, ``sink(name, rows)`` receives the rows of every call instead of the
            bounded buffer.
        on_skip: called once per layer as ``on_skip(name, reason)`` when an output cannot be
            captured (not a floating tensor); default: one warning per layer through ``warn``.
        owner: name used in warnings.
        warn: how warnings are issued (``warn(message)``); default: a :class:`SpectralWarning`.
            Callbacks pass a rank-zero-only warner.

    Use :meth:`attach` once, then :meth:`start` / :meth:`stop` around the forward passes of
    one window, :meth:`take` to get ``{layer: rows}`` (the buffers are emptied), and
    :meth:`remove` when done (teardown and on an exception).
    """

    model: nn.Module
    layers: str | Sequence[str] = "auto"
    max_samples: int = 1024
    conv_reduce: str = "mean"
    seq_reduce: str = "flatten"
    detach: bool = True
    pre: bool = False
    sink: Sink | None = None
    on_skip: Callable[[str, str], None] | None = None
    owner: str = "LayerCapture"
    warn: Callable[[str], None] | None = None
    names: list[str] = field(default_factory=list, init=False)
    skipped: dict[str, str] = field(default_factory=dict, init=False)
    active: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or (
            self.max_samples < 1
        ):
            raise SpectralConfigError(
                f"max_samples must be an integer >= 1, got {self.max_samples!r}"
            )
        if self.conv_reduce not in ("mean", "flatten"):
            raise SpectralConfigError(
                f"conv_reduce must be 'mean' or 'flatten', got {self.conv_reduce!r}"
            )
        if self.seq_reduce not in ("flatten", "mean"):
            raise SpectralConfigError(
                f"seq_reduce must be 'flatten' or 'mean', got {self.seq_reduce!r}"
            )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._buffers: dict[str, _Buffer] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = 0
        self.modules: dict[str, nn.Module] = {}
        self._reductions: dict[str, tuple[type, Reduction | None]] = {}
        #: times each layer was called (captured calls) since the last :meth:`start`
        self.calls: dict[str, int] = {}

    # -- lifetime ---------------------------------------------------------------------------
    def attach(self) -> list[str]:
        """Resolve the layers and register the (inactive) hooks once; returns the layer names.

        Warns if the model was ``torch.compile``\\ d before the hooks existed (the compiled
        graph may not call them; compile after adding the callback, or let the Trainer do it).
        """
        if self._handles:
            return self.names
        self.names = resolve_layers(self.model, self.layers)
        if is_compiled(self.model):
            self._warn(
                f"{self.owner}: the model was torch.compile'd before the capture hooks were "
                "registered; the compiled graph may not call them. Compile after the Trainer's "
                "setup (or compile submodules only after attaching the callback)."
            )
        lookup = dict(self.model.named_modules())
        self.skipped = {}
        for name in self.names:
            module = lookup[name]
            self.modules[name] = module
            if self.pre:
                handle = module.register_forward_pre_hook(self._make_pre_hook(name))
            else:
                handle = module.register_forward_hook(self._make_hook(name, module))
            self._handles.append(handle)
            self._buffers[name] = _Buffer()
        return self.names

    def remove(self) -> None:
        """Remove every hook and drop the buffers, leaving the modules as found."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._buffers = {name: _Buffer() for name in self.names}
        self.modules = {}
        self.active = False

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- windows ----------------------------------------------------------------------------
    def start(self, seed: int = 0) -> None:
        """Switch the hooks on; ``seed`` fixes this window's subsample (e.g. the global step)."""
        self._seed = int(seed)
        self._generators.clear()
        self.calls = {}
        self.active = True

    def stop(self) -> None:
        """Switch the hooks off (the buffers are kept until :meth:`take`)."""
        self.active = False

    def take(self) -> dict[str, torch.Tensor]:
        """``{layer: rows}`` captured since the last take (layers that saw nothing are absent)."""
        out = {}
        for name, buf in self._buffers.items():
            if buf.rows is not None:
                out[name] = buf.rows
        self._buffers = {name: _Buffer() for name in self.names}
        return out

    def counts(self) -> dict[str, int]:
        """Rows currently held per layer (host integers; no synchronisation)."""
        return {
            n: (0 if b.rows is None else int(b.rows.shape[0])) for n, b in self._buffers.items()
        }

    # -- hooks ------------------------------------------------------------------------------
    def _make_hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: object, output: object) -> None:
            if not self.active or _PAUSED[0] or in_backward():
                return None
            self._capture(name, self._reduction(name, mod), output)
            return None

        return hook

    def _reduction(self, name: str, mod: nn.Module) -> Reduction | None:
        # cached per module type: a lazy module becomes its concrete type after its first forward
        cached = self._reductions.get(name)
        if cached is None or cached[0] is not type(mod):
            cached = (type(mod), reduction_for(mod))
            self._reductions[name] = cached
        return cached[1]

    def _make_pre_hook(self, name: str) -> Callable[..., None]:
        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active or _PAUSED[0] or in_backward():
                return None
            self._capture(name, _CL, args[0] if args else None)
            return None

        return pre_hook

    def _skip(self, name: str, reason: str) -> None:
        if name in self.skipped:
            return
        self.skipped[name] = reason
        if self.on_skip is not None:
            self.on_skip(name, reason)
        else:
            self._warn(f"{self.owner}: layer {name!r} skipped: {reason}")

    def _warn(self, message: str) -> None:
        if self.warn is not None:
            self.warn(message)
        else:
            warnings.warn(message, SpectralWarning, stacklevel=4)

    def _capture(self, name: str, reduction: Reduction | None, output: object) -> None:
        out = first_tensor(output)
        if out is None:
            what = "input" if self.pre else "output"
            self._skip(name, f"{what} of type {type(output).__name__} holds no tensor")
            return
        if not (out.is_floating_point()) or out.ndim == 0:
            self._skip(
                name, f"output is not a floating tensor with a batch axis (dtype {out.dtype}, "
                f"shape {tuple(out.shape)})"
            )
            return
        self.calls[name] = self.calls.get(name, 0) + 1
        # rows of a detached output carry no graph whatever the grad mode (no context to enter
        # on this hot path); with ``detach=False`` they keep the output's graph
        source = out.detach() if self.detach else out
        rows = module_rows(reduction, source, self.conv_reduce, self.seq_reduce)
        if rows is None:
            return
        if self.sink is not None:
            self.sink(name, rows)
            return
        self._append(self._buffers[name], rows, source)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed((self._seed * 1_000_003 + 17) % (2**63 - 1))
            self._generators[device] = gen
        return gen

    def _append(self, buf: _Buffer, rows: torch.Tensor, source: torch.Tensor) -> None:
        k = self.max_samples
        n = rows.shape[0]
        if n == 0:
            return
        if buf.rows is not None and buf.rows.shape[1:] != rows.shape[1:]:
            # a module called with differently shaped inputs: keep the first shape only
            return
        held = 0 if buf.rows is None else buf.rows.shape[0]
        buf.seen += n
        if buf.keys is None and held + n <= k:
            # everything fits: keep all rows in arrival order, as a copy (an in-place op after
            # the layer, e.g. ReLU(inplace=True), must not change what was captured)
            if rows.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                rows = rows.clone()
            buf.rows = rows if buf.rows is None else torch.cat([buf.rows, rows])
            return
        gen = self._generator(rows.device)
        if buf.keys is None:  # first overflow: give the rows already held their keys
            buf.keys = (
                torch.rand(held, generator=gen, device=rows.device)
                if held
                else torch.empty(0, device=rows.device)
            )
        keys = torch.rand(n, generator=gen, device=rows.device)
        if n > k:  # never hold more than k of the new rows
            keys, idx = torch.topk(keys, k, largest=False, sorted=False)
            rows = rows.index_select(0, idx)
        all_rows = rows if buf.rows is None else torch.cat([buf.rows, rows])
        all_keys = torch.cat([buf.keys, keys])
        if all_rows.shape[0] > k:
            all_keys, idx = torch.topk(all_keys, k, largest=False, sorted=False)
            all_rows = all_rows.index_select(0, idx)
        elif all_rows.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
            all_rows = all_rows.clone()
        buf.rows, buf.keys = all_rows, all_keys
