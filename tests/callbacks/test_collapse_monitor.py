"""CollapseMonitor end to end: logging, correctness, bad input, resume, DDP."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_spectral.callbacks.collapse import CollapseMonitor
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError, SpectralWarning
from lightning_spectral.functional.collapse import neural_collapse
from lightning_spectral.functional.interplay import information_interplay
from lightning_spectral.stats import RowReservoir
from lightning_spectral.testing import MemoryLogger as _MemoryLogger

TAGS = [
    "collapse/" + k
    for k in (
        "nc1", "nc2_equinorm", "nc2_equiangular", "nc2_cos_std", "nc2_etf", "nc2_equinorm_w",
        "nc2_equiangular_w", "nc2_etf_w", "nc3", "nc3_wh", "nc4", "mir", "hdr",
    )
]  # fmt: skip

# ----------------------------------------------------------------------------- helpers


class MemoryLogger(_MemoryLogger):
    """The shared in-memory logger, plus a view of the collapse events."""

    def collapse(self) -> list[tuple[int, dict[str, float]]]:
        return [(s, m) for s, m in self.records
                if any(k.startswith(("collapse/", "collapse_val/")) for k in m)]


class Tiny(pl.LightningModule):
    """``d_in → 8 → (ReLU) → head`` classifier; batches are tuples ``(x, y)`` or dicts."""

    def __init__(
        self,
        d_in: int = 6,
        classes: int = 4,
        lr: float = 0.05,
        dict_batch: bool = False,
        label_key: Any = "y",
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 8), nn.ReLU())
        self.head = nn.Linear(8, classes)
        self.lr = lr
        self.dict_batch = dict_batch
        self.label_key = label_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _xy(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dict_batch:
            return batch["x"], batch[self.label_key]
        return batch[0], batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._xy(batch)
        return nn.functional.cross_entropy(self(x), y.long().clamp(0, self.head.out_features - 1))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._xy(batch)
        self.log("val_loss", nn.functional.cross_entropy(self(x), y.long().clamp(0, 3)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DictData(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, key: str = "y") -> None:
        self.x, self.y, self.key = x, y, key

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], self.key: self.y[i]}


def make_data(n: int = 64, d_in: int = 6, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = 2 * torch.randn(classes, d_in, generator=g)
    x = centres[y] + torch.randn(n, d_in, generator=g)
    return x, y


def loader(x, y, batch_size=16, dict_batch=False, key="y", shuffle=False, seed=0) -> DataLoader:
    ds = DictData(x, y, key) if dict_batch else TensorDataset(x, y)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def trainer(callbacks, logger=None, epochs=1, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        logger=logger if logger is not None else MemoryLogger(),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        num_sanity_val_steps=kw.pop("num_sanity_val_steps", 0),
        accelerator="cpu",
        devices=kw.pop("devices", 1),
        deterministic=True,
        **kw,
    )


def features_of(model: Tiny, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.body(x).double()


def head_of(model: Tiny) -> tuple[torch.Tensor, torch.Tensor]:
    return model.head.weight.detach().double(), model.head.bias.detach().double()


# ----------------------------------------------------------------------------- construction


def test_constructor_validation_and_state_key():
    for bad in (
        {"head": ""}, {"labels": 1.5}, {"labels": True}, {"every_n_epochs": 0},
        {"source": "test"}, {"max_samples": 0}, {"num_classes": 1}, {"figure_budget": -0.1},
        {"figure_budget": 2.0}, {"strict": "yes"},
    ):  # fmt: skip
        with pytest.raises(SpectralConfigError):
            CollapseMonitor(**bad)
    a, b = CollapseMonitor(head="fc"), CollapseMonitor(head="head")
    assert a.state_key != b.state_key
    assert CollapseMonitor(source="val").state_key != CollapseMonitor().state_key
    # built once (Lightning reads it around every hook call) but follows the configuration
    key = a.state_key
    assert a.state_key == key == "CollapseMonitor{'head': 'fc', 'labels': 1, 'source': 'train'}"
    a.prefix = "run2/"
    assert a.state_key != key and "run2/" in a.state_key


def test_public_names_stay_on_the_public_module():
    """The class is assembled from private layers; its import paths, its documented members and
    the dashboard layout stay where users find them."""
    import lightning_spectral
    from lightning_spectral.callbacks import collapse

    assert lightning_spectral.CollapseMonitor is collapse.CollapseMonitor is CollapseMonitor
    assert collapse.__all__ == ["CollapseMonitor"]
    # ``state_key`` itself is the shared one of the base class, built from this configuration
    assert "state_key" not in vars(CollapseMonitor) and CollapseMonitor().state_key
    for name in ("compute", "namespace", "head_name", "_state_key_config", "state_dict",
                 "load_state_dict", "on_train_epoch_end", "on_validation_epoch_end"):
        assert name in vars(CollapseMonitor), name
    assert collapse.LAYOUT == collapse.layout("collapse")
    assert set(collapse.layout("collapse_val")) == {"collapse_val"}
    assert CollapseMonitor(source="train_eval").namespace == collapse.NAMESPACES["train_eval"]


def test_setup_errors_name_what_was_found():
    x, y = make_data()
    model = Tiny()
    with pytest.raises(SpectralConfigError, match=r"no module named 'fc'.*\['body.0', 'head'\]"):
        trainer([CollapseMonitor(head="fc")]).fit(model, loader(x, y))
    with pytest.raises(SpectralConfigError, match=r"'body.1' is a ReLU, not an nn.Linear"):
        trainer([CollapseMonitor(head="body.1")]).fit(model, loader(x, y))
    with pytest.raises(SpectralConfigError, match="num_classes=9 exceeds"):
        trainer([CollapseMonitor(num_classes=9)]).fit(model, loader(x, y))


# ----------------------------------------------------------------------------- correctness


def test_logged_metrics_equal_functional_on_the_epoch_features():
    """lr = 0 keeps the features fixed: the logged values are the one-shot functional values."""
    x, y = make_data(n=80)
    model = Tiny(lr=0.0)
    logger = MemoryLogger()
    mon = CollapseMonitor(interplay_budget=1.0)  # head="auto" → the last Linear called, "head"
    trainer([mon], logger=logger, epochs=2).fit(model, loader(x, y, batch_size=16))
    logged = logger.collapse()
    assert [s for s, _ in logged] == [5, 10]  # global_step at each epoch end
    values = logged[-1][1]
    assert sorted(values) == sorted(TAGS)
    h = features_of(model, x)
    ref = neural_collapse(h, y, *head_of(model))
    inter = information_interplay(h, head_of(model)[0], y)
    for key, val in ref.items():
        assert values[f"collapse/{key}"] == pytest.approx(float(val), rel=1e-5, abs=1e-7), key
    assert values["collapse/mir"] == pytest.approx(float(inter["mir"]), abs=1e-4)
    assert values["collapse/hdr"] == pytest.approx(float(inter["hdr"]), abs=1e-4)
    assert [e for e, _ in mon.history] == [0, 1]
    assert model.head._forward_pre_hooks == {}  # removed at teardown


@pytest.mark.parametrize("block", [16, 40])
def test_small_staging_blocks_and_batches_larger_than_a_block(monkeypatch, block):
    """A wide head stages fewer rows per bulk update, and a batch larger than the staging block
    is split across updates: the statistics and the sample are those of all the rows."""
    from lightning_spectral.callbacks import _collapse_rows

    monkeypatch.setattr(_collapse_rows, "_STAGE_ELEMENTS", block * 8)  # d = 8: `block` rows
    x, y = make_data(n=90)
    model = Tiny(lr=0.0)
    logger = MemoryLogger()
    mon = CollapseMonitor(max_samples=50)
    trainer([mon], logger=logger).fit(model, loader(x, y, batch_size=25))
    assert mon._stage is not None and mon._stage[0].shape[0] == block
    values = logger.collapse()[-1][1]
    h = features_of(model, x)
    ref = neural_collapse(h, y, *head_of(model))
    for key, val in ref.items():
        if key != "nc4":  # NC4 is scored on the 50-row sample
            assert values[f"collapse/{key}"] == pytest.approx(float(val), rel=1e-5, abs=1e-7)
    sample = RowReservoir(50, 8)
    sample.update(h.float(), y)
    rows, labels = sample.sample()
    inter = information_interplay(rows.double(), head_of(model)[0], labels)
    assert values["collapse/mir"] == pytest.approx(float(inter["mir"]), abs=1e-4)


def test_float64_features_give_float64_statistics():
    """A float64 model's rows are accumulated without a float32 round trip."""
    x, y = make_data(n=80)
    model = Tiny(lr=0.0).double()
    logger = MemoryLogger()
    trainer([CollapseMonitor()], logger=logger).fit(model, loader(x.double(), y, batch_size=16))
    values = logger.collapse()[-1][1]
    h = features_of(model, x.double())
    ref = neural_collapse(h, y, *head_of(model), dtype=torch.float64)
    for key in ("nc1", "nc2_etf", "nc3", "nc3_wh"):
        assert values[f"collapse/{key}"] == pytest.approx(float(ref[key]), rel=1e-10), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bulk_update_is_exact_for_every_row_dtype(dtype):
    """Rows staged at float32 width (float32, half) or float64 width (float64) give the float64
    statistics of the rows, bit for bit, and the float32 sample of a reservoir fed directly."""
    from lightning_spectral.callbacks._collapse_rows import _NOT_CALLED
    from lightning_spectral.functional.collapse import CollapseStats, _collapse_update

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(300, 8, generator=gen, dtype=torch.float64).relu().to(dtype)
    y = torch.randint(0, 4, (300,), generator=gen)
    mon = CollapseMonitor(max_samples=40)
    mon._num_labels = 4
    for start in range(0, 300, 32):
        mon._add_rows(h[start : start + 32].clone(), y[start : start + 32])
    mon._flush()
    assert mon._acc is not None and mon._reservoir is not None
    ref = CollapseStats.zeros(4, 8)
    for start in range(0, 300, 1024):  # one bulk update, as the monitor's (1024-row blocks)
        _collapse_update(h[start : start + 1024].double(), y[start : start + 1024], ref)
    assert torch.equal(mon._acc.stats.counts, ref.counts)
    assert torch.equal(mon._acc.stats.sums, ref.sums)
    assert torch.equal(mon._acc.stats.second_moment, ref.second_moment)
    assert float(mon._acc.problems.sum()) == 0.0 and _NOT_CALLED not in mon._problem_text
    direct = RowReservoir(40, 8)
    direct.update(h.double(), y)
    for got, want in zip(mon._reservoir.sample(), direct.sample(), strict=True):
        assert torch.equal(got, want)


