"""``lightning-spectral analyze`` (lightning_spectral._cli.analyze; docs/definitions.md#weights)."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_spectral.cli import main
from lightning_spectral.functional.powerlaw import weight_alpha

KEYS = ["name", "shape", "params", "sv_max", "stable_rank", "erank", "rank_at_energy", "energy",
        "eckart_young_rel_error", "param_ratio", "alpha", "alpha_weighted"]


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of the digits CNN after one training step."""
    import lightning.pytorch as pl

    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

    torch.manual_seed(0)
    model = DigitsClassifier(arch="cnn", hidden=(24,))
    train, _ = digits_dataloaders(batch_size=32)
    root = tmp_path_factory.mktemp("ckpt")
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=root)
    trainer.fit(model, train)
    path = root / "digits.ckpt"
    trainer.save_checkpoint(path)
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["analyze", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def numpy_reference(w: torch.Tensor, tau: float) -> dict:
    mat = w.detach().double().reshape(w.shape[0], -1).numpy()
    s = np.linalg.svd(mat, compute_uv=False)
    s2 = s**2
    k = int(np.searchsorted(np.cumsum(s2) / s2.sum(), tau - 1e-12) + 1)
    return {"sv_max": s[0], "stable_rank": s2.sum() / s2[0], "rank_at_energy": k,
            "eckart_young_rel_error": math.sqrt(s2[k:].sum() / s2.sum()),
            "param_ratio": k * sum(mat.shape) / mat.size}


def test_json_lightning_ckpt_keys_and_values(capsys, lightning_ckpt):
    code, out, err = run_cli(capsys, lightning_ckpt, "--format", "json", "--energy", "0.9")
    assert code == 0, err
    rows = json.loads(out)
    sd = torch.load(lightning_ckpt, weights_only=True)["state_dict"]
    assert [r["name"] for r in rows] == ["features.0.weight", "features.2.weight",
                                         "features.6.weight", "classifier.weight"]
    for row in rows:
        assert list(row) == KEYS
        w = sd[row["name"]]
        ref = numpy_reference(w, 0.9)
        assert row["shape"] == list(w.shape) and row["params"] == w.numel()
        assert row["rank_at_energy"] == ref["rank_at_energy"]
        for key in ("sv_max", "stable_rank", "eckart_young_rel_error", "param_ratio"):
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
        # the heavy-tailed exponent of σ², as weight_alpha computes it from the weight itself
        fit = weight_alpha(w.double())
        assert row["alpha"] == pytest.approx(float(fit.alpha), rel=1e-4)
        assert row["alpha_weighted"] == pytest.approx(float(fit.alpha_weighted), rel=1e-4)
    conv = rows[1]
    assert conv["shape"] == [32, 16, 3, 3]  # read as 32 × 144 (docs/definitions.md#weight-matrix)
    assert conv["param_ratio"] == pytest.approx(conv["rank_at_energy"] * (32 + 144) / (32 * 144))


def test_plain_state_dict_table_and_csv(capsys, tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {"enc.weight": torch.randn(32, 16, generator=gen), "enc.bias": torch.zeros(32),
          "norm.weight": torch.ones(32), "head.weight": torch.randn(4, 32, generator=gen)}
    path = tmp_path / "weights.pt"
    torch.save(sd, path)
    code, out, err = run_cli(capsys, path)
    assert code == 0 and err == ""
    header = out.splitlines()[0].split()
    assert header == ["name", "shape", "params", "sv_max", "stable_rank", "erank",
                      "capacity_k@99%", "EY_rel_err", "param_ratio", "alpha", "alpha_w"]
    assert "capacity_k@99%: memory-capacity estimate (see docs/definitions.md#capacity)" in out
    assert "weight_rank99" in out
    body = [line.split() for line in out.splitlines()[2:4]]
    assert [b[0] for b in body] == ["enc.weight", "head.weight"]
    assert body[0][1] == "32x16" and body[0][2] == "512"
    assert int(body[0][6]) == numpy_reference(sd["enc.weight"], 0.99)["rank_at_energy"]

    code, out, _ = run_cli(capsys, path, "--format", "csv", "--energy", "0.5")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == KEYS
    assert rows[0]["shape"] == "32x16" and float(rows[0]["energy"]) == 0.5
    assert int(rows[1]["rank_at_energy"]) == numpy_reference(sd["head.weight"], 0.5)[
        "rank_at_energy"]


def test_plot_writes_one_png_per_layer(capsys, tmp_path, lightning_ckpt):
    outdir = tmp_path / "plots"
    code, _, err = run_cli(capsys, lightning_ckpt, "--plot", outdir, "--format", "json")
    assert code == 0, err
    pngs = sorted(p.name for p in outdir.iterdir())
    assert pngs == ["classifier.weight.png", "features.0.weight.png", "features.2.weight.png",
                    "features.6.weight.png"]
    assert all((outdir / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_progress_bar_for_many_layers(capsys, tmp_path):
    sd = {f"blocks.{i}.fc.weight": torch.eye(6) * (i + 1) for i in range(20)}
    path = tmp_path / "many.pt"
    torch.save(sd, path)
    code, out, err = run_cli(capsys, path, "--progress", "always", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 20
    assert "20/20 matrices" in err
    code, out, err = run_cli(capsys, path, "--format", "json")  # auto: stderr is not a TTY
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda p: p.write_text("hello"), "not a PyTorch/Lightning checkpoint"),
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: torch.save({"bias": torch.zeros(3), "ln.weight": torch.ones(3)}, p),
         "no weight matrices"),
        (lambda p: torch.save([1, 2], p), "no state_dict"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: torch.save({"fc.weight": torch.ones(2, 2), "cfg": Path("/x"),
                               "tag": torch.device("cpu")}, p,
                              _use_new_zipfile_serialization=False), None),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, make, what):
    path = tmp_path / "input.ckpt"
    make(path)
    code, out, err = run_cli(capsys, path)
    if what is None:  # a legacy-format file with a path in it loads
        assert code == 0 and err == "", err
        return
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert what in err and str(path) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("energy", ["0", "1.5", "-1", "abc", "nan"])
def test_bad_energy_exits_2(capsys, tmp_path, energy):
    path = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.ones(3, 3)}, path)
    code, out, err = run_cli(capsys, path, "--energy", energy)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--energy" in err


def test_module_import_does_not_import_torch():
    code = (
        "import sys, argparse\n"
        "import lightning_spectral._cli.analyze as a\n"
        "p = argparse.ArgumentParser(); a.add_parser(p.add_subparsers())\n"
        "bad = [m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_float64_and_exclude(capsys, tmp_path):
    gen = torch.Generator().manual_seed(1)
    sd = {"a.weight": torch.randn(12, 7, generator=gen), "emb.weight": torch.randn(5, 3)}
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    code, out, _ = run_cli(capsys, path, "--format", "json", "--float64", "--exclude", "emb.*")
    assert code == 0
    (row,) = json.loads(out)
    s = np.linalg.svd(sd["a.weight"].double().numpy(), compute_uv=False)
    assert row["name"] == "a.weight"
    assert row["sv_max"] == pytest.approx(s[0], rel=1e-12)
    assert row["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-12)
    code, _, err = run_cli(capsys, path, "--exclude", "*")
    assert code == 2 and "no weight matrices" in err and "not excluded" in err


def test_help_lists_the_loading_options(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert "--max-bytes" in out and "--unsafe-load" in out and "trust" in out
