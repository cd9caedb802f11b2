#!/usr/bin/env bash
# The project as a user installs it: a new virtual environment in a temporary folder,
# torch==2.13.0 first, then `pip install .` with no extras. Then, from outside the checkout (so
# the installed copy is what runs):
#   1. every public name resolves, py.typed is installed, the command starts;
#   2. an optional feature whose package is missing fails in one line, exit status 2;
#   3. every example that declares no extra runs (scripts/run_examples.py --no-extras);
#   4. with scikit-learn added (the digits of lightning_spectral.demos), README.md's snippet
#      trains and its `lightning-spectral check ...` line passes (scripts/readme_snippet.py).
# Called by .ci/run; pip's download cache is used, nothing else is kept.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ls-fresh-install.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
step() { echo "== fresh install [$((SECONDS - START)) s]: $*"; }

step "venv, torch==2.13.0, then pip install . (no extras)"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --no-compile --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --no-compile --disable-pip-version-check "$REPO"
cd "$WORK"

step "public names, py.typed, the command"
"$PY" - <<'EOF'
import sys
from pathlib import Path

import lightning_spectral as ls
import lightning_spectral.functional as F

missing = [n for n in ls.__all__ if getattr(ls, n, None) is None]
missing += [f"functional.{n}" for n in F.__all__ if getattr(F, n, None) is None]
if missing:
    sys.exit(f"unresolved public names: {missing}")
if not (Path(ls.__file__).parent / "py.typed").is_file():
    sys.exit("py.typed is not installed with the package")
if "site-packages" not in ls.__file__:
    sys.exit(f"imported {ls.__file__}, not the installed copy")
flavour = [m for m in ("lightning", "pytorch_lightning") if m in sys.modules]
print(f"lightning_spectral {ls.__version__}: {len(ls.__all__)} + {len(F.__all__)} public names, "
      f"py.typed installed")
EOF
"$WORK/venv/bin/lightning-spectral" --version

step "an optional feature without its package: one line, exit 2"
"$PY" - <<'EOF'
import importlib.util
import sys

if importlib.util.find_spec("sklearn") is not None:
    sys.exit("scikit-learn is installed by `pip install .`: the no-extras check means nothing")
try:
    from lightning_spectral.demos import load_digits_tensors

    load_digits_tensors()
except ImportError as exc:
    print(f"lightning_spectral.demos without scikit-learn: ImportError: {exc}")
    if "scikit-learn" not in str(exc):
        sys.exit("the message does not name the package to install")
else:
    sys.exit("load_digits_tensors() worked without scikit-learn")
EOF
"$PY" -c "
import torch
torch.save({'fc.weight': torch.zeros(10, 64), 'fc.bias': torch.zeros(10)}, 'a.pt')
torch.save({'fc.weight': torch.ones(10, 64), 'fc.bias': torch.zeros(10)}, 'b.pt')"
set +e
"$WORK/venv/bin/lightning-spectral" align a.pt b.pt --data digits >align.out 2>align.err
code=$?
set -e
cat align.err
if [ "$code" -ne 2 ] || [ "$(wc -l <align.err)" -ne 1 ] || ! grep -q "scikit-learn" align.err; then
    echo "lightning-spectral align --data digits without scikit-learn: exit $code, wanted 2 and" \
         "one line on stderr naming scikit-learn" >&2
    exit 1
fi

step "examples that need no extra"
"$PY" "$REPO/scripts/run_examples.py" --no-extras

step "README.md's snippet and its gate (with the demos extra: scikit-learn's digits)"
"$PY" -m pip install -q --no-compile --disable-pip-version-check "$REPO[demos]"
"$PY" "$REPO/scripts/readme_snippet.py" --run "$WORK/readme"

step "passed"
