"""Spectra of representations (docs/definitions.md#spectra, #vne).

All functions accept a representation batch ``h`` of shape ``(n, d)`` — rows are samples,
columns features — or ``(..., n, d)`` for independent problems solved in one batched call.
They compute on ``h``'s device, in float32 by default (float64 inputs stay float64, and
``dtype="float64"`` asks for it), and never synchronise with the host: NaN/Inf input gives a NaN
result for that problem, not an exception.

Longer than most modules because every function carries worked examples that run as doctests;
the code itself is the one shared path from rows to eigenvalues (normalisation, Gram side,
precision) that all activation quantities use, kept together so the conventions cannot drift.
"""

from __future__ import annotations

import torch

from lightning_spectral.functional._utils import (
    apply_cutoff,
    as_spectrum,
    check_matrix,
    check_vector,
    entropy_and_total,
    gram_matmul,
    gram_round_off,
    resolve_dtype,
)

__all__ = [
    "normalize_rows",
    "gram_eigvals",
    "autocorrelation_eigvals",
    "autocorrelation_eigvals_pair",
    "covariance_eigvals",
    "vne",
    "effective_rank",
    "rankme",
    "rankme_from_eigvals",
    "stable_rank",
    "condition_number",
    "spectral_distribution",
]

_ROW_NORM_FLOOR = 1e-12
RANKME_EPS = 1e-7  # the ε of Garrido et al. (2023)


def normalize_rows(h: torch.Tensor) -> torch.Tensor:
    """``h_i / ‖h_i‖₂`` for every row; rows of norm below 1e-12 become zero rows.

    See docs/definitions.md#normalisation. Differentiable, including at the zero rows (their
    gradient is 0). A row holding NaN or Inf keeps a NaN (it is not mistaken for a zero row); a
    finite row whose norm overflows the working dtype becomes zero (the spectrum functions below
    report that case as NaN).

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import normalize_rows
        >>> z = normalize_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        >>> [[round(v, 4) for v in row] for row in z.tolist()]  # the zero row stays zero
        [[0.6, 0.8], [0.0, 0.0]]
    """
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    # 1/inf = 0 for rows below the floor (``<`` is false for NaN, so NaN rows stay NaN)
    return h * norm.masked_fill(norm < _ROW_NORM_FLOOR, float("inf")).reciprocal()


def _smaller_side_eigvals(z: torch.Tensor, scale: float | torch.Tensor,
                          normalize: bool) -> torch.Tensor:
    """Eigenvalues of ``scale · ZᵀZ`` (``Z`` = row-normalised ``z`` if ``normalize``), descending.

    One matmul on the smaller Gram side and one ``eigvalsh`` (docs/definitions.md#gram), no host
    sync, and as few other tensor operations as possible (each costs a dispatch, which for small
    layers is comparable to the kernels themselves):

    * The Gram product comes from :func:`~._utils.gram_matmul`: float32 sums over at most
      ``4·min(n, d)`` terms, added in float64 (or a float64 product), rounded once to the
      working precision before ``eigvalsh``. A plain float32 product sums ``max(n, d)`` terms
      in float32, and its round-off, which grows with that length, left spurious eigenvalues
      above the cutoff: a rank-one 4096×8 batch had VNE 3.4e-4 instead of 0.
    * ``n <= d`` with ``normalize``: the rows are never normalised explicitly. The ``n×n`` Gram
      ``G = z zᵀ`` holds the squared row norms on its diagonal, so ``Z Zᵀ = D G D`` with
      ``D = diag(1/‖z_i‖)`` (0 for rows of norm below 1e-12) costs ``O(n²)``, not ``O(n d)``.
    * ``n > d`` with ``normalize``: rows are scaled by ``1/‖z_i‖`` before the ``d×d`` product.
    * Non-finite input is detected from one reduced value instead of an ``isfinite`` pass over
      the input: any NaN/Inf in row ``i`` makes ``G_ii`` (the trace), resp. ``‖z_i‖`` (the sum
      of the row norms), non-finite. That problem is zeroed before ``eigvalsh`` (which would
      raise) and its result set to NaN. A finite input so large that the Gram or a row norm
      overflows the working precision (|h| ≳ 1e19 in float32) is reported the same way, never
      silently dropped.
    * The result is clipped at 0 and every value at or below the round-off level of this
      computation, ``λ_max · k · ε`` with ``k`` from :func:`~._utils.gram_round_off`, is set to
      exactly 0 (zero gradient): ``k = min(n, d)`` in float32, ``max(n, d)`` in float64.
    """
    return _gram_spectra(z, scale, (normalize,))[0]


