"""What SpectralMonitor costs a training run, and what one event costs.

Models (:data:`MODELS`, synthetic seeded data made here): a 784-512-512-10 MLP, a 3×32×32 CNN
and the demo Transformer of ``lightning.pytorch.demos``; ``wide`` (three 1024² layers) only in
the per-event part. Three measurements, each side by side and interleaved in one run
(``benchmarks/_common.py``):

1. **In a Trainer fit.** The same seeded Lightning fit with and without ``SpectralMonitor()`` at
   its defaults, alternating, both logging to TensorBoard. The timed window runs from optimizer
   step 1 to ``1 + window`` (after set-up, the step-0 events and the first figure). The monitor
   share is the time inside its Lightning hooks and its row capture over the plain fit's window
   time of the same pair (whole-fit wall ratios differ by more than the effect on a shared
   machine; they are shown too).
2. **Per-event cost against the bare kernels and a training step.** One activation event
   (rows already captured: one batched Gram + ``eigvalsh`` per shape, RankMe's raw spectrum
   from the same Gram, VNE/erank/λ_max/κ/RankMe, the logged distributions, one host transfer)
   against the bare ``matmul + eigvalsh`` of the same matrices, computing only and again
   writing to a TensorBoardLogger as in a run (histograms and scalars); one weight event
   (``singular_values_many(method="gram")`` + the weight quantities, distributions, one host
   transfer) against bare float32 ``svdvals`` of each weight; against a bare training step of
   a copy of the model; and where the time of one logged activation event goes (main-thread
   CPU time of its parts).
3. **At the defaults, as a run pays it:** the monitor share of (1) + one weight event of (2)
   per ``WEIGHT_EVERY`` Trainer steps + the idle per-step costs outside the monitor's hooks (its
   switched-off capture hooks, :func:`hook_cost`, and Lightning's dispatch of the per-step
   callback hooks to it, :func:`dispatch_cost`), against the Trainer step of (1).

    python -m benchmarks.bench_overhead [--quick] [--device cpu|cuda] [--repeats N] [--no-fit]
                                        [--models mlp cnn transformer wide] [--threads N]
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
from lightning_spectral.callbacks.spectral import WEIGHTS_EVERY_FACTOR

#: the three models the ≤ 1 % target names, on synthetic data made here (nothing is downloaded)
MODELS = {
    "mlp": "784-512-512-10 MLP (ReLU), batch 128 of synthetic 784-dim inputs",
    "cnn": "3×32×32 CNN: conv 3→32, pool, conv 32→64, pool, conv 64→128, global mean, "
           "Linear(128, 10) (ReLU), batch 128 of synthetic images",
    "transformer": "`lightning.pytorch.demos.Transformer` (2+2 layers, d = 200, vocabulary "
                   "1000), batch 16 × 32 synthetic tokens",
}
TRANSFORMER = {"vocab_size": 1000, "batch": 16, "seq": 32}
BATCH = 128
#: batches in one synthetic epoch (the loaders repeat; a fit never runs out of data)
EPOCH_BATCHES = 50


def make_net(arch: str) -> Any:
    """The bare ``nn.Module`` of ``arch`` (seeded)."""
    from torch import nn

    torch.manual_seed(0)
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                             nn.ReLU(), nn.Linear(512, 10))
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, 10),
        )
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=TRANSFORMER["vocab_size"])


def make_batches(arch: str, count: int, device: str = "cpu") -> list[tuple[torch.Tensor, ...]]:
    """``count`` seeded synthetic batches ``(inputs, targets)`` of ``arch``; labels of the
    MLP and CNN come from a fixed random linear teacher, so the fit learns something."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        if arch == "transformer":
            shape = (TRANSFORMER["batch"], TRANSFORMER["seq"])
            x = torch.randint(0, TRANSFORMER["vocab_size"], shape, generator=g)
            y = torch.randint(0, TRANSFORMER["vocab_size"], shape, generator=g)
        else:
            x = torch.randn((BATCH, 784) if arch == "mlp" else (BATCH, 3, 32, 32), generator=g)
            teacher = torch.randn(x[0].numel(), 10, generator=torch.Generator().manual_seed(1))
            y = (x.reshape(BATCH, -1) @ teacher).argmax(dim=1)
        out.append((x.to(device), y.to(device)))
    return out


