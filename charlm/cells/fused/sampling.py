"""One time step of every layer without autograd: the sampling path.

Sampling calls a layer once per character with batch 1, so the number of tensor ops and their
fixed costs are what count. Each step function here computes the same equation as its
namesake in :mod:`charlm.cells.equations` (held there by tests/test_cells.py::
test_one_step_path_matches_torch and the sampling tests) on views of scratch buffers:

- the layer's input projection ``gi`` and recurrent product ``rec`` ((B, G), biases
  included; for RNN and LSTM ``gi`` is computed onto ``rec``, so it holds the whole
  pre-activation) go into buffers made once per thread and shape, and the step works on
  views of them sliced once (a slice costs about as much as the arithmetic on it here);
- the recurrent products of all layers depend only on the states the step starts with, so
  one batched GEMM (``baddbmm``) computes them all, on every core;
- weights enter transposed, (K, G), cached until a parameter changes.

:class:`Sampler` owns the cached weights and the scratch buffers; a layer holds one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import Tensor

_version = attrgetter("_version")  # a tensor's in-place modification counter


def rnn_views(gi: Tensor, rec: Tensor) -> tuple[Tensor, ...]:
    return (gi,)


def rnn_step_inference(views: tuple[Tensor, ...], h: Tensor, h_out: Tensor, relu: bool) -> None:
    """h' = act(pre) into ``h_out``; ``gi`` holds pre = x W_ih^T + h W_hh^T + biases."""
    (pre,) = views
    torch.clamp_min(pre, 0.0, out=h_out) if relu else torch.tanh(pre, out=h_out)


def lstm_views(gi: Tensor, rec: Tensor) -> tuple[Tensor, ...]:
    H = gi.shape[-1] // 4
    i, f, g, o = (gi[:, k * H : (k + 1) * H] for k in range(4))
    return gi[:, : 2 * H], i, f, g, o


def lstm_step_inference(
    views: tuple[Tensor, ...], h: Tensor, c: Tensor, h_out: Tensor, c_out: Tensor
) -> None:
    """One LSTM step into ``h_out`` and ``c_out``; ``gi`` holds the pre-activations of
    i, f, g, o (x W_ih^T + h W_hh^T + biases)."""
    i_f, i, f, g, o = views
    i_f.sigmoid_()
    o.sigmoid_()
    g.tanh_()
    torch.mul(f, c, out=c_out).addcmul_(i, g)  # c' = f c + i g
    torch.tanh(c_out, out=h_out).mul_(o)  # h' = o tanh(c')


def gru_views(gi: Tensor, rec: Tensor) -> tuple[Tensor, ...]:
    H = gi.shape[-1] // 3
    gi_rz = gi[:, : 2 * H]
    return gi_rz, rec[:, : 2 * H], gi[:, 2 * H :], rec[:, 2 * H :], gi_rz[:, :H], gi_rz[:, H:]


def gru_step_inference(views: tuple[Tensor, ...], h: Tensor, h_out: Tensor) -> None:
    """One GRU step into ``h_out``. Here ``gi`` = x W_ih^T + b_ih and ``rec`` =
    h W_hh^T + b_hh stay apart: the reset gate sits between the halves of the n gate."""
    gi_rz, rec_rz, gi_n, rec_n, r, z = views
    gi_rz.add_(rec_rz).sigmoid_()  # r, z
    gi_n.addcmul_(r, rec_n).tanh_()  # n = tanh(x_n + r (W_hn h + b_hn))
    torch.lerp(gi_n, h, z, out=h_out)  # h' = (1 - z) n + z h


class _Scratch:
    """The buffers for one (thread, batch size, dtype, device): every layer's recurrent
    product and input projection, (L, B, G) each, and per layer the views of them that its
    step function works on, sliced once."""

    def __init__(self, like: Tensor, shape: tuple[int, int, int], views: Callable) -> None:
        self.rec = like.new_empty(shape)
        self.gi = like.new_empty(shape)
        self.gi_l, self.rec_l = self.gi.unbind(0), self.rec.unbind(0)
        self.views = [views(g, r) for g, r in zip(self.gi_l, self.rec_l, strict=True)]