def _gram_spectra(z: torch.Tensor, scale: float | torch.Tensor, modes: tuple[bool, ...],
                  overwrite: bool = False) -> list[torch.Tensor]:
    """:func:`_smaller_side_eigvals` for each ``normalize`` flag in ``modes``, sharing work.

    With ``n <= d`` every mode comes from the one product ``G = z zᵀ`` (the raw spectrum from
    ``G``, the normalised one from ``D G D``), so asking for both costs one matmul; with
    ``n > d`` each mode has its own ``d×d`` product (the raw one first). The arithmetic of each
    mode is that of a call with that mode alone, so the values are identical.

    When autograd does not record (no grad mode, or ``z`` does not require grad), the working
    memory is kept small: ``D G D`` is formed in place, each float64 Gram is released as soon
    as its working-precision copy exists, and with ``overwrite`` the rows of ``z`` are
    normalised in place (``z``'s contents are then unspecified). The peak is then about
    ``16·m²`` bytes in float32 (``m = min(n, d)``), besides ``z`` and the product's own
    accumulation buffer (:func:`~._utils.gram_matmul`).
    """
    n, d = z.shape[-2], z.shape[-1]
    work = z.dtype
    lean = not (torch.is_grad_enabled() and z.requires_grad)
    cut = gram_round_off(min(n, d), max(n, d), work)
    out: dict[bool, torch.Tensor] = {}
    if n <= d:
        g = gram_matmul(z, z.mT)  # float64
        sq = g.diagonal(dim1=-2, dim2=-1)
        check = sq.sum(dim=-1).to(work)  # overflows exactly when a float32 Gram would
        bad = (check * 0.0) != 0.0  # true exactly for NaN and ±Inf
        inv = None
        if True in modes:
            # rsqrt(inf) = 0 turns rows below the floor into zero rows with a zero gradient
            inv = sq.masked_fill(sq < _ROW_NORM_FLOOR**2, float("inf")).rsqrt()
        del sq
        if False in modes:
            # a float64 working precision makes ``.to`` return ``g`` itself, whose non-finite
            # problems are then zeroed in place: their normalised values are NaN all the same
            out[False] = _gram_eigvals(g.to(work), bad, scale, cut)
        if inv is not None:
            outer = inv.unsqueeze(-1) * inv.unsqueeze(-2)
            g = g.mul_(outer) if lean else g * outer
            del outer
            g = g.to(work)  # the float64 Gram is released here
            out[True] = _gram_eigvals(g, bad, scale, cut)
        del g
    else:
        for normalize in sorted(set(modes)):  # the raw product first, before z is normalised
            if normalize:
                norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
                check = norm.sum(dim=(-2, -1))
                recip = norm.masked_fill(norm < _ROW_NORM_FLOOR, float("inf")).reciprocal()
                z = z.mul_(recip) if lean and overwrite else z * recip
                g = gram_matmul(z.mT, z)
            else:
                g = gram_matmul(z.mT, z)
                check = g.diagonal(dim1=-2, dim2=-1).sum(dim=-1).to(work)
            bad = (check * 0.0) != 0.0
            g = g.to(work)
            out[normalize] = _gram_eigvals(g, bad, scale, cut)
            del g
    return [out[mode] for mode in modes]


