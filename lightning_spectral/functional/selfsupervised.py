"""Self-supervised objective built on the von Neumann entropy: I-VNE⁺.

Kim, Kang, Hwang, Shin & Rhee, "VNE: An Effective Method for Improving Deep Representation by
Manipulating Eigenvalue Distribution", CVPR 2023 (arXiv:2304.01434), propose I-VNE⁺, an
invariance term plus the VNE⁺ regulariser, for representation learning without labels:

    L = −α₁ · mean cos(h^a_i, h^b_i) − α₂ · mean_v VNE(H^v)

``H^v`` ``(n, d)`` is the batch of one augmented view (the same ``n`` samples, in the same order,
in every view); the cosine is averaged over the samples ``i`` and over view pairs ``(a, b)``;
the VNE is that of :func:`~lightning_spectral.functional.spectrum.vne` (row-normalised
autocorrelation), computed per view and averaged over the views. The paper's weights are
``α₁ = log(batch size)`` (the authors' script hard-codes 4.16 ≈ log 64) and ``α₂ = 1``.

Everything runs on the input's device, without host synchronisation, and is differentiable
(the VNE part through ``eigvalsh``, see the spectrum module).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_spectral.functional._utils import resolve_dtype
from lightning_spectral.functional.spectrum import normalize_rows, vne

__all__ = ["ivne_terms", "ivne_loss"]


def _stack_views(views: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(views, torch.Tensor):
        x = views
    else:
        items = list(views)
        if not all(isinstance(v, torch.Tensor) for v in items):
            raise TypeError("views must be a tensor (V, n, d) or a sequence of (n, d) tensors")
        shapes = {tuple(v.shape) for v in items}
        if len(shapes) > 1:
            raise ValueError(
                f"every view must have the same shape (n, d), got shapes {sorted(shapes)}"
            )
        if any(v.ndim != 2 for v in items):
            raise ValueError(
                f"each view must have shape (n, d), got shape {tuple(items[0].shape)}"
            )
        x = torch.stack(items) if items else torch.empty(0, 0, 0)
    if x.ndim != 3:
        raise ValueError(f"views must have shape (V, n, d), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(
            f"the invariance term needs at least 2 views, got {x.shape[0]} (shape "
            f"{tuple(x.shape)})"
        )
    return x


def _pair_mask(num_views: int, num_global: int | None, device: torch.device) -> torch.Tensor:
    """``(V, V)`` boolean mask of the view pairs ``(a, b)``, ``a < b``, entering the cosine."""
    if num_global is None:
        num_global = num_views
    if isinstance(num_global, bool) or not isinstance(num_global, int) or num_global < 1:
        raise ValueError(f"num_global must be a positive integer or None, got {num_global!r}")
    idx = torch.arange(num_views, device=device)
    return (idx[:, None] < idx[None, :]) & (idx[:, None] < num_global)


def ivne_terms(
    views: torch.Tensor | Sequence[torch.Tensor],
    num_global: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of I-VNE⁺, unweighted: ``(mean cosine, mean VNE)``, both 0-d tensors.

    ``views``: a tensor ``(V, n, d)`` or a sequence of ``V >= 2`` tensors ``(n, d)`` — view
    ``v``'s batch, row ``i`` the same sample in every view.

    - *Mean cosine*: ``cos(h^a_i, h^b_i)`` averaged over the samples ``i`` and over the view
      pairs ``a < b``. By default (``num_global=None``) every pair counts: the function cannot
      tell which views are which, and all pairs make the term independent of the order of the
      views. ``num_global=g`` keeps only the pairs that include one of the first ``g`` views, as
      in multi-crop training where small crops are compared with the global views but not with
      each other; ``g = 2`` with the two large views first reproduces the authors' script
      (``2V − 3`` pairs). With two views both conventions are the one pair of the paper's
      formula. A zero row has cosine 0 with anything.
    - *Mean VNE*: :func:`~lightning_spectral.functional.spectrum.vne` of each view's batch
      (rows normalised, one batched ``eigvalsh`` over the views), averaged over the ``V``
      views. It equals the authors' ``get_vne`` (SVD of the normalised rows, no trace
      renormalisation) whenever no row is zero.

    Known values: identical views give a mean cosine of 1; views whose rows are isotropic
    (e.g. ``I_d``, or the rows ``±q_j`` of an orthogonal matrix) give a mean VNE of ``log d``.
    Computed in float32 by default (float64 inputs stay float64; ``dtype`` to choose).

    Examples:
        Two identical views of isotropic rows: mean cosine 1, mean VNE ``log 4``:

        >>> import torch
        >>> from lightning_spectral.functional import ivne_terms
        >>> cos, entropy = ivne_terms([torch.eye(4), torch.eye(4)])
        >>> round(float(cos), 4), round(float(entropy), 4)
        (1.0, 1.3863)
    """
    x = _stack_views(views)
    x = x.to(resolve_dtype(dtype, x))
    num_views, n = x.shape[0], x.shape[1]
    mask = _pair_mask(num_views, num_global, x.device)
    u = normalize_rows(x)
    # cos_ab = (1/n) Σ_i ⟨u^a_i, u^b_i⟩ for every pair at once, (V, V)
    cos = torch.einsum("and,bnd->ab", u, u) / max(n, 1)
    mean_cos = (cos * mask).sum() / mask.sum()
    mean_vne = vne(x).mean()
    return mean_cos, mean_vne


def ivne_loss(
    views: torch.Tensor | Sequence[torch.Tensor],
    alpha1: float | None = None,
    alpha2: float = 1.0,
    num_global: int | None = None,
    dtype: torch.dtype | str | None = None,
) -> torch.Tensor:
    """The I-VNE⁺ objective ``L = −α₁ · mean cos − α₂ · mean VNE`` (to minimise), a 0-d tensor.

    ``alpha1=None`` uses the paper's ``α₁ = log n`` (``n`` = rows per view, the batch size;
    log 64 ≈ 4.159 where the authors' script writes 4.16); ``alpha2 = 1`` as in the paper. The
    terms, the pair convention (``num_global``) and the inputs are those of :func:`ivne_terms`.
    Identical isotropic views ``I_d`` give ``L = −log d − log d``. Differentiable (gradcheck in
    float64); no host synchronisation.

    Examples:
        Identical isotropic views ``I_4``: ``L = −log 4 · 1 − 1 · log 4``:

        >>> import math
        >>> import torch
        >>> from lightning_spectral.functional import ivne_loss
        >>> views = torch.eye(4).expand(2, 4, 4)  # (V, n, d)
        >>> round(float(ivne_loss(views)), 4), round(-2 * math.log(4), 4)
        (-2.7726, -2.7726)
    """
    x = _stack_views(views)
    if alpha1 is None:
        alpha1 = math.log(x.shape[1]) if x.shape[1] > 0 else 0.0
    mean_cos, mean_vne = ivne_terms(x, num_global=num_global, dtype=dtype)
    return -(alpha1 * mean_cos) - alpha2 * mean_vne
