"""SpectralMonitor in real Trainers: values, schedule, no perturbation, logging, DDP, resume."""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import functional as LF
from lightning_spectral.callbacks.spectral import SpectralMonitor
from lightning_spectral.demos import DigitsClassifier, load_digits_tensors
from lightning_spectral.errors import SpectralComputeError, SpectralConfigError, SpectralWarning

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent
ACT = ("vne", "erank", "eig_max", "condition", "rankme")
WTS = ("weight_stable_rank", "weight_erank", "weight_sv_max", "weight_rank90", "weight_rank99",
       "weight_alpha", "weight_alpha_weighted")


# ------------------------------------------------------------------------------- helpers
def digits_loader(n: int = 128, batch_size: int = 16, image: bool = False) -> DataLoader:
    x, y, _, _ = load_digits_tensors()
    x, y = x[:n], y[:n]
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def mlp(seed: int = 0, **kwargs: Any) -> DigitsClassifier:
    torch.manual_seed(seed)
    return DigitsClassifier(hidden=(32, 16), **kwargs)


def np_vne_erank_max_cond(h: np.ndarray) -> tuple[float, float, float, float, float]:
    """Float64 reference, written from docs/definitions.md#autocorrelation, #erank, #condition,
    #vne with numpy only."""
    h = np.asarray(h, dtype=np.float64)
    n, d = h.shape
    norm = np.linalg.norm(h, axis=1, keepdims=True)
    z = np.where(norm < 1e-12, 0.0, h / np.where(norm < 1e-12, 1.0, norm))
    lam = np.linalg.eigvalsh(z.T @ z / n)[::-1][: min(n, d)]  # d×d side, the other one
    m = lam.size
    eps32 = 2.0**-23  # the monitor's cutoff (docs/definitions.md#cutoff) uses ε of float32
    cut = np.where(lam <= lam.max() * m * eps32, 0.0, np.clip(lam, 0, None))
    p = cut / cut.sum()
    p = p[p > 0]
    s = float(-(p * np.log(p)).sum())
    cond = math.inf if lam.min() <= lam.max() * m * eps32 else float(lam.max() / lam.min())
    # RankMe (Garrido et al. 2023): entropy of the raw rows' singular values σ/‖σ‖₁ + 1e-7
    sv = np.linalg.svd(h, compute_uv=False)
    q = sv / sv.sum() + 1e-7
    rankme = float(np.exp(-(q * np.log(q)).sum()))
    return s, math.exp(s), float(lam.max()), cond, rankme


def np_weight_stats(w: np.ndarray) -> dict[str, float]:
    """Float64 reference from docs/definitions.md#erank, #stable-rank, #capacity via numpy's SVD."""
    s = np.linalg.svd(np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1), compute_uv=False)
    s2 = s**2
    p = s2 / s2.sum()
    p = p[p > s2.max() / s2.sum() * s.size * 2.0**-23]
    cum = np.cumsum(s2) / s2.sum()
    alpha, alpha_w = np_powerlaw_alpha(s2)
    return {
        "weight_alpha": alpha,
        "weight_alpha_weighted": alpha_w,
        "weight_stable_rank": float(s2.sum() / s2.max()),
        "weight_erank": float(np.exp(-(p * np.log(p)).sum())),
        "weight_sv_max": float(s.max()),
        "weight_rank90": float(np.argmax(cum >= 0.9 - 1e-12) + 1),
        "weight_rank99": float(np.argmax(cum >= 0.99 - 1e-12) + 1),
    }


