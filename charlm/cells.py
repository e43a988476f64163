"""Hand-written recurrent cells and layers: charlm's drop-in twins of torch.nn's RNN family.

This module owns ``RNNCell``, ``LSTMCell``, ``GRUCell`` (one time step) and the multi-layer
``RNN``, ``LSTM``, ``GRU`` (whole sequences). They take the same constructor arguments, own
parameters with the same names, shapes and initialisation, and follow the same forward
contract as their torch.nn namesakes, so a state dict moves freely between the two worlds;
none of torch's recurrent modules or kernels is used. The code has two layers of its own.
The *cells* and the ``*_step`` functions are the readable reference: one step written with
plain autograd tensor ops, one fused matmul for all gates followed by ``chunk``. The
*layers* are the fast path: the input projection of every time step is a single GEMM done by
autograd, and only the recurrence runs in a hand-written ``torch.autograd.Function`` (one
per cell type) whose forward walks the sequence into preallocated buffers and whose backward
walks it back, computing the recurrent weight gradient as one large GEMM over all time steps
instead of one small GEMM per step. A layer built with ``fused=False`` runs the plain
autograd loop over the step functions instead; the tests hold both paths to torch.nn.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "RNN",
    "LSTM",
    "GRU",
    "rnn_step",
    "lstm_step",
    "gru_step",
]

_NONLINEARITIES = ("tanh", "relu")


# --------------------------------------------------------------------------------------
# One time step, plain autograd: the readable reference for the equations.
# --------------------------------------------------------------------------------------


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Return ``x @ weight.T + bias`` (bias optional) for x of shape (B, in)."""
    if bias is None:
        return x @ weight.t()
    return torch.addmm(bias, x, weight.t())


