"""minGRU and minLSTM layers (Feng et al. 2024, "Were RNNs All We Needed?"): one layer over a
whole sequence.

The equations are :func:`charlm.cells.equations.min_gru_step` and
:func:`~charlm.cells.equations.min_lstm_step`. ``fused=True`` (the default) runs the sequence as
one parallel prefix scan (:mod:`charlm.cells.fused.min_scan`: cyclic reduction, or the paper's
log-space scan) after a single GEMM projecting every step's input; ``fused=False`` loops over
the step function, the readable reference. One step at a time (sampling, or any call with
T = 1) is the step function itself: O(1) per character. The state is h (B, H), not torch's
(layers, B, H): these are single layers; :mod:`charlm.minlm` stacks them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cell import check_bool, check_size
from .equations import min_gru_step, min_lstm_step
from .fused import min_scan

__all__ = ["MinGRU", "MinLSTM"]


def _widen(t: Tensor | None) -> Tensor | None:
    """bf16/fp16 -> float32; float32 and float64 as they are."""
    return t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t


class _MinLayer(nn.Module):
    _chunks = 2
    _step = staticmethod(min_gru_step)
    _scan = staticmethod(min_scan.min_gru_scan)

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 batch_first: bool = False, *, fused: bool = True) -> None:
        super().__init__()
        self.input_size = check_size("input_size", input_size)
        self.hidden_size = check_size("hidden_size", hidden_size)
        self.bias = check_bool("bias", bias)
        self.batch_first = check_bool("batch_first", batch_first)
        self.fused = bool(fused)
        G = self._chunks * hidden_size
        self.weight = nn.Parameter(torch.empty(G, input_size))
        self.bias_ = nn.Parameter(torch.empty(G)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(I), 1/sqrt(I)), as a torch.nn.Linear of the same shape."""
        bound = 1.0 / math.sqrt(self.input_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        return s + ("" if self.fused else ", fused=False")

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input (T, B, I) ((B, T, I) if batch_first), hx (B, H) or None (zeros) ->
        (output (T, B, H) or (B, T, H), h_n (B, H))."""
        if input.dim() != 3 or input.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: expected input (T, B, {self.input_size}), "
                             f"got {tuple(input.shape)}")
        x = input.transpose(0, 1) if self.batch_first else input  # (T, B, I)
        if self.fused and x.shape[0] > 1:
            pre = torch.nn.functional.linear(x, self.weight, self.bias_)  # (T, B, G): one GEMM
            # Under autocast the GEMM runs in bf16, the scan in float32: scanned in bf16, h
            # was off by up to 30% (median 0.3%) of float64's at T = 128, in fp32 by 8e-6.
            hs = self._scan(_widen(pre), _widen(hx))
        else:  # the step equation itself: the reference, and one-character sampling
            h = hx if hx is not None else x.new_zeros(x.shape[1], self.hidden_size)
            outs = []
            for x_t in x.unbind(0):
                h = self._step(x_t, h, self.weight, self.bias_)
                outs.append(h)
            hs = torch.stack(outs)
        out = hs.transpose(0, 1) if self.batch_first else hs
        return out, hs[-1]

    def step(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        """One step: x (B, I), h (B, H) -> h' (B, H), the equation itself."""
        h = h if h is not None else x.new_zeros(x.shape[0], self.hidden_size)
        return self._step(x, h, self.weight, self.bias_)


class MinGRU(_MinLayer):
    """minGRU: z = s(W_z x + b_z), h~ = g(W_h x + b_h), h' = (1 - z) h + z h~ (weight (2H, I))."""


class MinLSTM(_MinLayer):
    """minLSTM: f' = f / (f + i), i' = i / (f + i), h' = f' h + i' g(W_h x + b_h) with
    f, i = s(W_f x + b_f), s(W_i x + b_i) (weight (3H, I))."""

    _chunks = 3
    _step = staticmethod(min_lstm_step)
    _scan = staticmethod(min_scan.min_lstm_scan)
