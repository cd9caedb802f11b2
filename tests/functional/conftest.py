"""Independent float64 references (numpy/scipy) for tests/functional/test_{spectrum,weights}.py.

Nothing here calls lightning_spectral: each reference recomputes a quantity of docs/definitions.md
with a different method (scipy SVD of the normalised rows instead of torch's Gram + eigvalsh, numpy
covariance, dense SVD truncation), so an agreement test can fail if our formula is wrong. Test files
cannot import each other (``--import-mode=importlib``), so the references are handed out through the
session fixture ``ref``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg

EPS64 = float(np.finfo(np.float64).eps)


def _normalize(h: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(h, axis=-1, keepdims=True)
    return np.where(norm < 1e-12, 0.0, h / np.where(norm < 1e-12, 1.0, norm))


def autocorr_eigs(h: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Descending eigenvalues of ``ZᵀZ/n`` as squared singular values of ``Z/√n`` (scipy)."""
    h = np.asarray(h, dtype=np.float64)
    n, d = h.shape
    z = _normalize(h) if normalize else h
    s = scipy.linalg.svdvals(z / math.sqrt(n))
    out = np.zeros(min(n, d))
    out[: s.size] = s**2
    return out


def cov_eigs(h: np.ndarray) -> np.ndarray:
    """Descending eigenvalues of ``np.cov`` (unbiased, features as columns), min(n, d) of them."""
    h = np.asarray(h, dtype=np.float64)
    n, d = h.shape
    c = np.atleast_2d(np.cov(h, rowvar=False))
    return np.sort(np.linalg.eigvalsh(c))[::-1][: min(n, d)]


def cutoff(lam: np.ndarray, eps: float = EPS64) -> np.ndarray:
    lam = np.clip(np.asarray(lam, dtype=np.float64), 0.0, None)
    if lam.size == 0:
        return lam
    return np.where(lam <= lam.max() * lam.size * eps, 0.0, lam)


def entropy(lam: np.ndarray, eps: float = EPS64) -> float:
    """``−Σ p log p`` of the cut spectrum, 0 for zero mass.

    See docs/definitions.md#cutoff, #entropy.
    """
    lam = cutoff(lam, eps)
    total = lam.sum()
    if total == 0:
        return 0.0
    p = lam[lam > 0] / total
    return float(-(p * np.log(p)).sum())


def vne(h: np.ndarray, normalize: bool = True) -> float:
    return entropy(autocorr_eigs(h, normalize))


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def best_rank_k(w: np.ndarray, k: int) -> np.ndarray:
    """``W_k = Σ_{i<=k} σ_i u_i v_iᵀ`` from a full float64 SVD.

    See docs/definitions.md#eckart-young.
    """
    u, s, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The float64 reference implementations above."""
    return SimpleNamespace(
        autocorr_eigs=autocorr_eigs,
        cov_eigs=cov_eigs,
        cutoff=cutoff,
        entropy=entropy,
        vne=vne,
        normalize=_normalize,
        random_orthogonal=random_orthogonal,
        best_rank_k=best_rank_k,
    )
