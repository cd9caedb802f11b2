"""CollapseMonitor cost on the digits MLP, on long (211-step) epochs.

The digits training set (1,348 rows) is repeated ``REPEAT`` = 10 times per epoch (13,480 rows, 211
optimizer steps of 64 rows), the long-epoch case of ``bench_callbacks``. Three measurements, each
side by side and interleaved in one run:

1. **Per-batch work vs a plain PyTorch training epoch.** The same 211 optimizer steps (forward,
   cross-entropy, backward, Adam) with and without the monitor's per-batch work (label
   extraction, the gated pre-hook handing the head input to the monitor, the bulk flushes into the
   float64 class statistics and the row reservoir). This is the strictest ratio: no Lightning
   overhead dilutes it.
2. **Epoch-end computation** on one such epoch's statistics: ``compute()`` (all-reduce no-op,
   NC1–NC4 from the statistics and NC4 on the 4,096-row sample, MIR/HDR on that sample, in
   ms, in plain training steps and as a share of the plain epoch), and its parts, interleaved:
   ``collapse_from_stats`` (NC1–NC4), ``information_interplay`` (MIR/HDR) and, inside it, the
   float32 ``eigvalsh`` of the ``d·r``-sized Kronecker-side matrix (``d = 64``, ``r = C = 10``),
   which no exact rewriting makes smaller (docs/definitions.md#mir-hdr).
3. **Lightning ``Trainer.fit``** epochs with and without ``CollapseMonitor(source="train")``;
   the monitor's epoch end is excluded (its own timer) and listed after.
4. **One bulk update** (the work behind every 4,096 rows, ``max(1024, max_samples)``): a staging
   block's 64 batches through the monitor's sink, and, interleaved, its parts on the same
   4,096 × 64 block: the float64 class statistics (``Q = HᵀH`` is most of it), the reservoir's
   hash, and the reservoir update (hash, filter, copies) of a full sample.

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
from torch.utils.data import ConcatDataset, DataLoader

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
from lightning_spectral.functional.collapse import (
    CollapseStats,
    _collapse_update,
    collapse_from_stats,
)
from lightning_spectral.functional.interplay import information_interplay
from lightning_spectral.stats import RowReservoir

#: the digits training set is repeated this many times per epoch (as bench_callbacks' long epoch)
REPEAT = 10


def long_loader(batch_size: int = 64) -> DataLoader:
    """The digits training set repeated ``REPEAT`` times per epoch, shuffled by its own seed."""
    train, _ = digits_dataloaders(batch_size=batch_size, seed=0)
    return DataLoader(ConcatDataset([train.dataset] * REPEAT), batch_size=batch_size,
                      shuffle=True, generator=torch.Generator().manual_seed(0))


def plain_epoch_fns(device: str, max_batches: int | None = None):
    """Two callables: one epoch of plain training, with and without the monitor's batch work."""
    batches = [(x.to(device), y.to(device)) for x, y in long_loader()][:max_batches]
    torch.manual_seed(0)
    model_a = DigitsClassifier("mlp").to(device)
    model_b = DigitsClassifier("mlp").to(device)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-3)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-3)
    mon = CollapseMonitor(head="classifier")
    mon.setup(None, model_b, "fit")  # type: ignore[arg-type]  # no Trainer needed here
    epoch = [0]

    def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def plain() -> None:
        for x, y in batches:
            step(model_a, opt_a, x, y)

    def monitored() -> None:
        mon._start_epoch(SimpleNamespace(current_epoch=epoch[0]), model_b)
        epoch[0] += 1
        for x, y in batches:
            mon._begin_batch((x, y))
            step(model_b, opt_b, x, y)
            mon._end_batch(model_b)
        mon._flush()  # the epoch's last bulk update belongs to the per-batch cost

    return plain, monitored, mon, model_b, len(batches)


def epoch_end_parts(mon: CollapseMonitor, model: nn.Module, device: str, repeats: int
                    ) -> dict[str, list[float]]:
    """Interleaved timings of ``compute()`` and of its parts on the monitor's statistics."""
    acc, res = mon._acc, mon._reservoir
    assert acc is not None and res is not None
    rows, labels = res.gather()
    head = model.classifier
    weight, bias = head.weight.detach(), head.bias.detach()
    d, c = weight.shape[1], weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    factor = torch.randn(d * min(c, d), d * min(c, d), generator=gen).to(device)
    kron_side = factor @ factor.mT  # a PSD matrix of the eigenproblem's size and dtype
    return interleaved(
        {
            "compute": lambda: mon.compute(),
            "nc": lambda: collapse_from_stats(acc.stats, weight, bias, rows=rows,
                                              row_labels=labels, dtype=torch.float64,
                                              geometry=True),
            "interplay": lambda: information_interplay(rows, weight, labels,
                                                       dtype=torch.float32),
            "eigvalsh": lambda: torch.linalg.eigvalsh(kron_side),
        },
        repeats=repeats,
        warmup=2,
        device=device,
    )


