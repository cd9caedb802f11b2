"""What SpectralMonitor costs a training run, and what one event costs.

Two measurements, each side by side and interleaved in one run (``benchmarks/_common.py``):

1. **Training overhead.** The same seeded Lightning fit with and without
   ``SpectralMonitor()`` at its defaults (``every_n_steps=100``, weights every 2,000 steps),
   alternating A, B, A, B, ... The timed window runs from optimizer step 1 to step
   ``1 + window`` (after set-up and the step-0 events), so it holds ``window / 100`` activation
   events and, for the MLP's 2,000-step window, exactly one weight event: the steady-state
   cost per step. Reported: the median of the per-pair ratios ``with / without``.
   Models: the digits MLP widened to 64-512-512-10 (an MNIST-sized 784-512-512-10 MLP, on
   digits' 64 inputs) and the digits CNN.
2. **Per-event cost against the bare kernels and a training step.** One activation event
   (rows already captured: one batched Gram + ``eigvalsh`` per shape, RankMe's raw spectrum
   from the same Gram, VNE/erank/λ_max/κ/RankMe, the logged distributions, one host transfer)
   against the bare ``matmul + eigvalsh`` of the same matrices, computing only and again
   writing to a TensorBoardLogger as in a run (histograms and scalars); one weight event
   (``singular_values_many`` + the weight quantities, distributions, one host transfer) against
   bare ``svdvals`` of each weight; a training step with the monitor's inactive hooks against
   one without. From these, the overhead at the defaults in training steps, and where the time
   of one logged activation event goes (main-thread CPU time of its parts).

    python -m benchmarks.bench_overhead [--quick] [--device cpu|cuda] [--repeats N] [--no-fit]
"""

from __future__ import annotations

import shutil
import tempfile
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks._common import (
    WindowTimer,
    fmt_ms,
    fmt_ratio,
    interleaved,
    parser,
    ratio_summary,
    summary,
    sync,
    write_section,
)


def make_model(arch: str) -> Any:
    from lightning_spectral.demos import DigitsClassifier

    torch.manual_seed(0)
    hidden = (512, 512) if arch == "mlp" else (128, 64)
    return DigitsClassifier(arch=arch, hidden=hidden)


def make_loader(arch: str, device: str) -> Any:
    from lightning_spectral.demos import digits_dataloaders

    train, _ = digits_dataloaders(batch_size=128 if arch == "mlp" else 64, image=arch == "cnn")
    return train


def fit_window(arch: str, window: int, with_monitor: bool, device: str) -> float:
    """Seconds for ``window`` optimizer steps of one fit (monitor at defaults or absent)."""
    import lightning.pytorch as pl

    from lightning_spectral import SpectralMonitor

    timer_cls = type("Timer", (WindowTimer, pl.Callback), {})
    timer = timer_cls(1, 1 + window, device)
    callbacks: list[Any] = [timer]
    if with_monitor:
        callbacks.insert(0, SpectralMonitor())
    # both arms log to TensorBoard, as a user's run would: the monitor's histograms and
    # (budgeted) figures are part of what it costs
    logdir = tempfile.mkdtemp(prefix="bench_overhead_")
    trainer = pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=window + 2,
        logger=pl.loggers.TensorBoardLogger(logdir, name="", version=""),
        log_every_n_steps=50,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    try:
        trainer.fit(make_model(arch), make_loader(arch, device))
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return float(timer.elapsed)


TRANSFORMER = {"vocab_size": 1000, "batch": 16, "seq": 32}


