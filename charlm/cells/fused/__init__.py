"""The fast paths of ``charlm.cells``: speed only, the same math as ``equations.py``.

One function per cell runs one layer in one direction over a whole sequence: the input
projection of every step as one GEMM (:mod:`.gemm`), then the recurrence as an autograd
Function with a hand-written backward through time (:mod:`.bptt`) over a forward time loop
(:mod:`.scan`), or the loop alone when no gradient is needed. :mod:`.sampling` is the
one-step path. Private torch APIs live in three files only: :mod:`.onednn` (oneDNN's GEMM),
:mod:`.workspace` (storage use counts, for buffer recycling) and :mod:`.inductor` (compiled
step kernels). Nothing here imports the layers or the cells; the tests hold every path to
the equations and to torch.nn.

``rows`` (optional everywhere) describes a packed batch: see :mod:`.scan`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from . import inductor
from .bptt import GRURecurrence, LSTMRecurrence, RNNRecurrence
from .gemm import project
from .sampling import Sampler
from .scan import Rows, gru_scan, lengths, lstm_scan, rnn_scan
from .workspace import WORKSPACE

__all__ = ["WORKSPACE", "Sampler", "float32_region", "gru", "inductor", "lstm", "rnn"]


def float32_region(device_type: str, *tensors: Tensor | None):
    """(context, tensors) for running a recurrence.

    Under autocast the recurrence runs in float32: the long chain of pointwise updates loses
    too much in bf16/fp16, and the in-place/``out=`` ops would otherwise meet mixed dtypes
    (the projection comes out of autocast in low precision, the weights do not). So autocast
    is switched off around it and the inputs are cast up; otherwise nothing changes. (The
    Functions' ``custom_fwd`` decorators do the same for CUDA by themselves.)
    """
    if not torch.is_autocast_enabled(device_type):
        return nullcontext(), tensors
    cast = tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)
    return torch.autocast(device_type, enabled=False), cast


def _last(hs: Tensor, rows: Rows) -> Tensor:
    """Each row's output at its own last step: (B, H)."""
    if rows is None:
        return hs[-1]
    B = hs.shape[1]
    ends = lengths(rows, hs.device) - 1
    return hs[ends, torch.arange(B, device=hs.device)]


def rnn(x, h0, w_ih, w_hh, b_ih, b_hh, relu: bool, grad: bool, rows: Rows = None):
    """One Elman RNN layer: x (T, B, I), h0 (B, H) -> (hs (T, B, H), [h_last (B, H)])."""
    # Both biases are plain additive terms here: fold them into the projection.
    xg = project(x, w_ih, None if b_ih is None else b_ih + b_hh)  # (T, B, H)
    ctx, (xg, h0, w_hh) = float32_region(xg.device.type, xg, h0, w_hh)
    with ctx:
        if grad:
            hs = RNNRecurrence.apply(xg, h0, w_hh, relu, rows)
        else:
            hs = rnn_scan(xg, h0, w_hh, relu, rows)
    return hs, [_last(hs, rows)]


def lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, grad: bool, rows: Rows = None):
    """One LSTM layer: x (T, B, I), h0 (B, P), c0 (B, H) -> (hs (T, B, P), [h_last, c_last]).

    With a projection (``w_hr``, torch.nn's ``proj_size``) the recurrence runs over
    m_t = o tanh(c_t), of which h_t = W_hr m_t: the gates see W_hh h_{t-1} = (W_hh W_hr)
    m_{t-1}, so the same recurrence runs with W_hh W_hr as its recurrent weight, h0 enters
    through step 0's input projection, and every h_t comes out of one GEMM after the loop.
    """
    xg = project(x, w_ih, None if b_ih is None else b_ih + b_hh)  # (T, B, 4H)
    ctx, (xg, h0, c0, w_hh, w_hr) = float32_region(xg.device.type, xg, h0, c0, w_hh, w_hr)
    with ctx:
        if w_hr is not None:
            xg[0] += h0 @ w_hh.t()  # the gates of step 0 see W_hh h0
            w_hh = w_hh @ w_hr  # (4H, H): the recurrence over m
            h0 = c0.new_zeros(c0.shape)
        if grad:
            hs, c_last = LSTMRecurrence.apply(xg, h0, c0, w_hh, rows)
        else:
            hs, c_last, _, _ = lstm_scan(xg, h0, c0, w_hh, False, rows)
        if w_hr is not None:
            hs = hs @ w_hr.t()  # (T, B, P)
    return hs, [_last(hs, rows), c_last]


def gru(x, h0, w_ih, w_hh, b_ih, b_hh, grad: bool, rows: Rows = None):
    """One GRU layer: x (T, B, I), h0 (B, H) -> (hs (T, B, H), [h_last (B, H)])."""
    xg = project(x, w_ih, b_ih)  # (T, B, 3H); b_hh goes to the recurrence
    ctx, (xg, h0, w_hh, b_hh) = float32_region(xg.device.type, xg, h0, w_hh, b_hh)
    with ctx:
        if grad:
            hs = GRURecurrence.apply(xg, h0, w_hh, b_hh, rows)
        else:
            hs, _ = gru_scan(xg, h0, w_hh, b_hh, False, rows)
    return hs, [_last(hs, rows)]
