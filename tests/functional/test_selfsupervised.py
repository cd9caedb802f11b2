"""I-VNE⁺ (Kim et al., CVPR 2023): invariance + VNE⁺ objective for self-supervised learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_spectral.functional.selfsupervised import ivne_loss, ivne_terms
from lightning_spectral.functional.spectrum import vne

F32 = torch.float32
F64 = torch.float64


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(randn(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def authors_loss(views: list[torch.Tensor], alpha1: float, alpha2: float,
                 num_large: int) -> float:
    """The authors' training script, transcribed: cosine over the pairs (i, j), i < 2, j > i;
    ``get_vne`` (SVD of the normalised rows, NaN terms dropped) averaged over every view."""
    def get_vne(h: np.ndarray) -> float:
        z = h / np.linalg.norm(h, axis=1, keepdims=True)
        lam = np.linalg.svd(z / math.sqrt(z.shape[0]), compute_uv=False) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(-np.nansum(lam * np.log(lam)))

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        num = (a * b).sum(1)
        return float((num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())

    hs = [v.numpy() for v in views]
    pairs = [(i, j) for i in range(num_large) for j in range(i + 1, len(hs))]
    avg_cos = sum(cos(hs[i], hs[j]) for i, j in pairs) / len(pairs)
    avg_vne = sum(get_vne(h) for h in hs) / len(hs)
    return -(alpha1 * avg_cos + alpha2 * avg_vne)


def test_known_values_identical_and_isotropic_views() -> None:
    d = 6
    q = orthogonal(d, seed=0)
    views = torch.stack([q, q, q])  # identical, isotropic (rows of an orthogonal matrix)
    cos, ent = ivne_terms(views)
    assert cos.item() == pytest.approx(1.0, abs=1e-12)
    assert ent.item() == pytest.approx(math.log(d), abs=1e-12)
    # α₁ = log(batch size) = log d here, α₂ = 1: L = −log d − log d
    assert ivne_loss(views).item() == pytest.approx(-2 * math.log(d), abs=1e-12)
    assert ivne_loss(views, alpha1=2.0, alpha2=0.5).item() == pytest.approx(
        -2.0 - 0.5 * math.log(d), abs=1e-12)
    # identical views, any rows: the cosine term alone is −α₁
    h = randn(32, 5, seed=1)
    assert ivne_loss([h, h], alpha1=3.0, alpha2=0.0).item() == pytest.approx(-3.0, abs=1e-12)
    assert ivne_loss([h, h], alpha2=0.0).item() == pytest.approx(-math.log(32), abs=1e-12)
    # isotropic views, whatever their alignment: the VNE term alone is −α₂ log d
    views = [orthogonal(d, seed=s) for s in (2, 3)]
    assert ivne_loss(views, alpha1=0.0, alpha2=1.5).item() == pytest.approx(
        -1.5 * math.log(d), abs=1e-12)
    # opposite views: cosine −1
    assert ivne_terms([h, -h])[0].item() == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.parametrize("num_views", [2, 3, 6])
def test_matches_authors_script(num_views: int) -> None:
    views = [randn(16, 8, seed=10 + v) + 0.5 * randn(16, 8, seed=99) for v in range(num_views)]
    alpha1 = math.log(16)
    got = ivne_loss(views, num_global=2).item()
    assert got == pytest.approx(authors_loss(views, alpha1, 1.0, 2), abs=1e-12)
    # default: every pair a < b
    want_all = authors_loss(views, alpha1, 1.0, num_views)
    assert ivne_loss(views).item() == pytest.approx(want_all, abs=1e-12)
    if num_views == 2:
        assert ivne_loss(views).item() == pytest.approx(got, abs=1e-14)


def test_terms_are_means_over_pairs_and_views() -> None:
    views = randn(4, 20, 7, seed=4)
    cos, ent = ivne_terms(views)
    pair = []
    for a in range(4):
        for b in range(a + 1, 4):
            pair.append(torch.nn.functional.cosine_similarity(views[a], views[b]).mean())
    assert cos.item() == pytest.approx(torch.stack(pair).mean().item(), abs=1e-12)
    assert ent.item() == pytest.approx(vne(views).mean().item(), abs=1e-12)
    # num_global=1: only the pairs with view 0
    cos1, _ = ivne_terms(views, num_global=1)
    assert cos1.item() == pytest.approx(torch.stack(pair[:3]).mean().item(), abs=1e-12)
    # zero rows have cosine 0 with anything (and leave the VNE unchanged)
    z = views.clone()
    z[1, 3] = 0.0
    assert torch.isfinite(torch.stack(ivne_terms(z))).all()


def test_gradcheck_float64() -> None:
    views = randn(3, 7, 4, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ivne_loss(v), (views,))
    assert torch.autograd.gradcheck(lambda v: ivne_loss(v, num_global=1), (views,))
    a = randn(6, 5, seed=6).requires_grad_()
    b = randn(6, 5, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ivne_loss([x, y]), (a, b))


def test_dtype_device_and_no_host_sync() -> None:
    views = randn(2, 16, 4, seed=8)
    assert ivne_loss(views).dtype == F64
    assert ivne_loss(views.float()).dtype == F32
    assert ivne_loss(views.half()).dtype == F32
    assert ivne_loss(views, dtype="float32").dtype == F32
    meta = torch.empty(3, 16, 4, device="meta")
    assert ivne_loss(meta).shape == ()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 views"):
        ivne_loss(randn(1, 4, 3, seed=0))
    with pytest.raises(ValueError, match="same shape"):
        ivne_loss([randn(4, 3, seed=0), randn(5, 3, seed=0)])
    with pytest.raises(ValueError, match=r"\(V, n, d\)"):
        ivne_loss(randn(4, 3, seed=0))
    with pytest.raises(ValueError, match="num_global"):
        ivne_loss(randn(2, 4, 3, seed=0), num_global=0)
    with pytest.raises(TypeError):
        ivne_loss([randn(4, 3, seed=0), np.zeros((4, 3))])
