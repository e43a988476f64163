"""Hand-written recurrent cells and layers: charlm's drop-in twins of torch.nn's RNN family.

This module owns ``RNNCell``, ``LSTMCell``, ``GRUCell`` (one time step) and the multi-layer
``RNN``, ``LSTM``, ``GRU`` (whole sequences). They take the same constructor arguments, own
parameters with the same names, shapes and initialisation, and follow the same forward
contract as their torch.nn namesakes, so a state dict moves freely between the two; none of
torch's recurrent modules or kernels is used. There are two levels. The *cells* and the
``*_step`` functions are the readable reference: one step in plain autograd tensor ops, one
matmul for all gates followed by ``chunk``. The *layers* are the fast path: the input
projection of every time step is one GEMM, and only the recurrence runs in a hand-written
``torch.autograd.Function`` per cell type whose forward walks the sequence into
preallocated buffers (also storing the gate derivatives it will need) and whose backward
walks it back, with one matmul per step, then computes the recurrent weight gradient as one
large GEMM over all steps. On x86 CPUs the GEMMs go through oneDNN (the library torch.nn's
own CPU LSTM uses, with the recurrent weight reordered once per sequence) and big buffers are
recycled across calls (first-touching fresh memory costs as much as the arithmetic); on the
CPU the LSTM's per-step gate arithmetic runs as one compiled kernel per step and direction
(:mod:`charlm.kernels`), falling back to the eager ops here; sampling (one step at a time, no
grad) takes a lean single-step path. A layer built with ``fused=False`` runs the plain
autograd loop over the step functions instead; the tests hold every path to torch.nn.
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from charlm import kernels

__all__ = [
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "RNN",
    "LSTM",
    "GRU",
    "rnn_step",
    "lstm_step",
    "gru_step",
]

_NONLINEARITIES = ("tanh", "relu")
_version = attrgetter("_version")  # a tensor's in-place modification counter


# --------------------------------------------------------------------------------------
# One time step, plain autograd: the readable reference for the equations.
# --------------------------------------------------------------------------------------


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Return ``x @ weight.T + bias`` (bias optional) for x of shape (B, in)."""
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
    """One Elman RNN step.

    h' = act(W_ih x + b_ih + W_hh h + b_hh), where act is tanh or relu.

    Args:
        x: input of shape (B, I).
        h: previous hidden state of shape (B, H).
        weight_ih, weight_hh: (H, I) and (H, H).
        bias_ih, bias_hh: (H,) each, or both None.
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Returns:
        The next hidden state h', shape (B, H).
    """
    pre = _linear(x, weight_ih, bias_ih) + _linear(h, weight_hh, bias_hh)  # (B, H)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step (gate order i, f, g, o, as torch.nn).

    With s = sigmoid and every gate computed from [x, h] by its own rows of W_ih, W_hh:

    - input gate:   i  = s(W_ii x + b_ii + W_hi h + b_hi)
    - forget gate:  f  = s(W_if x + b_if + W_hf h + b_hf)
    - candidate:    g  = tanh(W_ig x + b_ig + W_hg h + b_hg)
    - output gate:  o  = s(W_io x + b_io + W_ho h + b_ho)
    - cell update:  c' = f * c + i * g
    - hidden state: h' = o * tanh(c')

    Args:
        x: input (B, I); h, c: previous hidden and cell state (B, H).
        weight_ih, weight_hh: (4H, I) and (4H, H); bias_ih, bias_hh: (4H,) or None.

    Returns:
        (h', c'), each (B, H).
    """
    # One matmul per operand computes all four gates at once; chunk splits them.
    gates = _linear(x, weight_ih, bias_ih) + _linear(h, weight_hh, bias_hh)  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_next = f * c + i * g
    h_next = o * torch.tanh(c_next)
    return h_next, c_next


def gru_step(
    x: Tensor,
    h: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
) -> Tensor:
    """One GRU step (gate order r, z, n, as torch.nn).

    - reset gate:   r  = s(W_ir x + b_ir + W_hr h + b_hr)
    - update gate:  z  = s(W_iz x + b_iz + W_hz h + b_hz)
    - candidate:    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    - hidden state: h' = (1 - z) * n + z * h

    Note the reset gate scales the whole recurrent projection *including* b_hn, as torch.nn
    (and cuDNN) do; this is why the two bias vectors cannot be merged for n.

    Args:
        x: input (B, I); h: previous hidden state (B, H).
        weight_ih, weight_hh: (3H, I) and (3H, H); bias_ih, bias_hh: (3H,) or None.

    Returns:
        The next hidden state h', shape (B, H).
    """
    gi = _linear(x, weight_ih, bias_ih)  # (B, 3H)
    gh = _linear(h, weight_hh, bias_hh)  # (B, 3H)
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


# ---------------------------------------------------------------------------------------
# One time step without autograd: the same equations as the ``*_step`` functions, for
# sampling, which calls a layer once per character with batch 1, so the number of tensor
# ops and their fixed costs are what count. The layer (``_LayerBase._one_step``) computes
# each layer's input projection ``gi`` and recurrent product ``rec`` ((B, G), biases
# included; for RNN and LSTM ``gi`` is computed onto ``rec``, so it holds the whole
# pre-activation) into scratch buffers made once per thread and shape, and the step functions
# work on views of them sliced once by the ``*_views`` functions (a GRU step measured
# 4.8 us this way against 11.9 slicing every time). The recurrent products of all layers
# depend only on the states the step starts with, so one batched GEMM (``baddbmm``)
# computes them all, on both cores: 10.8 us against 2 x 9.7 for two layers' 256 x 768
# products (adding layer 0's input projection to the batch measured no faster: three
# products split unevenly over two cores). Weights enter transposed, (K, G): for one row,
# a row-major (K, N) operand measured about 25% faster than ``linear`` against the (N, K)
# parameter. New states are written into views of the layer's returned states.
# ---------------------------------------------------------------------------------------


def _rnn_views(gi: Tensor, rec: Tensor) -> tuple[Tensor, ...]:
    return (gi,)


def _rnn_step_inference(
    views: tuple[Tensor, ...], h: Tensor, h_out: Tensor, relu: bool = False
) -> None:
    """h' = act(pre) into ``h_out`` (B, H); ``gi`` holds pre = x W_ih^T + h W_hh^T + biases."""
    (pre,) = views
    torch.clamp_min(pre, 0.0, out=h_out) if relu else torch.tanh(pre, out=h_out)


def _lstm_views(gi: Tensor, rec: Tensor) -> tuple[Tensor, ...]:
    H = gi.shape[-1] // 4
    i, f, g, o = (gi[:, k * H : (k + 1) * H] for k in range(4))
    return gi[:, : 2 * H], i, f, g, o


def _lstm_step_inference(
    views: tuple[Tensor, ...], h: Tensor, c: Tensor, h_out: Tensor, c_out: Tensor
) -> None:
    """One LSTM step into ``h_out`` and ``c_out`` (B, H); ``gi`` holds the pre-activations
    of i, f, g, o (x W_ih^T + h W_hh^T + biases)."""
    i_f, i, f, g, o = views
    i_f.sigmoid_()
    o.sigmoid_()
    g.tanh_()
    torch.mul(f, c, out=c_out).addcmul_(i, g)  # c' = f c + i g
    torch.tanh(c_out, out=h_out).mul_(o)  # h' = o tanh(c')


def _gru_views(gi: Tensor, rec: Tensor) -> tuple[Tensor, ...]:
    H = gi.shape[-1] // 3
    gi_rz = gi[:, : 2 * H]
    return gi_rz, rec[:, : 2 * H], gi[:, 2 * H :], rec[:, 2 * H :], gi_rz[:, :H], gi_rz[:, H:]


