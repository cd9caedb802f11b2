"""CollapseMonitor cost on the digits MLP.

Three measurements, each side by side and interleaved in one run:

1. **Per-batch accumulation vs a plain PyTorch training step.** The same epoch of optimizer steps
   (forward, cross-entropy, backward, Adam) with and without the monitor's per-batch work (label
   extraction, the gated pre-hook copying the head input, bulk flushes into the float64
   statistics and the row reservoir). This is the strictest ratio: no Lightning overhead dilutes
   it.
2. **Per-batch accumulation vs Lightning training.** ``Trainer.fit`` epochs with and without
   ``CollapseMonitor(source="train")``; the monitor's epoch-end computation is excluded (a
   timing callback placed before it stops the clock) and timed separately.
3. **Epoch-end computation** (all-reduce no-op, NC1–NC4 from the statistics, MIR/HDR on the row
   sample, one host transfer) on one epoch of digits features, in ms and in training steps.

Run ``python -m benchmarks.bench_collapse`` (``--quick`` for a smoke run, ``--device cuda``).
"""

from __future__ import annotations

import statistics
import time
import warnings
from types import SimpleNamespace
from typing import Any

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
from lightning_spectral.callbacks.collapse import CollapseMonitor
from lightning_spectral.demos import DigitsClassifier, digits_dataloaders


def plain_epoch_fns(
    device: str, batch_size: int, hidden: tuple[int, ...], max_batches: int | None = None
):
    """Two callables: one epoch of plain training, with and without the monitor's batch work."""
    train, _ = digits_dataloaders(batch_size=batch_size, seed=0)
    batches = [(x.to(device), y.to(device)) for x, y in train][:max_batches]
    torch.manual_seed(0)
    model_a = DigitsClassifier(hidden=hidden).to(device)
    model_b = DigitsClassifier(hidden=hidden).to(device)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-3)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-3)
    mon = CollapseMonitor(head="classifier")
    mon.setup(None, model_b, "fit")
    fake_trainer = SimpleNamespace(current_epoch=0)

    def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def plain() -> None:
        for x, y in batches:
            step(model_a, opt_a, x, y)

    def monitored() -> None:
        mon._start_epoch(fake_trainer, model_b)
        for x, y in batches:
            mon._begin_batch((x, y))
            step(model_b, opt_b, x, y)
            mon._end_batch()
        mon._flush()  # the epoch's last bulk update belongs to the per-batch cost

    return plain, monitored, mon, len(batches)


