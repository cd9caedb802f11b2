"""What SpectralMonitor costs a training run, and what one event costs.

Two measurements, each side by side and interleaved in one run (``benchmarks/_common.py``):

1. **Training overhead.** The same seeded Lightning fit with and without
   ``SpectralMonitor()`` at its defaults (``every_n_steps=100``, weights every 2,000 steps),
   alternating A, B, A, B, ... The timed window runs from optimizer step 1 to step
   ``1 + window`` (after set-up and the step-0 events), so it holds ``window / 100`` activation
   events and, for the MLP's 2,000-step window, exactly one weight event: the steady-state
   cost per step. Reported: the median of the per-pair ratios ``with / without``.
   Models: the digits MLP widened to 64-512-512-10 (an MNIST-sized 784-512-512-10 MLP, on
   digits' 64 inputs) and the digits CNN.
2. **Per-event cost against the bare kernels.** One activation event (rows already captured:
   normalisation, one batched Gram + ``eigvalsh`` per shape, VNE/erank/λ_max/κ, the logged
   distributions, one host transfer) against the bare ``matmul + eigvalsh`` of the same
   matrices; one weight event (``singular_values_many`` + stable rank, erank, σ₁, k(0.9),
   k(0.99), distributions, one host transfer) against bare ``svdvals`` of each weight. No
   logger is attached, so what is timed is computing, not writing.

    python -m benchmarks.bench_overhead [--quick] [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import shutil
import tempfile
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks._common import (
    WindowTimer,
    fmt_ms,
    fmt_ratio,
    interleaved,
    parser,
    ratio_summary,
    summary,
    write_section,
)


def make_model(arch: str) -> Any:
    from lightning_spectral.demos import DigitsClassifier

    torch.manual_seed(0)
    hidden = (512, 512) if arch == "mlp" else (128, 64)
    return DigitsClassifier(arch=arch, hidden=hidden)


def make_loader(arch: str, device: str) -> Any:
    from lightning_spectral.demos import digits_dataloaders

    train, _ = digits_dataloaders(batch_size=128 if arch == "mlp" else 64, image=arch == "cnn")
    return train


def fit_window(arch: str, window: int, with_monitor: bool, device: str) -> float:
    """Seconds for ``window`` optimizer steps of one fit (monitor at defaults or absent)."""
    import lightning.pytorch as pl

    from lightning_spectral import SpectralMonitor

    timer_cls = type("Timer", (WindowTimer, pl.Callback), {})
    timer = timer_cls(1, 1 + window, device)
    callbacks: list[Any] = [timer]
    if with_monitor:
        callbacks.insert(0, SpectralMonitor())
    # both arms log to TensorBoard, as a user's run would: the monitor's histograms and
    # (budgeted) figures are part of what it costs
    logdir = tempfile.mkdtemp(prefix="bench_overhead_")
    trainer = pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=window + 2,
        logger=pl.loggers.TensorBoardLogger(logdir, name="", version=""),
        log_every_n_steps=50,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    try:
        trainer.fit(make_model(arch), make_loader(arch, device))
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return float(timer.elapsed)


TRANSFORMER = {"vocab_size": 1000, "batch": 16, "seq": 32}


def make_transformer(device: str) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """``lightning.pytorch.demos.Transformer`` (2+2 layers, d = 200) on synthetic tokens."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=TRANSFORMER["vocab_size"]).to(device)
    g = torch.Generator().manual_seed(0)
    shape = (TRANSFORMER["batch"], TRANSFORMER["seq"])
    tokens = torch.randint(0, TRANSFORMER["vocab_size"], shape, generator=g).to(device)
    target = torch.randint(0, TRANSFORMER["vocab_size"], shape, generator=g).to(device)
    return model, (tokens, target)


