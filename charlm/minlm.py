"""The minGRU / minLSTM language model (Feng et al. 2024, "Were RNNs All We Needed?").

The paper's language models stack its minimal cells the way a modern sequence model stacks
its mixing layers: each block is pre-norm and residual, a min-cell layer (the part that mixes
information over time) followed by a position-wise MLP (the part that computes per
character), then a final norm and a linear head. (The paper's appendix could not be read
from the machine this was written on: the block follows the paper's description of
normalised, residual min layers with MLPs, and its public re-implementations, e.g.
lucidrains/minGRU-pytorch's minLM; that one's optional causal convolution is left out.)::

    x = dropout(embed(idx))
    for each block:
        x = x + dropout(minRNN(LayerNorm(x)))          # mixes over time: h_t = a_t h_{t-1} + b_t
        x = x + dropout(MLP(LayerNorm(x)))             # Linear(H, ff_mult*H), GELU, Linear back
    logits = head(LayerNorm(x))

A min cell's gates see x_t only, never h_{t-1}, so one layer is linear in h and cannot
compute much over time on its own: the MLP between layers supplies the nonlinearity that the
classic cells get from h inside their gates. ``model.ff_mult: 0`` drops the MLPs (bare
residual min layers), for ablations.

The state is every layer's h, stacked: (num_layers, B, hidden_size), carried across training
windows (stateful training) and sampling steps like the classic cells' h. Training runs each
layer as one parallel prefix scan over the window; a one-character call runs the step
equation, O(1) per character.
"""

from __future__ import annotations

import torch
from torch import nn

from .cells import MinGRU, equations


class MinBlock(nn.Module):
    """LayerNorm -> min-cell layer -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, layer_cls: type[nn.Module], width: int, ff_mult: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.cell = layer_cls(width, width, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(width) if ff_mult else None
        self.mlp = nn.Sequential(nn.Linear(width, ff_mult * width), nn.GELU(),
                                 nn.Linear(ff_mult * width, width)) if ff_mult else None

    def forward(self, x: torch.Tensor, h: torch.Tensor | None):
        """x (B, T, C), h (B, C) or None -> (x (B, T, C), h_last (B, C))."""
        out, h = self.cell(self.ln1(x), h)
        return self._mlp(x + self.drop(out)), h

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp is None else x + self.drop(self.mlp(self.ln2(x)))


class MinLM(nn.Module):
    """Embedding -> ``num_layers`` MinBlocks -> LayerNorm -> linear head."""

    carries_state = True

    def __init__(self, layer_cls: type[nn.Module], vocab_size: int, width: int,
                 num_layers: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(MinBlock(layer_cls, width, ff_mult, dropout)
                                    for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.gru = layer_cls is MinGRU

    def forward(self, idx: torch.Tensor, state: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, V), state (num_layers, B, C)."""
        if idx.shape[1] == 1 and not (self.training or torch.is_grad_enabled()):
            return self._step(idx, state)
        x = self.drop(self.embed(idx))
        finals = []
        for i, block in enumerate(self.blocks):
            x, h = block(x, None if state is None else state[i])
            finals.append(h)
        return self.head(self.ln_f(x)), torch.stack(finals)

    def _step(self, idx: torch.Tensor, state: torch.Tensor | None):
        """`forward` for one character in eval mode without autograd (sampling): the same
        blocks on (B, C) rows, each cell by its lean :meth:`step_inference`."""
        x = self.embed(idx[:, 0])
        finals = []
        for i, block in enumerate(self.blocks):
            h = block.cell.step_inference(block.ln1(x), None if state is None else state[i])
            finals.append(h)
            x = block._mlp(x + h)  # dropout is the identity in eval mode
        return self.head(self.ln_f(x))[:, None], torch.stack(finals)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embed

    def trace_kinds(self) -> dict[str, str]:
        """h is positive and unbounded ("free"); z (minGRU) and the normalised f', i'
        (minLSTM, traced as f and i, f + i = 1) are gates in (0, 1)."""
        gates = ("z",) if self.gru else ("f", "i")
        return {"h": "free", **{g: "gate" for g in gates}}

    def trace(self, idx: torch.Tensor, state: torch.Tensor | None = None):
        """`forward` one step at a time through `charlm.cells.equations`, keeping h and the
        gates of every layer: (logits, state, {"l{layer}.h": (B, T, C), "l{layer}.z": ...})."""
        x = self.drop(self.embed(idx))
        B, T = idx.shape
        trace, finals = {}, []
        for i, block in enumerate(self.blocks):
            u, w, b = block.ln1(x), block.cell.weight, block.cell.bias_
            h = x.new_zeros(B, x.shape[-1]) if state is None else state[i]
            steps = []
            for t in range(T):
                if self.gru:
                    z, h_tilde = equations.min_gru_gates(u[:, t], w, b)
                    h = (1 - z) * h + z * h_tilde  # equations.min_gru_step
                    steps.append({"h": h, "z": z})
                else:
                    f, g_i, h_tilde = equations.min_lstm_gates(u[:, t], w, b)
                    h = f * h + g_i * h_tilde  # equations.min_lstm_step
                    steps.append({"h": h, "f": f, "i": g_i})
            for name in steps[0]:
                trace[f"l{i}.{name}"] = torch.stack([s[name] for s in steps], 1)
            finals.append(h)
            x = block._mlp(x + block.drop(trace[f"l{i}.h"]))
        return self.head(self.ln_f(x)), torch.stack(finals), trace


def min_model(layer_cls: type[nn.Module]):
    """The registry builder for a min cell: cfg.model's hidden_size, num_layers, ff_mult and
    dropout."""

    def build(cfg, vocab_size: int) -> nn.Module:
        m = cfg.model
        return MinLM(layer_cls, vocab_size, m.hidden_size, m.num_layers, m.ff_mult, m.dropout)

    return build


__all__ = ["MinBlock", "MinLM", "min_model"]
