"""Per-matrix checkpoint analysis: cost against bare singular-value kernels and WeightWatcher.

Issue 8, item 5. For each model's weight matrices we time, interleaved in one run:

- ``ours``: :func:`lightning_spectral.analysis.analyze_state_dict` (singular values batched by
  equal shape, then σ_max, stable rank, effective rank, k(τ), Eckart–Young error, param ratio);
- ``bare``: ``torch.linalg.svdvals`` of each reshaped matrix in a Python loop (the kernels alone);
- ``weightwatcher``: ``WeightWatcher(model).analyze()`` on the same model in the same process,
  only when ``weightwatcher`` is importable (it is never installed by this project); its
  singular values are compared with ours to 1e-5 relative.

It also times the start-up of ``lightning-spectral analyze --help`` against a bare ``python -c
pass`` and ``python -c "import torch"`` (subprocesses, interleaved).

Run: ``python benchmarks/bench_analyze.py [--quick] [--device cuda]``; writes
``benchmarks/results/bench_analyze.md``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
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


def ww_compare(model: nn.Module, sd: dict, repeats: int) -> tuple[str, list[float]]:
    """Run WeightWatcher's analyze() and compare its largest singular values with ours."""
    import weightwatcher as ww  # type: ignore[import-not-found]

    watcher = ww.WeightWatcher(model=model)
    details = watcher.analyze()
    times = interleaved({"ww": lambda: ww.WeightWatcher(model=model).analyze()},
                        repeats=repeats, warmup=1)["ww"]
    # Compare the full singular spectrum of every dense (Linear) layer. Conv kernels are read
    # under different conventions: SPEC.md §0.1 reshapes (out, in, kh, kw) to one
    # out × in·kh·kw matrix, WeightWatcher splits it into kh·kw slices of out × in, so their
    # singular values are not the same quantity and are not compared.
    spectra = weight_spectra(select_weight_matrices(sd), dtype="float64")
    by_name = {name.removesuffix(".weight"): {"_svals": sv.numpy()} for name, sv in spectra.items()}
    dense = details[details["layer_type"].astype(str).str.contains("dense", case=False)]
    n_conv = len(details) - len(dense)
    worst = 0.0
    compared = 0
    for _, row in dense.iterrows():
        mine = by_name.get(str(row["longname"]))
        if mine is None:
            continue
        evals = np.asarray(watcher.get_ESD(layer=int(row["layer_id"])), dtype=float)
        theirs = np.sort(np.sqrt(np.clip(evals, 0, None)))[::-1]
        ours_sv = np.asarray(mine["_svals"], dtype=float)[: len(theirs)]
        top = max(float(ours_sv[0]), 1e-30)
        # relative to σ_max: tiny singular values carry float32 round-off of order ε·σ_max
        worst = max(worst, float(np.max(np.abs(theirs[: len(ours_sv)] - ours_sv)) / top))
        compared += 1
    verdict = "agree" if worst <= 1e-5 else "DISAGREE"
    text = (f"all singular values of {compared} dense layers {verdict} to {worst:.1e} "
            f"(relative to σ_max; limit 1e-5)")
    if n_conv:
        text += f"; {n_conv} conv layers not compared (WeightWatcher slices kernels per tap)"
    return text, times


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
        raise SystemExit("--device cuda requested but CUDA is not available")
    have_ww = importlib.util.find_spec("weightwatcher") is not None

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
        times = interleaved(fns, repeats=repeats, warmup=2, device=device)
        ours_med = summary(times["ours"])[0]
        ratio = ratio_summary(times["ours"], times["bare"])
        if have_ww and device == "cpu":
            try:
                agree, ww_times = ww_compare(model.cpu(), sd, repeats)
                ww_med = summary(ww_times)[0]
                ww_cell, vs_ww = fmt_ms(ww_med), f"{ours_med / ww_med:.3f}×"
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a finding, not a crash
                ww_cell, vs_ww, agree = "failed", "–", f"{type(exc).__name__}: {exc}"[:80]
        elif have_ww:
            ww_cell, vs_ww, agree = "CPU only", "–", "–"
        else:
            ww_cell, vs_ww, agree = "not installed", "–", "not installed"
        rows.append(
            f"| {name} | {len(weights)} | {fmt_ms(ours_med)} | {fmt_ms(summary(times['bare'])[0])}"
            f" | {fmt_ratio(ratio)} | {ww_cell} | {vs_ww} | {agree} |"
        )

    body = "\n".join(rows)
    body += (
        f"\n\nMedians of {repeats} interleaved rounds after warm-up on `{device}`; ratios are "
        "medians (min–max) of per-round ratios. Target (issue 8): ours ≤ 1.2× bare kernels, "
        "below WeightWatcher's analyze(), and on a GPU ≥ 5× below it.\n\n"
        "### CLI start-up\n\n" + cli_startup(3 if quick else 7, with_torch=not quick)
    )
    if quick:
        body += "\n\n*Smoke run (`--quick`): figures are not for quoting.*"
    write_section("bench_analyze", "Checkpoint analysis (`lightning-spectral analyze`)", body,
                  device=device, out=args.out)


if __name__ == "__main__":
    main()
