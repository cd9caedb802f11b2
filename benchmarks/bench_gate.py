"""Speed of ``lightning-spectral check`` on a large run.

A run of 200 tags × 10,000 steps (two million scalar events, one per ``add_scalar`` call, as
Lightning's TensorBoardLogger writes them) is checked with five glob rules. Timed, interleaved
round by round after warm-up:

* ``read``      — reading every event file record (framing, CRC-32C of every record, decoding,
                  merging by step): :func:`lightning_spectral.gate.read_run`;
* ``read, plain walk`` — the same with the speculative framing walk turned off (the record
                  framing followed one record at a time), to show what the speculation saves;
* ``evaluate``  — rule evaluation on the loaded run: :func:`lightning_spectral.gate.evaluate`;
* ``check``     — the whole command in-process (``cli.main(["check", ...])``);
* ``subprocess``— ``python -m lightning_spectral check ...``, start-up included.

As a reference, TensorBoard's own readers read a smaller file (``--ref-steps`` steps) side by
side with ours: ``EventAccumulator(size_guidance={"scalars": 0})`` (every scalar kept, as a gate
needs) and its bare record loader ``EventFileLoader`` (pure-Python CRC, one protobuf parse per
record). CPU only (``--device`` is accepted for uniformity and ignored: nothing here runs on an
accelerator).

    python -m benchmarks.bench_gate            # full: 200 tags × 10,000 steps
    python -m benchmarks.bench_gate --quick    # smoke run
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from benchmarks import _common
from lightning_spectral import _eventfile
from lightning_spectral._eventfile import read_scalars
from lightning_spectral.cli import main as cli_main
from lightning_spectral.gate import evaluate, parse_rule, read_run
from lightning_spectral.testing import write_scalars

QUANTITIES = ("vne", "erank", "weight_stable_rank", "collapse")
RULES = [
    "vne/* >= 0",
    "erank/* min > 0",
    "weight_stable_rank/* mean(last=5) <= 1e9",
    "collapse/* max < 1e9",
    "* mean > -1e9",
]


def make_run(directory: Path, n_tags: int, n_steps: int) -> tuple[Path, float]:
    """Write ``n_tags × n_steps`` add_scalar-style events; returns (file, seconds to write)."""
    tags = [f"{QUANTITIES[i % 4]}/layer{i:03d}" for i in range(n_tags)]
    records = [(tag, step, 1.0 + 1e-4 * step + j) for step in range(n_steps)
               for j, tag in enumerate(tags)]
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = write_scalars(directory / "events.out.tfevents.1700000000.bench.1.0", records)
    return path, time.perf_counter() - t0


def tensorboard_reference(path: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(len(e.summary.value) for e in EventFileLoader(str(path)).Load())


def accumulator_reference(path: Path) -> int:
    """Every scalar through ``EventAccumulator`` with no reservoir sampling."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])


