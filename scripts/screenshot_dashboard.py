"""Render the "spectral" dashboard (TensorBoard's custom-scalars page) to a PNG.

    python scripts/screenshot_dashboard.py --logdir runs --out docs/images/dashboard.png

Starts ``tensorboard --logdir LOGDIR`` on 127.0.0.1 at a free port, waits until the
custom-scalars layout written by the monitors is served, opens the page in headless Chromium
and saves a screenshot; the server is always stopped. ``--train`` first writes a small digits
run (SpectralMonitor + CollapseMonitor, a few epochs) into LOGDIR when it holds no event files.

Needs a Chromium binary: on Debian/Ubuntu ``apt-get install chromium`` (or pass ``--chromium``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def find_chromium(explicit: str | None) -> str:
    for name in ([explicit] if explicit else []) + ["chromium", "chromium-browser",
                                                     "google-chrome", "chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    sys.exit("screenshot_dashboard: no Chromium found; install it with `apt-get install "
             "chromium` (Debian/Ubuntu) or pass --chromium PATH")


def train_demo(logdir: Path, epochs: int) -> None:
    """A small digits run per architecture, as examples/demo.py writes them."""
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_spectral.callbacks.collapse import CollapseMonitor
    from lightning_spectral.callbacks.spectral import SpectralMonitor
    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

    for arch in ("mlp", "cnn"):
        torch.manual_seed(0)
        train, val = digits_dataloaders(batch_size=64, image=arch == "cnn")
        trainer = Trainer(
            accelerator="cpu", devices=1, max_epochs=epochs, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
            logger=TensorBoardLogger(str(logdir), name=arch),
            callbacks=[SpectralMonitor(every_n_steps=10, weights_every_n_steps=20),
                       CollapseMonitor(head="classifier")],
        )
        trainer.fit(DigitsClassifier(arch=arch), train, val)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_layout(base: str, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"screenshot_dashboard: tensorboard exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/custom_scalars/layout",
                                        timeout=5) as resp:
                layout = json.loads(resp.read())
            if layout.get("category"):
                return layout
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"screenshot_dashboard: no custom-scalars layout served after {timeout:.0f} s "
             "(did the run use SpectralMonitor with a TensorBoardLogger?)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("docs/images/dashboard.png"))
    p.add_argument("--train", action="store_true",
                   help="write a small digits run into LOGDIR first if it has no event files")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1400)
    p.add_argument("--wait-ms", type=int, default=20000,
                   help="Chromium virtual-time budget for the page to render")
    p.add_argument("--chromium", default=None, help="path of the Chromium binary")
    args = p.parse_args(argv)
    chromium = find_chromium(args.chromium)
    has_events = args.logdir.exists() and any(args.logdir.rglob("events.out.tfevents*"))
    if not has_events:
        if not args.train:
            sys.exit(f"screenshot_dashboard: no event files under {args.logdir}; run "
                     "examples/demo.py first or pass --train")
        train_demo(args.logdir, args.epochs)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--host",
         "127.0.0.1", "--port", str(port), "--reload_interval", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        layout = wait_for_layout(base, proc, timeout=120)
        print("layout categories:", ", ".join(c["title"] for c in layout["category"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   f"--window-size={args.width},{args.height}",
                   f"--virtual-time-budget={args.wait_ms}",
                   f"--screenshot={args.out.resolve()}", f"{base}/#custom_scalars"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if done.returncode != 0 or not args.out.exists():
            sys.exit(f"screenshot_dashboard: chromium failed ({done.returncode}): "
                     f"{done.stderr[-1000:]}")
        print(f"wrote {args.out}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
