"""The LSTM's per-step pointwise arithmetic, forward and backward, as plain torch-ops
functions: the reference that :mod:`.inductor` compiles into one kernel per step.

Per time step the fused LSTM layer does one GEMM (h_{t-1} W_hh^T) and then this arithmetic,
in the cell state's dtype: float32 also under bf16 autocast, where the GEMM's output and the
input projection come in bf16 and the backward's gate gradients go out in bf16 (the same
functions, traced for those dtypes). Each output is its own argument, the four gates as four
(B, H) views of one (B, 4H) buffer: Inductor then stores every result in place, where a
single (B, 4H) output would go through a temporary and a second pass.
:func:`lstm_forward` must equal :func:`charlm.cells.equations.lstm_step` after that GEMM
(held there by tests/test_kernels.py::test_reference_functions_are_the_lstm_equations), and
:func:`lstm_backward` must equal autograd's gradient of :func:`lstm_forward` (same test).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lstm_backward", "lstm_forward", "lstm_forward_mm", "tanh"]


def tanh(x: Tensor) -> Tensor:
    """tanh(x) = 2 sigmoid(2x) - 1, exact up to float rounding: Inductor's vectorised
    sigmoid is much cheaper than its tanh (see docs/performance.md). Every step kernel's
    tanh."""
    return 2 * torch.sigmoid(2 * x) - 1


def lstm_forward(
    gemm: Tensor,
    x: Tensor,
    c_prev: Tensor,
    i_out: Tensor,
    f_out: Tensor,
    g_out: Tensor,
    o_out: Tensor,
    c: Tensor,
    h: Tensor,
) -> None:
    """One LSTM step after its recurrent GEMM; writes the gates, ``c`` and ``h`` in place.

    Args:
        gemm: (B, 4H) = h_{t-1} W_hh^T.
        x: (B, 4H) = W_ih x_t + b_ih + b_hh (gate order i, f, g, o as in torch.nn); this and
            ``gemm`` may be bf16, the sum is taken in ``c_prev``'s dtype.
        c_prev: (B, H) the previous cell state.
        i_out, f_out, g_out, o_out: (B, H) out: the activated gates sigmoid(i), sigmoid(f),
            tanh(g), sigmoid(o), all the backward step needs besides the cell states.
        c: (B, H) out: c_t = f c_{t-1} + i g.
        h: (B, H) out: h_t = o tanh(c_t).
    """
    H = c_prev.shape[-1]
    pre = gemm.to(c_prev.dtype) + x.to(c_prev.dtype)  # (B, 4H)
    i = torch.sigmoid(pre[:, :H])
    f = torch.sigmoid(pre[:, H : 2 * H])
    g = tanh(pre[:, 2 * H : 3 * H])
    o = torch.sigmoid(pre[:, 3 * H :])
    c_t = f * c_prev + i * g
    for out, gate in ((i_out, i), (f_out, f), (g_out, g), (o_out, o)):
        out.copy_(gate)
    c.copy_(c_t)
    h.copy_(o * tanh(c_t))


def lstm_forward_mm(
    gemm: Tensor,
    x: Tensor,
    c_prev: Tensor,
    i_out: Tensor,
    f_out: Tensor,
    g_out: Tensor,
    o_out: Tensor,
    c: Tensor,
    h: Tensor,
    h_mm: Tensor,
    x_bias: Tensor,
) -> None:
    """:func:`lstm_forward` for bf16 GEMMs: ``x`` comes without its bias ``x_bias`` (4H,),
    added here in float32, and h_t also goes into ``h_mm`` (B, H) in the GEMMs' dtype, the
    next step's GEMM operand, from the same kernel."""
    x = x.to(c_prev.dtype) + x_bias
    lstm_forward(gemm, x, c_prev, i_out, f_out, g_out, o_out, c, h)
    h_mm.copy_(h)


def lstm_backward(
    dh_rec: Tensor,
    dh_out: Tensor,
    dc: Tensor,
    acts: Tensor,
    c_prev: Tensor,
    c: Tensor,
    d_i: Tensor,
    d_f: Tensor,
    d_g: Tensor,
    d_o: Tensor,
    dc_prev: Tensor,
) -> None:
    """Backward of :func:`lstm_forward` for one step; writes the gate gradients and
    ``dc_prev``.

    Args:
        dh_rec: (B, H) dL/dh_t through the next step's gates (dpre_{t+1} W_hh); may be bf16.
        dh_out: (B, H) dL/dh_t from the layer's output.
        dc: (B, H) dL/dc_t from the next step (through its forget gate).
        acts: (B, 4H) the gates :func:`lstm_forward` wrote; c_prev, c: the cell states it
            saw and wrote.
        d_i, d_f, d_g, d_o: (B, H) out: dL/d(pre-activation) of each gate (bf16 for bf16
            GEMMs), views of one (B, 4H) buffer, the next GEMM's operand.
        dc_prev: (B, H) out: dL/dc_{t-1} = dL/dc_t f.
    """
    H = c.shape[-1]
    i, f, g, o = acts[:, :H], acts[:, H : 2 * H], acts[:, 2 * H : 3 * H], acts[:, 3 * H :]
    dh = dh_rec.to(dh_out.dtype) + dh_out
    tanh_c = tanh(c)
    dc_t = dc + dh * o * (1 - tanh_c * tanh_c)  # h = o tanh(c)
    d_i.copy_(dc_t * g * i * (1 - i))  # sigmoid' = s (1 - s), tanh' = 1 - t^2
    d_f.copy_(dc_t * c_prev * f * (1 - f))
    d_g.copy_(dc_t * i * (1 - g * g))
    d_o.copy_(dh * tanh_c * o * (1 - o))
    dc_prev.copy_(dc_t * f)
