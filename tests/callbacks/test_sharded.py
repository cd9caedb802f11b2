"""Sharded strategies: under FSDP2 (ModelParallelStrategy, 2 CPU processes with gloo) every
logged value equals the one the same model gets under DDP at the same step, and the weight
tags follow the current (sharded) parameters, not the ones from before sharding."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


def run(out: Path, kind: str) -> dict[tuple[str, int], float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(HERE / "sharded_script.py"), str(out), kind],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values: dict[tuple[str, int], float] = {}
    for row in csv.DictReader(open(out / kind / "version_0" / "metrics.csv")):
        for tag, value in row.items():
            if tag not in ("step", "epoch") and value != "":
                values[(tag, int(row["step"]))] = float(value)
    return values


def test_fsdp2_equals_ddp_and_weights_move(tmp_path):
    fsdp2, ddp = run(tmp_path, "fsdp2"), run(tmp_path, "ddp")
    assert set(fsdp2) == set(ddp)
    for key, value in ddp.items():
        assert fsdp2[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    tags = {tag for tag, _ in fsdp2}
    assert {"weight_stable_rank/classifier", "collapse/nc1", "vne_penalty/vne/features"} <= tags
    # every weight tag changes across steps (not the weights from before sharding)
    for tag in (t for t in tags if t.startswith(("weight_sv_max/", "weight_stable_rank/"))):
        series = [v for (t, _), v in sorted(fsdp2.items(), key=lambda kv: kv[0][1]) if t == tag]
        assert len(series) >= 3 and len(set(series)) == len(series), (tag, series)


class _Strategy:
    pass


class FSDPStrategy(_Strategy):
    pass


class DeepSpeedStrategy(_Strategy):
    pass


class _Trainer:
    def __init__(self, strategy: object) -> None:
        self.strategy = strategy
        self.callbacks: list[object] = []


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_unsupported_sharded_strategies_fail_at_setup(strategy):
    """Flat-parameter strategies would give silently wrong weights: refused at setup, naming
    the way out."""
    import torch
    from torch import nn

    from lightning_spectral import CollapseMonitor, CurvatureMonitor, SpectralMonitor
    from lightning_spectral.errors import SpectralConfigError

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    trainer = _Trainer(strategy())
    for callback, needle in ((SpectralMonitor(), "weights=False"),
                             (CollapseMonitor(head="2"), "ModelParallelStrategy"),
                             (CurvatureMonitor(), "DDP")):
        with pytest.raises(SpectralConfigError, match=needle):
            callback.setup(trainer, model, "fit")
    SpectralMonitor(weights=False).setup(trainer, model, "fit")  # activations only: fine
    assert torch.is_tensor(model[0].weight)
