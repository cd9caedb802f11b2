"""Per-matrix checkpoint analysis: cost against bare singular-value kernels and WeightWatcher.

For each model's weight matrices we time, interleaved in one run:

- ``ours``: :func:`lightning_spectral.analysis.analyze_state_dict` (singular values batched by
  equal shape, then σ_max, stable rank, effective rank, k(τ), Eckart–Young error, param ratio);
- ``bare``: ``torch.linalg.svdvals`` of each reshaped matrix in a Python loop (the kernels alone);
- ``weightwatcher``: ``WeightWatcher(model).analyze()`` with its default options on the same
  model in the same process, as a third arm of the same interleaved rounds, only when
  ``weightwatcher`` is importable (it is never installed by this project; a failure to import
  or run is written in the table). Its print-outs are discarded. One untimed call before the
  rounds compares its singular values with ours to 1e-5 relative (WeightWatcher chooses its
  own SVD backend: SciPy on the CPU, or torch on CUDA whenever CUDA is available — then it
  rounds the weights to float16 first, and the limit is 5e-3).

It also times the start-up of ``lightning-spectral analyze --help`` against a bare ``python -c
pass`` and ``python -c "import torch"`` (subprocesses, interleaved).

Heavy-tailed α (a section of its own): the power-law exponent of every layer's eigenvalues
``σ²`` from :func:`lightning_spectral.functional.powerlaw.weight_alpha`, against the ``alpha``
column of ``WeightWatcher(model).analyze()`` (default options) layer by layer — the target is
≤ 0.02 absolute on every dense layer — and timed against it: all layers' α (SVD + fit) against
``analyze()``, and the fit alone (``powerlaw_alpha``) against WeightWatcher's own fit
(``WW_powerlaw.WWFit``, what ``analyze()`` calls per layer) on the same eigenvalues.

Run: ``python -m benchmarks.bench_analyze [--quick] [--device cuda] [--alpha-only]``; writes
``benchmarks/results/bench_analyze.md`` and ``benchmarks/results/bench_analyze_alpha.md``
(``--alpha-only``: the second only).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from benchmarks._common import (
    fmt_ms,
    fmt_ratio,
    interleaved,
    parser,
    ratio_summary,
    summary,
    sync,
    write_section,
)
from lightning_spectral.analysis import (
    analyze_state_dict,
    select_weight_matrices,
    weight_spectra,
)
from lightning_spectral.functional.powerlaw import powerlaw_alpha, weight_alpha


def build_models(quick: bool) -> dict[str, nn.Module]:
    """Seeded models: a 784-512-512-10 MLP, the digits CNN, 12 equal 256² blocks."""
    torch.manual_seed(0)  # benchmark script: owns its process
    d_in, width = (64, 128) if quick else (784, 512)
    models: dict[str, nn.Module] = {
        f"mlp {d_in}-{width}-{width}-10": nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, 10)
        ),
        "digits cnn": nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)
        ),
    }
    if not quick:
        models["12 blocks 256x256"] = nn.Sequential(*[nn.Linear(256, 256) for _ in range(12)])
    return models


def bare_svdvals(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.linalg.svdvals(w.reshape(w.shape[0], -1).float()) for w in weights]


def ww_half_precision() -> bool:
    """Whether WeightWatcher rounds weights to float16 (it does when CUDA is available)."""
    from weightwatcher import RMT_Util  # type: ignore[import-not-found]

    return np.asarray(RMT_Util.torch_T_to_np(torch.ones(1))).dtype == np.float16


def ww_analyze(model: nn.Module):
    """``WeightWatcher(model).analyze()`` with its default options, its print-outs discarded."""
    import weightwatcher as ww  # type: ignore[import-not-found]

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        watcher = ww.WeightWatcher(model=model)
        return watcher, watcher.analyze()


def ww_agreement(model: nn.Module, sd: dict) -> str:
    """Run WeightWatcher's analyze() once and compare its singular values with ours."""
    watcher, details = ww_analyze(model)
    # Compare the full singular spectrum of every dense (Linear) layer. Conv kernels are read
    # under different conventions: docs/definitions.md#weight-matrix reshapes (out, in, kh, kw)
    # to one out × in·kh·kw matrix, WeightWatcher splits it into kh·kw slices of out × in, so their
    # singular values are not the same quantity and are not compared.
    spectra = weight_spectra(select_weight_matrices(sd), dtype="float64")
    by_name = {name.removesuffix(".weight"): {"_svals": sv.cpu().numpy()}
               for name, sv in spectra.items()}
    dense = details[details["layer_type"].astype(str).str.contains("dense", case=False)]
    n_conv = len(details) - len(dense)
    worst = 0.0
    compared = 0
    for _, row in dense.iterrows():
        mine = by_name.get(str(row["longname"]))
        if mine is None:
            continue
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            evals = np.asarray(watcher.get_ESD(layer=int(row["layer_id"])), dtype=float)
        theirs = np.sort(np.sqrt(np.clip(evals, 0, None)))[::-1]
        ours_sv = np.asarray(mine["_svals"], dtype=float)[: len(theirs)]
        top = max(float(ours_sv[0]), 1e-30)
        # relative to σ_max: tiny singular values carry float32 round-off of order ε·σ_max
        worst = max(worst, float(np.max(np.abs(theirs[: len(ours_sv)] - ours_sv)) / top))
        compared += 1
    half = ww_half_precision()
    limit, limit_text = (5e-3, "5e-3") if half else (1e-5, "1e-5")
    verdict = "agree" if worst <= limit else "DISAGREE"
    text = (f"all singular values of {compared} dense layers {verdict} to {worst:.1e} "
            f"(relative to σ_max; limit {limit_text}"
            + ("; WeightWatcher rounded the weights to float16" if half else "") + ")")
    if n_conv:
        text += f"; {n_conv} conv layers not compared (WeightWatcher slices kernels per tap)"
    return text


