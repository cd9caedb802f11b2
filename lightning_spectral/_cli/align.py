"""``lightning-spectral align CKPT_A CKPT_B``: loss barrier before and after permutation alignment.

Rebuilding a model without its code
-----------------------------------
A checkpoint is a Lightning ``.ckpt`` (its ``"state_dict"`` is used) or a file holding a plain
``state_dict`` (``torch.save(model.state_dict(), path)``). Checkpoints and ``--data`` files are
read under the loading policy of ``analyze`` (``lightning_spectral.analysis.load_state_dict``):
regular files only, ``torch.load(weights_only=True)`` alone (custom classes refused, exit 2),
zip files memory-mapped, every tensor within ``--max-bytes``; ``--unsafe-load`` unpickles with
``weights_only=False`` (runs the files' code) and prints a warning. Its entries are read in
order (the order modules were registered, which is forward order for a ``Sequential`` chain)
and rebuilt as
``Flatten → Linear → act → Linear → act → … → Linear``:

- every ``<prefix>.weight`` of 2 dimensions with a matching ``<prefix>.bias`` (optional) is a
  ``Linear`` layer; consecutive layers must chain (``out`` of one = ``in`` of the next);
- a ``<prefix>.running_mean`` / ``running_var`` group of the width of the previous Linear is a
  ``BatchNorm1d`` after it;
- the activation between layers is ``--activation`` (default ``relu``).

Convolution weights (more than 2 dimensions) need the model's code (padding and stride are not
stored): use :func:`lightning_spectral.functional.symmetry.interpolation_barrier` from Python.

Data (``--data``)
-----------------
- ``digits`` (default): cross-entropy on the held-out split of scikit-learn's digits
  (:mod:`lightning_spectral.demos`); needs 64 inputs and 10 outputs.
- ``random``: ``--samples`` seeded Gaussian inputs; the loss at ``t`` is the mean squared
  distance between the interpolated model's outputs and the straight line between the two end
  models' outputs — 0 at both ends, so its maximum is the output-space barrier.
- a ``.pt`` file holding an ``(inputs, targets)`` pair: cross-entropy for integer targets, MSE
  otherwise.

Exit status: 0 printed, 1 ``--max-barrier`` given and the aligned barrier exceeds it, 2 bad input
(one line on stderr naming the file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lightning_spectral._cli.analyze import _one_line, add_loading_arguments, loading_options

_ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", "silu", "leaky_relu", "elu", "identity")


class _BadInput(Exception):
    pass


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "align",
        help="loss barrier between two checkpoints before and after permutation alignment",
        description="Print the loss barrier on the straight line between two MLP checkpoints, "
        "before and after aligning the second one's hidden units to the first (weight "
        "matching). Models are rebuilt from the state_dict as Flatten -> Linear -> act -> ... "
        "-> Linear.",
    )
    p.add_argument("ckpt_a", metavar="CKPT_A", help="first checkpoint (.ckpt or state_dict)")
    p.add_argument("ckpt_b", metavar="CKPT_B", help="second checkpoint, same architecture")
    p.add_argument("--data", default="digits",
                   help="'digits' (default), 'random', or a .pt file with (inputs, targets)")
    p.add_argument("--activation", default="relu", choices=_ACTIVATIONS,
                   help="activation between Linear layers (default relu)")
    p.add_argument("--points", type=int, default=11, help="points on the line (default 11)")
    p.add_argument("--samples", type=int, default=512, help="inputs for --data random")
    p.add_argument("--seed", type=int, default=0, help="seed for --data random")
    p.add_argument("--max-barrier", type=float, default=None,
                   help="exit 1 when the barrier after alignment exceeds this")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_loading_arguments(p)
    p.set_defaults(func=run)
    return p


def _load_state(path: str, args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    from lightning_spectral._checkpoint import CheckpointError, UnsafeLoadWarning, load_state_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsafeLoadWarning)  # printed once by loading_options
            return load_state_dict(path, unsafe=args.unsafe_load, max_bytes=args.budget)
    except CheckpointError as exc:
        raise _BadInput(str(exc)) from None


def _first(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception, cut to 200 characters."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _activation(name: str) -> Any:
    from torch import nn

    return {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
            "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU,
            "identity": nn.Identity}[name]()


def rebuild_mlp(state: dict[str, Any], activation: str = "relu", name: str = "checkpoint") -> Any:
    """``nn.Sequential(Flatten, Linear, [BatchNorm1d], act, …, Linear)`` loaded from ``state``.

    Raises ``ValueError`` (one line, naming ``name``) for anything that is not a Linear chain.
    """
    from torch import nn

    prefixes: list[str] = []
    for key in state:
        prefix = key.rsplit(".", 1)[0] if "." in key else ""
        if prefix not in prefixes:
            prefixes.append(prefix)
    layers: list[tuple[nn.Module, dict[str, Any]]] = []
    width: int | None = None
    for prefix in prefixes:
        dot = prefix + "." if prefix else ""
        own = {k[len(dot):]: v for k, v in state.items()
               if k.startswith(dot) and "." not in k[len(dot):]}
        w = own.get("weight")
        if "running_mean" in own:
            if width is None or own["running_mean"].shape != (width,):
                raise ValueError(f"{name}: BatchNorm {prefix!r} does not follow a Linear layer of "
                                 "its width")
            layers.append((nn.BatchNorm1d(width, affine=w is not None), own))
            continue
        if w is None:
            continue
        if w.ndim != 2:
            raise ValueError(f"{name}: {dot}weight has shape {tuple(w.shape)}; only Linear "
                             "chains can be rebuilt without model code (use the Python API for "
                             "convolutions)")
        if width is not None and w.shape[1] != width:
            raise ValueError(f"{name}: {dot}weight reads {w.shape[1]} inputs but the previous "
                             f"layer writes {width}")
        if width is not None:
            layers.append((_activation(activation), {}))
        layers.append((nn.Linear(w.shape[1], w.shape[0], bias="bias" in own), own))
        width = w.shape[0]
    if width is None:
        raise ValueError(f"{name}: no Linear weight found in the state_dict")
    for module, own in layers:
        try:
            module.load_state_dict(own, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{name}: {str(exc).splitlines()[0]}") from None
    return nn.Sequential(nn.Flatten(), *(m for m, _ in layers)).float().eval()


def _data(args: argparse.Namespace, model_a: Any, model_b: Any) -> tuple[Any, Any, str]:
    import torch
    import torch.nn.functional as F

    first = next(m for m in model_a if isinstance(m, torch.nn.Linear))
    last = [m for m in model_a if isinstance(m, torch.nn.Linear)][-1]
    if args.data == "digits":
        if first.in_features != 64 or last.out_features != 10:
            raise _BadInput(f"--data digits needs a 64-input, 10-output model; "
                            f"{args.ckpt_a} has {first.in_features} inputs and "
                            f"{last.out_features} outputs (use --data random or a .pt file)")
        from lightning_spectral.demos import load_digits_tensors

        try:
            _, _, x, y = load_digits_tensors()
        except ImportError:
            raise _BadInput("--data digits needs scikit-learn (its bundled digits): pip install "
                            "'lightning-spectral[demos]', or use --data random or a .pt "
                            "file") from None
        return (x, y), F.cross_entropy, "cross-entropy on the digits test split"
    if args.data == "random":
        if args.samples < 1:
            raise _BadInput(f"--samples must be positive, got {args.samples}")
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.samples, first.in_features, generator=gen)
        return x, None, "output-space barrier on Gaussian inputs"
    path = Path(args.data)
    try:
        missing = not os.path.lexists(path)
    except ValueError:  # an embedded NUL byte
        missing = False
    if missing:
        raise _BadInput(f"{args.data}: no such data file (expected 'digits', 'random' or a .pt "
                        "file)")
    import warnings

    from lightning_spectral._checkpoint import CheckpointError, UnsafeLoadWarning, load_torch_file

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsafeLoadWarning)
            obj = load_torch_file(path, unsafe=args.unsafe_load, max_bytes=args.budget)
    except CheckpointError as exc:
        raise _BadInput(str(exc)) from None
    if (not isinstance(obj, (tuple, list)) or len(obj) != 2
            or not all(isinstance(t, torch.Tensor) for t in obj) or len(obj[0]) != len(obj[1])):
        raise _BadInput(f"{args.data}: expected an (inputs, targets) pair of tensors of equal "
                        "length")
    x, y = obj
    x = x.float()
    if x.reshape(len(x), -1).shape[1] != first.in_features:
        raise _BadInput(f"{args.data}: inputs have {x.reshape(len(x), -1).shape[1]} features, the "
                        f"model reads {first.in_features}")
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return (x, y.long()), F.cross_entropy, f"cross-entropy on {args.data}"
    return (x, y.float()), F.mse_loss, f"MSE on {args.data}"


def _output_barrier(model_a: Any, model_b: Any, x: Any, points: int) -> tuple[Any, Any]:
    """``(t, D(t))`` with ``D(t) = mean_x ‖f_{θ(t)}(x) − ((1−t) f_a(x) + t f_b(x))‖²``."""
    import copy

    import torch

    sa, sb = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a).eval()
    ts = torch.linspace(0, 1, points, dtype=torch.float64)
    vals = torch.empty(points, dtype=torch.float64)
    with torch.no_grad():
        fa, fb = model_a(x), model_b(x)
        for i, t in enumerate(ts.tolist()):
            probe.load_state_dict({k: torch.lerp(sa[k], sb[k], t) if sa[k].is_floating_point()
                                   else sa[k] for k in sa})
            vals[i] = float(((probe(x) - torch.lerp(fa, fb, t)) ** 2).sum(dim=1).mean())
    return ts, vals


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _BadInput as exc:
        print(f"lightning-spectral align: {_one_line(str(exc))}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.points < 2:
        raise _BadInput(f"--points must be at least 2, got {args.points}")
    try:
        args.budget = loading_options(args, "align")
    except ValueError as exc:
        raise _BadInput(str(exc)) from None
    state_a, state_b = _load_state(args.ckpt_a, args), _load_state(args.ckpt_b, args)
    try:
        model_a = rebuild_mlp(state_a, args.activation, args.ckpt_a)
        model_b = rebuild_mlp(state_b, args.activation, args.ckpt_b)
    except ValueError as exc:  # names the checkpoint
        raise _BadInput(str(exc)) from None
    except (RuntimeError, MemoryError) as exc:
        raise _BadInput(f"{args.ckpt_a}, {args.ckpt_b}: cannot rebuild the models "
                        f"({_first(exc)})") from None
    shapes_a = [tuple(v.shape) for v in model_a.state_dict().values()]
    shapes_b = [tuple(v.shape) for v in model_b.state_dict().values()]
    if shapes_a != shapes_b:
        raise _BadInput(f"{args.ckpt_b}: architecture differs from {args.ckpt_a} "
                        f"({shapes_b} vs {shapes_a})")
    import torch

    from lightning_spectral.functional.symmetry import (
        align,
        barrier_height,
        interpolation_losses,
        permutation_count_log10,
        permutation_distance,
    )

    data, loss_fn, what = _data(args, model_a, model_b)
    try:
        aligned = align(model_a, model_b)
        if loss_fn is None:
            ts, before = _output_barrier(model_a, model_b, data, args.points)
            _, after = _output_barrier(model_a, aligned, data, args.points)
        else:
            ts, before = interpolation_losses(model_a, model_b, loss_fn, data, args.points)
            _, after = interpolation_losses(model_a, aligned, loss_fn, data, args.points)
    except (RuntimeError, ValueError, ArithmeticError, MemoryError) as exc:
        # e.g. a linear assignment on NaN weights, targets out of range for the outputs
        raise _BadInput(f"{args.ckpt_a}, {args.ckpt_b}: alignment failed ({_first(exc)})"
                        ) from None

    def barrier(losses: torch.Tensor) -> float:
        return barrier_height(ts, losses)

    result = {
        "loss": what,
        "points": args.points,
        "barrier_before": barrier(before),
        "barrier_after": barrier(after),
        "losses_before": [round(float(v), 6) for v in before],
        "losses_after": [round(float(v), 6) for v in after],
        "log10_equivalent_optima": permutation_count_log10(model_a),
        "permutation_distance_a": float(permutation_distance(model_a)),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss: {what}; {args.points} points on the line A -> B")
        print(f"barrier before alignment: {result['barrier_before']:.6g}")
        print(f"barrier after alignment:  {result['barrier_after']:.6g}")
        print(f"loss along the line before: {result['losses_before']}")
        print(f"loss along the line after:  {result['losses_after']}")
        print(f"log10 equivalent optima of A: {result['log10_equivalent_optima']:.1f}")
    if args.max_barrier is not None and result["barrier_after"] > args.max_barrier:
        print(f"barrier after alignment {result['barrier_after']:.6g} exceeds --max-barrier "
              f"{args.max_barrier:g}", file=sys.stderr)
        return 1
    return 0
