"""Unit tests of lightning_spectral.capture (no Trainer): selection, reductions, bounds, hooks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_spectral.capture import (
    LayerCapture,
    is_compiled,
    resolve_layers,
    rows_channel_first,
    rows_channel_last,
)
from lightning_spectral.errors import SpectralConfigError, SpectralWarning

pytestmark = pytest.mark.usefixtures("one_thread")


class Quantize(nn.Module):
    """A layer with an integer output (unsupported: skipped with a warning)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 4).long()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.seq = nn.Conv1d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 6)
        self.quant = Quantize()
        self.lstm = nn.LSTM(6, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)  # (B, 4, 8, 8); the ReLU is in place on the conv output
        s = self.seq(h.flatten(2))  # (B, 5, 64)
        t = self.fc(s.transpose(1, 2))  # (B, 64, 6): tokens
        self.quant(t)
        t = torch.relu_(t)  # in place on the Linear's output, after its hook ran
        out, _ = self.lstm(t)  # tuple output
        return out


def test_auto_selection_and_unmatched_names_list_available():
    net = Net()
    assert resolve_layers(net, "auto") == ["encoder.0", "seq", "fc", "lstm"]
    assert resolve_layers(net, "encoder.*") == ["encoder.0", "encoder.1"]
    assert resolve_layers(net, ["fc", "encoder.0", "fc"]) == ["encoder.0", "fc"]
    with pytest.raises(SpectralConfigError) as info:
        resolve_layers(net, ["fc", "decoder.*"])
    msg = str(info.value)
    assert "'decoder.*'" in msg and "encoder.0 (Conv2d)" in msg and "lstm (LSTM)" in msg
    with pytest.raises(SpectralConfigError, match="Available modules"):
        resolve_layers(nn.Sequential(nn.ReLU()), "auto")


def test_reductions_follow_spec_0_1():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    # conv: channel-first, spatial mean -> (B, c); flatten -> (B, c*h*w)
    torch.testing.assert_close(rows_channel_first(x, "mean", 2), x.mean(dim=(2, 3)))
    assert rows_channel_first(x, "flatten", 2).shape == (2, 60)
    # unbatched conv1d output (c, L) is one sample
    assert rows_channel_first(torch.ones(3, 7), "mean", 1).shape == (1, 3)
    # channel-last: every token a row, or the token mean
    torch.testing.assert_close(rows_channel_last(x), x.reshape(-1, 5))
    torch.testing.assert_close(rows_channel_last(x, "mean"), x.reshape(2, 12, 5).mean(1))
    assert rows_channel_last(torch.ones(5)).shape == (1, 5)


def test_capture_rows_types_and_skips():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 1, 8, 8)
    cap = LayerCapture(net, layers=["encoder.0", "seq", "fc", "quant", "lstm"], max_samples=10_000)
    cap.attach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap.start(seed=0)
        net(x)
        net(x)  # a second forward of the window: rows accumulate, one warning only
        cap.stop()
    skipped = [w for w in caught if issubclass(w.category, SpectralWarning)]
    assert len(skipped) == 1 and "'quant'" in str(skipped[0].message)
    assert "quant" in cap.skipped
    rows = cap.take()
    assert set(rows) == {"encoder.0", "seq", "fc", "lstm"}
    # conv2d output mean-pooled *before* the in-place ReLU changed it
    conv_out = net.encoder[0](x)
    torch.testing.assert_close(rows["encoder.0"], torch.cat([conv_out.mean((2, 3))] * 2))
    assert (rows["encoder.0"] < 0).any()  # pre-ReLU values survived the in-place ReLU
    assert rows["seq"].shape == (6, 5)
    assert rows["fc"].shape == (2 * 3 * 64, 6)  # tokens flattened: (B·T, d)
    # copies: the in-place ReLU that ran after the hook reached neither forward's rows
    fc_out = net.fc(net.seq(net.encoder(x).flatten(2)).transpose(1, 2)).reshape(-1, 6)
    torch.testing.assert_close(rows["fc"], torch.cat([fc_out, fc_out]).detach())
    assert rows["lstm"].shape == (2 * 3 * 64, 3)  # tuple output -> first tensor
    assert not any(r.requires_grad for r in rows.values())
    assert cap.take() == {}  # buffers emptied


def test_inactive_hooks_capture_nothing_and_removal_restores_modules():
    net = Net()
    user_handle = net.fc.register_forward_hook(lambda m, a, o: None)
    before = {name: dict(m._forward_hooks) for name, m in net.named_modules()}
    cap = LayerCapture(net)
    cap.attach()
    assert len(net.fc._forward_hooks) == 2
    net(torch.randn(2, 1, 8, 8))  # not started
    assert cap.take() == {}
    cap.remove()
    after = {name: dict(m._forward_hooks) for name, m in net.named_modules()}
    assert after == before  # the user's own hook is still there, ours are gone
    user_handle.remove()


def test_memory_bound_determinism_and_global_rng():
    lin = nn.Linear(16, 8)
    model = nn.Sequential(lin)
    xs = [torch.randn(700, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def run(seed: int) -> torch.Tensor:
        cap = LayerCapture(model, max_samples=256)
        cap.attach()
        cap.start(seed=seed)
        for x in xs:
            model(x)
            assert cap.counts()["0"] <= 256  # never more than max_samples rows held
        cap.stop()
        rows = cap.take()["0"]
        cap.remove()
        return rows

    state = torch.get_rng_state()
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    assert a.shape == (256, 8) and a.numel() <= 256 * 8
    assert torch.equal(a, b)  # deterministic for a given window seed
    assert not torch.equal(a, c)
    # every kept row is one of the real outputs (a subsample, not a mixture)
    full = torch.cat([lin(x) for x in xs]).detach()
    dist = torch.cdist(a, full, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
    assert float(dist.max()) < 1e-5
    # and it mixes rows from every micro-batch (uniform over the stream, not the first 256)
    owners = torch.cdist(a, full, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1) // 700
    assert set(owners.tolist()) == {0, 1, 2, 3}


def test_compiled_model_warns():
    net = nn.Sequential(nn.Linear(3, 3))
    assert not is_compiled(net)
    net[0]._compiled_call_impl = object()  # what nn.Module.compile() sets, without compiling
    assert is_compiled(net)
    with pytest.warns(SpectralWarning, match="torch.compile"):
        LayerCapture(net).attach()


def test_bad_arguments():
    with pytest.raises(SpectralConfigError):
        LayerCapture(nn.Linear(2, 2), max_samples=0)
    with pytest.raises(SpectralConfigError):
        LayerCapture(nn.Linear(2, 2), conv_reduce="max")
