"""Contract test: every callback on real models nobody here wrote, and through Trainer lifecycles.

The test ids form the matrix (146 cases).

``test_callback_on_model[<callback>-<model>]``: 4 callbacks × 11 models = 44

    callbacks  spectral       SpectralMonitor(every_n_steps=2, weights_every_n_steps=2)
               collapse       CollapseMonitor(head=<the classifier head>), labels per sample
                              (per token for the token models)
               collapse_auto  CollapseMonitor(head="auto"): must choose that same head
               penalty        VNEPenalty(alpha=0.0) on a feature layer (observes only)
    models     demo_transformer  lightning.pytorch.demos.Transformer (encoder + decoder),
                                 synthetic token ids, nll_loss on the target tokens
               encoder_clf       nn.TransformerEncoder (batch_first), mean-pooled → nn.Linear
               lstm_padded       nn.LSTM on a zero-padded batch (every position is a row)
               lstm_packed       nn.LSTM on pack_padded_sequence(enforce_sorted=False)
               gru_padded        nn.GRU, padded
               gru_packed        nn.GRU, packed, variable lengths
               conv_bn           Conv2d + BatchNorm2d blocks on the digits images
               conv_gn           Conv2d + GroupNorm blocks on the digits images
               tied              nn.Embedding and the output nn.Linear share ``weight``
               lazy              nn.LazyLinear everywhere (materialised in the module's setup,
                                 i.e. after the callbacks' setup)
               checkpointed      torch.utils.checkpoint(block, use_reentrant=False)

    Asserted: the watched layers; the rows per layer per event (``rows/<layer>``,
    ``last_event``; Linear on (B, d) → B, tokens → B·T, packed → sum(lengths), conv/norm maps →
    B rows of C columns, MultiheadAttention as itself, not its out_proj); the number of
    eigenvalues (min(rows, columns)); the values against layer outputs recorded by the test's
    own hooks; the logged steps; the weight tags (``<mha>.in_proj_weight``,
    ``<mha>.out_proj.weight``, ``<rnn>.weight_ih_l0``, ``<rnn>.weight_hh_l0``) and σ_max of the
    final weights; no hook or ``training_step`` wrapper left; no unexpected ``SpectralWarning``;
    weights bit-identical to a run without the callback; a state round trip on a fresh
    instance, also through ``torch.save`` / ``torch.load(weights_only=True)``.

``test_curvature_on_model[<model>-<mode>]``: CurvatureMonitor = 7
    encoder_clf, demo_transformer, conv_bn × mode train/eval, and encoder_clf_p0-train (the
    encoder without dropout). Attention has no second derivative through its fused kernels: the
    monitor's Hessian products run the math kernel, so every case is finite.

``test_curvature_event_interrupted[exception|interrupt]`` = 2: an error inside the curvature
    event (mode="eval", BatchNorm) leaves training flags, buffers and ``log`` as they were.

``test_checkpointing_matches_plain[spectral|collapse|penalty]`` = 3: the checkpointed model
    logs exactly what the same model without checkpointing logs (nothing captured twice).

``test_callbacks_together[<automatic|manual>-<model>]`` = 6 (encoder_clf, gru_packed, lazy):
    all four callbacks in one Trainer (CurvatureMonitor first) log what each logs alone.

``test_lifecycle[<lifecycle>-<callback>-<model>]``: 7 lifecycles × 4 callbacks × 3 models = 84

    lifecycles reuse       the callback, after a first fit stopped mid-epoch, used in a fresh
                           Trainer on a new model: logs from the start again, exactly what a
                           fresh instance logs, and ends with the same state
               exception   RuntimeError raised at a due step (capture window open): nothing
                           left on the model, training flags intact; then like a fresh one
               interrupt   KeyboardInterrupt there (Lightning calls on_exception, then
                           sys.exit(1)): same checks
               resume      ckpt_path resume from a mid-epoch ModelCheckpoint (a resumable
                           loader): the steps, values and final state of an uninterrupted run;
                           then like a fresh one in a plain fit
               accumulate  accumulate_grad_batches=2: rows of both micro-batches, logged steps,
                           values, bit-identical weights
               validation  validation after every batch (inside accumulation windows): logs
                           exactly what the run without validation logs
               manual      automatic_optimization=False with manual_backward (VNEPenalty with
                           inject=False and ``penalty.term(self)``; CurvatureMonitor with
                           loss="compute_loss")
    callbacks  spectral, collapse, penalty, curvature (mode="train")
    models     encoder_clf, gru_packed, lazy

Everything runs on CPU, one thread, tiny dimensions (batch 8, 6 tokens, widths 4–32), 3–6 steps.
"""

from __future__ import annotations

import io
import math
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl  # first, so that lightning_spectral picks the same flavour
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import Transformer
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

from lightning_spectral import CollapseMonitor, CurvatureMonitor, SpectralMonitor, VNEPenalty
from lightning_spectral.demos import load_digits_tensors
from lightning_spectral.errors import SpectralWarning
from lightning_spectral.functional.collapse import collapse_keys, neural_collapse
from lightning_spectral.functional.spectrum import vne
from lightning_spectral.testing import MemoryLogger

#: one intra-op thread (tests/conftest.py): tiny models crawl with oversubscribed threads
pytestmark = pytest.mark.usefixtures("one_thread")

B, T = 8, 6  # batch size, sequence length
N_BATCHES = 6  # one epoch = 6 optimizer steps
EVERY = 2  # every_n_steps of the step-based callbacks


