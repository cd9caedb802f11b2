"""lightning_spectral.report: one host copy per event, loggers on rank zero, published metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lightning_spectral import report
from lightning_spectral.testing import MemoryLogger, count_host_syncs


class FakeWriter:
    """Records what a TensorBoard ``SummaryWriter`` would write."""

    def __init__(self) -> None:
        self.histograms: list[tuple[str, np.ndarray, int]] = []
        self.layouts: list[dict] = []
        self.figures: list[tuple[str, Any, int]] = []

    def add_histogram(self, tag: str, values: np.ndarray, global_step: int) -> None:
        self.histograms.append((tag, np.array(values), global_step))

    def add_figure(self, tag: str, figure: Any, global_step: int, close: bool = True) -> None:
        self.figures.append((tag, figure, global_step))

    def add_custom_scalars(self, layout: dict) -> None:
        self.layouts.append({k: dict(v) for k, v in layout.items()})

    def flush(self) -> None:
        pass


class FakeTensorBoardLogger:
    def __init__(self) -> None:
        self.experiment = FakeWriter()
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))


class FakeTrainer:
    def __init__(self, loggers: list, is_global_zero: bool = True) -> None:
        self.loggers = loggers
        self.is_global_zero = is_global_zero
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.progress_bar_metrics: dict[str, float] = {}


# ---------------------------------------------------------------------------------- to_host
def test_to_host_exact_values_in_one_copy():
    scalars = {"a": torch.tensor(1.5), "b": torch.tensor(2, dtype=torch.int64), "c": 0.25}
    vectors = {"v": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "w": torch.tensor([1e-300], dtype=torch.float64)}
    with count_host_syncs("cpu") as syncs:
        s, v = report.to_host(scalars, vectors)
    assert syncs.count == 1, syncs.describe()
    assert s == {"a": 1.5, "b": 2.0, "c": 0.25}
    assert all(type(x) is float for x in s.values())
    assert v["v"].dtype == np.float64
    np.testing.assert_array_equal(v["v"], [0, 1, 2, 3, 4, 5])
    assert v["w"][0] == 1e-300  # float64 kept exactly


def test_to_host_empty_and_python_numbers_only():
    assert report.to_host({}) == ({}, {})
    with count_host_syncs("cpu") as syncs:
        s, v = report.to_host({"x": 3})
    assert s == {"x": 3.0} and v == {}
    assert syncs.count <= 1


# ------------------------------------------------------------------------------ log_scalars
def test_log_scalars_writes_loggers_and_publishes_float32():
    memory, tb = MemoryLogger(), FakeTensorBoardLogger()
    trainer = FakeTrainer([memory, tb])
    report.log_scalars(trainer, {"vne/fc1": 1.25, "erank/fc1": np.float64(3.5)}, step=7,
                       prog_bar=("vne/*",))
    assert memory.series("vne/fc1") == {7: 1.25}
    assert memory.series("erank/fc1") == {7: 3.5}
    assert tb.metrics == [({"vne/fc1": 1.25, "erank/fc1": 3.5}, 7)]
    published = trainer.callback_metrics["vne/fc1"]
    assert isinstance(published, torch.Tensor)
    assert published.dtype == torch.float32 and published.dim() == 0
    assert published.item() == 1.25
    assert trainer.progress_bar_metrics == {"vne/fc1": 1.25}  # only the glob's tags


def test_log_scalars_off_rank_zero_publishes_but_does_not_write():
    memory = MemoryLogger()
    trainer = FakeTrainer([memory], is_global_zero=False)
    report.log_scalars(trainer, {"a": 1.0}, step=0)
    assert memory.tags() == set()
    assert trainer.callback_metrics["a"].item() == 1.0
    assert report.published_tags(trainer) == {"a"}


def test_log_scalars_with_nothing_does_nothing():
    trainer = FakeTrainer([MemoryLogger()])
    report.log_scalars(trainer, {}, step=0)
    assert trainer.callback_metrics == {}
    assert report.published_since(trainer, 0) == (0, [])


def test_published_since_and_published_tags():
    trainer = FakeTrainer([])
    assert report.published_since(trainer, 0) == (0, [])
    assert report.published_tags(trainer) == set()
    report.log_scalars(trainer, {"a": 1.0, "b": 2.0}, step=1)
    seq, events = report.published_since(trainer, 0)
    assert seq == 2 and events == [("a", 1.0, 1), ("b", 2.0, 1)]
    report.log_scalars(trainer, {"a": 3.0}, step=2)
    assert report.published_since(trainer, seq) == (3, [("a", 3.0, 2)])
    assert report.published_since(trainer, 2**62) == (3, [])
    assert report.published_tags(trainer) == {"a", "b"}
    # another trainer has its own record
    assert report.published_tags(FakeTrainer([])) == set()
    assert report.published_since(None, 0) == (0, [])


# ---------------------------------------------------------------------------- TensorBoard only
def test_register_layout_merges_per_writer_and_replaces_a_category():
    tb = FakeTensorBoardLogger()
    trainer = FakeTrainer([MemoryLogger(), tb])
    report.register_layout(trainer, {"spectral": report.multiline_layout({"vne": ["vne/.*"]})})
    report.register_layout(trainer, {"collapse": report.multiline_layout({"nc": ["nc.*"]})})
    report.register_layout(trainer, {"spectral": report.multiline_layout({"erank": ["erank/.*"]})})
    layouts = tb.experiment.layouts
    assert len(layouts) == 3
    assert layouts[1] == {"spectral": {"vne": ["Multiline", ["vne/.*"]]},
                          "collapse": {"nc": ["Multiline", ["nc.*"]]}}
    assert layouts[2] == {"spectral": {"erank": ["Multiline", ["erank/.*"]]},
                          "collapse": {"nc": ["Multiline", ["nc.*"]]}}


def test_log_histogram_drops_non_finite_values():
    tb = FakeTensorBoardLogger()
    trainer = FakeTrainer([tb])
    report.log_histogram(trainer, "h", torch.tensor([1.0, float("nan"), 2.0, float("inf")]), 5)
    ((tag, values, step),) = tb.experiment.histograms
    assert tag == "h" and step == 5
    np.testing.assert_array_equal(values, [1.0, 2.0])
    # nothing finite: nothing written
    report.log_histogram(trainer, "h", np.array([np.nan, -np.inf]), 6)
    assert len(tb.experiment.histograms) == 1


def test_tensorboard_writers_only_on_rank_zero():
    tb = FakeTensorBoardLogger()
    assert report.tensorboard_writers(FakeTrainer([MemoryLogger(), tb])) == [tb.experiment]
    trainer = FakeTrainer([tb], is_global_zero=False)
    assert report.tensorboard_writers(trainer) == []
    report.log_histogram(trainer, "h", np.ones(3), 0)
    assert tb.experiment.histograms == []


@pytest.mark.parametrize("value", [0.1, 1e-8, 123456.789])
def test_publish_rounds_to_float32(value):
    trainer = FakeTrainer([])
    report.publish(trainer, {"x": value})
    assert trainer.callback_metrics["x"].item() == pytest.approx(value, rel=1e-6)
    assert trainer.callback_metrics["x"].item() == float(np.float32(value))
