"""Cost of the functional core against the bare kernels it needs.

Three comparisons, each timed side by side and interleaved in one run (``_common.interleaved``),
reported as medians of per-round ratios with their range:

1. Per-layer spectrum, ``n = 256`` samples, ``d = 64 … 4096``: what a monitor does for one layer
   (``autocorrelation_eigvals`` with row normalisation, then the VNE and the effective rank of
   the result) against the bare kernels it needs: one matmul on the smaller Gram side and one
   ``torch.linalg.eigvalsh``. A naive version (explicit row normalisation and ``isfinite``
   guards on the ``n×d`` input, the straightforward way to write it) is timed alongside to show
   where overhead comes from. Target: ours <= 1.15× bare.
2. A dozen equal-size layers: the same per-layer computation in one batched call (stacking
   included) against a Python loop over the layers (target: batched faster than the loop), and
   against the bare batched kernels.
3. Weights: ``singular_values`` against bare ``torch.linalg.svdvals`` on the same matrix, and
   ``singular_values_many`` on a dozen equal-shape weights against a loop of ``singular_values``.
4. Accumulation of the Gram product, tall and wide layers: the same per-layer computation with
   the Gram formed as the library does (float32 chunks of ``4·min(n, d)`` terms added in
   float64, or a float64 product for sides below 32) against a plain float32 product (how the
   spectrum was formed before; its round-off grows with ``max(n, d)``), and against the float64
   product the library falls back to when float32 matmuls may be TF32/bfloat16.

Run ``python -m benchmarks.bench_functional [--quick] [--device cuda] [--threads N]``; writes
``benchmarks/results/bench_functional.md``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from benchmarks._common import (
    fmt_ms,
    fmt_ratio,
    interleaved,
    parser,
    ratio_summary,
    time_once,
    write_section,
)
from lightning_spectral.functional._utils import apply_cutoff, entropy_of_spectrum
from lightning_spectral.functional.spectrum import (
    autocorrelation_eigvals,
    effective_rank,
    vne,
)
from lightning_spectral.functional.weights import (
    singular_values,
    singular_values_many,
)

N = 256
LAYERS = 12
TARGET = 1.15


BUDGET = 0.02  # seconds per timed sample (quick: 0.005)


def inner_for(fn: Callable[[], object], device: str) -> int:
    """Calls per timed sample so that one sample lasts about ``BUDGET`` seconds."""
    fn()
    t = time_once(fn, device)
    return max(1, min(200, int(BUDGET / max(t, 1e-7))))


def ours_layer(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer as the monitor computes it: spectrum, VNE and erank of that spectrum."""
    lam = autocorrelation_eigvals(h)
    return entropy_of_spectrum(apply_cutoff(lam)), effective_rank(lam)


def bare_layer(h: torch.Tensor) -> torch.Tensor:
    """The kernels the monitor cannot avoid: one matmul (smaller side) and one eigvalsh."""
    g = h @ h.mT if h.shape[-2] <= h.shape[-1] else h.mT @ h
    return torch.linalg.eigvalsh(g)


