"""Hessian top eigenvalue and trace: ours (Lanczos, Hutchinson) vs power iteration vs PyHessian.

Side by side on the same model and batch (the digits MLP; the quantities of
docs/definitions.md#hessian), interleaved rounds:

- ``lanczos``: :func:`lightning_spectral.functional.curvature.hessian_eigenpairs` (k=1);
- ``power``: plain power iteration on the same Hessian-vector product, stopped when the
  eigenvalue changes by less than ``tol`` relatively (the rule PyHessian uses) — always
  available, so the algorithmic comparison does not depend on PyHessian being installed;
- ``pyhessian``: ``pyhessian.hessian(...).eigenvalues(top_n=1)`` and ``.trace(maxIter=N)``
  when ``import pyhessian`` works (reported as not installed otherwise);
- ``trace``: our Hutchinson estimate with ``N`` Rademacher probes vs PyHessian's with the same
  ``N`` (its early stop disabled), so both do the same number of products.
- ``cockpit`` (when ``import cockpit`` works; its failure is written in the section): the
  overhead of Cockpit's ``HessMaxEV`` and ``HessTrace`` on one training step, against one plain
  training step and against one step plus the calls ``CurvatureMonitor(k=1)`` makes at an event
  (:func:`hessian_eigenpairs` with its default ``tol``, :func:`hessian_trace` with its default
  probe count), both quantities together and each alone. Cockpit runs on a BackPACK-extended
  copy of the same network (an ``nn.Sequential`` of the same modules and weights; ``extend``
  changes modules in place). All arms use SGD with ``lr = 0``, so every round sees the same
  parameters and the values stay comparable. Cockpit's ``HessTrace`` is the exact trace (sum of
  BackPACK's exact Hessian diagonal, spot-checked here against ``e_iᵀ H e_i``), so it is the
  reference for every Hutchinson estimate in this benchmark; its ``HessMaxEV`` (power
  iteration) is compared with the tight Lanczos reference.

Accuracy is measured against a tightly converged Lanczos run (``tol=1e-10``); wall times are
medians of interleaved rounds and per-round ratios. Also reported: products per estimate and
the cost of one product relative to one training step (forward + backward).

``python -m benchmarks.bench_curvature [--quick] [--device cuda] [--repeats R]``
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import inspect
import statistics
import sys
import warnings

import torch
from torch import nn

from benchmarks._common import (
    fmt_ms,
    fmt_ratio,
    interleaved,
    parser,
    ratio_summary,
    summary,
    write_section,
)
from lightning_spectral.functional.curvature import (
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


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def cockpit_section(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str,
                    repeats: int, ref: float, others: dict[str, tuple[float, float]]) -> list[str]:
    """Cockpit's HessMaxEV/HessTrace against one plain step and against ours; never raises.

    ``others``: further Hutchinson estimates ``name -> (estimate, SE)`` to set against the exact
    trace. Cockpit's and PyTorch's UserWarnings/DeprecationWarnings are silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import backpack  # noqa: F401
            import cockpit  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a finding, not a crash
            return ["### Cockpit", "", f"cockpit: import failed: {_one_line(exc)}"]
        try:
            return _cockpit_run(model, x, y, device, repeats, ref, others)
        except Exception as exc:  # noqa: BLE001
            return ["### Cockpit", "", f"cockpit: run failed: {_one_line(exc)}"]