def ww_layer_rows(details) -> list[dict]:
    """The layers WeightWatcher fitted: name, type, α, x_min, D, α̂ (failed fits are −1)."""
    rows = []
    for _, row in details.iterrows():
        rows.append({
            "name": str(row["longname"]), "type": str(row["layer_type"]).lower(),
            "alpha": float(row["alpha"]), "xmin": float(row["xmin"]), "D": float(row["D"]),
            "alpha_weighted": float(row["alpha_weighted"]),
        })
    return rows


def ww_fit(evals: np.ndarray):
    """WeightWatcher's power-law fit of one ESD, as ``analyze()`` calls it (default options)."""
    from weightwatcher.constants import EVALS_THRESH  # type: ignore[import-not-found]
    from weightwatcher.WW_powerlaw import WWFit  # type: ignore[import-not-found]

    with (open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink),
          np.errstate(divide="ignore", invalid="ignore")):
        return WWFit(evals[evals > EVALS_THRESH])


def alpha_section(models: dict[str, nn.Module], device: str, repeats: int,
                  have_ww: bool) -> str:
    """α per layer (ours vs WeightWatcher), agreement on dense layers, and the two time ratios."""
    table = ["| model | layer | weight shape | eigenvalues | α ours | α WW | abs diff | "
             "x_min ours | x_min WW | α̂ ours | α̂ WW |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    timing = ["| model | layers | ours: α of every layer (SVD + fit) | WW analyze() | ours / WW "
              "| fit: ours per layer | fit: ours, one batched call | fit: WW (WWFit per layer) "
              "| per layer / WW | batched / WW |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst_dense, n_dense, n_conv_agree, n_conv = 0.0, 0, 0, 0
    failures: list[str] = []
    for name, model in models.items():
        model = model.to(device)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        weights = select_weight_matrices(sd)
        ours = {k.removesuffix(".weight"): weight_alpha(w, conv="weightwatcher")
                for k, w in weights.items()}
        reshaped = {k.removesuffix(".weight"): weight_alpha(w) for k, w in weights.items()}
        shapes = {k.removesuffix(".weight"): tuple(w.shape) for k, w in weights.items()}
        # the eigenvalues each fit sees (WeightWatcher's reading: conv kernels per tap, × 1/2)
        spectra = {k.removesuffix(".weight"): _ww_eigs(w) for k, w in weights.items()}
        ww_rows: list[dict] = []
        if have_ww:
            try:
                ww_rows = ww_layer_rows(ww_analyze(copy.deepcopy(model))[1])
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a finding
                failures.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0][:160])
        by_name = {r["name"]: r for r in ww_rows}
        for layer, fit in ours.items():
            theirs = by_name.get(layer)
            a = float(fit.alpha)
            shape = "×".join(str(d) for d in shapes[layer])
            m = spectra[layer].numel()
            if theirs is None:
                table.append(f"| {name} | {layer} | {shape} | {m} | {a:.4f} | – | – | "
                             f"{float(fit.xmin):.4g} | – | {float(fit.alpha_weighted):.4f} | – |")
                continue
            diff = abs(a - theirs["alpha"])
            conv = len(shapes[layer]) == 4
            if conv:
                n_conv += 1
                n_conv_agree += diff <= 0.02
                note = (f" (per-tap reading; α of the reshaped {shapes[layer][0]}×"
                        f"{int(np.prod(shapes[layer][1:]))} matrix: "
                        f"{float(reshaped[layer].alpha):.4f})")
            else:
                n_dense += 1
                worst_dense = max(worst_dense, diff)
                note = ""
            table.append(
                f"| {name} | {layer} ({theirs['type']}) | {shape} | {m} | {a:.4f}{note} | "
                f"{theirs['alpha']:.4f} | {diff:.1e} | {float(fit.xmin):.4g} | "
                f"{theirs['xmin']:.4g} | {float(fit.alpha_weighted):.4f} | "
                f"{theirs['alpha_weighted']:.4f} |")

        mats = list(weights.values())
        eig_list = list(spectra.values())
        # one call for all layers: spectra zero-padded to one length (zeros are not fitted)
        padded = torch.zeros(len(eig_list), max(x.numel() for x in eig_list), device=device)
        for i, x in enumerate(eig_list):
            padded[i, : x.numel()] = x
        fns = {
            "ours": lambda mats=mats: [weight_alpha(w, conv="weightwatcher") for w in mats],
            "ours_fit": lambda e=eig_list: [powerlaw_alpha(x) for x in e],
            "ours_batched": lambda p=padded: powerlaw_alpha(p),
        }
        if ww_rows:
            ww_model = copy.deepcopy(model)
            host = [x.detach().cpu().double().numpy() for x in eig_list]
            fns["ww"] = lambda m=ww_model: ww_analyze(m)
            fns["ww_fit"] = lambda h=host: [ww_fit(x) for x in h]
            fns["_settle"] = lambda: time.sleep(0.2)  # WeightWatcher's BLAS threads, see above
        times = interleaved(fns, repeats=repeats, warmup=2, device=device)
        cells = [fmt_ms(summary(times["ours"])[0]), "–", "–",
                 fmt_ms(summary(times["ours_fit"])[0]),
                 fmt_ms(summary(times["ours_batched"])[0]), "–", "–", "–"]
        if "ww" in times:
            cells[1] = fmt_ms(summary(times["ww"])[0])
            cells[2] = fmt_ratio(ratio_summary(times["ours"], times["ww"]))
            cells[5] = fmt_ms(summary(times["ww_fit"])[0])
            cells[6] = fmt_ratio(ratio_summary(times["ours_fit"], times["ww_fit"]))
            cells[7] = fmt_ratio(ratio_summary(times["ours_batched"], times["ww_fit"]))
        timing.append(f"| {name} | {len(mats)} | " + " | ".join(cells) + " |")

    if not have_ww:
        verdict = "WeightWatcher is not installed: α is not compared (`make bench` installs it)."
    elif n_dense:
        import importlib.metadata

        version = importlib.metadata.version("weightwatcher")
        ok = "meets" if worst_dense <= 0.02 else "MISSES"
        verdict = (f"WeightWatcher {version}. Largest |α ours − α WW| over the {n_dense} dense "
                   f"layers: {worst_dense:.1e} ({ok} the 0.02 target).")
        if n_conv:
            verdict += (" With WeightWatcher's reading of conv kernels "
                        f"(`conv=\"weightwatcher\"`), {n_conv_agree} of {n_conv} conv layers "
                        "also agree to 0.02.")
    else:
        verdict = "WeightWatcher returned no dense layer to compare."
    if failures:
        verdict += " WeightWatcher failed on: " + "; ".join(failures) + "."
    return (
        "α of each layer's eigenvalues λ = σ² (no 1/N normalisation, eigenvalues ≤ 1e-5 "
        "dropped, every eigenvalue but the largest tried as x_min, least KS distance "
        "|F − j/n|; below 20 eigenvalues WeightWatcher's small-sample fit), ours by "
        "`weight_alpha(w, conv=\"weightwatcher\")` with float32 singular values and a float64 "
        "fit, WeightWatcher by `analyze()` with its default options. α̂ = α·log10 λ_max.\n\n"
        + verdict + "\n\n" + "\n".join(table)
        + "\n\nConv layers: WeightWatcher cuts a kernel (out, in, kh, kw) into kh·kw per-tap "
        "out×in matrices scaled by 1/√2 and fits their pooled eigenvalues; this package reads "
        "every weight as W.reshape(out, −1) (the default `conv=\"reshape\"`), a different "
        "spectrum with a different α (in parentheses). The agreement target covers dense layers "
        "only.\n\n### Time\n\n" + "\n".join(timing)
        + f"\n\nMedians of {repeats} interleaved rounds after warm-up on `{device}` "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); ratios are "
        "medians (min–max) of per-round ratios (below 1: ours is faster). *α of every layer*: "
        "`weight_alpha` per layer (singular values and fit) against the whole `analyze()`, "
        "which also computes its other metrics (norms, stable rank, entropy) from the same "
        "SVDs. *Fit alone*: `powerlaw_alpha` on the same eigenvalues as WeightWatcher's `WWFit` "
        "(its NumPy loop over the candidate x_min, on the host), once per layer and once for "
        "all the model's layers in one batched call (spectra zero-padded to one length)."
    )