def _gru_step_inference(views: tuple[Tensor, ...], h: Tensor, h_out: Tensor) -> None:
    """One GRU step into ``h_out`` (B, H). Here ``gi`` = x W_ih^T + b_ih and ``rec`` =
    h W_hh^T + b_hh stay apart: the reset gate sits between the halves of the n gate."""
    gi_rz, rec_rz, gi_n, rec_n, r, z = views
    gi_rz.add_(rec_rz).sigmoid_()  # r, z
    gi_n.addcmul_(r, rec_n).tanh_()  # n = tanh(x_n + r (W_hn h + b_hn))
    torch.lerp(gi_n, h, z, out=h_out)  # h' = (1 - z) n + z h


class _OneStepScratch:
    """The one-step path's buffers for one (thread, batch size, dtype, device): every layer's
    recurrent product and input projection, (L, B, G) each, and per layer the views of them
    that its step function works on, sliced once (a slice costs about as much as the
    arithmetic on it here)."""

    def __init__(self, like: Tensor, shape: tuple[int, int, int], views: Callable) -> None:
        self.rec = like.new_empty(shape)
        self.gi = like.new_empty(shape)
        self.gi_l, self.rec_l = self.gi.unbind(0), self.rec.unbind(0)
        self.views = [views(g, r) for g, r in zip(self.gi_l, self.rec_l, strict=True)]


# --------------------------------------------------------------------------------------
# Workspace. A training step of the fused layers needs a few large buffers per layer
# (saved activations, hidden states, gate gradients: tens of MiB). Fresh memory of that
# size comes from the OS and costs a page fault per 4 KiB on first touch, about as much
# as the arithmetic done in it, so buffers of 1 MiB and more are recycled across calls
# on the CPU. Safety rests on handing out *views*: the pool keeps the base tensor, and a
# base is reused only when nothing but the pool refers to it, i.e. every view handed out
# (and anything derived from it: saved tensors, views, detached aliases, Python
# references) is gone, which shows in the base's TensorImpl and storage use counts.
# --------------------------------------------------------------------------------------


def _use_counts(t: Tensor) -> tuple[int, int]:
    return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _probe_use_counts() -> tuple[int, int] | None:
    """The use counts of a tensor nothing else refers to, if the counts behave as relied on
    (these are private torch APIs); None disables recycling."""
    try:
        base = torch.empty(4)
        idle = _use_counts(base)
        view = base.view(2, 2)
        busy = _use_counts(base)
        alias = view.detach()
        del view
        busy_alias = _use_counts(base)
        del alias
        if busy[0] <= idle[0] or busy[1] <= idle[1] or busy_alias[1] <= idle[1]:
            return None
        return idle if _use_counts(base) == idle else None
    except Exception:  # API missing or changed: allocate fresh memory instead
        return None


