"""minGRU and minLSTM over a whole sequence as a parallel prefix scan: no loop over time.

Both cells are h_t = a_t * h_{t-1} + b_t with a_t in (0, 1) and b_t computed from x_t alone
(:func:`charlm.cells.equations.min_gru_step`, :func:`~charlm.cells.equations.min_lstm_step`,
which these must equal: tests/test_min_cells.py holds them there, outputs and gradients, and by
float64 gradcheck). Two scans compute it:

- :func:`log_space_scan`, the paper's (its appendix, Heinsen's scan): with a*_t =
  sum_{s <= t} log a_s, h_t = exp(a*_t) h_0 + exp(a*_t + logcumsumexp_s(log b_s - a*_s)),
  one cumsum and one logcumsumexp, chunk by chunk. The reference.
- :func:`linear_recurrence`, the one training uses: cyclic reduction in linear space. Pair
  the steps: h_{2i+1} = (a_{2i+1} a_{2i}) h_{2i-1} + (a_{2i+1} b_{2i} + b_{2i+1}) is the
  same recurrence over half as many steps; solve it (recursively), then each even step is
  one multiply-add from its odd neighbour. O(T) work in log2(T) rounds of whole-tensor
  ops. Every a is in (0, 1), so the products only shrink (to 0 at worst, which is the true
  limit) and nothing overflows: no logs are needed. On a CPU it is ~5x faster than the
  log-space scan, whose logcumsumexp is a scalar loop (~20 ns an element); its gradient is
  the same recurrence run backwards (:class:`Recurrence`), written by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..equations import min_g

CHUNK = 32  # log_space_scan's steps per chunk: |a*| (and rounding) grow with it, not with T


def linear_recurrence(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """h_t = a_t h_{t-1} + b_t over dim 0 from h_{-1} = 0, by cyclic reduction, into ``out``
    (a new tensor if None; any strided view works). a_0 is never used (it multiplies 0)."""
    out = torch.empty_like(b) if out is None else out
    T = a.shape[0]
    if T == 1:
        return out.copy_(b)
    n = T // 2  # pairs (2i, 2i+1); with T odd the last step is left over, an even one
    a_even, a_odd, b_even, b_odd = a[0::2], a[1::2], b[0::2], b[1::2]
    linear_recurrence(a_odd * a_even[:n], torch.addcmul(b_odd, a_odd, b_even[:n]), out[1::2])
    out[0::2] = b_even
    out[2::2].addcmul_(a_even[1:], out[1::2][: T - n - 1])  # h_2i = a_2i h_2i-1 + b_2i
    return out


class Recurrence(torch.autograd.Function):
    """h = linear_recurrence(a, b) from an initial state h0 (or zeros), with its backward:
    dL/dh_t collects g_t and a_{t+1} dL/dh_{t+1}, the same recurrence backwards in time;
    then dL/db_t = dL/dh_t, dL/da_t = dL/dh_t h_{t-1}, dL/dh0 = a_0 dL/dh_0."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
        if h0 is not None:
            b = b.clone()
            b[0].addcmul_(a[0], h0)  # h_0 = a_0 h0 + b_0
        h = linear_recurrence(a, b)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, g: Tensor):
        a, h, h0 = ctx.saved_tensors
        back = torch.empty_like(a)  # step s of the reversed recurrence is t = T-1-s: a_{t+1}
        back[0], back[1:] = 0, a[1:].flip(0)
        dh = linear_recurrence(back, g.flip(0)).flip(0)
        da = torch.empty_like(dh)
        torch.mul(dh[1:], h[:-1], out=da[1:])
        if h0 is None:
            da[0] = 0
            return da, dh, None
        torch.mul(dh[0], h0, out=da[0])
        return da, dh, a[0] * dh[0]


def min_gru_scan(pre: Tensor, h0: Tensor | None) -> Tensor:
    """minGRU over (T, B, 2H) projections [k; p] -> hs (T, B, H): z = s(k), a = 1 - z,
    b = z g(p)."""
    k, p = pre.chunk(2, dim=-1)
    z = torch.sigmoid(k)
    return Recurrence.apply(1 - z, z * min_g(p), h0)


def min_lstm_scan(pre: Tensor, h0: Tensor | None) -> Tensor:
    """minLSTM over (T, B, 3H) projections [f; i; p] -> hs (T, B, H): a = f / (f + i),
    b = i / (f + i) g(p), with f, i = s(f), s(i)."""
    f, i, p = pre.chunk(3, dim=-1)
    f, i = torch.sigmoid(f), torch.sigmoid(i)
    total = f + i
    return Recurrence.apply(f / total, i / total * min_g(p), h0)


# ---------------------------------------------------------------- the paper's log-space scan


def log_g(x: Tensor) -> Tensor:
    """log of :func:`charlm.cells.equations.min_g`, computed stably."""
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


def log_space_scan(log_a: Tensor, log_b: Tensor, h0: Tensor | None) -> Tensor:
    """h_t = a_t h_{t-1} + b_t for (T, B, H) log-coefficients, chunk by chunk. Within a chunk
    |a*| stays small, so float32 keeps its precision on long sequences; h0 enters outside
    the logs, so any initial state (zeros, a carried one) works."""
    outs = []
    h = h0
    for start in range(0, log_a.shape[0], CHUNK):
        la, lb = log_a[start : start + CHUNK], log_b[start : start + CHUNK]
        a_star = la.cumsum(0)  # (C, B, H)
        hs = (a_star + (lb - a_star).logcumsumexp(0)).exp()
        if h is not None:
            hs = hs + a_star.exp() * h
        outs.append(hs)
        h = hs[-1]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def min_gru_log_scan(pre: Tensor, h0: Tensor | None) -> Tensor:
    """:func:`min_gru_scan` in the paper's log space: log a = log(1 - z) = -softplus(k),
    log b = log z + log g(p) = -softplus(-k) + log g(p)."""
    k, p = pre.chunk(2, dim=-1)
    return log_space_scan(-F.softplus(k), -F.softplus(-k) + log_g(p), h0)


def min_lstm_log_scan(pre: Tensor, h0: Tensor | None) -> Tensor:
    """:func:`min_lstm_scan` in the paper's log space: with log f = -softplus(-f) and
    log i = -softplus(-i), log a = log f - log(f + i), log b = log i - log(f + i) + log g(p)."""
    f, i, p = pre.chunk(3, dim=-1)
    log_f, log_i = -F.softplus(-f), -F.softplus(-i)
    log_sum = torch.logaddexp(log_f, log_i)
    return log_space_scan(log_f - log_sum, log_i - log_sum + log_g(p), h0)
