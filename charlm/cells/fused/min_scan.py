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
  the same recurrence run backwards (:func:`reverse_linear_recurrence`), written by hand.

:class:`MinScan` is a whole layer after its projection, forward and backward: one pointwise
pass for the coefficients a, b, the recurrence, and in the backward the reversed recurrence
and one pointwise pass for the projection's gradient. The passes are plain torch-ops
functions that :mod:`.inductor` compiles into one loop each where it can (eager otherwise;
eager, each pass is about ten whole-tensor ops, ~8x slower); the buffers are recycled
(:mod:`.workspace`) and follow the projection's layout (batch-major for batch_first layers,
so nothing is transposed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..equations import min_g
from . import inductor, workspace

CHUNK = 32  # log_space_scan's steps per chunk: |a*| (and rounding) grow with it, not with T


def linear_recurrence(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t over dim 0 from h_{-1} = 0, by cyclic reduction, into ``out``
    (any strided view). a_0 is never used (it multiplies 0)."""
    T = a.shape[0]
    if T == 1:
        return out.copy_(b)
    n = T // 2  # pairs (2i, 2i+1); with T odd the last step is left over, an even one
    a_even, a_odd, b_even, b_odd = a[0::2], a[1::2], b[0::2], b[1::2]
    linear_recurrence(a_odd * a_even[:n], torch.addcmul(b_odd, a_odd, b_even[:n]), out[1::2])
    out[0] = b[0]
    m = T - n - 1  # h_2i = a_2i h_2i-1 + b_2i for the even steps after the first
    torch.addcmul(b_even[1:], a_even[1:], out[1::2][:m], out=out[2::2])
    return out


def reverse_linear_recurrence(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """d_t = a_{t+1} d_{t+1} + b_t over dim 0, backwards in time from d_T = 0, into ``out``:
    :func:`linear_recurrence` run the other way (a backward pass), without flipped copies.
    Pairs from the end: the leaders l = T-2, T-4, ... satisfy
    d_l = (a_{l+1} a_{l+2}) d_{l+2} + (b_l + a_{l+1} b_{l+1}), a recurrence of the same kind
    over half the steps; then each follower is d_{l+1} = a_{l+2} d_{l+2} + b_{l+1}."""
    T = a.shape[0]
    if T == 1:
        return out.copy_(b)
    n, s = T // 2, T % 2  # n leaders at s, s+2, ..., T-2; with T odd, step 0 is left over
    a_lead, a_next = a[s::2], a[s + 1 :: 2]  # a at the leaders, and one step after each
    coef = torch.empty_like(a[:n])  # coef_k links leader k-1 to leader k; coef_0 unused
    coef[0] = 0
    torch.mul(a_next[: n - 1], a_lead[1:n], out=coef[1:])
    reverse_linear_recurrence(coef, torch.addcmul(b[s::2][:n], a_next[:n], b[s + 1 :: 2][:n]),
                              out[s::2])
    out[T - 1] = b[T - 1]
    torch.addcmul(b[s + 1 :: 2][: n - 1], a_lead[1:n], out[s::2][1:n], out=out[s + 1 :: 2][: n - 1])
    if s:
        torch.addcmul(b[0], a[1], out[1], out=out[0])
    return out


# The pointwise parts of a min-cell scan, before and after the recurrence: plain torch ops
# writing into their outputs, so that Inductor can compile each into one pass (as the LSTM
# step's, fused/lstm_step.py). ``pre`` is the layer's projection [k; p] (minGRU) or [f; i; p]
# (minLSTM), in bf16 under autocast, computed in float32 (the dtype of a). The forward ones
# must equal equations.min_gru_step / min_lstm_step as h_t = a_t h_{t-1} + b_t, the backward
# ones autograd's gradient of them (tests/test_min_cells.py holds them there).


def _g_and_slope(p: Tensor) -> tuple[Tensor, Tensor]:
    """min_g(p) and its derivative: 1 for p >= 0, else s'(p) = s(p) (1 - s(p))."""
    s = torch.sigmoid(p)
    return torch.where(p >= 0, p + 0.5, s), torch.where(p >= 0, 1.0, s * (1 - s))


def min_gru_coefficients(pre: Tensor, a: Tensor, b: Tensor) -> None:
    """z = s(k), a = 1 - z, b = z g(p)."""
    H = a.shape[-1]
    pre = pre.to(a.dtype)
    z = torch.sigmoid(pre[..., :H])
    a.copy_(1 - z)
    b.copy_(z * min_g(pre[..., H:]))


def min_gru_gradients(pre: Tensor, dh: Tensor, h_prev: Tensor, dk: Tensor, dp: Tensor) -> None:
    """From dL/dh_t (all paths) and h_{t-1}: h_t = h_{t-1} + z (g - h_{t-1}), so
    dL/dk = dh (g - h_{t-1}) z (1 - z) and dL/dp = dh z g'(p)."""
    H = dh.shape[-1]
    pre = pre.to(dh.dtype)
    z = torch.sigmoid(pre[..., :H])
    g, slope = _g_and_slope(pre[..., H:])
    dk.copy_(dh * (g - h_prev) * z * (1 - z))
    dp.copy_(dh * z * slope)


def min_lstm_coefficients(pre: Tensor, a: Tensor, b: Tensor) -> None:
    """f, i = s(f), s(i); a = f / (f + i), b = i / (f + i) g(p) = (1 - a) g(p)."""
    H = a.shape[-1]
    pre = pre.to(a.dtype)
    f, i = torch.sigmoid(pre[..., :H]), torch.sigmoid(pre[..., H : 2 * H])
    f_norm = f / (f + i)
    a.copy_(f_norm)
    b.copy_((1 - f_norm) * min_g(pre[..., 2 * H :]))


def min_lstm_gradients(pre: Tensor, dh: Tensor, h_prev: Tensor, df: Tensor, di: Tensor,
                       dp: Tensor) -> None:
    """h_t = a h_{t-1} + (1 - a) g with a = f / (f + i): dL/da = dh (h_{t-1} - g), and
    da/df = a (1 - a) (1 - f), da/di = -a (1 - a) (1 - i) (f, i after the sigmoid);
    dL/dp = dh (1 - a) g'(p)."""
    H = dh.shape[-1]
    pre = pre.to(dh.dtype)
    f, i = torch.sigmoid(pre[..., :H]), torch.sigmoid(pre[..., H : 2 * H])
    a = f / (f + i)
    g, slope = _g_and_slope(pre[..., 2 * H :])
    da = dh * (h_prev - g) * a * (1 - a)
    df.copy_(da * (1 - f))
    di.copy_(-da * (1 - i))
    dp.copy_(dh * (1 - a) * slope)


def _run(fn, *args: Tensor) -> None:
    """fn(*args) as one compiled kernel where :mod:`.inductor` gives one, else eagerly."""
    compiled = inductor.kernel(fn, *args, state=args[1][0])  # a or dh: float32
    (compiled or fn)(*args)


def _like(t: Tensor, size: int, steps: int | None = None, dtype=None) -> Tensor:
    """A (steps, B, size) buffer (recycled: :mod:`.workspace`) laid out like t (T, B, *):
    time-major, or a (T, B) view of batch-major memory when t is one (a batch_first
    layer's projection)."""
    T, B = t.shape[:2]
    steps = T if steps is None else steps
    like = t if dtype is None else t.new_empty((), dtype=dtype)
    if t.stride(0) < t.stride(1):  # batch-major
        return workspace.empty((B, steps, size), like).transpose(0, 1)
    return workspace.empty((steps, B, size), like)


class MinScan(torch.autograd.Function):
    """A min-cell layer after its projection: pre (T, B, k H) -> h (T, B, H), from h0 or
    zeros. Forward: the coefficients a, b (one pass), then h_t = a_t h_{t-1} + b_t by
    :func:`linear_recurrence`. Backward: dL/dh_t = g_t + a_{t+1} dL/dh_{t+1}
    (:func:`reverse_linear_recurrence`), then dL/dpre (one pass) and dL/dh0 = a_0 dL/dh_0."""

    @staticmethod
    def forward(ctx, pre: Tensor, h0: Tensor | None, coefficients, gradients) -> Tensor:
        H = pre.shape[-1] // (3 if coefficients is min_lstm_coefficients else 2)
        dtype = torch.promote_types(pre.dtype, torch.float32)  # the scan: float32 at least
        a, b = _like(pre, H, dtype=dtype), _like(pre, H, dtype=dtype)
        _run(coefficients, pre, a, b)
        # h_prev: h0 (or zeros), then h_0 .. h_{T-1}; h is its view from step 1
        h_prev = _like(pre, H, pre.shape[0] + 1, dtype=dtype)
        if h0 is None:
            h_prev[0] = 0
        else:
            h_prev[0] = h0
            b[0].addcmul_(a[0], h0)  # h_0 = a_0 h0 + b_0
        h = linear_recurrence(a, b, h_prev[1:])
        ctx.gradients = gradients
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(pre, a, h_prev)
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, a, h_prev = ctx.saved_tensors
        dh = reverse_linear_recurrence(a, grad, _like(a, a.shape[-1]))
        dpre = _like(pre, pre.shape[-1])
        H = a.shape[-1]
        _run(ctx.gradients, pre, dh, h_prev[:-1], *dpre.split(H, dim=-1))
        dh0 = a[0] * dh[0] if ctx.has_h0 else None
        return dpre, dh0, None, None


def min_gru_scan(pre: Tensor, h0: Tensor | None) -> Tensor:
    """minGRU over (T, B, 2H) projections [k; p] -> hs (T, B, H): z = s(k), a = 1 - z,
    b = z g(p)."""
    return MinScan.apply(pre, h0, min_gru_coefficients, min_gru_gradients)


def min_lstm_scan(pre: Tensor, h0: Tensor | None) -> Tensor:
    """minLSTM over (T, B, 3H) projections [f; i; p] -> hs (T, B, H): a = f / (f + i),
    b = i / (f + i) g(p), with f, i = s(f), s(i)."""
    return MinScan.apply(pre, h0, min_lstm_coefficients, min_lstm_gradients)


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
