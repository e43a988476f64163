"""The fast paths of ``charlm.cells``: speed only, the same math as ``equations.py``.

One function per cell runs one layer in one direction over a whole sequence: the input
projection of every step as one GEMM (:mod:`.gemm`), then the recurrence as an autograd
Function with a hand-written backward through time (:mod:`.bptt`) over a forward time loop
(:mod:`.scan`), or the loop alone when no gradient is needed. :mod:`.sampling` is the
one-step path. Under CPU bf16 autocast the GEMMs run in bf16 and the rest in float32
(:mod:`.precision`). Private torch APIs live in four files only: :mod:`.onednn` (oneDNN's
GEMM), :mod:`.mkl` (MKL's packed GEMM), :mod:`.workspace` (storage use counts, for buffer
recycling) and :mod:`.inductor` (compiled step kernels). Nothing here imports the layers or
the cells; the tests hold every path to the equations and to torch.nn.

``rows`` (optional everywhere) describes a packed batch: see :mod:`.scan`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cuda_graph, inductor
from .bptt import GRURecurrence, LSTMRecurrence, RNNRecurrence
from .gemm import project, recurrence_precision
from .precision import float32_region, gemm_dtype, recurrence_region
from .sampling import Sampler
from .scan import Rows, gru_scan, lengths, lstm_scan, rnn_scan
from .workspace import WORKSPACE

__all__ = ["WORKSPACE", "Sampler", "cuda_graph", "float32_region", "gru", "inductor", "lstm",
           "rnn"]


def _gemm_copy(w: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The recurrent weight in the GEMMs' dtype: under bf16 autocast a bf16 copy, made once
    per forward (autograd casts its gradient back to ``w``'s dtype)."""
    return w if dtype is None else w.to(dtype)


