"""The Lasso solver behind :func:`lightning_spectral.functional.mirrors.lasso_mirror_fit`.

``min_z ½‖A z + ξ − y‖² + β‖z‖₁`` (free intercept ``ξ``; docs/definitions.md#mirrors-lasso) by
a primal–dual interior-point method on a working set of columns, grown from the KKT violators
of the full dictionary, snapped to an exact sparse solution (a vertex from
``scipy.optimize.linprog``, then the KKT equations of its sign pattern), in float64 NumPy on
the host: a small, sequential, host-side computation. Private: the public entry point is
``lasso_mirror_fit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import linalg as scipy_linalg


@dataclass
class _Solution:
    z: np.ndarray
    intercept: float
    primal: float
    dual: float
    kkt: float
    rounds: int
    converged: bool


def _max_step(v: np.ndarray, dv: np.ndarray) -> float:
    """Largest ``t`` with ``v + t·dv ≥ 0``."""
    neg = dv < 0
    return float(np.min(-v[neg] / dv[neg])) if np.any(neg) else np.inf


def _newton(state: tuple[np.ndarray, ...], rc1: np.ndarray, rc2: np.ndarray
            ) -> tuple[np.ndarray, ...]:
    """One Newton direction of :func:`_ipm_lasso` for complementarity targets ``rc₁, rc₂``."""
    chol, r1, r2, a, b, s1, s2, w1, inv_dsum = state
    f1 = -r1 + rc1 / a
    f2 = -r2 + rc2 / b
    rhs = (1.0 - w1) * f1 - w1 * f2
    p = scipy_linalg.cho_solve((chol, True), rhs)
    db = (f1 + f2) * inv_dsum - w1 * p
    da = p + db
    return da, db, (rc1 - s1 * da) / a, (rc2 - s2 * db) / b


def _ipm_lasso(
    G: np.ndarray, c: np.ndarray, beta: float, yy: float, tol: float, max_iter: int = 200
) -> tuple[np.ndarray, int, np.ndarray]:
    """``min ½ zᵀGz − cᵀz + β‖z‖₁`` by a primal–dual interior-point method (Mehrotra).

    Split ``z = a − b`` with ``a, b ≥ 0`` and multipliers ``s₁, s₂ ≥ 0``; each Newton step
    reduces to one ``k × k`` positive-definite solve ``(G + D₁D₂/(D₁+D₂)) p = …`` with
    ``D_i = s_i / u_i``. Robust to the near-collinear columns of 1-D dictionaries, where
    coordinate descent stalls. ``yy = ‖y_c‖²`` turns the value into the full objective for the
    relative stopping test. Returns ``(z, iterations, predicted signs of the support)``.
    """
    k = c.size
    scale = math.sqrt(max(float(np.max(np.diag(G))), 1e-300))
    a = np.full(k, 1.0 / scale)
    b = a.copy()
    s1 = np.full(k, beta + float(np.max(np.abs(c))) / k + 1e-3 * beta)
    s2 = s1.copy()
    cmax = float(np.max(np.abs(c)))
    it = 0
    last_step = 1.0
    for it in range(1, max_iter + 1):
        z = a - b
        Gz = G @ z
        r1 = Gz - c + beta - s1
        r2 = -Gz + c + beta - s2
        mu = (a @ s1 + b @ s2) / (2 * k)
        primal = 0.5 * float(z @ Gz) - float(c @ z) + beta * float(np.abs(z).sum()) + 0.5 * yy
        res = max(float(np.abs(r1).max()), float(np.abs(r2).max()))
        if 2 * k * mu <= 0.1 * tol * max(primal, 1e-300) and res <= 1e-9 * (beta + cmax):
            break
        if it > 1 and last_step < 1e-10:  # stalled at the limit of float64
            break
        # D_i = s_i/u_i; the reduced matrix is G + diag(D₁D₂/(D₁+D₂)) = G + diag(1/(a/s₁ + b/s₂)),
        # written without forming D_i (they overflow as a coefficient goes to its bound)
        den = s1 * b + s2 * a
        w1 = s1 * b / den  # D₁/(D₁+D₂)
        inv_dsum = a * b / den  # 1/(D₁+D₂)
        M = G + np.diag(1.0 / (a / s1 + b / s2))
        chol = None
        for shift in (0.0, 1e-13, 1e-10, 1e-7):
            try:
                chol = np.linalg.cholesky(M + np.eye(k) * (shift * float(np.max(np.diag(M)))))
                break
            except np.linalg.LinAlgError:
                continue
        if chol is None:
            break

        state = (chol, r1, r2, a, b, s1, s2, w1, inv_dsum)
        aff = _newton(state, -a * s1, -b * s2)
        step = min(1.0, *(_max_step(v, d) for v, d in zip((a, b, s1, s2), aff, strict=True)))
        mu_aff = ((a + step * aff[0]) @ (s1 + step * aff[2])
                  + (b + step * aff[1]) @ (s2 + step * aff[3])) / (2 * k)
        sigma = (mu_aff / mu) ** 3
        da, db, ds1, ds2 = _newton(state, -a * s1 - aff[0] * aff[2] + sigma * mu,
                                 -b * s2 - aff[1] * aff[3] + sigma * mu)
        step = min(1.0, 0.995 * min(_max_step(v, d) for v, d in
                                      zip((a, b, s1, s2), (da, db, ds1, ds2), strict=True)))
        a, b, s1, s2 = a + step * da, b + step * db, s1 + step * ds1, s2 + step * ds2
        last_step = step
    # support indicator (scale-free): a coefficient is active when its value, relative to the
    # largest one, exceeds its dual slack relative to β (complementarity drives one of the two
    # to 0 along the central path)
    zscale = max(float(np.max(a)), float(np.max(b)), 1e-300)
    active = np.where(a / zscale > s1 / beta, 1.0, 0.0) - np.where(b / zscale > s2 / beta, 1.0, 0.0)
    return a - b, it, active


def _sub_objective(G: np.ndarray, c: np.ndarray, z: np.ndarray, beta: float) -> float:
    return 0.5 * float(z @ G @ z) - float(c @ z) + beta * float(np.abs(z).sum())


def _vertex(Ac: np.ndarray, z: np.ndarray) -> np.ndarray | None:
    """A basic (sparse) point with the same fitted values and no larger ``ℓ1`` norm.

    Lasso solutions share their fitted values and ``‖z‖₁``; with near-duplicate columns an
    interior-point method returns a dense one. The linear program ``min Σ s_j z_j`` subject to
    ``A_c z = A_c z⁰`` and ``s_j z_j ≥ 0`` (signs ``s`` of ``z⁰``) has a vertex solution with at
    most ``rank A_c`` non-zeros (HiGHS returns one).
    """
    from scipy.optimize import linprog

    S = np.flatnonzero(z)
    if S.size == 0:
        return None
    sgn = np.sign(z[S])
    B = Ac[:, S] * sgn
    res = linprog(np.ones(S.size), A_eq=B, b_eq=Ac[:, S] @ z[S], bounds=(0, None),
                  method="highs")
    if res.status != 0:
        return None
    out = np.zeros_like(z)
    u = np.where(res.x > 1e-12 * float(np.max(res.x)), res.x, 0.0)
    out[S] = sgn * u
    return out


def _polish(G: np.ndarray, c: np.ndarray, Ac: np.ndarray, z: np.ndarray, signs: np.ndarray,
            beta: float, yy: float) -> np.ndarray:
    """Snap an interior-point solution to an exact, sparse solution of its sign pattern.

    Candidates: the interior-point point (also with coefficients below ``1e-9 · max|z|``
    zeroed), the exact solution ``G_SS z_S = c_S − β s_S`` (least squares) on the support ``S``
    predicted by the interior-point method, and the same on the support of a sparse vertex
    (:func:`_vertex`). Sign-inconsistent snaps are discarded; the candidate of lowest objective
    wins, ties (within ``1e-12`` of the objective ``½‖y_c‖² + value``) going to the sparser.
    """
    zmax = float(np.max(np.abs(z))) if z.size else 0.0
    if zmax == 0.0:
        return z
    thresholded = np.where(np.abs(z) > 1e-9 * zmax, z, 0.0)
    cands = [z, thresholded]
    supports = [signs, np.sign(thresholded)]
    vert = _vertex(Ac, thresholded) if np.count_nonzero(thresholded) > 1 else None
    if vert is not None:
        cands.append(vert)
        supports.append(np.sign(vert))
    for sg in supports:
        S = np.flatnonzero(sg)
        if not S.size:
            continue
        sol, *_ = np.linalg.lstsq(G[np.ix_(S, S)], c[S] - beta * sg[S], rcond=None)
        if np.all(np.sign(sol) == sg[S]):
            snapped = np.zeros_like(z)
            snapped[S] = sol
            cands.append(snapped)
    vals = np.array([_sub_objective(G, c, cand, beta) for cand in cands])
    nnz = np.array([np.count_nonzero(cand) for cand in cands])
    # lowest objective; among those within rounding of it, the sparsest
    near = vals <= vals.min() + 1e-12 * max(vals.min() + 0.5 * yy, 1e-300)
    idx = np.flatnonzero(near)
    return cands[int(idx[np.argmin(nnz[idx])])]


def solve_lasso(A: np.ndarray, y: np.ndarray, beta: float, tol: float, max_iter: int) -> _Solution:
    """Lasso with an unpenalised intercept, by centring: ``min ½‖y_c − A_c z‖² + β‖z‖₁``.

    Working-set loop: solve the problem restricted to a set ``W`` of columns exactly
    (:func:`_ipm_lasso` + :func:`_polish`), compute the correlations ``A_cᵀ r`` of the whole
    dictionary (one matrix–vector product), stop when the relative duality gap of the *full*
    problem is at most ``tol``, else add the most violating columns to ``W``.
    """
    N, P = A.shape
    mu = A.mean(axis=0)
    yc = y - y.mean()
    colsq = np.maximum(np.einsum("np,np->p", A, A) - N * mu * mu, 0.0)
    # columns constant on the data (zero after centring) can only add penalty: fixed at 0
    valid = colsq > max(float(colsq.max()), 1e-300) * 1e-20
    z = np.zeros(P)
    W = np.zeros(0, dtype=np.int64)
    r = yc.copy()
    yy = float(yc @ yc)
    inner_tol = tol

    def dual_value(res: np.ndarray, corr: np.ndarray) -> float:
        # the residual rescaled into the dual feasible set {|A_cᵀθ| ≤ β}: a lower bound
        gmax = float(np.max(np.abs(corr))) if corr.size else 0.0
        s = 1.0 if gmax <= beta else beta / gmax
        return s * float(res @ yc) - 0.5 * s * s * float(res @ res)

    best_dual = -np.inf
    primal = float("nan")
    converged = False
    rounds = 0
    for rounds in range(1, max_iter + 1):  # noqa: B007 (reported)
        g = A.T @ r - mu * r.sum()  # = A_cᵀ r
        g[~valid] = 0.0
        absg = np.abs(g)
        primal = 0.5 * float(r @ r) + beta * float(np.abs(z).sum())
        best_dual = max(best_dual, dual_value(r, g))
        if primal - best_dual <= tol * max(primal, 1e-300) or yy == 0.0:
            converged = True
            break
        in_w = np.zeros(P, dtype=bool)
        in_w[W] = True
        viol = np.flatnonzero(valid & ~in_w & (absg > beta))
        if viol.size:
            take = min(N, 64)
            if viol.size > take:
                viol = viol[np.argpartition(-absg[viol], take - 1)[:take]]
            # the new working set: the current support and the worst violators. The support
            # is kept, so each round's optimum is no worse than the last one.
            W = np.concatenate([np.flatnonzero(z), viol])
        else:
            if inner_tol <= 1e-13:
                break  # float64 limit reached on this working set: report the gap achieved
            inner_tol *= 0.01  # the restricted problem was not solved accurately enough
        Ac = A[:, W] - mu[W]
        G = Ac.T @ Ac
        cW = Ac.T @ yc
        zW, _, signs = _ipm_lasso(G, cW, beta, yy, max(inner_tol, 1e-13))
        # the dense interior point often certifies a tighter dual bound than the sparse snap
        r_dense = yc - Ac @ zW
        g_dense = A.T @ r_dense - mu * r_dense.sum()
        best_dual = max(best_dual, dual_value(r_dense, g_dense[valid]))
        zW = _polish(G, cW, Ac, zW, signs, beta, yy)
        z[:] = 0.0
        z[W] = zW
        r = yc - Ac @ zW
    intercept = float(np.mean(y - A @ z))
    res = y - A @ z - intercept
    g = A.T @ res
    kkt = 0.0
    if P:
        nz = z != 0
        v_zero = np.maximum(np.abs(g[~nz & valid]) - beta, 0.0)
        v_supp = np.abs(g[nz] - beta * np.sign(z[nz]))
        kkt = float(max(v_zero.max(initial=0.0), v_supp.max(initial=0.0)) / beta)
    kkt = max(kkt, abs(float(res.sum())) / beta)
    primal = 0.5 * float(res @ res) + beta * float(np.abs(z).sum())
    return _Solution(z, intercept, primal, min(best_dual, primal), kkt, rounds, converged)

