"""minGRU and minLSTM over a whole sequence as a parallel prefix scan, in log space.

Both cells are h_t = a_t * h_{t-1} + b_t with a_t, b_t > 0 computed from x_t alone
(:func:`charlm.cells.equations.min_gru_step`, :func:`~charlm.cells.equations.min_lstm_step`,
which these must equal: tests/test_min_cells.py holds them there, outputs and gradients, and by
float64 gradcheck). Unrolled, h_t = A_t h_0 + sum_{s <= t} (A_t / A_s) b_s with
A_t = a_1 ... a_t, and in logs, with a*_t = sum_{s <= t} log a_s:

    h_t = exp(a*_t) h_0 + exp(a*_t + logcumsumexp_s(log b_s - a*_s))

(the paper's appendix, Heinsen's scan), computed with cumsum and logcumsumexp: no Python loop
over time steps. h_0 enters outside the logs, so any initial state (zeros, a carried one)
works. The sequence is cut into chunks of :data:`CHUNK` steps, each carrying its last state into
the next: within a chunk |a*| stays small, so float32 keeps its precision on long sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 32  # steps per scan chunk: log-space magnitudes (and rounding) grow with it, not with T


def log_g(x: Tensor) -> Tensor:
    """log of :func:`charlm.cells.equations.min_g`, computed stably."""
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


def _scan(log_a: Tensor, log_b: Tensor, h0: Tensor | None) -> Tensor:
    """h_t = a_t h_{t-1} + b_t for (T, B, H) log-coefficients, chunk by chunk."""
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


def min_gru_scan(pre: Tensor, h0: Tensor | None) -> Tensor:
    """minGRU over (T, B, 2H) projections [k; p] (z = s(k), h~ = g(p)) -> hs (T, B, H):
    log a = log(1 - z) = -softplus(k), log b = log z + log g(p) = -softplus(-k) + log g(p)."""
    k, p = pre.chunk(2, dim=-1)
    return _scan(-F.softplus(k), -F.softplus(-k) + log_g(p), h0)


def min_lstm_scan(pre: Tensor, h0: Tensor | None) -> Tensor:
    """minLSTM over (T, B, 3H) projections [f; i; p] -> hs (T, B, H): with log f = -softplus(-f)
    and log i = -softplus(-i), log a = log f - log(f + i), log b = log i - log(f + i) + log g(p)."""
    f, i, p = pre.chunk(3, dim=-1)
    log_f, log_i = -F.softplus(-f), -F.softplus(-i)
    log_sum = torch.logaddexp(log_f, log_i)
    return _scan(log_f - log_sum, log_i - log_sum + log_g(p), h0)
