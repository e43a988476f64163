"""Whole sequences: ``RNN``, ``LSTM`` and ``GRU``, drop-in twins of torch.nn's layers.

A layer owns its parameters and torch.nn's whole recurrent contract: constructor arguments
and their checks, parameter names, shapes and init order (so state dicts move both ways),
input and state shapes (batch_first, unbatched input), stacked layers with dropout between
them, ``bidirectional`` (a ``_reverse`` set of weights runs over the reversed sequence;
outputs concatenated, states laid out as (num_layers * 2, B, H)), the LSTM's ``proj_size``,
and ``PackedSequence`` input and output. Per layer and direction it runs either the plain
autograd loop over the step functions of :mod:`charlm.cells.equations` (``fused=False``,
the readable reference) or the fast path in :mod:`charlm.cells.fused` (``fused=True``, the
default), which computes the same equations; one character at a time without gradients
(sampling) takes :class:`charlm.cells.fused.Sampler`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import fused as fast
from .cell import check_bool, check_dropout, check_nonlinearity, check_proj_size, check_size
from .equations import gru_step, lstm_step, rnn_step
from .fused import sampling

__all__ = ["RNN", "LSTM", "GRU"]

Rows = list[int] | None


class _Layer(nn.Module):
    """Parameters, argument checks, shapes, directions and stacking shared by RNN, LSTM, GRU."""

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
        # torch.nn's checks, in its order, with its exception types.
        self.dropout = check_dropout(dropout)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        self.bias = check_bool("bias", bias)
        self.batch_first = check_bool("batch_first", batch_first)
        self.input_size = check_size("input_size", input_size)
        self.hidden_size = check_size("hidden_size", hidden_size)
        self.num_layers = check_size("num_layers", num_layers)
        self.proj_size = check_proj_size(proj_size, hidden_size)
        self.mode = mode
        self.bidirectional = bool(bidirectional)
        # fused=True: the fast sequence paths; False: the plain autograd loop over the step
        # functions (the readable reference path). May be flipped after construction.
        self.fused = bool(fused)

        factory = {"device": device, "dtype": dtype}
        G = self._num_chunks * hidden_size
        out_size = self.proj_size or hidden_size  # the size of h
        D = 2 if self.bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []  # per (layer, direction), torch.nn's order
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else out_size * D
            for direction in range(D):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = {f"weight_ih{sfx}": (G, in_size), f"weight_hh{sfx}": (G, out_size)}
                if bias:
                    shapes |= {f"bias_ih{sfx}": (G,), f"bias_hh{sfx}": (G,)}
                if self.proj_size:
                    shapes[f"weight_hr{sfx}"] = (self.proj_size, hidden_size)
                # Same registration order as torch.nn: the same seed gives the same init.
                for name, shape in shapes.items():
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                self._flat_weights_names.extend(shapes)
                self._all_weights.append(list(shapes))
        self._sampler = self._make_sampler()
        self.reset_parameters()

    # ----------------------------------------------------------------- module plumbing

    def _make_sampler(self) -> sampling.Sampler:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(H), 1/sqrt(H)), as torch.nn does."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def train(self, mode: bool = True) -> _Layer:
        """Switch train/eval mode; also forgets the sampling path's cached weight copies
        (``model.eval()`` before sampling is the moment weights stop changing)."""
        self.clear_caches()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .double(), ...: new weight data
        self.clear_caches()
        return super()._apply(fn, recurse)

    def clear_caches(self) -> None:
        """Forget the copies of the weights that the one-step (sampling) path caches.

        They are rebuilt when a parameter's version, identity or storage changes, after any
        forward pass with gradients, and on ``train()``/``eval()``. Call this after
        changing weights in ways torch does not track (writes through ``param.data``).
        """
        if "_sampler" in self.__dict__:
            self._sampler.clear()

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for torch.nn (cuDNN weight packing) runs unchanged."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer and direction, its parameters in torch.nn's order."""
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        if not self.fused:
            s += ", fused=False"
        return s

    def _params(self, index: int) -> list[Tensor | None]:
        """[w_ih, w_hh, b_ih, b_hh, w_hr] of one layer and direction (None where absent)."""
        # Read through _parameters (not getattr) to keep per-call overhead low for sampling,
        # while still seeing parameters swapped in by load_state_dict or functional_call.
        table = self._parameters
        names = self._all_weights[index]
        w_ih, w_hh = table[names[0]], table[names[1]]
        b_ih, b_hh = (table[names[2]], table[names[3]]) if self.bias else (None, None)
        w_hr = table[names[-1]] if self.proj_size else None
        return [w_ih, w_hh, b_ih, b_hh, w_hr]

    # ------------------------------------------------------------------- one layer

    # Subclasses run one layer in one direction over a (T, B, I) input; ``states`` are
    # (B, H) tensors (h, or h and c). Returns (hs (T, B, H), final states of each row).
    def _layer(
        self, x: Tensor, states: list[Tensor], params: list, grad: bool, rows: Rows
    ) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    @staticmethod
    def _loop(
        step: Callable[..., Tensor | tuple[Tensor, Tensor]],
        x: Tensor,
        states: list[Tensor],
        args: Sequence[object],
        rows: Rows,
    ) -> tuple[Tensor, list[Tensor]]:
        """The readable path: plain autograd, one step function call per time step. In a
        packed batch only the first ``rows[t]`` rows step; the others keep their state."""
        outs = []
        B = x.shape[1]
        for t, x_t in enumerate(x.unbind(0)):
            b = B if rows is None else rows[t]
            res = step(x_t[:b], *(s[:b] for s in states), *args)
            new = list(res) if isinstance(res, tuple) else [res]
            if b < B:
                outs.append(torch.cat((new[0], new[0].new_zeros((B - b, new[0].shape[1])))))
                new = [torch.cat((n, s[b:])) for n, s in zip(new, states, strict=True)]
            else:
                outs.append(new[0])
            states = new
        return torch.stack(outs), states  # (T, B, H)

    # --------------------------------------------------------------------- forward

    def _run(
        self, input: Tensor | PackedSequence, hx: Sequence[Tensor] | None, n_states: int
    ) -> tuple[Tensor | PackedSequence, list[Tensor]]:
        """Shared forward: input and state shapes, the stack of layers and directions."""
        if torch.compiler.is_compiling():
            return self._run_uncompiled(input, hx, n_states)
        return self._run_eager(input, hx, n_states)

    # torch.compile of a model around these layers (train.compile) leaves them out: their
    # recurrence is fused already, and Inductor cannot lower the oneDNN op they call. Only
    # the traced call goes through the disabling wrapper: it costs ~10 us a call, a sixth
    # of a sampled character's layer step.
    @torch.compiler.disable
    def _run_uncompiled(self, input, hx, n_states):
        return self._run_eager(input, hx, n_states)

    def _run_eager(
        self, input: Tensor | PackedSequence, hx: Sequence[Tensor] | None, n_states: int
    ) -> tuple[Tensor | PackedSequence, list[Tensor]]:
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        rows: Rows = None
        if packed:
            data, batch_sizes, sorted_idx, unsorted_idx = input
            if data.dim() != 2:
                raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
            rows = [int(b) for b in batch_sizes]
            T, B = len(rows), rows[0]
            is_batched, time_dim = True, 0
            x_in = data
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor"
                )
            is_batched = input.dim() == 3
            # Batched input is (T, B, I), or (B, T, I) with batch_first; unbatched is (T, I).
            time_dim = 1 if is_batched and self.batch_first else 0
            T = input.shape[time_dim]
            B = input.shape[1 - time_dim] if is_batched else 1
            x_in = input
        if x_in.shape[-1] != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {x_in.shape[-1]}"
            )
        w_dtype = self._parameters["weight_ih_l0"].dtype
        if x_in.dtype != w_dtype and not torch.is_autocast_enabled(x_in.device.type):
            raise ValueError(
                f"{name} input dtype ({x_in.dtype}) does not match weight dtype ({w_dtype})"
            )
        D = 2 if self.bidirectional else 1
        LD = self.num_layers * D
        sizes = [self.proj_size or self.hidden_size, self.hidden_size][:n_states]
        states = self._initial_states(x_in, hx, is_batched, (LD, B), sizes)
        if packed and hx is not None and sorted_idx is not None:
            states = [s.index_select(1, sorted_idx) for s in states]
        if T == 0:
            raise RuntimeError(f"{name}: input sequence must have at least one time step")

        grad = torch.is_grad_enabled() and (
            x_in.requires_grad
            or any(s.requires_grad for s in states)
            or any(p.requires_grad for p in self.parameters())
        )
        dropout = self.dropout if self.training else 0.0
        if grad:
            # Weights may change after this (an optimizer step; fused ones do not bump the
            # parameters' versions), so the sampling path rebuilds its cached copies.
            self._sampler.forget_weights()
        if T == 1 and not grad and self.fused and D == 1 and not self.proj_size and not packed:
            # Sampling: one step of every layer on (B, I) directly, no sequence machinery.
            x = input.select(time_dim, 0) if is_batched else input  # (B, I); unbatched (1, I)
            x, out_states = self._one_step(x, states, dropout)
            x = x.clone()  # the output must not alias h_n (torch.nn returns separate tensors)
            out = x.unsqueeze(time_dim) if is_batched else x
        else:
            if packed:
                pad_index = _pad_index(rows, B, data.device)
                x = data.new_zeros((T * B, data.shape[1])).index_copy(0, pad_index, data)
                x = x.view(T, B, -1)
            else:
                x = input.transpose(0, 1) if time_dim else input
                if not is_batched:
                    x = x.unsqueeze(1)  # (T, 1, I)
            x, out_states = self._stack(x, states, grad, dropout, rows)
            if packed:
                flat = x.reshape(T * B, -1).index_select(0, pad_index)
                out = PackedSequence(flat, batch_sizes, sorted_idx, unsorted_idx)
            elif not is_batched:
                out = x.squeeze(1)
            else:
                out = x.transpose(0, 1) if time_dim else x
        if packed and unsorted_idx is not None:
            out_states = [s.index_select(1, unsorted_idx) for s in out_states]
        if not is_batched:
            out_states = [s.squeeze(1) for s in out_states]
        return out, out_states

    def _initial_states(
        self,
        x: Tensor,
        hx: Sequence[Tensor] | None,
        is_batched: bool,
        lead: tuple[int, int],
        sizes: list[int],
    ) -> list[Tensor]:
        """hx as (L*D, B, size) tensors, checked as torch.nn checks them, or zeros."""
        if hx is None:
            return [x.new_zeros((*lead, size)) for size in sizes]
        states = list(hx)
        want = 3 if is_batched else 2
        for k, (h, size) in enumerate(zip(states, sizes, strict=True)):
            if h.dim() != want:
                raise RuntimeError(
                    f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, "
                    f"hx should also be {want}-D but got {h.dim()}-D tensor"
                )
            if not is_batched:
                states[k] = h = h.unsqueeze(1)
            expected = (*lead, size)
            if tuple(h.shape) != expected:
                which = f"[{k}]" if len(sizes) > 1 else ""
                raise RuntimeError(f"Expected hidden{which} size {expected}, got {list(h.shape)}")
        return states

    def _stack(
        self, x: Tensor, states: list[Tensor], grad: bool, dropout: float, rows: Rows
    ) -> tuple[Tensor, list[Tensor]]:
        """Every layer and direction over x (T, B, I) -> (output (T, B, D*H), final states
        (L*D, B, H) each)."""
        D = 2 if self.bidirectional else 1
        per_index = [s.unbind(0) for s in states]  # per state: a (B, H) view per layer/dir
        finals: list[list[Tensor]] = []
        reverse = None
        for layer in range(self.num_layers):
            outs = []
            for direction in range(D):
                index = layer * D + direction
                st = [p[index] for p in per_index]
                if direction == 0:
                    hs, fin = self._layer(x, st, self._params(index), grad, rows)
                else:
                    if reverse is None:
                        reverse = _reverser(x.shape[0], x.shape[1], rows, x.device)
                    hs, fin = self._layer(reverse(x), st, self._params(index), grad, rows)
                    hs = reverse(hs)
                outs.append(hs)
                finals.append(fin)
            x = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if layer < self.num_layers - 1 and dropout > 0:
                x = F.dropout(x, dropout, training=True)
        n_states = len(states)
        return x, [torch.stack([fin[k] for fin in finals]) for k in range(n_states)]

    def _one_step(
        self, x: Tensor, states: list[Tensor], dropout: float, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Every layer for one time step without autograd: x (B, I), states (L, B, H)."""
        dev = x.device.type
        # Under any autocast one step runs in float32: batch-1 bf16 products are slower
        # (measured; charlm/cells/fused/precision.py).
        if torch.is_autocast_enabled(dev):
            ctx, (x, *states) = fast.float32_region(dev, x, *states)
            with ctx:
                return self._one_step(x, states, dropout, torch.float32)
        dtype = dtype or self._parameters["weight_hh_l0"].dtype
        return self._sampler.step_all(
            tuple(p for p in self._parameters.values() if p is not None),
            self._sampling_params, x, states, dropout, dtype,
        )

    def _sampling_params(self) -> list[list[Tensor | None]]:
        """Per layer [w_ih, w_hh, b_ih, b_hh], for :meth:`Sampler.step_all`."""
        return [self._params(layer)[:4] for layer in range(self.num_layers)]


def _pad_index(rows: list[int], B: int, device: torch.device) -> Tensor:
    """For each row of a packed batch's data, its place in the padded (T * B) layout."""
    return torch.cat([torch.arange(b, device=device) + t * B for t, b in enumerate(rows)])


def _reverser(T: int, B: int, rows: Rows, device: torch.device) -> Callable[[Tensor], Tensor]:
    """A function that reverses (T, B, X) in time, each sequence within its own length."""
    if rows is None:
        return lambda t: t.flip(0)
    lengths = fast.lengths(rows, device)
    steps = torch.arange(T, device=device).unsqueeze(1)  # (T, 1)
    source = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (T, B)
    index = (source * B + torch.arange(B, device=device)).reshape(-1)
    return lambda t: t.reshape(T * B, -1).index_select(0, index).view(T, B, -1)


class RNN(_Layer):
    """Multi-layer Elman RNN: per layer and step, h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    Twin of ``torch.nn.RNN`` (argument order included: ``nonlinearity`` is the 4th
    positional argument, as in torch). ``forward(input, hx=None)`` takes input (T, B, I),
    (B, T, I) if ``batch_first``, unbatched (T, I) or a PackedSequence, and hx
    (num_layers * D, B, H) (D = 2 if bidirectional), and returns (output, h_n) shaped as
    torch.nn.RNN's. ``fused=False`` selects the plain autograd loop.
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
        proj_size: None = None,
        fused: bool = True,
    ) -> None:
        if proj_size is not None:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        self.nonlinearity = check_nonlinearity(nonlinearity)
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(
            mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, 0, device, dtype, fused,
        )  # fmt: skip

    def forward(self, input, hx: Tensor | None = None):
        """Run the sequence; returns (output, h_n) shaped as torch.nn.RNN's."""
        out, (h_n,) = self._run(input, None if hx is None else (hx,), 1)
        return out, h_n

    def _make_sampler(self) -> sampling.Sampler:
        relu = self.nonlinearity == "relu"

        def step(views, states, out):
            sampling.rnn_step_inference(views, *states, *out, relu=relu)

        return sampling.Sampler(sampling.rnn_views, step, fold_biases=True)

    def _layer(self, x, states, params, grad, rows):
        w_ih, w_hh, b_ih, b_hh, _ = params
        if not self.fused:
            args = (w_ih, w_hh, b_ih, b_hh, self.nonlinearity)
            return self._loop(rnn_step, x, states, args, rows)
        relu = self.nonlinearity == "relu"
        return fast.rnn(x, states[0], w_ih, w_hh, b_ih, b_hh, relu, grad, rows)


class LSTM(_Layer):
    """Multi-layer LSTM; per layer and step the equations of :class:`~charlm.cells.LSTMCell`
    (with ``proj_size`` > 0, h_t = W_hr (o_t tanh(c_t)) has ``proj_size`` units).

    Twin of ``torch.nn.LSTM``. ``forward(input, hx=None)`` takes input (T, B, I), (B, T, I)
    if ``batch_first``, unbatched (T, I) or a PackedSequence, and hx = (h_0, c_0) of
    (num_layers * D, B, P) and (num_layers * D, B, H) (D = 2 if bidirectional, P =
    proj_size or H), and returns (output, (h_n, c_n)) shaped as torch.nn.LSTM's.
    ``fused=False`` selects the plain autograd loop.
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
            "LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, proj_size, device, dtype, fused,
        )  # fmt: skip

    def forward(self, input, hx: tuple[Tensor, Tensor] | None = None):
        """Run the sequence; returns (output, (h_n, c_n)) shaped as torch.nn.LSTM's."""
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise RuntimeError("LSTM: hx must be a tuple (h_0, c_0) of two tensors")
        out, (h_n, c_n) = self._run(input, hx, 2)
        return out, (h_n, c_n)

    def _make_sampler(self) -> sampling.Sampler:
        def step(views, states, out):
            sampling.lstm_step_inference(views, *states, *out)

        return sampling.Sampler(sampling.lstm_views, step, fold_biases=True)

    def _layer(self, x, states, params, grad, rows):
        w_ih, w_hh, b_ih, b_hh, w_hr = params
        if not self.fused:
            return self._loop(lstm_step, x, states, (w_ih, w_hh, b_ih, b_hh, w_hr), rows)
        return fast.lstm(x, *states, w_ih, w_hh, b_ih, b_hh, w_hr, grad, rows)


class GRU(_Layer):
    """Multi-layer GRU; per layer and step the equations of :class:`~charlm.cells.GRUCell`.

    Twin of ``torch.nn.GRU``. ``forward(input, hx=None)`` takes input (T, B, I), (B, T, I)
    if ``batch_first``, unbatched (T, I) or a PackedSequence, and hx (num_layers * D, B, H)
    (D = 2 if bidirectional), and returns (output, h_n) shaped as torch.nn.GRU's.
    ``fused=False`` selects the plain autograd loop.
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
        proj_size: None = None,
        fused: bool = True,
    ) -> None:
        if proj_size is not None:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__(
            "GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, 0, device, dtype, fused,
        )  # fmt: skip

    def forward(self, input, hx: Tensor | None = None):
        """Run the sequence; returns (output, h_n) shaped as torch.nn.GRU's."""
        out, (h_n,) = self._run(input, None if hx is None else (hx,), 1)
        return out, h_n

    def _make_sampler(self) -> sampling.Sampler:
        def step(views, states, out):
            sampling.gru_step_inference(views, *states, *out)

        # GRU keeps b_hh with the recurrent product (its n part sits inside the reset gate).
        return sampling.Sampler(sampling.gru_views, step, fold_biases=False)

    def _layer(self, x, states, params, grad, rows):
        w_ih, w_hh, b_ih, b_hh, _ = params
        if not self.fused:
            return self._loop(gru_step, x, states, (w_ih, w_hh, b_ih, b_hh), rows)
        return fast.gru(x, states[0], w_ih, w_hh, b_ih, b_hh, grad, rows)
