"""Forward time loops of the fused layers, over precomputed input projections.

Each ``*_scan`` walks the sequence into preallocated buffers (no stack of per-step outputs):
one GEMM per step plus in-place / ``out=`` pointwise ops. It is called directly when no
gradient is needed (evaluation) and from the autograd Functions in :mod:`.bptt` otherwise;
``keep=True`` makes it also store what the backward pass needs, ``keep=False`` reuses one
step's worth of scratch space. tanh is computed as 2 sigmoid(2x) - 1: torch's CPU tanh is
several times dearer than a sigmoid, and the identity is exact up to float rounding.

``rows`` describes a packed batch (time-major, sequences sorted by length, longest first):
``rows[t]`` sequences are still running at step t, always the first ones, so every step works
on the first ``rows[t]`` rows of its (B, .) slices and finished rows keep their last state.
Rows past a sequence's end hold zeros in ``hs``. None means every step has all B rows.

Each scan computes the recurrence of one equation in :mod:`charlm.cells.equations`, named in
its docstring; tests/test_cells.py and tests/test_contract.py hold every scan (through the
layers) to that equation and to torch.nn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import inductor
from .gemm import step_gemm_fns
from .lstm_step import lstm_forward
from .workspace import empty

Rows = Sequence[int] | None


def lengths(rows: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """Each sequence's length in a packed batch: the number of steps with more live rows
    than its index, (B,) for B = rows[0]."""
    counts = torch.tensor(list(rows)).unsqueeze(1)  # (T, 1)
    return (counts > torch.arange(rows[0])).sum(0).to(device)


def per_step(buf: Tensor, rows: Rows) -> Sequence[Tensor]:
    """``buf`` (T, B, ...) as T per-step views, each cut to its step's live rows."""
    views = buf.unbind(0)
    return views if rows is None else [v[:b] for v, b in zip(views, rows, strict=True)]


def scratch_steps(buf: Tensor, rows: Rows, T: int, keep: bool) -> Sequence[Tensor]:
    """Per-step views of ``buf``: all T when keeping, else its first one at every step."""
    if keep:
        return per_step(buf, rows)
    first = buf[0]
    return [first] * T if rows is None else [first[:b] for b in rows]


def previous(h0: Tensor, outs: Sequence[Tensor], rows: Rows) -> list[Tensor]:
    """The state each step starts from: h0, then the previous step's output, cut to the
    step's live rows."""
    if rows is None:
        return [h0, *outs[:-1]]
    return [h0] + [o[:b] for o, b in zip(outs[:-1], rows[1:], strict=True)]


def zero_finished(buf: Tensor, rows: Rows) -> None:
    """Zero the rows of ``buf`` (T, B, ...) past each sequence's end."""
    if rows is not None:
        B = buf.shape[1]
        for t, b in enumerate(rows):
            if b < B:
                buf[t, b:].zero_()


def ended(rows: Rows, t: int) -> tuple[int, int] | None:
    """The rows whose sequences took their last step at step t - 1, as (start, stop)."""
    if rows is None or t == 0 or rows[t] == rows[t - 1]:
        return None
    return rows[t], rows[t - 1]


def tanh_(x: Tensor, minus_one: Tensor, out: Tensor) -> Tensor:
    """out = tanh(x) = 2 sigmoid(2x) - 1; overwrites ``x`` (``out`` may be ``x``)."""
    torch.add(x, x, out=x)
    x.sigmoid_()
    return torch.add(minus_one, x, alpha=2, out=out)


