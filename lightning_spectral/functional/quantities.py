"""The table of logged spectral quantities: each one declared once (docs/architecture.md).

Every scalar that :class:`~lightning_spectral.SpectralMonitor` logs per layer — and every
weight statistic that ``lightning-spectral analyze`` reports — is a :class:`Quantity` in
``QUANTITIES``: its tag prefix, its function of the spectrum, its direction, a one-line
meaning, its section of ``docs/definitions.md`` and the per-layer dashboard chart it belongs
to. The monitor builds its batched per-event computation and its dashboard layout from this
table, the ``analyze`` rows call the same weight functions, and docs/metrics.md documents
every entry under a ``### `<name>/...``` heading (a test checks it).

A quantity's function receives a :class:`Spectra`: the stacked spectra of one group of
equal-shape layers, with intermediate results (``σ²``, the power-law fit) computed once and
shared by the quantities that need them:

* activation quantities read ``lam`` — the eigenvalues of the row-normalised autocorrelation
  ``(..., m)``, descending (docs/definitions.md#autocorrelation) — and, when declared with
  ``raw=True`` (RankMe), ``raw``: the eigenvalues of the *unnormalised* rows;
* weight quantities read ``s``: singular values ``(..., r_max)``, zero-padded to the longest
  weight of the group (trailing zeros change none of them: they are cut off, add no energy and
  no mass).

Each function returns one value per spectrum (shape ``(...)``), on the input's device, without
synchronising with the host. Adding a quantity is one :class:`Quantity` entry here plus its
function, a test and its docs/metrics.md section.

A weight quantity with an ``estimate`` also has a value without the full spectrum: read from a
:class:`~lightning_spectral.functional.estimate.WeightEstimate` (Lanczos ``σ_1``, the exact
``‖W‖_F²`` and a block Krylov sketch; docs/definitions.md#large-weights), which the monitor
uses for large weights between its exact events (``ESTIMATED_QUANTITIES``,
:func:`estimate_quantities`). The others (the power-law fit) need every singular value and are
logged on exact spectra only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from lightning_spectral.functional._utils import apply_cutoff, as_spectrum, entropy_and_total
from lightning_spectral.functional.powerlaw import PowerLawFit, powerlaw_alpha
from lightning_spectral.functional.spectrum import (
    RANKME_EPS,
    _condition_of,
    _erank_of,
    _rankme_of_cut,
    condition_number,
    effective_rank,
)
from lightning_spectral.functional.weights import stable_rank_from_singular_values, truncation_rank

if TYPE_CHECKING:
    from lightning_spectral.functional.estimate import WeightEstimate

__all__ = [
    "Quantity",
    "Spectra",
    "QUANTITIES",
    "ACTIVATION_QUANTITIES",
    "WEIGHT_QUANTITIES",
    "ESTIMATED_QUANTITIES",
    "quantity",
    "compute_quantities",
    "estimate_quantities",
]


class Spectra:
    """The spectra of one stacked group of layers, and the intermediates computed from them.

    ``lam``/``raw`` (activations) or ``s`` (weights), each ``(..., m)``. Derived values
    (the cut activation spectra and their entropy and total, ``s2 = σ²``, the power-law fit of
    ``σ²``, the NaN mask of ``s``) are computed on first use and shared by every quantity of
    the group.

    Activation spectra of different lengths can share one group: zero-pad them to a common
    width and pass ``sizes`` (``(...)``, integer: how many leading values of each row are its
    spectrum). Padded spectra must already be cut (``cut=True``), as those of
    :func:`~lightning_spectral.functional.autocorrelation_eigvals` are: the cutoff's threshold
    depends on the length of the spectrum (docs/definitions.md#cutoff), which the padded width
    is not. ``cut=True`` on its own skips re-applying the cutoff to spectra that already had it
    (at the same or a finer level: re-applying it changes nothing).

    Examples:
        Two weights with singular values ``(3, 4)`` and ``(1, 0)``; ``σ²`` is computed once:

        >>> import torch
        >>> from lightning_spectral.functional import Spectra
        >>> sp = Spectra(s=torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        >>> sp.s2.tolist()
        [[9.0, 16.0], [1.0, 0.0]]
        >>> sp.s2 is sp.s2
        True

        Two activation spectra of lengths 3 and 2 in one group, the second zero-padded:

        >>> from lightning_spectral.functional import compute_quantities
        >>> lam = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]])
        >>> padded = Spectra(lam=lam, sizes=torch.tensor([3, 2]), cut=True)
        >>> [round(v, 4) for v in compute_quantities(["erank", "condition"], padded)[1].tolist()]
        [2.0, 1.0]
    """

    def __init__(
        self,
        lam: torch.Tensor | None = None,
        raw: torch.Tensor | None = None,
        s: torch.Tensor | None = None,
        *,
        sizes: torch.Tensor | None = None,
        cut: bool = False,
    ) -> None:
        if sizes is not None and not cut:
            raise ValueError("zero-padded activation spectra (sizes=...) must be cut (cut=True)")
        self.lam = lam
        self.raw = raw
        self.s = s
        self.sizes = sizes
        self.cut = cut
        self._memo: dict[str, object] = {}

    def _need(self, value: torch.Tensor | None, name: str) -> torch.Tensor:
        if value is None:
            raise ValueError(f"this quantity needs the {name!r} spectrum, which was not given")
        return value

    def shared(self, key: str, fn: Callable[[], object]) -> object:
        """``fn()`` computed once per group under ``key``."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def _cut(self, name: str) -> torch.Tensor:
        value = self._need(getattr(self, name), name)
        if self.cut:
            return value
        return self.shared(  # type: ignore[return-value]
            f"{name}_cut", lambda: apply_cutoff(as_spectrum(value))
        )

    @property
    def lam_cut(self) -> torch.Tensor:
        """``lam`` after the cutoff (docs/definitions.md#cutoff)."""
        return self._cut("lam")

    @property
    def raw_cut(self) -> torch.Tensor:
        """``raw`` after the cutoff."""
        return self._cut("raw")

    @property
    def entropy_total(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S(λ), Σλ)`` of the cut ``lam``, each ``(...)`` (docs/definitions.md#entropy)."""
        return self.shared(  # type: ignore[return-value]
            "entropy_total", lambda: entropy_and_total(self.lam_cut)
        )

    @property
    def padding(self) -> torch.Tensor | None:
        """True at the zero padding of each activation spectrum (``None`` without ``sizes``)."""
        sizes = self.sizes
        if sizes is None:
            return None
        lam = self.lam if self.lam is not None else self._need(self.raw, "lam")

        def mask() -> torch.Tensor:
            index = torch.arange(lam.shape[-1], device=lam.device)
            return index >= sizes.to(lam.device).unsqueeze(-1)

        return self.shared("padding", mask)  # type: ignore[return-value]

    @property
    def s2(self) -> torch.Tensor:
        """``σ²``: the eigenvalues of ``WᵀW``."""
        s = self._need(self.s, "s")
        return self.shared("s2", s.square)  # type: ignore[return-value]

    @property
    def powerlaw(self) -> PowerLawFit:
        """The heavy-tailed fit of ``σ²`` (zero padding lies below the fit's threshold)."""
        return self.shared("powerlaw", lambda: powerlaw_alpha(self.s2))  # type: ignore[return-value]

    @property
    def s_nan(self) -> torch.Tensor:
        """True for each weight whose singular values hold NaN."""
        s = self._need(self.s, "s")
        return self.shared("s_nan", lambda: torch.isnan(s).any(dim=-1))  # type: ignore[return-value]


@dataclass(frozen=True)
class Quantity:
    """One logged quantity: the tag ``<name>/<layer>`` and how it is computed and shown.

    Examples:
        >>> from lightning_spectral.functional import Quantity, quantity
        >>> q = quantity("weight_stable_rank")
        >>> isinstance(q, Quantity), q.kind, q.direction, q.anchor
        (True, 'weight', 'higher', 'stable-rank')
    """

    name: str
    """Tag prefix, e.g. ``"vne"`` → ``vne/<layer>``."""
    kind: Literal["activation", "weight"]
    """``"activation"`` (a function of ``lam``/``raw``) or ``"weight"`` (of ``s``)."""
    fn: Callable[[Spectra], torch.Tensor]
    """The value per spectrum of a :class:`Spectra` group, shape ``(...)``."""
    direction: Literal["higher", "lower", "neutral"]
    """What a *larger* value means for the representation or weight: ``"higher"`` = more
    spread/diverse (more directions in use), ``"lower"`` = more concentrated/ill-conditioned,
    ``"neutral"`` = a scale, not a diagnosis."""
    meaning: str
    """One line: what the value says."""
    anchor: str
    """Section of docs/definitions.md (``definitions.md#<anchor>``)."""
    chart: str | None = None
    """Per-layer dashboard chart it shares with quantities of the same scale (``None``: only
    the by-quantity chart)."""
    raw: bool = False
    """Activation quantity that also needs the unnormalised rows' eigenvalues (one more
    ``eigvalsh`` per group, skipped when no selected quantity needs it)."""
    estimate: Callable[[WeightEstimate], torch.Tensor] | None = None
    """Weight quantity with an estimator: its value read from a
    :class:`~lightning_spectral.functional.estimate.WeightEstimate` of one weight (0-d);
    ``None``: computed from exact spectra only (docs/definitions.md#large-weights)."""


def _vne(sp: Spectra) -> torch.Tensor:
    return sp.entropy_total[0]


def _erank(sp: Spectra) -> torch.Tensor:
    lam = sp.lam_cut
    if lam.shape[-1] == 0:
        return lam.sum(dim=-1)
    return _erank_of(*sp.entropy_total)


def _eig_max(sp: Spectra) -> torch.Tensor:
    return sp._need(sp.lam, "lam")[..., 0]


def _condition(sp: Spectra) -> torch.Tensor:
    lam = sp._need(sp.lam, "lam")
    padding = sp.padding
    if padding is None or lam.shape[-1] == 0:
        return condition_number(lam)
    sizes = sp._need(sp.sizes, "sizes").to(device=lam.device, dtype=lam.dtype)
    lam_min = lam.masked_fill(padding, math.inf).amin(dim=-1)
    value = _condition_of(lam, lam_min, sizes * torch.finfo(lam.dtype).eps)
    return value.masked_fill(sizes == 0, math.nan)  # an empty spectrum has none


def _rankme(sp: Spectra) -> torch.Tensor:
    raw = sp.raw_cut
    if raw.shape[-1] == 0:
        return raw.sum(dim=-1)
    return _rankme_of_cut(raw, RANKME_EPS, sp.padding)


def _weight_stable_rank(sp: Spectra) -> torch.Tensor:
    return stable_rank_from_singular_values(sp._need(sp.s, "s"))


def _weight_erank(sp: Spectra) -> torch.Tensor:
    return effective_rank(sp.s2)


def _weight_sv_max(sp: Spectra) -> torch.Tensor:
    s = sp._need(sp.s, "s")
    return s.amax(dim=-1) if s.shape[-1] else s.sum(dim=-1)  # σ_1 = 0 for an empty spectrum


def _rank_at(tau: float) -> Callable[[Spectra], torch.Tensor]:
    def rank(sp: Spectra) -> torch.Tensor:
        s = sp._need(sp.s, "s")
        k = truncation_rank(s, tau).to(s.dtype)
        return torch.where(sp.s_nan, torch.full_like(k, math.nan), k)

    rank.__name__ = f"_weight_rank{round(tau * 100)}"
    return rank


def _rank_at_estimated(tau: float) -> Callable[[WeightEstimate], torch.Tensor]:
    def rank(e: WeightEstimate) -> torch.Tensor:
        return e.truncation_rank(tau)

    rank.__name__ = f"_estimated_rank{round(tau * 100)}"
    return rank


def _weight_alpha(sp: Spectra) -> torch.Tensor:
    return sp.powerlaw.alpha.to(sp._need(sp.s, "s").dtype)


def _weight_alpha_weighted(sp: Spectra) -> torch.Tensor:
    return sp.powerlaw.alpha_weighted.to(sp._need(sp.s, "s").dtype)


#: Every logged spectral quantity, in logging order (activations first, then weights).
QUANTITIES: tuple[Quantity, ...] = (
    Quantity("vne", "activation", _vne, "higher",
             "von Neumann entropy of the row-normalised autocorrelation (nats)", "vne",
             chart="entropy (nats)"),
    Quantity("erank", "activation", _erank, "higher",
             "effective number of directions the representation uses, exp(VNE)", "erank",
             chart="ranks"),
    Quantity("eig_max", "activation", _eig_max, "lower",
             "share λ_1/Σλ of the dominant direction", "spectra"),
    Quantity("condition", "activation", _condition, "lower",
             "condition number λ_max/λ_min of the representation spectrum", "condition"),
    Quantity("rankme", "activation", _rankme, "higher",
             "RankMe of the raw embedding (Garrido et al. 2023)", "rankme",
             chart="ranks", raw=True),
    Quantity("weight_stable_rank", "weight", _weight_stable_rank, "higher",
             "stable rank Σσ²/σ_1² of the weight", "stable-rank", chart="ranks",
             estimate=lambda e: e.stable_rank),
    Quantity("weight_erank", "weight", _weight_erank, "higher",
             "effective rank exp(S(σ²)) of the weight", "erank", chart="ranks",
             estimate=lambda e: e.effective_rank),
    Quantity("weight_sv_max", "weight", _weight_sv_max, "neutral",
             "largest singular value σ_1 = ‖W‖₂ (the layer's gain)", "singular-spectrum",
             estimate=lambda e: e.sv_max),
    Quantity("weight_rank90", "weight", _rank_at(0.9), "higher",
             "memory-capacity estimate k(0.9): rank-one terms carrying 90 % of the energy",
             "capacity", estimate=_rank_at_estimated(0.9)),
    Quantity("weight_rank99", "weight", _rank_at(0.99), "higher",
             "memory-capacity estimate k(0.99): rank-one terms carrying 99 % of the energy",
             "capacity", estimate=_rank_at_estimated(0.99)),
    Quantity("weight_alpha", "weight", _weight_alpha, "lower",
             "heavy-tailed power-law exponent α of σ² (lower: heavier tail)", "heavy-tail"),
    Quantity("weight_alpha_weighted", "weight", _weight_alpha_weighted, "lower",
             "α·log10 σ_1² (WeightWatcher's alpha_weighted)", "heavy-tail"),
)

_BY_NAME: dict[str, Quantity] = {q.name: q for q in QUANTITIES}

#: tag prefixes of the activation quantities, in logging order
ACTIVATION_QUANTITIES: tuple[str, ...] = tuple(q.name for q in QUANTITIES
                                               if q.kind == "activation")
#: tag prefixes of the weight quantities, in logging order
WEIGHT_QUANTITIES: tuple[str, ...] = tuple(q.name for q in QUANTITIES if q.kind == "weight")
#: tag prefixes of the weight quantities that have an estimator (``Quantity.estimate``)
ESTIMATED_QUANTITIES: tuple[str, ...] = tuple(q.name for q in QUANTITIES
                                              if q.estimate is not None)


def quantity(name: str) -> Quantity:
    """The table entry named ``name``; ``KeyError`` listing the table for an unknown name.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import Spectra, quantity
        >>> q = quantity("erank")
        >>> q.kind, q.direction
        ('activation', 'higher')
        >>> flat = Spectra(lam=torch.full((4,), 0.25))  # four equal eigenvalues
        >>> round(float(q.fn(flat)), 4)
        4.0
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown spectral quantity {name!r}; the table has: {', '.join(_BY_NAME)}"
        ) from None


def compute_quantities(names: Sequence[str], spectra: Spectra) -> torch.Tensor:
    """The quantities ``names`` of one group stacked as ``(..., len(names))``, in that order.

    Shared intermediates are computed once; nothing synchronises with the host.

    Examples:
        A flat activation spectrum of 4 directions: ``VNE = log 4``, ``erank = 4``,
        ``eig_max = 1/4``:

        >>> import torch
        >>> from lightning_spectral.functional import Spectra, compute_quantities
        >>> flat = Spectra(lam=torch.full((4,), 0.25))
        >>> values = compute_quantities(["vne", "erank", "eig_max"], flat)
        >>> [round(v, 4) for v in values.tolist()]
        [1.3863, 4.0, 0.25]
    """
    return torch.stack([quantity(n).fn(spectra) for n in names], dim=-1)


def estimate_quantities(names: Sequence[str], estimates: Sequence[WeightEstimate]) -> torch.Tensor:
    """The estimated quantities ``names`` of several weights, ``(len(estimates), len(names))``.

    Each name must have an estimator (``ESTIMATED_QUANTITIES``; ``ValueError`` otherwise). The
    values are those of :class:`~lightning_spectral.functional.estimate.WeightEstimate`
    (docs/definitions.md#large-weights), in the estimates' working dtype.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import estimate_quantities, estimate_weight
        >>> e = estimate_weight(2 * torch.eye(600))
        >>> estimate_quantities(["weight_stable_rank", "weight_rank90"], [e]).round().tolist()
        [[600.0, 540.0]]
    """
    fns = []
    for n in names:
        fn = quantity(n).estimate
        if fn is None:
            raise ValueError(
                f"{n!r} has no estimator (it needs every singular value); estimated quantities: "
                f"{', '.join(ESTIMATED_QUANTITIES)}"
            )
        fns.append(fn)
    rows = [torch.stack([fn(e).to(e.sv_max.dtype).reshape(()) for fn in fns]) if fns
            else e.sv_max.new_zeros(0) for e in estimates]
    if not rows:
        return torch.zeros(0, len(fns))
    return torch.stack(rows)
