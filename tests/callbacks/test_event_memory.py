"""Memory and fixed costs of a SpectralMonitor activation event.

An event solves equal-shape layers in chunks under ``memory_budget`` and releases each layer's
captured rows as soon as they are copied into their chunk; the logged values must not depend on
the chunking. RankMe's raw spectrum shares the normalised spectrum's Gram product
(``autocorrelation_eigvals_pair``), with values identical to two separate calls. Histograms and
scalars go to a TensorBoard writer as one record each per event, with the same content
``SummaryWriter.add_histogram`` / ``add_scalar`` would write.
"""

from __future__ import annotations

import gc
import math
import weakref
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lightning_spectral.callbacks.spectral as spectral_module
from lightning_spectral import SpectralMonitor, report
from lightning_spectral.callbacks.spectral import MEMORY_BUDGET_RANGE, _layer_bytes
from lightning_spectral.errors import SpectralConfigError
from lightning_spectral.functional import (
    autocorrelation_eigvals,
    autocorrelation_eigvals_pair,
)
from lightning_spectral.testing import MemoryLogger

pytestmark = pytest.mark.usefixtures("one_thread")


class Towers(nn.Module):
    """Layers of four shapes: wide (n < d), narrow (n > d, side < 32), square and tall."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.ModuleList([nn.Linear(12, 80) for _ in range(3)])
        self.narrow = nn.ModuleList([nn.Linear(12, 6) for _ in range(2)])
        self.square = nn.ModuleList([nn.Linear(12, 40) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in (*self.wide, *self.narrow, *self.square)]
        return torch.cat(outs, dim=-1)


def stand_in() -> Any:
    return SimpleNamespace(is_global_zero=True, loggers=[MemoryLogger()], world_size=1,
                           callbacks=[], callback_metrics={}, progress_bar_metrics={},
                           global_step=0)


def captured(monitor: SpectralMonitor, model: nn.Module, x: torch.Tensor) -> tuple[Any, dict]:
    trainer = stand_in()
    monitor.setup(trainer, model, "fit")
    capture = monitor._capture
    assert capture is not None
    capture.start(seed=0)
    with torch.no_grad():
        model(x)
    capture.stop()
    return trainer, capture.take()


def batch(n: int = 40, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 50.0  # a dominant direction: spectra far from flat
    return x


def event_values(budget: int | None, spy: list | None = None,
                 dtype: str = "float32") -> tuple[dict[str, float], dict]:
    """Every scalar of one event and every layer's logged distribution, for one budget."""
    torch.manual_seed(0)
    model = Towers()
    monitor = SpectralMonitor(memory_budget=budget, figures=True, dtype=dtype)  # type: ignore
    trainer, rows = captured(monitor, model, batch())
    monitor._emit(trainer, 0, 0, rows)
    assert rows == {}  # consumed
    (step, values), = trainer.loggers[0].records
    spectra = {layer: h["spectra"][0] for layer, h in monitor._history.items()}
    return values, spectra


# ---------------------------------------------------------------------------- memory_budget
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "64MiB", float("inf")])
def test_memory_budget_must_be_a_positive_integer(bad):
    with pytest.raises(SpectralConfigError, match="memory_budget"):
        SpectralMonitor(memory_budget=bad)


def test_memory_budget_default_is_half_the_rows_size_clamped():
    assert SpectralMonitor().memory_budget is None
    assert SpectralMonitor(memory_budget=1).memory_budget == 1
    monitor = SpectralMonitor()
    small = {"a": torch.zeros(10, 10)}
    assert monitor._event_budget(small, 4) == MEMORY_BUDGET_RANGE[0]
    big = {f"l{i}": torch.empty(1024, 1024) for i in range(200)}  # 800 MiB of rows
    assert monitor._event_budget(big, 4) == MEMORY_BUDGET_RANGE[1]
    mid = {f"l{i}": torch.empty(1024, 1024) for i in range(24)}  # 96 MiB
    assert monitor._event_budget(mid, 4) == 24 * 1024 * 1024 * 4 // 2
    assert monitor._event_budget(mid, 8) == 24 * 1024 * 1024 * 8 // 2  # float64 working copies
    assert SpectralMonitor(memory_budget=123)._event_budget(big, 4) == 123


def test_layer_estimate_covers_rows_and_gram():
    n, d = 128, 512
    est = _layer_bytes(n, d, 4, need_raw=True)
    assert est >= n * d * 4 + 16 * n * n  # rows copy + float64 Gram and its scaling
    # a narrow layer's product is formed in float64: its copies of the rows count
    assert _layer_bytes(1000, 10, 4, need_raw=True) >= 1000 * 10 * (4 + 16)
    # without RankMe a tall layer is normalised into a copy
    assert _layer_bytes(500, 40, 4, need_raw=False) > _layer_bytes(500, 40, 4, need_raw=True)