def np_powerlaw_alpha(lam: np.ndarray) -> tuple[float, float]:
    """Heavy-tailed exponent of ``lam`` in float64: for each candidate ``xmin`` (every kept value
    but the largest) the continuous MLE on the tail and the KS distance of the fitted power law;
    the candidate with the smallest distance wins; ``alpha_weighted = α·log10 λ_max``."""
    x = np.sort(lam[lam > 1e-5])
    best = (math.inf, math.nan)
    for k in range(len(x) - 1):
        tail = x[k:]
        n = tail.size
        a = 1 + n / np.log(tail / tail[0]).sum() if len(x) >= 20 else (
            1 + (n - 1) / np.log(tail / tail[0]).sum())
        if len(x) < 20 and n < 8:
            continue
        cdf = 1 - (tail / tail[0]) ** (1 - a)
        d = np.abs(cdf - np.arange(n) / n).max()
        if d < best[0]:
            best = (d, a)
    return best[1], best[1] * math.log10(x[-1])


class Recorder:
    """The test's own forward hooks: outputs of named layers, every training forward."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        mods = dict(model.named_modules())
        self.handles = [
            mods[n].register_forward_hook(self._hook(n)) for n in names
        ]

    def _hook(self, name: str):
        def hook(module, args, out):
            if module.training:
                self.outputs[name].append(out.detach().float().clone())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Toy(LightningModule):
    """Two bias-free layers with known spectra on the input ``I_8`` (lr = 0: nothing moves).

    ``iso`` has weight ``I``: its output is ``I_8`` (isotropic); ``rank1`` has weight ``u vᵀ``
    with ``v = 1``: every output row is parallel to ``u`` (rank one).
    """

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.iso = nn.Linear(d, d, bias=False)
        self.rank1 = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, 2)
        with torch.no_grad():
            self.iso.weight.copy_(torch.eye(d))
            u = torch.arange(1.0, d + 1)
            self.rank1.weight.copy_(torch.outer(u, torch.ones(d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rank1(self.iso(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


# ------------------------------------------------------------------------------- values
def test_known_values_from_theory(make_trainer, memory_logger_cls):
    d = 8
    loader = DataLoader(TensorDataset(torch.eye(d), torch.arange(d) % 2), batch_size=d)
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=1, weights_every_n_steps=1, figures=False)
    make_trainer([monitor], max_steps=2, logger=logger).fit(Toy(d), loader)
    got = {tag: logger.series(tag)[0] for tag in logger.tags() if 0 in logger.series(tag)}
    # isotropic rows: VNE = log d, erank = d, λ_max = 1/d, κ = 1 (docs/definitions.md#vne-values,
    # #erank, #condition)
    assert got["vne/iso"] == pytest.approx(math.log(d), abs=1e-5)
    assert got["erank/iso"] == pytest.approx(d, abs=1e-4)
    assert got["eig_max/iso"] == pytest.approx(1 / d, abs=1e-6)
    assert got["condition/iso"] == pytest.approx(1.0, abs=1e-4)
    # rank one: VNE = 0, erank = 1, λ_max = 1, κ = +inf
    assert got["vne/rank1"] == pytest.approx(0.0, abs=1e-6)
    assert got["erank/rank1"] == pytest.approx(1.0, abs=1e-5)
    assert got["eig_max/rank1"] == pytest.approx(1.0, abs=1e-5)
    assert got["condition/rank1"] == math.inf
    # weights: I has srank = erank = 8, σ_1 = 1, k(0.9) = 8 (7/8 < 0.9); u vᵀ is rank one
    assert got["weight_stable_rank/iso"] == pytest.approx(8.0, abs=1e-5)
    assert got["weight_erank/iso"] == pytest.approx(8.0, abs=1e-4)
    assert got["weight_sv_max/iso"] == pytest.approx(1.0, abs=1e-6)
    assert got["weight_rank90/iso"] == 8 and got["weight_rank99/iso"] == 8
    sv = float(torch.arange(1.0, d + 1).norm() * math.sqrt(d))
    assert got["weight_stable_rank/rank1"] == pytest.approx(1.0, abs=1e-5)
    assert got["weight_erank/rank1"] == pytest.approx(1.0, abs=1e-5)
    assert got["weight_sv_max/rank1"] == pytest.approx(sv, rel=1e-5)
    assert got["weight_rank90/rank1"] == 1 and got["weight_rank99/rank1"] == 1
    assert monitor.last_event["rows"] == {"iso": d, "rank1": d, "head": d}


def test_values_equal_functional_and_float64_reference(make_trainer, memory_logger_cls):
    model = mlp()
    names = ["features.1", "features.3", "classifier"]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = Recorder(model, names)
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, figures=False)
    make_trainer([monitor], max_steps=3, logger=logger).fit(model, digits_loader())
    rec.remove()
    assert sorted(logger.series("vne/features.1")) == [0, 2]
    for step, forward in ((0, 0), (2, 2)):  # step g is captured from the forward of step g
        for n in names:
            h = rec.outputs[n][forward]
            lam = LF.autocorrelation_eigvals(h)
            ref = np_vne_erank_max_cond(h.numpy())
            want_functional = {
                "vne": float(LF.vne(h)),
                "erank": float(LF.effective_rank(lam)),
                "eig_max": float(lam[0]),
                "condition": float(LF.condition_number(lam)),
                "rankme": float(LF.rankme(h)),
            }
            for q, ref_value in zip(ACT, ref, strict=True):
                got = logger.series(f"{q}/{n}")[step]
                assert got == pytest.approx(want_functional[q], rel=1e-6, abs=1e-7), (q, n)
                # float32 vs float64: λ_min carries an error ~ λ_max·ε₃₂, so κ's relative
                # error grows like κ·ε₃₂ (docs/definitions.md#condition); the other quantities
                # are well conditioned
                rel = 2e-4 + (ref_value * 2.0**-23 if q == "condition" else 0.0)
                # RankMe weighs σ = √λ: a float32 eigenvalue near the cutoff carries an absolute
                # error ~ λ_max·m·ε₃₂, i.e. σ errors ~ 3e-4·σ_max, so ~1e-3 of RankMe
                rel = 2e-3 if q == "rankme" else rel
                assert got == pytest.approx(ref_value, rel=rel, abs=1e-5), (q, n, step)
    # weights logged at step 0 are the weights that produced the step-0 forward
    for n in names:
        w = initial[f"{n}.weight"]
        s = LF.singular_values(w)
        want = np_weight_stats(w.numpy())
        assert want["weight_stable_rank"] == pytest.approx(float(LF.stable_rank(w)), rel=1e-5)
        assert want["weight_erank"] == pytest.approx(float(LF.effective_rank(s**2)), rel=1e-4)
        for q in WTS:
            assert logger.series(f"{q}/{n}")[0] == pytest.approx(want[q], rel=1e-4), (q, n)
    # the final weights are logged when training ends, at the final global step
    assert 3 in logger.series("weight_sv_max/classifier")


def test_gradient_accumulation_captures_the_due_steps_micro_batches(
    make_trainer, memory_logger_cls
):
    model = mlp()
    rec = Recorder(model, ["features.1"])
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=2, weights=False, figures=False)
    trainer = make_trainer([monitor], max_steps=3, logger=logger, accumulate_grad_batches=2)
    trainer.fit(model, digits_loader(batch_size=8))
    rec.remove()
    assert sorted(logger.series("vne/features.1")) == [0, 2]  # x-axis: optimizer steps
    assert monitor.last_event["rows"]["features.1"] == 16  # both micro-batches of the step
    outs = rec.outputs["features.1"]
    # optimizer step 2 (0-based) is made of micro-batches 4 and 5
    want = float(LF.vne(torch.cat([outs[4], outs[5]])))
    assert logger.series("vne/features.1")[2] == pytest.approx(want, rel=1e-6)
    assert float(LF.vne(outs[4])) != pytest.approx(want, rel=1e-3)  # one micro-batch differs


def test_schedule_with_accumulation_reads_every_due_step(make_trainer, memory_logger_cls):
    """Between events the monitor returns without reading ``global_step`` for as many batches
    as cannot reach the next due step; with 3 micro-batches per step none is missed."""
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=4, weights_every_n_steps=6, figures=False)
    trainer = make_trainer([monitor], max_steps=13, logger=logger, accumulate_grad_batches=3)
    trainer.fit(mlp(), digits_loader(n=128, batch_size=4))
    assert sorted(logger.series("vne/features.1")) == [0, 4, 8, 12]
    assert sorted(logger.series("weight_sv_max/classifier")) == [0, 6, 12, 13]


class TwoStepsPerBatch(DigitsClassifier):
    """Manual optimization stepping twice per batch: ``global_step`` advances by two."""

    def __init__(self) -> None:
        super().__init__(hidden=(32, 16))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        for _ in range(2):
            loss = F.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()


def test_schedule_with_manual_optimization_stepping_twice(make_trainer, memory_logger_cls):
    """Manual optimization may step several times per batch: every batch reads the step, so
    the events fall on the first batch at or after each due step."""
    torch.manual_seed(0)
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=5, weights=False, figures=False)
    trainer = make_trainer([monitor], max_steps=16, logger=logger)
    trainer.fit(TwoStepsPerBatch(), digits_loader(n=128, batch_size=8))
    # batch b starts at global step 2b: due at >= 0, 5, 10 → batches 0, 3, 5 (the x-axis is
    # Lightning's logging step, which counts batches under manual optimization). Skipping
    # batches as under automatic optimization would read step 2, skip two batches and take
    # the second event at step 8 instead of 6.
    assert sorted(logger.series("vne/features.1")) == [0, 3, 5]
    assert monitor.last_event["step"] == 10


def test_max_samples_bounds_rows(make_trainer):
    monitor = SpectralMonitor(every_n_steps=1, max_samples=5, weights=False, figures=False)
    make_trainer([monitor], max_steps=1).fit(mlp(), digits_loader())
    assert monitor.last_event["rows"] == {"features.1": 5, "features.3": 5, "classifier": 5}


# ------------------------------------------------------------------------------- no perturbation
def test_bit_identical_weights_and_rng_with_and_without_monitor(make_trainer, tmp_path,
                                                                assert_unperturbed):
    def run(with_monitor: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        model = mlp(seed=1)
        model.features.append(nn.Dropout(0.3))  # global-RNG consumer: any stray draw shows
        # figures are drawn from host copies only; skipped here to keep the test fast
        monitor = SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, figures=False)
        callbacks = [monitor] if with_monitor else []
        logger = TensorBoardLogger(str(tmp_path), name="tb") if with_monitor else False
        torch.manual_seed(5)
        make_trainer(callbacks, max_steps=6, logger=logger).fit(model, digits_loader())
        return copy.deepcopy(model.state_dict()), torch.get_rng_state()

    assert_unperturbed(run(False), run(True))


def test_hooks_removed_and_train_mode_restored(make_trainer):
    model = mlp()
    user = model.classifier.register_forward_hook(lambda m, a, o: None)
    before = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    monitor = SpectralMonitor(every_n_steps=1, figures=False)
    make_trainer([monitor], max_steps=2).fit(model, digits_loader())
    after = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    assert after == before
    user.remove()


# ------------------------------------------------------------------------------- bad input
class NaNLayer(LightningModule):
    """``bad`` outputs NaN on every forward; the loss does not see it (lr = 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.bad = nn.Linear(16, 4)
        self.quant = Quantize()
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        self.bad(h * float("inf") * 0.0)  # NaN activations in 'bad' only
        self.quant(h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Quantize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 4).round().long()


def test_nan_activations_log_nan_and_warn_once(make_trainer, memory_logger_cls):
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=1, layers=["fc", "bad", "quant"], figures=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=4, logger=logger).fit(NaNLayer(), digits_loader())
    ours = [str(w.message) for w in caught if issubclass(w.category, SpectralWarning)]
    nonfinite = [m for m in ours if "non-finite" in m and "activations" in m]
    assert len(nonfinite) == 1 and "bad" in nonfinite[0]
    assert len([m for m in ours if "'quant' skipped" in m]) == 1  # integer output skipped once
    assert all(math.isnan(v) for v in logger.series("vne/bad").values())
    assert len(logger.series("vne/bad")) == 4
    assert all(math.isfinite(v) for v in logger.series("vne/fc").values())
    assert "vne/quant" not in logger.tags()


