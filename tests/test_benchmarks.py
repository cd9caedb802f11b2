"""The benchmark machinery that `make bench` runs: RESULTS.md assembly and the runner.

The benchmarks themselves are run by hand (`make bench`), never timed in the test suite; these
tests only check that the record they produce is complete and honest about what is missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_collect_writes_machine_peers_and_sections_in_order(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench_gate.md").write_text("## Gate section\n\nbody g\n", encoding="utf-8")
    (results / "bench_functional.md").write_text("## Functional\n\nbody f\n", encoding="utf-8")
    (results / "bench_functional.cuda.md").write_text("## Functional on CUDA\n", encoding="utf-8")
    (results / "bench_zzz_extra.md").write_text("## Extra\n", encoding="utf-8")
    out = tmp_path / "RESULTS.md"
    proc = run("-m", "benchmarks.collect", "--results", str(results), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    for needle in ("## Machine", "- CPU:", "- torch:", "threads", "- GPU:", "## Peers",
                   "weightwatcher", "PyHessian", "cockpit-for-pytorch", "backpack-for-pytorch"):
        assert needle in text, needle
    # every peer row says installed (with a version) / not installed, and the import state
    peer_rows = [line for line in text.splitlines() if line.startswith("| ")
                 and any(p in line for p in ("weightwatcher", "PyHessian", "cockpit", "backpack"))]
    assert len(peer_rows) == 4
    assert all("not installed" in r or " ok " in r or "import failed" in r for r in peer_rows)
    # fixed order (functional, its CUDA twin, ..., gate), unknown sections last
    order = [text.index(s) for s in ("## Functional\n", "## Functional on CUDA", "## Gate section",
                                     "## Extra")]
    assert order == sorted(order)
    assert "**Missing sections**" in text and "bench_overhead" in text


def test_run_all_rejects_an_unknown_benchmark():
    proc = run("-m", "benchmarks.run_all", "--only", "bench_nope")
    assert proc.returncode == 2
    assert "bench_nope" in proc.stderr


HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    buf = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
    out[module] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_every_benchmark_has_the_common_options():
    # one interpreter for all scripts (torch is imported once)
    # as modules of the benchmarks package, the way run_all runs them
    scripts = sorted(f"benchmarks.{p.stem}" for p in BENCH.glob("bench_*.py"))
    assert len(scripts) >= 10
    proc = run("-c", HELP_ALL, *scripts)
    assert proc.returncode == 0, proc.stderr
    import json

    for script, (code, text) in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert code in (0, None), (script, code)
        for option in ("--quick", "--device", "--repeats", "--out"):
            assert option in text, (script, option)


def test_makefile_bench_installs_the_peers_and_runs_everything():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert '".[dev,bench]"' in makefile
    assert "--no-deps" in makefile and "cockpit-for-pytorch" in makefile
    assert "benchmarks.run_all" in makefile or "benchmarks/run_all.py" in makefile
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    bench = pyproject.split("bench = [", 1)[1].split("]", 1)[0]
    assert "weightwatcher" in bench and "pyhessian" in bench
    assert "torchvision" not in bench and "backpack" not in bench


def test_benchmarks_import_their_helpers_without_path_edits():
    # a package: every script imports benchmarks._common, none edits sys.path
    assert (BENCH / "__init__.py").is_file()
    for script in sorted(BENCH.glob("*.py")):
        text = script.read_text(encoding="utf-8")
        assert "sys.path" not in text, script.name
        for line in text.splitlines():
            if line.startswith(("import ", "from ")) and line.split()[1].endswith("_common"):
                assert line.startswith("from benchmarks._common import"), (
                    script.name, line)
    proc = run("-m", "benchmarks.bench_gate", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout
