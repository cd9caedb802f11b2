"""SpectralMonitor's large-weight path: estimates between exact events
(``large_weight_threshold``, ``exact_every``; docs/definitions.md#large-weights).

A small threshold (16) sends a tiny model's layers down the estimate path on CPU in seconds. A
second monitor in the same Trainer (another prefix, ``large_weight_threshold=None``) reads the
same weights at the same steps and computes every value exactly: the reference.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks.spectral import SpectralMonitor
from lightning_spectral.errors import SpectralConfigError, SpectralWarning

pytestmark = pytest.mark.usefixtures("one_thread")

#: every weight event at steps 0, 2, …, 12, the end of training at 13
MAX_STEPS = 13
EVERY = 2
EXACT_EVERY = 3
EXACT_STEPS = {0, 6, 12, 13}  # the first event, the grid 0, 3·2, 6·2, and the end
ESTIMATED = ("weight_stable_rank", "weight_erank", "weight_sv_max", "weight_rank90",
             "weight_rank99")
ALPHA = ("weight_alpha", "weight_alpha_weighted")
LARGE = ("wide", "deep")  # min sides 64 and 448 (≥ 16); "head" has min side 10
# relative tolerance of each estimate (docs/definitions.md#large-weights)
TOL = {"weight_sv_max": 0.01, "weight_stable_rank": 0.01, "weight_erank": 0.02,
       "weight_rank90": 0.05, "weight_rank99": 0.05}


class Net(LightningModule):
    """64 → 512 → 448 → 10; the 448×512 weight is larger than the default Krylov space."""

    def __init__(self, seed: int = 0, poison: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.wide = nn.Linear(64, 512)
        self.deep = nn.Linear(512, 448)
        self.head = nn.Linear(448, 10)
        self.poison = poison

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.deep(torch.relu(self.wide(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.poison and self.global_step == 4:  # the weights the event of step 4 reads
            with torch.no_grad():
                self.deep.weight[0, 0] = math.nan

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def monitor(**kwargs: Any) -> SpectralMonitor:
    kwargs.setdefault("large_weight_threshold", 16)
    kwargs.setdefault("exact_every", EXACT_EVERY)
    return SpectralMonitor(every_n_steps=1000, weights_every_n_steps=EVERY, figures=False,
                           histograms=False, **kwargs)


@pytest.fixture(scope="module")
def two_monitors(tmp_path_factory):
    """One fit watched by an estimating monitor and an exact one (prefix ``ref/``)."""
    from lightning.pytorch import Trainer

    from lightning_spectral.testing import MemoryLogger

    logger = MemoryLogger()
    ours, ref = monitor(), monitor(large_weight_threshold=None, prefix="ref/")
    trainer = Trainer(accelerator="cpu", devices=1, logger=logger, max_steps=MAX_STEPS,
                      callbacks=[ours, ref],
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=str(tmp_path_factory.mktemp("large")))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(Net(), loader())
    finally:
        torch.set_num_threads(before)
    return logger, ours


def test_estimates_equal_exact_values_at_the_same_step(two_monitors):
    logger, _ = two_monitors
    for layer in LARGE:
        for q in ESTIMATED:
            got, want = logger.series(f"{q}/{layer}"), logger.series(f"ref/{q}/{layer}")
            assert set(got) == set(want) == set(range(0, 13, EVERY)) | {13}, (q, layer)
            for step, value in want.items():
                assert got[step] == pytest.approx(value, rel=TOL[q]), (q, layer, step)


def test_small_weights_are_bit_identical(two_monitors):
    logger, _ = two_monitors
    for q in ESTIMATED + ALPHA:
        got, want = logger.series(f"{q}/head"), logger.series(f"ref/{q}/head")
        assert got == want and len(got) == 8, q


def test_exact_events_are_the_first_every_kth_and_the_last(two_monitors):
    logger, _ = two_monitors
    for layer in LARGE:
        for q in ALPHA:
            assert set(logger.series(f"{q}/{layer}")) == EXACT_STEPS, (q, layer)
        # at exact events the large weights carry the exact values themselves
        for q in ESTIMATED:
            got, want = logger.series(f"{q}/{layer}"), logger.series(f"ref/{q}/{layer}")
            assert all(got[s] == want[s] for s in EXACT_STEPS), (q, layer)


def test_estimated_values_differ_from_exact_somewhere(two_monitors):
    # the estimate path really ran: the 448×512 weight's erank is not bit-equal between exact
    # events, and the warm starts are kept per large weight (not checkpointed)
    logger, ours = two_monitors
    got, want = logger.series("weight_erank/deep"), logger.series("ref/weight_erank/deep")
    assert any(got[s] != want[s] for s in set(got) - EXACT_STEPS)
    assert set(ours._sv_vectors) == set(LARGE)
    state = ours.state_dict()
    assert not any(isinstance(v, torch.Tensor) and v.numel() in (64, 512) for v in state.values())


def test_histograms_of_large_weights_only_at_exact_events(make_trainer, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    ours = SpectralMonitor(every_n_steps=1000, weights_every_n_steps=EVERY, figures=False,
                           large_weight_threshold=16, exact_every=EXACT_EVERY)
    make_trainer([ours], max_steps=MAX_STEPS, logger=tb).fit(Net(), loader())
    acc = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for layer in LARGE:
        assert {e.step for e in acc.Histograms(f"weight_svals/{layer}")} == EXACT_STEPS
        assert {e.step for e in acc.Scalars(f"weight_erank/{layer}")} == \
            set(range(0, 13, EVERY)) | {13}
    assert {e.step for e in acc.Histograms("weight_svals/head")} == \
        set(range(0, 13, EVERY)) | {13}


def test_exact_every_one_and_no_threshold_are_always_exact(make_trainer, memory_logger_cls):
    logger = memory_logger_cls()
    runs = [monitor(exact_every=1), monitor(large_weight_threshold=None, prefix="b/"),
            monitor(large_weight_threshold=10_000, prefix="c/")]
    make_trainer(runs, max_steps=5, logger=logger).fit(Net(), loader())
    for layer in LARGE:
        for q in ESTIMATED + ALPHA:
            a = logger.series(f"{q}/{layer}")
            assert a == logger.series(f"b/{q}/{layer}") == logger.series(f"c/{q}/{layer}")
            assert set(a) == {0, 2, 4, 5}


def test_alpha_only_selection_logs_large_weights_at_exact_events_only(
    make_trainer, memory_logger_cls
):
    logger = memory_logger_cls()
    ours = monitor(quantities=["vne", "weight_alpha"])
    make_trainer([ours], max_steps=MAX_STEPS, logger=logger).fit(Net(), loader())
    assert set(logger.series("weight_alpha/deep")) == EXACT_STEPS
    assert len(logger.series("weight_alpha/head")) == 8
    assert not any(t.startswith("weight_sv_max/") for t in logger.tags())


def test_selected_estimated_quantities_only(make_trainer, memory_logger_cls):
    logger = memory_logger_cls()
    ours = monitor(quantities=["weight_sv_max", "weight_rank90"])
    make_trainer([ours], max_steps=5, logger=logger).fit(Net(), loader())
    weight_tags = {t.split("/")[0] for t in logger.tags() if t.startswith("weight_")}
    assert weight_tags == {"weight_sv_max", "weight_rank90"}
    assert set(logger.series("weight_rank90/deep")) == {0, 2, 4, 5}


def test_training_is_bit_identical_with_the_estimate_path(make_trainer, assert_unperturbed):
    def run(with_monitor: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        model = Net(seed=3)
        model.deep = nn.Sequential(nn.Dropout(0.2), model.deep)  # a global-RNG consumer
        callbacks = [monitor(exact_every=4)] if with_monitor else []
        torch.manual_seed(7)
        make_trainer(callbacks, max_steps=9).fit(model, loader())
        return copy.deepcopy(model.state_dict()), torch.get_rng_state()

    assert_unperturbed(run(False), run(True))


def test_non_finite_large_weight_logs_nan_and_warns_once(make_trainer, memory_logger_cls):
    logger = memory_logger_cls()
    ours = monitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([ours], max_steps=9, logger=logger).fit(Net(poison=True), loader())
    values = logger.series("weight_sv_max/deep")
    assert not math.isnan(values[2]) and math.isnan(values[4])  # step 4: an estimate event
    assert math.isnan(values[8]) and "deep" not in ours._sv_vectors  # the warm start is dropped
    assert not math.isnan(logger.series("weight_sv_max/wide")[4])
    msgs = [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)]
    assert sum("non-finite (NaN/Inf) weights" in m for m in msgs) == 1


def test_a_new_fit_starts_exact_and_cold(make_trainer, memory_logger_cls):
    ours = monitor()
    make_trainer([ours], max_steps=5).fit(Net(), loader())
    assert set(ours._sv_vectors) == set(LARGE)
    logger = memory_logger_cls()
    trainer = make_trainer([ours], max_steps=3, logger=logger)
    trainer.fit(Net(seed=1), loader())
    assert set(logger.series("weight_alpha/deep")) == {0, 3}  # first event and the end
    assert set(logger.series("weight_sv_max/deep")) == {0, 2, 3}


def test_a_lazy_weight_is_exact_when_it_first_appears(make_trainer, memory_logger_cls):
    model = Net()
    model.deep = nn.LazyLinear(448)  # no weight at step 0's event; first seen at step 2
    logger = memory_logger_cls()
    make_trainer([monitor()], max_steps=9, logger=logger).fit(model, loader())
    assert set(logger.series("weight_sv_max/deep")) == {2, 4, 6, 8, 9}
    assert set(logger.series("weight_alpha/deep")) == {2, 6, 9}  # first, grid (6 = 3·2), end
    assert set(logger.series("weight_alpha/wide")) == {0, 6, 9}


@pytest.mark.parametrize("kwargs", [
    dict(large_weight_threshold=0), dict(large_weight_threshold=-5),
    dict(large_weight_threshold=1.5), dict(large_weight_threshold="big"),
    dict(large_weight_threshold=True), dict(exact_every=0), dict(exact_every=None),
    dict(exact_every=2.0), dict(exact_every=False),
])
def test_bad_arguments(kwargs):
    with pytest.raises(SpectralConfigError):
        SpectralMonitor(**kwargs)


def test_defaults():
    m = SpectralMonitor()
    assert (m.large_weight_threshold, m.exact_every) == (2048, 10)
    assert SpectralMonitor(large_weight_threshold=None).large_weight_threshold is None