def test_nan_activations_raise_when_strict(make_trainer):
    monitor = SpectralMonitor(every_n_steps=1, layers=["fc", "bad"], figures=False, strict=True)
    with pytest.raises(SpectralComputeError, match="bad"):
        make_trainer([monitor], max_steps=2).fit(NaNLayer(), digits_loader())


def test_unmatched_layer_fails_at_setup_listing_names(make_trainer):
    monitor = SpectralMonitor(layers=["features.1", "encoder.*"])
    with pytest.raises(SpectralConfigError) as info:
        make_trainer([monitor], max_steps=1).fit(mlp(), digits_loader())
    assert "'encoder.*'" in str(info.value)
    assert "features.1 (Linear)" in str(info.value) and "classifier (Linear)" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [dict(every_n_steps=0), dict(max_samples=-1), dict(conv_reduce="max"), dict(dtype="float16"),
     dict(layers=3), dict(weights_every_n_steps=0)],
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(SpectralConfigError):
        SpectralMonitor(**kwargs)


def test_bf16_mixed_precision_spectra_in_float32(make_trainer, memory_logger_cls):
    model = mlp()
    rec = Recorder(model, ["features.1"])
    seen_dtypes: list[torch.dtype] = []
    probe = model.features[1].register_forward_hook(lambda m, a, o: seen_dtypes.append(o.dtype))
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=1, figures=False)
    make_trainer([monitor], max_steps=2, logger=logger, precision="bf16-mixed").fit(
        model, digits_loader()
    )
    probe.remove()
    rec.remove()
    assert seen_dtypes[0] == torch.bfloat16  # the layer really ran in bf16
    # eigvalsh has no bf16 kernel: finite values equal to the float32 computation on the
    # same (bf16) rows show the spectra were computed in float32
    want = float(LF.vne(rec.outputs["features.1"][0], dtype="float32"))
    assert logger.series("vne/features.1")[0] == pytest.approx(want, rel=1e-6)
    assert all(math.isfinite(v) for v in logger.series("erank/classifier").values())


