"""``lightning-spectral analyze CHECKPOINT``: per-matrix decomposition table of a checkpoint.

Reads a Lightning ``.ckpt`` or a plain ``state_dict`` file without the model's code and prints
one row per weight matrix (see docs/definitions.md#weights). torch is imported only inside the
command function and Lightning never, so ``lightning-spectral analyze --help`` starts fast.

Loading policy (see ``lightning_spectral.analysis.load_state_dict``): only regular files, unpickled
by ``torch.load(weights_only=True)`` alone (zip checkpoints memory-mapped), every tensor checked
against ``--max-bytes`` before anything is computed. ``--unsafe-load`` unpickles with
``weights_only=False`` (runs the file's code) and prints a warning.

Exit codes: 0 success; 2 bad input (one line on stderr naming the file or option and the
problem).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

FORMATS = ("table", "json", "csv")
_PROGRESS_MIN_LAYERS = 16


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``analyze`` on the ``lightning-spectral`` sub-command parser."""
    p = subparsers.add_parser(
        "analyze",
        help="per-layer singular-value analysis of a checkpoint (no model code needed)",
        description="Decompose every weight matrix of a Lightning .ckpt or a plain state_dict "
        "file (conv kernels reshaped to (out, in*kh*kw)): largest singular value, stable rank, "
        "effective rank, the rank holding the chosen energy (the memory-capacity estimate, see "
        "docs/definitions.md#capacity), the Eckart-Young relative error at that rank and the "
        "parameter ratio of a rank-k factorization.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .ckpt or state_dict file")
    p.add_argument("--energy", default="0.99", metavar="TAU",
                   help="energy fraction tau in (0, 1] for the rank column (default 0.99)")
    p.add_argument("--format", default="table", choices=FORMATS, dest="fmt",
                   help="output format (default table)")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write one singular-value spectrum PNG per layer into DIR")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip tensors whose name matches GLOB (repeatable)")
    p.add_argument("--float64", action="store_true",
                   help="compute singular values in float64 (default float32)")
    p.add_argument("--progress", default="auto", choices=("auto", "always", "never"),
                   help="progress bar on stderr (auto: a terminal and >= 16 matrices)")
    add_loading_arguments(p)
    p.set_defaults(func=run)
    return p


def add_loading_arguments(p: argparse.ArgumentParser) -> None:
    """``--max-bytes`` and ``--unsafe-load`` (shared with ``align``)."""
    p.add_argument("--max-bytes", default=None, metavar="SIZE",
                   help="memory budget: refuse (exit 2) a tensor whose storage, dense copy or "
                   "SVD would need more; bytes or K/M/G/T (powers of 1024), e.g. 512M, 4G "
                   "(default: a quarter of the machine's memory)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle with torch.load(weights_only=False), which RUNS ANY CODE in the "
                   "file: only for files you trust (default: weights-only loading, which refuses "
                   "custom classes)")


def loading_options(args: argparse.Namespace, command: str) -> int:
    """The memory budget from ``--max-bytes``; prints the ``--unsafe-load`` warning.

    Raises ``ValueError`` (one line naming the option) for a malformed size.
    """
    from lightning_spectral._checkpoint import default_max_bytes, parse_bytes

    if args.max_bytes is None:
        budget = default_max_bytes()
    else:
        try:
            budget = parse_bytes(args.max_bytes)
        except ValueError as exc:
            raise ValueError(f"--max-bytes {args.max_bytes!r}: {exc}") from None
    if args.unsafe_load:
        print(f"lightning-spectral {command}: warning: --unsafe-load: checkpoints are unpickled "
              "with weights_only=False, which runs any code they contain; use it only for files "
              "you trust", file=sys.stderr)
    return budget


def _fail(message: str) -> int:
    print(f"lightning-spectral analyze: error: {_one_line(message)}", file=sys.stderr)
    return 2


