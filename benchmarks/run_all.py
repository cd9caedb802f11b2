"""Run every ``benchmarks/bench_*.py`` (on CPU, and again on CUDA when a GPU is present), then
assemble ``benchmarks/RESULTS.md`` with ``collect.py``. This is what ``make bench`` runs.

A script that fails is reported (its name, exit code and the last lines it printed) and the
others still run; the exit status is 1 if any failed. Extra arguments are passed to every
script (e.g. ``--quick`` for a smoke run of the whole set).

    python -m benchmarks.run_all [--quick] [--only NAME ...] [--no-cuda]

Each script runs as a module of the ``benchmarks`` package (``python -m benchmarks.bench_x``,
from the repository root), so the scripts import ``benchmarks._common`` without path edits.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
#: scripts that have no device dimension (they read files or run on the host by design)
CPU_ONLY = {"bench_gate"}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def run(script: Path, extra: list[str], device: str) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", f"{HERE.name}.{script.stem}", "--device", device, *extra]
    if device != "cpu":
        cmd += ["--out", str(RESULTS / f"{script.stem}.{device.replace(':', '')}.md")]
    print(f"== {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT)
    elapsed = time.perf_counter() - t0
    sys.stdout.write(proc.stdout)
    tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
    return proc.returncode, elapsed, tail


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="script names (e.g. bench_gate)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA pass even with a GPU")
    args, extra = p.parse_known_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {n.removesuffix(".py") for n in args.only}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            print(f"run_all: no such benchmark: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        scripts = [s for s in scripts if s.stem in wanted]
    devices = ["cpu"]
    if not args.no_cuda and cuda_available():
        devices.append("cuda")
    else:
        print("run_all: no CUDA device here; GPU figures are not produced", flush=True)
    failures, timings = [], []
    for device in devices:
        for script in scripts:
            if device != "cpu" and script.stem in CPU_ONLY:
                continue
            rc, elapsed, tail = run(script, extra, device)
            timings.append(f"{script.stem} [{device}] {elapsed:.0f} s" + ("" if rc == 0 else
                                                                           f" FAILED ({rc})"))
            if rc != 0:
                failures.append(f"{script.name} --device {device}: exit {rc}\n{tail}")
    subprocess.run([sys.executable, "-m", f"{HERE.name}.collect"], check=False, cwd=ROOT)
    print("\n".join(["", "timings:", *timings]))
    if failures:
        print("\nFAILED:\n" + "\n\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