# ------------------------------------------------------------------------------- logging
def test_tensorboard_and_csv_receive_everything(make_trainer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    model = DigitsClassifier(arch="cnn", hidden=(16, 16))
    layers = ["features.0", "features.6"]  # a conv and a linear layer
    monitor = SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, layers=layers)
    make_trainer([monitor], max_steps=3, logger=[tb, csv_logger]).fit(
        model, digits_loader(n=64, image=True)
    )
    acc = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0, "histograms": 0,
                                                       "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for q in ACT + WTS:
        for n in layers:
            assert f"{q}/{n}" in tags["scalars"], f"{q}/{n}"
    assert [e.step for e in acc.Scalars("vne/features.0")] == [0, 2]
    for n in layers:
        assert f"eigvals/{n}" in tags["histograms"] and f"weight_svals/{n}" in tags["histograms"]
        assert f"spectrum_heatmap/{n}" in tags["images"]
    assert "spectra/all_layers" in tags["images"]
    assert any("custom_scalars" in t for t in tags["tensors"])  # the layout
    # the eigvals histogram holds the distribution λ/Σλ (docs/definitions.md#distribution): it
    # sums to one
    hist = acc.Histograms("eigvals/features.6")[0].histogram_value
    assert hist.sum == pytest.approx(1.0, abs=1e-4) and hist.num == 16
    # CSV: the same scalars at the same steps
    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    vne_rows = {int(r["step"]): float(r["vne/features.0"]) for r in rows if r.get("vne/features.0")}
    assert vne_rows.keys() == {0, 2}
    tb_vne = {e.step: e.value for e in acc.Scalars("vne/features.0")}
    for step, value in vne_rows.items():
        assert value == pytest.approx(tb_vne[step], rel=1e-6)
    assert "weight_rank90/features.6" in rows[0].keys()


