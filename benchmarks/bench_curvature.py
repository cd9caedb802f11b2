"""Hessian top eigenvalue and trace: ours (Lanczos, Hutchinson) vs power iteration vs PyHessian.

Side by side on the same model and batch (the digits MLP, SPEC.md §6.4), interleaved rounds:

- ``lanczos``: :func:`lightning_spectral.functional.curvature.hessian_eigenpairs` (k=1);
- ``power``: plain power iteration on the same Hessian-vector product, stopped when the
  eigenvalue changes by less than ``tol`` relatively (the rule PyHessian uses) — always
  available, so the algorithmic comparison does not depend on PyHessian being installed;
- ``pyhessian``: ``pyhessian.hessian(...).eigenvalues(top_n=1)`` and ``.trace(maxIter=N)``
  when ``import pyhessian`` works (reported as not installed otherwise);
- ``trace``: our Hutchinson estimate with ``N`` Rademacher probes vs PyHessian's with the same
  ``N`` (its early stop disabled), so both do the same number of products.

Accuracy is measured against a tightly converged Lanczos run (``tol=1e-10``); wall times are
medians of interleaved rounds and per-round ratios. Also reported: products per estimate and
the cost of one product relative to one training step (forward + backward).

``python benchmarks/bench_curvature.py [--quick] [--device cuda] [--repeats R]``
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    fmt_ms,
    fmt_ratio,
    interleaved,
    parser,
    ratio_summary,
    summary,
    write_section,
)

from lightning_spectral.functional.curvature import (  # noqa: E402
    _HessianOperator,
    hessian_eigenpairs,
    hessian_trace,
)


def power_iteration(loss_fn, params, tol: float = 1e-3, max_iter: int = 100,
                    seed: int = 0) -> tuple[float, int]:
    """Top eigenvalue by power iteration with the relative-change stopping rule."""
    op = _HessianOperator(loss_fn, params)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.numel, generator=gen, dtype=op.dtype).to(op.device)
    v = v / v.norm()
    value = None
    for i in range(max_iter):
        hv = op.matvec(v)
        new = float(torch.dot(hv, v))
        v = hv / hv.norm()
        if value is not None and abs(new - value) / (abs(value) + 1e-6) < tol:
            return new, i + 1
        value = new
    return float(value), max_iter


class _Counter:
    """Counts Hessian-vector products made through ``_HessianOperator.matvec``."""

    def __init__(self) -> None:
        self.n = 0
        self._orig = _HessianOperator.matvec

    def __enter__(self) -> _Counter:
        counter = self

        def counted(op, v):
            counter.n += 1
            return counter._orig(op, v)

        _HessianOperator.matvec = counted
        return self

    def __exit__(self, *exc: object) -> None:
        _HessianOperator.matvec = self._orig


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--probes", type=int, default=None, help="trace probes (default 100; quick 10)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 on a shared machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    repeats = args.repeats or (3 if args.quick else 7)
    probes = args.probes or (10 if args.quick else 100)
    hidden = (32, 16) if args.quick else (128, 64)
    batch = 64 if args.quick else 256

    from lightning_spectral.demos import DigitsClassifier, load_digits_tensors

    x, y, _, _ = load_digits_tensors()
    x, y = x[:batch].to(device), y[:batch].to(device)
    gen = torch.Generator().manual_seed(0)
    model = DigitsClassifier(arch="mlp", hidden=hidden).to(device)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen).to(device) * 0.2)
    model.eval()
    params = [q for q in model.parameters() if q.requires_grad]
    n_params = sum(q.numel() for q in params)
    crit = nn.functional.cross_entropy

    def loss_fn() -> torch.Tensor:
        return crit(model(x), y)

    ref_vals, _ = hessian_eigenpairs(loss_fn, params, k=1, tol=1e-10, max_iter=300)
    ref = float(ref_vals[0])

    have_pyh = importlib.util.find_spec("pyhessian") is not None
    results: dict[str, float] = {}
    counts: dict[str, int] = {}

    def ours_top() -> None:
        with _Counter() as c:
            results["lanczos"] = float(hessian_eigenpairs(loss_fn, params, k=1, tol=1e-3)[0][0])
        counts["lanczos"] = c.n

    def power_top() -> None:
        results["power"], counts["power"] = power_iteration(loss_fn, params, tol=1e-3)

    def ours_trace() -> None:
        est, se = hessian_trace(loss_fn, params, n_probes=probes)
        results["trace"], results["trace_se"] = float(est), float(se)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    op_holder: dict[str, _HessianOperator] = {}

    def one_hvp() -> None:
        if "op" not in op_holder:
            op_holder["op"] = _HessianOperator(loss_fn, params)
        op = op_holder["op"]
        op.matvec(torch.ones(op.numel, device=device))

    fns = {"lanczos": ours_top, "power": power_top, "trace": ours_trace, "step": step,
           "hvp": one_hvp}
    if have_pyh:
        from pyhessian import hessian as PyHessian

        def pyh_top() -> None:
            h = PyHessian(model, crit, data=(x, y), cuda=device.startswith("cuda"))
            results["pyhessian"] = float(h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)[0][0])
            model.zero_grad(set_to_none=True)  # PyHessian leaves graph-holding .grad behind

        def pyh_trace() -> None:
            h = PyHessian(model, crit, data=(x, y), cuda=device.startswith("cuda"))
            vals = h.trace(maxIter=probes, tol=0.0)
            results["pyh_trace"] = statistics.mean(vals)
            results["pyh_trace_se"] = statistics.stdev(vals) / len(vals) ** 0.5
            model.zero_grad(set_to_none=True)

        fns["pyhessian"] = pyh_top
        fns["pyh_trace"] = pyh_trace
    times = interleaved(fns, repeats=repeats, warmup=1, device=device)
    model.eval()

    rel = {name: abs(results[name] - ref) / abs(ref) for name in ("lanczos", "power", "pyhessian")
           if name in results}
    lines = [
        f"Model: digits MLP 64-{hidden[0]}-{hidden[1]}-10 ({n_params:,} parameters), batch "
        f"{batch}, eval mode, device {device}; {repeats} interleaved rounds after warm-up; "
        f"reference λ_max = {ref:.6g} (Lanczos, tol 1e-10).",
        "",
        "| method | λ_max | rel. error vs reference | products | median time | time / lanczos |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("lanczos", "power", "pyhessian"):
        if name not in results:
            continue
        prods = counts.get(name, "≈ power's")
        lines.append(
            f"| {name} | {results[name]:.6g} | {rel[name]:.2e} | {prods} | "
            f"{fmt_ms(summary(times[name])[0])} | "
            f"{fmt_ratio(ratio_summary(times[name], times['lanczos']))} |"
        )
    lines += [
        "",
        f"Trace with {probes} Rademacher probes: ours {results['trace']:.5g} ± "
        f"{results['trace_se']:.2g} (SE), {fmt_ms(summary(times['trace'])[0])}.",
    ]
    if have_pyh:
        diff = abs(results["trace"] - results["pyh_trace"])
        comb = (results["trace_se"] ** 2 + results["pyh_trace_se"] ** 2) ** 0.5
        lines.append(
            f"PyHessian {results['pyh_trace']:.5g} ± {results['pyh_trace_se']:.2g}, "
            f"{fmt_ms(summary(times['pyh_trace'])[0])} "
            f"(ours/PyHessian time {fmt_ratio(ratio_summary(times['trace'], times['pyh_trace']))}"
            f"); difference {diff / abs(results['trace']):.2%} = {diff / comb:.2f} combined SE. "
            "Two independent Hutchinson estimates differ by their sampling error; 1 % agreement "
            "needs ~ (SE/0.01 tr)² probes."
        )
    else:
        lines.append("PyHessian: not installed (`pip install pyhessian` to add it to this table).")
    lines += [
        "",
        f"One Hessian-vector product = {fmt_ratio(ratio_summary(times['hvp'], times['step']))} "
        f"training steps (forward + backward) on this batch.",
    ]
    write_section("bench_curvature", "Hessian top eigenvalue and trace (CurvatureMonitor)",
                  "\n".join(lines), device=device, out=args.out)


if __name__ == "__main__":
    main()
