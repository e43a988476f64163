"""The char-LM wrapper and the cell registry: one model contract for every cell type.

Every model maps token ids to next-character logits and threads an opaque state:

    logits, state = model(idx, state)        # idx (B, T) -> logits (B, T, V)

For the recurrent cells the state is the hidden state (carried across training windows and
sampling steps); for the Transformer it is a key/value cache used when sampling. The trainer,
sampler and evaluator only ever call this contract, `model.carries_state`, and the helpers
below, so none of them branches on the cell type.

Looking inside (`charlm inspect`, `charlm gradients`) uses three more members of the contract:

    logits, state, trace = model.trace(idx, state)  # trace: {"l0.h": (B, T, H), ...}
    model.trace_kinds()          # {"h": "signed", "f": "gate", ...}: the range of each quantity
    model.token_embedding        # the nn.Embedding whose output e_t gradients are taken against

A recurrent model's trace recomputes every step from its layers' own weights with the
functions of `charlm.cells.equations` (the spec), so what a student sees is what the equations
say; tests hold its logits and states equal to `forward`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cells
from .cells import equations
from .config import Config
from .minlm import min_model
from .transformer import TransformerLM


class RecurrentLM(nn.Module):
    """Embedding -> stacked recurrent layers (charlm.cells) -> linear head."""

    carries_state = True

    def __init__(self, body: nn.Module, vocab_size: int, hidden_size: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.rnn = body
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx: torch.Tensor, state=None):
        """idx (B, T) -> logits (B, T, V), new hidden state."""
        x = self.drop(self.embed(idx))  # (B, T, H)
        out, state = self.rnn(x, state)  # (B, T, H)
        return self.head(self.drop(out)), state

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embed

    def trace_kinds(self) -> dict[str, str]:
        """Each traced quantity's range: "gate" [0, 1], "signed" [-1, 1], "free" unbounded."""
        return self._trace_step().kinds

    def trace(self, idx: torch.Tensor, state=None):
        """Like `forward`, but one step at a time through `charlm.cells.equations`, keeping
        every quantity: returns (logits (B, T, V), new state, {"l{layer}.{q}": (B, T, units)}),
        e.g. "l0.h", "l1.f". Slow (a Python loop over steps); meant for inspecting."""
        spec, body = self._trace_step(), self.rnn
        L, B, T = body.num_layers, idx.size(0), idx.size(1)
        x = self.drop(self.embed(idx))  # (B, T, H)
        if state is None:
            sizes = [body.proj_size or body.hidden_size, body.hidden_size][: spec.n_states]
            states = [x.new_zeros(L, B, size) for size in sizes]  # each (L, B, size)
        else:
            states = [state] if spec.n_states == 1 else list(state)
        trace, finals = {}, []
        for layer in range(L):
            weights = _layer_weights(body, layer)
            st, steps = [s[layer] for s in states], []
            for t in range(T):
                st, quantities = spec.step(x[:, t], st, weights)
                steps.append(quantities)
            finals.append(st)
            for name in steps[0]:
                trace[f"l{layer}.{name}"] = torch.stack([q[name] for q in steps], 1)
            x = trace[f"l{layer}.h"]  # (B, T, H): the next layer's input
            if layer < L - 1 and body.dropout > 0:
                x = F.dropout(x, body.dropout, self.training)
        new = [torch.stack([f[k] for f in finals]) for k in range(spec.n_states)]
        return self.head(self.drop(x)), new[0] if spec.n_states == 1 else tuple(new), trace

    def _trace_step(self) -> TraceStep:
        mode = getattr(self.rnn, "mode", None)
        if mode not in TRACE_STEPS or getattr(self.rnn, "bidirectional", False):
            raise ValueError(f"cannot trace a {type(self.rnn).__name__} body (mode {mode!r}); "
                             f"traceable: unidirectional {', '.join(TRACE_STEPS)}")
        return TRACE_STEPS[mode]


class TraceStep(NamedTuple):
    """How to trace one step of a recurrent layer type: `step(x (B, I), states, weights) ->
    (new states, {quantity: (B, units)})`, the range of each quantity, the number of states."""

    step: Callable
    kinds: dict[str, str]
    n_states: int