def rnn_scan(xg: Tensor, h0: Tensor, w_hh: Tensor, relu: bool, rows: Rows = None) -> Tensor:
    """The recurrence of :func:`~charlm.cells.equations.rnn_step`.

    Args:
        xg: (T, B, H) = W_ih x_t + b_ih + b_hh for every step.
        h0: (B, H) initial state; w_hh: (H, H); rows: see the module docstring.

    Returns:
        hs: (T, B, H), every hidden state (the activations themselves, which is all that
        the backward pass needs).
    """
    T, B, H = xg.shape
    hs = empty((T, B, H), xg)
    zero_finished(hs, rows)
    _, lin_add = step_gemm_fns(w_hh, B, xg)
    minus_one = xg.new_full((), -1.0)
    x_l, h_l = per_step(xg, rows), per_step(hs, rows)
    h_prev = previous(h0.contiguous(), h_l, rows)
    for t in range(T):
        pre = lin_add(h_prev[t], x_l[t])  # (B, H) = x_t + h W_hh^T
        if relu:
            torch.clamp_min(pre, 0.0, out=h_l[t])
        else:
            tanh_(pre, minus_one, out=h_l[t])
    return hs


def lstm_scan(
    xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, keep: bool, rows: Rows = None
) -> tuple[Tensor, Tensor, tuple[Tensor, ...] | None, bool]:
    """The recurrence of :func:`~charlm.cells.equations.lstm_step` (no projection).

    Runs :func:`lstm_scan_compiled` where a compiled step kernel is available (CPU, steps
    of at least ``inductor.MIN_NUMEL`` elements per gate), else the eager loop below. With
    ``keep`` the eager loop also stores, per step, what the backward pass needs, multiplied
    out while the step's values are hot in cache (s' = s (1 - s) is the sigmoid derivative,
    and 1 - tanh(x)^2 = 4 s'(2x)):

    - ``dpre_dstate`` (T, B, 4H): for i, f, g the derivative of the pre-activation gradient
      by dL/dc = [g s'(i), c_{t-1} s'(f), i (1 - g^2)], and for o its derivative by dL/dh
      = tanh(c) s'(o);
    - ``dh_dc_4`` (T, B, H) = o s'(2c), so that dh/dc = 4 dh_dc_4;
    - ``acts`` (T, B, 4H): the activated gates (backward reads f).

    Args:
        xg: (T, B, 4H) = W_ih x_t + b_ih + b_hh for every step (gate order i, f, g, o).
        h0, c0: (B, H) initial states; w_hh: (4H, H); rows: see the module docstring.

    Returns:
        (hs (T, B, H), c_last (B, H) each row's cell state at its own last step, saved,
        compiled): saved is (dpre_dstate, dh_dc_4, acts) from the eager loop, or (acts, cs)
        from the compiled one (``compiled`` says which), or None without ``keep``.
    """
    T, B, G = xg.shape
    H = G // 4
    if inductor.eligible(xg, B * H):
        found = lstm_scan_compiled(xg, h0, c0, w_hh, keep, rows)
        if found is not None:
            hs, c_last, saved = found
            return hs, c_last, (saved if keep else None), True
    hs = empty((T, B, H), xg)
    zero_finished(hs, rows)
    # Per step, mult = [g, c_{t-1}, 4 i, tanh(c_t)]: the values that scale s' into
    # dpre_dstate, each written there by the op that computes it, so one multiply does all
    # four. Two alternate, so c_t lands in the next step's slot directly.
    mults = xg.new_empty((2, B, 4, H))
    mults[0, :, 1] = c0
    u = xg.new_empty((B, H))  # s(2c)

    def at(slot: int, k: int | None = None) -> list[Tensor]:
        """Per step t, slot (t + slot) & 1 of mults (gate k, or all four), live rows."""
        views = [mults[s] if k is None else mults[s, :, k] for s in (0, 1)]
        n = [B] * T if rows is None else rows
        return [views[(t + slot) & 1][: n[t]] for t in range(T)]

    m_all, m_g, m_c, m_i, m_tc = at(0), at(0, 0), at(0, 1), at(0, 2), at(0, 3)
    m_c_next = at(1, 1)
    u_l = [u] * T if rows is None else [u[:b] for b in rows]
    if keep:
        dpre_dstate = empty((T, B, G), xg)
        dh_dc_4 = empty((T, B, H), xg)
        acts = empty((T, B, G), xg)
        dstate4_l = per_step(dpre_dstate.view(T, B, 4, H), rows)
        dstate_l, k_l = per_step(dpre_dstate, rows), per_step(dh_dc_4, rows)
        acts_l = per_step(acts, rows)
        a_i, a_f, a_g, a_o = (per_step(acts.view(T, B, 4, H)[:, :, j], rows) for j in range(4))
    _, lin_add = step_gemm_fns(w_hh, B, xg)
    minus_one = xg.new_full((), -1.0)
    mul, add, addcmul, sigmoid = torch.mul, torch.add, torch.addcmul, torch.sigmoid
    x_l, h_l = per_step(xg, rows), per_step(hs, rows)
    h_prev = previous(h0.contiguous(), h_l, rows)
    c_last = xg.new_empty((B, H))
    for t in range(T):
        done = ended(rows, t)
        if done:
            c_last[done[0] : done[1]] = mults[t & 1, done[0] : done[1], 1]
        pre = lin_add(h_prev[t], x_l[t])  # (B, 4H) = x_t + h W_hh^T, a fresh tensor
        g_pre = pre[:, 2 * H : 3 * H]
        # One sigmoid for all four gates, with g's input doubled: tanh(x) = 2 s(2x) - 1.
        add(g_pre, g_pre, out=g_pre)
        if keep:
            sigmoid(pre, out=acts_l[t])
            i, f, s_g, o = a_i[t], a_f[t], a_g[t], a_o[t]
            addcmul(acts_l[t], acts_l[t], acts_l[t], value=-1, out=dstate_l[t])  # s'(every)
        else:
            i, f, s_g, o = pre.sigmoid_().chunk(4, 1)
        g = add(minus_one, s_g, alpha=2, out=m_g[t])  # g = tanh(g_pre)
        c_t = mul(f, m_c[t], out=m_c_next[t])  # c' = f * c ...
        c_t.addcmul_(i, g)  # ... + i * g
        add(c_t, c_t, out=u_l[t])
        u_l[t].sigmoid_()  # s(2c')
        if keep:
            mul(i, 4, out=m_i[t])
            addcmul(u_l[t], u_l[t], u_l[t], value=-1, out=k_l[t])
            k_l[t].mul_(o)  # o s'(2c')
        tanh_c = add(minus_one, u_l[t], alpha=2, out=m_tc[t])  # tanh(c')
        mul(o, tanh_c, out=h_l[t])  # h' = o * tanh(c')
        if keep:
            dstate4_l[t].mul_(m_all[t])  # s' * [g, c_{t-1}, 4 i, tanh(c')]
    live = B if rows is None else rows[-1]
    c_last[:live] = mults[T & 1, :live, 1]
    saved = (dpre_dstate, dh_dc_4, acts) if keep else None
    return hs, c_last, saved, False