def event_benchmark(arch: str, device: str, repeats: int, wide: int = 1024) -> dict[str, Any]:
    """Per-event cost of the monitor's computing vs the bare kernels, interleaved.

    ``arch="wide"``: three ``wide × wide`` Linear layers on ``wide`` random rows, where the
    kernels dominate and the fixed per-event overhead shows as the ratio's distance from 1.
    ``arch="transformer"``: the demo transformer of ``lightning.pytorch.demos`` on synthetic
    tokens (every token is a row). One training step (forward, loss, backward, SGD) of a copy
    of the model is timed in the same rounds, so an event can be priced in steps.
    """
    import copy

    from torch import nn
    from torch.nn import functional as F

    from lightning_spectral import SpectralMonitor
    from lightning_spectral.testing import count_host_syncs

    if arch == "wide":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(wide, wide), nn.ReLU(), nn.Linear(wide, wide), nn.ReLU(),
                              nn.Linear(wide, wide)).to(device)
        x = torch.randn(wide, wide, generator=torch.Generator().manual_seed(0)).to(device)
        target = torch.randn(wide, wide, generator=torch.Generator().manual_seed(1)).to(device)
        inputs: tuple[torch.Tensor, ...] = (x,)

        def loss_of(m: nn.Module) -> torch.Tensor:
            return F.mse_loss(m(x), target)
    elif arch == "transformer":
        model, (tokens, target) = make_transformer(device)
        inputs = (tokens, target)

        def loss_of(m: nn.Module) -> torch.Tensor:
            return F.nll_loss(m(tokens, target), target.reshape(-1))
    else:
        model = make_model(arch).to(device)
        x, y = next(iter(make_loader(arch, device)))
        x, y = x.to(device), y.to(device)
        inputs = (x,)

        def loss_of(m: nn.Module) -> torch.Tensor:
            return F.cross_entropy(m(x), y)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], world_size=1, callbacks=[])
    monitor = SpectralMonitor(figures=False)
    monitor.setup(trainer, model, "fit")
    capture = monitor._capture
    capture.start(seed=0)
    with torch.no_grad():
        model(*inputs)
    capture.stop()
    rows = capture.take()
    weights = [monitor._weight_layers[n].detach() for n in monitor._weight_layers]

    def act_event() -> None:
        monitor._emit(trainer, 0, rows)

    def act_bare() -> None:
        out = []
        for r in rows.values():
            z = r.float()
            gram = z @ z.mT if z.shape[0] <= z.shape[1] else z.mT @ z
            out.append(torch.linalg.eigvalsh(gram))
        torch.cat([o.reshape(-1) for o in out]).cpu()

    def weight_event() -> None:
        monitor._pending_weights = (0, monitor._weight_spectra(trainer))
        monitor._emit(trainer, 0, None)

    def weight_bare() -> None:
        torch.cat([torch.linalg.svdvals(w.reshape(w.shape[0], -1).float()) for w in weights]).cpu()

    student = copy.deepcopy(model).train()
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(student).backward()
        opt.step()

    times = interleaved(
        {"act_event": act_event, "act_bare": act_bare, "weight_event": weight_event,
         "weight_bare": weight_bare, "step": train_step},
        repeats=repeats, warmup=2, device=device, inner=5,
    )
    syncs = {}
    for name, fn in (("act", act_event), ("weight", weight_event)):
        with count_host_syncs(device) as counted:
            fn()
        syncs[name] = counted
    capture.remove()
    shapes = {n: tuple(r.shape) for n, r in rows.items()}
    return {"times": times, "shapes": shapes, "syncs": syncs,
            "weights": {n: tuple(w.shape) for n, w in zip(monitor._weight_layers, weights,
                                                           strict=True)}}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench_overhead: --device {args.device} but CUDA is not available")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    windows = {"mlp": 30 if args.quick else 2000, "cnn": 10 if args.quick else 1000}
    lines = [
        "Training overhead: `SpectralMonitor()` at its defaults (every 100 steps, weights every "
        "2,000) vs the same fit without it; wall time of the window of optimizer steps "
        "`[1, 1 + window)`, interleaved A/B fits, median (min–max) of per-pair ratios. Both "
        "arms log to a TensorBoardLogger, so histograms and the budgeted figures are included; "
        "the window starts after the first event, so the one-time start-up (importing "
        "matplotlib, the first figure: a few seconds) is excluded.",
        "",
        "| model | window (steps) | without | with | ratio with/without | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for arch in ("mlp", "cnn"):
        window = windows[arch]
        fit_window(arch, min(window, 20), False, args.device)  # warm-up (imports, allocator)
        plain, watched = [], []
        for _ in range(repeats):
            plain.append(fit_window(arch, window, False, args.device))
            watched.append(fit_window(arch, window, True, args.device))
        ratio = ratio_summary(watched, plain)
        lines.append(
            f"| {arch} | {window} | {fmt_ms(summary(plain)[0])} | {fmt_ms(summary(watched)[0])} "
            f"| {fmt_ratio(ratio)} | {100 * (ratio[0] - 1):+.2f} % |"
        )
        print(lines[-1], flush=True)
    wide = 256 if args.quick else 1024
    lines += [
        "",
        "Per-event cost (no logger attached: computing plus the one host transfer) vs the bare "
        "kernels on the same matrices, and vs one training step (forward, loss, backward, SGD "
        "on a copy of the model, same batch), all interleaved in the same rounds, 5 calls per "
        f"timing, median (min–max) of per-round ratios. `wide`: three {wide}×{wide} Linear "
        f"layers on {wide} random rows, where the kernels dominate. `transformer`: "
        "`lightning.pytorch.demos.Transformer` (2 encoder + 2 decoder layers, d = 200, "
        f"vocabulary {TRANSFORMER['vocab_size']}) on synthetic tokens, batch "
        f"{TRANSFORMER['batch']} × {TRANSFORMER['seq']} tokens = "
        f"{TRANSFORMER['batch'] * TRANSFORMER['seq']} rows per layer. *Syncs*: device-to-host "
        "synchronisations in one event, counted with `torch.cuda.set_sync_debug_mode('warn')` "
        "on CUDA; on CPU, the calls that would copy to the host (`.cpu()`, `.item()`, "
        "`.tolist()`, ...), by source line.",
        "",
        "| model | event | event time | bare kernels | event / bare | event / training step "
        "| syncs per event |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes_lines = []
    at_defaults = []
    for arch in ("mlp", "cnn", "transformer", "wide"):
        res = event_benchmark(arch, args.device, repeats, wide=wide)
        t = res["times"]
        per_step = {}
        for kind, bare in (("act", "`matmul`+`eigvalsh`"), ("weight", "`svdvals`")):
            ev, ba = t[f"{kind}_event"], t[f"{kind}_bare"]
            per_step[kind] = ratio_summary(ev, t["step"])
            lines.append(
                f"| {arch} | {'activations' if kind == 'act' else 'weights'} | "
                f"{fmt_ms(summary(ev)[0])} | {fmt_ms(summary(ba)[0])} ({bare}) | "
                f"{fmt_ratio(ratio_summary(ev, ba))} | {fmt_ratio(per_step[kind])} | "
                f"{res['syncs'][kind].describe()} |"
            )
            print(lines[-1], flush=True)
        shapes_lines.append(
            f"- `{arch}`: training step {fmt_ms(summary(t['step'])[0])}; activation rows "
            + ", ".join(f"{n} {r[0]}×{r[1]}" for n, r in res["shapes"].items())
            + f"; {len(res['weights'])} weights "
            + ", ".join(f"{n} {'×'.join(map(str, w))}" for n, w in res["weights"].items())
        )
        # defaults: activations every 100 steps, weights every 2,000
        est = per_step["act"][0] / 100 + per_step["weight"][0] / 2000
        at_defaults.append(f"| {arch} | {per_step['act'][0]:.2f} | {per_step['weight'][0]:.2f} "
                           f"| {100 * est:.2f} % |")
    lines += ["", "Shapes (rows captured per layer, n × d, and weights):", "", *shapes_lines]
    lines += [
        "",
        "What an event costs at the defaults (activations every 100 steps, weights every 2,000), "
        "in training steps of the same model on the same machine, from the medians above: "
        "overhead ≈ (activation event / step) / 100 + (weight event / step) / 2000. Logging "
        "(histograms, figures) is not in this estimate; the fit-level figures above and "
        "`bench_callbacks` include it.",
        "",
        "| model | activation event (steps) | weight event (steps) | overhead at defaults |",
        "|---|---|---|---|",
        *at_defaults,
    ]
    if args.quick:
        lines += ["", "_Smoke run (`--quick`): tiny windows and few repeats; not a result._"]
    write_section("bench_overhead", "SpectralMonitor overhead", "\n".join(lines),
                  device=args.device, out=args.out)


if __name__ == "__main__":
    main()
