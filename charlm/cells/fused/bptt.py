"""Backpropagation through time: one autograd Function per recurrence, with a hand-written
backward that walks the sequence in reverse, one matmul per step, then computes the
recurrent weight gradient as one large GEMM over all steps (:func:`.gemm.dw_hh`).

Each Function's forward is a scan of :mod:`.scan` and equals the equation that scan names;
its backward is the exact gradient of that equation, held there by float64 gradcheck
(tests/test_cells.py::test_gradcheck_*, tests/test_kernels.py) and by every layer test
against torch.nn. ``rows`` (a packed batch, see :mod:`.scan`) is a plain argument; the
rows past a sequence's end get zero gradients.

The GEMMs run in ``W_hh``'s dtype and everything else in h0's (they differ under bf16
autocast, :mod:`.precision`): the backward keeps a copy of each step's gradient operand in
the GEMMs' dtype (:class:`.scan.GemmCopy`), which the weight-gradient GEMM and, when ``xg``
came in that dtype, dL/dxg reuse. Each gradient leaves in its input's dtype. ``x_bias`` (the
projection's bias, kept out of a bf16 ``xg``) gets its gradient from the float32 dL/dpre.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import inductor, rnn_step, scan
from .gemm import dw_hh, step_gemm_fns
from .gru_step import gru_backward
from .lstm_step import lstm_backward
from .workspace import empty


def _dense_rows(g: Tensor) -> Tensor:
    """An incoming gradient as is when its rows are dense (a batch_first transpose is fine
    and saves a copy), else contiguous (e.g. the stride-0 expansion that ``sum()`` sends)."""
    return g if g.stride(-1) == 1 and min(g.stride()) > 0 else g.contiguous()


def _grow(dh: Tensor, rows: scan.Rows, t: int, tail: Tensor | None) -> Tensor:
    """dL/dh_{t-1} for step t - 1's live rows: ``dh`` covers step t's rows; the rows that
    ended at step t - 1 take ``tail`` (their output gradient) or zeros."""
    if rows is None or rows[t - 1] == rows[t]:
        return dh
    extra = rows[t - 1] - rows[t]
    if tail is None:
        tail = dh.new_zeros((extra, dh.shape[1]))
    return torch.cat((dh, tail))


def _bias_dtype(x_bias: Tensor | None) -> torch.dtype | None:
    return None if x_bias is None else x_bias.dtype


def _bias_grad(dpre: Tensor, dtype: torch.dtype | None, need: tuple[bool, ...]) -> Tensor | None:
    """dL/dx_bias = the sum of dL/dpre over steps and rows, in the bias's ``dtype`` (None:
    there is no bias); x_bias is each Function's last argument (``need[-1]``), which callers
    without one leave out."""
    if dtype is None or not need[-1]:
        return None
    return dpre.sum(dim=(0, 1), dtype=torch.float32).to(dtype)  # a bf16 dpre sums in fp32


def _in_dtype(dpre: Tensor, dpre_mm: Tensor, dtype: torch.dtype) -> Tensor:
    """dL/dxg in xg's ``dtype``: the GEMMs' copy of dL/dpre when xg came in that dtype (the
    bf16 projection's backward GEMMs read it as it is), else dL/dpre itself."""
    return dpre_mm if dpre_mm.dtype == dtype else dpre


def _inject(dc: Tensor, dc_last: Tensor, rows: scan.Rows, t: int) -> None:
    """Rows whose sequences end at step t receive their final-state gradient there."""
    if rows is None:
        return
    T = len(rows)
    stop = rows[t]
    start = rows[t + 1] if t + 1 < T else 0
    if start < stop:
        dc[start:stop] = dc_last[start:stop]


class RNNRecurrence(torch.autograd.Function):
    """(xg, h0, W_hh[, x_bias]) -> hs (T, B, H): :func:`.scan.rnn_scan` and its gradient."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(
        ctx, xg: Tensor, h0: Tensor, w_hh: Tensor, relu: bool, rows=None, x_bias=None
    ) -> Tensor:
        hs, hs_mm = scan.rnn_scan(xg, h0, w_hh, relu, rows, x_bias)
        ctx.relu, ctx.rows, ctx.xg_dtype = relu, rows, xg.dtype
        ctx.bias_dtype = _bias_dtype(x_bias)
        ctx.save_for_backward(h0, w_hh, hs, hs_mm)
        return hs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor):
        h0, w_hh, hs, hs_mm = ctx.saved_tensors
        dhs = _dense_rows(dhs)
        found = None if ctx.rows is not None else _rnn_backward_compiled(w_hh, dhs, hs, ctx.relu)
        dpre, dpre_mm = found if found is not None else _rnn_backward_eager(ctx, w_hh, dhs, hs)
        need = ctx.needs_input_grad
        dh0 = torch.mm(dpre_mm[0], w_hh).to(h0.dtype) if need[1] else None
        dw = dw_hh(dpre_mm, h0.to(w_hh.dtype), hs_mm) if need[2] else None
        db = _bias_grad(dpre, ctx.bias_dtype, need)
        return _in_dtype(dpre, dpre_mm, ctx.xg_dtype), dh0, dw, None, None, db


def _rnn_backward_eager(ctx, w_hh: Tensor, dhs: Tensor, hs: Tensor) -> tuple[Tensor, Tensor]:
    """(dL/dpre (T, B, H), the same in W_hh's dtype), one matmul and two ops per step."""
    rows = ctx.rows
    T, B, _ = hs.shape
    # The activation's derivative, for all steps at once: tanh' = 1 - h^2, relu' = [h > 0]
    # (h = relu(pre) > 0 exactly where pre > 0).
    dpre = empty(tuple(hs.shape), hs)  # (T, B, H), becomes dL/dpre in place below
    if ctx.relu:
        torch.gt(hs, 0, out=dpre)
    else:
        torch.mul(hs, hs, out=dpre).neg_().add_(1)
    scan.zero_finished(dpre, rows)
    dpre_l = scan.per_step(dpre, rows)
    dpre_mm = scan.GemmCopy(dpre, rows, w_hh)
    dhs_l = scan.per_step(dhs, rows)
    _, lin_add = step_gemm_fns(w_hh.t(), B, hs)  # lin_add(x, o) = o + x @ W_hh
    dh = dhs_l[T - 1]  # total dL/dh_t of the live rows
    for t in range(T - 1, 0, -1):
        dpre_l[t].mul_(dh)
        b = dpre_l[t].shape[0]
        dh = lin_add(dpre_mm.take(t), dhs_l[t - 1][:b])  # dL/dh_{t-1}
        dh = _grow(dh, rows, t, dhs_l[t - 1][b:])
    dpre_l[0].mul_(dh)
    dpre_mm.take(0)
    return dpre, dpre_mm.full


def _rnn_backward_compiled(
    w_hh: Tensor, dhs: Tensor, hs: Tensor, relu: bool
) -> tuple[Tensor, Tensor] | None:
    """The backward of a dense batch with one compiled kernel per step
    (:func:`.rnn_step.rnn_backward`, which writes dL/dpre in W_hh's dtype, the GEMMs'
    operand) and one GEMM; None when no kernel is available."""
    T, B, H = hs.shape
    dpre = empty((T, B, H), w_hh)
    dpre_l, dhs_l, h_l = dpre.unbind(0), dhs.unbind(0), hs.unbind(0)
    dh_rec = w_hh.new_zeros((B, H))  # nothing flows into the last step
    backward = rnn_step.step_functions(relu)[2]
    step = inductor.kernel(backward, dh_rec, dhs_l[0], h_l[0], dpre_l[0], state=h_l[0])
    if step is None:
        return None
    lin, _ = step_gemm_fns(w_hh.t(), B, hs)  # lin(x, None) = x @ W_hh
    for t in range(T - 1, -1, -1):
        step(dh_rec, dhs_l[t], h_l[t], dpre_l[t])
        if t:
            dh_rec = lin(dpre_l[t], None)  # dL/dh_{t-1} via step t
    return dpre, dpre


class LSTMRecurrence(torch.autograd.Function):
    """(xg, h0, c0, W_hh[, x_bias]) -> (hs (T, B, H), c_last (B, H)): :func:`.scan.lstm_scan`
    and its gradient. The forward picks the compiled or the eager loop; each has its own backward
    (:func:`_lstm_backward_compiled`, :func:`_lstm_backward_eager`) for what it saved."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, rows=None, x_bias=None):
        hs, hs_mm, c_last, saved, compiled = scan.lstm_scan(
            xg, h0, c0, w_hh, True, rows, x_bias
        )
        # Intermediates go through save_for_backward too: autograd then frees them right
        # after backward (unless the graph is retained), so the workspace can recycle them
        # even while the caller still holds this step's outputs. Of hs, the weight gradient
        # is all that needs it: its copy in the GEMMs' dtype is kept.
        ctx.backward_fn = _lstm_backward_compiled if compiled else _lstm_backward_eager
        ctx.rows, ctx.xg_dtype, ctx.bias_dtype = rows, xg.dtype, _bias_dtype(x_bias)
        ctx.save_for_backward(h0, w_hh, hs_mm, *saved)  # type: ignore[misc]
        return hs, c_last

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor, dc_last: Tensor):
        h0, w_hh, hs_mm, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        dpre, dpre_mm, dc0 = ctx.backward_fn(w_hh, _dense_rows(dhs), dc_last, saved, ctx.rows)
        dh0 = torch.mm(dpre_mm[0], w_hh).to(h0.dtype) if need[1] else None
        dw = dw_hh(dpre_mm, h0.to(w_hh.dtype), hs_mm) if need[3] else None
        dxg = _in_dtype(dpre, dpre_mm, ctx.xg_dtype)
        db = _bias_grad(dpre, ctx.bias_dtype, need)
        return dxg, dh0, dc0 if need[2] else None, dw, None, db


def _lstm_backward_eager(w_hh: Tensor, dhs: Tensor, dc_last: Tensor, saved, rows):
    """Backward of the eager :func:`.scan.lstm_scan`: the saved factors scaled per step.
    Returns (dL/dpre (T, B, 4H), the same in W_hh's dtype, dL/dc0 (B, H))."""
    dpre_dstate, dh_dc_4, acts = saved
    T, B, G = dpre_dstate.shape
    H = G // 4
    dpre = empty((T, B, G), dpre_dstate)
    scan.zero_finished(dpre, rows)
    dpre_mm = scan.GemmCopy(dpre, rows, w_hh)
    dpre_ifg = scan.per_step(dpre[:, :, : 3 * H].view(T, B, 3, H), rows)  # (b, 3, H)
    dpre_o = scan.per_step(dpre[:, :, 3 * H :], rows)
    dpre_dc_ifg = scan.per_step(dpre_dstate[:, :, : 3 * H].view(T, B, 3, H), rows)
    dpre_dh_o = scan.per_step(dpre_dstate[:, :, 3 * H :], rows)
    k_l, f_l = scan.per_step(dh_dc_4, rows), scan.per_step(acts[:, :, H : 2 * H], rows)
    dhs_l = scan.per_step(dhs, rows)
    _, lin_add = step_gemm_fns(w_hh.t(), B, dpre_dstate)  # lin_add(x, o) = o + x @ W_hh
    mul = torch.mul
    dc = dc_last.clone(memory_format=torch.contiguous_format)  # (B, H) total dL/dc_t
    n = [B] * T if rows is None else rows
    dc_l = [dc[: n[t]] for t in range(T)]
    dc3_l = [d.unsqueeze(1) for d in dc_l]  # (b, 1, H) views, broadcast over i, f, g
    dh = dhs_l[T - 1]  # total dL/dh_t of the live rows
    for t in range(T - 1, -1, -1):
        _inject(dc, dc_last, rows, t)
        mul(dpre_dh_o[t], dh, out=dpre_o[t])  # dL/do_pre = dh tanh(c) s'(o)
        dc_l[t].addcmul_(dh, k_l[t], value=4)  # dL/dc_t += dh o (1 - tanh(c)^2)
        mul(dpre_dc_ifg[t], dc3_l[t], out=dpre_ifg[t])  # dL/d(i, f, g)_pre
        dc_l[t].mul_(f_l[t])  # dL/dc_{t-1} through the forget gate
        dpre_t = dpre_mm.take(t)
        if t:
            b = n[t]
            dh = lin_add(dpre_t, dhs_l[t - 1][:b])  # dL/dh_{t-1}
            dh = _grow(dh, rows, t, dhs_l[t - 1][b:])
    return dpre, dpre_mm.full, dc


def _lstm_backward_compiled(w_hh: Tensor, dhs: Tensor, dc_last: Tensor, saved, rows):
    """Backward of :func:`.scan.lstm_scan_compiled`: per step one kernel (the compiled
    :func:`.lstm_step.lstm_backward`, eager on partial steps of a packed batch) and one GEMM.
    Returns (dL/dpre (T, B, 4H), the same, dL/dc0 (B, H)): the kernel writes dL/dpre in
    W_hh's dtype, which is what the GEMMs read."""
    acts, cs = saved
    T, B, G = acts.shape
    H = G // 4
    dpre = empty((T, B, G), w_hh)
    scan.zero_finished(dpre, rows)
    dpre_l, a_l = scan.per_step(dpre, rows), scan.per_step(acts, rows)
    dpre4 = dpre.view(T, B, 4, H)
    d_gates = list(zip(*(scan.per_step(dpre4[:, :, k], rows) for k in range(4)), strict=True))
    n = [B] * T if rows is None else rows
    if rows is None:
        c_prev, c_now = cs.unbind(0)[:T], cs.unbind(0)[1:]
    else:
        c_prev = [cs[t, : n[t]] for t in range(T)]
        c_now = [cs[t + 1, : n[t]] for t in range(T)]
    dhs_l = scan.per_step(dhs, rows)
    dcs = acts.new_empty((2, *dc_last.shape))  # dL/dc_t, ping-pong
    dcs[T & 1] = dc_last
    dc_slots = dcs.unbind(0)
    dc_in = [dc_slots[(t + 1) & 1][: n[t]] for t in range(T)]  # dL/dc_t from step t + 1
    dc_out = [dc_slots[t & 1][: n[t]] for t in range(T)]  # dL/dc_{t-1}
    lin, _ = step_gemm_fns(w_hh.t(), B, acts)  # lin(x, None) = x @ W_hh
    dh_rec = w_hh.new_zeros((n[-1], H))  # nothing flows into the last step
    t = T - 1
    args = (dh_rec, dhs_l[t], dc_in[t], a_l[t], c_prev[t], c_now[t], *d_gates[t], dc_out[t])
    full = None
    if n[t] == B:
        full = inductor.kernel(lstm_backward, *args)
    elif rows is not None:  # the last step is partial: find the full-width kernel's shapes
        dh_like = w_hh.new_empty(dcs[0].shape)  # a GEMM output
        full = inductor.kernel(
            lstm_backward, dh_like, dhs[0], dcs[0], acts[0], cs[0], cs[1], *dpre4[0].unbind(1),
            dcs[1],
        )  # fmt: skip
    step = full or lstm_backward
    for t in range(T - 1, -1, -1):
        if rows is not None:
            _inject(dc_slots[(t + 1) & 1], dc_last, rows, t)
            step = full if (full is not None and n[t] == B) else lstm_backward
        step(dh_rec, dhs_l[t], dc_in[t], a_l[t], c_prev[t], c_now[t], *d_gates[t], dc_out[t])
        if t:
            dh_rec = lin(dpre_l[t], None)  # dL/dh_{t-1} via step t
            if rows is not None:
                dh_rec = _grow(dh_rec, rows, t, None)
    return dpre, dpre, dcs[0]  # dcs is this call's own buffer


class GRURecurrence(torch.autograd.Function):
    """(xg, h0, W_hh, b_hh[, x_bias]) -> hs (T, B, H): :func:`.scan.gru_scan` and its
    gradient."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(
        ctx, xg: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, rows=None, x_bias=None
    ):
        hs, hs_mm, saved = scan.gru_scan(xg, h0, w_hh, b_hh, True, rows, x_bias)
        ctx.rows, ctx.xg_dtype, ctx.bias_dtype = rows, xg.dtype, _bias_dtype(x_bias)
        ctx.b_hh_dtype = _bias_dtype(b_hh)
        ctx.save_for_backward(h0, w_hh, hs, hs_mm, *saved)  # type: ignore[misc]
        return hs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor):
        saved = ctx.saved_tensors
        dhs = _dense_rows(dhs)
        if ctx.rows is None:
            found = _gru_backward_compiled(ctx, dhs, *saved)
            if found is not None:
                return found
        return _gru_backward_eager(ctx, dhs, *saved)


def _gru_bias_grads(ctx, sums: Callable[[], tuple[Tensor, Tensor, Tensor]]):
    """(dL/db_hh, dL/dx_bias), each None where not needed, from ``sums()`` = the float32
    sums over steps and rows of (dL/d[r, z]_pre, dL/d(hg_n), dL/dn_pre): both biases see
    the same r and z gradients, b_hh's n part sits inside the reset gate and x_bias's
    before it. ``sums`` runs only when either gradient is needed."""
    need = ctx.needs_input_grad
    want_x = ctx.bias_dtype is not None and need[-1]
    if not (need[3] or want_x):
        return None, None
    rz, n_h, n_x = sums()
    db = torch.cat((rz, n_h)).to(ctx.b_hh_dtype) if need[3] else None
    db_x = torch.cat((rz, n_x)).to(ctx.bias_dtype) if want_x else None
    return db, db_x


def _gru_backward_compiled(ctx, dhs: Tensor, h0, w_hh, hs, hs_mm, rz, ns, hg_n):
    """The backward of a dense batch with one compiled kernel per step
    (:func:`.gru_step.gru_backward`: the GEMMs' operand [dr, dz, d(hg_n)] in W_hh's dtype,
    dL/dxg in xg's, and dL/dh_t z for the step before) and one GEMM; None when no kernel is
    available. Returns the Function's gradients."""
    T, B, H = hs.shape
    d_rec = empty((T, B, 3 * H), w_hh)  # [dr_pre, dz_pre, d(hg_n)]: the GEMM operand
    dxg = empty((T, B, 3 * H), hs.new_empty((), dtype=ctx.xg_dtype))  # [dr, dz, dn]_pre
    dh_direct = hs.new_zeros((2, B, H))  # dL/dh_t z, ping-pong
    dh_rec = w_hh.new_zeros((B, H))  # nothing flows into the last step
    h0 = h0.contiguous()
    # Every per-step view made up front, a few unbind calls in all (a view costs about a
    # microsecond, and each step reads fourteen).
    slots = dh_direct.unbind(0)
    per_step = [
        [slots[(t + 1) & 1] for t in range(T)],  # dL/dh_t z from step t + 1
        dhs.unbind(0), [h0, *hs.unbind(0)[:-1]], rz.unbind(0), ns.unbind(0), hg_n.unbind(0),
        *(buf.view(T, B, 3, H)[:, :, k].unbind(0) for buf in (d_rec, dxg) for k in range(3)),
        [slots[t & 1] for t in range(T)],  # dL/dh_{t-1} z, for step t - 1
    ]  # fmt: skip
    args = list(zip(*per_step, strict=True))
    step = inductor.kernel(gru_backward, dh_rec, *args[T - 1], state=h0)
    if step is None:
        return None
    lin, _ = step_gemm_fns(w_hh.t(), B, hs)  # lin(x, None) = x @ W_hh
    d_rec_l = d_rec.unbind(0)
    for t in range(T - 1, -1, -1):
        step(dh_rec, *args[t])
        if t:
            dh_rec = lin(d_rec_l[t], None)  # dL/dh_{t-1} via step t's GEMM
    need = ctx.needs_input_grad
    dh0 = None
    if need[1]:  # through step 0's GEMM, and directly (its dL/dh_0 z, in slot 0)
        dh0 = torch.mm(d_rec[0], w_hh).to(hs.dtype).add_(dh_direct[0])
    dw = dw_hh(d_rec, h0.to(w_hh.dtype), hs_mm) if need[2] else None

    def sums() -> tuple[Tensor, Tensor, Tensor]:
        sum_x = dxg.sum(dim=(0, 1), dtype=torch.float32)  # [dr, dz, dn]
        sum_hgn = d_rec[:, :, 2 * H :].sum(dim=(0, 1), dtype=torch.float32)
        return sum_x[: 2 * H], sum_hgn, sum_x[2 * H :]

    db, db_x = _gru_bias_grads(ctx, sums)
    return dxg, dh0, dw, db, None, db_x


def _gru_backward_eager(ctx, dhs: Tensor, h0, w_hh, hs, hs_mm, rz, ns, hg_n):
    """The backward of any batch (packed too) with eager ops; returns the Function's
    gradients."""
    rows = ctx.rows
    T, B, H = hs.shape
    r, z = rz[:, :, :H], rz[:, :, H:]
    # With h' = n + z (h - n):  dz_pre = dh (h - n) z (1 - z),
    # dn_pre = dh (1 - z) (1 - n^2), dr_pre = dn_pre hg_n r (1 - r), d(hg_n) = dn_pre r,
    # and dh_prev = dh z + [dr_pre, dz_pre, d(hg_n)] @ W_hh. The factors that do not
    # depend on the incoming gradient are computed for all steps first.
    one_minus_z = empty((T, B, H), hs)
    torch.neg(z, out=one_minus_z).add_(1)
    dz_dh = empty((T, B, H), hs)  # (h_prev - n) z (1 - z)
    dz_dh[0] = h0
    if T > 1:
        dz_dh[1:] = hs[:-1]
    dz_dh.sub_(ns).mul_(z).mul_(one_minus_z)
    dn_dh = empty((T, B, H), hs)  # (1 - z) (1 - n^2)
    torch.mul(ns, ns, out=dn_dh).neg_().add_(1).mul_(one_minus_z)
    dr_hgn_dn = empty((T, B, 2, H), hs)  # per step [hg_n r (1 - r), r]: by dn_pre
    dr_dn = dr_hgn_dn[:, :, 0]
    torch.mul(r, r, out=dr_dn)
    dr_dn.neg_().add_(r).mul_(hg_n)
    dr_hgn_dn[:, :, 1] = r

    d_rec = empty((T, B, 3 * H), hs)  # [dr_pre, dz_pre, d(hg_n)]: the GEMM operand
    dn = empty((T, B, H), hs)  # dn_pre, which is also dL/d(x_n)
    scan.zero_finished(d_rec, rows)
    scan.zero_finished(dn, rows)
    d_rec_mm = scan.GemmCopy(d_rec, rows, w_hh)
    dz_l = scan.per_step(d_rec[:, :, H : 2 * H], rows)
    d_rn = scan.per_step(d_rec.view(T, B, 3, H)[:, :, 0::2], rows)  # (b, 2, H): r and n
    dn_l = scan.per_step(dn, rows)
    dn_b = [d.unsqueeze(1) for d in dn_l]  # (b, 1, H), broadcast over dr_hgn_dn
    dz_dh_l, dn_dh_l = scan.per_step(dz_dh, rows), scan.per_step(dn_dh, rows)
    rr_l, z_l = scan.per_step(dr_hgn_dn, rows), scan.per_step(z, rows)
    dhs_l = scan.per_step(_dense_rows(dhs), rows)
    _, lin_add = step_gemm_fns(w_hh.t(), B, hs)  # lin_add(x, o) = o + x @ W_hh
    mul, addcmul = torch.mul, torch.addcmul
    dh = dhs_l[T - 1]  # total dL/dh_t of the live rows
    for t in range(T - 1, -1, -1):
        mul(dh, dz_dh_l[t], out=dz_l[t])
        mul(dh, dn_dh_l[t], out=dn_l[t])
        mul(dn_b[t], rr_l[t], out=d_rn[t])
        d_rec_t = d_rec_mm.take(t)
        if t:
            b = dh.shape[0]
            direct = addcmul(dhs_l[t - 1][:b], dh, z_l[t])  # through h' = ... + z h
            dh = lin_add(d_rec_t, direct)  # dL/dh_{t-1}
            dh = _grow(dh, rows, t, dhs_l[t - 1][b:])
    need = ctx.needs_input_grad
    dh0 = None
    if need[1]:
        dh0 = torch.mm(d_rec_mm.steps[0], w_hh).to(hs.dtype).addcmul_(dh, z_l[0])
    dw = dw_hh(d_rec_mm.full, h0.to(w_hh.dtype), hs_mm) if need[2] else None

    def sums() -> tuple[Tensor, Tensor, Tensor]:
        sum_h = d_rec.sum(dim=(0, 1))  # [dr, dz, d(hg_n)], float32 here
        return sum_h[: 2 * H], sum_h[2 * H :], dn.sum(dim=(0, 1))

    db, db_x = _gru_bias_grads(ctx, sums)
    # dL/dxg = [dr_pre, dz_pre, dn_pre]: the input side meets n before the reset gate.
    dxg = empty((T, B, 3 * H), hs.new_empty((), dtype=ctx.xg_dtype))
    torch.cat((d_rec[:, :, : 2 * H], dn), dim=2, out=dxg)
    return dxg, dh0, dw, db, None, db_x
