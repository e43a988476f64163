"""The Elman RNN's per-step pointwise arithmetic, forward and backward, as plain torch-ops
functions: the reference that :mod:`.inductor` compiles into one kernel per step.

Laid out like :mod:`.lstm_step`: per time step one GEMM (h_{t-1} W_hh^T), then this
arithmetic in the state's dtype (float32 also under bf16 autocast, where the GEMM's output
and the input projection come in bf16). One function per activation: the kernels are traced
per function. :func:`rnn_forward` must equal :func:`charlm.cells.equations.rnn_step` after
that GEMM, and :func:`rnn_backward` must equal autograd's gradient of it (both held there
by tests/test_kernels.py::test_reference_functions_are_the_rnn_equations).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lstm_step import tanh

__all__ = ["rnn_backward", "rnn_forward", "rnn_forward_mm", "step_functions"]


def rnn_forward(gemm: Tensor, x: Tensor, h: Tensor) -> None:
    """h_t = tanh(gemm + x) into ``h`` (B, H); gemm = h_{t-1} W_hh^T, x = W_ih x_t + b_ih
    + b_hh (either may be bf16)."""
    h.copy_(tanh(gemm.to(h.dtype) + x.to(h.dtype)))


def rnn_forward_relu(gemm: Tensor, x: Tensor, h: Tensor) -> None:
    """:func:`rnn_forward` with h_t = relu(gemm + x)."""
    h.copy_(torch.relu(gemm.to(h.dtype) + x.to(h.dtype)))


def rnn_forward_mm(gemm: Tensor, x: Tensor, h: Tensor, h_mm: Tensor, x_bias: Tensor) -> None:
    """:func:`rnn_forward` for bf16 GEMMs: ``x`` comes without its bias ``x_bias`` (H,),
    added here in float32, and h_t also goes into ``h_mm`` in the GEMMs' dtype."""
    rnn_forward(gemm, x.to(h.dtype) + x_bias, h)
    h_mm.copy_(h)


def rnn_forward_relu_mm(
    gemm: Tensor, x: Tensor, h: Tensor, h_mm: Tensor, x_bias: Tensor
) -> None:
    """:func:`rnn_forward_relu` for bf16 GEMMs, as :func:`rnn_forward_mm`."""
    rnn_forward_relu(gemm, x.to(h.dtype) + x_bias, h)
    h_mm.copy_(h)


def rnn_backward(dh_rec: Tensor, dh_out: Tensor, h: Tensor, dpre: Tensor) -> None:
    """dL/dpre_t = (dh_rec + dh_out) (1 - h_t^2) into ``dpre`` (B, H), for h_t = tanh(pre):
    ``dh_rec`` (may be bf16) through the next step's GEMM, ``dh_out`` from the output;
    ``dpre`` is in the GEMMs' dtype, the next GEMM's operand."""
    dh = dh_rec.to(h.dtype) + dh_out
    dpre.copy_(dh * (1 - h * h))


def rnn_backward_relu(dh_rec: Tensor, dh_out: Tensor, h: Tensor, dpre: Tensor) -> None:
    """:func:`rnn_backward` for h_t = relu(pre): relu' = [h_t > 0]."""
    dh = dh_rec.to(h.dtype) + dh_out
    dpre.copy_(dh * (h > 0))


def step_functions(relu: bool) -> tuple:
    """(forward, forward for bf16 GEMMs, backward) for the activation."""
    if relu:
        return rnn_forward_relu, rnn_forward_relu_mm, rnn_backward_relu
    return rnn_forward, rnn_forward_mm, rnn_backward
