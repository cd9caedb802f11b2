"""Offline per-matrix analysis of a checkpoint's weights.

The quantities are defined in docs/definitions.md#weights (with #stable-rank and #erank).

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
A tensor of shape ``(out, in, k1, ...)`` is read as ``W.reshape(out, in·k1·...)``
(docs/definitions.md#weight-matrix); for ``ConvTranspose`` kernels, stored ``(in, out, k...)``,
this is the transposed layout's reshape, which a state dict alone cannot tell apart.

**Loading** (:func:`load_state_dict`, :func:`load_torch_file`) lives in the private package
``lightning_spectral._checkpoint`` and is re-exported here: it never runs a pickle outside
``torch.load(weights_only=True)`` unless ``unsafe=True`` is passed, reads only regular files,
memory-maps zip checkpoints and refuses any tensor that would not fit in a memory budget before
anything is computed.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch

from lightning_spectral._checkpoint.common import (
    NAME_LIMIT,
    CheckpointError,
    budget_of,
    default_max_bytes,
    error,
    format_bytes,
    over_budget,
    parse_bytes,
    printable,
    sized,
)
from lightning_spectral._checkpoint.load import (
    SAFE_LOAD_TYPES,
    UnsafeLoadWarning,
    load_state_dict,
    load_torch_file,
)
from lightning_spectral.functional.quantities import Spectra, compute_quantities
from lightning_spectral.functional.weights import (
    singular_values_many,
    truncation_rank,
    weight_matrix,
)

__all__ = [
    "ANALYSIS_KEYS",
    "SAFE_LOAD_TYPES",
    "CheckpointError",
    "UnsafeLoadWarning",
    "analyze_spectra",
    "analyze_state_dict",
    "check_svd_budget",
    "default_max_bytes",
    "format_bytes",
    "is_weight_matrix",
    "load_state_dict",
    "load_torch_file",
    "parse_bytes",
    "select_weight_matrices",
    "summarize_spectrum",
    "svd_working_bytes",
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
    "alpha",
    "alpha_weighted",
)

_CHUNK = 16  # matrices per batched svdvals call (bounds the memory of one stack)


def svd_working_bytes(weight: torch.Tensor, dtype: torch.dtype | str | None = None) -> int:
    """Peak bytes :func:`weight_spectra` needs for one weight: an upper estimate.

    The matrix ``(out, in·k…)`` is copied into the batch, converted to the working dtype
    (float32, or float64 for float64 weights or ``dtype="float64"``), copied once more when
    non-finite entries are zeroed, and once more by LAPACK, which also needs a workspace:
    ``numel · (element_size + 4 · working element size)`` plus the vectors of the decomposition.
    (Measured peaks on CPU were 0.75-0.9 of this for float32 and float64 matrices.)
    """
    work = 8 if (weight.dtype == torch.float64 or str(dtype).removeprefix("torch.") == "float64"
                 ) else 4
    numel = weight.numel()
    rows = weight.shape[0] if weight.ndim else 1
    cols = numel // max(rows, 1)
    return numel * (weight.element_size() + 4 * work) + 8 * work * (rows + cols)


def check_svd_budget(
    weights: Mapping[str, torch.Tensor], max_bytes: int | str | None = None,
    dtype: torch.dtype | str | None = None, path: str | os.PathLike[str] | None = None,
) -> None:
    """Raise :class:`CheckpointError` for the first weight whose :func:`svd_working_bytes`
    exceeds the budget (default :func:`default_max_bytes`); nothing is computed."""
    budget = budget_of(max_bytes)
    prefix = f"{path}: " if path is not None else ""
    for name, w in weights.items():
        need = svd_working_bytes(w, dtype)
        if need > budget:
            what = "x".join(str(n) for n in w.shape)
            raise error(f"{prefix}tensor '{printable(name, NAME_LIMIT)}' ({what}) needs about "
                        f"{sized(need)} for its singular values, {over_budget(budget)}")


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
    max_bytes: int | str | None = None,
) -> dict[str, torch.Tensor]:
    """Singular values (docs/definitions.md#singular-spectrum) of each weight, batched by shape.

    Weights of one reshaped shape go through :func:`singular_values_many` in chunks of at most
    16 matrices (bounded memory); with ``max_bytes`` a chunk also holds no more matrices than
    fit in that many bytes by :func:`svd_working_bytes` (at least one: check single matrices
    with :func:`check_svd_budget` first). ``progress(done, total)`` is called after each chunk.
    """
    budget = None if max_bytes is None else parse_bytes(max_bytes)
    names = list(weights)
    groups: dict[tuple, list[str]] = {}
    for name in names:
        w = weights[name]
        groups.setdefault((tuple(weight_matrix(w).shape), w.dtype, w.device), []).append(name)
    out: dict[str, torch.Tensor] = {}
    done = 0
    for members in groups.values():
        size = _CHUNK
        if budget is not None:
            size = max(1, min(_CHUNK, budget // max(svd_working_bytes(weights[members[0]],
                                                                       dtype), 1)))
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
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


#: analysis columns computed by the quantity table's weight functions (the same functions as
#: the logged ``weight_*`` tags), in column order
_TABLE_COLUMNS = ("weight_sv_max", "weight_stable_rank", "weight_erank", "weight_alpha",
                  "weight_alpha_weighted")


def _stats(stack: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row statistics of singular values ``stack`` (g, r), descending: a (g, 8) float64.

    Columns (anchors of docs/definitions.md): ``σ_1``, stable rank ``Σσ²/σ_1²`` (#stable-rank),
    ``erank = exp(S(σ²))`` (#erank), ``k(τ)`` (#capacity), the relative Eckart–Young error at ``k``
    (#eckart-young), the heavy-tailed exponent ``α`` of ``σ²`` and ``α·log10 σ_1²``
    (#heavy-tail) and a finiteness flag. ``σ_1``, the stable rank, erank, ``α`` and ``α̂`` are
    the functions of ``lightning_spectral.functional.quantities.QUANTITIES`` that compute the
    logged ``weight_sv_max``, ``weight_stable_rank``, ``weight_erank``, ``weight_alpha`` and
    ``weight_alpha_weighted``, in the same precision.
    The Eckart–Young tail ``Σ_{i>k} σ_i²`` is the formula of :func:`eckart_young_error`,
    gathered per row from one reverse cumulative sum so that rows with different ``k`` share
    one call.
    """
    finite = torch.isfinite(stack).all(dim=-1)
    s = torch.where(finite[:, None], stack, torch.zeros_like(stack))
    table = compute_quantities(_TABLE_COLUMNS, Spectra(s=s)).double()
    sv_max, srank, erank, alpha, alpha_w = table.unbind(dim=-1)
    k = truncation_rank(s, tau).long()  # non-finite rows were zeroed, so k is finite
    s2d = s.square().double()
    tails = torch.cat([s2d.flip(-1).cumsum(-1).flip(-1), s2d.new_zeros(len(s2d), 1)], dim=-1)
    tail = tails.gather(-1, k[:, None])[:, 0]
    total = tails[:, 0]
    nan = torch.full_like(total, float("nan"))
    rel = torch.where(total > 0, (tail / torch.where(total > 0, total, 1.0)).sqrt(), nan)
    out = torch.stack([sv_max, srank, erank, k.double(), rel, alpha, alpha_w, finite.double()],
                      dim=-1)
    # a non-finite weight: every statistic undefined
    return torch.where(finite[:, None] | (torch.arange(8, device=out.device) == 7), out,
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
        sv_max, srank, erank, k, rel, alpha, alpha_w, finite = by_index[i]
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
            "param_ratio": (cast(int, rank) * (out_dim + cols) / (out_dim * cols)
                            if finite else None),
            "alpha": _clean(alpha),
            "alpha_weighted": _clean(alpha_w),
        })
    return rows


