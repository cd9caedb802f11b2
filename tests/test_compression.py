"""Truncated-SVD compression (lightning_spectral.compression; docs/definitions.md#weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.compression import (
    CompressionCurve,
    accuracy,
    compress,
    compression_curve,
)
from lightning_spectral.errors import SpectralConfigError


def small_cnn(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Conv(stride 2, dilation, padding) → Conv → Linear → Linear, all in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, stride=2, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(12, 16, (3, 2), padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 5, 40),
        nn.ReLU(),
        nn.Linear(40, 7),
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    return model


def inputs(dtype: torch.dtype = torch.float64, n: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=dtype)


def numpy_truncation(w: torch.Tensor, k: int) -> np.ndarray:
    mat = w.detach().double().reshape(w.shape[0], -1).numpy()
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def test_full_rank_equals_original_float64():
    model = small_cnn()
    x = inputs()
    small, report = compress(model, rank=10_000, skip_if_larger=False)
    assert all(c.status == "compressed" and c.rank == c.full_rank for c in report.layers)
    assert len(report.layers) == 4
    torch.testing.assert_close(small(x), model(x), rtol=1e-10, atol=1e-12)
    for c in report.layers:
        assert c.bound_error == 0.0
        assert c.measured_error < 1e-12


def test_full_rank_equals_original_float32():
    model = small_cnn(torch.float32)
    x = inputs(torch.float32)
    small, _ = compress(model, energy=1.0, skip_if_larger=False)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_rank_k_error_equals_eckart_young(k):
    model = small_cnn()
    small, report = compress(model, rank=k, skip_if_larger=False)
    modules = dict(model.named_modules())
    new = dict(small.named_modules())
    for c in report.layers:
        w = modules[c.name].weight
        assert c.rank == k
        # theory: the installed factors are the best rank-k approximation, error = EY bound
        assert c.measured_error == pytest.approx(c.bound_error, rel=1e-10, abs=1e-12)
        s = np.linalg.svd(w.detach().reshape(w.shape[0], -1).numpy(), compute_uv=False)
        assert c.bound_error == pytest.approx(math.sqrt((s[k:] ** 2).sum()), rel=1e-10)
        # independent: B A equals NumPy's truncated SVD
        first, second = new[c.name][0], new[c.name][1]
        ba = second.weight.detach().reshape(second.weight.shape[0], k) @ first.weight.detach(
        ).reshape(k, -1)
        np.testing.assert_allclose(ba.numpy(), numpy_truncation(w, k), rtol=1e-9, atol=1e-12)
        assert first.bias is None
        assert (second.bias is None) == (modules[c.name].bias is None)


def test_rank_k_float32_error_close_to_bound():
    model = small_cnn(torch.float32)
    _, report = compress(model, rank=2, skip_if_larger=False)
    for c in report.layers:
        assert c.measured_error == pytest.approx(c.bound_error, rel=1e-5)


def test_outputs_of_factored_linear_and_conv():
    """The compressed layer computes x ↦ W_k x + b (Linear) and conv(x; W_k) + b (Conv2d)."""
    model = small_cnn()
    small, _ = compress(model, rank=2, skip_if_larger=False)
    x = inputs()
    conv = model[0]
    wk = torch.from_numpy(numpy_truncation(conv.weight, 2)).reshape(conv.weight.shape)
    ref = nn.functional.conv2d(x, wk, conv.bias, stride=2, padding=2, dilation=2)
    torch.testing.assert_close(small[0](x), ref, rtol=1e-10, atol=1e-12)
    lin = model[5]
    h = torch.randn(3, 320, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = h @ torch.from_numpy(numpy_truncation(lin.weight, 2)).T + lin.bias
    torch.testing.assert_close(small[5](h), ref, rtol=1e-10, atol=1e-12)


def test_params_and_flops():
    model = small_cnn()
    small, report = compress(model, rank=2, example_input=inputs(n=2))
    by = {c.name: c for c in report.layers}
    # conv 0: 12×27 weight, output 4×4 positions (stride 2, dilation 2, padding 2 on 8×8)
    c0 = by["0"]
    assert c0.params_before == 12 * 27 + 12 and c0.params_after == 2 * (12 + 27) + 12
    assert c0.flops_before == 2 * 12 * 27 * 16 and c0.flops_after == 2 * 2 * (12 + 27) * 16
    # conv 2: 16×(12·3·2) weight, kernel (3, 2), padding 1 on 4×4: 4×5 positions
    c2 = by["2"]
    assert c2.flops_before == 2 * 16 * 72 * 20 and c2.flops_after == 2 * 2 * (16 + 72) * 20
    c5 = by["5"]
    assert c5.flops_before == 2 * 40 * 320 and c5.flops_after == 2 * 2 * (40 + 320)
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in small.parameters())
    expected = report.params_before - sum(c.params_before - c.params_after for c in report.layers)
    assert report.params_after == expected
    assert "| 0 | conv2d |" in report.to_markdown()


def test_skips_layers_without_saving_and_grouped_conv():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 3))
    small, report = compress(model, energy=1.0)
    status = {c.name: c.status for c in report.layers}
    assert status == {"0": "skipped: groups=2", "2": "skipped: no saving"}
    assert isinstance(small[0], nn.Conv2d) and isinstance(small[2], nn.Linear)
    assert report.params_after == report.params_before
    bad = nn.Sequential(nn.Linear(40, 30))
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    _, rep = compress(bad, rank=2)
    assert rep.layers[0].status == "skipped: non-finite weight"


def test_rank_rules_match_theory():
    w = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64))
    w = torch.cat([w, torch.zeros(5, 20, dtype=torch.float64)], dim=1)  # (5, 25): factoring pays
    lin = nn.Linear(25, 5).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    model = nn.Sequential(lin)
    s2 = np.array([16, 4, 1, 1, 0.25])
    cases = ((0.5, 1), (16 / s2.sum(), 1), (0.89, 2), (0.9, 3), (0.98, 4), (0.99, 5), (1.0, 5))
    for tau, k in cases:
        _, rep = compress(model, energy=tau, skip_if_larger=False)
        assert rep.layers[0].rank == k, tau
    for err in (0.0, 0.2, 0.5, 1.0):
        _, rep = compress(model, max_error=err, skip_if_larger=False)
        k = rep.layers[0].rank
        tails = [math.sqrt(s2[j:].sum() / s2.sum()) for j in range(6)]
        expected = max(1, min(j for j in range(6) if tails[j] <= err + 1e-15))
        assert k == expected, err
        assert rep.layers[0].bound_error_rel <= err + 1e-12
    _, rep = compress(model, rank={"0": 3}, skip_if_larger=False)
    assert rep.layers[0].rank == 3


def test_original_untouched_modes_and_rng():
    model = small_cnn()
    model.train()
    model[5].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    small, _ = compress(model, rank=2, skip_if_larger=False, example_input=inputs())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model[5].training and model[0].training
    assert small.training and not small[5].training and not small[5][0].training
    assert small[0].training and small[0][1].training
    assert small[0][0].weight.requires_grad


def test_config_errors_list_available():
    model = small_cnn()
    with pytest.raises(SpectralConfigError, match="exactly one"):
        compress(model)
    with pytest.raises(SpectralConfigError, match="exactly one"):
        compress(model, energy=0.9, rank=2)
    with pytest.raises(SpectralConfigError, match="energy"):
        compress(model, energy=1.5)
    with pytest.raises(SpectralConfigError, match="rank"):
        compress(model, rank=-1)
    with pytest.raises(SpectralConfigError, match=r"available: \['0', '2', '5', '7'\]"):
        compress(model, energy=0.9, layers=["1"])
    _, rep = compress(model, energy=0.5, layers=["5"])
    assert [c.name for c in rep.layers] == ["5"]


# ------------------------------------------------------------------------------------------
# compression curve


def toy_problem():
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(96, 30, generator=gen)
    y = model(x).argmax(dim=-1).detach()  # the model is exactly right on its own labels
    return model, DataLoader(TensorDataset(x, y), batch_size=32)


def test_compression_curve_table_and_figure():
    model, loader = toy_problem()
    model.train()
    rng = torch.get_rng_state()
    curve = compression_curve(model, loader, energies=[0.3, 0.9, 1.0])
    assert isinstance(curve, CompressionCurve)
    assert torch.get_rng_state().equal(rng)
    assert model.training
    assert curve.baseline["metric"] == 1.0
    assert curve.baseline["params"] == sum(p.numel() for p in model.parameters())
    assert [r["energy"] for r in curve.rows] == [0.3, 0.9, 1.0]
    params = [r["params"] for r in curve.rows]
    assert params == sorted(params)
    assert curve.rows[0]["params"] < curve.baseline["params"]
    assert curve.rows[-1]["metric"] == 1.0  # τ = 1: every kept layer is exact
    assert 0.0 <= curve.rows[0]["metric"] <= 1.0
    assert curve.figure.axes and curve.figure.axes[0].get_xlabel() == "parameters"
    assert "| original |" in curve.to_markdown()


def test_compression_curve_custom_metric_and_accuracy():
    model, loader = toy_problem()
    calls = []

    def neg_mse(out: torch.Tensor, y: torch.Tensor) -> float:
        calls.append(out.shape)
        return -float(out.square().mean())

    curve = compression_curve(model, loader, energies=[0.5], metric=neg_mse)
    assert calls == [(96, 4), (96, 4)]
    assert curve.metric_name == "neg_mse"
    assert accuracy(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(SpectralConfigError, match="energies"):
        compression_curve(model, loader, energies=[0.0])


# ------------------------------------------------------------------------------------------
# PyTorch's fused fast paths: TransformerEncoder(Layer) and MultiheadAttention


class TransformerClassifier(nn.Module):
    """Linear embedding → 2-layer ``nn.TransformerEncoder`` → masked mean → Linear head."""

    def __init__(self, d_in: int = 5, d_model: int = 16, classes: int = 3, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Linear(d_in, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=48, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(d_model, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(self.embed(x), src_key_padding_mask=pad)
        keep = torch.ones(h.shape[:2]) if pad is None else (~pad).to(h.dtype)
        return self.head((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))


def _tokens(n: int = 6, length: int = 7, d_in: int = 5) -> torch.Tensor:
    return torch.randn(n, length, d_in, generator=torch.Generator().manual_seed(4))


def test_transformer_encoder_full_rank_matches_in_eval_mode():
    model = TransformerClassifier().eval()
    x = _tokens()
    with torch.no_grad():
        want = model(x)  # PyTorch's fused encoder-layer kernel
    small, report = compress(model, rank=10_000, skip_if_larger=False)
    factored = [c.name for c in report.layers if c.compressed]
    assert "encoder.layers.0.linear1" in factored and "encoder.layers.1.linear2" in factored
    assert not any("self_attn" in name for name in factored)
    assert report.fused_path_off == ["encoder", "encoder.layers.0", "encoder.layers.1"]
    assert "fused fast path switched off" in report.to_markdown()
    small.eval()
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the original keeps its fast path
    assert model.encoder.use_nested_tensor and model.encoder.layers[0].activation_relu_or_gelu


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_transformer_encoder_padding_mask_full_rank_matches_in_eval_mode():
    """A padding mask makes the uncompressed encoder run on nested tensors (reading
    ``layers[0].linear1.weight``); the compressed one must not, and agrees on the output."""
    model = TransformerClassifier().eval()
    x = _tokens()
    pad = torch.zeros(6, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[3, 2:] = True
    with torch.no_grad():
        want = model(x, pad)
    small, _ = compress(model, rank=10_000, skip_if_larger=False)
    with torch.no_grad():
        got = small.eval()(x, pad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_transformer_encoder_compressed_runs_in_eval_and_train_mode(rank):
    model = TransformerClassifier()
    x = _tokens()
    small, report = compress(model, rank=rank)
    assert report.params_after < report.params_before
    small.eval()
    with torch.no_grad():
        out = small(x)
        out_padded = small(x, torch.arange(7).expand(6, 7) >= 5)
    assert out.shape == (6, 3) and torch.isfinite(out).all() and torch.isfinite(out_padded).all()
    small.train()  # training mode: the standard path, gradients reach the factors
    small(x).square().sum().backward()
    assert small.encoder.layers[0].linear1[0].weight.grad is not None


def test_transformer_encoder_eval_output_equals_its_training_path():
    """The compressed layers run PyTorch's standard path in eval mode: with dropout off it is
    the same computation as a forward with the fast path disabled globally."""
    model = TransformerClassifier()
    small, _ = compress(model, rank=3)
    small.eval()
    x = _tokens()
    with torch.no_grad():
        got = small(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            ref = small(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_compression_curve_on_a_transformer_encoder_classifier():
    model = TransformerClassifier()
    x = torch.randn(48, 7, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model.eval()(x).argmax(-1)
    model.train()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    curve = compression_curve(model, loader, energies=[0.5, 0.9, 1.0])
    assert curve.baseline["metric"] == 1.0
    assert [r["energy"] for r in curve.rows] == [0.5, 0.9, 1.0]
    assert all(0.0 <= r["metric"] <= 1.0 for r in curve.rows)
    assert curve.rows[0]["layers_compressed"] > 0
    assert model.training


def test_multihead_attention_projections_are_never_factored():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.ModuleDict({"attn": mha, "out": nn.Linear(8, 8)})
    with pytest.raises(SpectralConfigError, match=r"MultiheadAttention.*out_proj\.weight"):
        compress(model, rank=1, layers=["attn.out_proj"])
    _, report = compress(model, rank=1)
    assert [c.name for c in report.layers] == ["out"]
    # a layer owning the attention keeps the attention's fused path
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    small, report = compress(layer, rank=2)
    assert [c.name for c in report.layers] == ["linear1", "linear2"]
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert small.eval()(x).shape == (3, 4, 8)
    assert isinstance(small.self_attn.out_proj, nn.Linear)
