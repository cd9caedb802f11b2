"""The quantity table: every entry computes what its stand-alone function computes, is
documented, and points at an existing section of docs/definitions.md."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from lightning_spectral import functional as LF
from lightning_spectral.functional.quantities import (
    ACTIVATION_QUANTITIES,
    QUANTITIES,
    WEIGHT_QUANTITIES,
    Spectra,
    compute_quantities,
    quantity,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_names_are_unique_and_split_by_kind():
    names = [q.name for q in QUANTITIES]
    assert len(names) == len(set(names))
    assert ACTIVATION_QUANTITIES == ("vne", "erank", "eig_max", "condition", "rankme")
    assert WEIGHT_QUANTITIES == (
        "weight_stable_rank", "weight_erank", "weight_sv_max", "weight_rank90", "weight_rank99",
        "weight_alpha", "weight_alpha_weighted",
    )
    assert all(q.direction in ("higher", "lower", "neutral") and q.meaning for q in QUANTITIES)


@pytest.mark.parametrize("q", QUANTITIES, ids=lambda q: q.name)
def test_every_quantity_is_documented(q):
    metrics = (DOCS / "metrics.md").read_text(encoding="utf-8")
    headings = [line for line in metrics.splitlines() if line.startswith("### ")]
    assert any(f"`{q.name}/" in h for h in headings), f"no ### `{q.name}/...` in metrics.md"
    anchors = set(re.findall(r'<a id="([^"]+)">', (DOCS / "definitions.md").read_text("utf-8")))
    assert q.anchor in anchors


def test_unknown_name_lists_the_table():
    with pytest.raises(KeyError, match="weight_alpha"):
        quantity("nope")


def test_activation_quantities_match_their_functions():
    h = torch.randn(3, 40, 12, dtype=torch.float64)
    lam = LF.autocorrelation_eigvals(h)
    raw = LF.autocorrelation_eigvals(h, normalize=False)
    got = compute_quantities(ACTIVATION_QUANTITIES, Spectra(lam=lam, raw=raw))
    assert got.shape == (3, 5)
    torch.testing.assert_close(got[:, 0], LF.vne(h))
    torch.testing.assert_close(got[:, 1], LF.effective_rank(lam))
    torch.testing.assert_close(got[:, 2], lam[:, 0])
    torch.testing.assert_close(got[:, 3], LF.condition_number(lam))
    torch.testing.assert_close(got[:, 4], LF.rankme(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_padded_activation_spectra_match_each_layer_alone(dtype):
    """Spectra of different lengths zero-padded into one group (as the monitor batches every
    layer of an event) give each layer's own values: the padding adds no RankMe ε term, does not
    become λ_min, and the cutoff is not re-applied at the padded width."""
    g = torch.Generator().manual_seed(0)
    rows = [
        torch.randn(40, 12, generator=g, dtype=dtype),  # m = 12
        torch.randn(5, 30, generator=g, dtype=dtype),  # m = 5 (n < d)
        torch.randn(40, 3, generator=g, dtype=dtype) @ torch.randn(3, 9, generator=g, dtype=dtype),
        torch.ones(7, 4, dtype=dtype),  # rank one: condition = inf
        torch.zeros(6, 2, dtype=dtype),  # zero rows: erank = RankMe = 0, condition NaN
        torch.full((4, 6), float("nan"), dtype=dtype),  # non-finite: NaN everywhere
    ]
    lams = [LF.autocorrelation_eigvals(h) for h in rows]
    raws = [LF.autocorrelation_eigvals(h, normalize=False) for h in rows]
    width = max(t.shape[-1] for t in lams)

    def pad(ts):
        return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in ts])

    sizes = torch.tensor([t.shape[-1] for t in lams])
    got = compute_quantities(ACTIVATION_QUANTITIES,
                             Spectra(lam=pad(lams), raw=pad(raws), sizes=sizes, cut=True))
    for i, (lam, raw) in enumerate(zip(lams, raws, strict=True)):
        alone = compute_quantities(ACTIVATION_QUANTITIES, Spectra(lam=lam, raw=raw))
        torch.testing.assert_close(got[i], alone, rtol=4 * torch.finfo(dtype).eps, atol=0.0,
                                   equal_nan=True, msg=f"layer {i}")
    assert math.isinf(got[3, 3]) and math.isnan(got[4, 3]) and got[4, 1] == 0 == got[4, 4]
    assert torch.isnan(got[5]).all()
    # the padding would otherwise be the smallest eigenvalue and add m_max - m ε-terms
    naive = compute_quantities(ACTIVATION_QUANTITIES, Spectra(lam=pad(lams), raw=pad(raws)))
    assert math.isinf(naive[1, 3]) and naive[1, 4] > got[1, 4]


def test_padded_spectra_must_be_cut():
    with pytest.raises(ValueError, match="cut"):
        Spectra(lam=torch.ones(2, 3), sizes=torch.tensor([3, 2]))


def test_raw_is_only_needed_by_rankme():
    lam = LF.autocorrelation_eigvals(torch.randn(20, 6))
    assert [q.name for q in QUANTITIES if q.raw] == ["rankme"]
    compute_quantities(("vne", "erank", "eig_max", "condition"), Spectra(lam=lam))
    with pytest.raises(ValueError, match="raw"):
        compute_quantities(("rankme",), Spectra(lam=lam))


def test_weight_quantities_match_their_functions_with_zero_padding():
    w = [torch.randn(8, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)]
    svals = [LF.singular_values(x) for x in w]
    s = torch.nn.utils.rnn.pad_sequence(svals, batch_first=True)
    got = compute_quantities(WEIGHT_QUANTITIES, Spectra(s=s))
    for i, (x, sv) in enumerate(zip(w, svals, strict=True)):
        row = dict(zip(WEIGHT_QUANTITIES, got[i].tolist(), strict=True))
        assert row["weight_stable_rank"] == pytest.approx(float(LF.stable_rank(x)))
        assert row["weight_erank"] == pytest.approx(float(LF.effective_rank(sv.square())))
        assert row["weight_sv_max"] == pytest.approx(float(sv[0]))
        assert row["weight_rank90"] == float(LF.truncation_rank(sv, 0.9))
        assert row["weight_rank99"] == float(LF.truncation_rank(sv, 0.99))
        fit = LF.powerlaw_alpha(sv.square())
        for key, want in (("weight_alpha", fit.alpha), ("weight_alpha_weighted",
                                                         fit.alpha_weighted)):
            assert (math.isnan(row[key]) and math.isnan(float(want))) or row[key] == \
                pytest.approx(float(want))


def test_stable_rank_known_values_and_edge_cases():
    s = torch.tensor([[2.0, 1.0, 1.0], [0.0, 0.0, 0.0], [float("nan"), 1.0, 0.0]])
    got = LF.stable_rank_from_singular_values(s)
    assert got[0] == pytest.approx(6 / 4)
    assert torch.isnan(got[1]) and torch.isnan(got[2])
    assert torch.isnan(LF.stable_rank_from_singular_values(torch.zeros(0)))


def test_shared_intermediates_are_computed_once():
    sp = Spectra(s=torch.rand(4, 30) + 0.1)
    assert sp.powerlaw is sp.powerlaw and sp.s2 is sp.s2
