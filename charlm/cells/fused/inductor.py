"""Compiled per-step kernels: the only user of ``torch._inductor`` and ``make_fx``.

Only the single step is compiled, never the loop, so the compile time does not grow with the
sequence length. :func:`kernel` takes a plain torch-ops step function (the reference, e.g.
:func:`.lstm_step.lstm_forward`), traces it with ``make_fx`` + ``functionalize`` and compiles
it with ``torch._inductor.standalone_compile``, which skips Dynamo's guard checks, into one
C++ loop; then it calls Inductor's generated code directly (:func:`_direct_call`), skipping
the wrappers' per-call cost. Per-call and per-step costs measured on this project's machines
are in docs/performance.md.

Compiling is an optimisation, never a requirement. :func:`kernel` compiles once per
(function, shapes, strides, dtype, thread count) and caches the result in memory (Inductor
also caches on disk, so a later process loads it in about a second). It returns None, and
the caller runs the function eagerly, when compiling is off (``CHARLM_COMPILE=0`` or
``ENABLED = False``), the tensors are not on the CPU, a step has fewer than
:data:`MIN_NUMEL` elements per gate (too small to pay back the seconds of compiling), or
compiling fails (no C++ compiler, a torch older than 2.8 without ``standalone_compile``); a
failure warns once. Every fresh kernel is checked against its eager reference before use.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ENABLED", "MIN_NUMEL", "eligible", "kernel"]

ENABLED = os.environ.get("CHARLM_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
MIN_NUMEL = 4096  # B * H below this: eager (the tests' tiny models, batch-1 sampling)
_MAX_KERNELS = 32  # distinct shapes compiled per process; later ones run eagerly


_kernels: dict[tuple, Callable[..., object] | None] = {}
uses = 0  # how many times kernel() handed out a compiled kernel (once per sequence and layer)
_lock = threading.Lock()
_warned = False


def eligible(like: Tensor, numel: int) -> bool:
    """Whether a step whose state is like ``like``, ``numel`` (= B * H) elements per gate, is
    one :func:`kernel` would compile: compiling on, CPU, a float32/64 state, big enough."""
    return (
        ENABLED
        and like.device.type == "cpu"
        and like.dtype in (torch.float32, torch.float64)
        and numel >= MIN_NUMEL
    )


def kernel(fn: Callable[..., None], *args: Tensor,
           state: Tensor | None = None) -> Callable[..., object] | None:
    """A compiled ``fn`` for arguments shaped like ``args``, or None (run ``fn`` eagerly).

    ``args`` are example arguments (only their shapes, strides, dtypes and device are used;
    their contents are left alone). ``state`` (default: the third argument, c_prev or dc) is
    one step's (B, H) state: its dtype and ``B * H`` decide eligibility; other arguments may
    be bf16 (:mod:`.precision`).
    """
    state = args[2] if state is None else state
    if not eligible(state, state.numel()):
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
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch-internal imports
            traced = make_fx(functionalize(fn))(*example())
            # No per-call shape/stride checks in the generated code (about 6 us a call, as much
            # as a small step's arithmetic): kernel() hands a kernel out only for the shapes,
            # strides and dtypes it was compiled for.
            with torch._inductor.config.patch(size_asserts=False):
                compiled = standalone_compile(
                    traced, example(), dynamic_shapes="from_example_inputs"
                )
            want = example()
            fn(*want)
            for candidate in (_direct_call(compiled), compiled):
                if candidate is None:
                    continue
                got = example()
                candidate(*got)
                if all(_close(a, b) for a, b in zip(got, want, strict=True)):
                    return candidate
        raise RuntimeError("the compiled kernel disagrees with its eager reference")
    except Exception as exc:  # anything at all: the eager path is always there
        _warn_once(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to rounding in their dtype (bf16 outputs may round the other way)."""
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(a.dtype, 1e-2)
    return torch.allclose(a, b, rtol=tol, atol=tol)


def _direct_call(artifact: object) -> Callable[..., object] | None:
    """The generated module's own ``call`` inside Inductor's wrappers, or None.

    The wrappers (standalone artifact, AOT runtime wrapper, CompiledFxGraph) cost about as
    much per call as a step's arithmetic at the reference shape. The inner
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
            f"charlm: could not compile a fused step kernel ({reason}); using the eager "
            "torch-ops path (correct, somewhat slower). Set CHARLM_COMPILE=0 to skip trying.",
            RuntimeWarning,
            stacklevel=3,
        )
