"""Step-time overhead of the VNE penalty, side by side with the plain step.

The penalty is defined in docs/definitions.md#vne-penalty.

For a batch of n = 256 rows and a penalised layer of width d ∈ {128, 512, 2048}, one training
step of ``x (n×128) → Linear(128, d) → ReLU → Linear(d, 10)`` with SGD is timed

* ``plain``: zero_grad, forward, cross-entropy, backward, optimizer step;
* ``penalty``: the same with ``− α · VNE(h)`` of the hidden layer added to the loss through
  :func:`lightning_spectral.callbacks.penalty.vne_penalty_term` — the exact function the
  ``VNEPenalty`` callback adds (float32 VNE on the smaller Gram side, the non-finite mask and
  its gradient hook included), so the ratio is the callback's cost without Lightning's own
  per-step overhead.

The two are interleaved round by round after warm-up; the table gives the median and range
of the per-round ratio ``penalty / plain``.

    python -m benchmarks.bench_penalty            # full (idle machine)
    python -m benchmarks.bench_penalty --quick    # smoke run
    python -m benchmarks.bench_penalty --device cuda
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
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
from lightning_spectral.callbacks.penalty import vne_penalty_term

ALPHA = 0.1


def make_step(d: int, n: int, device: str, penalty: bool, seed: int = 0) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(seed)
    encoder = nn.Linear(128, d)
    head = nn.Linear(d, 10)
    with torch.no_grad():
        for p in [*encoder.parameters(), *head.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    encoder.to(device)
    head.to(device)
    x = torch.randn(n, 128, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        h = torch.relu(encoder(x))
        loss = F.cross_entropy(head(h), y)
        if penalty:
            loss = loss + vne_penalty_term([h], ALPHA)[0]
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    n, widths = (64, [32, 128]) if args.quick else (256, [128, 512, 2048])
    repeats = args.repeats or (3 if args.quick else 7)
    rows = [
        "| d | Gram side | plain step | step + penalty | ratio penalty/plain |",
        "|---:|---|---:|---:|---:|",
    ]
    for d in widths:
        fns = {
            "plain": make_step(d, n, device, penalty=False),
            "penalty": make_step(d, n, device, penalty=True),
        }
        inner = 2 if args.quick else 5
        times = interleaved(fns, repeats=repeats, warmup=2, device=device, inner=inner)
        side = f"{min(n, d)}×{min(n, d)} ({'n×n' if n <= d else 'd×d'})"
        rows.append(
            f"| {d} | {side} | {fmt_ms(summary(times['plain'])[0])} | "
            f"{fmt_ms(summary(times['penalty'])[0])} | "
            f"{fmt_ratio(ratio_summary(times['penalty'], times['plain']))} |"
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            f"One SGD step of `x ({n}×128) → Linear(128, d) → ReLU → Linear(d, 10)`, plain vs "
            f"with `− {ALPHA}·VNE(h)` added (`vne_penalty_term`, as `VNEPenalty` adds it); "
            f"n = {n} rows, {repeats} interleaved rounds of {inner} steps after 2 warm-up "
            f"rounds, device `{device}`{' (quick smoke run)' if args.quick else ''}. "
            "Median step time, and the median (min–max) of the per-round ratios.",
            "",
            *rows,
        ]
    )
    write_section("bench_penalty", "VNE penalty: step-time overhead", body, device=device,
                  out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
