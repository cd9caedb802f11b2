"""Host synchronisations: the counter in lightning_spectral.testing, and every callback's count.

On a GPU each transfer to the host stalls the device queue, so the monitors move each event's
results in one transfer. On CPU ``count_host_syncs`` counts the calls that would transfer
(``.cpu()``, ``.item()``, ``.tolist()``, ``bool()``/``float()`` of a tensor), which is what these
tests hold to; ``benchmarks/bench_overhead.py --device cuda`` counts the real ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from lightning_spectral import (
    CollapseMonitor,
    CurvatureMonitor,
    SpectralAlarm,
    SpectralMonitor,
    VNEPenalty,
)
from lightning_spectral.demos import DigitsClassifier, digits_dataloaders
from lightning_spectral.testing import MemoryLogger, count_host_syncs

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(callbacks: list, max_steps: int, logger: MemoryLogger | None = None) -> MemoryLogger:
    torch.manual_seed(0)
    model = DigitsClassifier(hidden=(32, 16))
    train, _ = digits_dataloaders(batch_size=64)
    logger = logger or MemoryLogger()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, train)
    return logger


def ours(syncs) -> dict[str, int]:
    return {site: n for site, n in syncs.sites().items()
            if any(f in site for f in ("report.py", "alarm.py", "curvature.py", "collapse.py",
                                        "spectral.py", "penalty.py", "interplay.py",
                                        "spectrum.py", "capture.py", "_base.py", "weights.py"))}


# ------------------------------------------------------------------------------ the counter
def test_counter_counts_host_copies_once():
    x, y = torch.arange(6.0), torch.arange(3.0)
    with count_host_syncs("cpu") as syncs:
        x.sum().item()                 # 1
        host = y.cpu()                 # 2: the transfer (on CPU, y itself)
        host.numpy()                   # already on the host: not counted
        host[2:].tolist()              # a slice of the transferred storage: not counted
        bool(x[0] > 1)                 # 3
        float(x[1])                    # 4
        torch.from_numpy(np.ones(3)).tolist()  # host data to begin with: not counted
    assert syncs.count == 4
    assert {site.split()[-1] for site in syncs.sites()} == {".item()", ".cpu()", ".bool()",
                                                            ".float()"}
    assert syncs.count_under("tests") == 4
    assert syncs.describe().startswith("4 (")


def test_counter_restores_torch():
    item, from_numpy = torch.Tensor.item, torch.from_numpy
    with pytest.raises(RuntimeError, match="boom"), count_host_syncs("cpu"):
        raise RuntimeError("boom")
    assert torch.Tensor.item is item and torch.from_numpy is from_numpy


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message without CUDA")
def test_counter_cuda_without_cuda_is_an_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"), count_host_syncs("cuda"):
        pass


# ------------------------------------------------------------------------- the callbacks
def test_spectral_monitor_one_transfer_per_event():
    monitor = SpectralMonitor(every_n_steps=2, weights_every_n_steps=3, figures=False)
    with count_host_syncs("cpu") as syncs:
        logger = fit([monitor], max_steps=6)
    events = len({s for s, _ in logger.records})  # activation and weight events, steps 0..6
    assert events == 5
    assert syncs.count_under("lightning_spectral") == events, ours(syncs)


def test_vne_penalty_at_most_one_transfer_per_logged_step():
    # the penalty's values stay on the device and are flushed to the host together
    with count_host_syncs("cpu") as syncs:
        logger = fit([VNEPenalty("features.1", every_n_steps=1)], max_steps=6)
    logged = [s for s, m in logger.records if any(k.startswith("vne_penalty/") for k in m)]
    assert len(logged) == 6
    assert 1 <= syncs.count_under("lightning_spectral") <= len(logged), ours(syncs)


def test_collapse_monitor_two_transfers_per_epoch():
    # per epoch: one label-range check (torch.aminmax -> host) and the one transfer of results
    # (MIR/HDR every epoch; with the default budget a skipped epoch has no label check and the
    # last one's MIR/HDR come at the end of training with their own two)
    with count_host_syncs("cpu") as syncs:
        fit([CollapseMonitor(head="classifier", interplay_budget=1.0)],
            max_steps=2 * 22)  # 1348 rows / 64 = 22 batches
    assert syncs.count_under("lightning_spectral") == 2 * 2, ours(syncs)


def test_collapse_monitor_auto_head_reads_the_labels_once_per_fit():
    # head="auto" on a model with several Linears: the first batch's largest label, once
    with count_host_syncs("cpu") as syncs:
        fit([CollapseMonitor(interplay_budget=1.0)], max_steps=2 * 22)
    assert syncs.count_under("lightning_spectral") == 2 * 2 + 1, ours(syncs)


def test_alarm_reads_only_the_metrics_its_rules_name():
    spectral = SpectralMonitor(every_n_steps=5, figures=False, weights=False)
    with count_host_syncs("cpu") as syncs:
        fit([spectral, SpectralAlarm(["vne/* >= 0"])], max_steps=10)
    # the user's per-step `train_loss`/`train_acc` are never read: only the monitor's events
    assert not any("alarm.py" in site for site in syncs.sites())
    assert syncs.count_under("lightning_spectral") == 2  # events at steps 0 and 5

    alarm = SpectralAlarm(["train_loss <= 100", "train_acc >= 0"], action="warn")
    with count_host_syncs("cpu") as syncs:
        fit([alarm], max_steps=10)
    polled = sum(n for site, n in syncs.sites().items() if "alarm.py" in site)
    # both metrics in one transfer per poll: 10 batch ends and one epoch end at most
    assert 1 <= polled <= 11


def test_curvature_one_sync_per_hessian_product():
    monitor = CurvatureMonitor(every_n_steps=5, k=2)
    with count_host_syncs("cpu") as syncs:
        logger = fit([monitor], max_steps=6)
    events = len([s for s, m in logger.records if any(k.startswith("hessian/") for k in m)])
    assert events >= 1
    sites = ours(syncs)
    lanczos = sum(n for s, n in sites.items() if ".tolist()" in s and "curvature.py" in s)
    other = syncs.count_under("lightning_spectral") - lanczos
    # Lanczos needs α, β of each product on the host to decide when to stop: one transfer per
    # product (at most 20 + 4k of them); the rest is a handful per event
    assert events <= lanczos <= events * (20 + 4 * 2)
    assert other <= 4 * events, sites
