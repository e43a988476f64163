"""Matrix products of the fused time loops, on whichever backend is fastest on this machine.

Three CPU backends compute the same ``x @ w.T (+ b)``: torch's own (``torch.mm``/``addmm``,
MKL on x86 builds), oneDNN's linear op (:mod:`.onednn`, the library behind torch.nn's CPU
LSTM) and, for a time loop's per-step float32 products, MKL's packed-weight GEMM
(:mod:`.mkl`, the weight packed once per sequence). Which is fastest depends on the CPU and
the shape: oneDNN's fp32 GEMM is up to 2x faster than MKL's on one AMD EPYC, MKL's up to
1.9x faster than oneDNN's on one Intel Xeon (figures per machine in docs/performance.md). So
nothing here is tuned to a CPU: the first large product of each shape (per dtype, operand
layout and thread count) is run on every candidate, interleaved, best of a few calls
(:func:`_fastest`, a few milliseconds once per shape and process), and a time loop's
per-step products are timed inside the loop, each candidate in turn
(:func:`_in_loop_choice`); each shape keeps its winner. ``BACKEND`` (env ``CHARLM_GEMM``:
``auto``, ``onednn``, ``torch`` or ``mkl``) forces one where it applies, for reproducibility
or debugging. CUDA, float64, tiny batches and builds without the private ops always take
torch's. Every function here computes a plain ``x @ w.T (+ b)``, in its operands' dtype
(bf16 GEMMs accumulate in float32 inside the kernel: see :mod:`.precision`); the layer tests
hold the results to torch.nn on each backend.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import mkl, onednn
from .workspace import empty

__all__ = ["BACKEND", "choices", "dw_hh", "mm_nt", "project", "recurrence_precision", "restore",
           "step_gemm_fns"]

_BACKENDS = ("auto", "onednn", "torch", "mkl")
_PRECISIONS = ("bf16", "fp32")  # what recurrence_precision chooses between
BACKEND = os.environ.get("CHARLM_GEMM", "auto").strip().lower()
if BACKEND not in _BACKENDS:
    warnings.warn(f"charlm: CHARLM_GEMM={BACKEND!r} is none of {', '.join(_BACKENDS)}; "
                  "using auto", RuntimeWarning, stacklevel=2)
    BACKEND = "auto"
MIN_ROWS = 8  # below this many rows only torch.mm is used (the others cost more per call)
# Products of fewer multiply-adds take torch's GEMM unraced (unless forced): they last a few
# microseconds, where a race cannot tell the backends apart and a choice that flips between
# processes would cost bit-identical reruns for nothing.
RACE_MIN_MACS = 1 << 20

# Per product kind and shape (the key as text): the backend that won its race (see _fastest).
# Read by `charlm bench --json` through choices(); checkpoints keep it, so that a resumed run
# multiplies on the backends it started on (restore()).
_winner: dict[str, str] = {}
# A time loop's per-step products are chosen in the loop itself: each candidate runs whole
# sequences in turn, every step timed, until each has TRIAL_CALLS timings; the lowest median
# wins. Raced alone, back to back with hot operands, the LSTM's and GRU's bf16 per-step products
# mostly went to torch's GEMM, which made their training steps 3-6% slower than oneDNN's does
# in the loop (docs/performance.md).
TRIAL_CALLS = 256
_trials: dict[str, dict[str, list[float]]] = {}  # key text -> candidate -> seconds per call


def onednn_possible(t: Tensor, rows: int) -> bool:
    """Whether products with ``t``'s dtype and ``rows`` rows may run on oneDNN."""
    return (
        BACKEND != "torch"
        and rows >= MIN_ROWS
        and t.dtype in (torch.float32, torch.bfloat16)
        and t.device.type == "cpu"
        and onednn.linear_op(t.dtype) is not None
    )


def _mkl_possible(w: Tensor, rows: int) -> bool:
    """Whether per-step products with ``w`` may run on MKL's packed GEMM (float32 only)."""
    return (
        rows >= MIN_ROWS
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and mkl.packed_linear() is not None
    )


