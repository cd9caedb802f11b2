"""Matrix entropy, matrix mutual information, MIR and HDR (docs/definitions.md#interplay).

The information-interplay metrics of Song et al. (ICML 2024, arXiv:2406.03999) pair each
sample's normalised feature ``z_i`` with the normalised head row ``ŵ_{y_i}`` of its label and
compare the two ``n×n`` Gram matrices ``G_Z = Z Zᵀ`` and ``G_W = W_y W_yᵀ``
(docs/definitions.md#mir-hdr):

- ``MIR = I(G_Z; G_W) / min(H(G_Z), H(G_W))`` — mutual-information ratio, in ``[0, 1]``;
- ``HDR = |H(G_Z) − H(G_W)| / max(H(G_Z), H(G_W))`` — entropy-difference ratio, in ``[0, 1]``.

The ``n×n`` matrices are never needed in full when a smaller factor exists
(docs/definitions.md#gram, #matrix-mi):

- ``G_Z`` has the non-zero spectrum of ``ZᵀZ`` (``d×d``);
- ``G_W`` has the non-zero spectrum of ``Aᵀ diag(N) A`` (``r×r``), where ``a_c`` are coordinates
  of the head rows in an orthonormal basis of their span (``r = min(C, d)``) and ``N_c`` the label
  counts;
- ``G_Z ∘ G_W`` is the Gram of the row-wise Kronecker products ``z_i ⊗ a_{y_i}``, so its spectrum
  comes from the ``d·r``-dimensional matrix ``Σ_c S_c ⊗ (a_c a_cᵀ)`` (``S_c = Σ_{y_i=c} z_i z_iᵀ``)
  when ``d·r < n``. The class scatters ``S_c`` are one batched product over the rows grouped by
  class (``O(n·d²)``, not the ``O(n·C·d²)`` of a one-hot spread), and their sum is ``ZᵀZ``, the
  factor of ``H(G_Z)``. The ``d·r``-sized eigenproblem is the one irreducible cost: its size is
  the rank of ``G_Z ∘ G_W`` for generic features, and it dominates the whole computation.

Precision: every Gram product above is formed by
:func:`~lightning_spectral.functional._utils.gram_matmul` (float32 sums over a bounded number
of terms, added in float64) and rounded once to the working precision before ``eigvalsh``.
Their sums run over the ``n`` samples, and a plain float32 accumulation left spurious
eigenvalues: MIR 0.50004 instead of ½ at collapse with ``C = 3``, ``n = 6000``. In float64 the
eigenvalue cutoff scales with the length of those sums (see
:func:`~lightning_spectral.functional._utils.gram_round_off`).

The basis of the head rows' span is computed without gradient: ``a_c·a_c' = ŵ_c·ŵ_c'`` holds
exactly and the gradient of every Gram entry is unchanged (the projector onto the span maps
``ŵ_c`` to itself), so MIR/HDR stay differentiable for use as auxiliary losses.
"""

from __future__ import annotations

import torch

from lightning_spectral.functional._utils import (
    apply_cutoff,
    check_matrix,
    entropy_of_spectrum,
    gram_matmul,
    gram_round_off,
    resolve_dtype,
)
from lightning_spectral.functional.collapse import _all_finite
from lightning_spectral.functional.spectrum import normalize_rows

__all__ = [
    "matrix_entropy",
    "matrix_mutual_information",
    "mir",
    "hdr",
    "information_interplay",
    "predicted_labels",
]


def _spectral_entropy(gram: torch.Tensor, factor: int | None = None) -> torch.Tensor:
    """``S(λ(gram))`` after the cutoff ``λ_max · k · ε``, ``k = factor`` (default: the side ``m``);
    ``gram`` symmetric PSD, ``(..., m, m)``."""
    if gram.shape[-1] == 0:
        return torch.full(gram.shape[:-2], float("nan"), dtype=gram.dtype, device=gram.device)
    lam = torch.linalg.eigvalsh(gram)
    return entropy_of_spectrum(apply_cutoff(lam, factor))


