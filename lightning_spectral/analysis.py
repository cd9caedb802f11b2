"""Offline per-matrix analysis of a checkpoint's weights (SPEC.md §1.3, §1.4, §5).

No model code is needed: a Lightning ``.ckpt`` (its ``"state_dict"``) or a plain ``state_dict``
file is read as a mapping from names to tensors, and every *weight matrix* in it is decomposed.

**Which tensors are weight matrices** (decision, documented in ``docs/compression.md``): a
floating-point tensor with at least two dimensions whose name (last dotted component) ends in
``weight`` — ``fc.weight``, ``conv.weight``, ``attn.in_proj_weight``, ``emb.weight``. Biases,
BatchNorm/LayerNorm scales and running statistics are 1-D and so never qualify; integer buffers
(``num_batches_tracked``) are not floating. Embedding tables are **included**: they are linear maps
from one-hot inputs, and every quantity reported here (singular values, stable rank, effective
rank, truncation rank, Eckart–Young error, parameter ratio) is invariant under transposition, so
their ``(num, dim)`` layout does not matter. Use ``exclude`` (glob patterns) to drop any of them.
A tensor of shape ``(out, in, k1, ...)`` is read as ``W.reshape(out, in·k1·...)`` (SPEC.md §0.1);
for ``ConvTranspose`` kernels, stored ``(in, out, k...)``, this is the transposed layout's
reshape, which a state dict alone cannot tell apart.
"""

from __future__ import annotations

import fnmatch
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_spectral.errors import SpectralError
from lightning_spectral.functional.spectrum import effective_rank
from lightning_spectral.functional.weights import (
    singular_values_many,
    truncation_rank,
    weight_matrix,
)

__all__ = [
    "ANALYSIS_KEYS",
    "CheckpointError",
    "analyze_spectra",
    "analyze_state_dict",
    "is_weight_matrix",
    "load_state_dict",
    "select_weight_matrices",
    "summarize_spectrum",
    "weight_spectra",
]

#: The keys of one analysis row, in order (the ``--format json`` objects have exactly these).
ANALYSIS_KEYS: tuple[str, ...] = (
    "name",
    "shape",
    "params",
    "sv_max",
    "stable_rank",
    "erank",
    "rank_at_energy",
    "energy",
    "eckart_young_rel_error",
    "param_ratio",
)

_CHUNK = 16  # matrices per batched svdvals call (bounds the memory of one stack)


class CheckpointError(SpectralError, ValueError):
    """A file could not be read as a checkpoint or holds no weight matrices."""


# ------------------------------------------------------------------------------------------
# loading


class _Opaque:
    """Stand-in for any pickled Python object that is not a tensor or a plain container.

    Built instead of the real class, so loading never imports or runs the checkpoint's code.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:  # a pickled function, "called"
        return _Opaque()

    # containers pickled as subclasses of dict/list (SETITEMS, APPENDS) fill a stub silently
    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _OpaqueUnpickler(pickle.Unpickler):
    """Resolves only the globals ``torch.load(weights_only=True)`` allows; stubs the rest."""

    _allowed: dict[str, Any] | None = None

    @classmethod
    def allowed(cls) -> dict[str, Any]:
        if cls._allowed is None:
            from torch import _weights_only_unpickler as wou

            table: dict[str, Any] = {}
            for key, value in wou._get_allowed_globals().items():
                table[key] = value
            cls._allowed = table
        return cls._allowed

    def find_class(self, module: str, name: str) -> Any:
        value = self.allowed().get(f"{module}.{name}")
        if value is not None:
            return value
        return type(name, (_Opaque,), {"__module__": "lightning_spectral.analysis._opaque"})


class _OpaquePickleModule:
    """A ``pickle_module`` for ``torch.load`` that never executes checkpoint code."""

    Unpickler = _OpaqueUnpickler
    __name__ = "lightning_spectral_opaque_pickle"

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:  # used by torch for the legacy format
        return _OpaqueUnpickler(*args, **kwargs).load()


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; if it refuses a global, load with stubs for it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise
    # Objects other than tensors and containers (user hyper-parameters, custom classes): read
    # the file again with an unpickler that replaces every such object by an inert stub.
    return torch.load(path, map_location="cpu", weights_only=False,
                      pickle_module=_OpaquePickleModule)


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a Lightning checkpoint or plain state dict; ``None`` if there are none."""
    if isinstance(obj, torch.nn.Module):  # a whole pickled module (torch.save(model))
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors or None


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a Lightning ``.ckpt`` (its ``"state_dict"``) or a plain state-dict file, on the CPU.

    Loads with ``torch.load(weights_only=True)``; when the file also pickles Python objects that
    this refuses (custom hyper-parameter classes, ...), it is read again with an unpickler that
    resolves only the same allow-listed torch globals and replaces every other object by an inert
    stub, so no code from the file is imported or run. Returns the name → tensor mapping.

    Raises :class:`CheckpointError` with a one-line message naming the file and the problem (not
    found, a directory, unreadable, not a torch file, no tensors).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, expected a checkpoint file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"{p}: permission denied")
    try:
        obj = _torch_load(p)
    except OSError as exc:
        raise CheckpointError(f"{p}: unreadable ({exc.strerror or exc})") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a non-torch file
        if not zipfile.is_zipfile(p):
            reason = "not a torch.save archive"
        else:
            text = str(exc).strip()
            first = text.splitlines()[0][:160] if text else ""
            reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise CheckpointError(f"{p}: not a PyTorch/Lightning checkpoint ({reason})") from exc
    sd = _extract_state_dict(obj)
    if sd is None:
        raise CheckpointError(
            f"{p}: no state_dict found (expected a Lightning .ckpt with a 'state_dict' entry or a "
            f"mapping of names to tensors, got {type(obj).__name__})"
        )
    return sd