Thunk = Callable[[], object]


def _choose(key: tuple, names: tuple[str, ...], race: Callable[[], dict[str, Thunk]],
            macs: int, default: str = "torch") -> str:
    """The backend (one of ``names``, always including ``default``) that runs the product
    ``key`` names, of ``macs`` multiply-adds: forced by ``BACKEND`` where it is one of them,
    else ``default`` below ``RACE_MIN_MACS``, else the fastest of the calls ``race()`` makes,
    one per name (:func:`_fastest`), run the first time ``key`` is seen and remembered."""
    found, text = _settled(key, names, macs, default)
    if found is None:
        with torch.no_grad():
            found = _winner[text] = _fastest(race())
    return found


def _settled(key: tuple, names: tuple[str, ...], macs: int, default: str):
    """(choice, key as text): the choice ``BACKEND`` forces (``default`` where it forces
    none of ``names``), ``default`` below ``RACE_MIN_MACS``, or the one already made (raced,
    tried in the loop, or restored), else None: still to be chosen."""
    text = " ".join(map(str, key))
    if BACKEND != "auto":
        return (BACKEND if BACKEND in names else default), text
    if macs < RACE_MIN_MACS:
        return default, text
    found = _winner.get(text)  # one not in names: restored from a machine that had another
    return (found if found in names else None), text


def _fastest(calls: dict[str, Thunk]) -> str:
    """The name of the fastest call: after one warm-up call each, the best of a few
    interleaved timings (seven for calls under 1 ms, three above), each of enough calls to
    last ~0.5 ms, above the clock's noise. Interleaving and the best time keep a drifting or
    briefly busy machine from favouring any."""
    once = float("inf")
    for f in calls.values():
        t0 = time.perf_counter()
        f()
        once = min(once, time.perf_counter() - t0)
    repeat = max(1, min(100, int(5e-4 / max(once, 1e-7))))
    rounds = 3 if once > 1e-3 else 7
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, f in calls.items():
            t0 = time.perf_counter()
            for _ in range(repeat):
                f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return min(best, key=best.__getitem__)


def choices() -> dict[str, str]:
    """The backend each product shape raced so far runs on: {key: backend}."""
    return dict(_winner)


def restore(saved: object) -> None:
    """Take the choices a checkpoint recorded (:func:`choices`) as this process's, so that
    a resumed run multiplies on the backends it started on, bit for bit. Anything that is not
    a {key: backend} of known backends is ignored (a product then races as usual)."""
    if isinstance(saved, dict):
        _winner.update({k: v for k, v in saved.items()
                        if isinstance(k, str) and v in (*_BACKENDS[1:], *_PRECISIONS)})


def recurrence_precision(kind: str, like: Tensor, weight: Tensor,
                         run: Callable[[torch.dtype | None], object]) -> torch.dtype | None:
    """bf16 or None (float32): the dtype of a recurrence's own GEMMs under bf16 autocast
    (its per-step products and recurrent weight gradient), whichever makes the recurrence
    faster here. ``run(dtype)`` runs it once, forward and backward, on copies of its inputs;
    the first recurrence of each shape races the two (:func:`_fastest`), remembered like the
    backends. On one Intel Xeon the RNN's recurrence ran 10% faster in float32 (its bf16
    per-step product costs as much as the float32 one) and the GRU's 12% slower."""
    T, B, G = like.shape
    key = ("recurrence", kind, T, B, G, weight.shape[1], torch.get_num_threads())

    def timed(dtype: torch.dtype | None) -> Thunk:
        def call() -> object:
            with torch.enable_grad():  # the race runs under no_grad
                return run(dtype)

        return call

    def race() -> dict[str, Thunk]:
        return {"bf16": timed(torch.bfloat16), "fp32": timed(None)}

    macs = T * B * G * weight.shape[1]
    found = _choose(key, _PRECISIONS, race, macs, default="bf16")  # forced backend: bf16
    return None if found == "fp32" else torch.bfloat16