def make_transformer(device: str) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """``lightning.pytorch.demos.Transformer`` (2+2 layers, d = 200) on synthetic tokens."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=TRANSFORMER["vocab_size"]).to(device)
    g = torch.Generator().manual_seed(0)
    shape = (TRANSFORMER["batch"], TRANSFORMER["seq"])
    tokens = torch.randint(0, TRANSFORMER["vocab_size"], shape, generator=g).to(device)
    target = torch.randint(0, TRANSFORMER["vocab_size"], shape, generator=g).to(device)
    return model, (tokens, target)


def _stand_in(logdir: str | None) -> Any:
    """A Trainer stand-in for calling the monitor's event directly: rank zero, one process, and
    a real ``TensorBoardLogger`` in ``logdir`` (``None``: no logger)."""
    loggers: list[Any] = []
    if logdir is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(logdir, name="", version=""))
    return SimpleNamespace(is_global_zero=True, loggers=loggers, world_size=1, callbacks=[],
                           callback_metrics={}, progress_bar_metrics={}, global_step=0)


#: the parts of an activation event timed separately (``owner.attribute`` -> label)
PARTS = {
    "SpectralMonitor._activation_metrics": "spectra (Gram, eigvalsh, quantities, distributions)",
    "report.to_host": "host copy",
    "report.log_histograms": "histograms",
    "SpectralCallback._log": "scalars (loggers, callback_metrics)",
}


def event_benchmark(arch: str, device: str, repeats: int, wide: int = 1024,
                    profile_events: int = 0) -> dict[str, Any]:
    """Per-event cost of the monitor vs the bare kernels and a training step, interleaved.

    ``arch="wide"``: three ``wide × wide`` Linear layers on ``wide`` random rows, where the
    kernels dominate and the fixed per-event overhead shows as the ratio's distance from 1.
    ``arch="transformer"``: the demo transformer of ``lightning.pytorch.demos`` on synthetic
    tokens (every token is a row). One training step (forward, loss, backward, SGD) of a copy
    of the model is timed in the same rounds, so an event can be priced in steps. Events are
    timed twice: computing only (no logger) and as in a run, writing to a TensorBoardLogger
    (histograms and scalars; figures are left out: they are budgeted separately).
    ``profile_events`` > 0 also splits that many logged events, each after a training step, into
    :data:`PARTS` (main-thread CPU time).
    """
    import copy
    import tempfile

    from torch import nn
    from torch.nn import functional as F

    from lightning_spectral import SpectralMonitor
    from lightning_spectral.testing import count_host_syncs

    if arch == "wide":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(wide, wide), nn.ReLU(), nn.Linear(wide, wide), nn.ReLU(),
                              nn.Linear(wide, wide)).to(device)
        x = torch.randn(wide, wide, generator=torch.Generator().manual_seed(0)).to(device)
        target = torch.randn(wide, wide, generator=torch.Generator().manual_seed(1)).to(device)
        inputs: tuple[torch.Tensor, ...] = (x,)

        def loss_of(m: nn.Module) -> torch.Tensor:
            return F.mse_loss(m(x), target)
    elif arch == "transformer":
        model, (tokens, target) = make_transformer(device)
        inputs = (tokens, target)

        def loss_of(m: nn.Module) -> torch.Tensor:
            return F.nll_loss(m(tokens, target), target.reshape(-1))
    else:
        model = make_model(arch).to(device)
        x, y = next(iter(make_loader(arch, device)))
        x, y = x.to(device), y.to(device)
        inputs = (x,)

        def loss_of(m: nn.Module) -> torch.Tensor:
            return F.cross_entropy(m(x), y)
    student = copy.deepcopy(model).train()  # before the monitor's hooks exist
    logdir = tempfile.mkdtemp(prefix="bench_overhead_event_")
    trainer, logged = _stand_in(None), _stand_in(logdir)
    monitor = SpectralMonitor(figures=False)
    monitor.setup(trainer, model, "fit")
    capture = monitor._capture
    capture.start(seed=0)
    with torch.no_grad():
        model(*inputs)
    capture.stop()
    rows = capture.take()
    weights = [getattr(owner, pname).detach() for owner, pname in monitor._weight_layers.values()]

    # an event consumes the dict it is given (each layer's rows are popped as they are
    # copied); a shallow copy leaves ``rows`` itself to the next call
    def act_event() -> None:
        monitor._emit(trainer, 0, 0, dict(rows))

    step_no = [0]

    def act_logged() -> None:
        step_no[0] += 1
        monitor._emit(logged, step_no[0], step_no[0], dict(rows))

    def act_bare() -> None:
        out = []
        for r in rows.values():
            z = r.float()
            gram = z @ z.mT if z.shape[0] <= z.shape[1] else z.mT @ z
            out.append(torch.linalg.eigvalsh(gram))
        torch.cat([o.reshape(-1) for o in out]).cpu()

    def weight_event() -> None:
        monitor._pending_weights = (0, 0, monitor._weight_spectra(trainer))
        monitor._emit(trainer, 0, 0, None)

    def weight_bare() -> None:
        torch.cat([torch.linalg.svdvals(w.reshape(w.shape[0], -1).float()) for w in weights]).cpu()

    opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(student).backward()
        opt.step()

    times = interleaved(
        {"act_event": act_event, "act_logged": act_logged, "act_bare": act_bare,
         "weight_event": weight_event, "weight_bare": weight_bare, "step": train_step},
        repeats=repeats, warmup=2, device=device, inner=5,
    )
    syncs = {}
    for name, fn in (("act", act_event), ("weight", weight_event)):
        with count_host_syncs(device) as counted:
            fn()
        syncs[name] = counted
    parts = profile_parts(monitor, act_logged, train_step, profile_events, device)
    capture.remove()
    shutil.rmtree(logdir, ignore_errors=True)
    shapes = {n: tuple(r.shape) for n, r in rows.items()}
    return {"times": times, "shapes": shapes, "syncs": syncs, "parts": parts,
            "hooked": len(capture.names),
            "weights": {n: tuple(w.shape) for n, w in zip(monitor._weight_layers, weights,
                                                           strict=True)}}


def hook_cost(repeats: int) -> float:
    """Seconds one watched module's forward costs more with the monitor's hooks on it,
    switched off (as between events): a tiny ``Linear`` called 20,000 times with and without,
    interleaved, the minimum over ``repeats`` rounds of each."""
    import timeit

    from torch import nn

    from lightning_spectral.capture import LayerCapture

    x = torch.randn(4, 8)
    plain = nn.Sequential(nn.Linear(8, 8))
    hooked = nn.Sequential(nn.Linear(8, 8))
    LayerCapture(hooked, layers=["0"]).attach()
    best = {"plain": float("inf"), "hooked": float("inf")}
    with torch.no_grad():
        for _ in range(max(repeats, 3)):
            for name, m in (("plain", plain), ("hooked", hooked)):
                best[name] = min(best[name], timeit.timeit(lambda m=m: m(x), number=20_000))
    return max(best["hooked"] - best["plain"], 0.0) / 20_000


def profile_parts(monitor: Any, event: Any, step: Any, events: int,
                  device: str) -> dict[str, float]:
    """Main-thread CPU seconds per event of each of :data:`PARTS` and of the whole event, over
    ``events`` events each after a training step (so TensorBoard's writer thread has drained
    its queue, as between the events of a run)."""
    import time

    from lightning_spectral import report
    from lightning_spectral.callbacks import _base, spectral

    if events <= 0:
        return {}
    owners = {"SpectralMonitor": spectral.SpectralMonitor, "report": report,
              "SpectralCallback": _base.SpectralCallback}
    spent = {label: 0.0 for label in PARTS.values()}
    saved = []

    def timed(fn: Any, label: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.thread_time() - t0

        return wrapper

    for path, label in PARTS.items():
        owner_name, attr = path.split(".")
        owner = owners[owner_name]
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        saved.append((owner, attr, original))
        setattr(owner, attr, timed(getattr(owner, attr), label))
    total = 0.0
    try:
        for _ in range(events):
            step()
            sync(device)
            t0 = time.thread_time()
            event()
            sync(device)
            total += time.thread_time() - t0
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    out = {label: s / events for label, s in spent.items()}
    out["event"] = total / events
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--no-fit", action="store_true", help="skip the fit-level A/B windows")
    p.add_argument("--profile-events", type=int, default=None,
                   help="logged events split into their parts (default 200; quick 20)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench_overhead: --device {args.device} but CUDA is not available")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    windows = {"mlp": 30 if args.quick else 2000, "cnn": 10 if args.quick else 1000}
    lines = [
        "Training overhead: `SpectralMonitor()` at its defaults (every 100 steps, weights every "
        "2,000) vs the same fit without it; wall time of the window of optimizer steps "
        "`[1, 1 + window)`, interleaved A/B fits, median (min–max) of per-pair ratios. Both "
        "arms log to a TensorBoardLogger, so histograms and the budgeted figures are included; "
        "the window starts after the first event, so the one-time start-up (importing "
        "matplotlib, the first figure: a few seconds) is excluded.",
        "",
        "| model | window (steps) | without | with | ratio with/without | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for arch in () if args.no_fit else ("mlp", "cnn"):
        window = windows[arch]
        fit_window(arch, min(window, 20), False, args.device)  # warm-up (imports, allocator)
        plain, watched = [], []
        for _ in range(repeats):
            plain.append(fit_window(arch, window, False, args.device))
            watched.append(fit_window(arch, window, True, args.device))
        ratio = ratio_summary(watched, plain)
        lines.append(
            f"| {arch} | {window} | {fmt_ms(summary(plain)[0])} | {fmt_ms(summary(watched)[0])} "
            f"| {fmt_ratio(ratio)} | {100 * (ratio[0] - 1):+.2f} % |"
        )
        print(lines[-1], flush=True)
    wide = 256 if args.quick else 1024
    lines += [
        "",
        "Per-event cost vs the bare kernels on the same matrices, and vs one training step "
        "(forward, loss, backward, SGD on a copy of the model, same batch), all interleaved in "
        "the same rounds, 5 calls per timing, median (min–max) of per-round ratios. "
        "*activations*: computing plus the one host transfer, no logger; *+ TensorBoard*: the "
        "same event writing its histograms and scalars to a `TensorBoardLogger`, as in a run "
        "(the per-event figure is budgeted separately, `figure_budget`). `wide`: three "
        f"{wide}×{wide} Linear layers on {wide} random rows, where the kernels dominate. "
        "`transformer`: `lightning.pytorch.demos.Transformer` (2 encoder + 2 decoder layers, "
        f"d = 200, vocabulary {TRANSFORMER['vocab_size']}) on synthetic tokens, batch "
        f"{TRANSFORMER['batch']} × {TRANSFORMER['seq']} tokens = "
        f"{TRANSFORMER['batch'] * TRANSFORMER['seq']} rows per layer. *Syncs*: device-to-host "
        "synchronisations in one event, counted with `torch.cuda.set_sync_debug_mode('warn')` "
        "on CUDA; on CPU, the calls that would copy to the host (`.cpu()`, `.item()`, "
        "`.tolist()`, ...), by source line.",
        "",
        "| model | event | event time | bare kernels | event / bare | event / training step "
        "| syncs per event |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes_lines = []
    at_defaults = []
    parts_lines = []
    per_hook = hook_cost(repeats)
    events = args.profile_events if args.profile_events is not None else (
        20 if args.quick else 200)
    for arch in ("mlp", "cnn", "transformer", "wide"):
        res = event_benchmark(arch, args.device, repeats, wide=wide,
                              profile_events=0 if arch == "wide" else events)
        t = res["times"]
        per_step = {}
        for kind, label, bare in (("act", "activations", "`matmul`+`eigvalsh`"),
                                  ("logged", "+ TensorBoard", "`matmul`+`eigvalsh`"),
                                  ("weight", "weights", "`svdvals`")):
            ev, ba = t[f"{kind}_event" if kind != "logged" else "act_logged"], t[
                "weight_bare" if kind == "weight" else "act_bare"]
            per_step[kind] = ratio_summary(ev, t["step"])
            syncs = res["syncs"].get(kind)
            lines.append(
                f"| {arch} | {label} | {fmt_ms(summary(ev)[0])} | {fmt_ms(summary(ba)[0])} "
                f"({bare}) | {fmt_ratio(ratio_summary(ev, ba))} | {fmt_ratio(per_step[kind])} | "
                f"{syncs.describe() if syncs is not None else '—'} |"
            )
            print(lines[-1], flush=True)
        shapes_lines.append(
            f"- `{arch}`: training step {fmt_ms(summary(t['step'])[0])}; activation rows "
            + ", ".join(f"{n} {r[0]}×{r[1]}" for n, r in res["shapes"].items())
            + f"; {len(res['weights'])} weights "
            + ", ".join(f"{n} {'×'.join(map(str, w))}" for n, w in res["weights"].items())
        )
        # defaults: activations every 100 steps (with their logging), weights every 2,000,
        # and the switched-off hooks on every step
        hooks = res["hooked"] * per_hook / summary(t["step"])[0]
        est = per_step["logged"][0] / 100 + per_step["weight"][0] / 2000
        at_defaults.append(
            f"| {arch} | {fmt_ratio(per_step['logged'])} | {fmt_ratio(per_step['weight'])} | "
            f"{100 * est:.2f} % | {res['hooked']} × {1e6 * per_hook:.1f} µs = "
            f"{100 * hooks:.2f} % | {100 * (est + hooks):.2f} % |")
        parts = res["parts"]
        if parts:
            total = parts.pop("event")
            rest = total - sum(parts.values())
            cells = " | ".join(f"{1e3 * v:.2f} ms ({100 * v / total:.0f} %)"
                               for v in [*parts.values(), rest])
            parts_lines.append(f"| {arch} | {1e3 * total:.2f} ms | {cells} |")
    lines += ["", "Shapes (rows captured per layer, n × d, and weights):", "", *shapes_lines]
    lines += [
        "",
        "What SpectralMonitor costs at its defaults (activations every 100 steps, weights every "
        "2,000), in training steps of the same model on the same machine, from the medians "
        "above: overhead ≈ (activation event with TensorBoard logging / step) / 100 + (weight "
        "event / step) / 2000. *Hooks*: on every step, each watched layer's forward passes "
        "through the monitor's hook, switched off between events; its cost (a tiny `Linear` "
        "with and without the hook, 20,000 calls, best of the rounds) times the number of "
        "watched layers, against the median training step. The per-event figure is budgeted "
        "separately: it may use up to `figure_budget` (1 %) of the wall time of a long run.",
        "",
        "| model | activation event (steps) | weight event (steps) | events at defaults "
        "| hooks per step | total |",
        "|---|---|---|---|---|---|",
        *at_defaults,
    ]
    if parts_lines:
        labels = [*PARTS.values(), "other (layout, unpacking, checks)"]
        lines += [
            "",
            f"Where one logged activation event goes: main-thread CPU time per event, mean of "
            f"{events} events each after a training step (so the TensorBoard writer's thread "
            "has drained its queue, as between the events of a run).",
            "",
            "| model | event | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
            *parts_lines,
        ]
    if args.quick:
        lines += ["", "_Smoke run (`--quick`): tiny windows and few repeats; not a result._"]
    write_section("bench_overhead", "SpectralMonitor overhead", "\n".join(lines),
                  device=args.device, out=args.out)


if __name__ == "__main__":
    main()