class Sampler:
    """The one-step path of one layer stack: cached weights, scratch buffers, the step.

    Args:
        views: the cell's ``*_views`` function; step: its ``*_step_inference``, called as
            ``step(views, states, out_states)``.
        fold_biases: True (RNN, LSTM): b_ih + b_hh go with the recurrent product; False
            (GRU): b_ih with the input projection, b_hh with the recurrent product.
    """

    def __init__(self, views: Callable, step: Callable, fold_biases: bool) -> None:
        self.views, self.step, self.fold_biases = views, step, fold_biases
        self._weights: tuple | None = None
        self._scratch: dict = {}

    def clear(self) -> None:
        """Forget the cached weights and the scratch buffers."""
        self._weights = None
        self._scratch = {}

    def forget_weights(self) -> None:
        self._weights = None

    def _weights_for(
        self, flat: Sequence[Tensor], params: Callable[[], list[list[Tensor | None]]],
        dtype: torch.dtype,
    ):
        """(w_in, b_in, w_stack, b_stack) in ``dtype``: per layer W_ih^T (I, G) and its
        bias, and the batched GEMM's operands: every layer's W_hh^T stacked (L, H, G) with
        their biases (L, 1, G).

        Built once and cached until a parameter changes: an optimizer step or
        load_state_dict bumps its version, ``.to()`` gives it new data, functional_call
        swaps the tensor; each of these is part of the cache key, made from ``flat`` (every
        parameter of the stack). ``params()`` gives them per layer, [w_ih, w_hh, b_ih,
        b_hh], and is called only when the cache is stale.
        """
        key = (dtype, *map(id, flat), *map(_version, flat), *map(Tensor.data_ptr, flat))
        if self._weights is not None and self._weights[0] == key:
            return self._weights[1]
        params = params()
        L = len(params)
        with torch.no_grad():
            ws = [[p.to(dtype) if p is not None else None for p in ps] for ps in params]
            w_in = [w[0].t().contiguous() for w in ws]  # type: ignore[union-attr]
            w_stack = torch.stack([w[1].t() for w in ws])  # type: ignore[union-attr]
            b_in: list[Tensor | None] = [None] * L
            b_stack = None
            if ws[0][2] is not None:
                if self.fold_biases:  # both into the recurrent product
                    b_rec = [w[2] + w[3] for w in ws]  # type: ignore[operator]
                else:
                    b_in = [w[2] for w in ws]
                    b_rec = [w[3] for w in ws]  # type: ignore[misc]
                b_stack = torch.stack(b_rec).unsqueeze(1)  # type: ignore[arg-type]
        built = (w_in, b_in, w_stack, b_stack)
        self._weights = (key, built)
        return built

    def _scratch_for(self, x: Tensor, dtype: torch.dtype, shape: tuple[int, int, int]) -> _Scratch:
        """This thread's scratch for the shape, in ``dtype`` on ``x``'s device (threads
        sampling from one model at once each get their own)."""
        inference = torch.is_inference_mode_enabled()  # such buffers stay in that mode
        key = (threading.get_ident(), shape, dtype, x.device, inference)
        found = self._scratch.get(key)
        if found is None:
            if len(self._scratch) >= 16:  # dead threads' and old batch sizes' buffers
                self._scratch.clear()
            like = x.new_empty((), dtype=dtype)
            found = self._scratch[key] = _Scratch(like, shape, self.views)
        return found

    def step_all(
        self,
        flat: Sequence[Tensor],
        params: Callable[[], list[list[Tensor | None]]],
        x: Tensor,
        states: list[Tensor],
        dropout: float,
        dtype: torch.dtype,
    ) -> tuple[Tensor, list[Tensor]]:
        """Every layer for one time step: x (B, I), states (L, B, H) each -> (the top
        layer's h (B, H), new states (L, B, H) each), in ``dtype``. ``flat`` holds every
        parameter of the stack, ``params()`` the same per layer as [w_ih, w_hh, b_ih, b_hh]
        (biases None without bias): see :meth:`_weights_for`."""
        L, B, _ = states[0].shape
        w_in, b_in, w_stack, b_stack = self._weights_for(flat, params, dtype)
        scratch = self._scratch_for(x, dtype, (L, B, w_stack.shape[-1]))
        if b_stack is None:
            torch.bmm(states[0], w_stack, out=scratch.rec)
        else:
            torch.baddbmm(b_stack, states[0], w_stack, out=scratch.rec)  # (L, B, G)
        new = [x.new_empty(s.shape) for s in states]
        for layer in range(L):
            b = b_in[layer]
            if self.fold_biases:  # gi = rec + x W_ih^T: the pre-activations, in one op
                torch.addmm(scratch.rec_l[layer], x, w_in[layer], out=scratch.gi_l[layer])
            elif b is None:
                torch.mm(x, w_in[layer], out=scratch.gi_l[layer])
            else:
                torch.addmm(b, x, w_in[layer], out=scratch.gi_l[layer])
            out = [n[layer] for n in new]
            self.step(scratch.views[layer], [s[layer] for s in states], out)
            x = out[0]
            if layer < L - 1 and dropout > 0:
                x = F.dropout(x, dropout, training=True)
        return x, new