def _one_line(text: str) -> str:
    """``text`` with control characters escaped (one line, no terminal escapes)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in str(text))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_table(rows: list[dict[str, Any]], energy: float) -> str:
    """Fixed-width table; the rank column is named as the memory-capacity estimate."""
    pct = f"{energy * 100:g}"
    cap = f"capacity_k@{pct}%"
    header = ["name", "shape", "params", "sv_max", "stable_rank", "erank", cap, "EY_rel_err",
              "param_ratio", "alpha", "alpha_w"]
    body = [
        [
            r["name"],
            "x".join(str(n) for n in r["shape"]),
            str(r["params"]),
            _fmt(r["sv_max"]),
            _fmt(r["stable_rank"]),
            _fmt(r["erank"]),
            _fmt(r["rank_at_energy"]),
            _fmt(r["eckart_young_rel_error"], 3),
            _fmt(r["param_ratio"], 3),
            _fmt(r["alpha"], 3),
            _fmt(r["alpha_weighted"], 3),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    total = sum(r["params"] for r in rows)
    factored = sum(
        r["params"] * min(1.0, r["param_ratio"]) if r["param_ratio"] is not None else r["params"]
        for r in rows
    )
    out = [line(header), line(["-" * w for w in widths]), *(line(b) for b in body)]
    out.append("")
    out.append(
        f"{len(rows)} weight matrices, {total} weight parameters; factoring each at its "
        f"{cap} where that saves parameters keeps {factored:.0f} ({factored / total:.3f})."
        if total else f"{len(rows)} weight matrices."
    )
    out.append(
        f"{cap}: memory-capacity estimate (see docs/definitions.md#capacity), the fewest "
        f"singular directions holding {pct}% of sum(sigma^2); json/csv key rank_at_energy. "
        "SpectralMonitor logs the same quantity during training as weight_rank90 / weight_rank99."
    )
    return "\n".join(out)


def format_csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    from lightning_spectral.analysis import ANALYSIS_KEYS

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ANALYSIS_KEYS)
    for r in rows:
        writer.writerow(
            ["x".join(str(n) for n in r[k]) if k == "shape" else ("" if r[k] is None else r[k])
             for k in ANALYSIS_KEYS]
        )
    return buf.getvalue().rstrip("\n")


class _Progress:
    """A one-line progress bar on stderr (``\\r`` updates, cleared at the end)."""

    def __init__(self, stream: Any, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.used = False

    def __call__(self, done: int, total: int) -> None:
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\ranalyze [{bar}] {done}/{total} matrices")
        self.stream.flush()
        self.used = True

    def close(self) -> None:
        if self.used:
            self.stream.write("\n")
            self.stream.flush()


def _safe_filename(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return keep or "weight"


def run(args: argparse.Namespace) -> int:
    """Execute ``analyze``; returns the exit code."""
    try:
        energy = float(args.energy)
    except ValueError:
        return _fail(f"--energy {args.energy!r}: not a number (expected tau in (0, 1])")
    if not (0.0 < energy <= 1.0):
        return _fail(f"--energy {args.energy}: out of range (expected tau in (0, 1])")

    import json
    import warnings
    from pathlib import Path

    from lightning_spectral._checkpoint import CheckpointError, UnsafeLoadWarning, load_state_dict
    from lightning_spectral.analysis import (
        analyze_spectra,
        check_svd_budget,
        select_weight_matrices,
        weight_spectra,
    )

    plot_dir = Path(args.plot) if args.plot else None
    try:
        if plot_dir is not None and plot_dir.exists() and not plot_dir.is_dir():
            return _fail(f"--plot {plot_dir}: exists and is not a directory")
    except OSError as exc:  # a name too long, ...
        return _fail(f"--plot {plot_dir}: {exc.strerror or exc}")
    try:
        budget = loading_options(args, "analyze")
    except ValueError as exc:
        return _fail(str(exc))
    dtype = "float64" if args.float64 else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsafeLoadWarning)  # printed once above
            sd = load_state_dict(args.checkpoint, unsafe=args.unsafe_load, max_bytes=budget)
        weights = select_weight_matrices(sd, args.exclude)
        if weights:
            check_svd_budget(weights, budget, dtype, path=args.checkpoint)
    except CheckpointError as exc:
        return _fail(str(exc))
    if not weights:
        names = ", ".join(list(sd)[:6]) + (", ..." if len(sd) > 6 else "")
        return _fail(
            f"{args.checkpoint}: no weight matrices (floating tensors with >= 2 dims named "
            f"'*weight'{' not excluded' if args.exclude else ''}); it holds {len(sd)} "
            f"tensors: {names[:300]}"
        )

    show = args.progress == "always" or (
        args.progress == "auto" and len(weights) >= _PROGRESS_MIN_LAYERS and sys.stderr.isatty()
    )
    bar = _Progress(sys.stderr) if show else None
    failure = None
    try:
        spectra = weight_spectra(weights, dtype=dtype, progress=bar, max_bytes=budget)
        rows = analyze_spectra(weights, spectra, energy)
    except (RuntimeError, ValueError, ArithmeticError, MemoryError) as exc:
        # e.g. an SVD that does not converge on a corrupt weight
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        failure = f"{args.checkpoint}: analysis failed ({type(exc).__name__}: {first})"
    finally:
        if bar is not None:
            bar.close()
    if failure is not None:
        return _fail(failure)

    if plot_dir is not None:
        try:
            plot_dir.mkdir(parents=True, exist_ok=True)
            from lightning_spectral.plots.weights import singular_value_figure

            for row in rows:
                fig = singular_value_figure(row["name"], spectra[row["name"]], energy,
                                            row["rank_at_energy"])
                fig.savefig(plot_dir / f"{_safe_filename(row['name'])}.png", dpi=100)
                fig.clear()
        except OSError as exc:
            return _fail(f"--plot {plot_dir}: cannot write ({exc.strerror or exc})")

    if args.fmt == "json":
        print(json.dumps(rows, indent=2))
    elif args.fmt == "csv":
        print(format_csv(rows))
    else:
        print(format_table(rows, energy))
    return 0
