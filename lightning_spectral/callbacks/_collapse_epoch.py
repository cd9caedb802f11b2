"""The epoch end of ``CollapseMonitor``: the metrics, their verdict, the log and the figure.

At the end of a due epoch the statistics are all-reduced across DDP ranks and the row sample
gathered (collectives, every rank in the same order), the metrics computed by
:func:`~lightning_spectral.functional.collapse.collapse_from_stats` (docs/definitions.md#collapse)
and :func:`~lightning_spectral.functional.interplay.information_interplay` (#mir-hdr), brought to
the host in one transfer, checked (non-finite inputs, label problems, fewer than two classes:
NaN with one warning) and logged as ``<namespace>/<key>``, with the ``geometry`` figure while
figures stay within their share of the fit's time and a custom-scalars category (:func:`layout`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_spectral import report
from lightning_spectral.callbacks._base import full_tensor, logging_step, warn_rank_zero
from lightning_spectral.callbacks._collapse_rows import _NOT_CALLED, _PROBLEM_KEYS, RowIntake
from lightning_spectral.functional.collapse import collapse_from_stats, collapse_keys
from lightning_spectral.functional.interplay import information_interplay
from lightning_spectral.stats import distributed_world_size

#: the tag namespace of each source
NAMESPACES = {"train": "collapse", "val": "collapse_val", "train_eval": "collapse_train_eval"}


def layout(namespace: str = "collapse") -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars category of one monitor's tags (``collapse``, ``collapse_val`` or
    ``collapse_train_eval``)."""
    ns = namespace
    return {
        ns: report.multiline_layout(
            {
                "NC1 within-class variability (→ 0)": [f"^{ns}/nc1$"],
                "NC2 class means → simplex ETF (→ 0)": [
                    f"^{ns}/nc2_equinorm$",
                    f"^{ns}/nc2_equiangular$",
                    f"^{ns}/nc2_cos_std$",
                    f"^{ns}/nc2_etf$",
                ],
                "NC2 head rows → simplex ETF (→ 0)": [f"^{ns}/nc2_.*_w$"],
                "NC3 self-duality (→ 0)": [f"^{ns}/nc3.*"],
                "NC4 agreement with nearest class mean (→ 1)": [f"^{ns}/nc4$"],
                "Information interplay: MIR (↑), HDR (↓)": [f"^{ns}/mir$", f"^{ns}/hdr$"],
            }
        )
    }


LAYOUT = layout("collapse")


