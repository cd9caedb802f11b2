"""Run the example scripts quickly, each in a scratch directory, with the Python running this.

Each file in examples/ may declare, in comment lines before its docstring:

    # requires: extra=dev       the extra (of pyproject.toml) it needs beyond `pip install .`
    # smoke: --epochs 1         arguments of a quick run (one line per run; none: no arguments)

    python scripts/run_examples.py                # every example (the dev install has all extras)
    python scripts/run_examples.py --no-extras    # only those that need no extra (a plain install)
    python scripts/run_examples.py --list         # what would run, and what is skipped and why

Exit status 0 when every run exited 0, 1 otherwise. Used by scripts/fresh_install.sh.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
_HEADER = re.compile(r"^#\s*(?P<key>requires|smoke):\s*(?P<value>.*?)\s*$")


@dataclass
class Example:
    path: Path
    extras: list[str] = field(default_factory=list)
    runs: list[list[str]] = field(default_factory=list)


def parse(path: Path) -> Example:
    """The ``# requires:`` and ``# smoke:`` lines at the top of ``path`` (before any code)."""
    example = Example(path)
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER.match(line)
        if not match:
            continue
        value = match.group("value")
        if match.group("key") == "requires":
            spec = value.split("(", 1)[0].strip()  # "extra=dev  (why)"
            if not spec.startswith("extra="):
                raise ValueError(f"{path.name}: '# requires:' wants extra=NAME, got {value!r}")
            example.extras += [e.strip() for e in spec[len("extra="):].split(",") if e.strip()]
        else:
            example.runs.append(shlex.split(value))
    if not example.runs:
        example.runs.append([])
    return example


def examples() -> list[Example]:
    return [parse(p) for p in sorted(EXAMPLES.glob("*.py"))]


def run(example: Example, args: list[str], timeout: float) -> tuple[int, float, str]:
    """Run one example in a fresh scratch directory; ``(exit status, seconds, output tail)``."""
    with tempfile.TemporaryDirectory(prefix=f"example-{example.path.stem}-") as scratch:
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(example.path), *args], cwd=scratch,
                                  env=env, capture_output=True, text=True, timeout=timeout)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code = 124
            output = f"timed out after {timeout:g} s\n{exc.stdout or ''}{exc.stderr or ''}"
        return code, time.perf_counter() - t0, output[-4000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-extras", action="store_true",
                        help="run only the examples that declare no '# requires: extra=...'")
    parser.add_argument("--list", action="store_true", help="list, do not run")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    args = parser.parse_args(argv)

    failed = 0
    for example in examples():
        name = example.path.name
        if args.no_extras and example.extras:
            print(f"skip {name}: needs the {', '.join(example.extras)} extra", flush=True)
            continue
        for run_args in example.runs:
            shown = " ".join([f"examples/{name}", *map(shlex.quote, run_args)])
            if args.list:
                print(f"run  {shown}")
                continue
            code, seconds, output = run(example, run_args, args.timeout)
            print(f"{'ok  ' if code == 0 else 'FAIL'} {shown}  ({seconds:.1f} s)", flush=True)
            if code != 0:
                failed += 1
                print(f"---- exit status {code}; last output:\n{output}\n----", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
