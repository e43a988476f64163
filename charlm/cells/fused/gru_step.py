"""The GRU's per-step pointwise arithmetic, forward and backward, as plain torch-ops
functions: the reference that :mod:`.inductor` compiles into one kernel per step.

Laid out like :mod:`.lstm_step`: per time step one GEMM (h_{t-1} W_hh^T, with b_hh where the
GEMM can add it), then this arithmetic in the state's dtype (float32 also under bf16
autocast, where the GEMM's output and the input projection come in bf16). Each output is
its own argument, so that Inductor stores every result in place.
:func:`gru_forward` must equal :func:`charlm.cells.equations.gru_step` after that GEMM, and
:func:`gru_backward` must equal autograd's gradient of it (both held there by
tests/test_kernels.py::test_reference_functions_are_the_gru_equations).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lstm_step import tanh

__all__ = ["gru_backward", "gru_forward", "gru_forward_mm"]


def gru_forward(
    gemm: Tensor,
    x: Tensor,
    h_prev: Tensor,
    r_out: Tensor,
    z_out: Tensor,
    n_out: Tensor,
    hgn_out: Tensor,
    h: Tensor,
) -> None:
    """One GRU step after its recurrent GEMM; writes the gates, W_hn h + b_hn and ``h``.

    Args:
        gemm: (B, 3H) = h_{t-1} W_hh^T + b_hh (gate order r, z, n as in torch.nn).
        x: (B, 3H) = W_ih x_t + b_ih; this and ``gemm`` may be bf16.
        h_prev: (B, H) the previous state.
        r_out, z_out, n_out: (B, H) out: sigmoid(r), sigmoid(z), n = tanh(x_n + r hg_n).
        hgn_out: (B, H) out: hg_n = W_hn h_{t-1} + b_hn, which the backward step reads.
        h: (B, H) out: h_t = n + z (h_{t-1} - n) = (1 - z) n + z h_{t-1}.
    """
    H = h_prev.shape[-1]
    rec = gemm.to(h_prev.dtype)
    inp = x.to(h_prev.dtype)
    r = torch.sigmoid(inp[:, :H] + rec[:, :H])
    z = torch.sigmoid(inp[:, H : 2 * H] + rec[:, H : 2 * H])
    hg_n = rec[:, 2 * H :]
    n = tanh(inp[:, 2 * H :] + r * hg_n)
    for out, value in ((r_out, r), (z_out, z), (n_out, n), (hgn_out, hg_n)):
        out.copy_(value)
    h.copy_(n + z * (h_prev - n))


def gru_forward_mm(
    gemm: Tensor,
    x: Tensor,
    h_prev: Tensor,
    r_out: Tensor,
    z_out: Tensor,
    n_out: Tensor,
    hgn_out: Tensor,
    h: Tensor,
    h_mm: Tensor,
    x_bias: Tensor,
    b_hh: Tensor,
) -> None:
    """:func:`gru_forward` for bf16 GEMMs: ``gemm`` and ``x`` come without their biases
    ``b_hh`` and ``x_bias`` (3H,), added here in float32, and h_t also goes into ``h_mm``
    (B, H) in the GEMMs' dtype, the next step's GEMM operand, from the same kernel."""
    gemm = gemm.to(h_prev.dtype) + b_hh
    x = x.to(h_prev.dtype) + x_bias
    gru_forward(gemm, x, h_prev, r_out, z_out, n_out, hgn_out, h)
    h_mm.copy_(h)


def gru_backward(
    dh_rec: Tensor,
    dh_direct: Tensor,
    dh_out: Tensor,
    h_prev: Tensor,
    rz: Tensor,
    n: Tensor,
    hg_n: Tensor,
    d_r: Tensor,
    d_z: Tensor,
    d_hgn: Tensor,
    dx_r: Tensor,
    dx_z: Tensor,
    dx_n: Tensor,
    dh_direct_prev: Tensor,
) -> None:
    """Backward of :func:`gru_forward` for one step.

    dL/dh_t arrives in three parts: ``dh_rec`` (B, H) through the next step's GEMM
    ([dr, dz, d(hg_n)]_{t+1} W_hh, may be bf16), ``dh_direct`` (B, H) through the next
    step's h_{t+1} = ... + z h_t (this function's ``dh_direct_prev`` one step later) and
    ``dh_out`` (B, H) from the layer's output. ``rz`` (B, 2H), ``n`` and ``hg_n`` are what
    :func:`gru_forward` wrote, ``h_prev`` the state it read.

    Writes (each (B, H)): the GEMM's operand [d_r, d_z, d_hgn] = dL/d[r_pre, z_pre, hg_n]
    (views of one (B, 3H) buffer in the GEMMs' dtype; d_hgn is also dL/db_hn), the input
    projection's gradient [dx_r, dx_z, dx_n] (of one (B, 3H) buffer in xg's dtype:
    dx_n = dL/dn_pre, met before the reset gate) and dh_direct_prev = dL/dh_t z, the part
    of dL/dh_{t-1} that skips the GEMM.
    """
    H = h_prev.shape[-1]
    r, z = rz[:, :H], rz[:, H:]
    dh = dh_rec.to(dh_out.dtype) + dh_direct + dh_out
    dz = dh * (h_prev - n) * z * (1 - z)  # sigmoid' = s (1 - s)
    dn = dh * (1 - z) * (1 - n * n)  # tanh' = 1 - t^2
    dr = dn * hg_n * r * (1 - r)
    for out, value in ((d_r, dr), (d_z, dz), (d_hgn, dn * r), (dx_r, dr), (dx_z, dz), (dx_n, dn)):
        out.copy_(value)
    dh_direct_prev.copy_(dh * z)