def _clean(v: float) -> float | None:
    return v if math.isfinite(v) else None


def summarize_spectrum(
    name: str, shape: Sequence[int], s: torch.Tensor, energy: float = 0.99
) -> dict[str, Any]:
    """One analysis row from the singular values ``s`` (descending) of a weight of ``shape``.

    Each item names its section of docs/definitions.md:

    - ``sv_max = σ_1 = ‖W‖₂``; ``stable_rank = Σσ²/σ_1²`` (#stable-rank, ``None`` for ``W = 0``);
    - ``erank = exp(S(σ²))`` (#erank, on ``σ²``, cut off as in #cutoff; 0 for ``W = 0``);
    - ``rank_at_energy = k(τ)`` (#capacity, the memory-capacity estimate) for ``τ = energy``;
    - ``eckart_young_rel_error = (Σ_{i>k} σ_i²)^{1/2} / ‖W‖_F`` at that ``k`` (#eckart-young);
    - ``param_ratio = k·(out + in·k1·...) / (out·in·k1·...)`` (weights only, biases unchanged);
    - ``alpha``: the heavy-tailed exponent of ``σ²`` (#heavy-tail; power-law fit with the KS-optimal
      ``xmin``, as WeightWatcher's ``alpha``) and ``alpha_weighted = α·log10 σ_1²``
      (``None`` where the fit is undefined: fewer than two non-zero ``σ²``).

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
    """Per-matrix decomposition report of a state dict (docs/definitions.md#weights).

    One dict per weight matrix (see :func:`is_weight_matrix`), in state-dict order, with exactly
    the keys of :data:`ANALYSIS_KEYS`: ``name``, ``shape`` (the tensor's shape), ``params``,
    ``sv_max``, ``stable_rank``, ``erank``, ``rank_at_energy`` (the memory-capacity estimate
    at ``energy``), ``energy``, ``eckart_young_rel_error``, ``param_ratio`` (see
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
