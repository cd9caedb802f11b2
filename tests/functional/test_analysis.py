"""Per-matrix checkpoint analysis (lightning_spectral.analysis; docs/definitions.md#weights).

Every value is checked against theory (known spectra) and an independent float64 NumPy SVD.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_spectral.analysis import (
    ANALYSIS_KEYS,
    CheckpointError,
    UnsafeLoadWarning,
    analyze_state_dict,
    is_weight_matrix,
    load_state_dict,
    select_weight_matrices,
    summarize_spectrum,
)

KEYS = {"name", "shape", "params", "sv_max", "stable_rank", "erank", "rank_at_energy", "energy",
        "eckart_young_rel_error", "param_ratio", "alpha", "alpha_weighted"}


def reference_row(w: np.ndarray, tau: float) -> dict:
    """Independent float64 computation of one analysis row with NumPy (docs/definitions.md)."""
    mat = w.reshape(w.shape[0], -1).astype(np.float64)
    s = np.linalg.svd(mat, compute_uv=False)
    s2 = s**2
    total = s2.sum()
    k = int(np.searchsorted(np.cumsum(s2) / total, tau - 1e-12) + 1)
    p = s2[s2 > s2.max() * len(s2) * 2.0**-52] / total
    erank = math.exp(-(p * np.log(p)).sum())
    out, cols = mat.shape
    return {
        "sv_max": s[0],
        "stable_rank": total / s2[0],
        "erank": erank,
        "rank_at_energy": k,
        "eckart_young_rel_error": math.sqrt(s2[k:].sum() / total),
        "param_ratio": k * (out + cols) / (out * cols),
        "s": s,
    }


def random_sd(gen: torch.Generator) -> OrderedDict:
    return OrderedDict(
        [
            ("conv.weight", torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64)),
            ("conv.bias", torch.randn(8, generator=gen, dtype=torch.float64)),
            ("bn.weight", torch.ones(8, dtype=torch.float64)),
            ("bn.running_mean", torch.zeros(8, dtype=torch.float64)),
            ("bn.num_batches_tracked", torch.tensor(3)),
            ("fc1.weight", torch.randn(20, 12, generator=gen, dtype=torch.float64)),
            ("fc2.weight", torch.randn(20, 12, generator=gen, dtype=torch.float64)),
            ("fc3.weight", torch.randn(5, 20, generator=gen, dtype=torch.float64)),
            ("emb.weight", torch.randn(30, 6, generator=gen, dtype=torch.float64)),
            ("attn.in_proj_weight", torch.randn(18, 6, generator=gen, dtype=torch.float64)),
            ("mask", torch.ones(4, 4, dtype=torch.float64)),
        ]
    )


def test_keys_exact_and_order():
    gen = torch.Generator().manual_seed(0)
    rows = analyze_state_dict(random_sd(gen), energy=0.9)
    assert [r["name"] for r in rows] == ["conv.weight", "fc1.weight", "fc2.weight", "fc3.weight",
                                         "emb.weight", "attn.in_proj_weight"]
    for row in rows:
        assert set(row) == KEYS
        assert tuple(row) == ANALYSIS_KEYS


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99, 1.0])
def test_values_match_numpy_svd(tau):
    gen = torch.Generator().manual_seed(1)
    sd = random_sd(gen)
    rows = analyze_state_dict(sd, energy=tau)
    assert rows
    for row in rows:
        w = sd[row["name"]].numpy()
        ref = reference_row(w, tau)
        assert row["shape"] == list(w.shape)
        assert row["params"] == w.size
        assert row["energy"] == tau
        assert row["rank_at_energy"] == ref["rank_at_energy"]
        for key in ("sv_max", "stable_rank", "erank", "eckart_young_rel_error", "param_ratio"):
            assert row[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_float32_weights_close_to_float64_reference():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 32, generator=gen)
    (row,) = analyze_state_dict({"fc.weight": w}, energy=0.9)
    ref = reference_row(w.double().numpy(), 0.9)
    assert row["sv_max"] == pytest.approx(ref["sv_max"], rel=1e-5)
    assert row["stable_rank"] == pytest.approx(ref["stable_rank"], rel=1e-5)
    assert row["erank"] == pytest.approx(ref["erank"], rel=1e-5)
    assert row["rank_at_energy"] == ref["rank_at_energy"]


def test_known_spectrum_values():
    """σ = (2, 1, 1) (docs/definitions.md#capacity): k(2/3) = 1, k(0.7) = 2, k(1) = 3."""
    w = torch.diag(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    s = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    for tau, k in ((2 / 3, 1), (0.7, 2), (1.0, 3)):
        (row,) = analyze_state_dict({"w.weight": w}, energy=tau)
        assert row["rank_at_energy"] == k
        assert row == summarize_spectrum("w.weight", (3, 3), s, tau)
    (row,) = analyze_state_dict({"w.weight": w}, energy=0.7)
    assert row["sv_max"] == pytest.approx(2.0)
    assert row["stable_rank"] == pytest.approx(6 / 4)  # Σσ² / σ1²
    p = np.array([4, 1, 1]) / 6
    assert row["erank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert row["eckart_young_rel_error"] == pytest.approx(math.sqrt(1 / 6))  # σ3² / Σσ²
    assert row["param_ratio"] == pytest.approx(2 * 6 / 9)
    # k equal singular values: erank = k, stable rank = k
    (iso,) = analyze_state_dict({"q.weight": torch.eye(5, dtype=torch.float64) * 3}, energy=1.0)
    assert iso["erank"] == pytest.approx(5.0)
    assert iso["stable_rank"] == pytest.approx(5.0)
    assert iso["rank_at_energy"] == 5 and iso["eckart_young_rel_error"] == 0.0


def test_eckart_young_matches_measured_truncation():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 4, 2, 2, generator=gen, dtype=torch.float64)
    for tau in (0.3, 0.8, 0.95):
        (row,) = analyze_state_dict({"c.weight": w}, energy=tau)
        mat = w.reshape(16, -1).numpy()
        u, s, vt = np.linalg.svd(mat, full_matrices=False)
        k = row["rank_at_energy"]
        wk = (u[:, :k] * s[:k]) @ vt[:k]
        measured = np.linalg.norm(mat - wk) / np.linalg.norm(mat)
        assert row["eckart_young_rel_error"] == pytest.approx(measured, rel=1e-9)
        assert row["eckart_young_rel_error"] <= math.sqrt(1 - tau) + 1e-12


def test_batched_statistics_equal_library_functions():
    """The batched row statistics equal the functional library's per-matrix functions."""
    from lightning_spectral.functional.spectrum import effective_rank
    from lightning_spectral.functional.weights import (
        eckart_young_error,
        singular_values,
        truncation_rank,
    )

    gen = torch.Generator().manual_seed(7)
    sd = {f"m{i}.weight": torch.randn(6, 10, generator=gen) * (i + 1) for i in range(5)}
    sd["low.weight"] = torch.randn(6, 1, generator=gen) @ torch.randn(1, 10, generator=gen)
    for row in analyze_state_dict(sd, energy=0.8):
        s = singular_values(sd[row["name"]])
        k = int(truncation_rank(s, 0.8))
        assert row["rank_at_energy"] == k
        assert row["eckart_young_rel_error"] == pytest.approx(
            float(eckart_young_error(s, k, relative=True)), rel=1e-6, abs=1e-7)
        assert row["erank"] == pytest.approx(float(effective_rank(s.square())), rel=1e-6)
    low = analyze_state_dict({"low.weight": sd["low.weight"]}, energy=0.99)[0]
    assert low["rank_at_energy"] == 1 and low["erank"] == pytest.approx(1.0)


def test_conv_reshape_and_param_ratio_formula():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 4, 3, 5, generator=gen, dtype=torch.float64)
    (row,) = analyze_state_dict({"conv.weight": w}, energy=0.9)
    s_ref = np.linalg.svd(w.numpy().reshape(6, 60), compute_uv=False)
    assert row["sv_max"] == pytest.approx(s_ref[0])
    k = row["rank_at_energy"]
    assert row["param_ratio"] == pytest.approx(k * (6 + 4 * 3 * 5) / (6 * 4 * 3 * 5))
    assert row["shape"] == [6, 4, 3, 5] and row["params"] == 360
    # a transposed layout gives the same row (transpose invariance of every quantity)
    (t,) = analyze_state_dict({"t.weight": w.reshape(6, 60).T.contiguous()}, energy=0.9)
    for key in ("sv_max", "stable_rank", "erank", "rank_at_energy", "eckart_young_rel_error",
                "param_ratio"):
        assert t[key] == pytest.approx(row[key], rel=1e-9)


def test_batched_equals_individual():
    gen = torch.Generator().manual_seed(5)
    sd = {f"l{i}.weight": torch.randn(7, 9, generator=gen) for i in range(20)}
    batched = analyze_state_dict(sd, energy=0.9)
    for row in batched:
        (single,) = analyze_state_dict({row["name"]: sd[row["name"]]}, energy=0.9)
        for key in ("sv_max", "stable_rank", "erank", "eckart_young_rel_error"):
            assert single[key] == pytest.approx(row[key], rel=1e-5), key
        assert single["rank_at_energy"] == row["rank_at_energy"]


def test_progress_called():
    calls = []
    sd = {f"l{i}.weight": torch.ones(3, 4) * (i + 1) for i in range(3)}
    analyze_state_dict(sd, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (3, 3)


def test_degenerate_weights():
    zero, bad = torch.zeros(4, 3), torch.ones(4, 3)
    bad[0, 0] = float("nan")
    rows = {r["name"]: r for r in analyze_state_dict({"z.weight": zero, "n.weight": bad})}
    z = rows["z.weight"]
    assert z["sv_max"] == 0.0 and z["stable_rank"] is None and z["erank"] == 0.0
    assert z["rank_at_energy"] == 0 and z["eckart_young_rel_error"] is None
    assert z["param_ratio"] == 0.0
    n = rows["n.weight"]
    assert n["sv_max"] is None and n["rank_at_energy"] is None and n["param_ratio"] is None


def test_selection_rules():
    assert is_weight_matrix("fc.weight", torch.zeros(2, 3))
    assert is_weight_matrix("attn.in_proj_weight", torch.zeros(6, 2))
    assert is_weight_matrix("emb.weight", torch.zeros(10, 2))
    assert not is_weight_matrix("fc.bias", torch.zeros(2, 3))
    assert not is_weight_matrix("ln.weight", torch.zeros(3))
    assert not is_weight_matrix("q.weight", torch.zeros(2, 3, dtype=torch.int8))
    assert not is_weight_matrix("weight.scale", torch.zeros(2, 3))
    gen = torch.Generator().manual_seed(0)
    picked = select_weight_matrices(random_sd(gen), exclude=["emb.*", "*in_proj*"])
    assert list(picked) == ["conv.weight", "fc1.weight", "fc2.weight", "fc3.weight"]


def test_energy_out_of_range():
    for tau in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="energy"):
            analyze_state_dict({"a.weight": torch.ones(2, 2)}, energy=tau)


# ------------------------------------------------------------------------------------------
# loading


def test_load_plain_and_lightning_style(tmp_path: Path):
    gen = torch.Generator().manual_seed(6)
    sd = {"fc.weight": torch.randn(4, 3, generator=gen), "fc.bias": torch.zeros(4)}
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": 0.1}},
               tmp_path / "model.ckpt")
    for name in ("plain.pt", "model.ckpt"):
        got = load_state_dict(tmp_path / name)
        assert list(got) == ["fc.weight", "fc.bias"]
        assert torch.equal(got["fc.weight"], sd["fc.weight"])