def loss_of(arch: str, net: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    from torch.nn import functional as F

    x, y = batch
    if arch == "transformer":
        return F.nll_loss(net(x, y), y.reshape(-1))
    return F.cross_entropy(net(x), y)


def make_task(arch: str) -> Any:
    """``arch`` as a LightningModule: the loss logged every step, SGD with momentum."""
    import lightning.pytorch as pl

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(arch)

        def forward(self, *args: Any) -> Any:
            return self.net(*args)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = loss_of(arch, self.net, batch)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    return Task()


def make_loader(arch: str) -> Any:
    from torch.utils.data import DataLoader

    batches = make_batches(arch, EPOCH_BATCHES)
    return DataLoader(batches, batch_size=None, shuffle=False)


#: steps in the timed window of a fit, per model (``--quick``: 20)
FIT_WINDOW = {"mlp": 1000, "cnn": 300, "transformer": 200}


#: optimizer steps between weight events at the defaults (``every_n_steps=100``)
WEIGHT_EVERY = WEIGHTS_EVERY_FACTOR * 100

#: the per-step hooks whose timing floor is subtracted from the monitor's hook time: what the
#: timer reads for an empty hook in the same fit (its wrapper, the call of an empty function,
#: a cold cache after the step's backward). The call itself is a cost of Lightning's dispatch,
#: priced separately (:func:`dispatch_cost`); left in the hook time it would count that call
#: twice.
FLOOR_HOOKS = ("on_train_batch_start", "on_train_batch_end")


def fit_window(arch: str, window: int, with_monitor: bool, device: str) -> dict[str, Any]:
    """One seeded fit of ``window`` optimizer steps from step 1 (after the step-0 events and the
    first figure), monitor at its defaults or absent, both logging to TensorBoard.

    With the monitor, the time inside its Lightning hooks and inside its capture of rows during
    the forward of a due step (``LayerCapture._capture``) is summed within the window, less the
    timing floor of its per-step hook calls (:data:`FLOOR_HOOKS`), with the number of events
    (``_emit`` calls) and the part spent on figures."""
    import lightning.pytorch as pl

    from benchmarks.bench_callbacks import Case, HookClock, patch_figures
    from lightning_spectral import SpectralMonitor
    from lightning_spectral.capture import LayerCapture

    timer_cls = type("Timer", (WindowTimer, pl.Callback), {})
    timer = timer_cls(1, 1 + window, device)
    # the probe: empty per-step hooks in both arms, timed like the monitor's in the monitored
    # one; what the timer reads for them is the floor of timing a hook (see FLOOR_HOOKS)
    probe = type("Probe", (pl.Callback,), {
        name: (lambda self, *args, **kwargs: None) for name in FLOOR_HOOKS})()
    callbacks: list[Any] = [timer, probe]
    clock = HookClock(timer, device)
    floor = HookClock(timer, device)
    saved: list[tuple[Any, str, Any]] = []
    if with_monitor:
        for name in FLOOR_HOOKS:
            setattr(probe, name, floor.timed(getattr(probe, name), name))
        monitor = SpectralMonitor()
        clock.attach(monitor, Case("SpectralMonitor", "", lambda: None, "_emit", 1, window,
                                   window, window))
        callbacks.append(monitor)
        saved = patch_figures(clock)
        saved.append((LayerCapture, "_capture", LayerCapture._capture))
        LayerCapture._capture = clock.timed(LayerCapture._capture, "capture")  # type: ignore
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
        trainer.fit(make_task(arch), make_loader(arch))
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
        shutil.rmtree(logdir, ignore_errors=True)
    # the timing floor of each per-step hook call: the probe's mean time per empty call
    floor_s = sum(
        clock.calls.get(name, 0) * floor.by_hook[name] / floor.calls[name]
        for name in FLOOR_HOOKS if floor.calls.get(name)
    )
    return {"window_s": float(timer.elapsed), "hook_s": clock.seconds - floor_s,
            "hook_raw_s": clock.seconds, "floor_s": floor_s,
            "floor_per_call_s": (sum(floor.by_hook.values()) / max(sum(floor.calls.values()), 1)),
            "figure_s": clock.figure_seconds, "events": clock.events, "by_hook": clock.by_hook,
            "calls": clock.calls}


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
    (histograms and scalars; figures are left out: they are budgeted, ``figure_budget``).
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

        def step_loss(m: nn.Module) -> torch.Tensor:
            return F.mse_loss(m(x), target)
    else:
        model = make_net(arch).to(device)
        batch = make_batches(arch, 1, device)[0]
        inputs = batch if arch == "transformer" else batch[:1]

        def step_loss(m: nn.Module) -> torch.Tensor:
            return loss_of(arch, m, batch)
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
        step_loss(student).backward()
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


def dispatch_cost(repeats: int) -> float:
    """Seconds per training step Lightning spends dispatching its per-step callback hooks to a
    ``SpectralMonitor`` (see :func:`benchmarks.bench_callbacks.dispatch_cost`; the hooks' own
    work is in the monitor share)."""
    from benchmarks.bench_callbacks import dispatch_cost as dispatch
    from lightning_spectral import SpectralMonitor

    return dispatch(SpectralMonitor, make_task("mlp"), repeats)


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
    p.add_argument("--no-fit", action="store_true", help="skip the fits (Trainer) part")
    p.add_argument("--fit-repeats", type=int, default=None,
                   help="timed pairs of fits per model (default 3; quick 1)")
    p.add_argument("--models", nargs="+", default=[*MODELS, "wide"],
                   choices=[*MODELS, "wide"], help="models to measure (default: all)")
    p.add_argument("--profile-events", type=int, default=None,
                   help="logged events split into their parts (default 200; quick 20)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench_overhead: --device {args.device} but CUDA is not available")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    models = "; ".join(f"`{k}`: {v}" for k, v in MODELS.items())
    lines = [
        f"Models: {models}.",
        "",
        "**In a Trainer fit.** The same seeded Lightning fit without and with `SpectralMonitor()` "
        f"at its defaults (activations every 100 steps, weights every {WEIGHT_EVERY:,}, figures "
        "budgeted), "
        "alternating, both logging to a TensorBoardLogger; timed window: optimizer steps "
        "`[1, 1 + window)`, after the step-0 events and the first figure. *Monitor share*: "
        "time inside the monitor's Lightning hooks and its row capture during a due step's "
        "forward, over the plain fit's window time of the same pair, median (min–max) over the "
        "pairs: the activation events (with their histograms, scalars and any figure) and the "
        "hooks' work on the other steps. The wall ratio of the two fits is shown for "
        "completeness: two identical fits on this shared machine differ by more than the "
        "effect.",
        "",
        "| model | window (steps) | Trainer step | events in window | monitor share | per event "
        "| of which figures | wall ratio with/without |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fits: dict[str, dict[str, Any]] = {}
    fit_repeats = args.fit_repeats or (1 if args.quick else 3)
    for arch in () if args.no_fit else [m for m in MODELS if m in args.models]:
        window = 20 if args.quick else FIT_WINDOW[arch]
        fit_window(arch, min(window, 20), False, args.device)  # warm-up (imports, allocator)
        fit_window(arch, min(window, 20), True, args.device)
        plain, watched = [], []
        for _ in range(fit_repeats):
            plain.append(fit_window(arch, window, False, args.device)["window_s"])
            watched.append(fit_window(arch, window, True, args.device))
        share = summary([w["hook_s"] / p for w, p in zip(watched, plain, strict=True)])
        step_s = summary(plain)[0] / window
        per_event = [w["hook_s"] / w["events"] for w in watched if w["events"]]
        fits[arch] = {"share": share, "step": step_s}
        figures = summary([w["figure_s"] / p for w, p in zip(watched, plain, strict=True)])[0]
        lines.append(
            f"| {arch} | {window} | {fmt_ms(step_s)} | {watched[0]['events']} | "
            f"{100 * share[0]:.2f} % ({100 * share[1]:.2f}–{100 * share[2]:.2f}) | "
            f"{fmt_ms(summary(per_event)[0]) if per_event else '—'} | "
            f"{100 * figures:.2f} % | "
            f"{fmt_ratio(ratio_summary([w['window_s'] for w in watched], plain))} |"
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
        "(the per-event figure is left out: it is budgeted, `figure_budget`). *weights*: the "
        "singular values from the float64 Gram matrix on the smaller side (`method=\"gram\"`) "
        "against float32 `svdvals`, the straightforward way. `wide`: three "
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
    in_fit: list[str] = []
    parts_lines = []
    per_hook = hook_cost(repeats)
    per_dispatch = dispatch_cost(repeats)
    events = args.profile_events if args.profile_events is not None else (
        20 if args.quick else 200)
    for arch in [m for m in (*MODELS, "wide") if m in args.models]:
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
        # defaults: activations every 100 steps (with their logging), weights every WEIGHT_EVERY,
        # and the switched-off hooks on every step
        hooks = res["hooked"] * per_hook / summary(t["step"])[0]
        est = per_step["logged"][0] / 100 + per_step["weight"][0] / WEIGHT_EVERY
        at_defaults.append(
            f"| {arch} | {fmt_ratio(per_step['logged'])} | {fmt_ratio(per_step['weight'])} | "
            f"{100 * est:.2f} % | {res['hooked']} × {1e6 * per_hook:.1f} µs = "
            f"{100 * hooks:.2f} % | {100 * (est + hooks):.2f} % |")
        if arch in fits:
            # in the fit: the measured monitor share (activation events and the hooks' work on
            # the other steps) + one weight event per WEIGHT_EVERY Trainer steps + the switched-off
            # module hooks of every step
            f = fits[arch]
            weight = summary(t["weight_event"])[0] / f["step"] / WEIGHT_EVERY
            idle = (res["hooked"] * per_hook + per_dispatch) / f["step"]
            share = f["share"]
            total = [v + weight + idle for v in share]
            in_fit.append(
                f"| {arch} | {fmt_ms(f['step'])} | {100 * share[0]:.2f} % "
                f"({100 * share[1]:.2f}–{100 * share[2]:.2f}) | "
                f"{fmt_ms(summary(t['weight_event'])[0])} → {100 * weight:.2f} % | "
                f"{100 * idle:.2f} % | **{100 * total[0]:.2f} %** "
                f"({100 * total[1]:.2f}–{100 * total[2]:.2f}) | "
                f"{'meets' if total[0] <= 0.01 else 'exceeds'} |")
        parts = res["parts"]
        if parts:
            total = parts.pop("event")
            rest = total - sum(parts.values())
            cells = " | ".join(f"{1e3 * v:.2f} ms ({100 * v / total:.0f} %)"
                               for v in [*parts.values(), rest])
            parts_lines.append(f"| {arch} | {1e3 * total:.2f} ms | {cells} |")
    lines += ["", "Shapes (rows captured per layer, n × d, and weights):", "", *shapes_lines]
    if in_fit:
        lines += [
            "",
            "**At the defaults, as a run pays it** (target ≤ 1 %): the monitor share measured in "
            f"the fits above, plus one weight event (timed above, same model) per {WEIGHT_EVERY:,} "
            "Trainer steps, plus the *idle* per-step costs outside the monitor's hooks: the "
            "switched-off capture hooks that every step's forward passes through (a tiny "
            "`Linear` with and without the hook, 20,000 calls, best of the rounds, times the "
            f"watched layers: {1e6 * per_hook:.1f} µs per layer) and Lightning's dispatch of its "
            "six per-step callback hooks to one more callback "
            f"({1e6 * per_dispatch:.1f} µs per step, see `dispatch_cost`), each against the "
            "plain fit's Trainer step. "
            "Range: from the range of the monitor share. Figures are inside the share: after "
            "the first, a per-event figure is drawn only while the monitor as a whole (events "
            "and figures) has used at most `figure_budget` (1 %) of the fit's wall time.",
            "",
            "| model | Trainer step | monitor share (fit) | weight event → share | "
            "idle hooks | total | ≤ 1 % |",
            "|---|---|---|---|---|---|---|",
            *in_fit,
        ]
    lines += [
        "",
        "The same against a bare training step (forward, loss, backward, SGD on a copy of the "
        "model: no Trainer, no data loading, no logging, no callback dispatch): "
        "overhead ≈ (activation event with TensorBoard logging / step) / 100 + (weight "
        f"event / step) / {WEIGHT_EVERY} + the switched-off hooks, from the medians above.",
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
