"""The dashboard, proven against a real TensorBoard server.

A tiny fit with SpectralMonitor and CollapseMonitor writes a run through Lightning's
TensorBoardLogger (two monitors, so the custom-scalars layout is written more than once in one
run); ``tensorboard --logdir`` is started on 127.0.0.1 at a free port, and the HTTP API that
TensorBoard's own frontend uses must list our scalar, histogram and image tags and the merged
layout (every category of both monitors). Both ingestion back ends are exercised: the Python
multiplexer (``--load_fast=false``) and the Rust data server (``--load_fast=true``), which treat
a re-written step differently.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

WAIT_S = 90.0


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_spectral.callbacks.collapse import CollapseMonitor
    from lightning_spectral.callbacks.spectral import SpectralMonitor
    from lightning_spectral.demos import DigitsClassifier, digits_dataloaders

    root = tmp_path_factory.mktemp("tb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        train, _ = digits_dataloaders(batch_size=64)
        trainer = Trainer(
            accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4,
            limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False,
            logger=TensorBoardLogger(str(root), name="mlp", version=0),
            callbacks=[
                SpectralMonitor(every_n_steps=2, weights_every_n_steps=2, max_samples=64),
                CollapseMonitor(head="classifier"),
            ],
        )
        trainer.fit(DigitsClassifier(hidden=(16, 16)), train)
    finally:
        torch.set_num_threads(threads)
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - local server
        return json.loads(resp.read().decode("utf-8"))


def _wait_for(fetch, ready, proc: subprocess.Popen, what: str):
    """Poll ``fetch()`` until ``ready(result)`` (bounded); fail with the server's output."""
    deadline = time.monotonic() + WAIT_S
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"tensorboard exited with {proc.returncode}: {out[-2000:]}")
        try:
            last = fetch()
            if ready(last):
                return last
        except (urllib.error.URLError, ConnectionError, OSError, ValueError) as exc:
            last = exc
        time.sleep(0.5)
    pytest.fail(f"timed out after {WAIT_S:.0f} s waiting for {what}; last answer: {last!r}")


@pytest.mark.parametrize("load_fast", ["false", "true"])
def test_tensorboard_serves_our_dashboard(logdir: Path, load_fast: str):
    if load_fast == "true":
        try:
            from tensorboard.data import server_ingester

            server_ingester.get_server_binary()
        except Exception as exc:  # noqa: BLE001 - any reason the Rust server is unavailable
            pytest.skip(f"tensorboard data server binary unavailable: {exc}")
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
           "127.0.0.1", "--port", str(port), f"--load_fast={load_fast}", "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/data"
    try:
        listing = _wait_for(lambda: _get(f"{base}/plugins_listing"),
                            lambda d: all(d.get(p, {}).get("enabled") for p in (
                                "scalars", "histograms", "images", "custom_scalars")),
                            proc, "the scalars/histograms/images/custom_scalars plugins")
        assert listing["custom_scalars"]["enabled"]

        scalars = _get(f"{base}/plugin/scalars/tags")
        run = "mlp/version_0"
        assert run in scalars, scalars.keys()
        tags = set(scalars[run])
        layers = {t.split("/", 1)[1] for t in tags if t.startswith("vne/")}
        assert {"features.1", "features.3", "classifier"} <= layers, tags
        for quantity in ("vne", "erank", "eig_max", "condition", "weight_stable_rank",
                         "weight_erank", "weight_sv_max"):
            assert {f"{quantity}/{n}" for n in layers} <= tags, quantity
        assert {"collapse/nc1", "collapse/mir", "collapse/hdr"} <= tags

        histograms = _get(f"{base}/plugin/histograms/tags")[run]
        assert {f"eigvals/{n}" for n in layers} <= set(histograms)
        assert {f"weight_svals/{n}" for n in layers} <= set(histograms)

        images = _get(f"{base}/plugin/images/tags")[run]
        assert "spectra/all_layers" in images, images.keys()

        layout = _get(f"{base}/plugin/custom_scalars/layout")
        categories = {c["title"]: c for c in layout["category"]}
        # both monitors' categories survive the repeated layout writes
        assert {"spectral: by quantity", "spectral: by layer", "collapse"} <= set(categories)
        by_quantity = {c["title"]: c["multiline"]["tag"] for c in
                       categories["spectral: by quantity"]["chart"]}
        assert by_quantity["vne"] == ["^vne/"]
        by_layer = {c["title"] for c in categories["spectral: by layer"]["chart"]}
        assert layers <= by_layer
        # every regex of the layout selects at least one logged scalar (no empty charts)
        for category in ("spectral: by quantity", "spectral: by layer"):
            for chart in categories[category]["chart"]:
                for regex in chart["multiline"]["tag"]:
                    assert any(re.search(regex, t) for t in tags), (chart["title"], regex)
        series = _get(f"{base}/plugin/scalars/scalars?run={run}&tag=vne/classifier")
        assert len(series) >= 2 and all(len(point) == 3 for point in series)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
