"""CollapseMonitor's per-batch intake: the statistics and the row sample are exactly (bit for bit)
those of the rows handed over, whatever the batch sizes, dtypes and staging-block size.

References are computed independently: the class statistics with ``_collapse_update`` over the
same bulk blocks (``Q`` is a float64 matrix product, whose rounding may depend on the block), the
sample as the bottom-k of the keys of all rows by a stable sort.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_spectral.callbacks import _collapse_rows
from lightning_spectral.callbacks.collapse import CollapseMonitor
from lightning_spectral.capture import LayerCapture, rows_channel_last
from lightning_spectral.functional.collapse import CollapseStats, _collapse_update
from lightning_spectral.stats import RowReservoir
from lightning_spectral.testing import count_host_syncs

pytestmark = pytest.mark.usefixtures("one_thread")

K, D = 5, 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, D)
        self.head = nn.Linear(D, K)

    @property
    def device(self) -> torch.device:  # as a LightningModule's
        return self.head.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def monitor(max_samples: int = 40) -> CollapseMonitor:
    mon = CollapseMonitor(head="head", max_samples=max_samples)
    model = Net()
    mon.setup(None, model, "fit")  # type: ignore[arg-type]  # no Trainer needed here
    mon._start_epoch(SimpleNamespace(current_epoch=0), model)  # type: ignore[arg-type]
    return mon


def feed(mon: CollapseMonitor, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for h, y in batches:
        mon._pending_labels = y
        mon._on_rows("head", h)
    mon._flush()


def reference(batches: list[tuple[torch.Tensor, torch.Tensor]], room: int) -> CollapseStats:
    """The statistics updated block by block, a block closing when the next batch would not fit
    (a batch larger than a block goes in pieces), each block one float64 update."""
    stats = CollapseStats.zeros(K, D)
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = 0

    def close() -> None:
        nonlocal held, count
        if held:
            rows = torch.cat([h.to(torch.float64) for h, _ in held])
            _collapse_update(rows, torch.cat([y for _, y in held]), stats)
        held, count = [], 0

    pieces = [(h[s : s + room], y[s : s + room]) for h, y in batches
              for s in range(0, h.shape[0], room)]
    for h, y in pieces:
        if count + h.shape[0] > room:
            close()
        held.append((h, y))
        count += h.shape[0]
        if count == room:
            close()
    close()
    return stats


def bottom_k(rows: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = RowReservoir(k, rows.shape[1]).keys_for(rows.to(torch.float64), labels)
    order = torch.sort(keys, stable=True).indices[:k]
    return rows.to(torch.float32)[order], labels[order]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.int64 if a.dtype == torch.float64 else torch.int32),
        b.view(torch.int64 if b.dtype == torch.float64 else torch.int32),
    )


def batches_of(sizes: list[int], dtypes: list[torch.dtype], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        h = torch.relu(torch.randn(n, D, generator=gen, dtype=torch.float64))
        out.append((h.to(dtypes[i % len(dtypes)]), torch.randint(0, K, (n,), generator=gen)))
    return out


@pytest.mark.parametrize(
    ("block", "sizes", "dtypes"),
    [
        (64, [16] * 13, [torch.float32]),  # blocks filled exactly, one partial block
        (64, [7, 30, 64, 100, 3, 41, 64, 1], [torch.float32]),  # uneven, a batch over a block
        (48, [10, 20, 12, 30, 9], [torch.float32, torch.float64]),  # mixed widths in a block
        (48, [11, 25, 30], [torch.bfloat16, torch.float16, torch.float64]),
    ],
)
def test_statistics_and_sample_are_exact(monkeypatch, block, sizes, dtypes):
    monkeypatch.setattr(_collapse_rows, "_STAGE_ELEMENTS", block * D)
    batches = batches_of(sizes, dtypes)
    mon = monitor(max_samples=40)
    feed(mon, batches)
    assert mon._stage is not None and mon._stage[0].shape[0] == block
    assert mon._acc is not None and mon._reservoir is not None
    ref = reference(batches, block)
    got = mon._acc.stats
    assert torch.equal(got.counts, ref.counts)
    assert same_bits(got.sums, ref.sums)
    assert same_bits(got.second_moment, ref.second_moment)
    rows = torch.cat([h.to(torch.float64) for h, _ in batches])
    labels = torch.cat([y for _, y in batches])
    want_rows, want_labels = bottom_k(rows, labels, 40)
    got_rows, got_labels = mon._reservoir.sample()
    assert same_bits(got_rows, want_rows) and torch.equal(got_labels, want_labels)


def test_rows_are_copied_on_arrival():
    """A batch modified in place after the head ran (or a reused buffer) does not change what
    was taken in."""
    batches = batches_of([16, 16, 16], [torch.float32])
    originals = [(h.clone(), y.clone()) for h, y in batches]
    mon = monitor()
    for h, y in batches:
        mon._pending_labels = y
        mon._on_rows("head", h)
        h.add_(1000.0)  # after the sink: e.g. an in-place op of the model, a reused buffer
    mon._flush()
    assert mon._acc is not None
    ref = reference(originals, mon._stage[0].shape[0] if mon._stage is not None else 1024)
    assert same_bits(mon._acc.stats.second_moment, ref.second_moment)
    assert same_bits(mon._acc.stats.sums, ref.sums)


def test_labels_of_other_integer_dtypes_and_bad_ones():
    mon = monitor()
    h = torch.rand(8, D)
    assert mon._extract_labels((h, torch.arange(8, dtype=torch.int32) % K)) is not None
    assert mon._extract_labels((h, torch.arange(8, dtype=torch.uint8) % K)) is not None
    for bad in (torch.zeros(8), torch.zeros(8, dtype=torch.bool), torch.zeros(8) * 1j):
        assert mon._extract_labels((h, bad)) is None
    assert 1 in mon._problem_text  # the labels-dtype problem is noted


# ------------------------------------------------------------------------------ the reservoir
def test_keys_are_the_documented_formula_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(300, D, generator=gen, dtype=torch.float64)
    rows[0] = 0.0  # a zero row: the norm's floor
    labels = torch.randint(0, K, (300,), generator=gen)
    res = RowReservoir(10, D, seed=4)
    norm = torch.linalg.vector_norm(rows, dim=1).clamp_min(1e-30)
    x = (rows @ res._proj) / norm * res._PHI
    x = x + labels.to(torch.float64) * res._GAMMA + res._DELTA
    assert same_bits(res.keys_for(rows, labels), x - torch.floor(x))
    narrow = rows.float()
    assert same_bits(res.keys_for(narrow, labels), res.keys_for(narrow.double(), labels))


@pytest.mark.parametrize("k", [1, 7, 64])
def test_any_chunking_gives_the_bottom_k_and_memory_stays_bounded(k):
    gen = torch.Generator().manual_seed(k)
    rows = torch.randn(900, D, generator=gen)
    labels = torch.randint(0, K, (900,), generator=gen)
    rows, labels = torch.cat([rows, rows[:200]]), torch.cat([labels, labels[:200]])  # duplicates
    want_rows, want_labels = bottom_k(rows, labels, k)
    sizes = [1, 5, 200, 3, 64, 500, 2, 300, 25]  # chunks below, at and above the budget
    res = RowReservoir(k, D)
    start = 0
    for n in sizes:
        res.update(rows[start : start + n], labels[start : start + n])
        start += n
        assert res._pool is not None and res._pool[0].shape[0] <= 2 * k
        assert res._buffered <= 2 * k
        assert res._spare is None or res._spare[0].shape[0] == k  # 3k rows at most in all
    res.update(rows[start:], labels[start:])
    got_rows, got_labels = res.sample()
    assert same_bits(got_rows, want_rows) and torch.equal(got_labels, want_labels)


def test_a_sample_is_not_changed_by_later_updates():
    gen = torch.Generator().manual_seed(2)
    rows, labels = torch.randn(400, D, generator=gen), torch.randint(0, K, (400,), generator=gen)
    res = RowReservoir(16, D)
    res.update(rows[:100], labels[:100])
    first_rows, first_labels = res.sample()
    kept = first_rows.clone(), first_labels.clone()
    for start in range(100, 400, 30):
        res.update(rows[start : start + 30], labels[start : start + 30])
    assert torch.equal(first_rows, kept[0]) and torch.equal(first_labels, kept[1])
    assert res.sample()[0] is res.sample()[0]  # computed once until the next update
    want_rows, want_labels = bottom_k(rows, labels, 16)
    assert torch.equal(res.sample()[0], want_rows) and torch.equal(res.sample()[1], want_labels)


def test_nan_rows_enter_only_while_too_few_finite_rows_exist():
    gen = torch.Generator().manual_seed(3)
    rows, labels = torch.randn(50, D, generator=gen), torch.randint(0, K, (50,), generator=gen)
    res = RowReservoir(8, D)
    res.update(torch.full((5, D), float("nan")), torch.zeros(5, dtype=torch.long))
    res.update(rows[:2], labels[:2])
    got, _ = res.sample()
    assert got.shape == (7, D) and torch.isnan(got[2:]).all()  # NaN keys sort last
    res.update(rows[2:], labels[2:])
    got, _ = res.sample()
    assert torch.isfinite(got).all() and torch.equal(got, bottom_k(rows, labels, 8)[0])


def test_without_the_threshold_no_update_reads_the_host(monkeypatch):
    """On an accelerator every pair is kept until a compaction: no value is read on the host
    (the CPU stand-in: the reservoir told it cannot filter)."""
    monkeypatch.setattr(RowReservoir, "_filters", property(lambda self: False))
    gen = torch.Generator().manual_seed(5)
    rows, labels = torch.randn(700, D, generator=gen), torch.randint(0, K, (700,), generator=gen)
    res = RowReservoir(32, D)
    with count_host_syncs("cpu") as syncs:
        for start in range(0, 700, 50):
            res.update(rows[start : start + 50], labels[start : start + 50])
        got_rows, got_labels = res.sample()
    assert syncs.count == 0, syncs.describe()
    assert res._threshold is None
    want_rows, want_labels = bottom_k(rows, labels, 32)
    assert torch.equal(got_rows, want_rows) and torch.equal(got_labels, want_labels)


def test_reservoir_moves_to_another_device_and_keeps_its_pairs():
    gen = torch.Generator().manual_seed(6)
    rows, labels = torch.randn(100, D, generator=gen), torch.randint(0, K, (100,), generator=gen)
    res = RowReservoir(10, D)
    res.update(rows[:60], labels[:60])
    res.to("cpu")
    res.update(rows[60:], labels[60:])
    want_rows, want_labels = bottom_k(rows, labels, 10)
    assert torch.equal(res.sample()[0], want_rows) and torch.equal(res.sample()[1], want_labels)


# ------------------------------------------------------------------------------ the capture
def test_capture_hands_detached_rows_without_a_graph_under_grad_mode():
    model = Net()
    seen: list[torch.Tensor] = []
    capture = LayerCapture(model, layers=["head"], pre=True, sink=lambda n, r: seen.append(r))
    capture.attach()
    capture.start()
    x = torch.rand(4, 3)
    model(x).sum().backward()
    capture.remove()
    assert len(seen) == 1 and not seen[0].requires_grad and seen[0].shape == (4, D)
    x2 = torch.rand(4, D)
    assert rows_channel_last(x2) is x2 and rows_channel_last(x2.mT.mT).shape == (4, D)
    assert rows_channel_last(torch.rand(2, 3, D)).shape == (6, D)
