"""Cost of the 1-D Lasso certificate (docs/definitions.md#mirrors): dictionary size, solve time.

Measures, for n points at depth 2 (P ≤ n columns) and depth 3 (P ≤ 1.5 n² columns), the time
of ``reflection_dictionary`` and of ``lasso_mirror_fit`` (interior point on a working set, to a
relative duality gap of 1e-9), interleaved round by round, and the time of one certificate
event (the float64 network objective) relative to one training step of the network. The solver
runs on the host in float64 NumPy whatever ``--device`` says; ``--device cuda`` moves the
network (and the event/step comparison) to the GPU.

    python -m benchmarks.bench_mirrors --quick      # smoke run
    python -m benchmarks.bench_mirrors              # n up to 200 at depth 3
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks._common import (
    fmt_ms,
    interleaved,
    parser,
    ratio_summary,
    summary,
    write_section,
)
from lightning_spectral.functional.mirrors import (
    MirrorNet,
    lasso_mirror_fit,
    network_objective,
    reflection_dictionary,
)


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(-1, 1, n))
    y = np.sin(4 * x) + 0.1 * rng.standard_normal(n)
    return x, y


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--beta", type=float, default=0.01)
    args = p.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = [10, 25] if args.quick else [25, 50, 100, 200]
    lines = [
        f"`lasso_mirror_fit` to relative duality gap 1e-9, β = {args.beta:g}, y = sin(4x) + "
        "noise, x uniform in [−1, 1]; medians (min–max) of "
        f"{repeats} interleaved rounds after warm-up.",
        "",
        "| n | depth | features P | dictionary | Lasso solve | solve / depth-2 solve | "
        "rel. gap | active |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        x, y = data(n)
        fits = {d: lasso_mirror_fit(x, y, args.beta, d) for d in (2, 3)}
        fns = {
            "dict2": lambda x=x: reflection_dictionary(x, 2),
            "dict3": lambda x=x: reflection_dictionary(x, 3),
            "fit2": lambda x=x, y=y: lasso_mirror_fit(x, y, args.beta, 2),
            "fit3": lambda x=x, y=y: lasso_mirror_fit(x, y, args.beta, 3),
        }
        times = interleaved(fns, repeats=repeats, warmup=1)
        for d in (2, 3):
            f = fits[d]
            med_d = summary(times[f"dict{d}"])
            med_f = summary(times[f"fit{d}"])
            ratio = ratio_summary(times[f"fit{d}"], times["fit2"])
            lines.append(
                f"| {n} | {d} | {f.params.shape[0]} | {fmt_ms(med_d[0])} | "
                f"{fmt_ms(med_f[0])} ({fmt_ms(med_f[1])}–{fmt_ms(med_f[2])}) | "
                f"{ratio[0]:.1f}× ({ratio[1]:.1f}–{ratio[2]:.1f}) | "
                f"{f.gap / f.objective:.1e} | {f.support.numel()} |"
            )
        print(lines[-1], flush=True)

    # one certificate event vs one training step (n = largest size, depth 3, width 64)
    n = sizes[-1]
    x, y = data(n)
    dev = args.device
    net = MirrorNet(64, 3, generator=torch.Generator().manual_seed(0)).to(dev)
    xt = torch.tensor(x, dtype=torch.float32, device=dev)
    yt = torch.tensor(y, dtype=torch.float32, device=dev)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        network_objective(net, xt, yt, args.beta).backward()
        opt.step()

    def event() -> None:
        with torch.no_grad():
            float(network_objective(net, xt, yt, args.beta, dtype=torch.float64))

    t = interleaved({"step": step, "event": event}, repeats=repeats, device=dev, inner=10)
    r = ratio_summary(t["event"], t["step"])
    lines += [
        "",
        f"One certificate event (float64 objective of a width-64 depth-3 net on n = {n}) costs "
        f"{r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f}) one training step "
        f"({fmt_ms(summary(t['step'])[0])} per step on {dev}). The Lasso is solved once per "
        "data set, not per event.",
    ]
    write_section("bench_mirrors", "Mirrors: Lasso certificate cost",
                  "\n".join(lines), device=dev, out=args.out)


if __name__ == "__main__":
    main()