def lstm_scan_compiled(
    xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, keep: bool, rows: Rows = None
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]] | None:
    """:func:`lstm_scan` with each step's pointwise part as one compiled kernel
    (:func:`.lstm_step.lstm_forward`, which equals ``lstm_step`` after its GEMM); None when
    no kernel is available for this shape.

    Stores ``acts`` (T, B, 4H), the activated gates, and ``cs`` (T + 1, B, H), every cell
    state from c0 on: what :func:`.lstm_step.lstm_backward` reads. Returns (hs, c_last,
    (acts, cs)); without ``keep`` the last two are scratch. In a packed batch the steps with
    fewer live rows run :func:`.lstm_step.lstm_forward` eagerly (one kernel per shape would
    cost seconds of compiling each).
    """
    T, B, G = xg.shape
    H = G // 4
    hs = empty((T, B, H), xg)
    zero_finished(hs, rows)
    acts = empty((T if keep else 1, B, G), xg)
    cs = empty((T + 1 if keep else 2, B, H), xg)
    cs[0] = c0
    lin, _ = step_gemm_fns(w_hh, B, xg)
    x_l, h_l, a_l = per_step(xg, rows), per_step(hs, rows), scratch_steps(acts, rows, T, keep)
    c_slots = cs.unbind(0) if keep else [cs[t & 1] for t in range(T + 1)]
    n = [B] * T if rows is None else rows
    if rows is None:
        c_in, c_out = c_slots[:T], c_slots[1:]
    else:
        c_in = [c_slots[t][: n[t]] for t in range(T)]
        c_out = [c_slots[t + 1][: n[t]] for t in range(T)]
    # x_l[0] stands in for the GEMM's output: both are dense (B, 4H).
    full = inductor.kernel(lstm_forward, x_l[0], x_l[0], c_in[0], a_l[0], c_out[0], h_l[0])
    if full is None:
        return None
    h_prev = previous(h0.contiguous(), h_l, rows)
    c_last = xg.new_empty((B, H))
    for t in range(T):
        step = full
        if rows is not None:
            done = ended(rows, t)
            if done:
                c_last[done[0] : done[1]] = c_slots[t][done[0] : done[1]]
            step = full if n[t] == B else lstm_forward
        gemm = lin(h_prev[t], None)  # (B, 4H) = h W_hh^T
        step(gemm, x_l[t], c_in[t], a_l[t], c_out[t], h_l[t])
    c_last[: n[-1]] = c_slots[T][: n[-1]]
    return hs, c_last, (acts, cs)