def _layer_weights(body: nn.Module, layer: int) -> list:
    """[w_ih, w_hh, b_ih, b_hh, w_hr] of one layer (None where absent), from `all_weights`
    (torch.nn's order: works for charlm.cells and torch.nn layers alike)."""
    w = list(body.all_weights[layer])
    biases = (w[2], w[3]) if body.bias else (None, None)
    return [w[0], w[1], *biases, w[-1] if getattr(body, "proj_size", 0) else None]


def _rnn_trace(nonlinearity: str) -> Callable:
    def step(x, states, w):
        h = equations.rnn_step(x, states[0], *w[:4], nonlinearity)
        return [h], {"h": h}

    return step


def _lstm_trace(x, states, w):
    h, c = states
    i, f, g, o = equations.lstm_gates(x, h, *w[:4])
    h, c = equations.lstm_step(x, h, c, *w)
    return [h, c], {"h": h, "c": c, "i": i, "f": f, "g": g, "o": o}


def _gru_trace(x, states, w):
    r, z, n = equations.gru_gates(x, states[0], *w[:4])
    h = equations.gru_step(x, states[0], *w[:4])
    return [h], {"h": h, "r": r, "z": z, "n": n}


# Keyed by the layer's torch.nn `mode`. g (LSTM) and n (GRU) are tanh candidates, not gates.
TRACE_STEPS: dict[str, TraceStep] = {
    "RNN_TANH": TraceStep(_rnn_trace("tanh"), {"h": "signed"}, 1),
    "RNN_RELU": TraceStep(_rnn_trace("relu"), {"h": "free"}, 1),
    "LSTM": TraceStep(_lstm_trace, {"h": "signed", "c": "free", "i": "gate", "f": "gate",
                                    "g": "signed", "o": "gate"}, 2),
    "GRU": TraceStep(_gru_trace, {"h": "signed", "r": "gate", "z": "gate", "n": "signed"}, 1),
}


def _recurrent(layer_cls: Callable[..., nn.Module], **extra) -> Callable[[Config, int], nn.Module]:
    def build(cfg: Config, vocab_size: int) -> nn.Module:
        m = cfg.model
        body = layer_cls(m.hidden_size, m.hidden_size, num_layers=m.num_layers,
                         batch_first=True, dropout=m.dropout if m.num_layers > 1 else 0.0,
                         **{k: getattr(m, v) for k, v in extra.items()})
        return RecurrentLM(body, vocab_size, m.hidden_size, m.dropout)

    return build


def _transformer(cfg: Config, vocab_size: int) -> nn.Module:
    m = cfg.model
    return TransformerLM(vocab_size, m.hidden_size, m.num_layers, m.num_heads,
                         context_len=cfg.train.seq_len, dropout=m.dropout)


# The registry: cell name -> builder(cfg, vocab_size). Add a cell here and nowhere else (a
# RecurrentLM body also gives its step in TRACE_STEPS, for `charlm inspect`; a model with its
# own `trace`, as MinLM and TransformerLM have, needs nothing more).
REGISTRY: dict[str, Callable[[Config, int], nn.Module]] = {
    "rnn": _recurrent(cells.RNN, nonlinearity="nonlinearity"),
    "lstm": _recurrent(cells.LSTM),
    "gru": _recurrent(cells.GRU),
    "mingru": min_model(cells.MinGRU),
    "minlstm": min_model(cells.MinLSTM),
    "transformer": _transformer,
}


def build_model(cfg: Config, vocab_size: int) -> nn.Module:
    """The model `cfg.model.cell` names, sized for `vocab_size` characters."""
    if cfg.model.cell not in REGISTRY:
        raise ValueError(
            f"model.cell '{cfg.model.cell}' is unknown; valid cells: {', '.join(REGISTRY)}"
        )
    return REGISTRY[cfg.model.cell](cfg, vocab_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state):
    """Apply `fn` to every tensor in a (nested tuple/list/dict) model state."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(fn, s) for s in state)
    if isinstance(state, dict):
        return {k: map_state(fn, v) for k, v in state.items()}
    return state


def detach_state(state):
    """Cut the graph between windows: gradients stop at the window start, values carry on."""
    return map_state(lambda t: t.detach(), state)
