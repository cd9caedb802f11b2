"""Shared benchmark machinery: machine description, interleaved timing, result files.

Every figure is a ratio measured side by side in one run: the compared callables are timed in
interleaved rounds (A, B, A, B, ...) after warm-up, and we report the median and spread of the
per-round ratios, which cancels most of the drift of a shared machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """The common command line: ``--quick``, ``--device``, ``--repeats``, ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; quick 3)")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write")
    return p


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str = "cpu") -> str:
    """One line: CPU model, cores, torch version and threads, GPU name if used, date."""
    gpu = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads){gpu}; "
        f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str = "cpu", inner: int = 1) -> float:
    """Seconds per call of ``fn`` (``inner`` calls between two synchronisations)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    device: str = "cpu",
    inner: int = 1,
) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, interleaved round by round, after ``warmup``."""
    for _ in range(warmup):
        for fn in fns.values():
            time_once(fn, device, inner)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device, inner))
    return times


def summary(samples: list[float]) -> tuple[float, float, float]:
    """``(median, min, max)``."""
    return statistics.median(samples), min(samples), max(samples)


def ratio_summary(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios ``num[i] / den[i]``."""
    ratios = [a / b for a, b in zip(num, den, strict=True) if b > 0]
    return summary(ratios)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def fmt_ratio(med_lo_hi: tuple[float, float, float]) -> str:
    med, lo, hi = med_lo_hi
    return f"{med:.3f}× ({lo:.3f}–{hi:.3f})"


def write_section(name: str, title: str, body: str, device: str = "cpu",
                  out: Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>.md`` (or ``out``) with a heading and the machine line."""
    path = out or RESULTS_DIR / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"## {title}\n\nMachine: {machine_line(device)}\n\n{body.rstrip()}\n"
    path.write_text(text, encoding="utf-8")
    print(text)
    return path


class WindowTimer:
    """Wall time from optimizer step ``start`` to step ``stop`` (measured at batch start).

    Placed first in the callback list, so the window holds the other callbacks' hooks of the
    batches ``start … stop − 1`` (batch start to batch end) and every epoch end in between.
    """

    def __init__(self, start: int, stop: int, device: str) -> None:
        self.start, self.stop, self.device = start, stop, device
        self.t0: float | None = None
        self.elapsed: float | None = None
        self.open = False

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.start and self.t0 is None:
            sync(self.device)
            self.t0 = time.perf_counter()
            self.open = True
        elif trainer.global_step == self.stop and self.elapsed is None and self.t0 is not None:
            sync(self.device)
            self.elapsed = time.perf_counter() - self.t0
            self.open = False
            trainer.should_stop = True