class _Workspace:
    """Recycles large CPU buffers across calls (see the section comment above)."""

    min_bytes = 1 << 20

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._bases: dict[tuple, list[Tensor]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._idle = _probe_use_counts()

    def empty(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device."""
        nbytes = math.prod(shape) * like.element_size()
        if self._idle is None or like.device.type != "cpu" or nbytes < self.min_bytes:
            return like.new_empty(shape)
        # Tensors made under inference_mode cannot be written outside it: separate pools.
        key = (shape, like.dtype, torch.is_inference_mode_enabled())
        with self._lock:
            for base in self._bases.get(key, ()):
                if _use_counts(base) == self._idle:
                    return base.view(shape)
            if self._bytes + nbytes > self.max_bytes:
                self._evict_idle()
            base = like.new_empty(shape)
            if self._bytes + nbytes <= self.max_bytes:
                self._bases.setdefault(key, []).append(base)
                self._bytes += nbytes
            return base.view(shape)

    def _evict_idle(self) -> None:
        for key, bases in list(self._bases.items()):
            keep = [b for b in bases if _use_counts(b) != self._idle]
            self._bytes -= sum(b.nbytes for b in bases) - sum(b.nbytes for b in keep)
            if keep:
                self._bases[key] = keep
            else:
                del self._bases[key]

    def clear(self) -> None:
        """Forget every idle buffer (their memory goes back to the allocator)."""
        with self._lock:
            self._evict_idle()


_WORKSPACE = _Workspace()
_empty = _WORKSPACE.empty


# --------------------------------------------------------------------------------------
# Matrix products. On x86 CPUs torch.nn's LSTM runs on oneDNN, whose fp32 GEMM measured
# 1.5-2.3x faster on the development machine (an AMD EPYC) than the MKL one behind
# torch.mm/addmm: ~230 against ~100 GFLOP/s per core for the big products. To keep up, the
# fused path uses the same GEMM, which torch exposes as the linear op
# ``mkldnn::_linear_pointwise`` (a plain ``x @ w.T + b``; no recurrent kernel involved),
# for float32 CPU tensors with enough rows to pay for its fixed cost; everything else (CUDA,
# float64, tiny batches, builds without the op) takes torch.addmm. ``USE_ONEDNN = False``
# turns it off.
# --------------------------------------------------------------------------------------

USE_ONEDNN = True
_ONEDNN_MIN_ROWS = 8  # below this many rows addmm's lower fixed cost wins (measured)
_onednn_linear: Callable[..., Tensor] | None | bool = False  # False: not probed yet


def _onednn() -> Callable[..., Tensor] | None:
    """oneDNN's linear op (``mkldnn::_linear_pointwise``) if this build has a working one."""
    global _onednn_linear
    if _onednn_linear is False:
        try:
            op = torch.ops.mkldnn._linear_pointwise.default
            x = torch.arange(6.0).view(2, 3)
            w = torch.arange(12.0).view(4, 3)
            ok = torch.equal(op(x, w, None, "none", [], ""), x @ w.t())
            _onednn_linear = op if ok else None
        except Exception:  # op missing in this build, or unusable: fall back to addmm
            _onednn_linear = None
    return _onednn_linear  # type: ignore[return-value]


def _use_onednn(t: Tensor, rows: int) -> bool:
    return (
        USE_ONEDNN
        and rows >= _ONEDNN_MIN_ROWS
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and _onednn() is not None
    )


def _gemm_fns(
    t: Tensor, rows: int
) -> tuple[Callable[[Tensor, Tensor, Tensor | None], Tensor], Callable[..., Tensor]]:
    """Pick ``lin(x, w, b) = x @ w.T + b`` and ``lin_add(x, w, other) = other + x @ w.T``.

    ``w`` must be contiguous or a transpose of a contiguous tensor (oneDNN crawls on other
    strides); ``x`` needs unit stride along one dimension.
    """
    if _use_onednn(t, rows):
        op_lin = _onednn()
        assert op_lin is not None
        return (
            lambda x, w, b: op_lin(x, w, b, "none", [], ""),
            # oneDNN's fused "+ other" (binary post-op) measures slower than a separate add_.
            lambda x, w, other: op_lin(x, w, None, "none", [], "").add_(other),
        )
    return (
        lambda x, w, b: torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t()),
        lambda x, w, other: torch.addmm(other, x, w.t()),
    )


def _dense(t: Tensor) -> Tensor:
    """``t`` if it is row- or column-major, else a contiguous copy (see :func:`_gemm_fns`)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def _mm_nt(x: Tensor, w: Tensor, bias: Tensor | None = None, other: Tensor | None = None) -> Tensor:
    """``x @ w.T (+ bias) (+ other)`` for large operands, on the fastest backend."""
    lin, lin_add = _gemm_fns(x, x.shape[0])
    if not x.is_contiguous() and _use_onednn(x, x.shape[0]):
        # oneDNN takes its input row-major and would otherwise copy it into fresh memory
        # itself; a recycled buffer saves the page faults (about 1.8 ms per 4 MiB here).
        x = _empty(tuple(x.shape), x).copy_(x)
    x, w = _dense(x), _dense(w)
    return lin(x, w, bias) if other is None else lin_add(x, w, other)


_onednn_packs: bool | None = None  # None: not probed yet


def _onednn_packing() -> bool:
    """Whether this build can reorder a linear weight into oneDNN's blocked layout once
    (``mkldnn::_reorder_linear_weight``) and multiply with it, with correct results."""
    global _onednn_packs
    if _onednn_packs is None:
        try:
            op = _onednn()
            w = torch.arange(96.0).view(12, 8) / 50
            x = torch.arange(64.0).view(8, 8) / 40
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
            got = op(x, packed, None, "none", [], "")  # type: ignore[misc]
            _onednn_packs = bool(torch.allclose(got, x @ w.t(), rtol=1e-5, atol=1e-5))
        except Exception:  # op missing in this build, or unusable: plain weights
            _onednn_packs = False
    return _onednn_packs


def _step_gemm_fns(
    w: Tensor, rows: int, like: Tensor
) -> tuple[Callable[[Tensor, Tensor | None], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """``lin(x, b) = x @ w.T (+ b)`` and ``lin_add(x, other) = other + x @ w.T`` for the
    per-step products of a time loop (``rows`` rows each, the same ``w`` every step).

    Where oneDNN runs them, ``w`` is reordered once into oneDNN's blocked layout: the plain
    call re-lays the weight out every time (50 against 60 us for a 32 x 256 x 1024 product
    on the development machine, for one reorder of about 120 us per sequence).
    """
    lin, lin_add = _gemm_fns(like, rows)
    w = _dense(w)
    if _use_onednn(like, rows) and _onednn_packing():
        op = _onednn()
        packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
        return (
            lambda x, b: op(x, packed, b, "none", [], ""),  # type: ignore[misc]
            lambda x, other: op(x, packed, None, "none", [], "").add_(other),  # type: ignore[misc]
        )
    return (lambda x, b: lin(x, w, b)), (lambda x, other: lin_add(x, w, other))


class _Projection(torch.autograd.Function):
    """``x @ W.T + b`` on oneDNN, with its (three GEMM-or-sum) backward: the input projection
    of every time step at once. Used only where :func:`_use_onednn` holds; elsewhere the
    projection is a plain autograd ``addmm``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        return _mm_nt(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = _mm_nt(dy, w.t()) if need[0] else None  # (N, G) @ (G, I)
        dw = _mm_nt(x.t(), dy.t()).t() if need[1] else None  # (x^T dy)^T = dy^T x: (G, I)
        db = dy.sum(0) if need[2] else None
        return dx, dw, db


def _project(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
    """Input projection of every step as one GEMM: (T, B, I) -> (T, B, G)."""
    T, B, n_in = x.shape
    x2 = x.reshape(T * B, n_in)
    if _use_onednn(x2, T * B) and not torch.is_autocast_enabled("cpu"):
        xg = _Projection.apply(x2, w_ih, bias)
    elif bias is None:
        xg = torch.mm(x2, w_ih.t())
    else:
        xg = torch.addmm(bias, x2, w_ih.t())
    return xg.view(T, B, w_ih.shape[0])


# --------------------------------------------------------------------------------------
# Fused recurrences. Each ``_*_scan`` runs the forward time loop into preallocated buffers
# (no stack of per-step outputs): one GEMM per step plus in-place / ``out=`` pointwise ops.
# It is called directly when no gradient is needed (evaluation) and from the autograd
# Functions otherwise; ``keep=True`` makes it also store what the backward pass needs,
# ``keep=False`` reuses one step's worth of scratch space. tanh is computed as
# 2 sigmoid(2x) - 1: torch's CPU tanh costs about 7x a sigmoid, and the identity is exact
# up to float32 rounding (~1e-7).
# --------------------------------------------------------------------------------------


def _steps(buf: Tensor, n: int, keep: bool) -> Sequence[Tensor]:
    """Per-step views of ``buf``: all of them when keeping, else its first one every step."""
    views = buf.unbind(0)
    if keep:
        return views
    return [views[0]] * n


def _tanh_(x: Tensor, minus_one: Tensor, out: Tensor) -> Tensor:
    """out = tanh(x) = 2 sigmoid(2x) - 1; overwrites ``x`` (``out`` may be ``x``)."""
    torch.add(x, x, out=x)
    x.sigmoid_()
    return torch.add(minus_one, x, alpha=2, out=out)


def _rnn_scan(xg: Tensor, h0: Tensor, w_hh: Tensor, relu: bool) -> Tensor:
    """Elman recurrence over precomputed input projections.

    Args:
        xg: (T, B, H) = W_ih x_t + b_ih + b_hh for every step.
        h0: (B, H) initial state; w_hh: (H, H).

    Returns:
        hs: (T, B, H), every hidden state (the activations themselves, which is all that
        the backward pass needs).
    """
    T, B, H = xg.shape
    hs = _empty((T, B, H), xg)
    _, lin_add = _step_gemm_fns(w_hh, B, xg)
    minus_one = xg.new_full((), -1.0)
    clamp_min = torch.clamp_min
    h = h0.contiguous()
    for x_t, h_t in zip(xg.unbind(0), hs.unbind(0), strict=True):
        pre = lin_add(h, x_t)  # (B, H) = x_t + h W_hh^T
        if relu:
            clamp_min(pre, 0.0, out=h_t)
        else:
            _tanh_(pre, minus_one, out=h_t)
        h = h_t
    return hs


def _lstm_scan(
    xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, keep: bool
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """LSTM recurrence over precomputed input projections.

    With ``keep`` the loop also stores, per step, what the backward pass needs, multiplied
    out while the step's values are hot in cache (s' = s (1 - s) is the sigmoid derivative,
    and 1 - tanh(x)^2 = 4 s'(2x)):

    - ``fac`` (T, B, 4H): dpre/dc for i, f, g = [g s'(i), c_{t-1} s'(f), i (1 - g^2)] and
      dpre/dh for o = tanh(c) s'(o), so that backward gets the gate gradients by scaling;
    - ``k`` (T, B, H) = o s'(2c), so that dh/dc = 4 k;
    - ``acts`` (T, B, 4H): the activated gates (backward reads f).

    Args:
        xg: (T, B, 4H) = W_ih x_t + b_ih + b_hh for every step (gate order i, f, g, o).
        h0, c0: (B, H) initial states; w_hh: (4H, H).
        keep: store the backward factors.

    Returns:
        (hs (T, B, H) all hidden states, c_last (B, H), (fac, k, acts) or None), or what
        :func:`_lstm_scan_compiled` returns where it runs (CPU, steps of at least
        ``kernels.MIN_NUMEL`` elements per gate, a compiled kernel available).
    """
    T, B, G = xg.shape
    H = G // 4
    if kernels.eligible(xg, B * H):
        compiled = _lstm_scan_compiled(xg, h0, c0, w_hh, keep)
        if compiled is not None:
            return compiled
    hs = _empty((T, B, H), xg)
    # Per step, mult = [g, c_{t-1}, 4 i, tanh(c_t)]: the values that scale s' into ``fac``,
    # each written here by the op that computes it, so that one multiply does all four.
    # Two alternate, so c_t lands in the next step's slot directly.
    mults = xg.new_empty((2, B, 4, H))
    mults[0, :, 1] = c0
    m_l = mults.unbind(0)
    m_g, m_c, m_i, m_tc = (mults[:, :, k].unbind(0) for k in range(4))
    u = xg.new_empty((B, H))  # s(2c)
    if keep:
        fac = _empty((T, B, G), xg)
        k = _empty((T, B, H), xg)
        acts = _empty((T, B, G), xg)
        fac4_l = fac.view(T, B, 4, H).unbind(0)
        fac_l, k_l, acts_l = fac.unbind(0), k.unbind(0), acts.unbind(0)
        a_i, a_f, a_g, a_o = (acts.view(T, B, 4, H)[:, :, j].unbind(0) for j in range(4))
    _, lin_add = _step_gemm_fns(w_hh, B, xg)
    minus_one = xg.new_full((), -1.0)
    mul, add, addcmul, sigmoid = torch.mul, torch.add, torch.addcmul, torch.sigmoid
    h = h0.contiguous()
    for t, (x_t, h_t) in enumerate(zip(xg.unbind(0), hs.unbind(0), strict=True)):
        now, nxt = t & 1, (t + 1) & 1
        pre = lin_add(h, x_t)  # (B, 4H) = x_t + h W_hh^T, a fresh tensor
        g_pre = pre[:, 2 * H : 3 * H]
        # One sigmoid for all four gates, with g's input doubled: tanh(x) = 2 s(2x) - 1.
        add(g_pre, g_pre, out=g_pre)
        if keep:
            sigmoid(pre, out=acts_l[t])
            i, f, s_g, o = a_i[t], a_f[t], a_g[t], a_o[t]
            addcmul(acts_l[t], acts_l[t], acts_l[t], value=-1, out=fac_l[t])  # s'(every)
        else:
            i, f, s_g, o = pre.sigmoid_().chunk(4, 1)
        g = add(minus_one, s_g, alpha=2, out=m_g[now])  # g = tanh(g_pre)
        c_t = mul(f, m_c[now], out=m_c[nxt])  # c' = f * c ...
        c_t.addcmul_(i, g)  # ... + i * g
        add(c_t, c_t, out=u)
        u.sigmoid_()  # s(2c')
        if keep:
            mul(i, 4, out=m_i[now])
            addcmul(u, u, u, value=-1, out=k_l[t])
            k_l[t].mul_(o)  # o s'(2c')
        tc = add(minus_one, u, alpha=2, out=m_tc[now])  # tanh(c')
        h = mul(o, tc, out=h_t)  # h' = o * tanh(c')
        if keep:
            fac4_l[t].mul_(m_l[now])  # s' * [g, c_{t-1}, 4 i, tanh(c')]
    c_last = m_c[T & 1].clone()
    return hs, c_last, ((fac, k, acts) if keep else None)


def _lstm_scan_compiled(
    xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, keep: bool
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]] | None:
    """:func:`_lstm_scan` with each step's pointwise part as one compiled kernel
    (:func:`charlm.kernels.lstm_forward`); None when no kernel is available for this shape.

    With ``keep`` it stores ``acts`` (T, B, 4H), the activated gates, and ``cs``
    (T + 1, B, H), every cell state from c0 on: what :func:`charlm.kernels.lstm_backward`
    reads. Returns (hs, c_last, (acts, cs)); without ``keep`` the last two are scratch.
    """
    T, B, G = xg.shape
    H = G // 4
    hs = _empty((T, B, H), xg)
    acts = _empty((T if keep else 1, B, G), xg)
    cs = _empty((T + 1 if keep else 2, B, H), xg)
    cs[0] = c0
    lin, _ = _step_gemm_fns(w_hh, B, xg)
    h = h0.contiguous()
    x_l, h_l, a_l = xg.unbind(0), hs.unbind(0), _steps(acts, T, keep)
    c_l = cs.unbind(0) if keep else [cs[t & 1] for t in range(T + 1)]
    # x_l[0] stands in for the GEMM's output: both are dense (B, 4H).
    step = kernels.kernel(kernels.lstm_forward, x_l[0], x_l[0], c_l[0], a_l[0], c_l[1], h_l[0])
    if step is None:
        return None
    for t in range(T):
        gemm = lin(h, None)  # (B, 4H) = h W_hh^T
        step(gemm, x_l[t], c_l[t], a_l[t], c_l[t + 1], h_l[t])
        h = h_l[t]
    c_last = c_l[T].clone()
    return hs, c_last, (acts, cs)


def _gru_scan(
    xg: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None, keep: bool
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """GRU recurrence over precomputed input projections.

    Args:
        xg: (T, B, 3H) = W_ih x_t + b_ih for every step (gate order r, z, n).
        h0: (B, H); w_hh: (3H, H); b_hh: (3H,) or None. b_hh stays out of ``xg`` because
            its n part sits inside the reset gate; the per-step GEMM adds it for free.
        keep: keep per-step activations for backward.

    Returns:
        (hs, saved): hs (T, B, H) and when ``keep`` (rz (T, B, 2H) activated r and z,
        n (T, B, H), hg_n (T, B, H) = W_hn h + b_hn).
    """
    T, B, G = xg.shape
    H = G // 3
    n_buf = T if keep else 1
    rz = _empty((n_buf, B, 2 * H), xg)
    ns = _empty((n_buf, B, H), xg)
    hgn = _empty((T, B, H), xg) if keep else None
    hs = _empty((T, B, H), xg)
    x_rz = xg[:, :, : 2 * H].unbind(0)
    x_n = xg[:, :, 2 * H :].unbind(0)
    rz_l = _steps(rz, T, keep)
    r_l = _steps(rz[:, :, :H], T, keep)
    z_l = _steps(rz[:, :, H:], T, keep)
    n_l = _steps(ns, T, keep)
    hgn_l = hgn.unbind(0) if hgn is not None else None
    lin, _ = _step_gemm_fns(w_hh, B, xg)
    minus_one = xg.new_full((), -1.0)
    add, addcmul, lerp = torch.add, torch.addcmul, torch.lerp
    split = (2 * H, H)
    h = h0.contiguous()
    for t, h_t in enumerate(hs.unbind(0)):
        hg_rz, hg_n = lin(h, b_hh).split(split, 1)  # (B, 2H), (B, H)
        if hgn_l is not None:
            hgn_l[t].copy_(hg_n)
        add(x_rz[t], hg_rz, out=rz_l[t])
        rz_l[t].sigmoid_()  # r, z
        n_t = n_l[t]
        addcmul(x_n[t], r_l[t], hg_n, out=n_t)
        _tanh_(n_t, minus_one, out=n_t)  # n = tanh(x_n + r * hg_n)
        lerp(n_t, h, z_l[t], out=h_t)  # h' = n + z * (h - n) = (1 - z) n + z h
        h = h_t
    return hs, ((rz, ns, hgn) if keep else None)  # type: ignore[return-value]


def _dw_hh(dG: Tensor, h0: Tensor, hs: Tensor) -> Tensor:
    """dW_hh = sum_t dG_t^T h_{t-1}, as one GEMM over all steps (plus the h0 term).

    dG: (T, B, G) contiguous gradients of the recurrent pre-activations; h0: (B, H);
    hs: (T, B, H). Returns (G, H).
    """
    T, B, G = dG.shape
    H = hs.shape[-1]
    dw_t = torch.mm(h0.t(), dG[0])  # (H, G): the h0 term (K = B, tiny)
    if T > 1:
        # dW^T = H_prev^T dG: both operands enter as transposes of contiguous matrices.
        dw_t = _mm_nt(hs[:-1].reshape(-1, H).t(), dG[1:].reshape(-1, G).t(), other=dw_t)
    return dw_t.t()


def _strided_ok(g: Tensor) -> Tensor:
    """An incoming gradient as is when its rows are dense (a batch_first transpose is fine
    and saves a copy), else contiguous (e.g. the stride-0 expansion that ``sum()`` sends)."""
    return g if g.stride(-1) == 1 and min(g.stride()) > 0 else g.contiguous()


def _first_grad(g: Tensor) -> Tensor:
    """A writable, dense copy of an incoming gradient slice (it may be expanded zeros)."""
    return g.clone(memory_format=torch.contiguous_format)


class _RNNRecurrence(torch.autograd.Function):
    """Fused Elman recurrence: (xg, h0, W_hh) -> hs (T, B, H)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, xg: Tensor, h0: Tensor, w_hh: Tensor, relu: bool) -> Tensor:
        hs = _rnn_scan(xg, h0, w_hh, relu)
        ctx.relu = relu
        ctx.save_for_backward(h0, w_hh, hs)
        return hs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor):
        h0, w_hh, hs = ctx.saved_tensors
        T, B, _ = hs.shape
        # Local derivative of the activation, for all steps at once: tanh' = 1 - h^2,
        # relu' = [h > 0] (h = relu(pre) > 0 exactly where pre > 0).
        dG = _empty(tuple(hs.shape), hs)  # (T, B, H), becomes dL/dpre in place below
        if ctx.relu:
            torch.gt(hs, 0, out=dG)
        else:
            torch.mul(hs, hs, out=dG).neg_().add_(1)
        dG_l = dG.unbind(0)
        dhs_l = _strided_ok(dhs).unbind(0)
        _, lin_add = _step_gemm_fns(w_hh.t(), B, hs)  # lin_add(x, o) = o + x @ W_hh
        dh = dhs_l[T - 1]  # (B, H) total dL/dh_t
        for t in range(T - 1, 0, -1):
            dG_l[t].mul_(dh)
            dh = lin_add(dG_l[t], dhs_l[t - 1])  # dL/dh_{t-1}
        dG_l[0].mul_(dh)
        need = ctx.needs_input_grad
        dh0 = torch.mm(dG_l[0], w_hh) if need[1] else None
        dw = _dw_hh(dG, h0, hs) if need[2] else None
        return dG, dh0, dw, None


class _LSTMRecurrence(torch.autograd.Function):
    """Fused LSTM recurrence: (xg, h0, c0, W_hh) -> (hs (T, B, H), c_last (B, H))."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
        hs, c_last, saved = _lstm_scan(xg, h0, c0, w_hh, keep=True)
        # Intermediates go through save_for_backward too: autograd then frees them right
        # after backward (unless the graph is retained), so the workspace can recycle them
        # even while the caller still holds this step's outputs.
        ctx.compiled = len(saved) == 2  # (acts, cs) from the compiled scan
        ctx.save_for_backward(h0, w_hh, hs, *saved)
        return hs, c_last

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor, dc_last: Tensor):
        if ctx.compiled:
            return _lstm_backward_compiled(ctx, dhs, dc_last)
        h0, w_hh, hs, fac, k, acts = ctx.saved_tensors
        T, B, G = fac.shape
        H = G // 4
        dG = _empty((T, B, G), fac)  # (T, B, 4H) dL/dpre: the factors scaled per step
        dG_l = dG.unbind(0)
        dG_ifg = dG[:, :, : 3 * H].view(T, B, 3, H).unbind(0)  # (B, 3, H) per step
        dG_o = dG[:, :, 3 * H :].unbind(0)
        fac_ifg = fac[:, :, : 3 * H].view(T, B, 3, H).unbind(0)
        fac_o = fac[:, :, 3 * H :].unbind(0)
        k_l, f_l = k.unbind(0), acts[:, :, H : 2 * H].unbind(0)
        dhs_l = _strided_ok(dhs).unbind(0)
        _, lin_add = _step_gemm_fns(w_hh.t(), B, fac)  # lin_add(x, o) = o + x @ W_hh
        mul = torch.mul
        dh = dhs_l[T - 1]  # (B, H) total dL/dh_t
        dc = _first_grad(dc_last)  # (B, H) total dL/dc_t, updated in place
        dc3 = dc.unsqueeze(1)  # (B, 1, H) view of dc, broadcast over i, f, g
        for t in range(T - 1, -1, -1):
            mul(fac_o[t], dh, out=dG_o[t])  # dL/do_pre = dh tanh(c) s'(o)
            dc.addcmul_(dh, k_l[t], value=4)  # dL/dc_t += dh o (1 - tanh(c)^2)
            mul(fac_ifg[t], dc3, out=dG_ifg[t])  # dL/d(i, f, g)_pre
            dc.mul_(f_l[t])  # dL/dc_{t-1} through the forget gate
            if t:
                dh = lin_add(dG_l[t], dhs_l[t - 1])  # dL/dh_{t-1}
        need = ctx.needs_input_grad
        dh0 = torch.mm(dG_l[0], w_hh) if need[1] else None
        dw = _dw_hh(dG, h0, hs) if need[3] else None
        return dG, dh0, dc, dw


def _lstm_backward_compiled(ctx, dhs: Tensor, dc_last: Tensor):
    """_LSTMRecurrence's backward for the compiled scan: per step one kernel
    (:func:`charlm.kernels.lstm_backward`, compiled, else run eagerly) and one GEMM."""
    h0, w_hh, hs, acts, cs = ctx.saved_tensors
    T, B, G = acts.shape
    dG = _empty((T, B, G), acts)  # dL/dpre of every step
    dG_l, a_l, c_l = dG.unbind(0), acts.unbind(0), cs.unbind(0)
    dhs_l = _strided_ok(dhs).unbind(0)
    dcs = acts.new_empty((2, *dc_last.shape))  # dL/dc_t, ping-pong
    dcs[T & 1] = dc_last
    dc_l = dcs.unbind(0)
    lin, _ = _step_gemm_fns(w_hh.t(), B, acts)  # lin(x, None) = x @ W_hh
    dh_rec = torch.zeros_like(dc_l[0])  # nothing flows back into the last step
    t = T - 1
    args = (dh_rec, dhs_l[t], dc_l[T & 1], a_l[t], c_l[t], c_l[t + 1], dG_l[t], dc_l[t & 1])
    step = kernels.kernel(kernels.lstm_backward, *args) or kernels.lstm_backward
    for t in range(T - 1, -1, -1):
        step(dh_rec, dhs_l[t], dc_l[(t + 1) & 1], a_l[t], c_l[t], c_l[t + 1], dG_l[t], dc_l[t & 1])
        if t:
            dh_rec = lin(dG_l[t], None)  # dL/dh_{t-1} through step t's gates
    need = ctx.needs_input_grad
    dh0 = torch.mm(dG_l[0], w_hh) if need[1] else None
    dw = _dw_hh(dG, h0, hs) if need[3] else None
    return dG, dh0, dc_l[0] if need[2] else None, dw  # dcs is this call's own buffer


class _GRURecurrence(torch.autograd.Function):
    """Fused GRU recurrence: (xg, h0, W_hh, b_hh) -> hs (T, B, H)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, xg: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
        hs, saved = _gru_scan(xg, h0, w_hh, b_hh, keep=True)
        ctx.save_for_backward(h0, w_hh, hs, *saved)  # see _LSTMRecurrence.forward
        return hs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, dhs: Tensor):
        h0, w_hh, hs, rz, ns, hg_n = ctx.saved_tensors
        T, B, H = hs.shape
        r, z = rz[:, :, :H], rz[:, :, H:]
        # With h' = n + z (h - n):  dz_pre = dh (h - n) z (1 - z),
        # dn_pre = dh (1 - z) (1 - n^2), dr_pre = dn_pre hg_n r (1 - r), d(hg_n) = dn_pre r,
        # and dh_prev = dh z + [dr_pre, dz_pre, d(hg_n)] @ W_hh. The factors that do not
        # depend on the incoming gradient are computed for all steps first.
        one_m_z = _empty((T, B, H), hs)
        torch.neg(z, out=one_m_z).add_(1)  # 1 - z
        a_z = _empty((T, B, H), hs)
        a_z[0] = h0
        if T > 1:
            a_z[1:] = hs[:-1]
        a_z.sub_(ns).mul_(z).mul_(one_m_z)  # (h_prev - n) z (1 - z)
        a_n = _empty((T, B, H), hs)
        torch.mul(ns, ns, out=a_n).neg_().add_(1).mul_(one_m_z)  # (1 - z) (1 - n^2)
        fac_rr = _empty((T, B, 2, H), hs)  # per step [hg_n r (1 - r), r]
        a_r = fac_rr[:, :, 0]
        torch.mul(r, r, out=a_r)
        a_r.neg_().add_(r).mul_(hg_n)
        fac_rr[:, :, 1] = r

        dHg = _empty((T, B, 3 * H), hs)  # [dr_pre, dz_pre, d(hg_n)]: the GEMM operand
        dn = _empty((T, B, H), hs)  # dn_pre, which is also dL/d(x_n)
        dHg_l = dHg.unbind(0)
        dz_l = dHg[:, :, H : 2 * H].unbind(0)
        d_rn = dHg.view(T, B, 3, H)[:, :, 0::2].unbind(0)  # (B, 2, H): slots r and n
        dn_l = dn.unbind(0)
        dn3 = dn.unsqueeze(2).unbind(0)  # (B, 1, H) views, broadcast over fac_rr
        a_z_l, a_n_l, rr_l, z_l = a_z.unbind(0), a_n.unbind(0), fac_rr.unbind(0), z.unbind(0)
        dhs_l = _strided_ok(dhs).unbind(0)
        _, lin_add = _step_gemm_fns(w_hh.t(), B, hs)  # lin_add(x, o) = o + x @ W_hh
        mul, addcmul = torch.mul, torch.addcmul
        dh = dhs_l[T - 1]  # (B, H) total dL/dh_t
        for t in range(T - 1, -1, -1):
            mul(dh, a_z_l[t], out=dz_l[t])
            mul(dh, a_n_l[t], out=dn_l[t])
            mul(dn3[t], rr_l[t], out=d_rn[t])
            if t:
                direct = addcmul(dhs_l[t - 1], dh, z_l[t])  # through h' = ... + z h
                dh = lin_add(dHg_l[t], direct)  # dL/dh_{t-1}
        need = ctx.needs_input_grad
        dh0 = torch.mm(dHg_l[0], w_hh).addcmul_(dh, z_l[0]) if need[1] else None
        dw = _dw_hh(dHg, h0, hs) if need[2] else None
        db = dHg.sum(dim=(0, 1)) if need[3] else None
        # dL/dxg = [dr_pre, dz_pre, dn_pre]: the input side meets n before the reset gate.
        dxg = torch.cat((dHg[:, :, : 2 * H], dn), dim=2, out=_empty((T, B, 3 * H), hs))
        return dxg, dh0, dw, db


# --------------------------------------------------------------------------------------
# Argument checks shared by cells and layers.
# --------------------------------------------------------------------------------------


def _check_size(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int, else raise (TypeError / ValueError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")
    return value


def _check_nonlinearity(nonlinearity: object) -> str:
    if nonlinearity not in _NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from 'tanh' or 'relu'.")
    return nonlinearity  # type: ignore[return-value]


def _float32_region(device_type: str, *tensors: Tensor | None):
    """Return (context, tensors) for running a recurrence.

    Under autocast the recurrence must run in float32: the long chain of pointwise updates
    loses too much in bf16/fp16, and the in-place/``out=`` ops would otherwise meet mixed
    dtypes (the projection comes out of autocast in low precision, the weights do not). So
    autocast is switched off around it and the inputs are cast up; otherwise nothing
    changes. (The Functions' ``custom_fwd`` decorators do the same for CUDA by themselves.)
    """
    if not torch.is_autocast_enabled(device_type):
        return nullcontext(), tensors
    cast = tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)
    return torch.autocast(device_type, enabled=False), cast


# --------------------------------------------------------------------------------------
# Cells: one time step.
# --------------------------------------------------------------------------------------


class _CellBase(nn.Module):
    """Parameters, init and input handling shared by the three cells."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        num_chunks: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
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
        bound = 1.0 / math.sqrt(self.hidden_size)
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
        is_batched = input.dim() == 2
        if not is_batched:
            return input.unsqueeze(0), [h.unsqueeze(0) for h in hx], False
        return input, list(hx), True

    def _zeros(self, input: Tensor) -> Tensor:
        return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)


class RNNCell(_CellBase):
    """An Elman RNN cell: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu.

    Drop-in twin of ``torch.nn.RNNCell``: parameters ``weight_ih`` (H, I), ``weight_hh``
    (H, H), ``bias_ih`` (H,), ``bias_hh`` (H,).
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
        self.nonlinearity = _check_nonlinearity(nonlinearity)
        super().__init__(input_size, hidden_size, bias, 1, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """Return h' (B, H) for input (B, I) and hx (B, H); unbatched (I,) -> (H,)."""
        x, hs, is_batched = self._batched(input, [] if hx is None else [hx])
        h = hs[0] if hs else self._zeros(x)
        h_next = rnn_step(
            x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.nonlinearity
        )
        return h_next if is_batched else h_next.squeeze(0)


class LSTMCell(_CellBase):
    """A long short-term memory cell (gate order i, f, g, o); see :func:`lstm_step`.

    i = s(W_ii x + b_ii + W_hi h + b_hi)      input gate
    f = s(W_if x + b_if + W_hf h + b_hf)      forget gate
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)   candidate
    o = s(W_io x + b_io + W_ho h + b_ho)      output gate
    c' = f * c + i * g                         cell update
    h' = o * tanh(c')

    Drop-in twin of ``torch.nn.LSTMCell``: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H),
    ``bias_ih`` and ``bias_hh`` (4H,).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 4, device, dtype)

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return (h', c'), each (B, H), for input (B, I); unbatched (I,) -> (H,) each."""
        x, hs, is_batched = self._batched(input, [] if hx is None else hx)
        if hs:
            h, c = hs
        else:
            h = c = self._zeros(x)
        h_next, c_next = lstm_step(
            x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        )
        if not is_batched:
            return h_next.squeeze(0), c_next.squeeze(0)
        return h_next, c_next


class GRUCell(_CellBase):
    """A gated recurrent unit cell (gate order r, z, n); see :func:`gru_step`.

    r = s(W_ir x + b_ir + W_hr h + b_hr)            reset gate
    z = s(W_iz x + b_iz + W_hz h + b_hz)            update gate
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   candidate
    h' = (1 - z) * n + z * h

    Drop-in twin of ``torch.nn.GRUCell``: ``weight_ih`` (3H, I), ``weight_hh`` (3H, H),
    ``bias_ih`` and ``bias_hh`` (3H,).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 3, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """Return h' (B, H) for input (B, I) and hx (B, H); unbatched (I,) -> (H,)."""
        x, hs, is_batched = self._batched(input, [] if hx is None else [hx])
        h = hs[0] if hs else self._zeros(x)
        h_next = gru_step(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h_next if is_batched else h_next.squeeze(0)


# --------------------------------------------------------------------------------------
# Layers: whole sequences, several stacked layers.
# --------------------------------------------------------------------------------------


class _LayerBase(nn.Module):
    """Parameters, argument checks and the layer loop shared by RNN, LSTM and GRU."""

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
        if bidirectional:
            raise ValueError(f"{type(self).__name__}: bidirectional=True is not supported")
        if proj_size != 0:
            raise ValueError(f"{type(self).__name__}: proj_size != 0 is not supported")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Number)
            or not 0 <= dropout <= 1  # type: ignore[operator]
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability "
                f"of an element being zeroed, got {dropout!r}"
            )
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.num_layers = _check_size("num_layers", num_layers)
        if dropout > 0 and num_layers == 1:  # type: ignore[operator]
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        self.mode = mode
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)  # type: ignore[arg-type]
        self.bidirectional = False
        self.proj_size = 0
        # fused=True: the fast sequence Functions; False: the plain autograd loop over the
        # step functions (the readable reference path). May be flipped after construction.
        self.fused = bool(fused)

        factory = {"device": device, "dtype": dtype}
        G = self._num_chunks * hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size
            names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}"]
            shapes = [(G, in_size), (G, hidden_size)]
            if bias:
                names += [f"bias_ih_l{layer}", f"bias_hh_l{layer}"]
                shapes += [(G,), (G,)]
            # Same registration order as torch.nn: the same seed gives the same init.
            for name, shape in zip(names, shapes, strict=True):
                setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
            self._flat_weights_names.extend(names)
            self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(H), 1/sqrt(H)), as torch.nn does."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def train(self, mode: bool = True) -> _LayerBase:
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
        self.__dict__.pop("_inference_cache", None)
        self.__dict__.pop("_one_step_scratch", None)

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for torch.nn (cuDNN weight packing) runs unchanged."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer, its parameters in torch.nn's order (w_ih, w_hh[, b_ih, b_hh])."""
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        if not self.fused:
            s += ", fused=False"
        return s

    # Subclasses implement one layer over a (T, B, I) input; ``states`` are (B, H) tensors
    # (h, or h and c), and the return is (hs (T, B, H), final states).
    def _layer(
        self, x: Tensor, states: list[Tensor], params: list[Tensor | None], grad: bool
    ) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    # The one-step path: the views a step works on, from its input projection and recurrent
    # product (each (B, G)); and the step itself, writing the new states into ``out``.
    _views: Callable[[Tensor, Tensor], tuple[Tensor, ...]]

    def _infer_step(
        self, views: tuple[Tensor, ...], states: list[Tensor], out: list[Tensor]
    ) -> None:
        raise NotImplementedError

    def _params(self, layer: int) -> list[Tensor | None]:
        """[w_ih, w_hh, b_ih, b_hh] of one layer (biases None without bias)."""
        # Read through _parameters (not getattr) to keep per-call overhead low for sampling,
        # while still seeing parameters swapped in by load_state_dict or functional_call.
        table = self._parameters
        names = self._all_weights[layer]
        if self.bias:
            return [table[names[0]], table[names[1]], table[names[2]], table[names[3]]]
        return [table[names[0]], table[names[1]], None, None]

    # GRU keeps b_hh with the recurrent product (its n part sits inside the reset gate);
    # the others fold both biases into it.
    _fold_biases = True

    def _inference_weights(
        self, dtype: torch.dtype
    ) -> tuple[list[Tensor], list[Tensor | None], Tensor, Tensor | None]:
        """What :meth:`_one_step` multiplies with, in ``dtype``.

        Returns (w_in, b_in, w_stack, b_stack): per layer W_ih^T (I, G) and its bias, and the
        operands of the batched GEMM: W_hh^T of every layer stacked (L, H, G) with their
        biases (L, 1, G). LSTM and RNN put b_ih + b_hh there and no input bias (the input
        projection is then added onto the recurrent product in one ``addmm``); GRU keeps them
        apart (see :func:`_gru_step_inference`).

        Built once and cached until a parameter changes: an optimizer step or
        load_state_dict bumps its version, ``.to()`` gives it new data, functional_call
        swaps the tensor; each of these is part of the cache key.
        """
        flat = list(self._parameters.values())  # the layers' weights and biases, nothing else
        key = (dtype, *map(id, flat), *map(_version, flat), *map(Tensor.data_ptr, flat))
        cached = self.__dict__.get("_inference_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        params = [self._params(layer) for layer in range(self.num_layers)]
        with torch.no_grad():
            ws = [[p.to(dtype) if p is not None else None for p in ps] for ps in params]
            w_in = [w[0].t().contiguous() for w in ws]  # type: ignore[union-attr]
            recurrent = [w[1].t() for w in ws]  # type: ignore[union-attr]
            b_in: list[Tensor | None] = [None] * self.num_layers
            b_rec: list[Tensor] = []
            if self.bias:
                if self._fold_biases:  # both into the recurrent product (see _one_step)
                    b_rec = [w[2] + w[3] for w in ws]  # type: ignore[operator]
                else:
                    b_in = [w[2] for w in ws]
                    b_rec = [w[3] for w in ws]  # type: ignore[misc]
            w_stack = torch.stack(recurrent)  # (L, H, G)
            b_stack = torch.stack(b_rec).unsqueeze(1) if self.bias else None
        built = (w_in, b_in, w_stack, b_stack)
        self.__dict__["_inference_cache"] = (key, built)
        return built

    def _one_step(
        self,
        x: Tensor,
        states: list[Tensor],
        expected: tuple[int, int, int],
        dropout: float,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Every layer for one time step without autograd (sampling): x (B, I), states
        (L, B, H) each -> (top layer's h (B, H), new states (L, B, H) each), computed in
        ``dtype`` (default: the parameters')."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the recurrence runs in float32 (see above)
            ctx, (x, *states) = _float32_region(dev, x, *states)
            with ctx:
                return self._one_step(x, states, expected, dropout, torch.float32)
        L, B, _ = expected
        dtype = dtype or self._parameters["weight_hh_l0"].dtype
        w_in, b_in, w_stack, b_stack = self._inference_weights(dtype)
        scratch = self._scratch(x, B, dtype)
        if b_stack is None:
            torch.bmm(states[0], w_stack, out=scratch.rec)
        else:
            torch.baddbmm(b_stack, states[0], w_stack, out=scratch.rec)  # (L, B, G)
        new = [x.new_empty(expected) for _ in states]
        fold = self._fold_biases
        for layer in range(L):
            b = b_in[layer]
            if fold:  # gi = rec + x W_ih^T: the pre-activations, in one op
                torch.addmm(scratch.rec_l[layer], x, w_in[layer], out=scratch.gi_l[layer])
            elif b is None:
                torch.mm(x, w_in[layer], out=scratch.gi_l[layer])
            else:
                torch.addmm(b, x, w_in[layer], out=scratch.gi_l[layer])
            fin = [n[layer] for n in new]
            self._infer_step(scratch.views[layer], [s[layer] for s in states], fin)
            x = fin[0]
            if layer < L - 1 and dropout > 0:
                x = F.dropout(x, dropout, training=True)
        return x, new

    def _scratch(self, like: Tensor, batch: int, dtype: torch.dtype) -> _OneStepScratch:
        """This thread's :class:`_OneStepScratch` for the batch size (threads sampling from
        one model at once each get their own)."""
        table: dict = self.__dict__.setdefault("_one_step_scratch", {})
        inference = torch.is_inference_mode_enabled()  # such buffers stay in that mode
        key = (threading.get_ident(), batch, dtype, like.device, inference)
        found = table.get(key)
        if found is None:
            if len(table) >= 16:  # dead threads' and old batch sizes' buffers
                table.clear()
            G = self._num_chunks * self.hidden_size
            shape = (self.num_layers, batch, G)
            like = like.new_empty((), dtype=dtype)
            found = table[key] = _OneStepScratch(like, shape, self._views)
        return found

    # torch.compile of a model around these layers (train.compile) leaves them out: their
    # recurrence is fused already, and Inductor cannot lower the oneDNN op they call.
    @torch.compiler.disable
    def _run(
        self, input: Tensor, hx: Sequence[Tensor] | None, n_states: int
    ) -> tuple[Tensor, list[Tensor]]:
        """Shared forward: shape handling, the stack of layers, dropout between them."""
        dim = input.dim()
        if dim not in (2, 3):
            name = type(self).__name__
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {dim}D tensor")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.shape[-1]}"
            )
        w_dtype = self._parameters["weight_ih_l0"].dtype
        if input.dtype != w_dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(
                f"{type(self).__name__} input dtype ({input.dtype}) does not match weight "
                f"dtype ({w_dtype})"
            )
        is_batched = dim == 3
        # Batched input is (T, B, I), or (B, T, I) with batch_first; unbatched is (T, I).
        time_dim = 1 if is_batched and self.batch_first else 0
        T = input.shape[time_dim]
        B = input.shape[1 - time_dim] if is_batched else 1
        expected = (self.num_layers, B, self.hidden_size)
        if hx is None:
            zeros = input.new_zeros(expected)
            states = [zeros] * n_states
        else:
            states = list(hx)
            want = 3 if is_batched else 2
            for k, h in enumerate(states):
                if h.dim() != want:
                    raise RuntimeError(
                        f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, "
                        f"hx should also be {want}-D but got {h.dim()}-D tensor"
                    )
                if not is_batched:
                    states[k] = h = h.unsqueeze(1)
                if h.shape != expected:
                    which = f"[{k}]" if n_states > 1 else ""
                    raise RuntimeError(
                        f"Expected hidden{which} size {expected}, got {list(h.shape)}"
                    )
        if T == 0:
            raise RuntimeError(
                f"{type(self).__name__}: input sequence must have at least one time step"
            )

        grad = torch.is_grad_enabled() and (
            input.requires_grad
            or any(s.requires_grad for s in states)
            or any(p.requires_grad for p in self.parameters())
        )
        dropout = self.dropout if self.training else 0.0
        if grad:
            # Weights may change after this (an optimizer step; fused ones do not bump the
            # parameters' versions), so the sampling path rebuilds its cached copies.
            self.__dict__.pop("_inference_cache", None)
        if T == 1 and not grad and self.fused:
            # Sampling: one step of every layer on (B, I) directly, no sequence machinery.
            x = input.select(time_dim, 0) if is_batched else input  # (B, I); unbatched (1, I)
            x, out_states = self._one_step(x, states, expected, dropout)
            x = x.clone()  # the output must not alias h_n (torch.nn returns separate tensors)
            out = x.unsqueeze(time_dim) if is_batched else x
        else:
            last = self.num_layers - 1
            per_layer = [s.unbind(0) for s in states]  # per state: a (B, H) view per layer
            finals: list[list[Tensor]] = []
            x = input.transpose(0, 1) if time_dim else input
            if not is_batched:
                x = x.unsqueeze(1)  # (T, 1, I)
            for layer in range(self.num_layers):
                st = [p[layer] for p in per_layer]
                x, fin = self._layer(x, st, self._params(layer), grad)
                finals.append(fin)
                if layer < last and dropout > 0:
                    x = F.dropout(x, dropout, training=True)
            if not is_batched:
                out = x.squeeze(1)
            else:
                out = x.transpose(0, 1) if time_dim else x
            out_states = [torch.stack([fin[k] for fin in finals]) for k in range(n_states)]
        if not is_batched:
            out_states = [s.squeeze(1) for s in out_states]
        return out, out_states

    @staticmethod
    def _loop(
        step: Callable[..., Tensor | tuple[Tensor, Tensor]],
        x: Tensor,
        states: list[Tensor],
        params: list[Tensor | None],
        **kw: str,
    ) -> tuple[Tensor, list[Tensor]]:
        """The readable path: plain autograd, one step function call per time step."""
        outs = []
        for x_t in x.unbind(0):
            res = step(x_t, *states, *params, **kw)
            states = list(res) if isinstance(res, tuple) else [res]
            outs.append(states[0])
        return torch.stack(outs), states  # (T, B, H)


class RNN(_LayerBase):
    """Multi-layer Elman RNN: per layer and step, h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    Drop-in twin of ``torch.nn.RNN`` (argument order included: ``nonlinearity`` is the 4th
    positional argument, as in torch). ``forward(input, hx=None)`` takes input (T, B, I),
    (B, T, I) if ``batch_first`` or unbatched (T, I), hx (num_layers, B, H) or unbatched
    (num_layers, H), and returns (output (T, B, H) [or (B, T, H) / (T, H)], h_n).
    ``fused=False`` selects the plain autograd loop instead of the fused recurrence.
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
        fused: bool = True,
    ) -> None:
        self.nonlinearity = _check_nonlinearity(nonlinearity)
        super().__init__(
            "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            fused,
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the sequence; returns (output, h_n) shaped as torch.nn.RNN's."""
        out, (h_n,) = self._run(input, None if hx is None else (hx,), 1)
        return out, h_n

    _views = staticmethod(_rnn_views)

    def _infer_step(self, views, states, out):
        _rnn_step_inference(views, *states, *out, relu=self.nonlinearity == "relu")

    def _layer(self, x, states, params, grad):
        if not self.fused:
            return self._loop(rnn_step, x, states, params, nonlinearity=self.nonlinearity)
        w_ih, w_hh, b_ih, b_hh = params
        # Both biases are plain additive terms here: fold them into the projection.
        xg = _project(x, w_ih, None if b_ih is None else b_ih + b_hh)  # (T, B, H)
        relu = self.nonlinearity == "relu"
        ctx, (xg, h0, w_hh) = _float32_region(xg.device.type, xg, states[0], w_hh)
        with ctx:
            if grad:
                hs = _RNNRecurrence.apply(xg, h0, w_hh, relu)
            else:
                hs = _rnn_scan(xg, h0, w_hh, relu)
        return hs, [hs[-1]]


class LSTM(_LayerBase):
    """Multi-layer LSTM; per layer and step the equations of :class:`LSTMCell`.

    Drop-in twin of ``torch.nn.LSTM`` (``proj_size`` and ``bidirectional`` must stay off).
    ``forward(input, hx=None)`` takes input (T, B, I), (B, T, I) if ``batch_first`` or
    unbatched (T, I), hx = (h_0, c_0) each (num_layers, B, H) or unbatched
    (num_layers, H), and returns (output, (h_n, c_n)). ``fused=False`` selects the plain
    autograd loop instead of the fused recurrence.
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
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
            fused,
        )

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the sequence; returns (output, (h_n, c_n)) shaped as torch.nn.LSTM's."""
        out, (h_n, c_n) = self._run(input, hx, 2)
        return out, (h_n, c_n)

    _views = staticmethod(_lstm_views)

    def _infer_step(self, views, states, out):
        _lstm_step_inference(views, *states, *out)

    def _layer(self, x, states, params, grad):
        if not self.fused:
            return self._loop(lstm_step, x, states, params)
        w_ih, w_hh, b_ih, b_hh = params
        xg = _project(x, w_ih, None if b_ih is None else b_ih + b_hh)  # (T, B, 4H)
        ctx, (xg, h0, c0, w_hh) = _float32_region(xg.device.type, xg, *states, w_hh)
        with ctx:
            if grad:
                hs, c_last = _LSTMRecurrence.apply(xg, h0, c0, w_hh)
            else:
                hs, c_last, _ = _lstm_scan(xg, h0, c0, w_hh, keep=False)
        return hs, [hs[-1], c_last]


class GRU(_LayerBase):
    """Multi-layer GRU; per layer and step the equations of :class:`GRUCell`.

    Drop-in twin of ``torch.nn.GRU`` (``bidirectional`` must stay off).
    ``forward(input, hx=None)`` takes input (T, B, I), (B, T, I) if ``batch_first`` or
    unbatched (T, I), hx (num_layers, B, H) or unbatched (num_layers, H), and returns
    (output, h_n). ``fused=False`` selects the plain autograd loop.
    """

    _num_chunks = 3
    _fold_biases = False

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
        fused: bool = True,
    ) -> None:
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            fused,
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the sequence; returns (output, h_n) shaped as torch.nn.GRU's."""
        out, (h_n,) = self._run(input, None if hx is None else (hx,), 1)
        return out, h_n

    _views = staticmethod(_gru_views)

    def _infer_step(self, views, states, out):
        _gru_step_inference(views, *states, *out)

    def _layer(self, x, states, params, grad):
        if not self.fused:
            return self._loop(gru_step, x, states, params)
        w_ih, w_hh, b_ih, b_hh = params
        xg = _project(x, w_ih, b_ih)  # (T, B, 3H); b_hh goes to the recurrence
        ctx, (xg, h0, w_hh, b_hh) = _float32_region(xg.device.type, xg, states[0], w_hh, b_hh)
        with ctx:
            if grad:
                hs = _GRURecurrence.apply(xg, h0, w_hh, b_hh)
            else:
                hs, _ = _gru_scan(xg, h0, w_hh, b_hh, keep=False)
        return hs, [hs[-1]]
