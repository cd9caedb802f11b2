"""Peak memory of a SpectralMonitor activation event.

An event holds the rows its hooks captured (``n × d`` per layer, at most ``max_samples`` rows)
and the working tensors of the spectra: each chunk of equal-shape layers is copied into one
working tensor in the working precision, its Gram matrices are formed and ``eigvalsh`` copies
them. ``memory_budget`` bounds the working memory of a chunk (by default half the size of the
captured rows, clamped to 32–256 MiB) and each layer's captured rows are released once copied,
so an event should peak at about its captured rows plus the budget — at most twice the rows,
plus one layer's working memory when a single layer needs more than the budget
(docs/performance.md, "Memory of an event").

Measured per arm in a fresh subprocess (the arms never share an allocator):

* **event**: ``Linear(w, w)`` layers on ``n`` random rows. Arm *forward*: one no-grad forward
  of the model. Arm *event*: the same forward with the monitor's capture on, then one
  activation event (``SpectralMonitor._emit``, no logger). Extra peak = peak RSS of *event*
  − peak RSS of *forward* (``resource.getrusage`` ``ru_maxrss``); both arms import the same
  modules and run the same warm-up (a tiny event, so the linear-algebra libraries are loaded
  in both). Once more with glibc's ``MALLOC_MMAP_THRESHOLD_=131072``: every block of 128 KiB
  or more is then mapped and returned to the system when freed, so the peak RSS follows the
  memory actually in use (with the default, glibc's adaptive threshold keeps some freed blocks
  of a few MiB in the heap, and the peak varies by tens of MiB from process to process). On
  CUDA: ``torch.cuda.max_memory_allocated`` over the capture and the event, less what was
  allocated before.
* **fit**: a Lightning fit of 3 optimizer steps on the same layers (MSE loss, SGD, batch =
  ``n`` rows) with ``SpectralMonitor(every_n_steps=1, weights=False, figures=False)`` against
  the same fit without it; the difference of the two processes' peak RSS (this includes the
  rows held from the forward to the end of the step, and the event).

Captured rows = ``Σ n·d·4`` bytes (float32). Reported: the extra peak and its ratio to the
captured rows, against the bound ``2 × captured + one layer's working memory``.

    python -m benchmarks.bench_memory [--quick] [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks._common import parser, write_section

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20

#: name -> (layers, width, rows)
CASES = {"24 × 1024²": (24, 1024, 1024), "4 × 4096²": (4, 4096, 1024)}
QUICK = {"24 × 1024²": (6, 256, 256), "4 × 4096²": (2, 1024, 256)}
#: memory_budget variants of the first case: None = the default
BUDGETS: dict[str, int | None] = {"default": None, "16 MiB": 16 * MIB, "unbounded": 2**62}


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _stand_in() -> Any:
    return SimpleNamespace(is_global_zero=True, loggers=[], world_size=1, callbacks=[],
                           callback_metrics={}, progress_bar_metrics={}, global_step=0)


def _monitor(budget: int | None, **kwargs: Any) -> Any:
    from lightning_spectral import SpectralMonitor

    if budget is not None:
        kwargs["memory_budget"] = budget
    return SpectralMonitor(weights=False, figures=False, **kwargs)


def _model(layers: int, width: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)


def _warm_up(device: str) -> None:
    """A tiny event: loads every library an event uses, in every arm alike."""
    model = _model(2, 16, device)
    trainer = _stand_in()
    monitor = _monitor(None)
    monitor.setup(trainer, model, "fit")
    capture = monitor._capture
    capture.start(seed=0)
    with torch.no_grad():
        model(torch.randn(32, 16, device=device))
    capture.stop()
    monitor._emit(trainer, 0, 0, capture.take())
    monitor.teardown(trainer, model, "fit")


def child_event(spec: dict[str, Any]) -> dict[str, Any]:
    """One arm of the event measurement (runs in its own process)."""
    layers, width, rows, device = spec["layers"], spec["width"], spec["rows"], spec["device"]
    torch.set_num_threads(spec["threads"])
    _warm_up(device)
    model = _model(layers, width, device)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(0)).to(device)
    trainer = _stand_in()
    monitor = _monitor(spec["budget"])
    monitor.setup(trainer, model, "fit")
    capture = monitor._capture
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    seconds = 0.0
    captured = 0
    if spec["arm"] == "forward":
        with torch.no_grad():
            model(x)
    else:
        capture.start(seed=0)
        with torch.no_grad():
            model(x)
        capture.stop()
        taken = capture.take()
        captured = sum(r.numel() * 4 for r in taken.values())
        t0 = time.perf_counter()
        monitor._emit(trainer, 0, 0, taken)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        del taken
    out = {"peak_rss": peak_rss(), "captured": captured, "seconds": seconds,
           "logged": len(trainer.callback_metrics)}
    if cuda:
        out["cuda_extra"] = torch.cuda.max_memory_allocated() - before
    return out


def child_fit(spec: dict[str, Any]) -> dict[str, Any]:
    """One arm of the fit measurement: 3 optimizer steps with or without the monitor."""
    import lightning.pytorch as pl
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    layers, width, rows, device = spec["layers"], spec["width"], spec["rows"], spec["device"]
    torch.set_num_threads(spec["threads"])
    _warm_up("cpu")

    class Stack(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = _model(layers, width, "cpu")

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self.body(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(rows, width, generator=g),
                         torch.randn(rows, width, generator=g))
    callbacks = [_monitor(spec["budget"], every_n_steps=1)] if spec["arm"] == "fit_monitor" else []
    trainer = pl.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                         max_steps=3, logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(Stack(), DataLoader(data, batch_size=rows))
    return {"peak_rss": peak_rss(), "logged": len(trainer.callback_metrics)}


#: the glibc setting under which the peak RSS follows the memory in use
MAPPED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    import os

    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--child",
                           json.dumps(spec)], capture_output=True, text=True, cwd=ROOT,
                          check=False, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"bench_memory child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def layer_bytes(width: int, rows: int) -> int:
    """One layer's working memory as the monitor estimates it (rows copy, Gram, eigvalsh)."""
    from lightning_spectral.callbacks.spectral import _layer_bytes

    return _layer_bytes(rows, width, 4, need_raw=True)


