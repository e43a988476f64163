"""Compiled pointwise kernels for the LSTM time loop: the single step, never the loop.

Per time step the fused LSTM layer (charlm.cells) does one GEMM and then the gate
arithmetic. In eager torch that arithmetic is about fifteen small element-wise ops forward
and five backward; at the CPU reference shape (batch 32, hidden 256) each costs 3-5 us of
dispatch and a pass over memory, and together they cost as much as the GEMM itself. This
module writes the pointwise part of one step, forward and backward, once as a plain
torch-ops function (the reference, readable and testable eagerly) and compiles it with
TorchInductor into a single C++ loop: traced with ``make_fx`` and compiled by
``torch._inductor.standalone_compile``, which skips Dynamo's guard checks (its wrappers
cost about 4 us per call against about 15 us for ``torch.compile``), and then called
through Inductor's generated code directly (:func:`_direct_call`, about 1 us). Only the
step is compiled, so the compile time does not grow with the sequence length.

Compiling is an optimisation, never a requirement. :func:`kernel` compiles once per
(function, shapes, strides, dtype, thread count) and caches the result in memory (Inductor
also caches on disk, so a later process loads it in about a second). It returns None,
and the caller runs its eager path, when compiling is off (``CHARLM_COMPILE=0`` or
``ENABLED = False``), the tensors are not on the CPU, a step has fewer than
:data:`MIN_NUMEL` elements per gate (too small to pay back the seconds of compiling), or
compiling fails (no C++ compiler, a torch older than 2.8 without
``standalone_compile``); a failure warns once. Every fresh kernel is checked against its
eager reference before use.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ENABLED", "MIN_NUMEL", "eligible", "kernel", "lstm_backward", "lstm_forward"]

ENABLED = os.environ.get("CHARLM_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
MIN_NUMEL = 4096  # B * H below this: eager (the tests' tiny models, batch-1 sampling)
_MAX_KERNELS = 32  # distinct shapes compiled per process; later ones run eagerly


def _tanh(x: Tensor) -> Tensor:
    # tanh(x) = 2 sigmoid(2x) - 1, exact up to float rounding: Inductor's vectorised
    # sigmoid is much cheaper than its tanh (a forward step measured 17 us against 27 us).
    return 2 * torch.sigmoid(2 * x) - 1


def lstm_forward(
    gemm: Tensor, x: Tensor, c_prev: Tensor, acts: Tensor, c: Tensor, h: Tensor
) -> None:
    """One LSTM step after its recurrent GEMM; writes ``acts``, ``c`` and ``h`` in place.

    Args:
        gemm: (B, 4H) = h_{t-1} W_hh^T.
        x: (B, 4H) = W_ih x_t + b_ih + b_hh (gate order i, f, g, o as in torch.nn).
        c_prev: (B, H) the previous cell state.
        acts: (B, 4H) out: the activated gates [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)],
            all the backward step needs besides the cell states.
        c: (B, H) out: c_t = f c_{t-1} + i g.
        h: (B, H) out: h_t = o tanh(c_t).
    """
    H = c_prev.shape[-1]
    pre = gemm + x  # (B, 4H)
    i = torch.sigmoid(pre[:, :H])
    f = torch.sigmoid(pre[:, H : 2 * H])
    g = _tanh(pre[:, 2 * H : 3 * H])
    o = torch.sigmoid(pre[:, 3 * H :])
    c_t = f * c_prev + i * g
    acts.copy_(torch.cat((i, f, g, o), dim=1))
    c.copy_(c_t)
    h.copy_(o * _tanh(c_t))


def lstm_backward(
    dh_rec: Tensor,
    dh_out: Tensor,
    dc: Tensor,
    acts: Tensor,
    c_prev: Tensor,
    c: Tensor,
    dpre: Tensor,
    dc_prev: Tensor,
) -> None:
    """Backward of :func:`lstm_forward` for one step; writes ``dpre`` and ``dc_prev``.

    Args:
        dh_rec: (B, H) dL/dh_t through the next step's gates (dpre_{t+1} W_hh).
        dh_out: (B, H) dL/dh_t from the layer's output.
        dc: (B, H) dL/dc_t from the next step (through its forget gate).
        acts, c_prev, c: what :func:`lstm_forward` saw and wrote for this step.
        dpre: (B, 4H) out: dL/d(pre-activation) of i, f, g, o.
        dc_prev: (B, H) out: dL/dc_{t-1} = dL/dc_t f.
    """
    H = c.shape[-1]
    i, f, g, o = acts[:, :H], acts[:, H : 2 * H], acts[:, 2 * H : 3 * H], acts[:, 3 * H :]
    dh = dh_rec + dh_out
    tc = _tanh(c)
    dc_t = dc + dh * o * (1 - tc * tc)  # h = o tanh(c)
    d_i = dc_t * g * i * (1 - i)  # sigmoid' = s (1 - s), tanh' = 1 - t^2
    d_f = dc_t * c_prev * f * (1 - f)
    d_g = dc_t * i * (1 - g * g)
    d_o = dh * tc * o * (1 - o)
    dpre.copy_(torch.cat((d_i, d_f, d_g, d_o), dim=1))
    dc_prev.copy_(dc_t * f)


# --------------------------------------------------------------------------------------
# Compilation and its cache.
# --------------------------------------------------------------------------------------

_kernels: dict[tuple, Callable[..., object] | None] = {}
uses = 0  # how many times kernel() handed out a compiled kernel (once per sequence and layer)
_lock = threading.Lock()
_warned = False


def eligible(like: Tensor, numel: int) -> bool:
    """Whether a step on tensors like ``like``, ``numel`` (= B * H) elements per gate, is
    one :func:`kernel` would compile: compiling on, CPU, float32/64, big enough."""
    return (
        ENABLED
        and like.device.type == "cpu"
        and like.dtype in (torch.float32, torch.float64)
        and numel >= MIN_NUMEL
    )


def kernel(fn: Callable[..., None], *args: Tensor) -> Callable[..., object] | None:
    """A compiled ``fn`` for arguments shaped like ``args``, or None (run ``fn`` eagerly).

    ``args`` are example arguments (only their shapes, strides, dtype and device are used;
    their contents are left alone). The first argument's last dimension must be H or 4H
    and its first the batch: ``B * H`` decides against :data:`MIN_NUMEL`.
    """
    if not eligible(args[0], args[-1].numel()):  # the last argument is (B, H) in both
        return None
    key = (
        fn,
        torch.get_num_threads(),
        tuple((a.shape, a.stride(), a.dtype) for a in args),
    )
    found = _kernels.get(key, _kernels)
    if found is _kernels:
        with _lock:
            if key not in _kernels:
                full = len(_kernels) >= _MAX_KERNELS
                _kernels[key] = None if full else _compile(fn, args)
            found = _kernels[key]
    if found is not None:
        global uses
        uses += 1
    return found  # type: ignore[return-value]


def _compile(fn: Callable[..., None], args: tuple[Tensor, ...]) -> Callable[..., object] | None:
    def example() -> list[Tensor]:
        gen = torch.Generator().manual_seed(0)
        out = []
        for a in args:
            t = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype)
            t.copy_(torch.rand(a.shape, generator=gen, dtype=a.dtype))  # (0, 1): gate-like
            out.append(t)
        return out

    try:
        import torch._inductor
        from torch.func import functionalize
        from torch.fx.experimental.proxy_tensor import make_fx

        standalone_compile = getattr(torch._inductor, "standalone_compile", None)
        if standalone_compile is None:
            raise RuntimeError(f"compiling it needs torch >= 2.8, this is {torch.__version__}")
        tol = 1e-5 if args[0].dtype == torch.float32 else 1e-10
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch-internal imports
            traced = make_fx(functionalize(fn))(*example())
            compiled = standalone_compile(traced, example(), dynamic_shapes="from_example_inputs")
            want = example()
            fn(*want)
            for candidate in (_direct_call(compiled), compiled):
                if candidate is None:
                    continue
                got = example()
                candidate(*got)
                if all(
                    torch.allclose(a, b, rtol=tol, atol=tol)
                    for a, b in zip(got, want, strict=True)
                ):
                    return candidate
        raise RuntimeError("the compiled kernel disagrees with its eager reference")
    except Exception as exc:  # anything at all: the eager path is always there
        _warn_once(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def _direct_call(artifact: object) -> Callable[..., object] | None:
    """The generated module's own ``call`` inside Inductor's wrappers, or None.

    The wrappers (standalone artifact, AOT runtime wrapper, CompiledFxGraph) cost about
    5 us per call, as much as the kernel's arithmetic at the reference shape. The inner
    callable sits in a private structure, so it is found by a bounded search for the
    ``current_callable`` attribute that Inductor's compiled graph carries, and
    :func:`_compile` uses it only after checking its results, with the public artifact as
    the fallback.
    """
    seen: set[int] = set()
    queue: list[object] = [artifact]
    while queue and len(seen) < 200:
        obj = queue.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        inner = getattr(obj, "current_callable", None)
        if callable(inner):
            return lambda *a: inner(list(a))  # it takes one list, and empties it
        queue.extend(_referents(obj))
    return None


def _referents(obj: object) -> list[object]:
    """What a wrapper keeps its wrapped callable in: closures, attributes, partials."""
    found: list[object] = []
    func = getattr(obj, "__func__", obj)
    if hasattr(obj, "__self__"):
        found.append(obj.__self__)
    for cell in getattr(func, "__closure__", None) or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    if isinstance(getattr(obj, "__dict__", None), dict) and not isinstance(obj, type):
        found.extend(v for v in vars(obj).values() if not isinstance(v, (type, str, bytes)))
    for name in ("func", "args"):  # functools.partial
        value = getattr(obj, name, None)
        found.extend(value if isinstance(value, tuple) else [value] if callable(value) else [])
    return found


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"charlm: could not compile the fused LSTM step ({reason}); using the eager "
            "torch-ops path (correct, somewhat slower). Set CHARLM_COMPILE=0 to skip trying.",
            RuntimeWarning,
            stacklevel=3,
        )
