"""Assemble benchmarks/RESULTS.md from the sections the benchmark scripts wrote.

Each ``benchmarks/bench_*.py`` writes ``benchmarks/results/<script>.md`` (and, on a GPU,
``<script>.cuda.md``); this script joins them in a fixed order under one header that names the
machine (CPU model, cores, torch version and threads, GPU), the date, and the state of every
peer the benchmarks compare against (installed version, or why it is missing or fails to
import). Run it after the benchmarks; ``make bench`` (``run_all.py``) does both.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.metadata as md
import io
import os
import platform
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

ORDER = [
    "bench_functional",
    "bench_scaling",
    "bench_scaling_large",
    "bench_memory",
    "bench_overhead",
    "bench_callbacks",
    "bench_penalty",
    "bench_collapse",
    "bench_gate",
    "bench_curvature",
    "bench_analyze",
    "bench_mirrors",
    "strategies",
]

#: (import name, distribution name, what it is compared for)
PEERS = [
    ("weightwatcher", "weightwatcher", "`analyze` vs `WeightWatcher.analyze()` (bench_analyze)"),
    ("pyhessian", "PyHessian", "Hessian λ_max and trace (bench_curvature)"),
    ("backpack", "backpack-for-pytorch", "needed by Cockpit"),
    ("cockpit", "cockpit-for-pytorch", "Hessian max eigenvalue and trace overhead "
                                       "(bench_curvature)"),
]

HEADER = """# Benchmark results

Produced by `make bench` (`benchmarks/run_all.py` runs every `benchmarks/bench_*.py`, on the CPU
and again on CUDA when a GPU is present; `benchmarks/collect.py` joins their sections here). Every
figure is a ratio of things timed side by side, interleaved, in one run: the median of the
per-round ratios with their range (min–max), over ≥ 5 timed rounds after warm-up (`--quick` smoke
runs use 3 and say so). Absolute times are context for the machine named in each section.
What the figures mean for a user, and how to choose `every_n_steps` and `max_samples`:
[docs/performance.md](../docs/performance.md).
"""


def peer_rows() -> list[str]:
    rows = ["| peer | installed | import | used for |", "|---|---|---|---|"]
    for module, dist, purpose in PEERS:
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            rows.append(f"| {dist} | not installed | — | {purpose} |")
            continue
        try:
            # some peers print banners on import; keep this script's output to its own lines
            with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
                  contextlib.redirect_stderr(io.StringIO())):
                warnings.simplefilter("ignore")
                importlib.import_module(module)
            state = "ok"
        except Exception as exc:  # noqa: BLE001 - a peer's failure is what we report
            state = f"import failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(f"| {dist} | {version} | {state} | {purpose} |")
    return rows


def machine_rows() -> list[str]:
    from benchmarks._common import cpu_model

    try:
        import torch

        torch_line = f"{torch.__version__} ({torch.get_num_threads()} threads by default)"
        gpu = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
               if torch.cuda.is_available() else
               "none — no CUDA device on this machine, so no GPU figures below")
    except ImportError:
        torch_line, gpu = "not installed", "unknown"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores ({platform.machine()})",
        f"- torch: {torch_line}",
        f"- GPU: {gpu}",
        f"- Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"- Assembled: {now}",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results", help="sections folder")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="file to write")
    args = p.parse_args(argv)
    found = {p.name.removesuffix(".md"): p for p in sorted(args.results.glob("*.md"))}
    names = []
    for base in ORDER + sorted({n.split(".")[0] for n in found} - set(ORDER)):
        names += [n for n in (base, f"{base}.cuda") if n in found]
    sections = [found[n].read_text(encoding="utf-8").strip() for n in names]
    missing = [n for n in ORDER if n not in found]
    parts = [HEADER, "## Machine", "", *machine_rows(), "", "## Peers", "",
             "Installed by `make bench` through the `bench` extra (Cockpit and BackPACK with "
             "`--no-deps`: BackPACK declares torchvision, which would replace the CPU torch). A "
             "peer that is missing or fails to import is listed here and in the section that "
             "needed it.", "", *peer_rows(), ""]
    if missing:
        parts += [f"**Missing sections** (script failed or was not run): {', '.join(missing)}", ""]
    text = "\n".join(parts) + "\n" + "\n\n".join(sections) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(sections)} sections)")


if __name__ == "__main__":
    main()