def _project(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(xg, x_bias): the input projection of every step, xg = x W_ih^T + bias, one GEMM.

    With bf16 GEMMs (:mod:`.precision`) the bias stays out of the bf16 product and comes
    back as ``x_bias``, which the loop adds in float32 (not rounded to bf16, and cheaper than
    addmm's broadcast of it); otherwise ``x_bias`` is None.
    """
    if gemm_dtype(x.device.type) is None:
        return project(x, w_ih, bias), None
    return project(x, w_ih, None), bias


def _precision(kind: str, low: torch.dtype | None, xg: Tensor, w: Tensor, apply, *args):
    """The dtype of the recurrence's GEMMs: under bf16 autocast (``low``) bf16 or None
    (float32), whichever runs it faster here (:func:`.gemm.recurrence_precision`, raced on
    ``apply(w_mm, *inputs)`` forward and backward over detached copies of ``args``, the
    recurrence's own inputs with ``w`` first); otherwise ``low``. Under inference_mode,
    where nothing can be differentiated, nothing is raced: bf16."""
    if low is None or torch.is_inference_mode_enabled():
        return low

    def run(dtype: torch.dtype | None) -> None:
        copies = [a.detach().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point()
                  else a for a in (w, *args)]
        out = apply(_gemm_copy(copies[0], dtype), *copies[1:])
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return recurrence_precision(kind, xg, w, run)


def _last(hs: Tensor, rows: Rows) -> Tensor:
    """Each row's output at its own last step: (B, H)."""
    if rows is None:
        return hs[-1]
    B = hs.shape[1]
    ends = lengths(rows, hs.device) - 1
    return hs[ends, torch.arange(B, device=hs.device)]


def rnn(x, h0, w_ih, w_hh, b_ih, b_hh, relu: bool, grad: bool, rows: Rows = None):
    """One Elman RNN layer: x (T, B, I), h0 (B, H) -> (hs (T, B, H), [h_last (B, H)])."""
    if cuda_graph.wanted(x, grad, rows):  # CUDA training: the whole layer as one graph
        found = cuda_graph.run(rnn, (x, h0, w_ih, w_hh, b_ih, b_hh), (relu,))
        if found is not None:
            return found
    # Both biases are plain additive terms here: fold them into the projection.
    xg, x_bias = _project(x, w_ih, None if b_ih is None else b_ih + b_hh)  # (T, B, H)
    ctx, low, xg, (h0, w_hh, x_bias) = recurrence_region(xg, h0, w_hh, x_bias)
    with ctx:
        low = _precision("rnn", low, xg, w_hh, lambda w, xg, h0, b: RNNRecurrence.apply(
            xg, h0, w, relu, rows, b), xg, h0, x_bias)
        w_mm = _gemm_copy(w_hh, low)
        if grad:
            hs = RNNRecurrence.apply(xg, h0, w_mm, relu, rows, x_bias)
        else:
            hs, _ = rnn_scan(xg, h0, w_mm, relu, rows, x_bias)
    return hs, [_last(hs, rows)]


def lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, grad: bool, rows: Rows = None):
    """One LSTM layer: x (T, B, I), h0 (B, P), c0 (B, H) -> (hs (T, B, P), [h_last, c_last]).

    With a projection (``w_hr``, torch.nn's ``proj_size``) the recurrence runs over
    m_t = o tanh(c_t), of which h_t = W_hr m_t: the gates see W_hh h_{t-1} = (W_hh W_hr)
    m_{t-1}, so the same recurrence runs with W_hh W_hr as its recurrent weight, h0 enters
    through step 0's input projection, and every h_t comes out of one GEMM after the loop
    (under autocast a GEMM like any other, so bf16 under bf16 autocast).
    """
    if cuda_graph.wanted(x, grad, rows):  # CUDA training: the whole layer as one graph
        found = cuda_graph.run(lstm, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
        if found is not None:
            return found
    xg, x_bias = _project(x, w_ih, None if b_ih is None else b_ih + b_hh)  # (T, B, 4H)
    ctx, low, xg, (h0, c0, w_rec, w_hr32, x_bias) = recurrence_region(
        xg, h0, c0, w_hh, w_hr, x_bias
    )
    with ctx:
        if w_hr32 is not None:
            xg[0] += h0 @ w_rec.t()  # the gates of step 0 see W_hh h0
            w_rec = w_rec @ w_hr32  # (4H, H): the recurrence over m
            h0 = c0.new_zeros(c0.shape)
        low = _precision("lstm", low, xg, w_rec, lambda w, xg, h0, c0, b: LSTMRecurrence.apply(
            xg, h0, c0, w, rows, b), xg, h0, c0, x_bias)
        w_mm = _gemm_copy(w_rec, low)
        if grad:
            hs, c_last = LSTMRecurrence.apply(xg, h0, c0, w_mm, rows, x_bias)
        else:
            hs, _, c_last, _, _ = lstm_scan(xg, h0, c0, w_mm, False, rows, x_bias)
    if w_hr is not None:
        hs = hs @ w_hr.t()  # (T, B, P), under the caller's autocast
    return hs, [_last(hs, rows), c_last]


def gru(x, h0, w_ih, w_hh, b_ih, b_hh, grad: bool, rows: Rows = None):
    """One GRU layer: x (T, B, I), h0 (B, H) -> (hs (T, B, H), [h_last (B, H)])."""
    if cuda_graph.wanted(x, grad, rows):  # CUDA training: the whole layer as one graph
        found = cuda_graph.run(gru, (x, h0, w_ih, w_hh, b_ih, b_hh))
        if found is not None:
            return found
    xg, x_bias = _project(x, w_ih, b_ih)  # (T, B, 3H); b_hh goes to the recurrence
    ctx, low, xg, (h0, w_hh, b_hh, x_bias) = recurrence_region(xg, h0, w_hh, b_hh, x_bias)
    with ctx:
        low = _precision("gru", low, xg, w_hh, lambda w, xg, h0, bh, b: GRURecurrence.apply(
            xg, h0, w, bh, rows, b), xg, h0, b_hh, x_bias)
        w_mm = _gemm_copy(w_hh, low)
        if grad:
            hs = GRURecurrence.apply(xg, h0, w_mm, b_hh, rows, x_bias)
        else:
            hs, _, _ = gru_scan(xg, h0, w_mm, b_hh, False, rows, x_bias)
    return hs, [_last(hs, rows)]