def _gram_eigvals(g: torch.Tensor, bad: torch.Tensor, scale: float | torch.Tensor,
                  cut: int) -> torch.Tensor:
    """Descending eigenvalues of ``scale · g`` (``g`` in the working precision, zeroed in place
    for the non-finite problems ``bad``, whose values become NaN), cut at round-off level."""
    # in place: ``g`` is always a fresh product or copy that no backward formula saved
    g.masked_fill_(bad.unsqueeze(-1).unsqueeze(-1), 0.0)
    ev = torch.linalg.eigvalsh(g).flip(-1) * scale
    del g
    ev = apply_cutoff(ev, cut)
    return ev.masked_fill(bad.unsqueeze(-1), float("nan"))


def gram_eigvals(z: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``zᵀz · scale`` on the smaller Gram side (docs/definitions.md#gram).

    ``z`` has shape ``(..., n, d)``; returns ``(..., min(n, d))``, descending. With ``n <= d`` the
    ``n×n`` matrix ``z zᵀ`` is used, otherwise ``zᵀ z`` (``d×d``); their non-zero eigenvalues
    coincide. Non-finite problems give NaN without raising. Computed in float64 for float64 ``z``,
    else in float32 (see :func:`resolve_dtype`); clipped at 0 and cut at round-off level as in
    :func:`autocorrelation_eigvals`.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import gram_eigvals
        >>> z = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # n = 2 < d = 3: z zᵀ = diag(2, 4)
        >>> gram_eigvals(z, 1.0).tolist()
        [4.0, 2.0]
    """
    check_matrix(z, "z")
    return _smaller_side_eigvals(z.to(resolve_dtype(None, z)), scale, normalize=False)


def _working(h: torch.Tensor, dtype: torch.dtype | str | None) -> torch.Tensor:
    check_matrix(h, "h")
    return h.to(resolve_dtype(dtype, h))


def autocorrelation_eigvals(
    h: torch.Tensor, normalize: bool = True, dtype: torch.dtype | str | None = None
) -> torch.Tensor:
    """Eigenvalues of the autocorrelation ``C = (1/n) ZᵀZ`` (docs/definitions.md#autocorrelation).

    ``Z = normalize_rows(h)`` when ``normalize`` (then, without zero rows, the eigenvalues sum
    to 1), else ``Z = h``. Returns the ``min(n, d)`` leading eigenvalues, descending, computed
    on the smaller Gram side with one matmul and one ``eigvalsh`` (#gram); shape
    ``(..., min(n, d))``, a leading batch being solved in one batched call. The Gram product is
    accumulated so that its round-off does not grow with ``max(n, d)`` (float32 sums over at
    most ``4·min(n, d)`` terms, added in float64); the eigenvalues are returned clipped at 0,
    with every value at or below the round-off of their computation (``λ_max · k · ε``,
    ``k = min(n, d)`` in float32, ``max(n, d)`` in float64) set to exactly 0, so the eigenvalues
    a rank-deficient input does not have come out as zeros, not as round-off. A problem whose
    input holds NaN/Inf gives NaN values (no exception).

    Examples:
        Isotropic rows spread the unit mass evenly; identical rows put it all on one direction:

        >>> import torch
        >>> from lightning_spectral.functional import autocorrelation_eigvals
        >>> autocorrelation_eigvals(torch.eye(4)).tolist()
        [0.25, 0.25, 0.25, 0.25]
        >>> autocorrelation_eigvals(torch.ones(3, 2)).tolist()
        [1.0, 0.0]
    """
    z = _working(h, dtype)
    n, d = z.shape[-2], z.shape[-1]
    if n == 0 or d == 0:
        return z.new_empty(*z.shape[:-2], 0)
    return _smaller_side_eigvals(z, 1.0 / n, normalize=normalize)


def autocorrelation_eigvals_pair(
    h: torch.Tensor, dtype: torch.dtype | str | None = None, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-normalised and the raw autocorrelation spectra of ``h``, sharing their work.

    Returns ``(autocorrelation_eigvals(h, dtype=dtype),
    autocorrelation_eigvals(h, normalize=False, dtype=dtype))`` with identical values
    (docs/definitions.md#autocorrelation); the raw spectrum is what RankMe reads
    (:func:`rankme_from_eigvals`). With ``n <= d`` both come from one Gram product ``G = z zᵀ``
    (the normalised one is ``D G D``, ``D = diag(1/‖z_i‖)``), so the pair costs one matmul and
    two ``eigvalsh``; with ``n > d`` each has its own ``d×d`` product.

    When autograd does not record (``torch.no_grad()``, or ``h`` does not require grad), the
    working memory stays at about ``16·m²`` bytes in float32 (``m = min(n, d)``) besides ``h``:
    ``D G D`` is formed in place and each float64 Gram is released as soon as its
    working-precision copy exists. ``overwrite=True`` also lets the function normalise the rows
    of ``h`` in place when ``n > d`` and ``h`` already has the working precision (``h``'s
    contents are then unspecified): pass it for a working copy you own. Under autograd the two
    spectra are computed separately (``overwrite`` is ignored) and are differentiable.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import autocorrelation_eigvals_pair
        >>> lam, raw = autocorrelation_eigvals_pair(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> lam.tolist(), raw.tolist()  # normalised rows: I/2; raw: diag(9, 1)/2
        ([0.5, 0.5], [4.5, 0.5])
    """
    if torch.is_grad_enabled() and h.requires_grad:
        return (autocorrelation_eigvals(h, dtype=dtype),
                autocorrelation_eigvals(h, normalize=False, dtype=dtype))
    z = _working(h, dtype)
    n, d = z.shape[-2], z.shape[-1]
    if n == 0 or d == 0:
        return z.new_empty(*z.shape[:-2], 0), z.new_empty(*z.shape[:-2], 0)
    lam, raw = _gram_spectra(z, 1.0 / n, (True, False), overwrite=overwrite)
    return lam, raw


def covariance_eigvals(h: torch.Tensor, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Eigenvalues of the unbiased covariance ``H_cᵀH_c / (n − 1)``, descending.

    See docs/definitions.md#covariance. ``H_c = H − 1μᵀ`` is ``h`` minus its row mean (centred
    explicitly, before the Gram product, to avoid cancellation); no row normalisation. Shape
    ``(..., min(n, d))``, clipped at 0 and cut at round-off level as in
    :func:`autocorrelation_eigvals`; every entry is NaN when ``n < 2`` or the input holds NaN/Inf.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import covariance_eigvals
        >>> h = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
        >>> [round(v, 4) for v in covariance_eigvals(h).tolist()]  # diag(8, 2) / (n − 1)
        [2.6667, 0.6667]
    """
    x = _working(h, dtype)
    n, d = x.shape[-2], x.shape[-1]
    k = min(n, d)
    if n < 2 or d == 0:
        return torch.full((*x.shape[:-2], k), float("nan"), dtype=x.dtype, device=x.device)
    centred = x - x.mean(dim=-2, keepdim=True)
    return _smaller_side_eigvals(centred, 1.0 / (n - 1), normalize=False)


def vne(
    h: torch.Tensor, normalize: bool = True, dtype: torch.dtype | str | None = None
) -> torch.Tensor:
    """Von Neumann entropy of the autocorrelation of the rows of ``h``, in nats.

    ``VNE(H) = S(λ(C_auto))`` (docs/definitions.md#vne) with the trace renormalisation
    ``ρ = C / tr C`` and the cutoff (#cutoff): ``VNE = log d`` for isotropic rows, 0 for rank one, 0
    for ``H = 0`` or ``n = 1``, and ``0 <= VNE <= log min(n, d)`` (#vne-values). Zero rows do not
    change it. Differentiable (#vne-gradient): ``eigvalsh``'s backward for eigenvalues alone is
    ``V diag(∂L/∂λ) Vᵀ``, which has no ``1/(λ_i − λ_j)`` terms, so repeated eigenvalues are
    harmless; eigenvalues at or below the cutoff, and zero rows, get exactly zero gradient. Returns
    a tensor of shape ``h.shape[:-2]``; NaN where the input holds NaN/Inf or is empty.

    Examples:
        Isotropic rows give ``log d``, rank one gives 0:

        >>> import math
        >>> import torch
        >>> from lightning_spectral.functional import vne
        >>> round(float(vne(torch.eye(4))), 4), round(math.log(4), 4)
        (1.3863, 1.3863)
        >>> float(vne(torch.ones(5, 3)))
        0.0
    """
    lam = autocorrelation_eigvals(h, normalize=normalize, dtype=dtype)
    if lam.shape[-1] == 0:
        return torch.full(lam.shape[:-1], float("nan"), dtype=lam.dtype, device=lam.device)
    return entropy_and_total(apply_cutoff(lam))[0]


def effective_rank(eigvals: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank ``exp(S(λ))`` of a PSD spectrum (docs/definitions.md#erank).

    ``eigvals`` has shape ``(..., m)``; the cutoff (#cutoff) is applied first. ``k`` equal non-zero
    values give ``k`` (up to the rounding of ``exp(log k)``); a spectrum of zero total mass
    gives 0; NaN/Inf values give NaN. For a weight matrix pass ``σ²`` (the eigenvalues of
    ``WᵀW``), not ``σ``, so that ``erank = exp(VNE)``.

    Examples:
        A flat spectrum of ``k`` non-zero values has effective rank ``k``:

        >>> import torch
        >>> from lightning_spectral.functional import effective_rank
        >>> round(float(effective_rank(torch.ones(5))), 4)
        5.0
        >>> round(float(effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0]))), 4)
        2.0
    """
    check_vector(eigvals, "eigvals")
    lam = apply_cutoff(as_spectrum(eigvals))
    if lam.shape[-1] == 0:
        return lam.sum(dim=-1)
    return _erank_of(*entropy_and_total(lam))


def _erank_of(entropy: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``exp(S)`` from a cut spectrum's ``(S, Σλ)``: 0 for zero mass, NaN stays NaN."""
    # ``== 0`` is false for NaN, so a NaN total keeps its NaN entropy
    return torch.exp(entropy).masked_fill(total == 0, 0.0)


def rankme_from_eigvals(eigvals: torch.Tensor, eps: float = RANKME_EPS) -> torch.Tensor:
    """RankMe from the eigenvalues of ``HᵀH`` (or of any positive multiple, e.g. ``HᵀH/n``).

    The singular values of ``H`` are ``σ_k = (n λ_k)^{1/2}`` for ``λ`` the eigenvalues of
    ``HᵀH/n``; the formula only uses ``σ/‖σ‖₁``, so the scale of ``λ`` (hence ``n``) drops out
    and no SVD is needed: ``p_k = √λ_k / Σ_j √λ_j + ε`` and ``RankMe = exp(−Σ_k p_k log p_k)``
    over all ``m`` given values (the ``min(n, d)`` of :func:`autocorrelation_eigvals`).
    The round-off cutoff of :func:`effective_rank` is applied to ``λ`` first (values at
    round-off level count as ``σ = 0``, i.e. ``p = ε``). Pass the spectrum of the
    *unnormalised* rows (``autocorrelation_eigvals(h, normalize=False)``) to get the published
    quantity; see :func:`rankme`. ``eigvals`` ``(..., m)``; returns ``(...)``: 0 for zero total
    mass or an empty spectrum, NaN for NaN/Inf values. Differentiable (cut values get zero
    gradient).

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import rankme_from_eigvals
        >>> round(float(rankme_from_eigvals(torch.ones(4), eps=0.0)), 4)  # flat: m
        4.0
        >>> round(float(rankme_from_eigvals(torch.tensor([9.0, 0.0, 0.0]))), 4)  # rank one: ≈ 1
        1.0
    """
    check_vector(eigvals, "eigvals")
    lam = apply_cutoff(as_spectrum(eigvals))
    if lam.shape[-1] == 0:
        return lam.sum(dim=-1)
    return _rankme_of_cut(lam, eps)


def _rankme_of_cut(lam: torch.Tensor, eps: float, padding: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """RankMe of a cut spectrum ``(..., m)``, ``m >= 1``. ``padding`` (boolean, like ``lam``)
    marks trailing zeros that are not part of the spectrum: they get no ``ε`` term."""
    zero = lam == 0
    # √λ with value and gradient 0 where λ = 0 (the square root never sees 0)
    sigma = lam.masked_fill(zero, 1.0).sqrt().masked_fill(zero, 0.0)
    total = sigma.sum(dim=-1, keepdim=True)
    p = sigma / total.clamp_min(torch.finfo(lam.dtype).tiny) + eps
    if padding is not None:
        p = p.masked_fill(padding, 0.0)
    # with ``eps=0`` some p are 0: the log only ever sees positive values (0 log 0 = 0)
    value = torch.exp(0.0 - (p * p.masked_fill(p == 0, 1.0).log()).sum(dim=-1))
    # ``== 0`` is false for NaN, so a NaN spectrum keeps its NaN
    return value.masked_fill(total[..., 0] == 0, 0.0)


def rankme(
    h: torch.Tensor, eps: float = RANKME_EPS, dtype: torch.dtype | str | None = None
) -> torch.Tensor:
    """RankMe of an embedding batch (Garrido, Balestriero, Najman & LeCun, ICML 2023).

    ``RankMe(H) = exp(−Σ_k p_k log p_k)``, ``p_k = σ_k / ‖σ‖₁ + ε``, where ``σ`` are the
    ``min(n, d)`` singular values of the embedding matrix ``H`` ``(n, d)`` itself — rows
    **neither normalised nor centred**, as in the paper's definition — and ``ε = 1e-7`` as in the
    paper. It is Roy & Vetterli's effective rank of ``σ``, whereas :func:`effective_rank` is the
    one of ``σ²`` of the row-normalised batch (``exp(VNE)``); the two differ on the same batch
    (RankMe ≥ erank for the same rows without ``ε``, since ``σ/‖σ‖₁`` is flatter than
    ``σ²/‖σ‖²``). Known values: ``H = I_d`` gives ``d`` and a rank-one ``H`` gives 1, each up
    to the ``ε`` terms (exactly with ``eps=0``): ``ε`` adds ``−ε log ε ≈ 1.6e-6`` nats per
    value, so rank one reads ``≈ 1 + 1.6e-6·(m − 1)``. RankMe grows with ``n`` until
    ``n ≫ d``: compare values over the same number of rows (the paper uses 25,600).

    Computed from the eigenvalues of ``HᵀH/n`` on the smaller Gram side (one matmul, one
    ``eigvalsh``, no SVD; :func:`rankme_from_eigvals`), in float32 by default. Singular values
    below ``(k ε)^{1/2} σ_max`` (≈ 3.5e-4·√k·σ_max in float32, ``k = min(n, d)``) are not
    resolved by a Gram spectrum and count as 0; use ``dtype="float64"`` for embeddings that
    ill-conditioned. ``h`` ``(..., n, d)``; returns ``h.shape[:-2]``; 0 for ``H = 0``, NaN
    where the input holds NaN/Inf. Differentiable.

    Examples:
        ``H = I_d`` gives ``d``, a rank-one ``H`` gives 1 (up to the ``ε`` terms):

        >>> import torch
        >>> from lightning_spectral.functional import rankme
        >>> round(float(rankme(torch.eye(8))), 4)
        8.0
        >>> round(float(rankme(torch.ones(16, 4))), 4)
        1.0
    """
    lam = autocorrelation_eigvals(h, normalize=False, dtype=dtype)
    return rankme_from_eigvals(lam, eps)


def stable_rank(w: torch.Tensor, dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Stable rank ``‖W‖_F² / ‖W‖₂² = Σσ_i² / σ_1²`` of a weight (docs/definitions.md#stable-rank).

    A weight of shape ``(out, in, k1, ...)`` is read as ``W.reshape(out, in·k1·...)``
    (#weight-matrix). Range ``[1, rank W]``; NaN when ``W = 0`` or ``W`` holds NaN/Inf. Returns a
    0-d tensor.

    Examples:
        An orthogonal ``d × d`` matrix has stable rank ``d``, an outer product has stable rank 1:

        >>> import torch
        >>> from lightning_spectral.functional import stable_rank
        >>> g = torch.Generator().manual_seed(0)
        >>> q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
        >>> round(float(stable_rank(q)), 4)
        6.0
        >>> round(float(stable_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(5)))), 4)
        1.0
    """
    from lightning_spectral.functional.weights import (
        singular_values,
        stable_rank_from_singular_values,
    )

    return stable_rank_from_singular_values(singular_values(w, dtype=dtype))


def condition_number(eigvals: torch.Tensor) -> torch.Tensor:
    """Condition number ``λ_max / λ_min`` of a PSD spectrum (docs/definitions.md#condition).

    Over the values given (last dimension): ``+inf`` when ``λ_min <= λ_max · m · ε`` (#cutoff),
    NaN when ``λ_max <= 0``, the spectrum is empty, or it holds NaN/Inf.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import condition_number
        >>> float(condition_number(torch.tensor([4.0, 2.0, 1.0])))
        4.0
        >>> float(condition_number(torch.tensor([1.0, 0.0])))  # singular
        inf
    """
    check_vector(eigvals, "eigvals")
    lam = as_spectrum(eigvals)
    m = lam.shape[-1]
    if m == 0:
        return torch.full(lam.shape[:-1], float("nan"), dtype=lam.dtype, device=lam.device)
    return _condition_of(lam, lam.amin(dim=-1), m * torch.finfo(lam.dtype).eps)


def _condition_of(lam: torch.Tensor, lam_min: torch.Tensor,
                  tolerance: float | torch.Tensor) -> torch.Tensor:
    """:func:`condition_number` of ``lam`` ``(..., m)``, ``m >= 1``, given its smallest value
    and the relative resolution ``m · ε`` (a tensor ``(...)`` for zero-padded spectra)."""
    lam_max = lam.amax(dim=-1)
    resolved = lam_min > lam_max * tolerance
    kappa = torch.where(resolved, lam_max / torch.where(resolved, lam_min, 1.0), float("inf"))
    defined = (lam_max > 0) & torch.isfinite(lam_max) & ~torch.isnan(lam_min)
    return torch.where(defined, kappa, float("nan"))


def spectral_distribution(eigvals: torch.Tensor) -> torch.Tensor:
    """The logged eigenvalue distribution ``p = λ / Σλ``, after the cutoff.

    See docs/definitions.md#distribution. Pass ``σ²`` for a weight. A spectrum of zero mass gives
    zeros; NaN/Inf values give NaN.

    Examples:
        >>> import torch
        >>> from lightning_spectral.functional import spectral_distribution
        >>> spectral_distribution(torch.tensor([3.0, 1.0, 0.0])).tolist()
        [0.75, 0.25, 0.0]
    """
    check_vector(eigvals, "eigvals")
    lam = apply_cutoff(as_spectrum(eigvals))
    return _distribution_of_cut(lam, lam.sum(dim=-1))


def _distribution_of_cut(lam: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``λ / Σλ`` of a cut spectrum given its total ``(...)``; NaN for a non-finite total."""
    total = total.unsqueeze(-1)
    p = lam / total.clamp_min(torch.finfo(lam.dtype).tiny)
    return torch.where(torch.isfinite(total), p, float("nan"))
