"""Threshold rules over logged runs: the engine of ``lightning-spectral check`` and SpectralAlarm.

A rule is ``TAG_PATTERN [REDUCER] OP THRESHOLD``::

    vne/encoder.* >= 2.0
    collapse/nc1 last < 0.5
    erank/* min > 4
    weight_stable_rank/fc2 mean(last=5) <= 30
    vne/* drop_from_max_rel <= 0.3
    erank/* last >= 0.8 * baseline
    vne/classifier mean(last=5) >= baseline - 0.1

* ``TAG_PATTERN`` is a shell-style glob (``*``, ``?``, ``[...]``; ``*`` also crosses ``/``);
  it expands to one check per matching scalar tag.
* ``REDUCER`` turns a tag's series (ordered by step) into one number: ``last`` (the default),
  ``first``, ``min``, ``max``, ``mean``, ``mean(last=K)`` (mean of the last ``K`` values),
  ``slope(last=K)`` (least-squares slope per step of the last ``K`` values),
  ``drop_from_max`` (``max - last``) or ``drop_from_max_rel`` (``(max - last) / |max|``);
  see :mod:`lightning_spectral.reduce`.
* ``OP`` is one of ``< <= > >= == !=``.
* ``THRESHOLD := NUMBER | [NUMBER '*'] 'baseline' [('+' | '-') NUMBER]``: a number (``inf``
  and ``-inf`` allowed), or an affine function of the same reducer applied to the same tag in
  a **baseline run** (``check(..., baseline=...)``, ``--baseline``). A tag the baseline lacks
  fails the check (skips it for an optional rule), with a note; it is never silently passed.

A NaN reduced value (or a NaN baseline value) fails every operator (a gate treats a NaN metric
as a failure); NaN propagates through ``min``, ``max``, ``mean`` and the trend reducers. Runs
are read by :func:`read_run` with every logged value counted (no sampling). This module only
compares what was logged (docs/gate.md). Only the standard library and NumPy are imported here,
so the command line starts fast.

Hostile input is bad input, never a hang or a crash: only regular files and directories are
read (FIFOs, sockets and devices inside a run are skipped with a warning in ``Run.warnings``),
every unreadable, malformed or out-of-range input raises a :class:`GateInputError` naming the
file, and reports escape control characters (and GitHub workflow-command syntax) in tags.
Matching, evaluation and reporting cost time linear in the number of rules and tags.

The package has four parts, each importable on its own:

* ``lightning_spectral.gate.rules`` — the rule language (:func:`parse_rule`, :class:`Rule`)
  and TOML rules files with exact line numbers (:func:`load_rules`);
* ``lightning_spectral.gate.runs`` — the TensorBoard and CSV readers (:func:`read_run`,
  :class:`Run`, :class:`Series`);
* ``lightning_spectral.gate.evaluate`` — evaluation, baselines included (``evaluate``,
  :func:`check`, :class:`CheckResult`);
* ``lightning_spectral.gate.formats`` — the reports (:class:`GateReport`: text, JSON,
  GitHub annotations, JUnit XML, Markdown).

The reducers live in :mod:`lightning_spectral.reduce` (shared with SpectralAlarm); what the
parts share (operators, exceptions, safe text) is in ``lightning_spectral.gate._common``.
"""

from __future__ import annotations

from lightning_spectral.gate._common import (
    OPS,
    GateInputError,
    MissingBaselineError,
    NoMatchingTagError,
    RuleSyntaxError,
    RunReadError,
    printable,
)
from lightning_spectral.gate._common import (
    safe_line as safe_line,
)
from lightning_spectral.gate.evaluate import (
    NOT_IN_BASELINE as NOT_IN_BASELINE,
)
from lightning_spectral.gate.evaluate import (
    NOT_IN_RUN as NOT_IN_RUN,
)
from lightning_spectral.gate.evaluate import (
    CheckResult,
    check,
    evaluate,
    require_baseline,
)
from lightning_spectral.gate.formats import GateReport
from lightning_spectral.gate.rules import Rule, load_rules, parse_rule
from lightning_spectral.gate.runs import Run, read_run
from lightning_spectral.gate.runs import Series as Series
from lightning_spectral.reduce import REDUCERS

# also importable from here, though not in __all__: Series, safe_line, NOT_IN_BASELINE, NOT_IN_RUN

__all__ = [
    "Rule",
    "Run",
    "CheckResult",
    "GateReport",
    "GateInputError",
    "RuleSyntaxError",
    "RunReadError",
    "NoMatchingTagError",
    "MissingBaselineError",
    "parse_rule",
    "load_rules",
    "read_run",
    "evaluate",
    "check",
    "require_baseline",
    "REDUCERS",
    "OPS",
    "printable",
]
