"""The benchmark's shapes and models: the sizes it runs at (`BenchShape` and its presets),
the `--cells`/size flags' parsing, and the contenders' models, built from one seed so that
the charlm and torch.nn twins hold the same weights and compute the same function."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import cells as charlm_cells
from ..config import Config, ModelConfig, TrainConfig
from ..model import REGISTRY, RecurrentLM, build_model
from ..transformer import TransformerLM

RECURRENT_CELLS = ("rnn", "lstm", "gru")  # the cells with a torch.nn twin
# Every cell of the registry can be benched: the twins against torch.nn, the Transformer's
# KV cache against recomputation, the rest against the charlm cell they simplify
# (CLASSIC_OF) at the same width, or alone.
CLASSIC_OF = {"mingru": "gru", "minlstm": "lstm"}
CHARLM_BODIES: dict[str, Callable[..., nn.Module]] = {
    "rnn": charlm_cells.RNN, "lstm": charlm_cells.LSTM, "gru": charlm_cells.GRU}
NN_BODIES: dict[str, Callable[..., nn.Module]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
# charlm and torch.nn logits may differ by rounding (TF32/bf16 kernels on CUDA), not more.
SAME_FUNCTION_TOL = 1e-2


@dataclass(frozen=True)
class BenchShape:
    """Every size the benchmark uses; `reference_shape` and `quick_shape` give the presets."""

    batch_size: int
    seq_len: int  # training window; also the training Transformer's context
    hidden: tuple[int, ...]  # recurrent width(s): one pair of contenders per width
    num_layers: int = 2
    vocab_size: int = 65
    sample_chars: int = 1000  # characters generated per timed sampling repeat
    tf_width: int = 128
    tf_layers: int = 4
    tf_heads: int = 4
    kv_context: int = 256  # the Transformer's context for the KV-cache vs recompute contest
    # untimed training steps per contender before the repeats: enough for the GEMM choices
    # (the in-loop one takes up to 9 sequences, 4.5 steps of a 2-layer body)
    warmup_steps: int = 5
    warmup_chars: int = 50  # untimed sampled characters per contender before the repeats
    smoke: bool = False  # a smoke-test shape (--quick): its figures judge no target


def reference_shape(device: torch.device) -> BenchShape:
    """The reference shape for `device`: the presets' sizes on CPU, GPU-sized on CUDA."""
    if device.type == "cuda":
        return BenchShape(batch_size=64, seq_len=256, hidden=(512, 1024), tf_width=384,
                          tf_layers=6, tf_heads=6)
    return BenchShape(batch_size=32, seq_len=128, hidden=(256,))


def quick_shape() -> BenchShape:
    """Tiny shapes for tests and smoke runs: seconds on a laptop CPU, numbers meaningless."""
    return BenchShape(batch_size=4, seq_len=16, hidden=(32,), sample_chars=48, tf_width=32,
                      tf_layers=2, tf_heads=2, kv_context=32, warmup_steps=1, warmup_chars=8,
                      smoke=True)


def make_shape(device: torch.device, quick: bool = False, batch_size: int | None = None,
               seq_len: int | None = None, hidden: Sequence[int] | None = None) -> BenchShape:
    """The device's reference shape (or the quick one) with the given sizes replaced."""
    shape = quick_shape() if quick else reference_shape(device)
    for flag, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if hidden is not None and (not hidden or min(hidden) < 1):
        raise ValueError(f"--hidden must be one or more sizes >= 1, got {list(hidden)}")
    return dataclasses.replace(
        shape,
        batch_size=shape.batch_size if batch_size is None else batch_size,
        seq_len=shape.seq_len if seq_len is None else seq_len,
        hidden=shape.hidden if not hidden else tuple(dict.fromkeys(hidden)),
    )


def parse_cells(text: str) -> list[str]:
    """`rnn,lstm` -> ['rnn', 'lstm'], or ValueError naming the valid choices."""
    valid = list(REGISTRY)  # read on use: a cell registered at runtime is benched too
    names = [c.strip().lower() for c in text.split(",") if c.strip()]
    if names == ["all"]:
        return valid
    bad = [c for c in names if c not in valid]
    if bad or not names:
        raise ValueError(f"--cells: unknown or missing cell(s) {bad or text!r}; choose from "
                         f"{','.join(valid)} (or all)")
    return list(dict.fromkeys(names))


def build_charlm_lm(cell: str, shape: BenchShape, hidden: int,
                    device: torch.device) -> RecurrentLM:
    """charlm's RecurrentLM of `cell` at the bench's shape, from seed 0 (the first of
    :func:`build_recurrent_pair`'s twins)."""
    torch.manual_seed(0)
    body = CHARLM_BODIES[cell](hidden, hidden, num_layers=shape.num_layers, batch_first=True)
    return RecurrentLM(body, shape.vocab_size, hidden, dropout=0.0).to(device)


def build_recurrent_pair(cell: str, shape: BenchShape, hidden: int,
                         device: torch.device) -> tuple[RecurrentLM, RecurrentLM]:
    """(charlm, torch.nn) RecurrentLMs of identical shape computing the same function: the
    torch.nn one loads the charlm one's state dict (the cells use torch.nn's parameter names)."""
    ours = build_charlm_lm(cell, shape, hidden, torch.device("cpu"))
    body = NN_BODIES[cell](hidden, hidden, num_layers=shape.num_layers, batch_first=True)
    theirs = RecurrentLM(body, shape.vocab_size, hidden, dropout=0.0)
    theirs.load_state_dict(ours.state_dict())
    # .to() after loading: torch.nn re-packs its weights for cuDNN when it moves.
    return ours.to(device), theirs.to(device)


def build_transformer(shape: BenchShape, context: int, device: torch.device) -> TransformerLM:
    """The Transformer baseline at the bench's width/depth with the given context."""
    torch.manual_seed(0)
    return TransformerLM(shape.vocab_size, shape.tf_width, shape.tf_layers, shape.tf_heads,
                         context_len=context, dropout=0.0).to(device)


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, idx: torch.Tensor) -> float:
    """Largest |logit| difference of two models on `idx` in fp32: ~0 when they are the same
    function, which is what makes their speeds comparable."""
    return float((a(idx, None)[0] - b(idx, None)[0]).abs().max())


def build_registry_model(cell: str, shape: BenchShape, hidden: int, device: torch.device,
                         **model) -> nn.Module:
    """`cell` as `charlm train` builds it (from charlm.model.REGISTRY) at the bench's shape."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(cell=cell, hidden_size=hidden, num_layers=shape.num_layers,
                                   **model), train=TrainConfig(seq_len=shape.seq_len))
    return build_model(cfg, shape.vocab_size).to(device)