def test_observing_never_perturbs(assert_unperturbed):
    x, y = make_data(n=96)

    def run(with_monitor: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(3)
        model = Tiny()
        cbs = [CollapseMonitor(max_samples=20)] if with_monitor else []
        rng_before = torch.get_rng_state()
        trainer(cbs, epochs=3).fit(model, loader(x, y, shuffle=True))
        del rng_before
        return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()

    assert_unperturbed(run(False), run(True))


def test_dict_batches_val_source_and_schedule():
    x, y = make_data(n=48)
    logger = MemoryLogger()
    mon = CollapseMonitor(labels="target", source="val", every_n_epochs=2, interplay_budget=1.0)
    model = Tiny(dict_batch=True, label_key="target")
    trainer([mon], logger=logger, epochs=4, num_sanity_val_steps=2).fit(
        model,
        loader(x, y, dict_batch=True, key="target"),
        loader(x[:24], y[:24], dict_batch=True, key="target"),
    )
    logged = logger.collapse()
    assert [e for e, _ in mon.history] == [1, 3]  # epochs 2 and 4, never the sanity check
    assert len(logged) == 2
    # the validation features of the last epoch, with the head at that point
    h = features_of(model, x[:24])
    ref = neural_collapse(h, y[:24], *head_of(model))
    assert logged[-1][1]["collapse_val/nc1"] == pytest.approx(float(ref["nc1"]), rel=1e-5)
    assert not any(k.startswith("collapse/") for _, m in logged for k in m)


def test_max_samples_bounds_the_row_sample():
    x, y = make_data(n=64)
    model = Tiny(lr=0.0)
    logger = MemoryLogger()
    mon = CollapseMonitor(max_samples=10)
    trainer([mon], logger=logger).fit(model, loader(x, y))
    values = logger.collapse()[-1][1]
    h = features_of(model, x)
    # NC1–NC3 use every row; NC4 is an agreement rate over 10 sampled rows
    ref = neural_collapse(h, y, *head_of(model))
    assert values["collapse/nc1"] == pytest.approx(float(ref["nc1"]), rel=1e-5)
    assert round(values["collapse/nc4"] * 10, 6) == int(round(values["collapse/nc4"] * 10))
    res = RowReservoir(10, 8)
    res.update(h.float(), y)
    rows, labels = res.sample()
    inter = information_interplay(rows.double(), head_of(model)[0], labels)
    assert values["collapse/mir"] == pytest.approx(float(inter["mir"]), abs=1e-4)


def test_tensorboard_figure_and_layout(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = make_data(n=48)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer([CollapseMonitor()], logger=logger, epochs=2).fit(Tiny(), loader(x, y))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert set(TAGS) <= set(acc.Tags()["scalars"])
    assert "collapse/geometry" in acc.Tags()["images"]
    assert len(acc.Scalars("collapse/nc1")) == 2
    layout = acc.Tags().get("tensors", [])
    assert any("custom_scalars" in t for t in layout)


def test_figure_budget_skips_epochs_but_draws_the_last(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = make_data(n=48)

    def images(mon: CollapseMonitor, name: str) -> list[int]:
        logger = TensorBoardLogger(tmp_path, name=name)
        trainer([mon], logger=logger, epochs=6).fit(Tiny(), loader(x, y))
        acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        assert len(acc.Scalars("collapse/nc1")) == 6  # scalars every epoch regardless
        return [e.step for e in acc.Images("collapse/geometry")]

    budgeted = images(CollapseMonitor(), "budget")
    steps = [e.step for e in EventAccumulator(
        str(tmp_path / "budget" / "version_0"), size_guidance={"scalars": 0}).Reload()
        .Scalars("collapse/nc1")]
    # one figure costs far more than a tiny epoch: the first is drawn, then the budget holds
    # them back until the end of training, which draws the last epoch's
    assert budgeted[0] == steps[0] and budgeted[-1] == steps[-1]
    assert len(budgeted) < 6
    assert len(images(CollapseMonitor(figure_budget=1.0), "every")) == 6


# ----------------------------------------------------------------------------- bad input


def _fit_warn(mon, model, data, epochs=1):
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([mon], logger=logger, epochs=epochs).fit(model, data)
    ours = [w for w in caught if issubclass(w.category, SpectralWarning)]
    return logger.collapse(), ours


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_key", r"key 'label' not in the batch; keys found: \['x', 'y'\]"),
        ("float_labels", "integer class indices, got dtype torch.float32"),
        ("out_of_range", r"outside \[0, 4\)"),
        ("one_class", "1 class"),
        ("bad_index", "does not index the batch, a list of length 2"),
    ],
)
def test_bad_input_gives_nan_and_one_warning(case, match):
    x, y = make_data(n=48)
    mon = CollapseMonitor()
    model = Tiny()
    data = loader(x, y)
    if case == "missing_key":
        mon, model = CollapseMonitor(labels="label"), Tiny(dict_batch=True)
        data = loader(x, y, dict_batch=True)
    elif case == "float_labels":
        data = loader(x, y.float())
    elif case == "out_of_range":
        data = loader(x, torch.where(torch.arange(48) == 40, 7, y))
    elif case == "one_class":
        data = loader(x, torch.zeros_like(y))
    elif case == "bad_index":
        mon = CollapseMonitor(labels=5)
    logged, ours = _fit_warn(mon, model, data, epochs=2)
    assert len(logged) == 2
    for _, values in logged:
        assert all(math.isnan(values[t]) for t in TAGS)
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert __import__("re").search(match, str(ours[0].message)), str(ours[0].message)


def test_non_finite_features_give_nan_and_one_warning():
    x, y = make_data(n=32)
    x[5, 0] = float("nan")
    logged, ours = _fit_warn(CollapseMonitor(), Tiny(lr=0.0), loader(x, y), epochs=2)
    assert all(math.isnan(v) for _, values in logged for v in values.values())
    assert len(ours) == 1 and "NaN/Inf" in str(ours[0].message)


def test_strict_raises():
    x, y = make_data(n=32)
    with pytest.raises(SpectralComputeError, match="integer class indices"):
        trainer([CollapseMonitor(strict=True)]).fit(Tiny(), loader(x, y.float()))


def test_absent_class_warns_but_computes_on_present_classes():
    x, y = make_data(n=48)
    keep = y != 2
    mon = CollapseMonitor()
    model = Tiny(lr=0.0)
    logged, ours = _fit_warn(mon, model, loader(x[keep], y[keep]))
    assert len(ours) == 1 and "classes [2] absent" in str(ours[0].message)
    values = logged[-1][1]
    h = features_of(model, x[keep])
    ref = neural_collapse(h, y[keep], *head_of(model))
    for key, val in ref.items():
        assert values[f"collapse/{key}"] == pytest.approx(float(val), rel=1e-5, abs=1e-7), key


# ----------------------------------------------------------------------------- state


def test_resume_continues_history_and_metrics(tmp_path):
    x, y = make_data(n=48)

    def fit(epochs, ckpt=None, model=None, where="a"):
        logger = MemoryLogger()
        mon = CollapseMonitor(interplay_budget=1.0)
        ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / where, save_last=True)
        trainer([mon, ckpt_cb], logger=logger, epochs=epochs, enable_checkpointing=True).fit(
            model, loader(x, y), ckpt_path=ckpt
        )
        return mon, logger

    torch.manual_seed(0)
    full_mon, full_log = fit(4, model=Tiny())
    torch.manual_seed(0)
    fit(2, model=Tiny(), where="b")
    resumed_mon, resumed_log = fit(
        4, ckpt=str(tmp_path / "b" / "last.ckpt"), model=Tiny(), where="c"
    )
    assert resumed_mon.history == full_mon.history
    assert [e for e, _ in resumed_mon.history] == [0, 1, 2, 3]
    assert resumed_log.collapse() == full_log.collapse()[2:]


