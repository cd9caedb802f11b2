"""Streaming accumulators for the collapse metrics, DDP-aware.

The class statistics take the streaming form of docs/definitions.md#collapse-stats.

- :class:`ClassStatsAccumulator` keeps per-class counts, per-class sums and the total second
  moment ``Q = Σ h hᵀ`` in float64 on the model's device (memory ``O(K·d + d²)``, independent of
  the number of samples), plus a few integer problem counters. :meth:`all_reduce` sums
  everything across DDP ranks in **one** collective.
- :class:`RowReservoir` keeps a bounded, deterministic sample of at most ``max_samples``
  ``(row, label)`` pairs — all of them while fewer were seen. The sample is a *bottom-k* sample
  by a content hash of each pair (a fixed projection drawn from its own seeded generator, never
  the global RNG), so it does not depend on the order in which rows arrive nor on how they are
  split across ranks: the bottom-k of a union is the bottom-k of the ranks' bottom-k sets, which
  is what :meth:`RowReservoir.gather` computes under DDP.

Under DDP every rank must call :meth:`all_reduce` / :meth:`gather` at the same point and in the
same order (they are collectives); outside DDP they are no-ops.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_spectral.functional.collapse import CollapseStats, _collapse_update

__all__ = ["ClassStatsAccumulator", "RowReservoir", "distributed_world_size"]


def distributed_world_size() -> int:
    """Number of ranks of the default process group (1 outside ``torch.distributed``)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class ClassStatsAccumulator:
    """Per-class counts and sums and the second moment, float64, on one device.

    ``problems`` holds ``num_problems`` float64 counters (e.g. batches with bad labels) that are
    summed across ranks together with the statistics, so every rank reaches the same verdict.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device | str | None = None,
        num_problems: int = 0,
    ) -> None:
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.num_problems = int(num_problems)
        self.stats = CollapseStats.zeros(self.num_classes, self.dim, device=device)
        self.problems = torch.zeros(self.num_problems, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.stats.counts.device

    def reset(self) -> None:
        self.stats.counts.zero_()
        self.stats.sums.zero_()
        self.stats.second_moment.zero_()
        self.problems.zero_()

    def to(self, device: torch.device | str) -> ClassStatsAccumulator:
        s = self.stats
        self.stats = CollapseStats(
            s.counts.to(device), s.sums.to(device), s.second_moment.to(device)
        )
        self.problems = self.problems.to(device)
        return self

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows ``(n, d)`` with labels ``(n,)`` already known to lie in ``[0, K)``."""
        _collapse_update(features, labels, self.stats)

    def flag(self, index: int, amount: float | torch.Tensor = 1.0) -> None:
        """Count one occurrence of problem ``index``."""
        self.problems[index] += amount

    def total(self) -> torch.Tensor:
        """Number of rows accumulated (a 0-d float64 tensor)."""
        return self.stats.counts.sum()

    def _flat(self) -> torch.Tensor:
        s = self.stats
        return torch.cat([s.counts, s.sums.reshape(-1), s.second_moment.reshape(-1), self.problems])

    def _unflat(self, flat: torch.Tensor) -> None:
        k, d = self.num_classes, self.dim
        sizes = [k, k * d, d * d, self.num_problems]
        counts, sums, q, problems = torch.split(flat, sizes)
        self.stats = CollapseStats(
            counts.clone(), sums.reshape(k, d).clone(), q.reshape(d, d).clone()
        )
        self.problems = problems.clone()

    def all_reduce(self) -> None:
        """Sum the statistics of every DDP rank in place (one ``all_reduce``); no-op otherwise."""
        if distributed_world_size() <= 1:
            return
        flat = self._flat()
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        self._unflat(flat)

    def state_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "counts": s.counts.detach().cpu().clone(),
            "sums": s.sums.detach().cpu().clone(),
            "second_moment": s.second_moment.detach().cpu().clone(),
            "problems": self.problems.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_classes"]) != self.num_classes or int(state["dim"]) != self.dim:
            raise ValueError(
                f"accumulator state is for {state['num_classes']} classes × {state['dim']} "
                f"features, this accumulator has {self.num_classes} × {self.dim}"
            )
        dev = self.device
        self.stats = CollapseStats(
            state["counts"].to(dev, torch.float64),
            state["sums"].to(dev, torch.float64),
            state["second_moment"].to(dev, torch.float64),
        )
        problems = state.get("problems")
        if problems is not None and problems.numel() == self.num_problems:
            self.problems = problems.to(dev, torch.float64)


