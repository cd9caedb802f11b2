"""README.md's usage snippet as a program: the code users copy, completed with a model and data.

The README shows the lines a user adds to an existing training script (a ``pl.Trainer`` with
the callbacks, ``trainer.fit(model, datamodule)``) and the CI gate (``lightning-spectral check
runs/lightning_logs/version_0 --rules gates.toml``). This script extracts both from README.md
(so the README cannot drift from what is tested) and completes the snippet with what it
assumes exists: ``pl`` (whichever Lightning flavour is installed), and a ``model`` and a
``datamodule`` from :mod:`lightning_spectral.demos` (scikit-learn's bundled digits).

The snippet's ``pl.Trainer(...)`` is run as written; its length comes from Lightning's own
``PL_TRAINER_*`` environment defaults (``TRAINER_ENV``), so no line of it is edited.

    python scripts/readme_snippet.py DIR         # writes DIR/readme_snippet.py (and the rules
                                                 # file), prints the gate command
    python scripts/readme_snippet.py --run DIR   # and runs both with this Python's install:
                                                 # exit 0 when the snippet ran and the gate passed

Used by tests/test_readme.py and scripts/fresh_install.sh.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the rules file used when the README's gate names one that does not exist yet
DEFAULT_RULES = ROOT / "examples" / "gates.toml"

#: Lightning's Trainer reads missing arguments from PL_TRAINER_<NAME> environment variables
TRAINER_ENV = {
    "PL_TRAINER_MAX_EPOCHS": "5",
    "PL_TRAINER_ACCELERATOR": "cpu",
    "PL_TRAINER_ENABLE_PROGRESS_BAR": "False",
    "PL_TRAINER_ENABLE_MODEL_SUMMARY": "False",
    "PL_TRAINER_ENABLE_CHECKPOINTING": "False",
    "PL_TRAINER_LOG_EVERY_N_STEPS": "10",
}

PRELUDE = '''\
"""README.md's snippet, completed with a model and data (written by scripts/readme_snippet.py)."""
import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone pytorch_lightning package
    import pytorch_lightning as pl

from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

torch.manual_seed(0)
model = DigitsClassifier(arch="mlp", lr=3e-3)
_train, _val = digits_dataloaders(batch_size=64, seed=0)
datamodule = pl.LightningDataModule.from_datasets(_train.dataset, _val.dataset, batch_size=64)

# ---- README.md ----
'''

_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return [(m.group("lang"), m.group("body")) for m in _FENCE.finditer(text)]


def extract(text: str) -> tuple[str, str]:
    """``(python snippet, gate command)`` from the README's text.

    The snippet is the first ``python`` block that builds a ``Trainer`` with the monitors; the
    gate command is the first line of a code block that starts with ``lightning-spectral
    check`` (its trailing ``# comment`` removed).
    """
    code = next((body for lang, body in blocks(text)
                 if lang == "python" and "Trainer(" in body and "trainer.fit(" in body), None)
    if code is None:
        raise ValueError("README.md: no python block with a Trainer(...) and trainer.fit(...)")
    check = None
    for _, body in blocks(text):
        for line in body.splitlines():
            if line.strip().startswith("lightning-spectral check"):
                check = line.split(" #", 1)[0].strip()
                break
        if check:
            break
    if check is None:
        raise ValueError("README.md: no code block line starting with 'lightning-spectral check'")
    return code, check


def program(code: str) -> str:
    """The runnable program: the completion, then the README's snippet unchanged."""
    return PRELUDE + code


def check_argv(check: str) -> list[str]:
    """The gate command's arguments after ``lightning-spectral``."""
    argv = shlex.split(check)
    assert argv[0] == "lightning-spectral", argv
    return argv[1:]


def rules_file(check: str) -> str | None:
    """The ``--rules`` file the gate command names, if any."""
    argv = check_argv(check)
    for i, arg in enumerate(argv):
        if arg == "--rules" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--rules="):
            return arg.split("=", 1)[1]
    return None


def write(directory: Path, readme: Path = README) -> str:
    """Write the program and the rules file into ``directory``; return the gate command."""
    code, check = extract(readme.read_text(encoding="utf-8"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "readme_snippet.py").write_text(program(code), encoding="utf-8")
    rules = rules_file(check)
    if rules is not None and not (directory / rules).exists():
        (directory / rules).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT_RULES, directory / rules)
    return check


def run(directory: Path, readme: Path = README, timeout: float = 600) -> int:
    """Write, train with the snippet, then run the README's gate command as a user would: the
    ``lightning-spectral`` script installed beside this Python. Returns the gate's exit status
    (or the snippet's, when that failed)."""
    check = write(directory, readme)
    env = {**os.environ, **TRAINER_ENV, "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}
    print(f"$ python readme_snippet.py   ({', '.join(f'{k}={v}' for k, v in TRAINER_ENV.items())})",
          flush=True)
    code = subprocess.run([sys.executable, "readme_snippet.py"], cwd=directory, env=env,
                          timeout=timeout).returncode
    if code != 0:
        print(f"readme_snippet.py exited {code}", file=sys.stderr)
        return code
    script = Path(sys.executable).parent / "lightning-spectral"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_spectral"]
    print(f"$ {check}", flush=True)
    return subprocess.run(command + check_argv(check), cwd=directory, env=env,
                          timeout=timeout).returncode


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--run":
        return run(Path(args[1]))
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python scripts/readme_snippet.py [--run] DIR", file=sys.stderr)
        return 2
    print(write(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
