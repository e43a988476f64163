"""The gate equations: one time step of each cell, in plain autograd ops. THE spec.

A recurrent cell reads one input vector x_t and the state it carried from the previous step,
and returns the next state. A *gate* is a vector of numbers in (0, 1), computed by a sigmoid
from x_t and the previous h, that multiplies another vector element by element: a gate near
1 lets that element through, near 0 it blocks it. Gates are how the LSTM and GRU decide, per
unit and per step, what to keep, what to write and what to show, and this is why their
gradients survive over many more steps than a plain RNN's: a forget gate f near 1 passes
the cell state (and its gradient) on almost unchanged, where the plain RNN multiplies by
W_hh and squashes by tanh' at every step, so its gradient shrinks or blows up geometrically.

Every function here is one step for a batch: x (B, I), states (B, H). Each cell's weights
hold all gates stacked, in torch.nn's order and layout, so one matmul computes every gate
and ``chunk`` splits them (s = sigmoid, * = element-wise product):

    RNN   h' = tanh(W_ih x + b_ih + W_hh h + b_hh)              (or relu)
    LSTM  i, f, g, o = s(.), s(.), tanh(.), s(.)  of  W_ih x + b_ih + W_hh h + b_hh
          c' = f * c + i * g,   h' = o * tanh(c')              (h' = W_hr h' with proj_size)
    GRU   r, z = s(W_ir x + b_ir + W_hr h + b_hr), s(W_iz x + b_iz + W_hz h + b_hz)
          n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),   h' = (1 - z) * n + z * h

Everything else in ``charlm.cells`` (the cells, the layers, the fast paths in ``fused/``)
computes exactly these, and the tests hold it here and to torch.nn. This file imports torch
only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rnn_step", "lstm_gates", "lstm_step", "gru_gates", "gru_step", "min_g",
           "min_gru_gates", "min_gru_step", "min_lstm_gates", "min_lstm_step"]


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias (bias optional), for x of shape (B, in)."""
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
    """One Elman RNN step: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu.

    Args:
        x: input (B, I); h: previous hidden state (B, H).
        weight_ih, weight_hh: (H, I) and (H, H); bias_ih, bias_hh: (H,) each, or None.
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Returns:
        h' (B, H).
    """
    pre = _linear(x, weight_ih, bias_ih) + _linear(h, weight_hh, bias_hh)  # (B, H)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm_gates(
    x: Tensor,
    h: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The LSTM's gates (i, f, g, o), each (B, H), for input x (B, I) and hidden state h."""
    gates = _linear(x, weight_ih, bias_ih) + _linear(h, weight_hh, bias_hh)  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)


def lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step (gate order i, f, g, o, as torch.nn).

    - input gate:   i  = s(W_ii x + b_ii + W_hi h + b_hi)      how much new to write
    - forget gate:  f  = s(W_if x + b_if + W_hf h + b_hf)      how much of c to keep
    - candidate:    g  = tanh(W_ig x + b_ig + W_hg h + b_hg)   what to write
    - output gate:  o  = s(W_io x + b_io + W_ho h + b_ho)      how much of c to show
    - cell update:  c' = f * c + i * g
    - hidden state: h' = o * tanh(c'), then h' = W_hr h' when ``weight_hr`` is given
      (torch.nn's ``proj_size``: h has proj_size units, c keeps hidden_size)

    Args:
        x: input (B, I); h: previous hidden state (B, P); c: previous cell state (B, H),
            where P = H without a projection.
        weight_ih, weight_hh: (4H, I) and (4H, P); bias_ih, bias_hh: (4H,) or None;
        weight_hr: (P, H) or None.

    Returns:
        (h' (B, P), c' (B, H)).
    """
    i, f, g, o = lstm_gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    c_next = f * c + i * g
    h_next = o * torch.tanh(c_next)
    if weight_hr is not None:
        h_next = h_next @ weight_hr.t()  # (B, P)
    return h_next, c_next


def gru_gates(
    x: Tensor,
    h: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The GRU's reset gate r, update gate z and candidate n, each (B, H)."""
    gi = _linear(x, weight_ih, bias_ih)  # (B, 3H)
    gh = _linear(h, weight_hh, bias_hh)  # (B, 3H)
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    return r, z, torch.tanh(i_n + r * h_n)


def gru_step(
    x: Tensor,
    h: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> Tensor:
    """One GRU step (gate order r, z, n, as torch.nn).

    - reset gate:   r  = s(W_ir x + b_ir + W_hr h + b_hr)         how much of h the candidate sees
    - update gate:  z  = s(W_iz x + b_iz + W_hz h + b_hz)         how much of h to keep
    - candidate:    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    - hidden state: h' = (1 - z) * n + z * h

    The reset gate scales the whole recurrent projection *including* b_hn, as torch.nn and
    cuDNN do; this is why the two bias vectors cannot be merged for n.

    Args:
        x: input (B, I); h: previous hidden state (B, H).
        weight_ih, weight_hh: (3H, I) and (3H, H); bias_ih, bias_hh: (3H,) or None.

    Returns:
        h' (B, H).
    """
    r, z, n = gru_gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    return (1 - z) * n + z * h


# minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): the gates and the candidate
# see x_t only, never h_{t-1}, so h_t = a_t * h_{t-1} + b_t is linear in h and a whole sequence
# is one prefix scan (charlm.cells.fused.min_scan) instead of a loop over time.


def min_g(x: Tensor) -> Tensor:
    """The paper's g: x + 0.5 for x >= 0, sigmoid(x) below; positive, so h stays positive."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def min_gru_gates(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """minGRU's gate and candidate, from x alone (no h: why it scans in parallel):
    z = s(W_z x + b_z), h~ = g(W_h x + b_h). ``weight`` (2H, I) stacks [W_z; W_h]."""
    k, pre = _linear(x, weight, bias).chunk(2, dim=1)
    return torch.sigmoid(k), min_g(pre)


def min_gru_step(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """minGRU: h' = (1 - z) * h + z * h~, with z, h~ from :func:`min_gru_gates`."""
    z, h_tilde = min_gru_gates(x, weight, bias)
    return (1 - z) * h + z * h_tilde


def min_lstm_gates(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, ...]:
    """minLSTM's normalised gates and candidate, from x alone: f, i = s(W_f x + b_f),
    s(W_i x + b_i); f' = f / (f + i), i' = i / (f + i) (so f' + i' = 1); h~ = g(W_h x + b_h).
    ``weight`` (3H, I) stacks [W_f; W_i; W_h]."""
    f, i, pre = _linear(x, weight, bias).chunk(3, dim=1)
    f, i = torch.sigmoid(f), torch.sigmoid(i)
    return f / (f + i), i / (f + i), min_g(pre)


def min_lstm_step(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """minLSTM: h' = f' * h + i' * h~, with f', i', h~ from :func:`min_lstm_gates`."""
    f, i, h_tilde = min_lstm_gates(x, weight, bias)
    return f * h + i * h_tilde