def test_layout_groups_quantities_and_layers():
    from lightning_spectral import report

    captured: dict = {}

    class FakeWriter:
        def add_histogram(self, *a, **k): ...
        def add_figure(self, *a, **k): ...
        def add_custom_scalars(self, layout):
            captured.update(layout)

        def flush(self): ...

    class TensorBoardFake:
        experiment = FakeWriter()

    class FakeTrainer:
        is_global_zero = True
        loggers = [TensorBoardFake()]

    monitor = SpectralMonitor()
    monitor.setup(None, mlp(), "fit")
    monitor._register_layout(FakeTrainer())
    monitor.teardown(None, None, "fit")
    by_q = captured["spectral: by quantity"]
    assert set(by_q) == set(ACT + WTS) | {"rows"}
    assert by_q["vne"] == ["Multiline", ["^vne/"]]
    by_layer = captured["spectral: by layer"]
    layers = ("features.1", "features.3", "classifier")
    # one chart per scale and layer: ranks (titled by the layer) and entropy in nats
    assert set(by_layer) == set(layers) | {f"{n}: entropy (nats)" for n in layers}
    import re

    ranks = by_layer["features.1"][1]
    entropy = by_layer["features.1: entropy (nats)"][1]
    assert any(re.search(p, "erank/features.1") for p in ranks)
    assert any(re.search(p, "rankme/features.1") for p in ranks)
    assert any(re.search(p, "weight_stable_rank/features.1") for p in ranks)
    assert not any(re.search(p, "vne/features.1") for p in ranks)
    assert not any(re.search(p, "condition/features.1") for p in ranks + entropy)
    assert re.search(entropy[0], "vne/features.1")
    assert not re.search(entropy[0], "vne/features.10")
    assert report is not None