def bulk_update_parts(device: str, repeats: int) -> tuple[int, dict[str, list[float]]]:
    """Interleaved timings of one staging block through the monitor's sink (64 batches of 64
    rows, the last one triggering the bulk update) and of the update's parts on such a block."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.relu(torch.randn(64, 64, generator=gen)).to(device),
                torch.randint(0, 10, (64,), generator=gen).to(device)) for _ in range(64)]
    model = DigitsClassifier("mlp").to(device)
    mon = CollapseMonitor(head="classifier")
    mon.setup(None, model, "fit")  # type: ignore[arg-type]  # no Trainer needed here
    mon._start_epoch(SimpleNamespace(current_epoch=0), model)

    def block() -> None:
        for h, y in batches:
            mon._pending_labels = y
            mon._on_rows("classifier", h)

    block()  # the statistics' and the reservoir's storage exist from here on
    rows32 = torch.cat([h for h, _ in batches])
    rows = rows32.to(torch.float64)
    labels = torch.cat([y for _, y in batches])
    stats = CollapseStats.zeros(10, 64, device=device)
    full = RowReservoir(4096, 64, device=device)
    full.update(rows32, labels, rows64=rows)

    def reservoir() -> None:
        full.update(rows32, labels, rows64=rows)

    return rows.shape[0], interleaved(
        {
            "block": block,
            "statistics": lambda: _collapse_update(rows, labels, stats),
            "hash": lambda: full.keys_for(rows, labels),
            "reservoir": reservoir,
        },
        repeats=repeats * 5,
        warmup=2,
        device=device,
    )


def lightning_epoch_times(
    device: str, epochs: int, repeats: int, max_batches: int | None = None
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

    def fit(with_monitor: bool) -> float:
        torch.manual_seed(0)
        model = DigitsClassifier("mlp")
        clock = EpochClock()
        callbacks: list[Any] = [clock]
        if with_monitor:
            callbacks.append(TimedMonitor(head="classifier"))  # after the clock: excluded
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
            trainer.fit(model, long_loader())
        # drop the first epoch (warm-up: lazy allocation, first-call dispatch)
        return statistics.median(clock.times[1:] or clock.times)

    fit(False), fit(True)  # warm-up
    plain_t, mon_t = [], []
    TimedMonitor.end_times = []
    for _ in range(repeats):
        plain_t.append(fit(False))
        mon_t.append(fit(True))
    return plain_t, mon_t, list(TimedMonitor.end_times)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    device = args.device
    repeats = args.repeats or (2 if args.quick else 7)
    max_batches = 30 if args.quick else None
    lines: list[str] = []

    # 1. plain PyTorch epochs, interleaved
    plain, monitored, mon, model, n_batches = plain_epoch_fns(device, max_batches)
    times = interleaved(
        {"plain": plain, "monitored": monitored},
        repeats=repeats,
        warmup=1 if args.quick else 2,
        device=device,
    )
    plain_epoch = summary(times["plain"])[0]
    per_step = plain_epoch / n_batches
    ratio = ratio_summary(times["monitored"], times["plain"])
    lines += [
        "### Per-batch work, plain PyTorch loop",
        "",
        f"Digits MLP 64-128-64-10, batch 64, the training set repeated {REPEAT}× per epoch "
        f"({n_batches} steps), {repeats} interleaved rounds (median, min–max).",
        "",
        "| | time per epoch | ratio to plain |",
        "|---|---|---|",
        f"| plain training | {fmt_ms(plain_epoch)} | 1 |",
        f"| + CollapseMonitor per-batch work | {fmt_ms(summary(times['monitored'])[0])} | "
        f"{fmt_ratio(ratio)} |",
        "",
        f"Overhead: **{(ratio[0] - 1) * 100:+.1f} %** of a plain epoch "
        f"({fmt_ms(per_step)} per plain step).",
        "",
    ]

    # 2. epoch-end computation on the statistics of one such epoch
    mon._start_epoch(SimpleNamespace(current_epoch=10_000), model)
    monitored_fill(mon, model, device, max_batches)
    assert mon._acc is not None
    total_rows = int(mon._acc.total())
    parts = epoch_end_parts(mon, model, device, repeats)
    end = parts["compute"]
    end_med = summary(end)[0]

    def row(name: str, what: str) -> str:
        med, lo, hi = summary(parts[name])
        return f"| {what} | {fmt_ms(med)} ({fmt_ms(lo)}–{fmt_ms(hi)}) | {med / end_med:.0%} |"

    d_r = model.classifier.in_features * min(10, model.classifier.in_features)
    lines += [
        "### Epoch-end computation",
        "",
        f"One epoch of digits features ({total_rows} rows, d = 64, C = 10; NC4, MIR and HDR on "
        f"the deterministic sample of {min(total_rows, mon.max_samples)} rows), "
        f"{repeats} interleaved rounds (median, min–max):",
        "",
        "| part | time | of `compute()` |",
        "|---|---|---|",
        row("compute", "`compute()`: all of it (statistics, sample, NC1–NC4, MIR/HDR)"),
        row("nc", "`collapse_from_stats`: NC1–NC4 (NC4 on the sample)"),
        row("interplay", "`information_interplay`: MIR/HDR on the sample"),
        row("eigvalsh", f"… of which `eigvalsh` of the {d_r}×{d_r} Kronecker side (float32)"),
        "",
        f"`compute()` = {end_med / per_step:.1f} plain training steps, once per epoch "
        f"({end_med / plain_epoch * 100:.2f} % of a plain epoch of {n_batches} steps).",
        "",
    ]

    # 4. one bulk update, before the fits (section 3 is written last)
    block_rows, bulk = bulk_update_parts(device, repeats)
    block_med = summary(bulk["block"])[0]

    def bulk_row(name: str, what: str) -> str:
        med, lo, hi = summary(bulk[name])
        return f"| {what} | {fmt_ms(med)} ({fmt_ms(lo)}–{fmt_ms(hi)}) | {med / block_med:.0%} |"

    bulk_lines = [
        "### One bulk update",
        "",
        f"{block_rows} rows × 64 features, 10 classes, {repeats * 5} interleaved rounds (median, "
        "min–max):",
        "",
        "| part | time | of the block |",
        "|---|---|---|",
        bulk_row("block", "64 batches through the sink, the last one updating in bulk"),
        bulk_row("statistics", "class statistics: counts, sums, `Q = HᵀH` (float64)"),
        bulk_row("hash", "reservoir hash of every row"),
        bulk_row("reservoir", "reservoir update of a full sample (hash, filter, copies)"),
        "",
    ]

    # 3. Lightning fit epochs
    epochs = 2 if args.quick else 4
    lt_plain, lt_mon, lt_end = lightning_epoch_times(device, epochs, repeats, max_batches)
    lratio = ratio_summary(lt_mon, lt_plain)
    lt_plain_med = summary(lt_plain)[0]
    end_lt = summary(lt_end)[0]
    lines += [
        "### Per-batch work and epoch end, Lightning `Trainer.fit`",
        "",
        f"Median training-epoch time over epochs 2–{epochs} of each fit ({n_batches} steps per "
        f"epoch), {repeats} interleaved fits each; the monitor's epoch end is excluded here and "
        "listed after.",
        "",
        "| | time per epoch | ratio to plain |",
        "|---|---|---|",
        f"| Trainer.fit | {fmt_ms(lt_plain_med)} | 1 |",
        f"| + CollapseMonitor (per-batch work) | {fmt_ms(summary(lt_mon)[0])} | "
        f"{fmt_ratio(lratio)} |",
        "",
        f"Per-batch overhead: **{(lratio[0] - 1) * 100:+.1f} %** median of per-fit ratios. "
        f"Epoch end inside Lightning (compute + checks + logging, no logger attached): median "
        f"{fmt_ms(end_lt)} (min {fmt_ms(min(lt_end))}, max {fmt_ms(max(lt_end))}) = "
        f"{end_lt / lt_plain_med * 100:.2f} % of a plain epoch.",
        "",
        *bulk_lines,
    ]
    write_section(
        "bench_collapse",
        "CollapseMonitor cost",
        "\n".join(lines),
        device=device,
        out=args.out,
    )


def monitored_fill(mon: CollapseMonitor, model: nn.Module, device: str,
                   max_batches: int | None = None) -> None:
    """One long epoch of digits features through the monitor's own capture (no grad)."""
    with torch.no_grad():
        for x, y in list(long_loader())[:max_batches]:
            x, y = x.to(device), y.to(device)
            mon._begin_batch((x, y))
            model(x)
            mon._end_batch(model)
    mon._flush()


if __name__ == "__main__":
    main()
