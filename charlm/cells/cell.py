"""One time step as a module: ``RNNCell``, ``LSTMCell``, ``GRUCell``, and the argument checks
that the cells and the layers share.

Each cell is a drop-in twin of its torch.nn namesake (same constructor, parameter names,
shapes, initialisation and forward contract, so state dicts move both ways) whose forward is
one call of the step function in :mod:`charlm.cells.equations`, in plain autograd ops.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .equations import gru_step, lstm_step, rnn_step

__all__ = ["RNNCell", "LSTMCell", "GRUCell"]

NONLINEARITIES = ("tanh", "relu")


# --------------------------------------------------------------------------------------
# Argument checks: the exception types (and nearly the words) of torch.nn's own.
# --------------------------------------------------------------------------------------


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool, else TypeError (torch.nn's RNN layers accept no 0/1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    return value


def check_size(name: str, value: object) -> int:
    """``value`` if it is a positive int, else TypeError (not an int) or ValueError."""
    if not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")
    return int(value)


def check_dropout(dropout: object) -> float:
    """``dropout`` as a float if it is a number in [0, 1] (not a bool), else ValueError;
    TypeError where ``float()`` refuses it, as in torch.nn."""
    as_float = float(dropout)  # type: ignore[arg-type]
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, numbers.Real)
        or not 0 <= dropout <= 1
    ):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability "
            f"of an element being zeroed, got {dropout!r}"
        )
    return as_float


def check_proj_size(proj_size: object, hidden_size: int) -> int:
    """``proj_size`` if 0 <= proj_size < hidden_size, in torch.nn's order of checks."""
    if not isinstance(proj_size, numbers.Real) or isinstance(proj_size, complex):
        raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size has to be smaller than hidden_size, got {proj_size} >= {hidden_size}"
        )
    if proj_size != 0 and not isinstance(proj_size, int):
        raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
    return int(proj_size)


def check_cell_size(name: str, value: object) -> int:
    """A cell's size as torch.nn's cells take it: an int (TypeError otherwise), zero allowed
    (an empty cell), negative refused with torch's exception type (RuntimeError)."""
    if not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < 0:
        raise RuntimeError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_nonlinearity(nonlinearity: object) -> str:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return nonlinearity  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# The cells.
# --------------------------------------------------------------------------------------


class _CellBase(nn.Module):
    """Parameters, init and input handling shared by the three cells; ``_num_chunks`` gates
    stacked in each weight."""

    _num_chunks = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_chunks = self._num_chunks
        factory = {"device": device, "dtype": dtype}
        self.input_size = check_cell_size("input_size", input_size)
        self.hidden_size = check_cell_size("hidden_size", hidden_size)
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
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
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
        if input.dim() == 1:
            return input.unsqueeze(0), [h.unsqueeze(0) for h in hx], False
        return input, list(hx), True

    def _zeros(self, input: Tensor) -> Tensor:
        return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)


class RNNCell(_CellBase):
    """An Elman RNN cell: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu.

    Twin of ``torch.nn.RNNCell``: ``weight_ih`` (H, I), ``weight_hh`` (H, H), ``bias_ih`` and
    ``bias_hh`` (H,). See :func:`charlm.cells.equations.rnn_step`.
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
        # torch.nn.RNNCell accepts any nonlinearity here and refuses an unknown one in forward
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """h' (B, H) for input (B, I) and hx (B, H); unbatched (I,) -> (H,)."""
        if self.nonlinearity not in NONLINEARITIES:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        x, hs, is_batched = self._batched(input, [] if hx is None else [hx])
        h = hs[0] if hs else self._zeros(x)
        h_next = rnn_step(
            x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.nonlinearity
        )
        return h_next if is_batched else h_next.squeeze(0)


class LSTMCell(_CellBase):
    """A long short-term memory cell (gate order i, f, g, o):

    i = s(W_ii x + b_ii + W_hi h + b_hi)      input gate
    f = s(W_if x + b_if + W_hf h + b_hf)      forget gate
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)   candidate
    o = s(W_io x + b_io + W_ho h + b_ho)      output gate
    c' = f * c + i * g                         cell update
    h' = o * tanh(c')

    Twin of ``torch.nn.LSTMCell``: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias_ih``
    and ``bias_hh`` (4H,). See :func:`charlm.cells.equations.lstm_step`.
    """

    _num_chunks = 4

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(h', c'), each (B, H), for input (B, I); unbatched (I,) -> (H,) each."""
        x, hs, is_batched = self._batched(input, [] if hx is None else hx)
        h, c = hs if hs else (self._zeros(x), self._zeros(x))
        h_next, c_next = lstm_step(
            x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        )
        if not is_batched:
            return h_next.squeeze(0), c_next.squeeze(0)
        return h_next, c_next


class GRUCell(_CellBase):
    """A gated recurrent unit cell (gate order r, z, n):

    r = s(W_ir x + b_ir + W_hr h + b_hr)            reset gate
    z = s(W_iz x + b_iz + W_hz h + b_hz)            update gate
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   candidate
    h' = (1 - z) * n + z * h

    Twin of ``torch.nn.GRUCell``: ``weight_ih`` (3H, I), ``weight_hh`` (3H, H), ``bias_ih``
    and ``bias_hh`` (3H,). See :func:`charlm.cells.equations.gru_step`.
    """

    _num_chunks = 3

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """h' (B, H) for input (B, I) and hx (B, H); unbatched (I,) -> (H,)."""
        x, hs, is_batched = self._batched(input, [] if hx is None else [hx])
        h = hs[0] if hs else self._zeros(x)
        h_next = gru_step(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h_next if is_batched else h_next.squeeze(0)