def test_layout_follows_selected_quantities():
    captured: dict = {}

    class FakeWriter:
        def add_histogram(self, *a, **k): ...
        def add_figure(self, *a, **k): ...
        def add_custom_scalars(self, layout):
            captured.update(layout)

        def flush(self): ...

    class TensorBoardFake:
        experiment = FakeWriter()

    class FakeTrainer:
        is_global_zero = True
        loggers = [TensorBoardFake()]

    monitor = SpectralMonitor(quantities=["vne", "weight_sv_max"])
    monitor.setup(None, mlp(), "fit")
    monitor._register_layout(FakeTrainer())
    monitor.teardown(None, None, "fit")
    assert set(captured["spectral: by quantity"]) == {"vne", "weight_sv_max", "rows"}
    assert set(captured["spectral: by layer"]) == {
        f"{n}: entropy (nats)" for n in ("features.1", "features.3", "classifier")
    }


def test_unknown_quantity_lists_the_table():
    with pytest.raises(SpectralConfigError, match="weight_stable_rank"):
        SpectralMonitor(quantities=["vne", "entropy"])
    with pytest.raises(SpectralConfigError):
        SpectralMonitor(quantities="vne")


def test_selected_quantities_are_the_only_tags_logged(make_trainer, memory_logger_cls):
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, histograms=False,
                              figures=False, quantities=["erank", "weight_rank90"])
    make_trainer([monitor], max_steps=4, logger=logger).fit(mlp(), digits_loader(n=64))
    tags = {t.split("/", 1)[0] for t in logger.tags() if "/" in t}
    assert tags == {"erank", "rows", "weight_rank90"}


def test_activation_only_selection_skips_weight_events(make_trainer, memory_logger_cls):
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=2, histograms=False, figures=False,
                              quantities=["vne", "condition"])
    make_trainer([monitor], max_steps=4, logger=logger).fit(mlp(), digits_loader(n=64))
    tags = {t.split("/", 1)[0] for t in logger.tags() if "/" in t}
    assert tags == {"vne", "condition", "rows"}


