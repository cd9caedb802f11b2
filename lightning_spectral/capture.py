"""Which layers, and their outputs: gated forward hooks with bounded row buffers.

A :class:`LayerCapture` resolves a layer selection against a model, registers one forward hook
per chosen module **once** (so a ``torch.compile``\\ d model sees them) and removes them again,
leaving the modules as found. The hooks do nothing unless the capture is switched on
(:meth:`LayerCapture.start`), so they cost one attribute test on every other step.

While on, each hook reduces its module's output to rows (SPEC.md §0.1) through a table from
module type to reduction (:data:`REDUCTIONS`) — adding a layer type is one entry — detaches
them, and keeps a deterministic, bounded subsample of at most ``max_samples`` rows per layer
across every call of the window (several micro-batches under gradient accumulation, a module
called several times per forward). The subsample is a *bottom-k* sample: each row gets a key
from the capture's own :class:`torch.Generator` (seeded per window, never the global RNG) and the
``max_samples`` rows with the smallest keys are kept, which is a uniform sample without
replacement of all rows seen, in bounded memory. When every row fits, all rows are kept in
arrival order.

Nothing here imports Lightning: callbacks (``SpectralMonitor``, and any other that needs layer
outputs) own a ``LayerCapture`` and decide when it is on.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_spectral.errors import SpectralConfigError, SpectralWarning

__all__ = [
    "REDUCTIONS",
    "AUTO_TYPES",
    "LayerCapture",
    "resolve_layers",
    "rows_channel_last",
    "rows_channel_first",
    "first_tensor",
    "is_compiled",
]

#: module types captured by ``layers="auto"``
AUTO_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def first_tensor(output: object) -> torch.Tensor | None:
    """The module output itself, or the first tensor of a tuple/list output (else ``None``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def rows_channel_last(x: torch.Tensor, reduce: str = "flatten") -> torch.Tensor:
    """Channel-last rows (SPEC.md §0.1): ``(B, …, d) → (B·…, d)``; ``(d,) → (1, d)``.

    ``reduce="mean"`` averages the middle (token) axes instead: ``(B, …, d) → (B, d)``.
    """
    if x.ndim == 1:
        return x.reshape(1, -1)
    if reduce == "mean" and x.ndim > 2:
        return x.flatten(1, -2).mean(dim=1)
    return x.reshape(-1, x.shape[-1])


def rows_channel_first(
    x: torch.Tensor, reduce: str = "mean", spatial_dims: int = 2
) -> torch.Tensor:
    """Channel-first rows (SPEC.md §0.1): ``(B, c, *spatial) → (B, c)`` by the spatial mean.

    ``reduce="flatten"`` gives ``(B, c·∏spatial)`` instead. An unbatched output
    ``(c, *spatial)`` (``spatial_dims + 1`` axes) is read as one sample.
    """
    if x.ndim == spatial_dims + 1:
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
    """How a module type's output becomes rows: channel-first (convolutions) or channel-last."""

    layout: str  # "channel_first" | "channel_last"
    spatial_dims: int = 0


#: module type -> reduction; a type not listed (and not a subclass of one) is channel-last
REDUCTIONS: dict[type[nn.Module], Reduction] = {
    nn.Linear: Reduction("channel_last"),
    nn.Bilinear: Reduction("channel_last"),
    nn.Conv1d: Reduction("channel_first", 1),
    nn.Conv2d: Reduction("channel_first", 2),
    nn.Conv3d: Reduction("channel_first", 3),
    nn.ConvTranspose1d: Reduction("channel_first", 1),
    nn.ConvTranspose2d: Reduction("channel_first", 2),
    nn.ConvTranspose3d: Reduction("channel_first", 3),
}


def reduction_for(module: nn.Module) -> Reduction:
    """The :data:`REDUCTIONS` entry of ``module``'s type (most derived match); channel-last else."""
    for klass in type(module).__mro__:
        if klass in REDUCTIONS:
            return REDUCTIONS[klass]
    return Reduction("channel_last")


def is_compiled(model: nn.Module) -> bool:
    """True if ``model`` or a submodule was ``torch.compile``\\ d (wrapped or in place)."""
    for module in model.modules():
        if type(module).__name__ == "OptimizedModule":
            return True
        if getattr(module, "_compiled_call_impl", None) is not None:
            return True
    return False


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Module names chosen by ``layers``, in ``named_modules()`` order.

    ``"auto"``: every :data:`AUTO_TYPES` module. Otherwise a name or glob pattern (``fnmatch``,
    e.g. ``"encoder.*"``), or a list of them; any module type may be named. A pattern that
    matches nothing raises :class:`SpectralConfigError` listing the available module names.
    """
    named = [(name, mod) for name, mod in model.named_modules() if name]
    available = [name for name, _ in named]
    if isinstance(layers, str):
        if layers == "auto":
            chosen = [name for name, mod in named if isinstance(mod, AUTO_TYPES)]
            if not chosen:
                raise SpectralConfigError(
                    "layers='auto' found no nn.Linear or nn.Conv1d/2d/3d module; name the layers "
                    f"to watch instead. Available modules: {_listing(named)}"
                )
            return chosen
        patterns = [layers]
    else:
        patterns = list(layers)
        if not patterns:
            raise SpectralConfigError(f"layers is empty. Available modules: {_listing(named)}")
    chosen: list[str] = []
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


def _listing(named: Iterable[tuple[str, nn.Module]]) -> str:
    items = [f"{name} ({type(mod).__name__})" for name, mod in named]
    return ", ".join(items) if items else "(the model has no submodules)"


@dataclass
class _Buffer:
    rows: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    seen: int = 0
    calls: int = 0


@dataclass
class LayerCapture:
    """Gated forward hooks on chosen layers of ``model``, keeping bounded row buffers.

    Args:
        model: the network; hooks go on its submodules named by ``layers``.
        layers: ``"auto"``, a name/glob pattern, or a list of them (see :func:`resolve_layers`).
        max_samples: at most this many rows are kept per layer per window (≥ 1).
        conv_reduce: ``"mean"`` (global average pooling) or ``"flatten"`` for convolutions.
        seq_reduce: ``"flatten"`` (each token a row) or ``"mean"`` for channel-last outputs.
        detach: detach the captured rows (default); ``False`` keeps the graph for a loss.
        on_skip: called once per layer as ``on_skip(name, reason)`` when an output cannot be
            captured (not a floating tensor); default: one :class:`SpectralWarning` per layer.
        owner: name used in warnings.

    Use :meth:`attach` once, then :meth:`start` / :meth:`stop` around the forward passes of
    one window, :meth:`take` to get ``{layer: rows}`` (the buffers are emptied), and
    :meth:`remove` at teardown.
    """

    model: nn.Module
    layers: str | Sequence[str] = "auto"
    max_samples: int = 1024
    conv_reduce: str = "mean"
    seq_reduce: str = "flatten"
    detach: bool = True
    on_skip: Callable[[str, str], None] | None = None
    owner: str = "LayerCapture"
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
            warnings.warn(
                f"{self.owner}: the model was torch.compile'd before the capture hooks were "
                "registered; the compiled graph may not call them. Compile after the Trainer's "
                "setup (or compile submodules only after attaching the callback).",
                SpectralWarning,
                stacklevel=2,
            )
        lookup = dict(self.model.named_modules())
        for name in self.names:
            module = lookup[name]
            self.modules[name] = module
            self._handles.append(module.register_forward_hook(self._make_hook(name, module)))
            self._buffers[name] = _Buffer()
        return self.names

    def remove(self) -> None:
        """Remove every hook and drop the buffers, leaving the modules as found."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._buffers = {name: _Buffer() for name in self.names}
        self.active = False

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- windows ----------------------------------------------------------------------------
    def start(self, seed: int = 0) -> None:
        """Switch the hooks on; ``seed`` fixes this window's subsample (e.g. the global step)."""
        self._seed = int(seed)
        self._generators.clear()
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
    def _make_hook(self, name: str, module: nn.Module) -> Callable:
        reduction = reduction_for(module)

        def hook(mod: nn.Module, args: object, output: object) -> None:
            if not self.active:
                return None
            self._capture(name, reduction, output)
            return None

        return hook

    def _skip(self, name: str, reason: str) -> None:
        if name in self.skipped:
            return
        self.skipped[name] = reason
        if self.on_skip is not None:
            self.on_skip(name, reason)
        else:
            warnings.warn(
                f"{self.owner}: layer {name!r} skipped: {reason}", SpectralWarning, stacklevel=3
            )

    def to_rows(self, reduction: Reduction, out: torch.Tensor) -> torch.Tensor:
        """A module output as rows, per its :class:`Reduction` (SPEC.md §0.1)."""
        if reduction.layout == "channel_first":
            return rows_channel_first(out, self.conv_reduce, reduction.spatial_dims)
        return rows_channel_last(out, self.seq_reduce)

    def _capture(self, name: str, reduction: Reduction, output: object) -> None:
        out = first_tensor(output)
        if out is None:
            self._skip(name, f"output of type {type(output).__name__} holds no tensor")
            return
        if not (out.is_floating_point()) or out.ndim == 0:
            self._skip(
                name, f"output is not a floating tensor with a batch axis (dtype {out.dtype}, "
                f"shape {tuple(out.shape)})"
            )
            return
        source = out.detach() if self.detach else out
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
            rows = self.to_rows(reduction, source)
            buf = self._buffers[name]
            buf.calls += 1
            self._append(buf, rows, source)

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
