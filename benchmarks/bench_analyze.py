"""Per-matrix checkpoint analysis: cost against bare singular-value kernels and WeightWatcher.

Issue 8, item 5. For each model's weight matrices we time, interleaved in one run:

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

Run: ``python benchmarks/bench_analyze.py [--quick] [--device cuda]``; writes
``benchmarks/results/bench_analyze.md``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
    sync,
    write_section,
)

from lightning_spectral.analysis import (  # noqa: E402
    analyze_state_dict,
    select_weight_matrices,
    weight_spectra,
)


def build_models(quick: bool) -> dict[str, nn.Module]:
    """Seeded models: the issue's 784-512-512-10 MLP, the digits CNN, 12 equal 256² blocks."""
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
    # under different conventions: SPEC.md §0.1 reshapes (out, in, kh, kw) to one
    # out × in·kh·kw matrix, WeightWatcher splits it into kh·kw slices of out × in, so their
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
    args = parser(__doc__.splitlines()[0]).parse_args()
    quick = args.quick
    repeats = args.repeats or (3 if quick else 9)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device} requested but CUDA is not available", file=sys.stderr)
        raise SystemExit(2)
    have_ww = importlib.util.find_spec("weightwatcher") is not None
    ww_backend = ""

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
        + ". Target (issue 8): ours ≤ 1.2× bare kernels, below WeightWatcher's analyze(), and "
        "on a GPU ≥ 5× below it.\n\n"
        "### CLI start-up\n\n" + cli_startup(3 if quick else 7, with_torch=not quick)
    )
    if quick:
        body += "\n\n*Smoke run (`--quick`): figures are not for quoting.*"
    write_section("bench_analyze", "Checkpoint analysis (`lightning-spectral analyze`)", body,
                  device=device, out=args.out)


if __name__ == "__main__":
    main()
