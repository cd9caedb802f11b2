"""Helpers for the gate tests (`check`, `baseline`): event files, the CLI, a demo run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from lightning_spectral.testing import write_scalars

REPO = Path(__file__).resolve().parents[2]


def write_events(
    directory: Path,
    series: dict[str, Sequence[float]],
    start_step: int = 0,
    name: str = "events.out.tfevents.1700000000.host.1.0",
    wall_time: float = 1.7e9,
    tensor_encoded: bool = False,
) -> Path:
    """An event file holding ``series[tag][i]`` at step ``start_step + i`` (interleaved by step,
    as a logger writes them)."""
    directory.mkdir(parents=True, exist_ok=True)
    length = max(len(v) for v in series.values())
    records = [
        (tag, start_step + i, float(values[i]))
        for i in range(length)
        for tag, values in series.items()
        if i < len(values)
    ]
    return write_scalars(directory / name, records, wall_time=wall_time,
                         tensor_encoded=tensor_encoded)


def run_cli(args: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m lightning_spectral ARGS`` in a subprocess (exit code, stdout, stderr)."""
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    return subprocess.run(
        [sys.executable, "-m", "lightning_spectral", *args],
        capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=120,
    )


@pytest.fixture
def events():
    """The :func:`write_events` helper."""
    return write_events


@pytest.fixture
def cli():
    """The :func:`run_cli` helper."""
    return run_cli


@pytest.fixture
def demo_run(tmp_path: Path) -> Path:
    """A small run: two VNE layers, a collapse metric and a stable rank over 10 steps."""
    run = tmp_path / "version_0"
    write_events(run, {
        "vne/encoder.fc1": [2.0 + 0.1 * i for i in range(10)],
        "vne/encoder.fc2": [1.5 + 0.1 * i for i in range(10)],
        "collapse/nc1": [1.0 / (i + 1) for i in range(10)],
        "weight_stable_rank/fc2": [float(20 + i) for i in range(10)],
    })
    return run