def _ww_eigs(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a weight in WeightWatcher's reading (what ``weight_alpha`` fits with
    ``conv="weightwatcher"``): σ² of the matrix, or of a conv kernel's per-tap slices / √2."""
    if w.ndim == 4:
        taps = w.float().reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)
        return (torch.linalg.svdvals(taps).square() * 0.5).reshape(-1)
    return torch.linalg.svdvals(w.float().reshape(w.shape[0], -1)).square()


def cli_startup(repeats: int, with_torch: bool = True) -> str:
    """Start-up of ``analyze --help`` versus bare Python and ``import torch``."""
    py = sys.executable
    cmds = {
        "python -c pass": [py, "-c", "pass"],
        "lightning-spectral analyze --help": [py, "-m", "lightning_spectral", "analyze", "--help"],
    }
    if with_torch:
        cmds["python -c 'import torch'"] = [py, "-c", "import torch"]

    def runner(cmd: list[str]):
        return lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    times = interleaved({k: runner(v) for k, v in cmds.items()}, repeats=repeats, warmup=1)
    base = times["python -c pass"]
    lines = ["| command | median | min–max | × bare python |", "|---|---|---|---|"]
    for name, ts in times.items():
        med, lo, hi = summary(ts)
        lines.append(f"| `{name}` | {fmt_ms(med)} | {fmt_ms(lo)}–{fmt_ms(hi)} | "
                     f"{fmt_ratio(ratio_summary(ts, base))} |")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--alpha-only", action="store_true",
                   help="only the heavy-tailed α comparison (bench_analyze_alpha.md)")
    args = p.parse_args()
    quick = args.quick
    repeats = args.repeats or (3 if quick else 9)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device} requested but CUDA is not available", file=sys.stderr)
        raise SystemExit(2)
    have_ww = importlib.util.find_spec("weightwatcher") is not None
    ww_backend = ""
    alpha_body = alpha_section(build_models(quick), device, repeats, have_ww)
    if quick:
        alpha_body += "\n\n*Smoke run (`--quick`): figures are not for quoting.*"
    alpha_out = None
    if args.out is not None:
        alpha_out = args.out.with_name(
            args.out.name.replace("bench_analyze", "bench_analyze_alpha", 1)
            if "bench_analyze" in args.out.name else f"{args.out.stem}_alpha{args.out.suffix}")
    write_section("bench_analyze_alpha", "Heavy-tailed α against WeightWatcher", alpha_body,
                  device=device, out=alpha_out)
    if args.alpha_only:
        return

    rows = ["| model | matrices | ours (analyze_state_dict) | bare svdvals loop | "
            "ours / bare | WeightWatcher analyze() | ours / WW | singular values vs WW |",
            "|---|---|---|---|---|---|---|---|"]
    for name, model in build_models(quick).items():
        model = model.to(device)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        weights = list(select_weight_matrices(sd).values())
        fns = {
            "ours": lambda sd=sd: analyze_state_dict(sd, energy=0.99),
            "bare": lambda w=weights: (bare_svdvals(w), sync(device)),
        }
        ww_cell, vs_ww, agree = "not installed", "–", "not installed"
        if have_ww:
            try:
                # a copy, on the same device: WeightWatcher copies the weights to the host itself
                ww_model = copy.deepcopy(model)
                agree = ww_agreement(ww_model, sd)
                ww_backend = ("torch CUDA, float16 weights" if ww_half_precision()
                              else "SciPy on the CPU")
                fns["ww"] = lambda m=ww_model: ww_analyze(m)
                # untimed pause after WeightWatcher: its NumPy/SciPy BLAS threads keep spinning
                # for a while after a call and would slow the next round's torch arm on a small
                # machine (measured: ours/bare 1.04× alone, 1.7× right after WeightWatcher)
                fns["_settle"] = lambda: time.sleep(0.2)
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a finding, not a crash
                ww_cell = "import failed" if isinstance(exc, ImportError) else "failed"
                agree = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        try:
            times = interleaved(fns, repeats=repeats, warmup=2, device=device)
        except Exception as exc:  # noqa: BLE001 - only the peer's arm can fail here
            if "ww" not in fns:
                raise
            fns.pop("ww")
            ww_cell = "failed"
            agree = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            times = interleaved(fns, repeats=repeats, warmup=2, device=device)
        ours_med = summary(times["ours"])[0]
        ratio = ratio_summary(times["ours"], times["bare"])
        if "ww" in times:
            ww_cell = fmt_ms(summary(times["ww"])[0])
            vs_ww = fmt_ratio(ratio_summary(times["ours"], times["ww"]))
        rows.append(
            f"| {name} | {len(weights)} | {fmt_ms(ours_med)} | {fmt_ms(summary(times['bare'])[0])}"
            f" | {fmt_ratio(ratio)} | {ww_cell} | {vs_ww} | {agree} |"
        )

    body = "\n".join(rows)
    body += (
        f"\n\nMedians of {repeats} interleaved rounds (ours, bare, WeightWatcher) after warm-up "
        f"on `{device}`; ratios are medians (min–max) of per-round ratios. WeightWatcher "
        "`analyze()` with its default options"
        + (f" (its SVD backend here: {ww_backend})" if ww_backend else "")
        + ". Target: ours ≤ 1.2× bare kernels, below WeightWatcher's analyze(), and "
        "on a GPU ≥ 5× below it.\n\n"
        "### CLI start-up\n\n" + cli_startup(3 if quick else 7, with_torch=not quick)
    )
    if quick:
        body += "\n\n*Smoke run (`--quick`): figures are not for quoting.*"
    write_section("bench_analyze", "Checkpoint analysis (`lightning-spectral analyze`)", body,
                  device=device, out=args.out)


if __name__ == "__main__":
    main()
