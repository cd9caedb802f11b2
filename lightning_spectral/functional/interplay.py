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
  when ``d·r < n``.

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
    samples (docs/definitions.md#mir-hdr)."""
    logits = features.detach().to(weight.dtype) @ weight.detach().mT
    if bias is not None:
        logits = logits + bias.detach()
    return logits.argmax(dim=-1)


def _validate(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None) -> None:
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
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"labels must have shape (n,) = ({features.shape[0]},), got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.numel():
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one host transfer
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"labels must lie in [0, C) = [0, {weight.shape[0]}) (one head row per class), "
                f"got values in [{lo}, {hi}]"
            )


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
    """
    _validate(features, weight, labels)
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
    bad = ~(torch.isfinite(f).all() & torch.isfinite(w).all())
    f = torch.where(torch.isfinite(f), f, torch.zeros_like(f))
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
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

    # H(G_Z): spectrum of Z Zᵀ from the smaller side
    if n <= d:
        zz = gram_matmul(z, z.mT)  # reused for G_Z ∘ G_W below
        h_z = entropy(zz, d)
    else:
        zz = None
        h_z = entropy(gram_matmul(z.mT, z), n)

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
    # O(n·C·d² + C·d²·r²) instead of O(n·d²·r²) for the product of the Kronecker rows.
    if d * r < n:
        onehot = torch.nn.functional.one_hot(labels, num_classes).to(work)  # (n, C)
        spread = (onehot[:, :, None] * z[:, None, :]).reshape(n, num_classes * d)
        # S_c, float64; chunked for the side d·r of the spectrum it feeds
        scatter = gram_matmul(spread.mT, z, side=d * r).reshape(num_classes, d, d)
        outer = (a[:, :, None] * a[:, None, :]).to(torch.float64)  # a_c a_cᵀ, (C, r, r)
        g_zw = torch.einsum("cij,ckl->ikjl", scatter, outer).reshape(d * r, d * r)
        h_zw = entropy(g_zw, n)
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
    """
    return information_interplay(features, weight, labels, bias=bias, dtype=dtype)["hdr"]
