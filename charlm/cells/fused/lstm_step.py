"""The LSTM's per-step pointwise arithmetic, forward and backward, as plain torch-ops
functions: the reference that :mod:`.inductor` compiles into one kernel per step.

Per time step the fused LSTM layer does one GEMM (h_{t-1} W_hh^T) and then this arithmetic.
:func:`lstm_forward` must equal :func:`charlm.cells.equations.lstm_step` after that GEMM
(held there by tests/test_kernels.py::test_reference_functions_are_the_lstm_equations), and
:func:`lstm_backward` must equal autograd's gradient of :func:`lstm_forward` (same test).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lstm_forward", "lstm_backward"]


def _tanh(x: Tensor) -> Tensor:
    # tanh(x) = 2 sigmoid(2x) - 1, exact up to float rounding: Inductor's vectorised sigmoid
    # is much cheaper than its tanh (see docs/performance.md).
    return 2 * torch.sigmoid(2 * x) - 1


def lstm_forward(
    gemm: Tensor, x: Tensor, c_prev: Tensor, acts: Tensor, c: Tensor, h: Tensor
) -> None:
    """One LSTM step after its recurrent GEMM; writes ``acts``, ``c`` and ``h`` in place.

    Args:
        gemm: (B, 4H) = h_{t-1} W_hh^T.
        x: (B, 4H) = W_ih x_t + b_ih + b_hh (gate order i, f, g, o as in torch.nn).
        c_prev: (B, H) the previous cell state.
        acts: (B, 4H) out: the activated gates [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)],
            all the backward step needs besides the cell states.
        c: (B, H) out: c_t = f c_{t-1} + i g.
        h: (B, H) out: h_t = o tanh(c_t).
    """
    H = c_prev.shape[-1]
    pre = gemm + x  # (B, 4H)
    i = torch.sigmoid(pre[:, :H])
    f = torch.sigmoid(pre[:, H : 2 * H])
    g = _tanh(pre[:, 2 * H : 3 * H])
    o = torch.sigmoid(pre[:, 3 * H :])
    c_t = f * c_prev + i * g
    acts.copy_(torch.cat((i, f, g, o), dim=1))
    c.copy_(c_t)
    h.copy_(o * _tanh(c_t))


def lstm_backward(
    dh_rec: Tensor,
    dh_out: Tensor,
    dc: Tensor,
    acts: Tensor,
    c_prev: Tensor,
    c: Tensor,
    dpre: Tensor,
    dc_prev: Tensor,
) -> None:
    """Backward of :func:`lstm_forward` for one step; writes ``dpre`` and ``dc_prev``.

    Args:
        dh_rec: (B, H) dL/dh_t through the next step's gates (dpre_{t+1} W_hh).
        dh_out: (B, H) dL/dh_t from the layer's output.
        dc: (B, H) dL/dc_t from the next step (through its forget gate).
        acts, c_prev, c: what :func:`lstm_forward` saw and wrote for this step.
        dpre: (B, 4H) out: dL/d(pre-activation) of i, f, g, o.
        dc_prev: (B, H) out: dL/dc_{t-1} = dL/dc_t f.
    """
    H = c.shape[-1]
    i, f, g, o = acts[:, :H], acts[:, H : 2 * H], acts[:, 2 * H : 3 * H], acts[:, 3 * H :]
    dh = dh_rec + dh_out
    tanh_c = _tanh(c)
    dc_t = dc + dh * o * (1 - tanh_c * tanh_c)  # h = o tanh(c)
    d_i = dc_t * g * i * (1 - i)  # sigmoid' = s (1 - s), tanh' = 1 - t^2
    d_f = dc_t * c_prev * f * (1 - f)
    d_g = dc_t * i * (1 - g * g)
    d_o = dh * tanh_c * o * (1 - o)
    dpre.copy_(torch.cat((d_i, d_f, d_g, d_o), dim=1))
    dc_prev.copy_(dc_t * f)