# ------------------------------------------------------------------------------------------
# selection and analysis


def is_weight_matrix(name: str, tensor: Any) -> bool:
    """Whether ``name``/``tensor`` is analysed: floating, ``ndim >= 2``, name ending in ``weight``.

    See the module docstring for the reasoning (embeddings included, 1-D norms excluded).
    """
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and tensor.ndim >= 2
        and tensor.numel() > 0
        and name.rsplit(".", 1)[-1].endswith("weight")
    )


def select_weight_matrices(
    state_dict: Mapping[str, Any], exclude: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The weight matrices of a state dict, in order, minus names matching an ``exclude`` glob."""
    patterns = list(exclude)
    return {
        name: t
        for name, t in state_dict.items()
        if is_weight_matrix(name, t) and not any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }


def weight_spectra(
    weights: Mapping[str, torch.Tensor],
    dtype: torch.dtype | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Singular values (SPEC.md §5.1) of each weight, batched by equal matrix shape.

    Weights of one reshaped shape go through :func:`singular_values_many` in chunks of at most
    16 matrices (bounded memory); ``progress(done, total)`` is called after each chunk.
    """
    names = list(weights)
    groups: dict[tuple, list[str]] = {}
    for name in names:
        w = weights[name]
        groups.setdefault((tuple(weight_matrix(w).shape), w.dtype, w.device), []).append(name)
    out: dict[str, torch.Tensor] = {}
    done = 0
    for members in groups.values():
        for start in range(0, len(members), _CHUNK):
            chunk = members[start:start + _CHUNK]
            with torch.no_grad():
                spectra = singular_values_many([weights[n] for n in chunk], dtype=dtype)
            out.update(zip(chunk, spectra, strict=True))
            done += len(chunk)
            if progress is not None:
                progress(done, len(names))
    return {name: out[name] for name in names}


def _check_energy(energy: float) -> float:
    tau = float(energy)
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"energy must lie in (0, 1], got {energy!r}")
    return tau


