"""Assemble benchmarks/RESULTS.md from the sections the benchmark scripts wrote.

Each ``benchmarks/bench_*.py`` writes ``benchmarks/results/<script>.md``; this script joins them,
in a fixed order, under one header. Run it after the benchmarks (``make bench`` does both).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "bench_functional",
    "bench_overhead",
    "bench_penalty",
    "bench_collapse",
    "bench_gate",
    "bench_curvature",
    "bench_analyze",
    "bench_mirrors",
]

HEADER = """# Benchmark results

Produced by the scripts in `benchmarks/` (each writes `benchmarks/results/<script>.md`; `python
benchmarks/collect.py` joins them here). Every figure is a ratio of things timed side by side,
interleaved, in one run: medians of per-round ratios with their range (min–max) after warm-up.
Absolute times are quoted only as context for the machine named in each section.
"""


def main() -> None:
    sections = []
    found = {p.stem: p for p in sorted((HERE / "results").glob("*.md"))}
    for name in ORDER + sorted(set(found) - set(ORDER)):
        if name in found:
            sections.append(found[name].read_text(encoding="utf-8").strip())
    text = HEADER + "\n" + "\n\n".join(sections) + "\n"
    (HERE / "RESULTS.md").write_text(text, encoding="utf-8")
    print(f"wrote {HERE / 'RESULTS.md'} ({len(sections)} sections)")


if __name__ == "__main__":
    main()