# ============================================================================ models
class EncoderClassifier(nn.Module):
    """Token ids → embedding → nn.TransformerEncoder (batch_first) → mean over tokens → head."""

    def __init__(self, vocab: int = 20, d: int = 16, classes: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=32, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class RecurrentClassifier(nn.Module):
    """LSTM/GRU over a padded batch, or over a packed one (variable lengths); head on h_n."""

    def __init__(self, cell: str, packed: bool, d_in: int = 6, hidden: int = 12,
                 classes: int = 4) -> None:
        super().__init__()
        self.packed = packed
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.packed:
            x = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(h_n[-1])


class ConvNet(nn.Module):
    """Two conv blocks with BatchNorm2d or GroupNorm, global average pooling, linear head."""

    def __init__(self, norm: str, c: int = 4, classes: int = 10) -> None:
        super().__init__()

        def norm_layer() -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "bn" else nn.GroupNorm(2, c)

        self.block1 = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), norm_layer(), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), norm_layer(), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block2(self.block1(x))).flatten(1))


class TiedLM(nn.Module):
    """A token model whose output projection shares ``weight`` with the input embedding."""

    def __init__(self, vocab: int = 16, d: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))


class LazyMLP(nn.Module):
    """Every layer an nn.LazyLinear (input size inferred at the first forward)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(12), nn.ReLU()
        )
        self.head = nn.LazyLinear(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CheckpointedMLP(nn.Module):
    """A residual block run under gradient checkpointing (or not, for the twin)."""

    def __init__(self, use_checkpoint: bool, d_in: int = 64, d: int = 16,
                 classes: int = 10) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.stem = nn.Linear(d_in, d)
        self.block = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        if self.use_checkpoint and torch.is_grad_enabled():
            h = h + checkpoint(self.block, h, use_reentrant=False)
        else:
            h = h + self.block(h)
        return self.head(h)


# ============================================================================ data
def _token_batches(vocab: int, classes: int | None, seed: int) -> list[tuple]:
    """``(tokens (B, T), target)``: per-token targets (B, T) or, with ``classes``, labels (B,)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        x = torch.randint(0, vocab, (B, T), generator=gen)
        if classes is None:
            y = torch.randint(0, vocab, (B, T), generator=gen)
        else:
            y = torch.randint(0, classes, (B,), generator=gen)
        out.append((x, y))
    return out