class _Evil:
    """Pickles to a call that would create a file if it were ever executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


class _Custom:
    def __init__(self) -> None:
        self.width = 3


class _Dict(dict):
    pass


class _List(list):
    pass


def test_load_never_runs_pickled_code(tmp_path: Path):
    marker = tmp_path / "pwned"
    sd = {"fc.weight": torch.ones(2, 2)}
    hparams = {"x": _Evil(str(marker)), "y": _Custom(), "d": _Dict(a=1), "l": _List([1, 2])}
    torch.save({"state_dict": sd, "hyper_parameters": hparams}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused to unpickle") as info:
        load_state_dict(tmp_path / "evil.ckpt")
    assert str(tmp_path / "evil.ckpt") in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    # harmless custom classes: refused by default, loaded on request with a warning
    torch.save({"state_dict": sd, "hyper_parameters": {"y": _Custom(), "d": _Dict(a=1)}},
               tmp_path / "custom.ckpt")
    with pytest.raises(CheckpointError, match="_Custom"):
        load_state_dict(tmp_path / "custom.ckpt")
    with pytest.warns(UnsafeLoadWarning, match="weights_only=False"):
        assert list(load_state_dict(tmp_path / "custom.ckpt", unsafe=True)) == ["fc.weight"]
    assert not marker.exists()


def test_load_errors_name_file(tmp_path: Path):
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"a": 1}, tmp_path / "nodict.pt")
    cases = {
        tmp_path / "missing.ckpt": "no such file",
        tmp_path: "directory",
        tmp_path / "text.ckpt": "not a PyTorch/Lightning checkpoint",
        tmp_path / "list.pt": "no state_dict",
        tmp_path / "nodict.pt": "no state_dict",
    }
    for path, what in cases.items():
        with pytest.raises(CheckpointError, match=what) as info:
            load_state_dict(path)
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)
