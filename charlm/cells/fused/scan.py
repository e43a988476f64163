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

Dtypes: a loop runs in its state's dtype (h0's) and its GEMMs in ``w_hh``'s; the two differ
under CPU bf16 autocast (:mod:`.precision`), where ``xg`` comes in bf16 without its bias
(``x_bias``, added in the loop's dtype) and each step's new state is also copied to bf16
(:class:`GemmCopy`) for the next step's product. Every scan also returns that copy of
``hs``: the backward pass's weight-gradient GEMM reads it.

Each scan computes the recurrence of one equation in :mod:`charlm.cells.equations`, named in
its docstring; tests/test_cells.py and tests/test_contract.py hold every scan (through the
layers) to that equation and to torch.nn, tests/test_precision.py under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import inductor, rnn_step
from .gemm import step_gemm_fns
from .gru_step import gru_forward, gru_forward_mm
from .lstm_step import lstm_forward, lstm_forward_mm
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


def loop_input(xg: Tensor, like: Tensor, x_bias: Tensor | None = None) -> Tensor:
    """``xg`` (+ ``x_bias``) in ``like``'s dtype, in a recycled buffer where it is a new
    tensor: the eager loops add a bf16 projection to float32 products in float32."""
    if x_bias is not None:  # cast, then add in place: torch.add would cast into a temporary
        return empty(tuple(xg.shape), like).copy_(xg).add_(x_bias)
    return xg if xg.dtype == like.dtype else empty(tuple(xg.shape), like).copy_(xg)


class GemmCopy:
    """A (T, B, X) buffer's steps in the GEMMs' dtype (``like``'s), for the products that
    read them.

    Where a loop's GEMMs run in a lower precision than the loop (bf16 under autocast),
    :meth:`take` copies step t's live rows of ``buf`` into a buffer of that dtype once the
    step is done, so that ``full`` holds every step for the weight-gradient GEMM after the
    loop (rows past a sequence's end hold zeros). Where the dtypes agree it is ``buf`` itself
    and copies nothing.
    """

    def __init__(self, buf: Tensor, rows: Rows, like: Tensor) -> None:
        self.copies = buf.dtype != like.dtype
        self.full = buf
        if self.copies:
            self.full = empty(tuple(buf.shape), like)
            zero_finished(self.full, rows)
        self.steps = per_step(self.full, rows)
        self._src = per_step(buf, rows) if self.copies else self.steps

    def take(self, t: int) -> Tensor:
        """Step t's live rows in the GEMMs' dtype (copied now, when they differ)."""
        if self.copies:
            self.steps[t].copy_(self._src[t])
        return self.steps[t]


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


def rnn_scan(
    xg: Tensor, h0: Tensor, w_hh: Tensor, relu: bool, rows: Rows = None,
    x_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence of :func:`~charlm.cells.equations.rnn_step`.

    Args:
        xg: (T, B, H) = W_ih x_t + b_ih + b_hh for every step (+ ``x_bias``, (H,), if given).
        h0: (B, H) initial state; w_hh: (H, H); rows: see the module docstring.

    Returns:
        (hs, hs_mm): hs (T, B, H), every hidden state (the activations themselves, which is
        all that the backward pass needs besides), and hs_mm, hs in w_hh's dtype.

    Runs :func:`rnn_scan_compiled` where a compiled step kernel is available (a dense batch,
    see :func:`lstm_scan`), else the eager loop below.
    """
    T, B, H = xg.shape
    if rows is None and inductor.eligible(h0, B * H):
        found = rnn_scan_compiled(xg, h0, w_hh, relu, x_bias)
        if found is not None:
            return found
    xg = loop_input(xg, h0, x_bias)
    hs = empty((T, B, H), h0)
    zero_finished(hs, rows)
    hs_mm = GemmCopy(hs, rows, w_hh)
    _, lin_add = step_gemm_fns(w_hh, B, h0)
    minus_one = xg.new_full((), -1.0)
    x_l, h_l = per_step(xg, rows), per_step(hs, rows)
    h_prev = previous(h0.to(w_hh.dtype).contiguous(), hs_mm.steps, rows)
    for t in range(T):
        pre = lin_add(h_prev[t], x_l[t])  # (B, H) = x_t + h W_hh^T
        if relu:
            torch.clamp_min(pre, 0.0, out=h_l[t])
        else:
            tanh_(pre, minus_one, out=h_l[t])
        hs_mm.take(t)
    return hs, hs_mm.full


def _gemm_like(x_t: Tensor, w_hh: Tensor) -> Tensor:
    """An example of one step's GEMM output for compiling a kernel: ``x_t`` (B, G) itself
    where the dtypes agree (both are dense), else a (B, G) tensor in the GEMMs' dtype."""
    return x_t if x_t.dtype == w_hh.dtype else w_hh.new_empty(x_t.shape)


def rnn_scan_compiled(
    xg: Tensor, h0: Tensor, w_hh: Tensor, relu: bool, x_bias: Tensor | None = None
) -> tuple[Tensor, Tensor] | None:
    """:func:`rnn_scan` of a dense batch with each step's pointwise part as one compiled
    kernel (:func:`.rnn_step.rnn_forward`, which equals ``rnn_step`` after its GEMM, or its
    relu twin); None when no kernel is available for this shape. With bf16 GEMMs the kernel
    also adds ``x_bias`` and writes hs_mm (:func:`.rnn_step.rnn_forward_mm`)."""
    T, B, H = xg.shape
    forward, forward_mm, _ = rnn_step.step_functions(relu)
    hs = empty((T, B, H), h0)
    hs_mm = GemmCopy(hs, None, w_hh)
    if x_bias is not None and not hs_mm.copies:  # only the bf16 kernel adds it
        xg, x_bias = loop_input(xg, h0, x_bias), None
    x_l, h_l = xg.unbind(0), hs.unbind(0)
    fn, outs = forward, [h_l]
    if hs_mm.copies:
        bias = h0.new_zeros(H) if x_bias is None else x_bias
        fn, outs = forward_mm, [h_l, hs_mm.steps, [bias] * T]
    outs_t = list(zip(*outs, strict=True))  # per step
    step = inductor.kernel(fn, _gemm_like(x_l[0], w_hh), x_l[0], *outs_t[0], state=h0)
    if step is None:
        return None
    lin, _ = step_gemm_fns(w_hh, B, h0)
    h_prev = previous(h0.to(w_hh.dtype).contiguous(), hs_mm.steps, None)
    for t in range(T):
        step(lin(h_prev[t], None), x_l[t], *outs_t[t])  # h_t = act(h_{t-1} W_hh^T + x_t)
    return hs, hs_mm.full


def lstm_scan(
    xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, keep: bool, rows: Rows = None,
    x_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...] | None, bool]:
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
        xg: (T, B, 4H) = W_ih x_t + b_ih + b_hh for every step (gate order i, f, g, o), +
            ``x_bias`` (4H,) if given.
        h0, c0: (B, H) initial states; w_hh: (4H, H); rows: see the module docstring.

    Returns:
        (hs (T, B, H), hs_mm (hs in w_hh's dtype), c_last (B, H) each row's cell state at its
        own last step, saved, compiled): saved is (dpre_dstate, dh_dc_4, acts) from the eager
        loop, or (acts, cs) from the compiled one (``compiled`` says which), or None without
        ``keep``.
    """
    T, B, G = xg.shape
    H = G // 4
    if inductor.eligible(c0, B * H):
        found = lstm_scan_compiled(xg, h0, c0, w_hh, keep, rows, x_bias)
        if found is not None:
            hs, hs_mm, c_last, saved = found
            return hs, hs_mm, c_last, (saved if keep else None), True
    xg = loop_input(xg, c0, x_bias)
    hs = empty((T, B, H), xg)
    zero_finished(hs, rows)
    hs_mm = GemmCopy(hs, rows, w_hh)
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
    h_prev = previous(h0.to(w_hh.dtype).contiguous(), hs_mm.steps, rows)
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
        hs_mm.take(t)
        if keep:
            dstate4_l[t].mul_(m_all[t])  # s' * [g, c_{t-1}, 4 i, tanh(c')]
    live = B if rows is None else rows[-1]
    c_last[:live] = mults[T & 1, :live, 1]
    saved = (dpre_dstate, dh_dc_4, acts) if keep else None
    return hs, hs_mm.full, c_last, saved, False


def lstm_scan_compiled(
    xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, keep: bool, rows: Rows = None,
    x_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]] | None:
    """:func:`lstm_scan` with each step's pointwise part as one compiled kernel
    (:func:`.lstm_step.lstm_forward`, which equals ``lstm_step`` after its GEMM); None when
    no kernel is available for this shape.

    Stores ``acts`` (T, B, 4H), the activated gates, and ``cs`` (T + 1, B, H), every cell
    state from c0 on: what :func:`.lstm_step.lstm_backward` reads. Returns (hs, hs_mm,
    c_last, (acts, cs)); without ``keep`` the last two are scratch. In a packed batch the
    steps with fewer live rows run :func:`.lstm_step.lstm_forward` eagerly (one kernel per
    shape would cost seconds of compiling each). The kernel reads ``xg`` and the GEMM's
    output in their own dtype (bf16 under autocast), computes in c0's, and with bf16 GEMMs
    also adds ``x_bias`` and writes hs_mm (:func:`.lstm_step.lstm_forward_mm`).
    """
    T, B, G = xg.shape
    H = G // 4
    if x_bias is not None and w_hh.dtype == c0.dtype:  # only the bf16 kernel adds it
        xg, x_bias = loop_input(xg, c0, x_bias), None
    hs = empty((T, B, H), c0)
    zero_finished(hs, rows)
    hs_mm = GemmCopy(hs, rows, w_hh)
    acts = empty((T if keep else 1, B, G), c0)
    cs = empty((T + 1 if keep else 2, B, H), c0)
    cs[0] = c0
    lin, _ = step_gemm_fns(w_hh, B, c0)
    x_l, h_l = per_step(xg, rows), per_step(hs, rows)
    acts4 = acts.view(acts.shape[0], B, 4, H)
    i_l, f_l, g_l, o_l = (scratch_steps(acts4[:, :, k], rows, T, keep) for k in range(4))
    c_slots = cs.unbind(0) if keep else [cs[t & 1] for t in range(T + 1)]
    n = [B] * T if rows is None else rows
    if rows is None:
        c_in, c_out = c_slots[:T], c_slots[1:]
    else:
        c_in = [c_slots[t][: n[t]] for t in range(T)]
        c_out = [c_slots[t + 1][: n[t]] for t in range(T)]
    # What step t writes: the gates, c_t, h_t and, with bf16 GEMMs, h_t for the next GEMM
    # (then followed by the bias, which that kernel adds).
    fn, outs = lstm_forward, [i_l, f_l, g_l, o_l, c_out, h_l]
    if hs_mm.copies:
        bias = c0.new_zeros(G) if x_bias is None else x_bias
        fn, outs = lstm_forward_mm, [*outs, hs_mm.steps, [bias] * T]
    outs_t = list(zip(*outs, strict=True))  # per step
    full = inductor.kernel(fn, _gemm_like(x_l[0], w_hh), x_l[0], c_in[0], *outs_t[0])
    if full is None:
        return None
    h_prev = previous(h0.to(w_hh.dtype).contiguous(), hs_mm.steps, rows)
    c_last = c0.new_empty((B, H))
    for t in range(T):
        step = full
        if rows is not None:
            done = ended(rows, t)
            if done:
                c_last[done[0] : done[1]] = c_slots[t][done[0] : done[1]]
            step = full if n[t] == B else fn
        gemm = lin(h_prev[t], None)  # (B, 4H) = h W_hh^T
        step(gemm, x_l[t], c_in[t], *outs_t[t])
    c_last[: n[-1]] = c_slots[T][: n[-1]]
    return hs, hs_mm.full, c_last, (acts, cs)


def gru_scan(
    xg: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, keep: bool, rows: Rows = None,
    x_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """The recurrence of :func:`~charlm.cells.equations.gru_step`.

    Args:
        xg: (T, B, 3H) = W_ih x_t + b_ih for every step (gate order r, z, n); b_ih may come
            apart, as ``x_bias``.
        h0: (B, H); w_hh: (3H, H); b_hh: (3H,) or None. b_hh stays out of ``xg`` because
            its n part sits inside the reset gate; the per-step GEMM adds it for free.
        keep: keep per-step activations for backward; rows: see the module docstring.

    Returns:
        (hs, hs_mm, saved): hs (T, B, H), hs_mm (hs in w_hh's dtype) and when ``keep`` (rz
        (T, B, 2H) activated r and z, n (T, B, H), hg_n (T, B, H) = W_hn h + b_hn).

    Runs :func:`gru_scan_compiled` where a compiled step kernel is available (a dense batch,
    see :func:`lstm_scan`), else the eager loop below; both save the same tensors.
    """
    T, B, G = xg.shape
    H = G // 3
    if rows is None and inductor.eligible(h0, B * H):
        found = gru_scan_compiled(xg, h0, w_hh, b_hh, keep, x_bias)
        if found is not None:
            return found
    xg = loop_input(xg, h0, x_bias)
    n_buf = T if keep else 1
    rz = empty((n_buf, B, 2 * H), xg)
    ns = empty((n_buf, B, H), xg)
    hgn = empty((T, B, H), xg) if keep else None
    hs = empty((T, B, H), xg)
    zero_finished(hs, rows)
    hs_mm = GemmCopy(hs, rows, w_hh)
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
    h0 = h0.contiguous()
    h_prev, h_prev_mm = previous(h0, h_l, rows), previous(h0.to(w_hh.dtype), hs_mm.steps, rows)
    for t in range(T):
        h = h_prev[t]
        hg_rz, hg_n = lin(h_prev_mm[t], b_hh).split(split, 1)  # (B, 2H), (B, H)
        if hgn_l is not None:
            hgn_l[t].copy_(hg_n)
        add(x_rz[t], hg_rz, out=rz_l[t])
        rz_l[t].sigmoid_()  # r, z
        n_t = n_l[t]
        addcmul(x_n[t], r_l[t], hg_n, out=n_t)
        tanh_(n_t, minus_one, out=n_t)  # n = tanh(x_n + r * hg_n)
        lerp(n_t, h, z_l[t], out=h_l[t])  # h' = n + z * (h - n) = (1 - z) n + z h
        hs_mm.take(t)
    return hs, hs_mm.full, ((rz, ns, hgn) if keep else None)  # type: ignore[return-value]


def gru_scan_compiled(
    xg: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, keep: bool,
    x_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None] | None:
    """:func:`gru_scan` of a dense batch with each step's pointwise part as one compiled
    kernel (:func:`.gru_step.gru_forward`, which equals ``gru_step`` after its GEMM); None
    when no kernel is available for this shape. With bf16 GEMMs the kernel also adds
    ``b_hh`` and ``x_bias`` in float32 and writes hs_mm (:func:`.gru_step.gru_forward_mm`)."""
    T, B, G = xg.shape
    H = G // 3
    hs = empty((T, B, H), h0)
    hs_mm = GemmCopy(hs, None, w_hh)
    if x_bias is not None and not hs_mm.copies:  # only the bf16 kernel adds it
        xg, x_bias = loop_input(xg, h0, x_bias), None
    n_buf = T if keep else 1
    rz = empty((n_buf, B, 2 * H), h0)
    ns, hgn = empty((n_buf, B, H), h0), empty((n_buf, B, H), h0)
    x_l, h_l = xg.unbind(0), hs.unbind(0)
    outs = [scratch_steps(b, None, T, keep) for b in (rz[:, :, :H], rz[:, :, H:], ns, hgn)]
    fn, gemm_bias = gru_forward, b_hh  # the GEMM adds b_hh ...
    outs.append(h_l)
    if hs_mm.copies:  # ... except a bf16 one: the kernel adds both biases in float32
        zeros = h0.new_zeros(G)
        biases = [x_bias if x_bias is not None else zeros, b_hh if b_hh is not None else zeros]
        fn, gemm_bias = gru_forward_mm, None
        outs += [hs_mm.steps, [biases[0]] * T, [biases[1]] * T]
    outs_t = list(zip(*outs, strict=True))  # per step
    h0 = h0.contiguous()
    step = inductor.kernel(fn, _gemm_like(x_l[0], w_hh), x_l[0], h0, *outs_t[0])
    if step is None:
        return None
    lin, _ = step_gemm_fns(w_hh, B, h0)
    h_prev = previous(h0, h_l, None)
    h_prev_mm = previous(h0.to(w_hh.dtype), hs_mm.steps, None)
    for t in range(T):
        step(lin(h_prev_mm[t], gemm_bias), x_l[t], h_prev[t], *outs_t[t])
    return hs, hs_mm.full, ((rz, ns, hgn) if keep else None)