def fmt_mib(b: float) -> str:
    return f"{b / MIB:.0f} MiB" if abs(b) >= 10 * MIB else f"{b / MIB:.1f} MiB"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--child", default=None, help="internal: run one arm (JSON spec)")
    p.add_argument("--no-fit", action="store_true", help="skip the fit-level measurement")
    args = p.parse_args()
    if args.child is not None:
        spec = json.loads(args.child)
        out = child_fit(spec) if spec["arm"].startswith("fit") else child_event(spec)
        print(json.dumps(out))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench_memory: --device {args.device} but CUDA is not available")
    torch.set_num_threads(args.threads)  # what the children use, for the machine line
    repeats = args.repeats or (1 if args.quick else 3)
    cases = QUICK if args.quick else CASES
    lines = [
        "Extra peak memory of one activation event of `SpectralMonitor` (float32, all "
        "activation quantities, histogram distributions computed, no logger): "
        "`Linear(w, w)` layers, `n` rows captured per layer, peak RSS of a process that "
        "captures the rows and runs one event minus that of a process that runs the same "
        "forward without capturing (each arm its own process; median (min–max) over "
        f"{repeats} process pairs). *In use*: the same with glibc's "
        "`MALLOC_MMAP_THRESHOLD_=131072`, under which freed blocks go back to the system at "
        "once, so the peak follows the memory in use (one pair; it repeats to ±1 MiB); the "
        "default allocator keeps some freed blocks of a few MiB, hence the spread of the first "
        "column. *Bound*: 2 × captured + one layer's working memory (the monitor's own "
        "estimate: its rows' copy, the Gram matrices and `eigvalsh`'s copy). `memory_budget`: "
        "the working memory an event may use on top of the captured rows (default: half the "
        "rows' size clamped to 32–256 MiB); *unbounded*: every equal-shape group in one chunk, "
        "as before `memory_budget` existed, but with the event's other savings.",
        "",
        "| layers | rows per layer | `memory_budget` | captured | extra peak | extra / captured "
        "| in use | in use / captured | bound | event time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cuda_lines = []
    first = next(iter(cases))
    for name, (layers, width, rows) in cases.items():
        budgets = BUDGETS if name == first else {"default": None}
        for label, budget in budgets.items():
            base = {"layers": layers, "width": width, "rows": rows, "device": args.device,
                    "threads": args.threads, "budget": budget}
            extras, times, captured = [], [], 0
            cuda = []
            for _ in range(repeats):
                fwd = run_child({**base, "arm": "forward"})
                ev = run_child({**base, "arm": "event"})
                extras.append(ev["peak_rss"] - fwd["peak_rss"])
                times.append(ev["seconds"])
                captured = ev["captured"]
                if "cuda_extra" in ev:
                    cuda.append(ev["cuda_extra"])
            med = statistics.median(extras)
            in_use = (run_child({**base, "arm": "event"}, MAPPED)["peak_rss"]
                      - run_child({**base, "arm": "forward"}, MAPPED)["peak_rss"])
            bound = 2 * captured + layer_bytes(width, rows)
            lines.append(
                f"| {layers} × Linear({width}, {width}) | {rows} | {label} | "
                f"{fmt_mib(captured)} | {fmt_mib(med)} ({fmt_mib(min(extras))}–"
                f"{fmt_mib(max(extras))}) | {med / captured:.2f}× | {fmt_mib(in_use)} | "
                f"{in_use / captured:.2f}× | {fmt_mib(bound)} | "
                f"{statistics.median(times):.2f} s |"
            )
            print(lines[-1], flush=True)
            if cuda:
                cm = statistics.median(cuda)
                cuda_lines.append(f"| {name} | {label} | {fmt_mib(captured)} | {fmt_mib(cm)} | "
                                  f"{cm / captured:.2f}× |")
    if cuda_lines:
        lines += ["", "On the GPU (`torch.cuda.max_memory_allocated` over capture and event, "
                  "less what was allocated before):", "",
                  "| case | `memory_budget` | captured | extra peak | extra / captured |",
                  "|---|---|---|---|---|", *cuda_lines]
    if not args.no_fit:
        layers, width, rows = cases[first]
        base = {"layers": layers, "width": width, "rows": rows, "device": args.device,
                "threads": args.threads, "budget": None}
        plain = run_child({**base, "arm": "fit"})
        watched = run_child({**base, "arm": "fit_monitor"})
        captured = layers * width * rows * 4
        extra = watched["peak_rss"] - plain["peak_rss"]
        lines += [
            "",
            f"Whole fit ({layers} × Linear({width}, {width}), batch {rows}, 3 optimizer steps, "
            "MSE, SGD; `SpectralMonitor(every_n_steps=1, weights=False, figures=False)`, so "
            "every step has an activation event): peak RSS "
            f"{fmt_mib(watched['peak_rss'])} with the monitor, {fmt_mib(plain['peak_rss'])} "
            f"without: {fmt_mib(extra)} more, {extra / captured:.2f}× the "
            f"{fmt_mib(captured)} of captured rows.",
        ]
        print(lines[-1], flush=True)
    if args.quick:
        lines += ["", "_Smoke run (`--quick`): small layers, one process pair; not a result._"]
    write_section("bench_memory", "Peak memory of an event", "\n".join(lines),
                  device=args.device, out=args.out)


if __name__ == "__main__":
    main()