def _cockpit_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, repeats: int,
                 ref: float, others: dict[str, tuple[float, float]]) -> list[str]:
    import cockpit.quantities.hess_max_ev as ck_hess_max_ev
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian
    from cockpit import Cockpit, quantities
    from cockpit.utils.schedules import linear

    from lightning_spectral.callbacks.curvature import CurvatureMonitor

    defaults = inspect.signature(CurvatureMonitor).parameters
    cm_probes = int(defaults["trace_probes"].default)
    cm_tol = float(defaults["tol"].default)
    batch = int(x.shape[0])
    crit = nn.functional.cross_entropy

    # ours: the LightningModule itself, as the callback sees it
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)

    def loss_fn() -> torch.Tensor:
        return crit(model(x), y)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    values: dict[str, float] = {}
    events = {"n": 0}

    def ours(eig: bool, trace: bool):
        def fn() -> None:
            plain_step()
            events["n"] += 1  # the callback seeds its generator with seed + step
            gen = torch.Generator().manual_seed(events["n"])
            if eig:
                vals, _ = hessian_eigenpairs(loss_fn, params, k=1, tol=cm_tol, generator=gen)
                values["ours_ev"] = float(vals[0])  # the callback reads it on the host too
            if trace:
                est, se = hessian_trace(loss_fn, params, n_probes=cm_probes, generator=gen)
                values["ours_tr"], values["ours_tr_se"] = float(est), float(se)
        return fn

    # Cockpit: a BackPACK-extended copy (extend() modifies modules in place)
    twin = copy.deepcopy(model)
    ck_model = extend(nn.Sequential(*twin.features, twin.classifier))
    ck_lossf = extend(nn.CrossEntropyLoss())
    ck_params = [q for q in ck_model.parameters() if q.requires_grad]
    ck_opt = torch.optim.SGD(ck_params, lr=0.0)

    def cockpit_step(*names: str):
        ck = Cockpit(ck_params, quantities=[getattr(quantities, n)(track_schedule=linear(1))
                                            for n in names])
        state = {"step": 0}

        def fn() -> dict:
            step = state["step"]
            state["step"] += 1
            ck_opt.zero_grad(set_to_none=True)  # also breaks create_graph's grad cycle
            out = ck_model(x)
            loss = ck_lossf(out, y)
            info = {"batch_size": batch, "individual_losses": crit(out, y, reduction="none"),
                    "loss": loss, "optimizer": ck_opt}
            with ck(step, info=info):
                loss.backward(create_graph=ck.create_graph(step))
            ck_opt.step()
            return ck.get_output()[step]
        return fn

    fns = {
        "plain": plain_step,
        "ck_both": cockpit_step("HessMaxEV", "HessTrace"),
        "ours_both": ours(True, True),
        "ck_ev": cockpit_step("HessMaxEV"),
        "ours_ev": ours(True, False),
        "ck_tr": cockpit_step("HessTrace"),
        "ours_tr": ours(False, True),
    }
    times = interleaved(fns, repeats=repeats, warmup=2, device=device)

    # values: one more untimed event of each, seeded, counting products
    counts = {"ck": 0}
    orig_hvp = ck_hess_max_ev.hessian_vector_product

    def counted_hvp(*a, **k):
        counts["ck"] += 1
        return orig_hvp(*a, **k)

    torch.manual_seed(0)  # Cockpit's power iteration starts from torch.rand_like
    ck_hess_max_ev.hessian_vector_product = counted_hvp
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ck_out = fns["ck_both"]()
    finally:
        ck_hess_max_ev.hessian_vector_product = orig_hvp
    unconverged = any("Exceeded maximum" in str(w.message) for w in caught)
    ck_ev = float(ck_out["HessMaxEV"])
    exact = float(sum(ck_out["HessTrace"]))
    with _Counter() as c:
        fns["ours_both"]()
    ours_ev, ours_tr, ours_se = values["ours_ev"], values["ours_tr"], values["ours_tr_se"]
    ours_ev_products = c.n - cm_probes  # hessian_trace makes exactly one product per probe

    # spot check of BackPACK's diagonal against exact e_iᵀ H e_i (our Hessian-vector product)
    ck_opt.zero_grad(set_to_none=True)
    with backpack(DiagHessian()):
        ck_lossf(ck_model(x), y).backward()
    diag = torch.cat([q.diag_h.reshape(-1) for q in ck_params]).to(torch.float64)
    for q in ck_params:
        del q.diag_h
    ck_opt.zero_grad(set_to_none=True)
    op = _HessianOperator(loss_fn, params)
    n_check = min(32, op.numel)
    idx = torch.randperm(op.numel, generator=torch.Generator().manual_seed(1))[:n_check]
    exact_hii = []
    for i in idx.tolist():
        e = torch.zeros(op.numel, dtype=op.dtype, device=op.device)
        e[i] = 1.0
        exact_hii.append(float(op.matvec(e)[i]))
    del op
    exact_hii_t = torch.tensor(exact_hii, dtype=torch.float64)
    diag_dev = float((diag[idx.to(diag.device)].cpu() - exact_hii_t).abs().max()
                     / diag.abs().max().clamp_min(1e-300).cpu())

    def vs_exact(est: float, se: float) -> str:
        d = est - exact
        return f"{d / abs(exact):+.2%} = {d / se:+.2f} SE" if se > 0 else f"{d / abs(exact):+.2%}"

    plain_ms = fmt_ms(summary(times["plain"])[0])
    lines = [
        "### Cockpit",
        "",
        f"cockpit-for-pytorch {_version('cockpit-for-pytorch')}, backpack-for-pytorch "
        f"{_version('backpack-for-pytorch')}, on a BackPACK-extended copy of the same network "
        f"and batch; Cockpit's quantities every step (`linear(1)`). Ours: the same plain step, "
        f"then the calls `CurvatureMonitor(k=1)` makes at an event — `hessian_eigenpairs(k=1, "
        f"tol={cm_tol:g})` and `hessian_trace(n_probes={cm_probes})` (its defaults; noise "
        "quantities off: Cockpit has no counterpart). SGD with lr = 0 in every arm (same "
        f"parameters each round). {repeats} interleaved rounds after 2 warm-up rounds; plain "
        f"step {plain_ms} (median).",
        "",
        "| per training step | median time | × plain step | ours / Cockpit |",
        "|---|---|---|---|",
        f"| plain step (zero_grad, forward, backward, SGD step) | {plain_ms} | 1 | – |",
    ]
    rows = (
        ("ck_both", "ours_both", "HessMaxEV + HessTrace",
         f"λ_max (Lanczos) + trace (Hutchinson, {cm_probes} probes)"),
        ("ck_ev", "ours_ev", "HessMaxEV only", "λ_max only (Lanczos)"),
        ("ck_tr", "ours_tr", "HessTrace only (exact diagonal)",
         f"trace only (Hutchinson, {cm_probes} probes)"),
    )
    for ck_name, our_name, ck_label, our_label in rows:
        lines.append(f"| Cockpit: {ck_label} | {fmt_ms(summary(times[ck_name])[0])} | "
                     f"{fmt_ratio(ratio_summary(times[ck_name], times['plain']))} | – |")
        lines.append(
            f"| ours: {our_label} | {fmt_ms(summary(times[our_name])[0])} | "
            f"{fmt_ratio(ratio_summary(times[our_name], times['plain']))} | "
            f"{fmt_ratio(ratio_summary(times[our_name], times[ck_name]))} |"
        )
    cap = "; hit its 100-iteration cap" if unconverged else ""
    lines += [
        "",
        "Values at one more (untimed, seeded) event of each:",
        "",
        "| quantity | Cockpit | ours (CurvatureMonitor defaults) | reference |",
        "|---|---|---|---|",
        f"| λ_max | {ck_ev:.6g} (power iteration: rel. error {abs(ck_ev - ref) / abs(ref):.2e}, "
        f"{counts['ck']} products{cap}) | {ours_ev:.6g} (Lanczos: rel. error "
        f"{abs(ours_ev - ref) / abs(ref):.2e}, {ours_ev_products} products) | {ref:.6g} "
        "(Lanczos, tol 1e-10) |",
        f"| trace | {exact:.6g} (exact: sum of BackPACK's Hessian diagonal) | {ours_tr:.5g} ± "
        f"{ours_se:.2g} SE ({cm_probes} probes): {vs_exact(ours_tr, ours_se)} | Cockpit's "
        "exact value |",
        "",
        f"BackPACK's diagonal matches {n_check} sampled exact entries e_iᵀHe_i (by our "
        f"Hessian-vector product) to {diag_dev:.1e} of max|H_ii|. The other Hutchinson "
        "estimates above, against the exact trace: "
        + "; ".join(f"{name} {est:.5g} ± {se:.2g}: {vs_exact(est, se)}"
                    for name, (est, se) in others.items()) + ".",
    ]
    return lines


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--probes", type=int, default=None, help="trace probes (default 100; quick 10)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 on a shared machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device} requested but CUDA is not available", file=sys.stderr)
        raise SystemExit(2)
    torch.manual_seed(0)  # PyHessian's and Cockpit's start vectors come from the global RNG
    # PyHessian calls loss.backward(create_graph=True); PyTorch warns about the grad cycle
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
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
        "",
    ]
    others = {f"ours {probes} probes": (results["trace"], results["trace_se"])}
    if have_pyh:
        others[f"PyHessian {probes} probes"] = (results["pyh_trace"], results["pyh_trace_se"])
    lines += cockpit_section(model, x, y, device, repeats, ref, others)
    write_section("bench_curvature", "Hessian top eigenvalue and trace (CurvatureMonitor)",
                  "\n".join(lines), device=device, out=args.out)


if __name__ == "__main__":
    main()