def _sequence_batches(seed: int, d_in: int = 6, classes: int = 4) -> list[tuple]:
    """``(x (B, T, d_in) zero-padded, y (B,), lengths (B,))`` with lengths in [3, T]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        lengths = torch.randint(3, T + 1, (B,), generator=gen)
        lengths[0] = T  # the padded length is T in every batch
        x = torch.randn(B, T, d_in, generator=gen)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        x = x * mask[..., None]
        y = torch.randint(0, classes, (B,), generator=gen)
        out.append((x, y, lengths))
    return out


def _digits_batches(image: bool) -> list[tuple]:
    x, y, _, _ = load_digits_tensors(seed=0)
    x, y = x[: B * N_BATCHES], y[: B * N_BATCHES]
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return [(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]) for i in range(N_BATCHES)]


def _nll_tokens(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return F.nll_loss(model(x, y), y.reshape(-1))


def _ce(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _ce_tokens(model: nn.Module, batch: tuple) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def _ce_seq(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y, lengths = batch
    return F.cross_entropy(model(x, lengths), y)


# ============================================================================ cases
@dataclass(frozen=True)
class Case:
    """A model, its data and what each callback must see on it.

    ``layers``: the layers SpectralMonitor watches → ``(kind, columns)``; kind ``"cl"``: every
    leading position a row, ``"cf"``: one row per sample (spatial mean), ``"packed"``: one row
    per real token of a packed sequence. ``rows(batch)`` gives the rows per layer of one batch.
    """

    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[], list[tuple]]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    layers: dict[str, tuple[str, int]]
    rows: Callable[[tuple], dict[str, int]]
    weight_tags: tuple[str, ...]
    feature: str  # the VNEPenalty layer
    head: str  # the CollapseMonitor head
    monitor: str | list[str] = "auto"  # SpectralMonitor(layers=...)
    feature_kind: str = "cl"  # how the test reads the VNEPenalty layer's output
    dropout: bool = False  # draws from the global RNG in training


def _same_rows(layers: dict[str, tuple[str, int]], n: int, **other: int) -> dict[str, int]:
    return {name: other.get(name, n) for name in layers}


_DT = "model.transformer"
_DEMO_LAYERS = {
    f"{_DT}.encoder.layers.0.self_attn": ("cl", 16),
    f"{_DT}.encoder.layers.0.linear1": ("cl", 32),
    f"{_DT}.encoder.layers.0.linear2": ("cl", 16),
    f"{_DT}.decoder.layers.0.self_attn": ("cl", 16),
    f"{_DT}.decoder.layers.0.multihead_attn": ("cl", 16),
    f"{_DT}.decoder.layers.0.linear1": ("cl", 32),
    f"{_DT}.decoder.layers.0.linear2": ("cl", 16),
    "model.decoder": ("cl", 20),
}


def _mha_tags(name: str) -> tuple[str, ...]:
    return (f"{name}.in_proj_weight", f"{name}.out_proj.weight")


_ENC = "model.encoder.layers.0"
_ENC_LAYERS = {
    f"{_ENC}.self_attn": ("cl", 16),
    f"{_ENC}.linear1": ("cl", 32),
    f"{_ENC}.linear2": ("cl", 16),
    "model.head": ("cl", 4),
}


def _rnn_case(cell: str, packed: bool) -> Case:
    layers = {"model.rnn": ("packed" if packed else "cl", 12), "model.head": ("cl", 4)}

    def rows(batch: tuple) -> dict[str, int]:
        rnn = int(batch[2].sum()) if packed else B * T
        return {"model.rnn": rnn, "model.head": B}

    return Case(
        name=f"{cell}_{'packed' if packed else 'padded'}",
        build=lambda: RecurrentClassifier(cell, packed),
        batches=lambda: _sequence_batches(seed=3),
        loss=_ce_seq,
        layers=layers,
        rows=rows,
        weight_tags=("model.rnn.weight_ih_l0", "model.rnn.weight_hh_l0", "model.head"),
        feature="model.rnn",
        head="model.head",
        feature_kind="packed" if packed else "cl",
    )


def _conv_case(norm: str) -> Case:
    layers = {
        "model.block1.0": ("cf", 4),
        "model.block1.1": ("cf", 4),
        "model.block2": ("cf", 4),  # a Sequential: the reduction of its norm layer
        "model.block2.0": ("cf", 4),
        "model.block2.1": ("cf", 4),
        "model.head": ("cl", 10),
    }
    return Case(
        name=f"conv_{norm}",
        build=lambda: ConvNet(norm),
        batches=lambda: _digits_batches(image=True),
        loss=_ce,
        layers=layers,
        rows=lambda batch: _same_rows(layers, B),
        weight_tags=("model.block1.0", "model.block2.0", "model.head"),
        feature="model.block2",
        head="model.head",
        monitor=list(layers),
        feature_kind="cf",
    )


_TIED_LAYERS = {"model.hidden": ("cl", 12), "model.out": ("cl", 16)}
_LAZY_LAYERS = {"model.features.0": ("cl", 16), "model.features.2": ("cl", 12),
                "model.head": ("cl", 10)}
_CKPT_LAYERS = {"model.stem": ("cl", 16), "model.block.0": ("cl", 16),
                "model.block.2": ("cl", 16), "model.head": ("cl", 10)}

CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            name="demo_transformer",
            # vocab_size != ninp, so that head="auto" is not ambiguous (linear2 has ninp outputs)
            build=lambda: Transformer(vocab_size=20, ninp=16, nhead=2, nhid=32, nlayers=1,
                                      dropout=0.1),
            batches=lambda: _token_batches(vocab=20, classes=None, seed=1),
            loss=_nll_tokens,
            layers=_DEMO_LAYERS,
            rows=lambda batch: _same_rows(_DEMO_LAYERS, B * T),
            weight_tags=(
                *_mha_tags(f"{_DT}.encoder.layers.0.self_attn"),
                f"{_DT}.encoder.layers.0.linear1",
                f"{_DT}.encoder.layers.0.linear2",
                *_mha_tags(f"{_DT}.decoder.layers.0.self_attn"),
                *_mha_tags(f"{_DT}.decoder.layers.0.multihead_attn"),
                f"{_DT}.decoder.layers.0.linear1",
                f"{_DT}.decoder.layers.0.linear2",
                "model.decoder",
            ),
            feature=f"{_DT}.encoder",
            head="model.decoder",
            dropout=True,
        ),
        Case(
            name="encoder_clf",
            build=EncoderClassifier,
            batches=lambda: _token_batches(vocab=20, classes=4, seed=2),
            loss=_ce,
            layers=_ENC_LAYERS,
            rows=lambda batch: _same_rows(_ENC_LAYERS, B * T, **{"model.head": B}),
            weight_tags=(*_mha_tags(f"{_ENC}.self_attn"), f"{_ENC}.linear1", f"{_ENC}.linear2",
                         "model.head"),
            feature="model.encoder",
            head="model.head",
            dropout=True,
        ),
        _rnn_case("lstm", packed=False),
        _rnn_case("lstm", packed=True),
        _rnn_case("gru", packed=False),
        _rnn_case("gru", packed=True),
        _conv_case("bn"),
        _conv_case("gn"),
        Case(
            name="tied",
            build=TiedLM,
            batches=lambda: _token_batches(vocab=16, classes=None, seed=4),
            loss=_ce_tokens,
            layers=_TIED_LAYERS,
            rows=lambda batch: _same_rows(_TIED_LAYERS, B * T),
            weight_tags=("model.hidden", "model.out"),
            feature="model.hidden",
            head="model.out",
        ),
        Case(
            name="lazy",
            build=LazyMLP,
            batches=lambda: _digits_batches(image=False),
            loss=_ce,
            layers=_LAZY_LAYERS,
            rows=lambda batch: _same_rows(_LAZY_LAYERS, B),
            weight_tags=("model.features.0", "model.features.2", "model.head"),
            feature="model.features.2",
            head="model.head",
        ),
        Case(
            name="checkpointed",
            build=lambda: CheckpointedMLP(use_checkpoint=True),
            batches=lambda: _digits_batches(image=False),
            loss=_ce,
            layers=_CKPT_LAYERS,
            rows=lambda batch: _same_rows(_CKPT_LAYERS, B),
            weight_tags=tuple(_CKPT_LAYERS),
            feature="model.block",
            head="model.head",
        ),
    ]
}
#: the same model as "checkpointed", without checkpointing
PLAIN_TWIN = Case(**{**CASES["checkpointed"].__dict__, "name": "plain_twin",
                     "build": lambda: CheckpointedMLP(use_checkpoint=False)})
#: encoder_clf without dropout (as many current transformers are configured)
NO_DROPOUT = Case(**{**CASES["encoder_clf"].__dict__, "name": "encoder_clf_p0",
                     "build": lambda: EncoderClassifier(dropout=0.0), "dropout": False})

MODELS = list(CASES)
LIFECYCLE_MODELS = ["encoder_clf", "gru_packed", "lazy"]


# ============================================================================ Lightning glue
class Lit(pl.LightningModule):
    """The LightningTransformer pattern around any of the models above (``self.model``)."""

    def __init__(self, case: Case, *, seed: int = 0, manual: bool = False,
                 fail_at: tuple[int, type[BaseException]] | None = None,
                 fail_in_eval: type[BaseException] | None = None,
                 penalty: VNEPenalty | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = case.build()
        self.case = case
        self.automatic_optimization = not manual
        self.fail_at = fail_at
        self.fail_in_eval = fail_in_eval  # raised when training_step runs in eval mode
        self.explicit_penalty = penalty
        self.example = case.batches()[0]

    def setup(self, stage: str) -> None:
        # lazy modules are materialised here, i.e. after every callback's setup
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in self.parameters()):
            with torch.no_grad():
                self.case.loss(self.model, self.example)

    def compute_loss(self, batch: Any) -> torch.Tensor:
        return self.case.loss(self.model, batch)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.case.loss(self.model, batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step >= self.fail_at[0]:
            raise self.fail_at[1](f"boom at step {self.global_step}")
        if self.fail_in_eval is not None and not self.training:
            raise self.fail_in_eval(f"boom in eval mode at step {self.global_step}")
        loss = self.case.loss(self.model, batch)
        if self.automatic_optimization:
            return loss
        if self.explicit_penalty is not None:
            loss = loss + self.explicit_penalty.term(self)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss.detach()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class _Batches(Dataset):
    def __init__(self, batches: list[tuple]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple:
        return self.batches[i]


def _as_is(batch: Any) -> Any:
    return batch


def loader(case: Case) -> DataLoader:
    """The case's batches in order, each item already a batch. Its own generator: a DataLoader
    without one draws its base seed from the global RNG at every ``iter()``, which would shift
    the dropout masks of a run with validation."""
    return DataLoader(_Batches(case.batches()), batch_size=None, shuffle=False,
                      collate_fn=_as_is, generator=torch.Generator().manual_seed(0))


class ResumableBatches:
    """The case's batches as a resumable iterable (``state_dict``/``load_state_dict``), so that
    a mid-epoch ``ckpt_path`` resume continues with the next batch; Lightning restarts a plain
    DataLoader from its first batch instead."""

    def __init__(self, batches: list[tuple]) -> None:
        self.batches = batches
        self.served = 0
        self.skip = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self.skip = self.skip, 0
        self.served = start
        for batch in self.batches[start:]:
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = int(state["served"])


@dataclass
class Run:
    lit: Lit
    logger: MemoryLogger
    trainer: pl.Trainer
    spectral_warnings: list[str] = field(default_factory=list)
    error: BaseException | None = None


def fit(lit: Lit, callbacks: list, tmp_path: Path, *, ckpt_path: str | None = None,
        expect: type[BaseException] | None = None, resumable: bool = False,
        **overrides: Any) -> Run:
    """One quiet CPU fit of one epoch; records the SpectralWarnings it raised."""
    logger = MemoryLogger()
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=logger,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path),
    )
    kwargs.update(overrides)
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    run = Run(lit, logger, trainer)
    sigint = signal.getsignal(signal.SIGINT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = ResumableBatches(lit.case.batches()) if resumable else loader(lit.case)
            val = loader(lit.case) if overrides.get("limit_val_batches") else None
            trainer.fit(lit, data, val, ckpt_path=ckpt_path)
        except BaseException as exc:  # noqa: BLE001 - re-raised unless expected
            if expect is None or not isinstance(exc, expect):
                raise
            run.error = exc
        finally:
            # Lightning ignores SIGINT after a KeyboardInterrupt; give the test run it back
            signal.signal(signal.SIGINT, sigint)
    if expect is not None and run.error is None:
        pytest.fail(f"fit did not raise {expect.__name__}")
    run.spectral_warnings = [str(w.message) for w in caught
                             if issubclass(w.category, SpectralWarning)]
    return run


# ============================================================================ test-side recording
def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _to_rows(output: Any, kind: str) -> torch.Tensor:
    """The rows the test expects of a layer output (independent of the library's table)."""
    t = output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(t, PackedSequence):
        assert kind == "packed", "a packed output where a padded one was expected"
        return t.data
    if kind == "cf":
        return t.flatten(2).mean(dim=-1) if t.ndim > 2 else t
    return t.reshape(-1, t.shape[-1])


class Recorder:
    """The test's own hooks: each training forward's output (or input, ``pre``) of some layers,
    with the global step it ran at. Forwards re-run in backward and no-grad forwards are
    ignored. Removed with :meth:`remove` before the no-hooks check."""

    def __init__(self, lit: Lit, layers: dict[str, str], pre: bool = False) -> None:
        self.lit = lit
        self.kinds = layers
        self.calls: dict[str, list[tuple[int, torch.Tensor]]] = {n: [] for n in layers}
        modules = dict(lit.named_modules())
        self.handles = []
        for name in layers:
            if pre:
                hook = modules[name].register_forward_pre_hook(partial(self._pre, name))
            else:
                hook = modules[name].register_forward_hook(partial(self._post, name))
            self.handles.append(hook)

    def _keep(self, name: str, rows: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not self.lit.training or _in_backward():
            return
        self.calls[name].append((int(self.lit.trainer.global_step), rows.detach().clone()))

    def _post(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self._keep(name, _to_rows(output, self.kinds[name]))

    def _pre(self, name: str, module: nn.Module, args: Any) -> None:
        self._keep(name, _to_rows(args[0], "cl"))

    def rows_at(self, name: str, step: int) -> list[torch.Tensor]:
        return [r for s, r in self.calls[name] if s == step]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ============================================================================ assertions
def assert_no_hooks(lit: Lit) -> None:
    left = []
    for name, module in lit.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks"):
            if getattr(module, attr, None):
                left.append(f"{name or '<root>'}.{attr}")
    assert not left, f"hooks left on the model: {left}"
    wrapped = [a for a in ("training_step", "log", "log_dict", "forward") if a in lit.__dict__]
    assert not wrapped, f"instance attributes left on the LightningModule: {wrapped}"


def _same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality of state dicts (NaN equals NaN; tuple equals list)."""
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: {type(b).__name__} instead of dict"
        assert set(map(str, a)) == set(map(str, b)), f"{where}: keys {sorted(a)} != {sorted(b)}"
        lookup = {str(k): v for k, v in b.items()}
        for k, v in a.items():
            _same(v, lookup[str(k)], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: {type(b).__name__} instead of a tensor"
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {b!r} != nan"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_state_round_trip(cb: Any, factory: Callable[[], Any]) -> None:
    """A fresh instance loaded with the state reproduces it, also through
    ``torch.save`` / ``torch.load(weights_only=True)``."""
    state = cb.state_dict()
    fresh = factory()
    fresh.load_state_dict(state)
    _same(state, fresh.state_dict(), "state after load_state_dict")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    again = factory()
    again.load_state_dict(loaded)
    _same(state, again.state_dict(), "state after torch.load(weights_only=True)")


def assert_records_equal(got: MemoryLogger, want: MemoryLogger, what: str) -> None:
    g = {(s, t): v for s, m in got.records for t, v in m.items()}
    w = {(s, t): v for s, m in want.records for t, v in m.items()}
    assert sorted(g) == sorted(w), (
        f"{what}: logged (step, tag) differ; unexpected: {sorted(set(g) - set(w))[:12]}, "
        f"missing: {sorted(set(w) - set(g))[:12]}"
    )
    bad = [(k, g[k], w[k]) for k in w
           if not (math.isnan(w[k]) and math.isnan(g[k]))
           and not math.isclose(g[k], w[k], rel_tol=1e-6, abs_tol=1e-9)]
    assert not bad, f"{what}: values differ (step, tag), got, want: {bad[:5]}"


def assert_no_unexpected_warnings(run: Run, expected: tuple[str, ...] = ()) -> None:
    unexpected = [m for m in run.spectral_warnings if not any(e in m for e in expected)]
    assert not unexpected, f"unexpected SpectralWarning(s): {unexpected}"


def steps_of(logger: MemoryLogger, prefix: str) -> list[int]:
    return sorted({s for s, m in logger.records if any(t.startswith(prefix) for t in m)})


def _close(got: float, want: float, what: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert math.isfinite(got), f"{what}: logged {got}"
    assert abs(got - want) <= atol + rtol * abs(want), f"{what}: logged {got}, expected {want}"


# ============================================================================ baselines
_BASELINES: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def baseline(case: Case, tmp_path: Path, variant: str = "plain") -> dict[str, torch.Tensor]:
    """The final weights of a run without any callback (cached per model and variant)."""
    key = (case.name, variant)
    if key not in _BASELINES:
        lit = Lit(case, manual=variant == "manual")
        overrides = {"accumulate_grad_batches": 2} if variant == "accumulate" else {}
        run = fit(lit, [], tmp_path, **overrides)
        assert_no_hooks(run.lit)
        _BASELINES[key] = {k: v.detach().clone() for k, v in lit.state_dict().items()}
    return _BASELINES[key]


def assert_bit_identical(lit: Lit, case: Case, tmp_path: Path, variant: str = "plain") -> None:
    want = baseline(case, tmp_path, variant)
    got = lit.state_dict()
    assert set(got) == set(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"weights differ from the run without the callback: {differ}"


# ============================================================================ callbacks
def make_callback(kind: str, case: Case, *, manual: bool = False) -> Any:
    if kind == "spectral":
        return SpectralMonitor(every_n_steps=EVERY, weights=True, weights_every_n_steps=EVERY,
                               layers=case.monitor)
    if kind == "collapse":
        return CollapseMonitor(head=case.head, labels=1)
    if kind == "collapse_auto":
        return CollapseMonitor(head="auto", labels=1)
    if kind == "penalty":
        return VNEPenalty(layer=case.feature, alpha=0.0, inject=not manual)
    if kind == "curvature":
        return CurvatureMonitor(every_n_steps=EVERY, k=2, trace_probes=2, noise_samples=4,
                                mode="train", loss="compute_loss" if manual else "training_step")
    raise AssertionError(kind)


def check_spectral(run: Run, cb: SpectralMonitor, rec: Recorder, case: Case,
                   batch_of_step: Callable[[int], list[tuple]], n_steps: int) -> None:
    """Layers, logged steps, rows per event, eigenvalue counts, values and weight tags."""
    log = run.logger
    act_steps = list(range(0, n_steps, EVERY))
    layers = {t.split("/", 1)[1] for t in log.tags() if t.startswith("rows/")}
    assert layers == set(case.layers), (
        f"watched layers: got {sorted(layers)}, expected {sorted(case.layers)}"
    )
    for name, (_, cols) in case.layers.items():
        assert sorted(log.series(f"rows/{name}")) == act_steps, f"rows/{name} steps"
        for g in act_steps:
            want_rows = sum(case.rows(b)[name] for b in batch_of_step(g))
            got_rows = log.series(f"rows/{name}")[g]
            assert got_rows == want_rows, (
                f"rows/{name} at step {g}: {got_rows}, expected {want_rows}"
            )
            recorded = rec.rows_at(name, g)
            assert sum(r.shape[0] for r in recorded) == want_rows, "test recorder disagrees"
            assert all(r.shape[1] == cols for r in recorded), f"{name}: columns"
            rows = torch.cat(recorded)
            _close(log.series(f"vne/{name}")[g], float(vne(rows)), f"vne/{name} at step {g}")
            assert log.series(f"erank/{name}")[g] <= cols + 1e-3, f"erank/{name} > {cols}"
        history = cb.state_dict()["history"][name]
        assert list(history["steps"]) == act_steps, f"history steps of {name}"
        last_rows = sum(case.rows(b)[name] for b in batch_of_step(act_steps[-1]))
        n_eig = len(history["spectra"][-1])
        assert n_eig == min(last_rows, cols), (
            f"{name}: {n_eig} eigenvalues, expected min(rows={last_rows}, columns={cols})"
        )
    want_last = {n: sum(case.rows(b)[n] for b in batch_of_step(act_steps[-1]))
                 for n in case.layers}
    assert cb.last_event == {"step": act_steps[-1], "rows": want_last}
    weight_tags = {t.split("/", 1)[1] for t in log.tags() if t.startswith("weight_stable_rank/")}
    assert weight_tags == set(case.weight_tags), (
        f"weight tags: got {sorted(weight_tags)}, expected {sorted(case.weight_tags)}"
    )
    weight_steps = sorted(set(range(0, n_steps, EVERY)) | {n_steps})
    assert steps_of(log, "weight_stable_rank/") == weight_steps
    params = dict(run.lit.named_parameters(remove_duplicate=False))
    for tag in case.weight_tags:
        w = params.get(tag, params.get(f"{tag}.weight"))
        assert w is not None, f"no parameter for weight tag {tag}"
        s_max = float(torch.linalg.svdvals(w.detach().reshape(w.shape[0], -1))[0])
        _close(log.series(f"weight_sv_max/{tag}")[n_steps], s_max, f"weight_sv_max/{tag}")


def check_collapse(run: Run, cb: CollapseMonitor, rec: Recorder, case: Case,
                   labels: list[torch.Tensor], n_steps: int) -> None:
    """Logged once at the epoch's end; the metrics equal those of the head inputs the test
    recorded itself (one row per sample, or per token for token targets)."""
    log = run.logger
    keys = collapse_keys(True)
    assert steps_of(log, "collapse/") == [n_steps]
    features = torch.cat([r for _, r in rec.calls[case.head]])
    y = torch.cat([t.reshape(-1) for t in labels])
    assert features.shape[0] == y.shape[0], "test recorder: one feature row per label"
    head = dict(run.lit.named_modules())[case.head]
    want = neural_collapse(features.double(), y, head.weight.detach().double(),
                           None if head.bias is None else head.bias.detach().double(),
                           dtype=torch.float64)
    for k in keys:
        got = log.series(f"collapse/{k}")[n_steps]
        if math.isnan(float(want[k])):
            assert math.isnan(got), f"collapse/{k}: {got}, expected NaN"
        else:
            _close(got, float(want[k]), f"collapse/{k}", rtol=1e-5, atol=1e-7)
    for k in ("mir", "hdr"):
        assert math.isfinite(log.series(f"collapse/{k}")[n_steps]), f"collapse/{k}"
    assert [e for e, _ in cb.history] == [0]


def check_penalty(run: Run, case: Case, rec: Recorder, n_steps: int) -> None:
    """Logged every optimizer step: the mean VNE over the step's forward calls; term 0."""
    log = run.logger
    tag = f"vne_penalty/vne/{case.feature}"
    assert sorted(log.series(tag)) == list(range(n_steps))
    assert sorted(log.series(f"vne_penalty/{case.feature}")) == list(range(n_steps))
    for g in range(n_steps):
        views = rec.rows_at(case.feature, g)
        assert views, f"test recorder saw no call of {case.feature} at step {g}"
        want = sum(float(vne(v)) for v in views) / len(views)
        _close(log.series(tag)[g], want, f"{tag} at step {g}")
        assert log.series(f"vne_penalty/{case.feature}")[g] == 0.0


# ============================================================================ the matrix
#: SpectralWarnings a case is expected to raise (substrings), keyed (callback, model)
EXPECTED_WARNINGS: dict[tuple[str, str], tuple[str, ...]] = {}


def _kinds(case: Case) -> dict[str, str]:
    return {n: k for n, (k, _) in case.layers.items()}


def _recorder_for(kind: str, lit: Lit, case: Case) -> Recorder | None:
    if kind == "spectral":
        return Recorder(lit, _kinds(case))
    if kind in ("collapse", "collapse_auto"):
        return Recorder(lit, {case.head: "cl"}, pre=True)
    if kind == "penalty":
        return Recorder(lit, {case.feature: case.feature_kind})
    return None


def _check(kind: str, run: Run, cb: Any, rec: Recorder, case: Case, n_steps: int,
           batch_of_step: Callable[[int], list[tuple]]) -> None:
    if kind == "spectral":
        check_spectral(run, cb, rec, case, batch_of_step, n_steps)
    elif kind in ("collapse", "collapse_auto"):
        assert cb.head_name == case.head, f"head {cb.head_name!r}, expected {case.head!r}"
        labels = [b[1] for g in range(n_steps) for b in batch_of_step(g)]
        check_collapse(run, cb, rec, case, labels, n_steps)
    elif kind == "penalty":
        check_penalty(run, case, rec, n_steps)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("callback", ["spectral", "collapse", "collapse_auto", "penalty"])
def test_callback_on_model(callback: str, model: str, tmp_path: Path) -> None:
    case = CASES[model]
    batches = case.batches()
    lit = Lit(case)
    cb = make_callback(callback, case)
    rec = _recorder_for(callback, lit, case)
    try:
        run = fit(lit, [cb], tmp_path)
    finally:
        rec.remove()
    assert run.trainer.global_step == N_BATCHES
    _check(callback, run, cb, rec, case, N_BATCHES, lambda g: [batches[g]])
    assert_no_hooks(lit)
    assert_no_unexpected_warnings(run, EXPECTED_WARNINGS.get((callback, model), ()))
    assert_bit_identical(lit, case, tmp_path)
    assert_state_round_trip(cb, partial(make_callback, callback, case))


# ---------------------------------------------------------------------------- curvature
CURVATURE_CASES = [
    pytest.param("encoder_clf", "train", id="encoder_clf-train"),
    pytest.param("encoder_clf", "eval", id="encoder_clf-eval"),
    pytest.param("demo_transformer", "train", id="demo_transformer-train"),
    pytest.param("demo_transformer", "eval", id="demo_transformer-eval"),
    pytest.param("encoder_clf_p0", "train", id="encoder_clf_p0-train"),
    pytest.param("conv_bn", "train", id="conv_bn-train"),
    pytest.param("conv_bn", "eval", id="conv_bn-eval"),
]
#: BatchNorm in train mode couples the samples: no per-sample gradients, noise tags NaN
CURVATURE_EXPECTED_WARNINGS = {("conv_bn", "train"): ("objective-noise", "noise")}


@pytest.mark.parametrize(("model", "mode"), CURVATURE_CASES)
def test_curvature_on_model(model: str, mode: str, tmp_path: Path) -> None:
    case = NO_DROPOUT if model == NO_DROPOUT.name else CASES[model]
    lit = Lit(case)

    def factory() -> CurvatureMonitor:
        return CurvatureMonitor(every_n_steps=EVERY, k=2, trace_probes=2, noise_samples=4,
                                mode=mode)

    cb = factory()
    run = fit(lit, [cb], tmp_path)
    log = run.logger
    events = list(range(EVERY, N_BATCHES + 1, EVERY))
    assert steps_of(log, "hessian/") == events
    for g in events:
        for tag in ("hessian/eig_1", "hessian/eig_2", "hessian/trace", "hessian/loss"):
            value = log.series(tag)[g]
            assert math.isfinite(value), f"{tag} at step {g} is {value} (mode={mode})"
        assert log.series("hessian/eig_1")[g] >= log.series("hessian/eig_2")[g]
    assert_no_hooks(lit)
    assert_no_unexpected_warnings(run, CURVATURE_EXPECTED_WARNINGS.get((model, mode), ()))
    assert_bit_identical(lit, case, tmp_path)
    assert_state_round_trip(cb, factory)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt],
                         ids=["exception", "interrupt"])
def test_curvature_event_interrupted(error: type[BaseException], tmp_path: Path) -> None:
    """mode="eval" on BatchNorm: an error inside the event's own loss evaluation leaves every
    module's training flag, the buffers and ``log`` as they were (RuntimeError: reported
    fail-soft and training goes on; KeyboardInterrupt: Lightning's shutdown)."""
    case = CASES["conv_bn"]
    lit = Lit(case, fail_in_eval=error)
    cb = CurvatureMonitor(every_n_steps=EVERY, k=2, trace_probes=2, noise_samples=4,
                          mode="eval")
    if error is KeyboardInterrupt:
        run = fit(lit, [cb], tmp_path, expect=SystemExit)
        assert run.trainer.global_step == EVERY
        assert all(m.training for m in lit.modules()), "training flags left in eval mode"
        assert_no_hooks(lit)
        assert_no_unexpected_warnings(run)
        return
    run = fit(lit, [cb], tmp_path)
    assert run.trainer.global_step == N_BATCHES
    events = list(range(EVERY, N_BATCHES + 1, EVERY))
    assert steps_of(run.logger, "hessian/") == events
    assert all(math.isnan(v) for v in run.logger.series("hessian/eig_1").values())
    assert len(run.spectral_warnings) == 1 and "boom" in run.spectral_warnings[0]
    assert_no_hooks(lit)
    assert_bit_identical(lit, case, tmp_path)


# ---------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("callback", ["spectral", "collapse", "penalty"])
def test_checkpointing_matches_plain(callback: str, tmp_path: Path) -> None:
    """Gradient checkpointing re-runs the block in backward: nothing may be captured twice."""
    runs = {}
    for case in (CASES["checkpointed"], PLAIN_TWIN):
        lit = Lit(case)
        cb = make_callback(callback, case)
        runs[case.name] = (fit(lit, [cb], tmp_path), cb)
    (ckpt, ckpt_cb), (plain, plain_cb) = runs["checkpointed"], runs["plain_twin"]
    assert_records_equal(ckpt.logger, plain.logger, "checkpointed vs plain")
    if callback == "spectral":
        assert ckpt_cb.last_event == plain_cb.last_event
        assert set(ckpt_cb.last_event["rows"].values()) == {B}
    assert_no_hooks(ckpt.lit)


# ---------------------------------------------------------------------------- together
@pytest.mark.parametrize("model", ["encoder_clf", "gru_packed", "lazy"])
@pytest.mark.parametrize("optimization", ["automatic", "manual"])
def test_callbacks_together(optimization: str, model: str, tmp_path: Path) -> None:
    """All four callbacks in one Trainer log exactly what each logs alone. CurvatureMonitor
    comes first, so its event's forward passes (in ``on_train_batch_end``) run while the
    others are still in their training batch; SpectralMonitor watches every step."""
    case = CASES[model]
    manual = optimization == "manual"

    def callbacks() -> list:
        return [
            make_callback("curvature", case, manual=manual),
            make_callback("collapse", case),
            make_callback("penalty", case, manual=manual),
            SpectralMonitor(every_n_steps=1, weights_every_n_steps=EVERY, layers=case.monitor),
        ]

    def lit_for(cbs: list) -> Lit:
        penalty = [c for c in cbs if isinstance(c, VNEPenalty)]
        return Lit(case, manual=manual, penalty=penalty[0] if manual and penalty else None)

    cbs = callbacks()
    lit = lit_for(cbs)
    together = fit(lit, cbs, tmp_path / "together")
    differ = []
    for i, cb in enumerate(cbs):
        one = [callbacks()[i]]
        alone = fit(lit_for(one), one, tmp_path / f"alone{i}").logger
        mine = MemoryLogger()
        mine.records = [(s, {t: v for t, v in m.items() if t in alone.tags()})
                        for s, m in together.logger.records]
        mine.records = [(s, m) for s, m in mine.records if m]
        try:
            assert_records_equal(mine, alone, f"{type(cb).__name__} together vs alone")
        except AssertionError as exc:
            differ.append(str(exc).split("\n")[0][:600])
    assert not differ, "\n".join(differ)
    assert_no_hooks(lit)
    assert_no_unexpected_warnings(together)
    assert_bit_identical(lit, case, tmp_path, optimization if manual else "plain")


# ============================================================================ lifecycles
LIFECYCLES = ["reuse", "exception", "interrupt", "resume", "accumulate", "validation",
              "manual"]
CALLBACKS = ["spectral", "collapse", "penalty", "curvature"]


def _fresh_comparison(kind: str, cb: Any, case: Case, tmp_path: Path, what: str) -> None:
    """``cb`` used again on a new model logs exactly what a fresh instance logs there."""
    again = fit(Lit(case, seed=7), [cb], tmp_path / "again")
    fresh_cb = make_callback(kind, case)
    fresh = fit(Lit(case, seed=7), [fresh_cb], tmp_path / "fresh")
    assert fresh.logger.records, "the fresh callback logged nothing"
    first = min(s for s, _ in fresh.logger.records)
    assert min(s for s, _ in again.logger.records) == first, f"{what}: does not start again"
    assert_records_equal(again.logger, fresh.logger, what)
    _same(fresh_cb.state_dict(), cb.state_dict(), f"{what}: state")
    assert_no_hooks(again.lit)
    assert_no_unexpected_warnings(again)


@pytest.mark.parametrize("model", LIFECYCLE_MODELS)
@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize("lifecycle", LIFECYCLES)
def test_lifecycle(lifecycle: str, callback: str, model: str, tmp_path: Path) -> None:
    case = CASES[model]
    batches = case.batches()
    manual = lifecycle == "manual"
    cb = make_callback(callback, case, manual=manual)

    if lifecycle == "reuse":
        # the first fit stops mid-epoch (max_steps), the second is a fresh Trainer
        first = fit(Lit(case, seed=1), [cb], tmp_path / "first", max_steps=N_BATCHES - 1)
        assert first.logger.records
        assert_no_hooks(first.lit)
        _fresh_comparison(callback, cb, case, tmp_path, "reused callback")

    elif lifecycle in ("exception", "interrupt"):
        # raised in training_step at step 2, a due step of every callback: SpectralMonitor's
        # capture window is open, VNEPenalty is armed, CollapseMonitor is collecting, and
        # CurvatureMonitor's event (which calls training_step) is where it is raised
        error = RuntimeError if lifecycle == "exception" else KeyboardInterrupt
        lit = Lit(case, fail_at=(EVERY, error))
        expect = RuntimeError if lifecycle == "exception" else SystemExit
        run = fit(lit, [cb], tmp_path / "failed", expect=expect)
        assert run.trainer.global_step == EVERY
        assert_no_hooks(lit)
        assert all(m.training for m in lit.modules()), "training flags changed"
        # a RuntimeError inside CurvatureMonitor's own event is reported, not raised (fail-soft)
        swallowed = ("boom",) if (callback, lifecycle) == ("curvature", "exception") else ()
        assert_no_unexpected_warnings(run, swallowed)
        _fresh_comparison(callback, cb, case, tmp_path, f"callback after {error.__name__}")

    elif lifecycle == "resume":
        k = 3
        ckpt_dir = tmp_path / "ckpt"
        saver = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=k,
                                save_top_k=-1, save_last=False)
        whole = fit(Lit(case), [cb, saver], tmp_path / "whole", enable_checkpointing=True,
                    resumable=True)
        path = ckpt_dir / f"step={k}.ckpt"
        assert path.exists(), sorted(p.name for p in ckpt_dir.iterdir())
        resumed_cb = make_callback(callback, case)
        resumed = fit(Lit(case, seed=5), [resumed_cb], tmp_path / "resumed",
                      ckpt_path=str(path), resumable=True)
        assert resumed.trainer.global_step == N_BATCHES
        tags = whole.logger.tags() | resumed.logger.tags()
        for tag in sorted(tags):
            want = sorted(s for s in whole.logger.series(tag) if s >= k)
            got = sorted(resumed.logger.series(tag))
            assert got == want, f"{tag}: resumed run logged steps {got}, uninterrupted {want}"
        assert_no_hooks(resumed.lit)
        assert_no_unexpected_warnings(whole)
        assert_no_unexpected_warnings(resumed)
        # Same weights, optimizer state and batches from step k on: the same values, unless
        # dropout draws from the global RNG (not part of a checkpoint) or the callback keeps
        # batches of its own (CurvatureMonitor keeps the first batches of each fit)
        if not case.dropout and callback != "curvature":
            after = MemoryLogger()
            after.records = [(s, m) for s, m in whole.logger.records if s >= k]
            assert_records_equal(resumed.logger, after, "resumed vs uninterrupted")
        if callback == "curvature" or not case.dropout:
            _same(cb.state_dict(), resumed_cb.state_dict(), "state after resume")
        # a callback restored from a checkpoint starts afresh in its next (plain) fit
        _fresh_comparison(callback, resumed_cb, case, tmp_path, "callback after a resume")

    elif lifecycle == "accumulate":
        lit = Lit(case)
        rec = _recorder_for(callback, lit, case)
        try:
            run = fit(lit, [cb], tmp_path, accumulate_grad_batches=2)
        finally:
            if rec is not None:
                rec.remove()
        n_steps = N_BATCHES // 2
        assert run.trainer.global_step == n_steps
        if callback == "curvature":
            assert steps_of(run.logger, "hessian/") == [EVERY]
        else:
            _check(callback, run, cb, rec, case, n_steps,
                   lambda g: [batches[2 * g], batches[2 * g + 1]])
        assert_no_hooks(lit)
        assert_no_unexpected_warnings(run)
        assert_bit_identical(lit, case, tmp_path, "accumulate")

    elif lifecycle == "validation":
        # validation after every batch, i.e. also between the two micro-batches of an open
        # accumulation window: nothing of it may be captured, so the run logs exactly what
        # the same run without validation logs
        accumulate = dict(accumulate_grad_batches=2)
        run = fit(Lit(case), [cb], tmp_path / "val", val_check_interval=1, limit_val_batches=1,
                  **accumulate)
        plain_cb = make_callback(callback, case)
        plain = fit(Lit(case), [plain_cb], tmp_path / "plain", **accumulate)
        assert_records_equal(run.logger, plain.logger, "with validation vs without")
        assert_no_hooks(run.lit)
        assert_no_unexpected_warnings(run)

    elif lifecycle == "manual":
        lit = Lit(case, manual=True, penalty=cb if callback == "penalty" else None)
        rec = _recorder_for(callback, lit, case)
        try:
            run = fit(lit, [cb], tmp_path)
        finally:
            if rec is not None:
                rec.remove()
        assert run.trainer.global_step == N_BATCHES
        if callback == "curvature":
            assert steps_of(run.logger, "hessian/") == list(range(EVERY, N_BATCHES + 1, EVERY))
        else:
            _check(callback, run, cb, rec, case, N_BATCHES, lambda g: [batches[g]])
        assert_no_hooks(lit)
        assert_no_unexpected_warnings(run)
        assert_bit_identical(lit, case, tmp_path, "manual")
