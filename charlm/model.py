"""The char-LM wrapper and the cell registry: one model contract for every cell type.

Every model maps token ids to next-character logits and threads an opaque state:

    logits, state = model(idx, state)        # idx (B, T) -> logits (B, T, V)

For the recurrent cells the state is the hidden state (carried across training windows and
sampling steps); for the Transformer it is a key/value cache used when sampling. The trainer,
sampler and evaluator only ever call this contract, `model.carries_state`, and the helpers
below, so none of them branches on the cell type.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import cells
from .config import Config
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


# The registry: cell name -> builder(cfg, vocab_size). Add a cell here and nowhere else.
REGISTRY: dict[str, Callable[[Config, int], nn.Module]] = {
    "rnn": _recurrent(cells.RNN, nonlinearity="nonlinearity"),
    "lstm": _recurrent(cells.LSTM),
    "gru": _recurrent(cells.GRU),
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