def test_state_dict_roundtrip_mid_epoch():
    mon = CollapseMonitor()
    mon.history = [(0, 1.5), (1, 0.5)]
    other = CollapseMonitor()
    other.load_state_dict(copy.deepcopy(mon.state_dict()))
    assert other.history == mon.history


# ----------------------------------------------------------------------------- DDP


def _read_csv_metrics(log_dir: Path) -> dict[str, float]:
    with open(log_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    last: dict[str, float] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith("collapse/") and v not in ("", None):
                last[k] = float(v)
    return last


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path):
    """2 CPU ranks (gloo, ddp_spawn): logged metrics equal the single-process metrics."""
    x, y = make_data(n=64)

    def run(devices: int, name: str) -> dict[str, float]:
        torch.manual_seed(0)
        model = Tiny(lr=0.0)
        logger = CSVLogger(tmp_path, name=name, version=0)
        kw: dict[str, Any] = {"devices": devices}
        if devices > 1:
            kw["strategy"] = "ddp_spawn"
        trainer([CollapseMonitor()], logger=logger, **kw).fit(model, loader(x, y, batch_size=8))
        return _read_csv_metrics(Path(logger.log_dir))

    single = run(1, "single")
    # pass tensors to the spawned ranks through files: some sandboxes refuse to resize the
    # anonymous shared-memory segments of the default file-descriptor strategy
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        ddp = run(2, "ddp")
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    assert sorted(single) == sorted(TAGS) == sorted(ddp)
    for tag in TAGS:
        assert ddp[tag] == pytest.approx(single[tag], rel=1e-5, abs=1e-7), tag