def _stats(stack: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row statistics of singular values ``stack`` (g, r), descending: a (g, 6) float64.

    Columns: ``σ_1``, stable rank ``Σσ²/σ_1²`` (§1.4), ``erank = exp(S(σ²))`` (§1.3),
    ``k(τ)`` (§5.3), the relative Eckart–Young error at ``k`` (§5.2) and a finiteness flag.
    The Eckart–Young tail ``Σ_{i>k} σ_i²`` is the formula of :func:`eckart_young_error`,
    gathered per row from one reverse cumulative sum so that rows with different ``k`` share
    one call.
    """
    finite = torch.isfinite(stack).all(dim=-1)
    s = torch.where(finite[:, None], stack, torch.zeros_like(stack))
    s2 = s.square()
    erank = effective_rank(s2).double()
    k = truncation_rank(s, tau).long()  # non-finite rows were zeroed, so k is finite
    s2d = s2.double()
    tails = torch.cat([s2d.flip(-1).cumsum(-1).flip(-1), s2d.new_zeros(len(s2d), 1)], dim=-1)
    tail = tails.gather(-1, k[:, None])[:, 0]
    total = tails[:, 0]
    top = s2d[:, 0] if s2d.shape[-1] else total
    nan = torch.full_like(total, float("nan"))
    srank = torch.where(top > 0, total / torch.where(top > 0, top, 1.0), nan)
    rel = torch.where(total > 0, (tail / torch.where(total > 0, total, 1.0)).sqrt(), nan)
    out = torch.stack([s[:, 0].double() if s.shape[-1] else total, srank, erank, k.double(), rel,
                       finite.double()], dim=-1)
    # a non-finite weight: every statistic undefined
    return torch.where(finite[:, None] | (torch.arange(6, device=out.device) == 5), out,
                       torch.full_like(out, float("nan")))


def _rows(
    names: list[str], shapes: list[tuple[int, ...]], spectra: list[torch.Tensor], tau: float
) -> list[dict[str, Any]]:
    """Analysis rows; the statistics of equal-length spectra are computed in one batch and all
    of them copied to the host at once."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(spectra):
        groups.setdefault((s.shape[-1], s.device, s.dtype), []).append(i)
    parts, order = [], []
    for idx in groups.values():
        parts.append(_stats(torch.stack([spectra[i].detach() for i in idx]), tau))
        order.extend(idx)
    if parts and len({p.device for p in parts}) == 1:
        host = torch.cat(parts).cpu().tolist()  # one device-to-host copy
    else:
        host = torch.cat([p.cpu() for p in parts]).tolist() if parts else []
    by_index = dict(zip(order, host, strict=True))
    rows = []
    for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        sv_max, srank, erank, k, rel, finite = by_index[i]
        out_dim, cols = shape[0], math.prod(shape[1:])
        rank = int(k) if finite else None
        rows.append({
            "name": name,
            "shape": list(shape),
            "params": math.prod(shape),
            "sv_max": _clean(sv_max),
            "stable_rank": _clean(srank),
            "erank": _clean(erank),
            "rank_at_energy": rank,
            "energy": tau,
            "eckart_young_rel_error": _clean(rel),
            "param_ratio": rank * (out_dim + cols) / (out_dim * cols) if finite else None,
        })
    return rows


def _clean(v: float) -> float | None:
    return v if math.isfinite(v) else None


def summarize_spectrum(
    name: str, shape: Sequence[int], s: torch.Tensor, energy: float = 0.99
) -> dict[str, Any]:
    """One analysis row from the singular values ``s`` (descending) of a weight of ``shape``.

    - ``sv_max = σ_1 = ‖W‖₂``; ``stable_rank = Σσ²/σ_1²`` (§1.4, ``None`` for ``W = 0``);
    - ``erank = exp(S(σ²))`` (§1.3, on ``σ²``, with the cutoff of §0.3; 0 for ``W = 0``);
    - ``rank_at_energy = k(τ)`` (§5.3, the memory-capacity estimate) for ``τ = energy``;
    - ``eckart_young_rel_error = (Σ_{i>k} σ_i²)^{1/2} / ‖W‖_F`` at that ``k`` (§5.2);
    - ``param_ratio = k·(out + in·k1·...) / (out·in·k1·...)`` (weights only, biases unchanged).

    Undefined values (a NaN/Inf weight; the stable rank and error of ``W = 0``) are ``None``.
    """
    tau = _check_energy(energy)
    return _rows([name], [tuple(int(n) for n in shape)], [s], tau)[0]


def analyze_state_dict(
    state_dict: Mapping[str, Any],
    energy: float = 0.99,
    *,
    exclude: Iterable[str] = (),
    dtype: torch.dtype | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per-matrix decomposition report of a state dict (SPEC.md §1.3, §1.4, §5).

    One dict per weight matrix (see :func:`is_weight_matrix`), in state-dict order, with exactly
    the keys of :data:`ANALYSIS_KEYS`: ``name``, ``shape`` (the tensor's shape), ``params``,
    ``sv_max``, ``stable_rank``, ``erank``, ``rank_at_energy`` (the §5.3 memory-capacity
    estimate at ``energy``), ``energy``, ``eckart_young_rel_error``, ``param_ratio`` (see
    :func:`summarize_spectrum`). Spectra are computed in float32 (float64 weights, or
    ``dtype="float64"``: float64) on the weights' device, batched by equal matrix shape; the
    statistics are batched by spectrum length and reach the host in one copy.
    ``energy`` must lie in ``(0, 1]``.
    """
    tau = _check_energy(energy)
    weights = select_weight_matrices(state_dict, exclude)
    spectra = weight_spectra(weights, dtype=dtype, progress=progress)
    names = list(weights)
    return _rows(names, [tuple(weights[n].shape) for n in names], [spectra[n] for n in names],
                 tau)


def analyze_spectra(
    weights: Mapping[str, torch.Tensor], spectra: Mapping[str, torch.Tensor], energy: float = 0.99
) -> list[dict[str, Any]]:
    """Analysis rows for precomputed ``spectra`` of ``weights`` (as :func:`weight_spectra`)."""
    tau = _check_energy(energy)
    names = list(weights)
    return _rows(names, [tuple(weights[n].shape) for n in names], [spectra[n] for n in names],
                 tau)