# ------------------------------------------------------------------------------- resume
def test_resume_keeps_schedule_and_history(make_trainer, memory_logger_cls, tmp_path):
    loader = digits_loader(n=64, batch_size=16)  # 4 steps per epoch, no shuffling

    def monitor() -> SpectralMonitor:
        return SpectralMonitor(every_n_steps=3, weights_every_n_steps=3, histograms=False)

    full_logger = memory_logger_cls()
    full = monitor()
    make_trainer([full], max_epochs=3, logger=full_logger).fit(mlp(), loader)

    first = monitor()
    first_logger = memory_logger_cls()
    t1 = make_trainer([first], max_epochs=2, logger=first_logger)
    t1.fit(mlp(), loader)
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    second = monitor()
    second_logger = memory_logger_cls()
    make_trainer([second], max_epochs=3, logger=second_logger).fit(mlp(), loader, ckpt_path=ckpt)

    assert sorted(first_logger.series("vne/features.1")) == [0, 3, 6]
    assert sorted(second_logger.series("vne/features.1")) == [9]  # schedule continued
    for step, value in second_logger.series("vne/features.1").items():
        assert value == pytest.approx(full_logger.series("vne/features.1")[step], rel=1e-6)
    hist_full = full.state_dict()["history"]["features.1"]
    hist_resumed = second.state_dict()["history"]["features.1"]
    assert hist_resumed["steps"] == hist_full["steps"] == [0, 3, 6, 9]
    for a, b in zip(hist_full["spectra"], hist_resumed["spectra"], strict=True):
        torch.testing.assert_close(a, b)


def test_state_key_distinguishes_instances():
    a = SpectralMonitor(every_n_steps=10)
    b = SpectralMonitor(every_n_steps=10, layers=["features.*"])
    assert a.state_key != b.state_key


# ------------------------------------------------------------------------------- flavours, DDP
def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(HERE))


@pytest.mark.slow
def test_pytorch_lightning_trainer_in_subprocess():
    proc = _run([sys.executable, str(HERE / "spectral_pl_script.py")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["flavour"] == "pytorch_lightning"
    assert result["lightning_pytorch_imported"] is False
    assert "vne/features.1" in result["tags"] and "weight_rank90/classifier" in result["tags"]
    assert {0, 2} <= set(result["steps"])


@pytest.mark.slow
def test_ddp_two_processes_value_on_union_of_rows(tmp_path):
    proc = _run([sys.executable, str(HERE / "spectral_ddp_script.py"), str(tmp_path)], 400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every rank joined the gather: both saw the union (16 rows per rank and step)
    for rank in (0, 1):
        event = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert event["step"] == 2 and set(event["rows"].values()) == {32}
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): r for r in rows if r.get("vne/features.1")}
    assert sorted(logged) == [0, 2]
    # step 0: both ranks ran the same initial model on their own first batch; the logged value
    # must be the one on the union of the two batches
    x = torch.cat([torch.load(tmp_path / f"input{r}.pt") for r in (0, 1)])
    assert x.shape == (32, 64)
    model = mlp()
    rec = Recorder(model, ["features.1", "features.3", "classifier"])
    model.train()
    with torch.no_grad():
        model(x)
    rec.remove()
    for name, outs in rec.outputs.items():
        h = outs[0]
        assert float(logged[0][f"vne/{name}"]) == pytest.approx(float(LF.vne(h)), rel=1e-5)
        half = float(LF.vne(h[:16]))  # what rank 0 alone would give
        assert float(logged[0][f"vne/{name}"]) != pytest.approx(half, rel=1e-4)
        w = float(LF.singular_values(model.get_submodule(name).weight.detach())[0])
        assert float(logged[0][f"weight_sv_max/{name}"]) == pytest.approx(w, rel=1e-5)


def test_one_host_transfer_per_event(make_trainer, memory_logger_cls, monkeypatch):
    from lightning_spectral import report

    calls: list[int] = []
    real = report.to_host

    def counting(scalars, vectors=None):
        calls.append(1)
        return real(scalars, vectors)

    monkeypatch.setattr(report, "to_host", counting)
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=2, weights_every_n_steps=3, figures=False)
    make_trainer([monitor], max_steps=6, logger=logger).fit(mlp(), digits_loader())
    # activation events at 0, 2, 4; weight events at 0, 3 and the final weights at 6:
    # steps 0, 2, 3, 4, 6 -> five events, each moved to the host once
    steps = sorted({s for s, _ in logger.records})
    assert steps == [0, 2, 3, 4, 6]
    assert len(calls) == len(logger.records) == 5


