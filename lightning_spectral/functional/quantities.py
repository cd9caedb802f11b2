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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_spectral.functional._utils import apply_cutoff, entropy_of_spectrum
from lightning_spectral.functional.powerlaw import PowerLawFit, powerlaw_alpha
from lightning_spectral.functional.spectrum import (
    condition_number,
    effective_rank,
    rankme_from_eigvals,
)
from lightning_spectral.functional.weights import stable_rank_from_singular_values, truncation_rank

__all__ = [
    "Quantity",
    "Spectra",
    "QUANTITIES",
    "ACTIVATION_QUANTITIES",
    "WEIGHT_QUANTITIES",
    "quantity",
    "compute_quantities",
]


class Spectra:
    """The spectra of one stacked group of layers, and the intermediates computed from them.

    ``lam``/``raw`` (activations) or ``s`` (weights), each ``(..., m)``. Derived values
    (``s2 = σ²``, the power-law fit of ``σ²``, the NaN mask of ``s``) are computed on first use
    and shared by every quantity of the group.
    """

    def __init__(
        self,
        lam: torch.Tensor | None = None,
        raw: torch.Tensor | None = None,
        s: torch.Tensor | None = None,
    ) -> None:
        self.lam = lam
        self.raw = raw
        self.s = s
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
    """One logged quantity: the tag ``<name>/<layer>`` and how it is computed and shown."""

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


def _vne(sp: Spectra) -> torch.Tensor:
    return entropy_of_spectrum(apply_cutoff(sp._need(sp.lam, "lam")))


def _erank(sp: Spectra) -> torch.Tensor:
    return effective_rank(sp._need(sp.lam, "lam"))


def _eig_max(sp: Spectra) -> torch.Tensor:
    return sp._need(sp.lam, "lam")[..., 0]


def _condition(sp: Spectra) -> torch.Tensor:
    return condition_number(sp._need(sp.lam, "lam"))


def _rankme(sp: Spectra) -> torch.Tensor:
    return rankme_from_eigvals(sp._need(sp.raw, "raw"))


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
             "stable rank Σσ²/σ_1² of the weight", "stable-rank", chart="ranks"),
    Quantity("weight_erank", "weight", _weight_erank, "higher",
             "effective rank exp(S(σ²)) of the weight", "erank", chart="ranks"),
    Quantity("weight_sv_max", "weight", _weight_sv_max, "neutral",
             "largest singular value σ_1 = ‖W‖₂ (the layer's gain)", "singular-spectrum"),
    Quantity("weight_rank90", "weight", _rank_at(0.9), "higher",
             "memory-capacity estimate k(0.9): rank-one terms carrying 90 % of the energy",
             "capacity"),
    Quantity("weight_rank99", "weight", _rank_at(0.99), "higher",
             "memory-capacity estimate k(0.99): rank-one terms carrying 99 % of the energy",
             "capacity"),
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


def quantity(name: str) -> Quantity:
    """The table entry named ``name``; ``KeyError`` listing the table for an unknown name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown spectral quantity {name!r}; the table has: {', '.join(_BY_NAME)}"
        ) from None


def compute_quantities(names: Sequence[str], spectra: Spectra) -> torch.Tensor:
    """The quantities ``names`` of one group stacked as ``(..., len(names))``, in that order.

    Shared intermediates are computed once; nothing synchronises with the host.
    """
    return torch.stack([quantity(n).fn(spectra) for n in names], dim=-1)
