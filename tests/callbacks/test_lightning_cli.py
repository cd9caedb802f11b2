"""Every callback is configurable from a LightningCLI YAML (class_path / init_args)."""

from __future__ import annotations

import pytest

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_spectral import (  # noqa: E402
    CollapseMonitor,
    CurvatureMonitor,
    MirrorCertificate,
    SpectralAlarm,
    SpectralMonitor,
    VNEPenalty,
)
from lightning_spectral.demos import DigitsClassifier  # noqa: E402

CASES = {
    "SpectralMonitor": (SpectralMonitor, """
      every_n_steps: 5
      layers: [features.*, classifier]
      conv_reduce: flatten
      dtype: float64
      prefix: "s/"
      prog_bar: ["erank/*"]
      figure_budget: 0.05"""),
    "CollapseMonitor": (CollapseMonitor, """
      head: classifier
      labels: 1
      source: val
      num_classes: 10"""),
    "VNEPenalty": (VNEPenalty, """
      layer: features
      alpha: -0.1
      inject: false"""),
    "SpectralAlarm": (SpectralAlarm, """
      rules: ["vne/* >= 0.5", "collapse/nc1 mean(last=3) < 2"]
      action: warn"""),
    "CurvatureMonitor": (CurvatureMonitor, """
      every_n_steps: 50
      k: 2
      mode: train"""),
    "MirrorCertificate": (MirrorCertificate, """
      beta: 0.01
      every_n_steps: 10"""),
}


def config(tmp_path, name: str, body: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(
        "trainer:\n  max_steps: 1\n  logger: false\n  callbacks:\n"
        f"  - class_path: lightning_spectral.{name}\n    init_args:{body}\n"
    )
    return str(path)


@pytest.mark.parametrize("name", list(CASES))
def test_callback_from_yaml(tmp_path, name):
    cls, body = CASES[name]
    cli = LightningCLI(DigitsClassifier, run=False, args=["--config", config(tmp_path, name, body)])
    ours = [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]
    assert len(ours) == 1
    cb = ours[0]
    if name == "SpectralMonitor":
        assert cb.every_n_steps == 5 and cb.layers == ["features.*", "classifier"]
        assert cb.dtype == "float64" and cb.prefix == "s/" and cb.prog_bar == ["erank/*"]
        assert cb.figure_budget == 0.05
    if name == "CollapseMonitor":
        assert cb.source == "val" and cb.num_classes == 10 and cb.namespace == "collapse_val"
    if name == "VNEPenalty":
        assert cb.alpha == -0.1 and cb.inject is False
    if name == "SpectralAlarm":
        assert [r.text for r in cb.rules][1] == "collapse/nc1 mean(last=3) < 2"


@pytest.mark.parametrize(
    ("name", "body", "needle"),
    [
        ("SpectralMonitor", "\n      dtype: float16", "dtype"),
        ("CollapseMonitor", "\n      source: trian", "source"),
        ("CurvatureMonitor", "\n      mode: evaluation", "mode"),
        ("SpectralAlarm", "\n      rules: [\"x >= 1\"]\n      action: halt", "action"),
    ],
)
def test_typo_in_a_choice_is_the_parsers_clean_message(tmp_path, capsys, name, body, needle):
    with pytest.raises(SystemExit) as info:
        LightningCLI(DigitsClassifier, run=False,
                     args=["--config", config(tmp_path, name, body)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
