"""README.md's snippet runs as written, and its gate command passes on the run it logs.

The code is extracted from README.md at test time (scripts/readme_snippet.py), completed with a
model and a datamodule from ``lightning_spectral.demos``, and run in a fresh process; then the
README's ``lightning-spectral check ...`` line runs on the log directory the snippet wrote and
must exit 0.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _snippet_module() -> ModuleType:
    key = "_ls_scripts_readme_snippet"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / "readme_snippet.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def test_readme_has_the_snippet_and_the_gate() -> None:
    rs = _snippet_module()
    code, check = rs.extract((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "from lightning_spectral import" in code
    for name in ("SpectralMonitor", "CollapseMonitor", "VNEPenalty"):
        assert f"{name}(" in code, f"the README snippet no longer shows {name}"
    compile(rs.program(code), "readme_snippet.py", "exec")  # the completed snippet parses
    argv = rs.check_argv(check)
    assert argv[0] == "check" and len(argv) >= 2


def test_extract_ignores_other_blocks() -> None:
    rs = _snippet_module()
    text = ("```\nmake demo\n```\n\n```python\nimport x\n```\n\n```python\n"
            "trainer = pl.Trainer()\ntrainer.fit(model, datamodule)\n```\n\n"
            "```\nlightning-spectral check runs/x --rules r.toml   # 0 pass\n```\n")
    code, check = rs.extract(text)
    assert code.startswith("trainer = pl.Trainer()")
    assert check == "lightning-spectral check runs/x --rules r.toml"
    assert rs.rules_file(check) == "r.toml"


@pytest.mark.slow
def test_readme_snippet_trains_and_its_gate_passes(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn", reason="lightning_spectral.demos reads scikit-learn's digits")
    rs = _snippet_module()
    code = rs.run(tmp_path)  # the snippet as written, then the README's gate command
    out, err = capfd.readouterr()
    assert code == 0, f"exit status {code}\n{out[-4000:]}\n{err[-4000:]}"
    assert (tmp_path / "runs" / "lightning_logs" / "version_0").is_dir()
    assert "PASS" in out