def naive_layer(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward version: normalise the n×d rows, guard them with isfinite passes."""
    n = h.shape[-2]
    bad = ~torch.isfinite(h).all(dim=-1).all(dim=-1)
    h = torch.where(torch.isfinite(h), h, torch.zeros_like(h))
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    keep = norm >= 1e-12
    z = torch.where(keep, h / torch.where(keep, norm, torch.ones_like(norm)), torch.zeros_like(h))
    g = z @ z.mT if n <= h.shape[-1] else z.mT @ z
    lam = torch.linalg.eigvalsh(g / n).flip(-1)
    lam = torch.where(bad[..., None], torch.full_like(lam, math.nan), lam)
    return entropy_of_spectrum(apply_cutoff(lam)), effective_rank(lam)


def plain_float32_layer(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-layer computation with a plain float32 Gram product (the previous formation)."""
    n, d = h.shape[-2], h.shape[-1]
    if n <= d:
        g = h @ h.mT
        sq = g.diagonal(dim1=-2, dim2=-1)
        inv = sq.masked_fill(sq < 1e-24, math.inf).rsqrt()
        g = g * (inv.unsqueeze(-1) * inv.unsqueeze(-2))
    else:
        norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        z = h * norm.masked_fill(norm < 1e-12, math.inf).reciprocal()
        g = z.mT @ z
    lam = torch.linalg.eigvalsh(g).flip(-1) / n
    return entropy_of_spectrum(apply_cutoff(lam)), effective_rank(lam)


class _LoweredFloat32Matmuls:
    """Within: ``torch.set_float32_matmul_precision("high")``, so the library takes its float64
    fallback (on CPU the float32 matmuls themselves are unchanged)."""

    def __enter__(self) -> None:
        self.before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")

    def __exit__(self, *exc: object) -> None:
        torch.set_float32_matmul_precision(self.before)


def float64_product_layer(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _LoweredFloat32Matmuls():
        return ours_layer(h)


def rank_one_error(n: int, d: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """``|VNE|`` of a rank-one batch with positive entries (exact value 0)."""
    gen = torch.Generator().manual_seed(n + d)
    h = (torch.rand(n, 1, generator=gen) + 0.5) * (torch.rand(1, d, generator=gen) + 0.5)
    return abs(float(fn(h)))


def bench_accumulation(shapes: list[tuple[int, int]], device: str, repeats: int,
                       gen: torch.Generator) -> str:
    lines = [
        row(["n×d", "plain float32 Gram", "ours", "ours / plain", "float64 product / plain",
             "VNE of rank one: plain", "ours"]),
        row(["---"] * 7),
    ]
    for n, d in shapes:
        h = torch.randn(n, d, generator=gen).to(device)
        fns = {
            "plain": lambda h=h: plain_float32_layer(h),
            "ours": lambda h=h: ours_layer(h),
            "f64": lambda h=h: float64_product_layer(h),
        }
        inner = inner_for(fns["plain"], device)
        t = interleaved(fns, repeats=repeats, device=device, inner=inner)
        err_plain = rank_one_error(n, d, lambda x: plain_float32_layer(x.to(device))[0])
        err_ours = rank_one_error(n, d, lambda x: vne(x.to(device)))
        lines.append(row([
            f"{n}×{d}", fmt_ms(statistics.median(t["plain"])),
            fmt_ms(statistics.median(t["ours"])),
            fmt_ratio(ratio_summary(t["ours"], t["plain"])),
            fmt_ratio(ratio_summary(t["f64"], t["plain"])),
            f"{err_plain:.1e}", f"{err_ours:.1e}",
        ]))
        print(lines[-1], flush=True)
    return "\n".join(lines)


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def bench_layers(dims: list[int], device: str, repeats: int, gen: torch.Generator) -> str:
    lines = [
        row(["d", "bare (matmul + eigvalsh)", "ours", "ours / bare", "naive / bare"]),
        row(["---"] * 5),
    ]
    for d in dims:
        h = torch.randn(N, d, generator=gen).to(device)
        fns = {
            "bare": lambda h=h: bare_layer(h),
            "ours": lambda h=h: ours_layer(h),
            "naive": lambda h=h: naive_layer(h),
        }
        inner = inner_for(fns["bare"], device)
        t = interleaved(fns, repeats=repeats, device=device, inner=inner)
        lines.append(row([
            str(d), fmt_ms(statistics.median(t["bare"])), fmt_ms(statistics.median(t["ours"])),
            fmt_ratio(ratio_summary(t["ours"], t["bare"])),
            fmt_ratio(ratio_summary(t["naive"], t["bare"])),
        ]))
        print(lines[-1], flush=True)
    return "\n".join(lines)


def bench_batched(dims: list[int], device: str, repeats: int, gen: torch.Generator) -> str:
    lines = [
        row(["d", f"loop over {LAYERS} layers", "one batched call (stack included)",
             "batched / loop", "bare batched", "batched / bare batched"]),
        row(["---"] * 6),
    ]
    for d in dims:
        hs = [torch.randn(N, d, generator=gen).to(device) for _ in range(LAYERS)]

        def loop(hs: list[torch.Tensor] = hs) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [ours_layer(h) for h in hs]

        def batched(hs: list[torch.Tensor] = hs) -> tuple[torch.Tensor, torch.Tensor]:
            return ours_layer(torch.stack(hs))

        def bare(hs: list[torch.Tensor] = hs) -> torch.Tensor:
            return bare_layer(torch.stack(hs))

        torch.testing.assert_close(
            torch.stack([autocorrelation_eigvals(h) for h in hs]),
            autocorrelation_eigvals(torch.stack(hs)), atol=1e-5, rtol=1e-4,
        )
        inner = inner_for(loop, device)
        t = interleaved({"loop": loop, "batched": batched, "bare": bare}, repeats=repeats,
                        device=device, inner=inner)
        lines.append(row([
            str(d), fmt_ms(statistics.median(t["loop"])), fmt_ms(statistics.median(t["batched"])),
            fmt_ratio(ratio_summary(t["batched"], t["loop"])),
            fmt_ms(statistics.median(t["bare"])),
            fmt_ratio(ratio_summary(t["batched"], t["bare"])),
        ]))
        print(lines[-1], flush=True)
    return "\n".join(lines)


def bench_weights(shapes: list[tuple[int, ...]], device: str, repeats: int,
                  gen: torch.Generator) -> str:
    lines = [
        row(["weight", "bare svdvals", "singular_values", "ours / bare",
             f"loop of {LAYERS}", f"singular_values_many({LAYERS})", "many / loop"]),
        row(["---"] * 7),
    ]
    for shape in shapes:
        ws = [torch.randn(*shape, generator=gen).to(device) for _ in range(LAYERS)]
        w0, m0 = ws[0], ws[0].reshape(shape[0], -1)
        single = {
            "bare": lambda m0=m0: torch.linalg.svdvals(m0),
            "ours": lambda w0=w0: singular_values(w0),
        }
        t1 = interleaved(single, repeats=repeats, device=device,
                         inner=inner_for(single["bare"], device))
        many = {
            "loop": lambda ws=ws: [singular_values(w) for w in ws],
            "many": lambda ws=ws: singular_values_many(ws),
        }
        t2 = interleaved(many, repeats=repeats, device=device,
                         inner=inner_for(many["loop"], device))
        lines.append(row([
            "×".join(map(str, shape)), fmt_ms(statistics.median(t1["bare"])),
            fmt_ms(statistics.median(t1["ours"])), fmt_ratio(ratio_summary(t1["ours"], t1["bare"])),
            fmt_ms(statistics.median(t2["loop"])), fmt_ms(statistics.median(t2["many"])),
            fmt_ratio(ratio_summary(t2["many"], t2["loop"])),
        ]))
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                   "torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch.cuda.is_available() is False")
    repeats = args.repeats or (3 if args.quick else 7)
    global BUDGET
    if args.quick:
        BUDGET = 0.005
    dims = [64, 128, 256, 512] if args.quick else [64, 128, 256, 512, 1024, 2048, 4096]
    batch_dims = [64, 256] if args.quick else [64, 256, 1024]
    w_shapes: list[tuple[int, ...]] = (
        [(64, 64), (128, 64, 3, 3)] if args.quick
        else [(64, 64), (256, 256), (512, 512), (1024, 1024), (128, 64, 3, 3), (256, 128, 3, 3)]
    )
    acc_shapes = (
        [(4096, 8), (4096, 64), (256, 1024)] if args.quick
        else [(4096, 8), (4096, 64), (16384, 64), (4096, 256), (16384, 512), (256, 1024),
              (256, 4096), (512, 4096)]
    )
    gen = torch.Generator().manual_seed(0)

    print(f"per-layer spectrum, n = {N}", flush=True)
    layers = bench_layers(dims, device, repeats, gen)
    print(f"{LAYERS} equal layers: batched vs loop", flush=True)
    batched = bench_batched(batch_dims, device, repeats, gen)
    print("weights", flush=True)
    weights = bench_weights(w_shapes, device, repeats, gen)
    print("accumulation of the Gram product", flush=True)
    accumulation = bench_accumulation(acc_shapes, device, repeats, gen)

    quick = " (quick smoke run: small sizes, few rounds)" if args.quick else ""
    body = f"""
Float32 on `{device}`, {repeats} interleaved rounds after 2 warm-up rounds; each cell of a ratio
column is the median (min–max) of the per-round ratios{quick}.

**Per-layer spectrum** (n = {N} rows): *ours* = `autocorrelation_eigvals` (row normalisation,
NaN guard, smaller Gram side) + VNE + effective rank of the result, as a monitor computes one
layer; *bare* = one matmul on the smaller Gram side + one `torch.linalg.eigvalsh`, nothing else.
*naive* normalises and `isfinite`-guards the n×d input explicitly (the straightforward way). Target:
ours / bare <= {TARGET}.

{layers}

**Batching** {LAYERS} equal-size layers (n = {N}): the per-layer computation above (spectrum,
VNE, erank) in one batched call (`torch.stack` included), against a Python loop over the layers
(target: batched / loop < 1) and against the bare batched kernels (stack, one batched matmul,
one batched `eigvalsh`), which is how `SpectralMonitor` pays for its overhead.

{batched}

**Weights**: `singular_values` (reshape, NaN guard) against bare `torch.linalg.svdvals` on the
same matrix; `singular_values_many` on {LAYERS} equal-shape weights against a loop of
`singular_values`.

{weights}

**Accumulation of the Gram product** (tall and wide layers): the per-layer computation above
with the Gram formed as the library does (*ours*: float32 chunks of `4·min(n, d)` terms added
in float64; sides below 32 as one float64 product) against a *plain float32* product, the
previous formation, whose round-off grows with `max(n, d)`; and the *float64 product* the
library uses when float32 matmuls may be TF32/bfloat16 (autocast, lowered matmul precision).
The last two columns are the VNE of a rank-one batch with positive entries (exact value 0).

{accumulation}
"""
    write_section("bench_functional", "Functional core vs bare kernels (bench_functional.py)",
                  body, device=device, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