def rnn_step(
    x: Tensor,
    h: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One Elman RNN step.

    h' = act(W_ih x + b_ih + W_hh h + b_hh), where act is tanh or relu.

    Args:
        x: input of shape (B, I).
        h: previous hidden state of shape (B, H).
        weight_ih, weight_hh: (H, I) and (H, H).
        bias_ih, bias_hh: (H,) each, or both None.
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Returns:
        The next hidden state h', shape (B, H).
    """
    pre = _linear(x, weight_ih, bias_ih) + _linear(h, weight_hh, bias_hh)  # (B, H)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step (gate order i, f, g, o, as torch.nn).

    With s = sigmoid and every gate computed from [x, h] by its own rows of W_ih, W_hh:

    - input gate:   i  = s(W_ii x + b_ii + W_hi h + b_hi)
    - forget gate:  f  = s(W_if x + b_if + W_hf h + b_hf)
    - candidate:    g  = tanh(W_ig x + b_ig + W_hg h + b_hg)
    - output gate:  o  = s(W_io x + b_io + W_ho h + b_ho)
    - cell update:  c' = f * c + i * g
    - hidden state: h' = o * tanh(c')

    Args:
        x: input (B, I); h, c: previous hidden and cell state (B, H).
        weight_ih, weight_hh: (4H, I) and (4H, H); bias_ih, bias_hh: (4H,) or None.

    Returns:
        (h', c'), each (B, H).
    """
    # One matmul per operand computes all four gates at once; chunk splits them.
    gates = _linear(x, weight_ih, bias_ih) + _linear(h, weight_hh, bias_hh)  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_next = f * c + i * g
    h_next = o * torch.tanh(c_next)
    return h_next, c_next


def gru_step(
    x: Tensor,
    h: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> Tensor:
    """One GRU step (gate order r, z, n, as torch.nn).

    - reset gate:   r  = s(W_ir x + b_ir + W_hr h + b_hr)
    - update gate:  z  = s(W_iz x + b_iz + W_hz h + b_hz)
    - candidate:    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    - hidden state: h' = (1 - z) * n + z * h

    Note the reset gate scales the whole recurrent projection *including* b_hn, as torch.nn
    (and cuDNN) do; this is why the two bias vectors cannot be merged for n.

    Args:
        x: input (B, I); h: previous hidden state (B, H).
        weight_ih, weight_hh: (3H, I) and (3H, H); bias_ih, bias_hh: (3H,) or None.

    Returns:
        The next hidden state h', shape (B, H).
    """
    gi = _linear(x, weight_ih, bias_ih)  # (B, 3H)
    gh = _linear(h, weight_hh, bias_hh)  # (B, 3H)
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


# --------------------------------------------------------------------------------------
# Fused recurrences. Each ``_*_scan`` runs the forward time loop into preallocated buffers
# (no per-step allocation, no stack of per-step outputs). It is called directly when no
# gradient is needed (sampling, evaluation) and from the autograd Functions otherwise;
# ``keep=True`` makes it keep every step's gate activations for the backward pass, while
# ``keep=False`` reuses one step's worth of scratch space.
# --------------------------------------------------------------------------------------


def _steps(buf: Tensor, n: int, keep: bool, period: int = 1) -> Sequence[Tensor]:
    """Per-step views of ``buf``: all of them when keeping, else ``period`` reused ones."""
    views = buf.unbind(0)
    if keep:
        return views
    return [views[t % period] for t in range(n)]


def _rnn_scan(xg: Tensor, h0: Tensor, w_hh: Tensor, relu: bool) -> Tensor:
    """Elman recurrence over precomputed input projections.

    Args:
        xg: (T, B, H) = W_ih x_t + b_ih + b_hh for every step.
        h0: (B, H) initial state; w_hh: (H, H).

    Returns:
        hs: (T, B, H), every hidden state (the activations themselves, which is all that
        the backward pass needs).
    """
    T, B, H = xg.shape
    hs = xg.new_empty((T, B, H))
    w_t = w_hh.t()
    addmm = torch.addmm
    h = h0
    for x_t, h_t in zip(xg.unbind(0), hs.unbind(0), strict=True):
        addmm(x_t, h, w_t, out=h_t)  # (B, H) pre-activation, written in place
        if relu:
            h_t.relu_()
        else:
            h_t.tanh_()
        h = h_t
    return hs


def _lstm_scan(
    xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, keep: bool
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """LSTM recurrence over precomputed input projections.

    Args:
        xg: (T, B, 4H) = W_ih x_t + b_ih + b_hh for every step (gate order i, f, g, o).
        h0, c0: (B, H) initial states; w_hh: (4H, H).
        keep: keep per-step activations for backward.

    Returns:
        (hs, c_last, saved): hs (T, B, H) all hidden states, c_last (B, H) the last cell
        state, and when ``keep`` the activations (gates (T, B, 4H), cs (T, B, H),
        tanh(cs) (T, B, H)).
    """
    T, B, G = xg.shape
    H = G // 4
    n = T if keep else 1
    gates = xg.new_empty((n, B, G))  # activated gates
    cs = xg.new_empty((T if keep else 2, B, H))  # cell states (ping-pong without keep)
    tcs = xg.new_empty((n, B, H))  # tanh(c)
    hs = xg.new_empty((T, B, H))
    # Per-step views, made once so the loop does no Python slicing.
    g_all = _steps(gates, T, keep)
    g_if = _steps(gates[:, :, : 2 * H], T, keep)  # i and f are adjacent: one sigmoid
    g_i = _steps(gates[:, :, :H], T, keep)
    g_f = _steps(gates[:, :, H : 2 * H], T, keep)
    g_g = _steps(gates[:, :, 2 * H : 3 * H], T, keep)
    g_o = _steps(gates[:, :, 3 * H :], T, keep)
    c_l = _steps(cs, T, keep, period=2)
    tc_l = _steps(tcs, T, keep)
    w_t = w_hh.t()
    addmm, mul, tanh = torch.addmm, torch.mul, torch.tanh
    h, c = h0, c0
    for t, (x_t, h_t) in enumerate(zip(xg.unbind(0), hs.unbind(0), strict=True)):
        addmm(x_t, h, w_t, out=g_all[t])  # (B, 4H) pre-activations
        g_if[t].sigmoid_()
        g_g[t].tanh_()
        g_o[t].sigmoid_()
        c_t = c_l[t]
        mul(g_f[t], c, out=c_t)  # c' = f * c ...
        c_t.addcmul_(g_i[t], g_g[t])  # ... + i * g
        tanh(c_t, out=tc_l[t])
        mul(g_o[t], tc_l[t], out=h_t)  # h' = o * tanh(c')
        h, c = h_t, c_t
    return hs, c, ((gates, cs, tcs) if keep else None)


def _gru_scan(
    xg: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, keep: bool
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """GRU recurrence over precomputed input projections.

    Args:
        xg: (T, B, 3H) = W_ih x_t + b_ih for every step (gate order r, z, n).
        h0: (B, H); w_hh: (3H, H); b_hh: (3H,) or None. b_hh stays out of ``xg`` because
            its n part sits inside the reset gate; the per-step addmm adds it for free.
        keep: keep per-step activations for backward.

    Returns:
        (hs, saved): hs (T, B, H) and when ``keep`` (rz (T, B, 2H) activated r and z,
        n (T, B, H), hg (T, B, 3H) = W_hh h + b_hh).
    """
    T, B, G = xg.shape
    H = G // 3
    n_buf = T if keep else 1
    hg = xg.new_empty((n_buf, B, G))
    rz = xg.new_empty((n_buf, B, 2 * H))
    ns = xg.new_empty((n_buf, B, H))
    hs = xg.new_empty((T, B, H))
    x_rz = xg[:, :, : 2 * H].unbind(0)
    x_n = xg[:, :, 2 * H :].unbind(0)
    hg_l = _steps(hg, T, keep)
    hg_rz = _steps(hg[:, :, : 2 * H], T, keep)
    hg_n = _steps(hg[:, :, 2 * H :], T, keep)
    rz_l = _steps(rz, T, keep)
    r_l = _steps(rz[:, :, :H], T, keep)
    z_l = _steps(rz[:, :, H:], T, keep)
    n_l = _steps(ns, T, keep)
    w_t = w_hh.t()
    addmm, mm, add, addcmul, lerp = torch.addmm, torch.mm, torch.add, torch.addcmul, torch.lerp
    h = h0
    for t, h_t in enumerate(hs.unbind(0)):
        if b_hh is None:
            mm(h, w_t, out=hg_l[t])  # (B, 3H)
        else:
            addmm(b_hh, h, w_t, out=hg_l[t])  # (B, 3H)
        add(x_rz[t], hg_rz[t], out=rz_l[t])
        rz_l[t].sigmoid_()  # r, z
        addcmul(x_n[t], r_l[t], hg_n[t], out=n_l[t])
        n_l[t].tanh_()  # n = tanh(x_n + r * hg_n)
        lerp(n_l[t], h, z_l[t], out=h_t)  # h' = n + z * (h - n) = (1 - z) n + z h
        h = h_t
    return hs, ((rz, ns, hg) if keep else None)


def _dw_hh(dG: Tensor, h0: Tensor, hs: Tensor) -> Tensor:
    """dW_hh = sum_t dG_t^T h_{t-1} as one GEMM over all steps (plus the h0 term).

    dG: (T, B, G) gradients of the recurrent pre-activations (rows may be strided);
    h0: (B, H); hs: (T, B, H). Returns (G, H).
    """
    T, B, G = dG.shape
    dw = torch.mm(dG[0].t(), h0)  # (G, H)
    if T > 1:
        H = hs.shape[-1]
        dw.addmm_(dG[1:].reshape((T - 1) * B, G).t(), hs[:-1].reshape((T - 1) * B, H))
    return dw


def _first_grad(g: Tensor) -> Tensor:
    """A writable, dense copy of an incoming gradient slice (it may be expanded zeros)."""
    return g.clone(memory_format=torch.contiguous_format)


class _RNNRecurrence(torch.autograd.Function):
    """Fused Elman recurrence: (xg, h0, W_hh) -> hs (T, B, H)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, xg: Tensor, h0: Tensor, w_hh: Tensor, relu: bool) -> Tensor:
        hs = _rnn_scan(xg, h0, w_hh, relu)
        ctx.relu = relu
        ctx.save_for_backward(h0, w_hh, hs)
        return hs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor):
        h0, w_hh, hs = ctx.saved_tensors
        T = hs.shape[0]
        # Local derivative of the activation, for all steps at once: tanh' = 1 - h^2,
        # relu' = [h > 0] (h = relu(pre) > 0 exactly where pre > 0).
        if ctx.relu:
            dG = (hs > 0).to(hs.dtype)  # (T, B, H), becomes dL/dpre in place below
        else:
            dG = torch.mul(hs, hs).neg_().add_(1)
        dG_l = dG.unbind(0)
        dhs_l = dhs.unbind(0)
        dh = _first_grad(dhs_l[T - 1])  # (B, H) total dL/dh_t
        addmm = torch.addmm
        for t in range(T - 1, 0, -1):
            dG_l[t].mul_(dh)
            addmm(dhs_l[t - 1], dG_l[t], w_hh, out=dh)  # dL/dh_{t-1}
        dG_l[0].mul_(dh)
        need = ctx.needs_input_grad
        dh0 = torch.mm(dG_l[0], w_hh) if need[1] else None
        dw = _dw_hh(dG, h0, hs) if need[2] else None
        return dG, dh0, dw, None


class _LSTMRecurrence(torch.autograd.Function):
    """Fused LSTM recurrence: (xg, h0, c0, W_hh) -> (hs (T, B, H), c_last (B, H))."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
        hs, c_last, saved = _lstm_scan(xg, h0, c0, w_hh, keep=True)
        ctx.save_for_backward(h0, c0, w_hh, hs)
        ctx.acts = saved
        # c_last is a view of a saved buffer; hand out a copy so that in-place use of the
        # returned state can never corrupt what backward reads.
        return hs, c_last.clone()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor, dc_last: Tensor):
        h0, c0, w_hh, hs = ctx.saved_tensors
        gates, cs, tcs = ctx.acts
        del ctx.acts
        T, B, G = gates.shape
        H = G // 4
        i, f = gates[:, :, :H], gates[:, :, H : 2 * H]
        g, o = gates[:, :, 2 * H : 3 * H], gates[:, :, 3 * H :]
        # Step t needs dL/dpre = dc * [g s'(i), c_{t-1} s'(f), i tanh'(g)] for i, f, g and
        # dh * tanh(c) s'(o) for o, plus dc += dh * o tanh'(c). The factors do not depend
        # on the gradient, so they are computed for all steps at once here and the loop is
        # left with five small in-place ops and one matmul per step.
        dG = torch.mul(gates, gates)  # (T, B, 4H): the factors, then dL/dpre in place
        dG.neg_().add_(gates)  # a (1 - a): the sigmoid derivative (fixed below for g)
        d_i, d_f = dG[:, :, :H], dG[:, :, H : 2 * H]
        d_g, d_o = dG[:, :, 2 * H : 3 * H], dG[:, :, 3 * H :]
        d_i.mul_(g)  # g i (1 - i)
        d_f[0].mul_(c0)
        if T > 1:
            d_f[1:].mul_(cs[:-1])  # c_{t-1} f (1 - f)
        torch.mul(g, g, out=d_g)
        d_g.neg_().add_(1).mul_(i)  # i (1 - g^2)
        d_o.mul_(tcs)  # tanh(c) o (1 - o)
        k = torch.mul(tcs, tcs).neg_().add_(1).mul_(o)  # (T, B, H): o (1 - tanh(c)^2)

        dG_l = dG.unbind(0)
        d_ifg = dG[:, :, : 3 * H].view(T, B, 3, H).unbind(0)  # (B, 3, H) per step
        d_o_l = d_o.unbind(0)
        k_l = k.unbind(0)
        f_l = f.unbind(0)
        dhs_l = dhs.unbind(0)
        dh = _first_grad(dhs_l[T - 1])  # (B, H)
        dc = _first_grad(dc_last)  # (B, H)
        dc3 = dc.unsqueeze(1)  # (B, 1, H) view of dc, broadcast over i, f, g
        addmm = torch.addmm
        for t in range(T - 1, -1, -1):
            d_o_l[t].mul_(dh)
            dc.addcmul_(dh, k_l[t])  # dL/dc_t
            d_ifg[t].mul_(dc3)
            dc.mul_(f_l[t])  # dL/dc_{t-1} through the forget gate
            if t:
                addmm(dhs_l[t - 1], dG_l[t], w_hh, out=dh)  # dL/dh_{t-1}
        need = ctx.needs_input_grad
        dh0 = torch.mm(dG_l[0], w_hh) if need[1] else None
        dw = _dw_hh(dG, h0, hs) if need[3] else None
        return dG, dh0, dc, dw


class _GRURecurrence(torch.autograd.Function):
    """Fused GRU recurrence: (xg, h0, W_hh, b_hh) -> hs (T, B, H)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, xg: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
        hs, saved = _gru_scan(xg, h0, w_hh, b_hh, keep=True)
        ctx.save_for_backward(h0, w_hh, hs)
        ctx.acts = saved
        return hs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor):
        h0, w_hh, hs = ctx.saved_tensors
        rz, ns, hg = ctx.acts
        del ctx.acts
        T, B, G = hg.shape
        H = G // 3
        r, z, hg_n = rz[:, :, :H], rz[:, :, H:], hg[:, :, 2 * H :]
        # With h' = n + z (h - n):  dz_pre = dh (h - n) z (1 - z),
        # dn_pre = dh (1 - z) (1 - n^2), dr_pre = dn_pre hg_n r (1 - r), d(hg_n) = dn_pre r,
        # and dh_prev = dh z + [dr_pre, dz_pre, d(hg_n)] @ W_hh. The factors are gathered
        # for all steps first, laid out so that the loop needs two multiplies: E holds per
        # step the slots [dr_pre, dz_pre, d(hg_n), dn_pre], so slots (1, 3) are dh times
        # fac_zn and slots (0, 2) are dn_pre times fac_rr.
        fac_zn = hs.new_empty((T, B, 2, H))
        fac_rr = hs.new_empty((T, B, 2, H))
        one_m_z = 1 - z
        a_z, a_n = fac_zn[:, :, 0], fac_zn[:, :, 1]
        a_z[0] = h0
        if T > 1:
            a_z[1:] = hs[:-1]
        a_z.sub_(ns).mul_(z).mul_(one_m_z)  # (h_prev - n) z (1 - z)
        torch.mul(ns, ns, out=a_n)
        a_n.neg_().add_(1).mul_(one_m_z)  # (1 - z) (1 - n^2)
        a_r = fac_rr[:, :, 0]
        torch.mul(r, r, out=a_r)
        a_r.neg_().add_(r).mul_(hg_n)  # hg_n r (1 - r)
        fac_rr[:, :, 1] = r

        E = hs.new_empty((T, B, 4, H))
        e_zn = E[:, :, 1::2].unbind(0)  # (B, 2, H) strided views: dz_pre, dn_pre
        e_rr = E[:, :, 0::2].unbind(0)  # (B, 2, H) strided views: dr_pre, d(hg_n)
        e_n = E[:, :, 3:4].unbind(0)  # (B, 1, H): dn_pre, broadcast over fac_rr
        dHg = E.view(T, B, 4 * H)[:, :, :G]  # (T, B, 3H), rows strided by 4H
        dHg_l = dHg.unbind(0)  # (B, 3H) = [dr_pre, dz_pre, d(hg_n)], rows strided
        zn_l, rr_l = fac_zn.unbind(0), fac_rr.unbind(0)
        z_l = z.unbind(0)
        dhs_l = dhs.unbind(0)
        dh = _first_grad(dhs_l[T - 1])  # (B, H)
        dh1 = dh.unsqueeze(1)  # (B, 1, H) view
        tmp = torch.empty_like(dh)
        mul, addcmul, addmm = torch.mul, torch.addcmul, torch.addmm
        for t in range(T - 1, 0, -1):
            mul(dh1, zn_l[t], out=e_zn[t])
            mul(e_n[t], rr_l[t], out=e_rr[t])
            addcmul(dhs_l[t - 1], dh, z_l[t], out=tmp)  # direct path h_{t-1} -> h_t
            addmm(tmp, dHg_l[t], w_hh, out=dh)  # dL/dh_{t-1}
        mul(dh1, zn_l[0], out=e_zn[0])
        mul(e_n[0], rr_l[0], out=e_rr[0])
        need = ctx.needs_input_grad
        dh0 = None
        if need[1]:
            dh0 = torch.mul(dh, z_l[0]).addmm_(dHg_l[0], w_hh)
        dw = _dw_hh(dHg, h0, hs) if need[2] else None
        db = dHg.sum(dim=(0, 1)) if need[3] else None
        # dL/dxg = [dr_pre, dz_pre, dn_pre]: the input side sees n before the reset gate.
        dxg = torch.cat((E[:, :, 0:2].reshape(T, B, 2 * H), E[:, :, 3]), dim=2)
        return dxg, dh0, dw, db


# --------------------------------------------------------------------------------------
# Argument checks shared by cells and layers.
# --------------------------------------------------------------------------------------


def _check_size(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int, else raise (TypeError / ValueError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")
    return value


def _check_nonlinearity(nonlinearity: object) -> str:
    if nonlinearity not in _NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from 'tanh' or 'relu'.")
    return nonlinearity  # type: ignore[return-value]


def _float32_region(device_type: str, *tensors: Tensor | None):
    """Return (context, tensors) for running a recurrence.

    Under autocast the recurrence must run in float32: the long chain of pointwise updates
    loses too much in bf16/fp16, and the in-place/``out=`` ops would otherwise meet mixed
    dtypes (the projection comes out of autocast in low precision, the weights do not). So
    autocast is switched off around it and the inputs are cast up; otherwise nothing
    changes. (The Functions' ``custom_fwd`` decorators do the same for CUDA by themselves.)
    """
    if not torch.is_autocast_enabled(device_type):
        return nullcontext(), tensors
    cast = tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)
    return torch.autocast(device_type, enabled=False), cast


# --------------------------------------------------------------------------------------
# Cells: one time step.
# --------------------------------------------------------------------------------------


class _CellBase(nn.Module):
    """Parameters, init and input handling shared by the three cells."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        num_chunks: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.bias = bool(bias)
        G = num_chunks * hidden_size
        # Registration order matches torch.nn, so the same seed gives the same init.
        self.weight_ih = nn.Parameter(torch.empty((G, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((G, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(H), 1/sqrt(H)), as torch.nn does."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        return s

    def _batched(self, input: Tensor, hx: Sequence[Tensor]) -> tuple[Tensor, list[Tensor], bool]:
        """Check dims and turn unbatched (I,) input and (H,) states into a batch of one."""
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for k, h in enumerate(hx):
            if h.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected hx[{k}] to be 1D or 2D, got {h.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            return input.unsqueeze(0), [h.unsqueeze(0) for h in hx], False
        return input, list(hx), True

    def _zeros(self, input: Tensor) -> Tensor:
        return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)


class RNNCell(_CellBase):
    """An Elman RNN cell: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu.

    Drop-in twin of ``torch.nn.RNNCell``: parameters ``weight_ih`` (H, I), ``weight_hh``
    (H, H), ``bias_ih`` (H,), ``bias_hh`` (H,).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.nonlinearity = _check_nonlinearity(nonlinearity)
        super().__init__(input_size, hidden_size, bias, 1, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """Return h' (B, H) for input (B, I) and hx (B, H); unbatched (I,) -> (H,)."""
        x, hs, is_batched = self._batched(input, [] if hx is None else [hx])
        h = hs[0] if hs else self._zeros(x)
        h_next = rnn_step(
            x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.nonlinearity
        )
        return h_next if is_batched else h_next.squeeze(0)


class LSTMCell(_CellBase):
    """A long short-term memory cell (gate order i, f, g, o); see :func:`lstm_step`.

    i = s(W_ii x + b_ii + W_hi h + b_hi)      input gate
    f = s(W_if x + b_if + W_hf h + b_hf)      forget gate
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)   candidate
    o = s(W_io x + b_io + W_ho h + b_ho)      output gate
    c' = f * c + i * g                         cell update
    h' = o * tanh(c')

    Drop-in twin of ``torch.nn.LSTMCell``: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H),
    ``bias_ih`` and ``bias_hh`` (4H,).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 4, device, dtype)

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return (h', c'), each (B, H), for input (B, I); unbatched (I,) -> (H,) each."""
        x, hs, is_batched = self._batched(input, [] if hx is None else hx)
        if hs:
            h, c = hs
        else:
            h = c = self._zeros(x)
        h_next, c_next = lstm_step(
            x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        )
        if not is_batched:
            return h_next.squeeze(0), c_next.squeeze(0)
        return h_next, c_next


class GRUCell(_CellBase):
    """A gated recurrent unit cell (gate order r, z, n); see :func:`gru_step`.

    r = s(W_ir x + b_ir + W_hr h + b_hr)            reset gate
    z = s(W_iz x + b_iz + W_hz h + b_hz)            update gate
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   candidate
    h' = (1 - z) * n + z * h

    Drop-in twin of ``torch.nn.GRUCell``: ``weight_ih`` (3H, I), ``weight_hh`` (3H, H),
    ``bias_ih`` and ``bias_hh`` (3H,).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 3, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """Return h' (B, H) for input (B, I) and hx (B, H); unbatched (I,) -> (H,)."""
        x, hs, is_batched = self._batched(input, [] if hx is None else [hx])
        h = hs[0] if hs else self._zeros(x)
        h_next = gru_step(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h_next if is_batched else h_next.squeeze(0)


# --------------------------------------------------------------------------------------
# Layers: whole sequences, several stacked layers.
# --------------------------------------------------------------------------------------


class _LayerBase(nn.Module):
    """Parameters, argument checks and the layer loop shared by RNN, LSTM and GRU."""

    _num_chunks: int = 1

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if bidirectional:
            raise ValueError(f"{type(self).__name__}: bidirectional=True is not supported")
        if proj_size != 0:
            raise ValueError(f"{type(self).__name__}: proj_size != 0 is not supported")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Number)
            or not 0 <= dropout <= 1  # type: ignore[operator]
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability "
                f"of an element being zeroed, got {dropout!r}"
            )
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.num_layers = _check_size("num_layers", num_layers)
        if dropout > 0 and num_layers == 1:  # type: ignore[operator]
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        self.mode = mode
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)  # type: ignore[arg-type]
        self.bidirectional = False
        self.proj_size = 0
        # fused=True: the fast sequence Functions; False: the plain autograd loop over the
        # step functions (the readable reference path). May be flipped after construction.
        self.fused = bool(fused)

        factory = {"device": device, "dtype": dtype}
        G = self._num_chunks * hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size
            names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}"]
            shapes = [(G, in_size), (G, hidden_size)]
            if bias:
                names += [f"bias_ih_l{layer}", f"bias_hh_l{layer}"]
                shapes += [(G,), (G,)]
            # Same registration order as torch.nn: the same seed gives the same init.
            for name, shape in zip(names, shapes, strict=True):
                setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
            self._flat_weights_names.extend(names)
            self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(H), 1/sqrt(H)), as torch.nn does."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for torch.nn (cuDNN weight packing) runs unchanged."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer, its parameters in torch.nn's order (w_ih, w_hh[, b_ih, b_hh])."""
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        if not self.fused:
            s += ", fused=False"
        return s

    # Subclasses implement one layer over a (T, B, I) input; ``states`` are (B, H) tensors
    # (h, or h and c), and the return is (hs (T, B, H), final states).
    def _layer(
        self, x: Tensor, states: list[Tensor], params: list[Tensor | None], grad: bool
    ) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def _params(self, layer: int) -> list[Tensor | None]:
        names = self._all_weights[layer]
        ps: list[Tensor | None] = [getattr(self, n) for n in names]
        return ps if self.bias else ps + [None, None]

    def _run(
        self, input: Tensor, hx: Sequence[Tensor] | None, n_states: int
    ) -> tuple[Tensor, list[Tensor]]:
        """Shared forward: shape handling, the stack of layers, dropout between them."""
        name = type(self).__name__
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor")
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.size(-1)}"
            )
        if input.dtype != self.weight_ih_l0.dtype and not torch.is_autocast_enabled(
            input.device.type
        ):
            raise ValueError(
                f"{name} input dtype ({input.dtype}) does not match weight dtype "
                f"({self.weight_ih_l0.dtype})"
            )
        is_batched = input.dim() == 3
        if not is_batched:
            input = input.unsqueeze(1)  # (T, 1, I)
        elif self.batch_first:
            input = input.transpose(0, 1)  # (T, B, I)
        T, B = input.shape[0], input.shape[1]
        expected = (self.num_layers, B, self.hidden_size)
        if hx is None:
            zeros = input.new_zeros(expected)
            states = [zeros] * n_states
        else:
            states = list(hx)
            want = 3 if is_batched else 2
            for k, h in enumerate(states):
                if h.dim() != want:
                    raise RuntimeError(
                        f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, "
                        f"hx should also be {want}-D but got {h.dim()}-D tensor"
                    )
                if not is_batched:
                    states[k] = h = h.unsqueeze(1)
                if tuple(h.shape) != expected:
                    which = f"[{k}]" if n_states > 1 else ""
                    raise RuntimeError(
                        f"Expected hidden{which} size {expected}, got {list(h.shape)}"
                    )
        if T == 0:
            raise RuntimeError(f"{name}: input sequence must have at least one time step")

        grad = torch.is_grad_enabled() and (
            input.requires_grad
            or any(s.requires_grad for s in states)
            or any(p.requires_grad for p in self.parameters())
        )
        x = input
        finals: list[list[Tensor]] = []
        last = self.num_layers - 1
        for layer in range(self.num_layers):
            x, fin = self._layer(x, [s[layer] for s in states], self._params(layer), grad)
            finals.append(fin)
            if layer < last and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
        out_states = [torch.stack([fin[k] for fin in finals]) for k in range(n_states)]
        if not is_batched:
            return x.squeeze(1), [s.squeeze(1) for s in out_states]
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, out_states

    @staticmethod
    def _project(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
        """Input projection of every step as one GEMM: (T, B, I) -> (T, B, G)."""
        T, B, n_in = x.shape
        x2 = x.reshape(T * B, n_in)
        xg = torch.mm(x2, w_ih.t()) if bias is None else torch.addmm(bias, x2, w_ih.t())
        return xg.view(T, B, w_ih.shape[0])

    @staticmethod
    def _loop(
        step: Callable[..., Tensor | tuple[Tensor, Tensor]],
        x: Tensor,
        states: list[Tensor],
        params: list[Tensor | None],
        **kw: str,
    ) -> tuple[Tensor, list[Tensor]]:
        """The readable path: plain autograd, one step function call per time step."""
        outs = []
        for x_t in x.unbind(0):
            res = step(x_t, *states, *params, **kw)
            states = list(res) if isinstance(res, tuple) else [res]
            outs.append(states[0])
        return torch.stack(outs), states  # (T, B, H)


class RNN(_LayerBase):
    """Multi-layer Elman RNN: per layer and step, h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    Drop-in twin of ``torch.nn.RNN`` (argument order included: ``nonlinearity`` is the 4th
    positional argument, as in torch). ``forward(input, hx=None)`` takes input (T, B, I),
    (B, T, I) if ``batch_first`` or unbatched (T, I), hx (num_layers, B, H) or unbatched
    (num_layers, H), and returns (output (T, B, H) [or (B, T, H) / (T, H)], h_n).
    ``fused=False`` selects the plain autograd loop instead of the fused recurrence.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fused: bool = True,
    ) -> None:
        self.nonlinearity = _check_nonlinearity(nonlinearity)
        super().__init__(
            "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            fused,
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the sequence; returns (output, h_n) shaped as torch.nn.RNN's."""
        out, (h_n,) = self._run(input, None if hx is None else (hx,), 1)
        return out, h_n

    def _layer(self, x, states, params, grad):
        if not self.fused:
            return self._loop(rnn_step, x, states, params, nonlinearity=self.nonlinearity)
        w_ih, w_hh, b_ih, b_hh = params
        # Both biases are plain additive terms here: fold them into the projection.
        xg = self._project(x, w_ih, None if b_ih is None else b_ih + b_hh)  # (T, B, H)
        relu = self.nonlinearity == "relu"
        ctx, (xg, h0, w_hh) = _float32_region(xg.device.type, xg, states[0], w_hh)
        with ctx:
            if grad:
                hs = _RNNRecurrence.apply(xg, h0, w_hh, relu)
            else:
                hs = _rnn_scan(xg, h0, w_hh, relu)
        return hs, [hs[-1]]


class LSTM(_LayerBase):
    """Multi-layer LSTM; per layer and step the equations of :class:`LSTMCell`.

    Drop-in twin of ``torch.nn.LSTM`` (``proj_size`` and ``bidirectional`` must stay off).
    ``forward(input, hx=None)`` takes input (T, B, I), (B, T, I) if ``batch_first`` or
    unbatched (T, I), hx = (h_0, c_0) each (num_layers, B, H) or unbatched
    (num_layers, H), and returns (output, (h_n, c_n)). ``fused=False`` selects the plain
    autograd loop instead of the fused recurrence.
    """

    _num_chunks = 4

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fused: bool = True,
    ) -> None:
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
            fused,
        )

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the sequence; returns (output, (h_n, c_n)) shaped as torch.nn.LSTM's."""
        out, (h_n, c_n) = self._run(input, hx, 2)
        return out, (h_n, c_n)

    def _layer(self, x, states, params, grad):
        if not self.fused:
            return self._loop(lstm_step, x, states, params)
        w_ih, w_hh, b_ih, b_hh = params
        xg = self._project(x, w_ih, None if b_ih is None else b_ih + b_hh)  # (T, B, 4H)
        ctx, (xg, h0, c0, w_hh) = _float32_region(xg.device.type, xg, *states, w_hh)
        with ctx:
            if grad:
                hs, c_last = _LSTMRecurrence.apply(xg, h0, c0, w_hh)
            else:
                hs, c_last, _ = _lstm_scan(xg, h0, c0, w_hh, keep=False)
        return hs, [hs[-1], c_last]


class GRU(_LayerBase):
    """Multi-layer GRU; per layer and step the equations of :class:`GRUCell`.

    Drop-in twin of ``torch.nn.GRU`` (``bidirectional`` must stay off).
    ``forward(input, hx=None)`` takes input (T, B, I), (B, T, I) if ``batch_first`` or
    unbatched (T, I), hx (num_layers, B, H) or unbatched (num_layers, H), and returns
    (output, h_n). ``fused=False`` selects the plain autograd loop.
    """

    _num_chunks = 3

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fused: bool = True,
    ) -> None:
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            fused,
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the sequence; returns (output, h_n) shaped as torch.nn.GRU's."""
        out, (h_n,) = self._run(input, None if hx is None else (hx,), 1)
        return out, h_n

    def _layer(self, x, states, params, grad):
        if not self.fused:
            return self._loop(gru_step, x, states, params)
        w_ih, w_hh, b_ih, b_hh = params
        xg = self._project(x, w_ih, b_ih)  # (T, B, 3H); b_hh goes to the recurrence
        ctx, (xg, h0, w_hh, b_hh) = _float32_region(xg.device.type, xg, states[0], w_hh, b_hh)
        with ctx:
            if grad:
                hs = _GRURecurrence.apply(xg, h0, w_hh, b_hh)
            else:
                hs, _ = _gru_scan(xg, h0, w_hh, b_hh, keep=False)
        return hs, [hs[-1]]