def gru_scan(
    xg: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, keep: bool, rows: Rows = None
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """The recurrence of :func:`~charlm.cells.equations.gru_step`.

    Args:
        xg: (T, B, 3H) = W_ih x_t + b_ih for every step (gate order r, z, n).
        h0: (B, H); w_hh: (3H, H); b_hh: (3H,) or None. b_hh stays out of ``xg`` because
            its n part sits inside the reset gate; the per-step GEMM adds it for free.
        keep: keep per-step activations for backward; rows: see the module docstring.

    Returns:
        (hs, saved): hs (T, B, H) and when ``keep`` (rz (T, B, 2H) activated r and z,
        n (T, B, H), hg_n (T, B, H) = W_hn h + b_hn).
    """
    T, B, G = xg.shape
    H = G // 3
    n_buf = T if keep else 1
    rz = empty((n_buf, B, 2 * H), xg)
    ns = empty((n_buf, B, H), xg)
    hgn = empty((T, B, H), xg) if keep else None
    hs = empty((T, B, H), xg)
    zero_finished(hs, rows)
    x_rz, x_n = per_step(xg[:, :, : 2 * H], rows), per_step(xg[:, :, 2 * H :], rows)
    rz_l = scratch_steps(rz, rows, T, keep)
    r_l = scratch_steps(rz[:, :, :H], rows, T, keep)
    z_l = scratch_steps(rz[:, :, H:], rows, T, keep)
    n_l = scratch_steps(ns, rows, T, keep)
    hgn_l = per_step(hgn, rows) if hgn is not None else None
    lin, _ = step_gemm_fns(w_hh, B, xg)
    minus_one = xg.new_full((), -1.0)
    add, addcmul, lerp = torch.add, torch.addcmul, torch.lerp
    split = (2 * H, H)
    h_l = per_step(hs, rows)
    h_prev = previous(h0.contiguous(), h_l, rows)
    for t in range(T):
        h = h_prev[t]
        hg_rz, hg_n = lin(h, b_hh).split(split, 1)  # (B, 2H), (B, H)
        if hgn_l is not None:
            hgn_l[t].copy_(hg_n)
        add(x_rz[t], hg_rz, out=rz_l[t])
        rz_l[t].sigmoid_()  # r, z
        n_t = n_l[t]
        addcmul(x_n[t], r_l[t], hg_n, out=n_t)
        tanh_(n_t, minus_one, out=n_t)  # n = tanh(x_n + r * hg_n)
        lerp(n_t, h, z_l[t], out=h_l[t])  # h' = n + z * (h - n) = (1 - z) n + z h
    return hs, ((rz, ns, hgn) if keep else None)  # type: ignore[return-value]