class EpochReport(RowIntake):
    """Compute, check and log one collected epoch (and draw its figure)."""

    source: str
    history: list[tuple[int, float]]
    last_metrics: dict[str, float]
    _warned_absent: bool
    _layout_done: bool
    _pending_figure: tuple | None
    interplay_budget: float
    _pending_interplay: tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor] | None
    _skipped_sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    _interplay_done: int

    @property
    def namespace(self) -> str:  # documented on CollapseMonitor
        return NAMESPACES[self.source]

    def compute(self) -> dict[str, torch.Tensor]:  # documented on CollapseMonitor
        return self._compute()

    def _compute(self, interplay: bool = True) -> dict[str, torch.Tensor]:
        """The metrics of the rows accumulated so far (``CollapseMonitor.compute``).

        ``interplay=False`` leaves MIR/HDR out (NaN) and keeps a copy of the row sample, its
        labels and the head's weight in ``_skipped_sample`` for :meth:`_finish_interplay`."""
        acc, res, head = self._acc, self._reservoir, self._head_module
        assert acc is not None and res is not None and head is not None
        self._flush()
        acc.all_reduce()  # every rank, same order: the statistics ...
        rows, row_labels = res.gather()  # ... then the row sample
        # FSDP2: the head's sharded weight is gathered (every rank computes this, in order)
        weight = full_tensor(head.weight.detach())
        bias = full_tensor(head.bias.detach()) if head.bias is not None else None
        # NC4's classifier argmax runs over all rows of the head
        # (docs/definitions.md#collapse-metrics)
        out = collapse_from_stats(
            acc.stats,
            weight,
            bias,
            rows=rows,
            row_labels=row_labels,
            dtype=torch.float64,
            geometry=True,
        )
        self._skipped_sample = None
        if rows.shape[0] > 0 and not interplay:
            self._skipped_sample = (rows.clone(), row_labels.clone(), weight.clone())
        if rows.shape[0] > 0 and interplay:
            # spectra in float32, the working precision; ~4× cheaper than float64 for the
            # (d·r)-sized eigenproblem and accurate to ~1e-4 in MIR/HDR
            inter = information_interplay(
                rows, weight.to(rows.device), row_labels, dtype=torch.float32
            )
            out["mir"] = inter["mir"].to(torch.float64)
            out["hdr"] = inter["hdr"].to(torch.float64)
        else:
            nan = torch.full((), math.nan, dtype=torch.float64, device=acc.device)
            out["mir"], out["hdr"] = nan, nan
        out["_problems"] = acc.problems.clone()
        out["_counts"] = acc.stats.counts.clone()
        finite = torch.isfinite(acc.stats.sums).all() & torch.isfinite(weight).all()
        out["_finite"] = finite.to(torch.float64)
        return out

    def _all_nan(self) -> dict[str, float]:
        """Every tag of an epoch, NaN (MIR/HDR included: an epoch that cannot be computed is
        NaN whatever ``interplay_budget`` chose)."""
        keys = (*collapse_keys(True), "mir", "hdr")
        return {f"{self.namespace}/{k}": math.nan for k in keys}

    def _log_nan(self, trainer: Any, epoch: int) -> None:
        host_s = self._all_nan()
        self._pending_interplay = None  # this epoch is the last logged one now
        self.history.append((epoch, math.nan))
        self.last_metrics = dict(host_s)
        self._log(trainer, host_s, logging_step(trainer), computed_on_every_rank=True)

    def _report_problems(self, epoch: int, counts: Any) -> bool:
        """One warning per kind of problem seen (counts per kind); True if there was any."""
        seen = False
        for idx, key in enumerate(_PROBLEM_KEYS):
            if counts[idx] > 0:
                seen = True
                text = self._problem_text.get(idx, key.replace("_", " "))
                self._fail.problem(
                    key, f"epoch {epoch}: {text} ({int(counts[idx])} occurrences across ranks)"
                )
        return seen

    def _interplay_due(self, device: torch.device) -> bool:
        """Whether this epoch end computes MIR/HDR (``interplay_budget``): the first of the
        fit, then while the monitor as a whole stays within the budget. Rank zero decides for
        every rank (wall times differ between ranks; the tags must not)."""
        due = self._interplay_done == 0 or self._figures.within(self.interplay_budget)
        if distributed_world_size() > 1:
            flag = torch.tensor([float(due)], device=device)
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def _finish_interplay(self, trainer: Any) -> None:
        """At the end of training: MIR/HDR of the last logged epoch if its end skipped them."""
        pending, self._pending_interplay = self._pending_interplay, None
        if pending is None:
            return
        epoch, step, rows, labels, weight = pending
        with self._charged():
            try:
                inter = information_interplay(rows, weight, labels, dtype=torch.float32)
                host_s, _ = report.to_host(
                    {f"{self.namespace}/{k}": inter[k].to(torch.float64) for k in ("mir", "hdr")},
                    {},
                )
            except Exception as exc:  # never crash at the end of a fit unless strict
                self._fail.problem("compute", f"epoch {epoch}: {type(exc).__name__}: {exc}")
                host_s = {f"{self.namespace}/{k}": math.nan for k in ("mir", "hdr")}
            self._interplay_done += 1
            if self.history and self.history[-1][0] == epoch:
                self.last_metrics.update(host_s)
            self._log(trainer, host_s, step, computed_on_every_rank=True)

    def _finish_epoch(self, trainer: Any, pl_module: Any) -> None:
        with self._charged():
            self._finish_epoch_charged(trainer, pl_module)

    def _finish_epoch_charged(self, trainer: Any, pl_module: Any) -> None:
        epoch = self._collecting_epoch
        self._pending_labels = None
        if epoch is None:
            return
        self._collecting_epoch = None
        if self._acc is None:
            # no rows at all: the labels were never usable, or the head never ran
            if not self._report_problems(epoch, self._host_problems):
                what = "the head" if self._head_name is None else f"the head {self._head_name!r}"
                self._fail.problem(_PROBLEM_KEYS[_NOT_CALLED], f"epoch {epoch}: {what} was "
                                   "never called on a monitored batch")
            self._log_nan(trainer, epoch)
            return
        interplay = self._interplay_due(self._acc.device)
        keys = (*collapse_keys(True), *(("mir", "hdr") if interplay else ()))
        try:
            out = self._compute(interplay)
        except Exception as exc:  # never crash mid-fit unless strict
            self._acc.reset()
            if self._reservoir is not None:
                self._reservoir.reset()
            self._fail.problem("compute", f"epoch {epoch}: {type(exc).__name__}: {exc}")
            self._log_nan(trainer, epoch)
            return
        scalars = {f"{self.namespace}/{k}": out[k] for k in keys}
        vectors = {
            "cosine": out["_cosine"],
            "classes": out["_classes"].to(torch.float64),
            "problems": out["_problems"],
            "counts": out["_counts"],
            "finite": out["_finite"],
        }
        host_s, host_v = report.to_host(scalars, vectors)  # the event's one host transfer
        self._acc.reset()
        assert self._reservoir is not None
        self._reservoir.reset()

        if not host_v["finite"][0]:
            self._fail.problem(
                "nonfinite",
                f"epoch {epoch}: the head {self._head_name!r} or its input features hold NaN/Inf",
            )
            host_s = self._all_nan()
        elif self._report_problems(epoch, host_v["problems"]):
            host_s = self._all_nan()
        else:
            counts = host_v["counts"]
            present = int((counts > 0).sum())
            if present < 2:
                seen = sorted(int(k) for k in host_v["classes"])
                self._fail.problem(
                    "one_class",
                    f"epoch {epoch}: {present} class(es) seen (labels {seen}); the collapse "
                    "metrics need at least two classes",
                )
                host_s = self._all_nan()  # MIR/HDR too: the epoch is degenerate
            elif present < self._num_labels and not self._warned_absent:
                self._warned_absent = True
                absent = [i for i in range(self._num_labels) if counts[i] == 0]
                warn_rank_zero(
                    f"CollapseMonitor: epoch {epoch}: classes {absent} absent; metrics use the "
                    f"{present} classes present; further warnings suppressed",
                    stacklevel=2,
                )
        self.history.append((epoch, host_s[f"{self.namespace}/nc1"]))
        self.last_metrics = dict(host_s)
        step = logging_step(trainer)
        self._log(trainer, host_s, step, computed_on_every_rank=True)
        # MIR/HDR for the end of training: only of the last logged epoch, if it skipped them
        # and its metrics could be computed
        self._pending_interplay = None
        if interplay:
            self._interplay_done += 1
        elif self._skipped_sample is not None and math.isfinite(
            host_s[f"{self.namespace}/nc1"]
        ):
            self._pending_interplay = (epoch, step, *self._skipped_sample)
        self._skipped_sample = None
        if report.tensorboard_writers(trainer):
            if not self._layout_done:
                self._layout(trainer, layout(self.namespace))
                self._layout_done = True
            c = host_v["classes"].size
            if c >= 2:
                figure = (host_v["cosine"].reshape(c, c), host_v["classes"].astype(int).tolist(),
                          list(self.history), epoch, step)
                if self._figures.allowed(self.figure_budget):
                    self._pending_figure = None
                    self._draw(trainer, figure)
                else:  # drawn at the end of the fit if no later epoch is drawn
                    self._pending_figure = figure

    # ------------------------------------------------------------------ figures
    def _render(self, trainer: Any, figure: tuple) -> None:
        from lightning_spectral.plots.collapse import collapse_figure

        cosine, classes, history, epoch, step = figure
        with self._figures.timed():
            fig = collapse_figure(
                cosine, classes, history,
                title=f"neural collapse at epoch {epoch} (head {self._head_name!r})",
            )
            self._figure(trainer, f"{self.namespace}/geometry", fig, step)

    def _draw(self, trainer: Any, figure: tuple) -> None:
        try:
            self._render(trainer, figure)
        except Exception as exc:  # a figure never breaks the run
            self._fail.problem(
                "figure",
                f"collapse figure: {type(exc).__name__}: {exc}",
                consequence="the figure was not drawn; the scalars were logged",
            )