def _class_scatter(
    z: torch.Tensor, labels: torch.Tensor, num_classes: int, width: int
) -> torch.Tensor:
    """``S_c = Σ_{y_i=c} z_i z_iᵀ`` for every class, ``(C, d, d)`` in float64.

    The rows are grouped by class into a zero-padded ``(C, width, d)`` block (``width`` at least
    the largest class count, known on the host: no synchronisation here) and multiplied in one
    batched :func:`gram_matmul` whose float32 sums run over at most ``4d`` rows (the side ``d``
    of ``ZᵀZ = Σ_c S_c``, the strictest of the two spectra the scatters feed). Differentiable.
    """
    d = z.shape[1]
    onehot = torch.nn.functional.one_hot(labels, num_classes)  # (n, C)
    # each row's rank among the rows of its class (a counting sort: no comparison sort)
    slot = onehot.cumsum(dim=0).gather(1, labels[:, None]).squeeze(1) - 1
    padded = z.new_zeros(num_classes, width, d).index_put((labels, slot), z)
    return gram_matmul(padded.mT, padded, side=d)


def _check_square(k: torch.Tensor, name: str) -> None:
    check_matrix(k, name, "(..., n, n)")
    if k.shape[-1] != k.shape[-2]:
        raise ValueError(
            f"{name} must be square with shape (..., n, n), got shape {tuple(k.shape)}"
        )


