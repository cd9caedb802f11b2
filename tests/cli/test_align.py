"""``lightning-spectral align`` (lightning_spectral._cli.align; docs/definitions.md#barrier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_spectral._cli.align import rebuild_mlp
from lightning_spectral.cli import main
from lightning_spectral.functional.symmetry import permute_hidden_units

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int, widths=(64, 16, 12, 10), bn: bool = False) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.3)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)
        layers.append(lin)
        if i < len(widths) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["align", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _save(model: nn.Module, path: Path, lightning: bool = False) -> str:
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 1, "global_step": 7} if lightning else state, path)
    return str(path)


def test_permuted_copy_random_data_barrier_vanishes_after_alignment(tmp_path, capsys):
    a = _mlp(0)
    b = permute_hidden_units(a, [torch.randperm(16, generator=torch.Generator().manual_seed(1)),
                                 torch.randperm(12, generator=torch.Generator().manual_seed(2))])
    pa, pb = _save(a, tmp_path / "a.pt"), _save(b, tmp_path / "b.ckpt", lightning=True)
    code, out, err = _run(capsys, pa, pb, "--data", "random", "--json", "--points", "5")
    assert code == 0, err
    res = json.loads(out)
    assert res["barrier_before"] > 1e-3
    assert res["barrier_after"] == pytest.approx(0.0, abs=1e-10)
    assert len(res["losses_before"]) == 5
    # text output, and --max-barrier: 0 passes for the aligned copy
    code, out, _ = _run(capsys, pa, pb, "--data", "random", "--max-barrier", "1e-9")
    assert code == 0
    assert "barrier before alignment" in out and "barrier after alignment" in out


def test_pt_data_file_and_max_barrier_failure(tmp_path, capsys):
    a, b = _mlp(0, widths=(8, 10, 3)), _mlp(1, widths=(8, 10, 3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    torch.save((x, y), tmp_path / "data.pt")
    pa, pb = _save(a, tmp_path / "a.pt"), _save(b, tmp_path / "b.pt")
    code, out, err = _run(capsys, pa, pb, "--data", str(tmp_path / "data.pt"), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["loss"].startswith("cross-entropy")
    # the first point is model A's cross-entropy, computed independently
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(a(x), y))
    assert res["losses_before"][0] == pytest.approx(want, abs=1e-6)
    code, _, err = _run(capsys, pa, pb, "--data", str(tmp_path / "data.pt"),
                        "--max-barrier", "-1")
    assert code == 1 and "exceeds --max-barrier" in err


def test_rebuild_with_batchnorm_and_lightning_prefixes(tmp_path):
    model = _mlp(3, bn=True)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    state = {f"model.net.{k}": v for k, v in model.state_dict().items()}
    rebuilt = rebuild_mlp(state, "relu")
    x = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing", "no such file"),
        ("garbage", "not a PyTorch/Lightning checkpoint"),
        ("empty", "empty file"),
        ("directory", "is a directory"),
        ("bad-data-file", "not a PyTorch/Lightning checkpoint"),
        ("data-dir", "is a directory"),
        ("conv", "only Linear chains"),
        ("mismatch", "architecture differs"),
        ("digits-shape", "--data digits needs a 64-input, 10-output model"),
        ("bad-data", "no such data file"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, setup, match):
    pa = _save(_mlp(0, widths=(8, 6, 3)), tmp_path / "a.pt")
    pb = _save(_mlp(1, widths=(8, 6, 3)), tmp_path / "b.pt")
    extra: list[str] = ["--data", "random"]
    if setup == "missing":
        pb = str(tmp_path / "nope.ckpt")
    elif setup == "garbage":
        (tmp_path / "g.ckpt").write_bytes(b"not a checkpoint")
        pb = str(tmp_path / "g.ckpt")
    elif setup == "conv":
        pb = _save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                   tmp_path / "conv.pt")
    elif setup == "mismatch":
        pb = _save(_mlp(1, widths=(8, 7, 3)), tmp_path / "b2.pt")
    elif setup == "digits-shape":
        extra = []
    elif setup == "bad-data":
        extra = ["--data", str(tmp_path / "none.pt")]
    elif setup == "empty":
        (tmp_path / "e.ckpt").write_bytes(b"")
        pb = str(tmp_path / "e.ckpt")
    elif setup == "directory":
        pb = str(tmp_path)
    elif setup == "bad-data-file":
        (tmp_path / "xy.pt").write_text("not tensors")
        extra = ["--data", str(tmp_path / "xy.pt")]
    elif setup == "data-dir":
        extra = ["--data", str(tmp_path)]
    code, out, err = _run(capsys, pa, pb, *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow
def test_digits_default_with_real_lightning_checkpoints(tmp_path, capsys):
    import lightning.pytorch as pl

    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # module initialisation of this test's own models
        model = DigitsClassifier(arch="mlp", hidden=(16, 12), lr=0.01)
        train, _ = digits_dataloaders(batch_size=64, seed=seed)
        trainer = pl.Trainer(max_steps=30, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=tmp_path)
        trainer.fit(model, train)
        path = tmp_path / f"seed{seed}.ckpt"
        trainer.save_checkpoint(path)
        paths.append(str(path))
    code, out, err = _run(capsys, *paths, "--json", "--points", "5")
    assert code == 0, err
    res = json.loads(out)
    assert res["loss"].startswith("cross-entropy on the digits")
    assert res["barrier_after"] <= res["barrier_before"] + 1e-6
