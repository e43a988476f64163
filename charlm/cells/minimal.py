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


def _gru_update(pre: Tensor, h: Tensor, g: Tensor) -> Tensor:
    """h' = (1 - z) h + z g = lerp(h, g, z), z = s(k)."""
    return torch.lerp(h, g, pre[:, : g.shape[1]].sigmoid_())


def _lstm_update(pre: Tensor, h: Tensor, g: Tensor) -> Tensor:
    """h' = f' h + (1 - f') g = lerp(g, h, f'), f' = f / (f + i) (i' = 1 - f')."""
    H = g.shape[1]
    f_i = pre[:, : 2 * H].sigmoid_()
    f = f_i[:, :H]
    return torch.lerp(g, h, f.div_(f + f_i[:, H:]))


class _MinLayer(nn.Module):
    _chunks = 2
    _step = staticmethod(min_gru_step)
    _update = staticmethod(_gru_update)
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
            pre = torch.nn.functional.linear(input, self.weight, self.bias_)  # one GEMM
            pre = pre.transpose(0, 1) if self.batch_first else pre  # (T, B, G), a view
            # Under autocast the GEMM runs in bf16, the scan in float32 (pre is read as
            # bf16 and widened in the scan's first pass): scanned in bf16, h was off by up to
            # 30% (median 0.3%) of float64's at T = 128, in float32 by 8e-6.
            hs = self._scan(pre, _widen(hx))
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

    def step_inference(self, x: Tensor, h: Tensor | None) -> Tensor:
        """:meth:`step` without autograd in fewer ops, for sampling (a batch-1 step costs
        what its ops' fixed costs add up to): the projection in float32 (x's dtype) also
        under autocast, g(p) = clamp(p, min=0) + s(clamp(p, max=0)) (equal to
        equations.min_g), and the update as one lerp. Held to :meth:`step` by
        tests/test_min_model.py's one-character tests."""
        H = self.hidden_size
        pre = torch.nn.functional.linear(x, self.weight, self.bias_).to(x.dtype)
        p = pre[:, -H:]
        g = p.clamp(max=0).sigmoid_().add_(p.clamp_(min=0))
        h = h if h is not None else torch.zeros_like(g)
        return self._update(pre, h, g)


class MinGRU(_MinLayer):
    """minGRU: z = s(W_z x + b_z), h~ = g(W_h x + b_h), h' = (1 - z) h + z h~ (weight (2H, I))."""


class MinLSTM(_MinLayer):
    """minLSTM: f' = f / (f + i), i' = i / (f + i), h' = f' h + i' g(W_h x + b_h) with
    f, i = s(W_f x + b_f), s(W_i x + b_i) (weight (3H, I))."""

    _chunks = 3
    _step = staticmethod(min_lstm_step)
    _update = staticmethod(_lstm_update)
    _scan = staticmethod(min_scan.min_lstm_scan)