def main() -> None:
    p = _common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--tags", type=int, default=None, help="tags (default 200; quick 20)")
    p.add_argument("--steps", type=int, default=None, help="steps (default 10000; quick 500)")
    p.add_argument("--ref-steps", type=int, default=None,
                   help="steps of the TensorBoard-loader comparison file (default 250; quick 50)")
    args = p.parse_args()
    n_tags = args.tags or (20 if args.quick else 200)
    n_steps = args.steps or (500 if args.quick else 10_000)
    ref_steps = args.ref_steps or (50 if args.quick else 250)
    repeats = args.repeats or (3 if args.quick else 7)
    rules = [parse_rule(r) for r in RULES]
    cli_args = ["check", "", *[x for r in RULES for x in ("--rule", r)]]

    with tempfile.TemporaryDirectory(prefix="bench_gate_") as tmp:
        run_dir = Path(tmp) / "big" / "version_0"
        path, write_s = make_run(run_dir, n_tags, n_steps)
        size_mb = path.stat().st_size / 1e6
        cli_args[1] = str(run_dir)
        loaded = read_run(run_dir)
        n_values = sum(len(s) for s in loaded.scalars.values())
        assert n_values == n_tags * n_steps, n_values
        n_checks = len(evaluate(loaded, rules))

        def read() -> None:
            read_run(run_dir)

        def read_plain() -> None:
            with mock.patch.object(_eventfile, "_period", lambda lengths: None):
                read_run(run_dir)

        def ev() -> None:
            evaluate(loaded, rules)

        def check() -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli_main(cli_args) == 0

        def sub() -> None:
            done = subprocess.run([sys.executable, "-m", "lightning_spectral", *cli_args],
                                  capture_output=True, text=True, env=dict(os.environ))
            assert done.returncode == 0, done.stderr

        times = _common.interleaved({"read": read, "read, plain walk": read_plain,
                                     "evaluate": ev, "check": check, "subprocess": sub},
                                    repeats=repeats, warmup=1)

        ref_dir = Path(tmp) / "ref"
        ref_path, _ = make_run(ref_dir, n_tags, ref_steps)
        n_ref = n_tags * ref_steps
        assert tensorboard_reference(ref_path) == n_ref
        assert accumulator_reference(ref_path) == n_ref
        ref_times = _common.interleaved(
            {"ours": lambda: read_scalars(ref_path),
             "tensorboard": lambda: tensorboard_reference(ref_path),
             "accumulator": lambda: accumulator_reference(ref_path)},
            repeats=max(3, repeats // 2), warmup=1)

    rows = ["| stage | median | min – max | per value |", "|---|---|---|---|"]
    for name in ("read", "read, plain walk", "evaluate", "check", "subprocess"):
        med, lo, hi = _common.summary(times[name])
        rows.append(f"| `{name}` | {_common.fmt_ms(med)} | {_common.fmt_ms(lo)} – "
                    f"{_common.fmt_ms(hi)} | {med / n_values * 1e9:.0f} ns |")
    read_share = _common.ratio_summary(times["read"], times["check"])
    eval_share = _common.ratio_summary(times["evaluate"], times["check"])
    walk_saving = _common.summary([1 - a / b for a, b in zip(times["read"],
                                                             times["read, plain walk"],
                                                             strict=True)])
    ours_med = _common.summary(ref_times["ours"])[0]
    tb_med = _common.summary(ref_times["tensorboard"])[0]
    acc_med = _common.summary(ref_times["accumulator"])[0]
    speedup = _common.ratio_summary(ref_times["tensorboard"], ref_times["ours"])
    acc_speedup = _common.ratio_summary(ref_times["accumulator"], ref_times["ours"])
    body = f"""Run: {n_tags} tags × {n_steps:,} steps = {n_values:,} scalar events in one
event file of {size_mb:.1f} MB (written in {write_s:.1f} s by the benchmark's own writer, in
the record layout of `SummaryWriter.add_scalar`); {len(RULES)} glob rules expand to
{n_checks} checks. Rounds: {repeats} after warm-up, stages interleaved.

{chr(10).join(rows)}

Share of the in-process `check` time, median of per-round ratios (min – max):
reading {_common.fmt_ratio(read_share)}, rule evaluation {_common.fmt_ratio(eval_share)}.
The speculative framing walk saves {walk_saving[0]:.0%} ({walk_saving[1]:.0%} – \
{walk_saving[2]:.0%}) of the reading time
against the plain walk (`read, plain walk`), median (min – max) of per-round savings.

Reference — TensorBoard's readers on {n_tags} × {ref_steps:,} = {n_ref:,} events, against
{_common.fmt_ms(ours_med)} for our reader:
`EventAccumulator(size_guidance={{"scalars": 0}})` (every scalar kept) {_common.fmt_ms(acc_med)},
accumulator / ours per round {_common.fmt_ratio(acc_speedup)}; its bare record loader
`EventFileLoader` (pure-Python CRC, protobuf parsing) {_common.fmt_ms(tb_med)},
loader / ours {_common.fmt_ratio(speedup)}.
"""
    _common.write_section("bench_gate", "Gate: `lightning-spectral check` on a large run", body,
                          device="cpu", out=args.out)


if __name__ == "__main__":
    main()
