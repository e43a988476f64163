"""Hand-written recurrent cells and layers: charlm's drop-in twins of torch.nn's RNN family.

Read in this order:

1. :mod:`charlm.cells.equations` — the gate equations, one step in plain autograd ops: the
   spec (what a gate is, and why the LSTM's and GRU's gradients survive longer than the
   plain RNN's).
2. :mod:`charlm.cells.cell` — ``RNNCell``, ``LSTMCell``, ``GRUCell``: one step as a module.
3. :mod:`charlm.cells.layer` — ``RNN``, ``LSTM``, ``GRU``: whole sequences with torch.nn's
   contract (stacking, dropout, bidirectional, proj_size, PackedSequence, unbatched input).
4. :mod:`charlm.cells.minimal` — ``MinGRU``, ``MinLSTM`` (Feng et al. 2024): gates that see
   x_t only, so a sequence is one parallel scan.
5. :mod:`charlm.cells.fused` — speed only: the same math, fused and compiled; the tests hold
   it to the equations and to torch.nn.

Same constructor arguments, parameter names, shapes and initialisation as torch.nn, so a
state dict moves freely between the two; none of torch's recurrent modules or kernels is
used. ``CHARLM_COMPILE=0`` turns the compiled step kernels off.
"""

from .cell import GRUCell, LSTMCell, RNNCell
from .equations import gru_gates, gru_step, lstm_gates, lstm_step, rnn_step
from .layer import GRU, LSTM, RNN
from .minimal import MinGRU, MinLSTM

__all__ = [
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "RNN",
    "LSTM",
    "GRU",
    "MinGRU",
    "MinLSTM",
    "rnn_step",
    "lstm_step",
    "lstm_gates",
    "gru_step",
    "gru_gates",
]