def _layout(t: Tensor) -> str:
    return "n" if t.is_contiguous() else "t"


def _dense(t: Tensor) -> Tensor:
    """``t`` if it is row- or column-major, else a contiguous copy (oneDNN crawls on other
    strides)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def recycled(rows: int, cols: int, like: Tensor) -> Tensor:
    """An uninitialised (rows, cols) tensor in a recycled buffer (:mod:`.workspace`: fresh
    memory of this size costs a page fault per 4 KiB, ~5 ms for an LSTM layer's input
    projection here). ``detach()`` makes it a plain alias rather than a view, so that
    autograd lets callers write in place into a custom Function's output made in it; it
    still counts as a use of the buffer."""
    return empty((rows, cols), like).detach()


def mm_nt(
    x: Tensor, w: Tensor, bias: Tensor | None = None, other: Tensor | None = None,
    recycle: bool = False,
) -> Tensor:
    """``x @ w.T (+ bias) (+ other)`` for large operands; with ``recycle`` the result
    lands in a recycled buffer (:func:`recycled`) where the backend lets it."""
    w = _dense(w)

    def on_torch() -> Tensor:
        out = recycled(x.shape[0], w.shape[0], x) if recycle else None
        if other is not None:
            return torch.addmm(other if bias is None else other + bias, x, w.t(), out=out)
        if bias is None:
            return torch.mm(x, w.t(), out=out)
        return torch.addmm(bias, x, w.t(), out=out)

    if onednn_possible(x, x.shape[0]):
        lin = onednn.linear_op(x.dtype)
        assert lin is not None
        key = ("mm_nt", x.dtype, *x.shape, w.shape[0], _layout(x), _layout(w),
               bias is not None, torch.get_num_threads())

        def on_onednn() -> Tensor:
            x_in = x
            if not x.is_contiguous():
                # oneDNN takes its input row-major and would otherwise copy it into fresh
                # memory itself; a recycled buffer saves the page faults.
                x_in = empty(tuple(x.shape), x).copy_(x)
            return lin(x_in, w, bias)

        def race() -> dict[str, Thunk]:  # each as it would run, bias included
            return {"onednn": on_onednn, "torch": on_torch}

        macs = x.shape[0] * x.shape[1] * w.shape[0]
        if _choose(key, ("onednn", "torch"), race, macs) == "onednn":
            out = on_onednn()
            # oneDNN's fused "+ other" (binary post-op) measured slower than a separate add_.
            return out if other is None else out.add_(other)
    return on_torch()


def step_gemm_fns(
    w: Tensor, rows: int, like: Tensor
) -> tuple[Callable[[Tensor, Tensor | None], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """``lin(x, b) = x @ w.T (+ b)`` and ``lin_add(x, other) = other + x @ w.T`` for the
    per-step products of a time loop (at most ``rows`` rows each, the same ``w`` every step).

    ``x`` comes in ``w``'s dtype, ``b`` and ``other`` in the loop's own (``like``'s). Where
    the two differ (bf16 GEMMs in a float32 loop, :mod:`.precision`) ``lin(x, None)`` is the
    bf16 product and the sums with ``b`` and ``other`` are float32. The weight is laid out
    once per sequence for the backend that runs the products: oneDNN's blocked layout (the
    plain call would re-lay the weight out at every step), row-major (K, N) for torch's
    (faster than the transposed view), or MKL's packed panels; which backend is decided per
    shape in the loop itself (:func:`_in_loop_choice`).
    """
    w = _dense(w)
    lin = onednn.linear_op(w.dtype) if onednn_possible(w, rows) else None
    names = ("torch", *(("onednn",) if lin is not None else ()),
             *(("mkl",) if _mkl_possible(w, rows) else ()))
    if len(names) > 1:
        op, packed_op = lin, mkl.packed_linear()

        def laid_out(name: str) -> Tensor:
            if name == "torch":
                return w.t().contiguous()  # row-major (K, N)
            if name == "mkl":
                return mkl.pack(w, rows)
            return onednn.reorder(w, rows) if onednn.packing_works(w.dtype) else w

        key = ("step", w.dtype, rows, w.shape[1], w.shape[0], torch.get_num_threads())
        name, record = _in_loop_choice(key, names, rows * w.shape[1] * w.shape[0])
        if name == "mkl":
            fns = _packed_fns(packed_op, laid_out("mkl"), w, rows)
        elif name == "onednn":
            fns = _plain_fns(op, laid_out("onednn"), like)
        else:  # torch.mm(x, w.t()) reads the row-major copy
            fns = _plain_fns(None, laid_out("torch").t(), like)
        return fns if record is None else _timed(fns, record)
    return _plain_fns(lin, w, like)


def _in_loop_choice(key: tuple, names: tuple[str, ...], macs: int):
    """(backend, record) for a time loop's per-step products of ``key``: forced, too small to
    choose (torch's), or chosen (``record`` None); else, while the trial lasts, the candidate
    with the fewest timings so far and ``record(seconds)`` for each of its steps' times
    (:func:`_timed`). The trial ends at the first call after every candidate has
    ``TRIAL_CALLS`` of them."""
    found, text = _settled(key, names, macs, "torch")
    if found is not None:
        return found, None
    trial = _trials.setdefault(text, {})
    for name in names:
        trial.setdefault(name, [])
    if all(len(trial[n]) >= TRIAL_CALLS for n in names):
        _winner[text] = min(names, key=lambda n: statistics.median(trial[n]))
        del _trials[text]
        return _winner[text], None
    name = min(names, key=lambda n: len(trial[n]))
    return name, trial[name].append


def _timed(fns, record: Callable[[float], object]):
    """``fns`` (a ``(lin, lin_add)`` pair for one sequence) passing ``record`` the time from
    each product's start to the next one's: a whole step of the loop. The product alone
    does not tell the backends apart: the LSTM's bf16 one takes about as long on torch's
    GEMM as on oneDNN's, but the step around it is 6% faster on oneDNN's."""
    last = [0.0]

    def timed(f):
        def call(x: Tensor, other: Tensor | None) -> Tensor:
            now = time.perf_counter()
            if last[0]:
                record(now - last[0])
            last[0] = now
            return f(x, other)

        return call

    return tuple(timed(f) for f in fns)


def _plain_fns(lin, w: Tensor, like: Tensor):
    """:func:`step_gemm_fns`'s pair on oneDNN's op (``lin``) or, where ``lin`` is None,
    torch's (``w`` then may be a transposed view of a row-major copy)."""
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


def _packed_fns(op, packed: Tensor, w: Tensor, rows: int):
    """:func:`step_gemm_fns`'s pair on MKL's packed GEMM (float32 products and loop:
    :func:`_mkl_possible`). A packed batch's shorter steps (fewer than ``rows`` rows) take
    torch's GEMM: the packing is for ``rows``."""

    def product(x: Tensor) -> Tensor:
        return op(x, packed, w, rows) if x.shape[0] == rows else torch.mm(x, w.t())

    return (
        lambda x, b: product(x) if b is None else product(x).add_(b),
        lambda x, other: product(x).add_(other),
    )


class _Projection(torch.autograd.Function):
    """``x @ W.T + b`` through :func:`mm_nt` (either backend), with its (two GEMMs and a
    sum) backward: the input projection of every time step at once. Used only where
    :func:`onednn_possible` holds; elsewhere the projection is a plain autograd ``addmm``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        return mm_nt(x, w, b, recycle=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = mm_nt(dy, w.t(), recycle=True) if need[0] else None  # (N, G) @ (G, I)
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
    if onednn_possible(x2, T * B) and not torch.is_autocast_enabled("cpu"):
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
