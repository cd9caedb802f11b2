"""What a SpectralMonitor event costs under DDP and under FSDP2 (``ModelParallelStrategy``).

Two CPU processes (gloo) train the same seeded stack of ``Linear(d, d) + ReLU`` layers
(``fully_shard`` on every Linear under FSDP2), batch ``n`` rows per rank, with a
``SpectralMonitor(every_n_steps=k, weights_every_n_steps=k, figures=False, histograms=False)``.
Rank zero times, over the optimizer steps of a window after warm-up:

- the monitor's own hook time per event (``on_train_batch_start`` + ``on_train_batch_end``,
  which include its collectives: the two ``all_gather`` of rows, and under FSDP2 one
  ``full_tensor`` gather per sharded weight);
- one plain training step (the window's wall time without the monitor, per step).

Each strategy's fits with and without the monitor alternate (plain, with, plain, with, …), and
the table reports medians over the fits with their range. Memory is stated from the algorithm,
not measured: under FSDP2 a weight event holds one whole weight matrix at a time on every rank
on top of its shards; under DDP none beyond the weights already replicated.

    python -m benchmarks.bench_strategies [--quick] [--repeats N]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import parser, write_section

WIDTH, DEPTH, ROWS, EVERY, STEPS, WARMUP = 512, 4, 256, 2, 24, 4
QUICK = dict(WIDTH=128, DEPTH=2, ROWS=64, STEPS=8, WARMUP=2)


def _worker(out: Path, kind: str, arm: str, width: int, depth: int, rows: int, steps: int,
            warmup: int) -> None:
    import torch.nn.functional as F
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_spectral import SpectralMonitor

    torch.set_num_threads(1)

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, 10)

        def configure_model(self) -> None:
            if isinstance(self.trainer.strategy, ModelParallelStrategy):
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for m in [*self.body, self.head]:
                    if isinstance(m, nn.Linear):
                        fully_shard(m, mesh=mesh)
                fully_shard(self, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Clock(Callback):
        def __init__(self, monitor: Any) -> None:
            self.t0: float | None = None
            self.window = 0.0
            self.hook = 0.0
            self.events = 0
            if monitor is not None:  # time the monitor's own hooks (rank zero's clock)
                for name in ("on_train_batch_start", "on_train_batch_end"):
                    original = getattr(monitor, name)

                    def timed(*a: Any, _f: Any = original, _n: str = name) -> None:
                        t = time.perf_counter()
                        _f(*a)
                        if a[0].global_step > warmup or (
                                _n == "on_train_batch_start" and a[0].global_step == warmup):
                            self.hook += time.perf_counter() - t

                    setattr(monitor, name, timed)

        def on_train_batch_start(self, trainer: Any, *a: Any) -> None:
            if trainer.global_step == warmup:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer: Any, *a: Any) -> None:
            if self.t0 is not None:
                self.window = time.perf_counter() - self.t0

    g = torch.Generator().manual_seed(0)
    n = rows * 2 * (steps + 1)
    x, y = torch.randn(n, width, generator=g), torch.randint(0, 10, (n,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=rows, shuffle=False)
    strategy = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                if kind == "fsdp2" else DDPStrategy())
    monitor = (SpectralMonitor(every_n_steps=EVERY, weights_every_n_steps=EVERY, figures=False,
                               histograms=False) if arm == "with" else None)
    clock = Clock(monitor)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=steps,
        callbacks=[clock] + ([monitor] if monitor is not None else []), logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(Net(), loader)
    if trainer.is_global_zero:
        events = sum(1 for s in range(warmup, steps) if s % EVERY == 0)
        out.write_text(json.dumps({"window": clock.window, "hook": clock.hook,
                                   "steps": steps - warmup, "events": events}))


def _run(kind: str, arm: str, sizes: dict[str, int]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_strategies", "--worker", str(out), kind,
               arm] + [str(sizes[k]) for k in ("WIDTH", "DEPTH", "ROWS", "STEPS", "WARMUP")]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
        return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        out, kind, arm, *nums = sys.argv[2:]
        width, depth, rows, steps, warmup = (int(v) for v in nums)
        _worker(Path(out), kind, arm, width, depth, rows, steps, warmup)
        return
    args = parser(__doc__.splitlines()[0]).parse_args()
    sizes = dict(WIDTH=WIDTH, DEPTH=DEPTH, ROWS=ROWS, STEPS=STEPS, WARMUP=WARMUP)
    if args.quick:
        sizes.update(QUICK)
    repeats = args.repeats or (1 if args.quick else 3)
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(repeats):
        for kind in ("ddp", "fsdp2"):
            for arm in ("plain", "with"):
                r = _run(kind, arm, sizes)
                key = f"{kind}/{arm}"
                results.setdefault(key, {}).setdefault("step", []).append(
                    r["window"] / r["steps"])
                if arm == "with":
                    results[key].setdefault("event", []).append(r["hook"] / r["events"])

    def med(v: list[float]) -> str:
        return f"{statistics.median(v) * 1e3:.3g} ms ({min(v) * 1e3:.3g}–{max(v) * 1e3:.3g})"

    rows = []
    for kind, label in (("ddp", "DDP"), ("fsdp2", "ModelParallelStrategy (FSDP2)")):
        plain = results[f"{kind}/plain"]["step"]
        event = results[f"{kind}/with"]["event"]
        in_steps = statistics.median(event) / statistics.median(plain)
        rows.append(f"| {label} | {med(plain)} | {med(event)} | {in_steps:.2f} |")
    w, d, n = sizes["WIDTH"], sizes["DEPTH"], sizes["ROWS"]
    body = (
        f"Two CPU processes (gloo, one thread each), {d} × `Linear({w}, {w}) + ReLU` and a "
        f"`Linear({w}, 10)` head, {n} rows per rank per step; `SpectralMonitor(every_n_steps="
        f"{EVERY}, weights_every_n_steps={EVERY}, figures=False, histograms=False)`, so every "
        "event computes both the activation spectra (the union of both ranks' rows) and the "
        f"weight spectra of all {d + 1} matrices. *Event*: the monitor's hook time per event on "
        "rank zero, collectives included; *plain step*: the training step without the monitor; "
        f"medians (range) over {repeats} fits per arm, the arms alternating.\n\n"
        "| strategy | plain step | event | event in plain steps |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n"
        "Memory: under FSDP2 a weight event gathers one whole matrix at a time on every rank "
        "(`DTensor.full_tensor()`), on top of the rank's shards, and frees it before the next; "
        "only rank zero keeps the singular values. Under DDP the event reads the replicated "
        "weights in place."
    )
    write_section("strategies", "SpectralMonitor under DDP and FSDP2 (CPU, 2 processes)", body,
                  out=args.out)


if __name__ == "__main__":
    main()
