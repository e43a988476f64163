"""Matrix products of the fused time loops, on the fastest backend this machine has.

On x86 CPUs torch.nn's LSTM runs on oneDNN, whose fp32 GEMM is faster than the MKL one behind
``torch.mm``/``addmm`` for these shapes (figures per machine in docs/performance.md), so the
fused path uses the same GEMM (:mod:`.onednn`) for float32 and bf16 CPU tensors with enough
rows to pay for its fixed cost; everything else (CUDA, float64, tiny batches, builds without
the op) takes ``torch.addmm``. ``USE_ONEDNN = False`` turns it off. Every function here
computes a plain ``x @ w.T (+ b)``, in its operands' dtype (bf16 GEMMs accumulate in float32
inside the kernel: see :mod:`.precision`); the layer tests hold the results to torch.nn.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import onednn
from .workspace import empty

__all__ = ["USE_ONEDNN", "dw_hh", "mm_nt", "project", "step_gemm_fns"]

USE_ONEDNN = True
ONEDNN_MIN_ROWS = 8  # below this many rows addmm's lower fixed cost wins


def use_onednn(t: Tensor, rows: int) -> bool:
    """Whether products with ``t``'s dtype and ``rows`` rows run on oneDNN."""
    return (
        USE_ONEDNN
        and rows >= ONEDNN_MIN_ROWS
        and t.dtype in (torch.float32, torch.bfloat16)
        and t.device.type == "cpu"
        and onednn.linear_op(t.dtype) is not None
    )


def _dense(t: Tensor) -> Tensor:
    """``t`` if it is row- or column-major, else a contiguous copy (oneDNN crawls on other
    strides)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def mm_nt(x: Tensor, w: Tensor, bias: Tensor | None = None, other: Tensor | None = None) -> Tensor:
    """``x @ w.T (+ bias) (+ other)`` for large operands."""
    if use_onednn(x, x.shape[0]):
        lin = onednn.linear_op(x.dtype)
        assert lin is not None
        if not x.is_contiguous():
            # oneDNN takes its input row-major and would otherwise copy it into fresh memory
            # itself; a recycled buffer saves the page faults.
            x = empty(tuple(x.shape), x).copy_(x)
        out = lin(x, _dense(w), bias)
        # oneDNN's fused "+ other" (binary post-op) measured slower than a separate add_.
        return out if other is None else out.add_(other)
    w = _dense(w)
    if other is not None:
        return torch.addmm(other, x, w.t()) if bias is None else torch.addmm(other + bias, x, w.t())
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())


def step_gemm_fns(
    w: Tensor, rows: int, like: Tensor
) -> tuple[Callable[[Tensor, Tensor | None], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """``lin(x, b) = x @ w.T (+ b)`` and ``lin_add(x, other) = other + x @ w.T`` for the
    per-step products of a time loop (at most ``rows`` rows each, the same ``w`` every step).

    ``x`` comes in ``w``'s dtype, ``b`` and ``other`` in the loop's own (``like``'s). Where
    the two differ (bf16 GEMMs in a float32 loop, :mod:`.precision`) ``lin(x, None)`` is the
    bf16 product and the sums with ``b`` and ``other`` are float32. Where oneDNN runs them,
    ``w`` is reordered once per sequence into oneDNN's blocked layout: the plain call would
    re-lay the weight out at every step.
    """
    w = _dense(w)
    lin = onednn.linear_op(w.dtype) if use_onednn(w, rows) else None
    if lin is not None and onednn.packing_works(w.dtype):
        w = onednn.reorder(w, rows)
    if w.dtype != like.dtype:

        def product(x: Tensor) -> Tensor:
            return torch.mm(x, w.t()) if lin is None else lin(x, w, None)

        return (
            lambda x, b: product(x) if b is None else torch.add(b, product(x)),
            lambda x, other: torch.add(other, product(x)),
        )
    if lin is not None:
        return (lambda x, b: lin(x, w, b), lambda x, other: lin(x, w, None).add_(other))
    return (
        lambda x, b: torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t()),
        lambda x, other: torch.addmm(other, x, w.t()),
    )


class _Projection(torch.autograd.Function):
    """``x @ W.T + b`` on oneDNN, with its (two GEMMs and a sum) backward: the input
    projection of every time step at once. Used only where :func:`use_onednn` holds;
    elsewhere the projection is a plain autograd ``addmm``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        return mm_nt(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = mm_nt(dy, w.t()) if need[0] else None  # (N, G) @ (G, I)
        dw = mm_nt(x.t(), dy.t()).t() if need[1] else None  # (x^T dy)^T = dy^T x: (G, I)
        db = dy.sum(0) if need[2] else None
        return dx, dw, db


def project(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
    """The input projection of every step as one GEMM: (T, B, I) -> (T, B, G)."""
    T, B, n_in = x.shape
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        # The cast autocast would make, and the copy a batch_first input needs, in one pass.
        x = x.to(torch.bfloat16, memory_format=torch.contiguous_format)
    x2 = x.reshape(T * B, n_in)
    if use_onednn(x2, T * B) and not torch.is_autocast_enabled("cpu"):
        xg = _Projection.apply(x2, w_ih, bias)
    elif bias is None:
        xg = torch.mm(x2, w_ih.t())
    else:
        xg = torch.addmm(bias, x2, w_ih.t())
    return xg.view(T, B, w_ih.shape[0])


def dw_hh(dG: Tensor, h0: Tensor, hs: Tensor) -> Tensor:
    """dW_hh = sum_t dG_t^T h_{t-1}, as one GEMM over all steps (plus the h0 term).

    dG: (T, B, G) contiguous gradients of the recurrent pre-activations; h0: (B, H);
    hs: (T, B, H). Returns (G, H). Rows of a packed batch past a sequence's end must hold
    zeros in ``dG`` and finite values in ``hs``.
    """
    T, B, G = dG.shape
    H = hs.shape[-1]
    dw_t = torch.mm(h0.t(), dG[0])  # (H, G): the h0 term (K = B, tiny)
    if T > 1:
        # dW^T = H_prev^T dG: both operands enter as transposes of contiguous matrices.
        dw_t = mm_nt(hs[:-1].reshape(-1, H).t(), dG[1:].reshape(-1, G).t(), other=dw_t)
    return dw_t.t()