def matrix_entropy(k: torch.Tensor, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Matrix entropy ``H(K) = −tr(ρ log ρ)``, ``ρ = K / tr K``, in nats.

    See docs/definitions.md#matrix-entropy. ``k`` is a symmetric PSD matrix ``(n, n)`` (or a batch
    ``(..., n, n)``); its eigenvalues are taken with ``eigvalsh``, clipped and cut off (#cutoff),
    and their entropy ``S(λ)`` (#entropy) is returned. Known values: ``H(I_n) = log n``,
    ``H(11ᵀ) = 0``, ``k`` equal diagonal blocks of ones give ``log k``. NaN when ``tr K <= 0`` (or
    ``K`` holds NaN/Inf). Differentiable.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import matrix_entropy
        >>> round(float(matrix_entropy(torch.eye(4))), 4)  # log 4
        1.3863
        >>> blocks = torch.block_diag(torch.ones(2, 2), torch.ones(2, 2))
        >>> round(float(matrix_entropy(blocks)), 4)  # two blocks: log 2
        0.6931
    """
    _check_square(k, "k")
    k = k.to(resolve_dtype(dtype, k))
    trace = torch.diagonal(k, dim1=-2, dim2=-1).sum(dim=-1)
    finite = torch.isfinite(k).all(dim=-1).all(dim=-1)
    safe = torch.where(finite[..., None, None], k, torch.zeros_like(k))
    entropy = _spectral_entropy(safe)
    bad = ~finite | ~(trace > 0)
    return torch.where(bad, torch.full_like(entropy, float("nan")), entropy)


def matrix_mutual_information(
    k1: torch.Tensor, k2: torch.Tensor, dtype: torch.dtype | str | None = None
) -> torch.Tensor:
    """``I(K₁; K₂) = H(K₁) + H(K₂) − H(K₁ ∘ K₂)`` with ``∘`` the Hadamard product.

    See docs/definitions.md#matrix-mi. Both inputs are symmetric PSD ``(..., n, n)`` of the same
    shape. For unit-diagonal ``K``, ``I(K; I_n) = H(K)``; for unit-diagonal factors
    ``0 <= I <= min(H(K₁), H(K₂))``. NaN where any of the three entropies is undefined (a trace
    ``<= 0``).

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import matrix_mutual_information
        >>> k = torch.block_diag(torch.ones(2, 2), torch.ones(2, 2))
        >>> round(float(matrix_mutual_information(k, torch.eye(4))), 4)  # I(K; I) = H(K)
        0.6931
        >>> round(float(matrix_mutual_information(torch.ones(3, 3), torch.eye(3))), 4)
        0.0
    """
    _check_square(k1, "k1")
    _check_square(k2, "k2")
    if k1.shape != k2.shape:
        raise ValueError(
            f"k1 and k2 must have the same shape, got {tuple(k1.shape)} and {tuple(k2.shape)}"
        )
    work = resolve_dtype(dtype, k1 if k1.dtype == torch.float64 else k2)
    k1, k2 = k1.to(work), k2.to(work)
    return matrix_entropy(k1) + matrix_entropy(k2) - matrix_entropy(k1 * k2)


def predicted_labels(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``argmax_c (W f_i + b)_c`` for each row (ties: lowest index) — the labels of unlabelled
    samples (docs/definitions.md#mir-hdr).

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import predicted_labels
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
        >>> f = torch.tensor([[2.0, 0.1], [0.0, 3.0], [-1.0, -2.0], [0.5, 0.4]])
        >>> predicted_labels(f, w).tolist()
        [0, 1, 2, 0]
    """
    logits = features.detach().to(weight.dtype) @ weight.detach().mT
    if bias is not None:
        logits = logits + bias.detach()
    return logits.argmax(dim=-1)


def _validate(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None
) -> int | None:
    """Check the inputs; return the largest class count of ``labels`` (read with their range in
    the one host transfer), ``None`` without labels."""
    check_matrix(features, "features", "(n, d)")
    check_matrix(weight, "weight", "(C, d)")
    if features.ndim != 2:
        raise ValueError(f"features must have shape (n, d), got shape {tuple(features.shape)}")
    if weight.ndim != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight must have shape (C, d) with d = {features.shape[1]} (the features' width), "
            f"got shape {tuple(weight.shape)}"
        )
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"labels must have shape (n,) = ({features.shape[0]},), got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.numel():
        lo_t, hi_t = torch.aminmax(labels)
        # out-of-range labels are reported below; clamped, they cannot break the count
        most_t = torch.bincount(labels.clamp(0, weight.shape[0] - 1), minlength=weight.shape[0])
        bounds = torch.stack([lo_t.long(), hi_t.long(), most_t.max()])
        lo, hi, most = bounds.tolist()  # one host transfer
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"labels must lie in [0, C) = [0, {weight.shape[0]}) (one head row per class), "
                f"got values in [{lo}, {hi}]"
            )
        return int(most)
    return 0


def information_interplay(
    features: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
) -> dict[str, torch.Tensor]:
    """Every quantity of docs/definitions.md#mir-hdr at once: a dict of 0-d tensors.

    Keys: ``h_z`` = ``H(G_Z)``, ``h_w`` = ``H(G_W)``, ``h_zw`` = ``H(G_Z ∘ G_W)``,
    ``mi`` = ``I(G_Z; G_W)``, ``mir`` and ``hdr``. ``features`` ``(n, d)``, ``weight`` ``(C, d)``
    (row ``c`` = head of class ``c``), ``labels`` ``(n,)`` integers in ``[0, C)``; with
    ``labels=None`` each sample is paired with its predicted label ``argmax(W f_i + b)``
    (``bias`` is used only then). Spectra come from the smallest factor (module docstring).
    MIR is NaN when ``min(H(G_Z), H(G_W)) = 0`` (e.g. one distinct label, or ``C = 2`` at
    collapse), HDR when the maximum is 0; both NaN for ``n = 0`` or non-finite inputs.

    Examples:
        >>> import math, torch
        >>> angles = torch.tensor([0.0, 2.0, 4.0]) * math.pi / 3
        >>> w = torch.stack([angles.cos(), angles.sin()], dim=1)  # a simplex-ETF head, C = 3
        >>> y = torch.arange(3).repeat(4)
        >>> from lightning_spectral.functional import information_interplay
        >>> out = information_interplay(3.0 * w[y], w, y)  # features collapsed onto their heads
        >>> {k: round(float(out[k]), 4) for k in ("h_z", "h_w", "mir", "hdr")}
        {'h_z': 0.6931, 'h_w': 0.6931, 'mir': 0.5, 'hdr': 0.0}
    """
    largest_class = _validate(features, weight, labels)
    work = resolve_dtype(dtype, features)
    f = features.to(work)
    w = weight.to(work)
    if labels is None:
        labels = predicted_labels(f, w, None if bias is None else bias.to(work))
    labels = labels.to(device=f.device, dtype=torch.long)
    n, d = f.shape
    num_classes = w.shape[0]
    nan = torch.full((), float("nan"), dtype=work, device=f.device)
    # non-finite inputs give NaN (masked at the end); zero them so that eigvalsh cannot fail
    bad = ~(_all_finite(f) & _all_finite(w))
    f = torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
    if n == 0:
        return {k: nan for k in ("h_z", "h_w", "h_zw", "mi", "mir", "hdr")}

    z = normalize_rows(f)
    w_hat = normalize_rows(w)  # (C, d), one unit row per class (zero rows stay zero)

    # coordinates a_c of the head rows in an orthonormal basis of their span (no gradient through
    # the basis; see the module docstring): a = Ŵ U with U (d, r), r = min(C, d)
    with torch.no_grad():
        _, _, vh = torch.linalg.svd(w_hat, full_matrices=False)  # vh: (r, d)
    a = w_hat @ vh.detach().mT  # (C, r); a_c·a_c' = ŵ_c·ŵ_c'
    r = a.shape[1]

    # every Gram product is accumulated by ``gram_matmul`` (float64 result, module docstring)
    # and rounded once to ``work``; ``summed`` is the length of its sums (the cutoff's ``k``)
    def entropy(gram: torch.Tensor, summed: int) -> torch.Tensor:
        return _spectral_entropy(gram.to(work), gram_round_off(gram.shape[-1], summed, work))

    kronecker = d * r < n  # G_Z ∘ G_W from the (d·r)-dim side (below)
    # the padding of the class blocks: the largest class count, read with the label check (none
    # with predicted labels: then n, the bound that needs no host read)
    width = n if largest_class is None else largest_class
    scatter = _class_scatter(z, labels, num_classes, width) if kronecker else None

    # H(G_Z): spectrum of Z Zᵀ from the smaller side
    if n <= d:
        zz = gram_matmul(z, z.mT)  # reused for G_Z ∘ G_W below
        h_z = entropy(zz, d)
    else:
        zz = None
        # ZᵀZ = Σ_c S_c when the class scatters are formed anyway (float32 sums of <= 4d terms)
        ztz = gram_matmul(z.mT, z) if scatter is None else scatter.sum(dim=0)
        h_z = entropy(ztz, n)

    # H(G_W): G_W = E A Aᵀ Eᵀ (E one-hot n×C) has the spectrum of Aᵀ diag(N) A (r×r) or of the
    # n×n matrix itself, whichever is smaller
    counts = torch.bincount(labels, minlength=num_classes).to(work)
    if n <= r:
        a_y = a[labels]
        h_w = entropy(gram_matmul(a_y, a_y.mT), r)
    else:
        h_w = entropy(gram_matmul((a * counts[:, None]).mT, a), num_classes)

    # H(G_Z ∘ G_W): Gram of z_i ⊗ a_{y_i}, from the (d·r)-dim side when that is smaller than n.
    # Grouped by class it is Σ_c S_c ⊗ (a_c a_cᵀ) with S_c = Σ_{y_i=c} z_i z_iᵀ, which costs
    # O(n·d² + C·d²·r²) instead of O(n·d²·r²) for the product of the Kronecker rows. It is formed
    # as Σ_c (a_c a_cᵀ) ⊗ S_c (the same matrix up to a permutation of its coordinates, so the same
    # spectrum): one float64 product over the classes, rounded once to ``work`` while permuted.
    # The rounded matrix is written in column-major order, LAPACK's: ``eigvalsh`` then starts
    # from a plain copy of it instead of a transposing one (the same matrix, the same values).
    if scatter is not None:
        outer = (a[:, :, None] * a[:, None, :]).to(torch.float64)  # a_c a_cᵀ, (C, r, r)
        terms = outer.reshape(num_classes, r * r).mT @ scatter.reshape(num_classes, d * d)
        g_zw = torch.empty(r * d, r * d, dtype=work, device=terms.device).mT
        g_zw.view(r, d, r, d).copy_(terms.reshape(r, r, d, d).transpose(1, 2))
        h_zw = _spectral_entropy(g_zw, gram_round_off(d * r, n, work))
    else:
        a_y = a[labels]
        if zz is None:
            zz = gram_matmul(z, z.mT)
        h_zw = entropy(zz * gram_matmul(a_y, a_y.mT), max(d, r))

    mi = h_z + h_w - h_zw
    lo = torch.minimum(h_z, h_w)
    hi = torch.maximum(h_z, h_w)
    mir_value = torch.where(lo > 0, mi / torch.where(lo > 0, lo, torch.ones_like(lo)), nan)
    hdr_value = torch.where(
        hi > 0, (h_z - h_w).abs() / torch.where(hi > 0, hi, torch.ones_like(hi)), nan
    )
    out = {"h_z": h_z, "h_w": h_w, "h_zw": h_zw, "mi": mi, "mir": mir_value, "hdr": hdr_value}
    return {k: torch.where(bad, nan, v) for k, v in out.items()}


def mir(
    features: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
) -> torch.Tensor:
    """Mutual-information ratio ``I(G_Z; G_W) / min(H(G_Z), H(G_W))`` (docs/definitions.md#mir-hdr).

    ``Z = normalize(features)`` ``(n, d)``; ``W_y`` = the normalised head rows ``weight[labels]``
    (``weight`` ``(C, d)``, ``labels`` ``(n,)`` in ``[0, C)``; ``None``: predicted labels
    ``argmax(W f + b)``). Range ``[0, 1]``; at neural collapse with a simplex-ETF head and
    balanced classes ``MIR = 1/(C−1) + (C−2) log(C−2) / ((C−1) log(C−1))`` (½ for ``C = 3``,
    ≈ 0.952351 for ``C = 10``). NaN when the denominator is 0. Higher means the features carry
    more of the head's structure. Differentiable (maximise it as an auxiliary loss).

    Examples:
        >>> import math, torch
        >>> angles = torch.tensor([0.0, 2.0, 4.0]) * math.pi / 3
        >>> w = torch.stack([angles.cos(), angles.sin()], dim=1)  # a simplex-ETF head, C = 3
        >>> y = torch.arange(3).repeat(4)
        >>> from lightning_spectral.functional import mir
        >>> round(float(mir(w[y], w, y)), 4)  # collapse, C = 3
        0.5
        >>> f = w[y] + 0.3 * w[(y + 1) % 3] * torch.linspace(-1, 1, 12)[:, None]
        >>> round(float(mir(f, w, y)), 4)
        0.4158
    """
    return information_interplay(features, weight, labels, bias=bias, dtype=dtype)["mir"]


def hdr(
    features: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
) -> torch.Tensor:
    """Entropy-difference ratio ``|H(G_Z) − H(G_W)| / max(H(G_Z), H(G_W))``.

    See docs/definitions.md#mir-hdr. Same inputs as :func:`mir`. Range ``[0, 1]``; 0 at neural
    collapse (``z_i = ŵ_{y_i}``) for any class counts; NaN when both entropies are 0. Lower means
    the feature and head Gram matrices are closer in entropy. Differentiable (minimise it as an
    auxiliary loss).

    Examples:
        >>> import math, torch
        >>> angles = torch.tensor([0.0, 2.0, 4.0]) * math.pi / 3
        >>> w = torch.stack([angles.cos(), angles.sin()], dim=1)  # a simplex-ETF head, C = 3
        >>> y = torch.arange(3).repeat(4)
        >>> from lightning_spectral.functional import hdr
        >>> round(float(hdr(w[y], w, y)), 4)  # collapse
        0.0
        >>> f = w[y] + 0.3 * w[(y + 1) % 3] * torch.linspace(-1, 1, 12)[:, None]
        >>> round(float(hdr(f, w, y)), 4)
        0.002
    """
    return information_interplay(features, weight, labels, bias=bias, dtype=dtype)["hdr"]