class RankSplitBudget(CollapseMonitor):
    """A monitor whose clock would allow MIR/HDR on rank 1 and never on rank 0 (a stand-in for
    ranks whose wall times differ), recording per rank whether each epoch logged them."""

    def __init__(self, out: Path) -> None:
        super().__init__(interplay_budget=0.5)
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        rank = int(trainer.global_rank)
        self._figures.within = lambda budget: rank == 1  # type: ignore[method-assign]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        with open(self.out / f"rank{trainer.global_rank}.txt", "a") as fh:
            fh.write(f"{trainer.current_epoch} {int('collapse/mir' in self.last_metrics)}\n")


@pytest.mark.slow
def test_ddp_ranks_follow_rank_zero_on_the_interplay_budget(tmp_path):
    """MIR/HDR on a budget under DDP: rank zero decides for every rank (one broadcast), so the
    ranks log the same tags even when their clocks disagree."""
    x, y = make_data(n=64)
    torch.manual_seed(0)
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        trainer([RankSplitBudget(tmp_path)], epochs=3, devices=2, strategy="ddp_spawn").fit(
            Tiny(), loader(x, y, batch_size=8)
        )
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    want = "0 1\n1 0\n2 0\n"  # the first epoch always; then rank zero's "no" everywhere
    assert (tmp_path / "rank0.txt").read_text() == want
    assert (tmp_path / "rank1.txt").read_text() == want


def test_reservoir_is_order_and_partition_independent():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 5, generator=g)
    labels = torch.randint(0, 3, (300,), generator=g)
    whole = RowReservoir(50, 5)
    whole.update(rows, labels)
    ref_rows, ref_labels = whole.sample()
    assert ref_rows.shape == (50, 5)
    perm = torch.randperm(300, generator=g)
    parts = [RowReservoir(50, 5) for _ in range(2)]
    for i, chunk in enumerate(perm.split(7)):
        parts[i % 2].update(rows[chunk], labels[chunk])
    union_rows = torch.cat([p.sample()[0] for p in parts])
    union_labels = torch.cat([p.sample()[1] for p in parts])
    merged = RowReservoir(50, 5)
    merged.update(union_rows, union_labels)
    got_rows, got_labels = merged.sample()
    assert torch.equal(got_rows, ref_rows) and torch.equal(got_labels, ref_labels)
    few = RowReservoir(50, 5)
    few.update(rows[:20], labels[:20])
    assert few.sample()[0].shape[0] == 20  # all rows when fewer than the budget