class RowReservoir:
    """At most ``max_samples`` ``(row, label)`` pairs, a deterministic bottom-k sample.

    Each pair gets the key ``frac(φ·⟨h/‖h‖, r⟩ + γ·label + δ)`` with ``r`` a fixed Gaussian
    vector drawn from a private generator (``seed``), and the ``max_samples`` smallest keys are
    kept. The key ignores the row's scale (so tiny early-training features are not sampled by
    label) and moves by only ``~φ·ε`` under round-off, so the same rows computed in a different
    batch split keep (almost always) the same keys.
    The pairs are copied into a pool of at most ``2 · max_samples`` rows, allocated once (grown
    geometrically up to that size), and compacted to the ``max_samples`` smallest keys only when
    an update would not fit, through a ``max_samples``-row scratch block: an update allocates
    nothing large and costs ``O(d)`` per row amortised (feed it large chunks: the work is
    vectorised per call). On a CPU, once ``max_samples`` pairs are held, a pair whose key is not
    below the ``max_samples``-th smallest key held is dropped on arrival (it can never enter the
    sample); on an accelerator every pair is kept until a compaction, so that an update never
    synchronises with the host. Memory: at most ``3 · max_samples`` rows (float32).
    """

    _PHI = 64.0
    _GAMMA = 0.6180339887498949
    _DELTA = 0.1234567

    def __init__(
        self, max_samples: int, dim: int, device: torch.device | str | None = None, seed: int = 0
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = int(max_samples)
        self.dim = int(dim)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        self._proj = torch.randn(self.dim, generator=gen, dtype=torch.float64).to(device)
        #: the pool: float32 rows, labels and float64 keys; the pairs held are its first
        #: ``_buffered`` entries (allocated by the first update)
        self._pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: the compaction's scratch block (``max_samples`` entries, allocated when first needed)
        self._spare: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: the last sample, sorted by key (fresh tensors, handed out by :meth:`sample`)
        self._sorted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._buffered = 0
        #: the ``max_samples``-th smallest key held, once that many are (CPU only; see the class
        #: docstring)
        self._threshold: float | None = None

    @property
    def device(self) -> torch.device:
        return self._proj.device

    def __len__(self) -> int:
        return min(self._buffered, self.max_samples) if self._buffered else 0

    def reset(self) -> None:
        """Forget every pair (the pool and the scratch block stay allocated for reuse)."""
        self._buffered = 0
        self._sorted = None
        self._threshold = None

    def to(self, device: torch.device | str) -> RowReservoir:
        self._threshold = None
        self._proj = self._proj.to(device)
        if self._pool is not None:
            rows, labels, keys = (t[: self._buffered].to(device) for t in self._pool)
            self._pool = (rows, labels, keys)
        self._spare = None
        if self._sorted is not None:
            rows, labels, keys = (t.to(device) for t in self._sorted)
            self._sorted = (rows, labels, keys)
        return self

    def keys_for(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The hash key in ``[0, 1)`` of each ``(row, label)`` pair (float64; pass float64 rows
        to skip a conversion)."""
        h = rows.to(torch.float64)
        norm = torch.linalg.vector_norm(h, dim=1).clamp_min_(1e-30)
        # frac((h·r / ‖h‖) · φ + label · γ + δ), one rounding per operation in this order
        x = h @ self._proj
        x.div_(norm).mul_(self._PHI)
        shift = labels.to(torch.float64, copy=True).mul_(self._GAMMA)
        x.add_(shift).add_(self._DELTA)
        return x.sub_(torch.floor(x, out=shift))

    def update(
        self,
        rows: torch.Tensor,
        labels: torch.Tensor,
        copy: bool = True,
        rows64: torch.Tensor | None = None,
    ) -> None:
        """Offer rows ``(n, d)`` (stored as float32) with their labels ``(n,)``.

        The pairs kept are copied into the reservoir's own storage (``copy`` is accepted for
        compatibility; the given tensors are never held). ``rows64``, the same rows already in
        float64, saves a conversion when hashing. Only the pairs kept are converted to float32.
        """
        rows = rows.detach().to(device=self.device)
        labels = labels.detach().to(device=self.device)
        source = rows if rows64 is None else rows64.detach().to(device=self.device)
        keys = self.keys_for(source, labels)
        self._sorted = None
        pick: torch.Tensor | None = None
        m = keys.shape[0]
        if self._threshold is not None:
            # the pairs held include ``max_samples`` keys <= the threshold, and later updates
            # only lower the ``max_samples``-th smallest key: a pair with a larger key never
            # enters the sample (an equal key is the same pair, see ``gather``)
            pick = torch.nonzero(keys < self._threshold).flatten()
            m = pick.shape[0]
        if m > self.max_samples:  # only the chunk's own bottom-k can enter the sample
            chosen = keys if pick is None else keys.index_select(0, pick)
            best = torch.topk(chosen, self.max_samples, largest=False, sorted=False).indices
            pick = best if pick is None else pick.index_select(0, best)
            m = self.max_samples
        if m == 0:
            return
        if self._buffered + m > 2 * self.max_samples:
            self._compact()
            if self._threshold is not None:  # the compaction set (or lowered) it
                offered = keys if pick is None else keys.index_select(0, pick)
                fresh = torch.nonzero(offered < self._threshold).flatten()
                pick = fresh if pick is None else pick.index_select(0, fresh)
                m = pick.shape[0]
                if m == 0:
                    return
        self._reserve(self._buffered + m)
        assert self._pool is not None
        start, self._buffered = self._buffered, self._buffered + m
        pool_rows, pool_labels, pool_keys = (t.narrow(0, start, m) for t in self._pool)
        if pick is None:
            pool_rows.copy_(rows)
            pool_labels.copy_(labels)
            pool_keys.copy_(keys)
        else:
            if rows.dtype == torch.float32:
                torch.index_select(rows, 0, pick, out=pool_rows)
            else:
                pool_rows.copy_(rows.index_select(0, pick))
            if labels.dtype == torch.long:
                torch.index_select(labels, 0, pick, out=pool_labels)
            else:
                pool_labels.copy_(labels.index_select(0, pick))
            torch.index_select(keys, 0, pick, out=pool_keys)
        if self._filters and self._threshold is None and self._buffered >= self.max_samples:
            kth = torch.kthvalue(self._pool[2][: self._buffered], self.max_samples).values
            self._set_threshold(kth)

    def _reserve(self, size: int) -> None:
        """Make the pool hold at least ``size`` entries (at most ``2 · max_samples``), keeping the
        pairs held."""
        pool = self._pool
        if pool is not None and pool[0].shape[0] >= size:
            return
        have = 0 if pool is None else pool[0].shape[0]
        size = min(max(size, 2 * have, 64), 2 * self.max_samples)
        dev, d = self.device, self.dim
        new = (
            torch.empty(size, d, dtype=torch.float32, device=dev),
            torch.empty(size, dtype=torch.long, device=dev),
            torch.empty(size, dtype=torch.float64, device=dev),
        )
        if pool is not None and self._buffered:
            for old, fresh in zip(pool, new, strict=True):
                fresh[: self._buffered].copy_(old[: self._buffered])
        self._pool = new

    @property
    def _filters(self) -> bool:
        """Whether arrivals are filtered by the threshold (on a CPU, where reading it is free)."""
        return self._proj.device.type == "cpu"

    def _set_threshold(self, kth: torch.Tensor) -> None:
        """Filter later arrivals by ``kth``, the ``max_samples``-th smallest key held (ignored
        when it is not finite: too few finite keys yet)."""
        top = float(kth)  # a host read, free on a CPU
        self._threshold = top if math.isfinite(top) else None

    def _compact(self) -> None:
        """Keep only the ``max_samples`` pairs of smallest key (in no particular order)."""
        k, n = self.max_samples, self._buffered
        if n <= k or self._pool is None:
            return
        if self._spare is None:
            dev, d = self.device, self.dim
            self._spare = (
                torch.empty(k, d, dtype=torch.float32, device=dev),
                torch.empty(k, dtype=torch.long, device=dev),
                torch.empty(k, dtype=torch.float64, device=dev),
            )
        keys = self._pool[2][:n]
        best = torch.topk(keys, k, largest=False, sorted=False)
        for held, spare in zip(self._pool, self._spare, strict=True):
            torch.index_select(held[:n], 0, best.indices, out=spare)
            held[:k].copy_(spare)
        self._buffered = k
        if self._filters:  # the largest of the k smallest keys (NaN, the largest key, propagates)
            self._set_threshold(best.values.max())

    def _cat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sample, sorted by key (NaN keys last), as fresh tensors the reservoir never
        modifies (computed once per batch of updates)."""
        if self._sorted is not None:
            return self._sorted
        if self._pool is None or not self._buffered:
            return (
                torch.zeros(0, self.dim, device=self.device),
                torch.zeros(0, dtype=torch.long, device=self.device),
                torch.zeros(0, dtype=torch.float64, device=self.device),
            )
        n = self._buffered
        rows, labels, keys = (t[:n] for t in self._pool)
        self._sorted = self._bottom_k(rows, labels, keys, self.max_samples)
        return self._sorted

    @staticmethod
    def _bottom_k(
        rows: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``k`` pairs of smallest key, in increasing key order (NaN keys last).

        Equal keys mean (practically) identical pairs, so which of them is kept, and their order,
        does not change the sample.
        """
        k = min(k, keys.shape[0])
        order = torch.topk(keys, k, largest=False, sorted=True).indices
        pick = (t.index_select(0, order) for t in (rows, labels, keys))
        return next(pick), next(pick), next(pick)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept ``(rows (m, d) float32, labels (m,))``, ``m <= max_samples``, key order (fresh
        tensors: later updates do not modify them)."""
        rows, labels, _ = self._cat()
        return rows, labels

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` over the union of every DDP rank's rows (a collective under DDP).

        Each rank contributes its own bottom-k set, padded to ``max_samples`` rows with key
        ``+inf``; the bottom-k of the gathered union is the bottom-k of all rows seen.
        """
        world = distributed_world_size()
        if world <= 1:
            rows, labels, _ = self._cat()
            return rows, labels
        rows, labels, keys = self._cat()
        k, d = self.max_samples, self.dim
        packed = torch.full((k, d + 2), math.inf, dtype=torch.float64, device=self.device)
        m = rows.shape[0]
        packed[:m, :d] = rows.to(torch.float64)
        packed[:m, d] = labels.to(torch.float64)
        packed[:m, d + 1] = keys
        parts = [torch.empty_like(packed) for _ in range(world)]
        torch.distributed.all_gather(parts, packed)
        union = torch.cat(parts)
        union = union[torch.isfinite(union[:, d + 1])]
        rows_u = union[:, :d].to(torch.float32)
        labels_u = union[:, d].to(torch.long)
        keys_u = union[:, d + 1]
        # the key already mixes in the label, so equal keys mean (practically) identical pairs,
        # for which the order of the union does not matter
        rows_u, labels_u, _ = self._bottom_k(rows_u, labels_u, keys_u, k)
        return rows_u, labels_u

    def state_dict(self) -> dict[str, Any]:
        rows, labels = self.sample()
        return {
            "max_samples": self.max_samples,
            "dim": self.dim,
            "seed": self.seed,
            "rows": rows.detach().cpu().clone(),
            "labels": labels.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(
                f"reservoir state is for {state['dim']} features, this one has {self.dim}"
            )
        self.reset()
        rows, labels = state["rows"], state["labels"]
        if rows.shape[0]:
            self.update(rows.to(self.device), labels.to(self.device))