def test_figure_clock_counts_charged_work_against_the_budget():
    from lightning_spectral.callbacks._base import FigureClock

    clock = FigureClock()
    clock.start()
    assert clock.allowed(0.01)  # the first figure always
    with clock.timed():
        pass
    clock.t0 -= 100.0  # 100 s of fit so far; figures took ~0 s
    assert clock.allowed(0.01)
    clock.charge(0.9)
    assert clock.allowed(0.01)  # 0.9 s of 1 % of 100 s
    clock.charge(0.2)
    assert not clock.allowed(0.01)  # 1.1 s > 1 s
    clock.charge(-5.0)  # never credited back
    assert not clock.allowed(0.01)
    clock.start()
    assert clock.allowed(0.01) and clock.work == 0.0 and clock.drawn == 0


def test_per_event_figures_fill_only_what_the_events_leave_of_the_budget(
    make_trainer, tmp_path, monkeypatch
):
    """The monitor's own event time counts against ``figure_budget``: events that alone use
    more than the budget leave no room for figures after the first, even when drawing is free."""
    import time as _time

    from lightning_spectral.plots import spectral as spectral_plots

    drawn: list[int] = []
    monkeypatch.setattr(spectral_plots, "spectra_figure", lambda panels, step: step)
    monkeypatch.setattr(SpectralMonitor, "_figure",
                        lambda self, trainer, tag, fig, step: drawn.append(step)
                        if tag == "spectra/all_layers" else None)
    original = SpectralMonitor._compute_event

    def slow(self, *args, **kwargs):
        _time.sleep(0.05)  # an event that costs far more than 1 % of these short steps
        return original(self, *args, **kwargs)

    def fit(budget: float, slow_events: bool) -> list[int]:
        drawn.clear()
        monkeypatch.setattr(SpectralMonitor, "_compute_event", slow if slow_events else original)
        monitor = SpectralMonitor(every_n_steps=2, weights=False, figure_budget=budget)
        logger = TensorBoardLogger(str(tmp_path), name="charged")
        make_trainer([monitor], max_steps=12, logger=logger).fit(mlp(), digits_loader())
        return list(drawn)

    assert fit(1.0, slow_events=True) == [0, 2, 4, 6, 8, 10]  # a budget of all the time
    assert fit(0.01, slow_events=True) == [0]  # the events alone exceed 1 %
    assert monitor_charges_work(make_trainer, tmp_path)


def monitor_charges_work(make_trainer, tmp_path) -> bool:
    monitor = SpectralMonitor(every_n_steps=2, figures=False)
    make_trainer([monitor], max_steps=4).fit(mlp(), digits_loader())
    return monitor._figures.work > 0.0 and monitor._figures.drawn == 0


def test_state_key_is_lightnings_format_and_follows_the_configuration():
    """Lightning reads ``state_key`` around every hook call: it is formatted once per
    configuration, never stale."""
    from lightning.pytorch.callbacks import Callback

    monitor = SpectralMonitor(layers=["a", "b"])
    want = Callback._generate_state_key(monitor, every_n_steps=100, layers=["a", "b"],
                                        weights_every_n_steps=5000)
    assert monitor.state_key == want
    assert monitor.state_key is monitor.state_key  # cached
    monitor.layers.append("c")  # mutated in place
    assert "'c'" in monitor.state_key
    monitor.prefix = "student/"
    assert monitor.state_key.endswith("'prefix': 'student/'}")