def lightning_epoch_times(
    device: str,
    epochs: int,
    repeats: int,
    hidden: tuple[int, ...],
    max_batches: int | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """Per-repeat seconds per training epoch (plain, monitored without its epoch end) and the
    monitor's epoch-end seconds, from interleaved ``Trainer.fit`` runs."""
    import lightning.pytorch as pl

    class EpochClock(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            self.times.append(time.perf_counter() - self._t0)

    class TimedMonitor(CollapseMonitor):
        end_times: list[float] = []

        def _finish_epoch(self, trainer: Any, pl_module: Any) -> None:
            sync(device)
            t0 = time.perf_counter()
            super()._finish_epoch(trainer, pl_module)
            sync(device)
            TimedMonitor.end_times.append(time.perf_counter() - t0)

    def fit(with_monitor: bool) -> tuple[float, list[float]]:
        train, _ = digits_dataloaders(batch_size=64, seed=0)
        torch.manual_seed(0)
        model = DigitsClassifier(hidden=hidden)
        clock = EpochClock()
        callbacks: list[Any] = [clock]
        if with_monitor:
            callbacks.append(TimedMonitor(head="classifier"))
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=callbacks,
            limit_train_batches=max_batches,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, train)
        # drop the first epoch (warm-up: lazy allocation, first-call dispatch)
        return statistics.median(clock.times[1:] or clock.times), TimedMonitor.end_times

    fit(False), fit(True)  # warm-up
    plain_t, mon_t = [], []
    TimedMonitor.end_times = []
    for _ in range(repeats):
        plain_t.append(fit(False)[0])
        mon_t.append(fit(True)[0])
    return plain_t, mon_t, list(TimedMonitor.end_times)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    device = args.device
    repeats = args.repeats or (2 if args.quick else 9)
    hidden = (128, 64)
    lines: list[str] = []

    # 1. plain PyTorch epochs, interleaved
    max_batches = 6 if args.quick else None
    plain, monitored, mon, n_batches = plain_epoch_fns(device, 64, hidden, max_batches)
    times = interleaved(
        {"plain": plain, "monitored": monitored},
        repeats=repeats,
        warmup=1 if args.quick else 3,
        device=device,
    )
    per_step = summary(times["plain"])[0] / n_batches
    ratio = ratio_summary(times["monitored"], times["plain"])
    lines += [
        "### Per-batch accumulation, plain PyTorch loop",
        "",
        f"Digits MLP 64-{hidden[0]}-{hidden[1]}-10, batch 64, {n_batches} steps per epoch, "
        f"{repeats} interleaved rounds (median, min–max).",
        "",
        "| | time per epoch | ratio to plain |",
        "|---|---|---|",
        f"| plain training | {fmt_ms(summary(times['plain'])[0])} | 1 |",
        f"| + CollapseMonitor per-batch work | {fmt_ms(summary(times['monitored'])[0])} | "
        f"{fmt_ratio(ratio)} |",
        "",
        f"Overhead: **{(ratio[0] - 1) * 100:+.1f} %** of a plain step "
        f"({fmt_ms(per_step)} per step).",
        "",
    ]

    # 3. epoch-end computation on one epoch of features (statistics already accumulated above)
    mon._start_epoch(SimpleNamespace(current_epoch=0), _ModelOnDevice(device))
    monitored_fill(mon, device)
    end = interleaved(
        {"epoch_end": lambda: mon.compute()}, repeats=repeats, warmup=1, device=device
    )["epoch_end"]
    end_med = summary(end)[0]
    lines += [
        "### Epoch-end computation",
        "",
        f"One epoch of digits features ({int(mon._acc.total())} rows, d = {hidden[1]}, "
        f"C = 10; NC4/MIR/HDR on all of them since max_samples = {mon.max_samples}):",
        "",
        f"- `compute()` median {fmt_ms(end_med)} (min {fmt_ms(min(end))}, max {fmt_ms(max(end))})"
        f" = {end_med / per_step:.1f} plain training steps, once per epoch "
        f"({end_med / (per_step * n_batches) * 100:.1f} % of a plain epoch of {n_batches} steps).",
        "",
    ]

    # 2. Lightning fit epochs
    epochs = 2 if args.quick else 6
    lt_plain, lt_mon, lt_end = lightning_epoch_times(device, epochs, repeats, hidden, max_batches)
    lratio = ratio_summary(lt_mon, lt_plain)
    lines += [
        "### Per-batch accumulation, Lightning `Trainer.fit`",
        "",
        f"Median training-epoch time over epochs 2–{epochs} of each fit, {repeats} interleaved "
        "fits each; the monitor's epoch-end computation is excluded here and listed after.",
        "",
        "| | time per epoch | ratio to plain |",
        "|---|---|---|",
        f"| Trainer.fit | {fmt_ms(summary(lt_plain)[0])} | 1 |",
        f"| + CollapseMonitor (per-batch work) | {fmt_ms(summary(lt_mon)[0])} | "
        f"{fmt_ratio(lratio)} |",
        "",
        f"Overhead: **{(lratio[0] - 1) * 100:+.1f} %** median of per-fit ratios, "
        f"{(summary(lt_mon)[0] / summary(lt_plain)[0] - 1) * 100:+.1f} % ratio of median epoch "
        "times (target ≤ 3 %). Epoch end inside "
        f"Lightning (compute + logging, no logger attached): median "
        f"{fmt_ms(summary(lt_end)[0])}.",
    ]
    write_section(
        "bench_collapse",
        "CollapseMonitor cost",
        "\n".join(lines),
        device=device,
        out=args.out,
    )


class _ModelOnDevice(nn.Module):
    def __init__(self, device: str) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1, device=device))

    @property
    def device(self) -> torch.device:
        return self.anchor.device


def monitored_fill(mon: CollapseMonitor, device: str) -> None:
    """Accumulate one full epoch of digits features through the monitor's own hook."""
    train, _ = digits_dataloaders(batch_size=64, seed=0)
    torch.manual_seed(0)
    model = DigitsClassifier().to(device)
    head = model.classifier
    handle = head.register_forward_pre_hook(mon._pre_hook)
    try:
        with torch.no_grad():
            for x, y in train:
                mon._begin_batch((x.to(device), y.to(device)))
                model(x.to(device))
                mon._end_batch()
        mon._flush()
        mon._head_module = head
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