# ------------------------------------------------------------------------------- chunking
@pytest.fixture
def pair_calls(monkeypatch) -> list[int]:
    """The number of layers in each chunk the event solves (one entry per
    ``autocorrelation_eigvals_pair`` call), recorded as the event runs."""
    calls: list[int] = []
    original = spectral_module.autocorrelation_eigvals_pair

    def spy(h: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(h.shape[0])
        return original(h, *args, **kwargs)

    monkeypatch.setattr(spectral_module, "autocorrelation_eigvals_pair", spy)
    return calls


def test_chunked_event_logs_the_values_of_one_chunk(pair_calls):
    calls = pair_calls
    whole, whole_spectra = event_values(2**62)
    assert sorted(calls) == [2, 3, 4]  # one call per shape group
    calls.clear()
    tiny, tiny_spectra = event_values(1)  # every layer its own chunk
    assert calls == [1] * 9
    calls.clear()
    default, _ = event_values(None)
    assert sorted(calls) == [2, 3, 4]
    assert len(whole) == 9 * 6  # vne, erank, eig_max, condition, rankme, rows
    for tag, value in whole.items():
        assert not math.isnan(value), tag  # (κ is +inf for the rank-deficient wide layers)
        # chunks are batches of independent problems: the same floating-point operations
        assert tiny[tag] == value, tag
        assert default[tag] == value, tag
    for layer, spectrum in whole_spectra.items():
        assert torch.equal(tiny_spectra[layer], spectrum), layer


def test_chunks_follow_the_budget(pair_calls):
    calls = pair_calls
    # room for two "square" layers (40 rows × 40 features) at a time
    two = 2 * _layer_bytes(40, 40, 4, need_raw=True)
    torch.manual_seed(0)
    monitor = SpectralMonitor(memory_budget=two, layers=["square.*"])
    trainer, rows = captured(monitor, Towers(), batch())
    monitor._emit(trainer, 0, 0, rows)
    assert calls == [2, 2]


def test_float64_event_is_chunk_independent():
    whole, _ = event_values(2**62, dtype="float64")
    tiny, _ = event_values(1, dtype="float64")
    assert whole == tiny


def test_without_rankme_values_match_the_separate_spectrum():
    torch.manual_seed(0)
    model = Towers()
    monitor = SpectralMonitor(quantities=["vne", "eig_max"], memory_budget=1, figures=False)
    trainer, rows = captured(monitor, model, batch())
    want = {n: float(autocorrelation_eigvals(r)[0]) for n, r in rows.items()}
    monitor._emit(trainer, 0, 0, rows)
    (_, values), = trainer.loggers[0].records
    for n, lam1 in want.items():
        assert values[f"eig_max/{n}"] == pytest.approx(lam1, rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------------- releasing rows
def test_captured_rows_are_released_as_the_event_proceeds(monkeypatch):
    torch.manual_seed(0)
    monitor = SpectralMonitor(memory_budget=1, figures=False)
    trainer, rows = captured(monitor, Towers(), batch())
    refs = {n: weakref.ref(r) for n, r in rows.items()}
    alive_at_call: list[int] = []
    original = spectral_module.autocorrelation_eigvals_pair

    def spy(h: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive_at_call.append(sum(ref() is not None for ref in refs.values()))
        return original(h, *args, **kwargs)

    monkeypatch.setattr(spectral_module, "autocorrelation_eigvals_pair", spy)
    monitor._emit(trainer, 0, 0, rows)
    # one layer per chunk: each call sees one layer fewer alive
    assert alive_at_call == list(range(len(refs) - 1, -1, -1))
    gc.collect()
    assert all(ref() is None for ref in refs.values())
    assert monitor.last_event["rows"] == {n: 40 for n in refs}


def test_fit_keeps_no_rows_after_an_event(make_trainer):
    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

    kept: list[weakref.ref] = []
    monitor = SpectralMonitor(every_n_steps=2, weights=False, figures=False)
    original = monitor._emit

    def emit(trainer: Any, step: int, log_step: int, rows: Any) -> None:
        kept.extend(weakref.ref(r) for r in (rows or {}).values())
        original(trainer, step, log_step, rows)

    monitor._emit = emit  # type: ignore[method-assign]
    torch.manual_seed(0)
    train, _ = digits_dataloaders(batch_size=32)
    logger = MemoryLogger()
    make_trainer([monitor], max_steps=3, logger=logger).fit(DigitsClassifier(hidden=(16, 8)),
                                                            train)
    gc.collect()
    assert kept and all(ref() is None for ref in kept)
    assert len({s for s, _ in logger.records}) == 2  # events at steps 0 and 2


# ------------------------------------------------------------------------------- gather
class OneRankStrategy:
    """``all_gather`` of a world of ``world`` identical ranks."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.root_device = torch.device("cpu")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t] * self.world)


@pytest.mark.parametrize("world", [1, 3])
def test_gather_consumes_its_input(world):
    monitor = SpectralMonitor()
    monitor._capture = SimpleNamespace(names=["a", "b", "c"])  # type: ignore[assignment]
    g = torch.Generator().manual_seed(0)
    rows = {"a": torch.randn(5, 3, generator=g), "c": torch.randn(2, 7, generator=g)}
    want = {n: torch.cat([r] * world) for n, r in rows.items()}
    trainer = SimpleNamespace(strategy=OneRankStrategy(world))
    got = monitor._gather(trainer, rows)
    assert rows == {}
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n])


# ----------------------------------------------------------------- one Gram for two spectra
@pytest.mark.parametrize("shape", [(3, 20, 50), (2, 60, 12), (4, 30, 5), (1, 33, 33), (2, 0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_equals_two_calls(shape, dtype):
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if shape[0] > 1 and shape[1]:
        h[0, 0, 0] = float("nan")  # one non-finite problem: NaN values, the others unaffected
        h[-1, 1] = 0.0  # a zero row
    want = (autocorrelation_eigvals(h), autocorrelation_eigvals(h, normalize=False))
    for overwrite in (False, True):
        work = h.clone()
        with torch.no_grad():
            got = autocorrelation_eigvals_pair(work, overwrite=overwrite)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))
        if not overwrite:
            assert torch.equal(work.nan_to_num(-1.0), h.nan_to_num(-1.0))


def test_pair_known_values_and_float32_from_float64_rows():
    lam, raw = autocorrelation_eigvals_pair(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    assert lam.tolist() == [0.5, 0.5] and raw.tolist() == [4.5, 0.5]
    h = torch.randn(10, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lam, raw = autocorrelation_eigvals_pair(h, dtype="float32")
    assert lam.dtype == raw.dtype == torch.float32
    want = torch.linalg.eigvalsh(h @ h.T / 10).flip(-1)
    np.testing.assert_allclose(raw.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_pair_under_autograd_is_differentiable_and_leaves_the_input():
    h = torch.randn(8, 20, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    before = h.detach().clone()
    lam, raw = autocorrelation_eigvals_pair(h, overwrite=True)
    (lam.sum() + raw[0]).backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    assert torch.equal(h.detach(), before)
    assert torch.equal(lam.detach(), autocorrelation_eigvals(h).detach())


# ------------------------------------------------------------- TensorBoard: one record each
def tensorboard_trainer(tmp_path, **kwargs: Any) -> tuple[Any, Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="", version="", **kwargs)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger], callback_metrics={},
                              progress_bar_metrics={})
    return trainer, logger


def read_events(logdir: str) -> list[Any]:
    from pathlib import Path

    from tensorboard.backend.event_processing.event_file_loader import (
        LegacyEventFileLoader,
    )

    events = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        events += [e for e in LegacyEventFileLoader(str(path)).Load() if e.HasField("summary")]
    return events


def test_scalars_are_one_record_with_the_logger_prefix(tmp_path):
    trainer, logger = tensorboard_trainer(tmp_path, prefix="run")
    report.log_scalars(trainer, {"vne/a": 0.25, "erank/a": 3.0, "rows/a": float("nan")}, 7)
    logger.experiment.flush()
    (event,) = read_events(logger.log_dir)
    assert event.step == 7
    got = {v.tag: v.simple_value for v in event.summary.value}
    assert got.keys() == {"run-vne/a", "run-erank/a", "run-rows/a"}
    assert got["run-vne/a"] == 0.25 and got["run-erank/a"] == 3.0
    assert math.isnan(got["run-rows/a"])
    # callback_metrics are unprefixed, as Lightning's own logging leaves them
    assert float(trainer.callback_metrics["vne/a"]) == 0.25


def test_a_logger_that_overrides_log_metrics_is_called(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    class Custom(TensorBoardLogger):
        seen: list = []

        def log_metrics(self, metrics: Any, step: Any = None) -> None:
            self.seen.append((dict(metrics), step))

    logger = Custom(str(tmp_path), name="", version="")
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger], callback_metrics={})
    report.log_scalars(trainer, {"vne/a": 0.5}, 3)
    assert Custom.seen == [({"vne/a": 0.5}, 3)]


def test_histograms_are_one_record_with_add_histogram_buckets(tmp_path):
    from torch.utils.tensorboard.summary import histogram

    trainer, logger = tensorboard_trainer(tmp_path)
    g = np.random.default_rng(0)
    values = {
        "eigvals/a": np.sort(g.exponential(size=64) ** 6)[::-1],
        "eigvals/b": np.array([0.5, 0.5, 0.0, np.nan]),  # the NaN is left out
        "eigvals/c": np.array([np.nan]),  # nothing finite: skipped
        "weight_svals/d": g.standard_normal(300) * 1e3,
    }
    report.log_histograms(trainer, values, 11)
    logger.experiment.flush()
    (event,) = read_events(logger.log_dir)
    assert event.step == 11
    got = {v.tag: v.histo for v in event.summary.value}
    assert got.keys() == {"eigvals/a", "eigvals/b", "weight_svals/d"}
    edges = logger.experiment.default_bins
    for tag, histo in got.items():
        finite = values[tag][np.isfinite(values[tag])]
        want = histogram(tag, finite, edges).value[0].histo  # what add_histogram writes
        assert histo == want, tag


@pytest.mark.parametrize("merge", [2, 8, 100])
def test_merged_buckets_are_add_histogram_with_max_bins(tmp_path, merge):
    from torch.utils.tensorboard.summary import histogram

    trainer, logger = tensorboard_trainer(tmp_path)
    g = np.random.default_rng(merge)
    values = {"a": np.sort(g.exponential(size=200) ** 6)[::-1], "b": g.standard_normal(50)}
    values["a"][-40:] = 0.0  # cut eigenvalues
    report.log_histograms(trainer, values, 2, merge=merge)
    logger.experiment.flush()
    (event,) = read_events(logger.log_dir)
    edges = logger.experiment.default_bins
    for v in event.summary.value:
        want = histogram(v.tag, values[v.tag], edges, max_bins=(len(edges) - 1) // merge)
        assert v.histo == want.value[0].histo, v.tag
        assert len(v.histo.bucket) <= 1548 // merge + 2


def test_monitor_histograms_span_a_factor_two_per_bucket(tmp_path):
    trainer, logger = tensorboard_trainer(tmp_path)
    torch.manual_seed(0)
    monitor = SpectralMonitor(figures=False, weights=False)
    _, rows = captured(monitor, Towers(), batch())
    monitor._emit(trainer, 1, 1, rows)
    logger.experiment.flush()
    (event,) = [e for e in read_events(logger.log_dir)
                if e.summary.value[0].WhichOneof("value") == "histo"]
    for v in event.summary.value:
        limits = np.array(v.histo.bucket_limit)
        positive = limits[limits > 1e-9]
        ratios = positive[1:] / positive[:-1]
        np.testing.assert_allclose(ratios, 1.1 ** spectral_module.HISTOGRAM_MERGE, rtol=1e-9)
        assert sum(v.histo.bucket) == v.histo.num


def test_other_writers_get_add_histogram_per_tag():
    class Writer:
        def __init__(self) -> None:
            self.calls: list = []

        def add_histogram(self, tag: str, values: Any, global_step: int) -> None:
            self.calls.append((tag, np.asarray(values).tolist(), global_step))

        def add_figure(self, *args: Any, **kwargs: Any) -> None:
            pass

    class TensorBoardLike:
        def __init__(self) -> None:
            self.experiment = Writer()

    logger = TensorBoardLike()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger])
    report.log_histograms(trainer, {"x": np.array([1.0, np.inf, 2.0]), "y": np.array([])}, 4)
    assert logger.experiment.calls == [("x", [1.0, 2.0], 4)]


def test_event_writes_two_records_per_tensorboard_writer(tmp_path):
    trainer, logger = tensorboard_trainer(tmp_path)
    torch.manual_seed(0)
    monitor = SpectralMonitor(figures=False)
    _, rows = captured(monitor, Towers(), batch())
    monitor._emit(trainer, 5, 5, rows)  # the layout, then histograms and scalars
    logger.experiment.flush()
    events = [e for e in read_events(logger.log_dir) if e.step == 5]
    kinds = sorted(e.summary.value[0].WhichOneof("value") for e in events)
    assert kinds == ["histo", "simple_value"]
    assert sum(len(e.summary.value) for e in events) == 9 + 9 * 6
