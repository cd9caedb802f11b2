"""The mathematics of lightning_spectral: pure torch functions, no Lightning import.

Every function documents its formula and the SPEC.md section it implements, validates shapes
(``ValueError`` naming the shape got and wanted), returns NaN for mathematically undefined
inputs, and computes on its input's device in float32 by default (``dtype`` for float64).

Modules: ``spectrum`` (§1, §2), ``weights`` (§1.4, §5), ``interplay`` (§3), ``collapse`` (§4),
``curvature`` and ``symmetry`` (§6), ``mirrors`` (§7), ``powerlaw`` (heavy-tailed α),
``selfsupervised`` (the I-VNE⁺ objective). Names are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # spectrum (SPEC.md §1, §2)
    "normalize_rows": "spectrum",
    "gram_eigvals": "spectrum",
    "autocorrelation_eigvals": "spectrum",
    "covariance_eigvals": "spectrum",
    "vne": "spectrum",
    "effective_rank": "spectrum",
    "rankme": "spectrum",
    "rankme_from_eigvals": "spectrum",
    "stable_rank": "spectrum",
    "condition_number": "spectrum",
    "spectral_distribution": "spectrum",
    # weights (SPEC.md §5)
    "weight_matrix": "weights",
    "singular_values": "weights",
    "singular_values_many": "weights",
    "truncation_rank": "weights",
    "eckart_young_error": "weights",
    # interplay (SPEC.md §3)
    "matrix_entropy": "interplay",
    "matrix_mutual_information": "interplay",
    "mir": "interplay",
    "hdr": "interplay",
    # collapse (SPEC.md §4)
    "neural_collapse": "collapse",
    # curvature (SPEC.md §6.4)
    "hessian_vector_product": "curvature",
    "hessian_eigenpairs": "curvature",
    "hessian_trace": "curvature",
    "flat_gradients": "curvature",
    "flatten_tensors": "curvature",
    "objective_noise": "curvature",
    "ObjectiveNoise": "curvature",
    # symmetry (SPEC.md §6.1–6.3)
    "log_equivalent_optima": "symmetry",
    "permutation_count_log10": "symmetry",
    "canonical_order": "symmetry",
    "align": "symmetry",
    "alignment_permutations": "symmetry",
    "permute_hidden_units": "symmetry",
    "interpolation_losses": "symmetry",
    "interpolation_barrier": "symmetry",
    "BarrierResult": "symmetry",
    "permutation_distance": "symmetry",
    # mirrors (SPEC.md §7)
    "reflection_dictionary": "mirrors",
    "mirror_features": "mirrors",
    "lasso_mirror_fit": "mirrors",
    "MirrorFit": "mirrors",
    "MirrorNet": "mirrors",
    "ReluMirrorNet": "mirrors",
    "mirror_network": "mirrors",
    "network_objective": "mirrors",
    "convex_gap": "mirrors",
    # heavy-tailed self-regularisation
    "PowerLawFit": "powerlaw",
    "powerlaw_alpha": "powerlaw",
    "weight_alpha": "powerlaw",
    # self-supervised objective
    "ivne_loss": "selfsupervised",
    "ivne_terms": "selfsupervised",
}

_MODULES = (
    "spectrum", "weights", "interplay", "collapse", "curvature", "symmetry", "mirrors",
    "selfsupervised", "powerlaw",
)

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_MODULES))
