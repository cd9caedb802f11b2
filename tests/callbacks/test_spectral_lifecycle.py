"""SpectralMonitor on models and Trainer lifecycles beyond the digits MLP: reuse, exceptions,
norm layers on feature maps, recurrent and attention layers, lazy modules, gradient
checkpointing and short batches."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks.spectral import SpectralMonitor
from lightning_spectral.capture import LayerCapture, module_rows, reduction_for
from lightning_spectral.errors import SpectralWarning

pytestmark = pytest.mark.usefixtures("one_thread")


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def data(n: int, d: int, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


class Classifier(LightningModule):
    """``body`` then ``head``; optional failure at a given step."""

    def __init__(self, body: nn.Module, head: nn.Module, fail_at: int | None = None,
                 error: type[BaseException] = RuntimeError) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.fail_at = fail_at
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise self.error("boom")
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def mlp(seed: int = 0, **kw: Any) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 3), **kw)


# ------------------------------------------------------------------------------- lifecycles
def test_reused_in_a_fresh_trainer_starts_a_fresh_schedule(make_trainer, memory_logger_cls):
    x, y = data(64, 6)
    monitor = SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, histograms=False)
    first = memory_logger_cls()
    make_trainer([monitor], logger=first, max_steps=6).fit(mlp(0), loader(x, y, 8))
    second = memory_logger_cls()
    make_trainer([monitor], logger=second, max_steps=6).fit(mlp(1), loader(x, y, 8))
    fresh = memory_logger_cls()
    make_trainer(
        [SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, histograms=False)],
        logger=fresh, max_steps=6,
    ).fit(mlp(1), loader(x, y, 8))
    assert sorted(second.series("vne/body.0")) == [0, 2, 4]
    assert second.series("vne/body.0") == fresh.series("vne/body.0")
    assert second.series("weight_sv_max/head") == fresh.series("weight_sv_max/head")
    # the heatmap history is the second fit's own
    assert monitor._history["body.0"]["steps"] == [0, 2, 4]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_fit_leaves_no_hooks_and_next_fit_is_clean(
    make_trainer, memory_logger_cls, error
):
    x, y = data(64, 6)
    monitor = SpectralMonitor(every_n_steps=1, histograms=False)
    model = mlp(0, fail_at=3, error=error)
    trainer = make_trainer([monitor], max_steps=6)
    with pytest.raises((RuntimeError, SystemExit)):
        trainer.fit(model, loader(x, y, 8))
    assert no_hooks(model)
    # later inference records nothing
    model(torch.randn(1024, 6))
    assert monitor._capture is None
    # a second fit with the same callback logs from step 0, no stale event
    model.fail_at = None
    logger = memory_logger_cls()
    make_trainer([monitor], logger=logger, max_steps=3).fit(model, loader(x, y, 8))
    assert sorted(logger.series("vne/body.0")) == [0, 1, 2]
    assert all(r == 8 for r in logger.series("rows/body.0").values())
    assert no_hooks(model)


# ------------------------------------------------------------------------------- reductions
class ConvNorm(nn.Module):
    def __init__(self, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = {"bn": nn.BatchNorm2d(6), "gn": nn.GroupNorm(2, 6),
                     "in": nn.InstanceNorm2d(6, affine=True)}[norm]
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.conv(x)))).flatten(1)


@pytest.mark.parametrize("norm", ["bn", "gn", "in"])
def test_norm_layers_on_feature_maps_are_channel_first(make_trainer, memory_logger_cls, norm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 10, 10, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    model = Classifier(ConvNorm(norm), nn.Linear(6, 3))
    monitor = SpectralMonitor(every_n_steps=1, layers=["body.norm", "body.act"], weights=False)
    make_trainer([monitor], logger=memory_logger_cls(), max_steps=1).fit(model, loader(x, y, 16))
    # 16 rows (the batch) of 6 channels, not 16·10 = 160 rows of 10 (the image width)
    assert monitor.last_event["rows"] == {"body.norm": 16, "body.act": 16}
    assert monitor._history["body.norm"]["spectra"][0].numel() == 6


def test_reduction_table_by_output_layout():
    x = torch.randn(4, 6, 5)
    bn1 = nn.BatchNorm1d(6)
    assert module_rows(reduction_for(bn1), x).shape == (4, 6)  # after a Conv1d: (N, C, L)
    assert module_rows(reduction_for(bn1), x[:, :, 0]).shape == (4, 6)  # (N, C) unchanged
    assert module_rows(reduction_for(nn.GroupNorm(2, 6)), torch.randn(4, 6, 3, 3)).shape == (4, 6)
    assert module_rows(reduction_for(nn.LayerNorm(5)), x).shape == (24, 5)  # tokens
    seq = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU())
    assert module_rows(reduction_for(seq), torch.randn(4, 6, 3, 3)).shape == (4, 6)
    # an elementwise module: 4-D outputs are feature maps, 3-D outputs tokens
    assert module_rows(reduction_for(nn.ReLU()), torch.randn(4, 6, 3, 3)).shape == (4, 6)
    assert module_rows(reduction_for(nn.ReLU()), x).shape == (24, 5)


# ------------------------------------------------------------------------------- sequences
class Recurrent(LightningModule):
    def __init__(self, kind: str, packed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](5, 7, batch_first=True)
        self.head = nn.Linear(7, 3)
        self.packed = packed

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, lengths, y = batch
        if self.packed:
            out, h = self.rnn(pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False))
        else:
            out, h = self.rnn(x)
        last = (h[0] if isinstance(h, tuple) else h)[-1]
        return F.cross_entropy(self.head(last), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_recurrent_layers_tokens_and_weights(make_trainer, memory_logger_cls, kind, packed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 10, 5, generator=g)
    lengths = torch.tensor([10, 3, 7, 9, 4, 5, 10, 2] * 2)
    y = torch.randint(0, 3, (16,), generator=g)
    ds = TensorDataset(x, lengths, y)
    model = Recurrent(kind, packed)
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=1, weights_every_n_steps=1, histograms=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralWarning)
        make_trainer([monitor], logger=logger, max_steps=1).fit(
            model, DataLoader(ds, batch_size=8, shuffle=False)
        )
    tokens = int(lengths[:8].sum()) if packed else 8 * 10
    assert monitor.last_event["rows"]["rnn"] == tokens  # per-token outputs, not the final state
    assert logger.series("rows/rnn") == {0: float(tokens)}
    for pname in ("weight_ih_l0", "weight_hh_l0"):
        assert f"weight_stable_rank/rnn.{pname}" in logger.tags()
    assert no_hooks(model)


class Attention(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.embed(x)
        a, _ = self.attn(h, h, h)
        return F.cross_entropy(self.head(a.mean(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_multihead_attention_captured_as_attention(make_trainer, memory_logger_cls):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    model = Attention()
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=1, weights_every_n_steps=1, histograms=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralWarning)  # no "unused out_proj" warning
        make_trainer([monitor], logger=logger, max_steps=1).fit(model, loader(x, y, 8))
    assert monitor._capture is None  # torn down
    assert monitor.last_event["rows"] == {"embed": 40, "attn": 40, "head": 8}
    tags = logger.tags()
    assert "vne/attn" in tags and not any("out_proj" in t and t.startswith("vne/") for t in tags)
    assert "weight_stable_rank/attn.in_proj_weight" in tags
    assert "weight_stable_rank/attn.out_proj.weight" in tags
    w = model.attn.in_proj_weight.detach().double()
    s = torch.linalg.svdvals(w)
    # weights logged at step 0 are the initial ones; lr moved them since: compare the final event
    final = logger.series("weight_sv_max/attn.in_proj_weight")
    assert final[max(final)] == pytest.approx(float(s[0]), rel=1e-5)


def test_lazy_linear_gets_weight_spectra_after_its_first_forward(make_trainer, memory_logger_cls):
    x, y = data(32, 6)
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.LazyLinear(8), nn.ReLU()), nn.Linear(8, 3))
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=1, weights_every_n_steps=2, histograms=False)
    make_trainer([monitor], logger=logger, max_steps=3).fit(model, loader(x, y, 8))
    # step 0's weight event precedes the first forward (the weight does not exist yet); the
    # next weight events and the final one include it
    assert sorted(logger.series("weight_sv_max/body.0")) == [2, 3]
    assert sorted(logger.series("vne/body.0")) == [0, 1, 2]


# ------------------------------------------------------------------------------- checkpointing
class Checkpointed(Classifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.body, x, use_reentrant=False))


def test_gradient_checkpointing_captures_each_row_once(make_trainer):
    x, y = data(64, 6)
    rows = {}
    for cls in (Classifier, Checkpointed):
        torch.manual_seed(0)
        model = cls(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 3))
        monitor = SpectralMonitor(every_n_steps=1, weights=False, histograms=False)
        make_trainer([monitor], max_steps=2).fit(model, loader(x, y, 16))
        rows[cls.__name__] = dict(monitor.last_event["rows"])
    assert rows["Checkpointed"] == rows["Classifier"] == {"body.0": 16, "head": 16}


def test_capture_skips_forwards_rerun_in_backward():
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    cap = LayerCapture(block, layers=["0"], max_samples=10_000)
    cap.attach()
    cap.start()
    x = torch.randn(5, 4, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    cap.stop()
    assert cap.take()["0"].shape == (5, 4)
    cap.remove()


# ------------------------------------------------------------------------------- short batches
def test_event_on_a_short_last_batch_is_postponed(make_trainer, memory_logger_cls):
    x, y = data(35, 6)  # batches of 16, 16, 3 per epoch
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=2, weights=False, histograms=False)
    make_trainer([monitor], logger=logger, max_steps=10).fit(mlp(0), loader(x, y, 16))
    rows = logger.series("rows/body.0")
    # steps 2, 5 and 8 are the 3-row batches: the events due at 2 and 8 move to the next step
    assert sorted(rows) == [0, 3, 4, 6, 9]
    assert set(rows.values()) == {16.0}
    assert sorted(logger.series("vne/body.0")) == [0, 3, 4, 6, 9]


def test_alternating_short_batches_are_skipped(make_trainer, memory_logger_cls):
    # batches alternate 16, 2: every event that falls on a 2-row batch moves to the next step
    x, y = data(18, 6)
    logger = memory_logger_cls()
    monitor = SpectralMonitor(every_n_steps=1, weights=False, histograms=False)
    make_trainer([monitor], logger=logger, max_steps=8).fit(mlp(0), loader(x, y, 16))
    rows = logger.series("rows/body.0")
    assert rows[0] == 16.0 and all(v == 16.0 for v in rows.values())
    assert 1 not in rows and 3 not in rows  # the 2-row batches were skipped
