"""CUDA graphs of one fused layer, forward and backward: the CUDA time loop.

On a GPU the fused time loop is launch-bound: per step and layer one GEMM and a dozen small
pointwise kernels forward and about as many backward, each costing microseconds to launch
for far less arithmetic at the presets' sizes (~5,000 launches per training step at the
``lstm`` preset). A CUDA graph records every launch of one call once and replays them all
at once: ``torch.cuda.make_graphed_callables`` captures a layer's forward and its backward as
two graphs behind one autograd Function. The eager CUDA path stays the reference: a graph
replays exactly its kernels, and each one is checked against it before use.

A layer call runs as a graph only where that is safe and known right (:func:`wanted`,
:func:`run`):

- CUDA, graphs on (``CHARLM_CUDA_GRAPHS=0`` or ``ENABLED = False`` turn them off), training
  with gradients, a dense batch (a packed one's per-step row counts vary from batch to
  batch);
- one graph per key: the function, every tensor's shape, stride, dtype, device and
  requires_grad, the weights' identity (each layer has its own), the autocast state and the
  static arguments; at most :data:`MAX_GRAPHS` (each keeps its own memory), later keys run
  eagerly;
- a fresh graph is checked on its first use against the eager function: the outputs, and
  the gradients of every input that needs one for the same random output gradient. A
  capture error or a mismatch warns once and leaves that key eager for good;
- a graph keeps its saved activations in its own buffers, which its next replay overwrites:
  a call whose graph still waits for the backward of its previous forward runs eagerly, and
  outputs and gradients are handed out as copies, so nothing a caller holds (an output, a
  parameter's .grad under gradient accumulation) changes under it.

Weights enter a graph as copies (refreshed at every replay), never as the parameters
themselves, so a replay can never write into a parameter. Everything but the capture itself
(eligibility, keys, the check, the fallback, the busy guard) is tested on the CPU, with
:func:`_capture` and :func:`_device_ok` stubbed (tests/test_cuda_graph.py);
benchmarks/gpu_smoke.sh times the graphs against eager on a GPU.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ENABLED", "MAX_GRAPHS", "run", "wanted"]

ENABLED = os.environ.get("CHARLM_CUDA_GRAPHS", "1").strip().lower() not in (
    "0", "false", "no", "off")
MAX_GRAPHS = 16  # distinct keys captured per process; later ones run eagerly
_WARMUP_ITERS = 3  # make_graphed_callables' warm-up runs before capturing

uses = 0  # replays handed out (the self-check's not counted)
_lock = threading.Lock()
_capturing = threading.local()  # inside _prepare: the layer functions run eagerly
_warned = False


@dataclass
class _Graph:
    call: Callable[..., tuple[Tensor, ...]]
    busy: bool = False  # a forward replayed whose backward has not run yet


_graphs: dict[tuple, _Graph | None] = {}


def _device_ok(x: Tensor) -> bool:
    return x.device.type == "cuda"


def wanted(x: Tensor, grad: bool, rows: object) -> bool:
    """Whether a layer call on ``x`` may run as a graph: graphs on, CUDA, with gradients,
    dense (``rows`` None)."""
    return ENABLED and grad and rows is None and _device_ok(x)


def run(fn: Callable[..., tuple[Tensor, list[Tensor]]], tensors: Sequence[Tensor | None],
        static: tuple = ()) -> tuple[Tensor, list[Tensor]] | None:
    """``fn(*tensors, *static, True, None)`` (a fused layer with gradients, dense: it
    returns (hs, [final states])) replayed from its CUDA graph, or None: run ``fn``
    eagerly (no graph for this key, or it is busy)."""
    if getattr(_capturing, "on", False):  # fn itself, called while capturing or checking
        return None
    key = _key(fn, tensors, static)
    with _lock:
        if key not in _graphs:
            _graphs[key] = None if len(_graphs) >= MAX_GRAPHS else _prepare(fn, tensors, static)
        graph = _graphs[key]
        if graph is None or graph.busy:
            return None
        graph.busy = True
    global uses
    uses += 1
    outs = graph.call(*_OwnGradients.apply(*_present(tensors)))
    needs_grad = [o for o in outs if o.requires_grad]
    if needs_grad:
        def free(_grad: Tensor, graph: _Graph = graph) -> None:
            graph.busy = False

        for o in needs_grad:  # the graph's backward runs once any of these has its gradient
            o.register_hook(free)
    else:
        graph.busy = False
    hs, *finals = (o.clone() for o in outs)  # the graph's next replay overwrites its own
    return hs, finals


class _OwnGradients(torch.autograd.Function):
    """The identity, whose backward copies each gradient: a graph's backward returns its
    gradients in its own buffers, which its next replay overwrites, and autograd may keep
    such a tensor as a parameter's .grad as it is; a copy is the caller's to keep."""

    @staticmethod
    def forward(ctx, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        return tuple(None if g is None else g.clone() for g in grads)


def _key(fn, tensors: Sequence[Tensor | None], static: tuple) -> tuple:
    def describe(t: Tensor | None) -> tuple | None:
        if t is None:
            return None
        # parameters by identity (one graph per layer), activations by their layout
        ident = id(t) if isinstance(t, torch.nn.Parameter) else None
        return (tuple(t.shape), t.stride(), t.dtype, str(t.device), t.requires_grad, ident)

    dev = next(t for t in tensors if t is not None).device.type
    amp = torch.is_autocast_enabled(dev)
    amp_dtype = torch.get_autocast_dtype(dev) if amp else None
    return (fn, tuple(describe(t) for t in tensors), static, amp, amp_dtype)


def _present(tensors: Sequence[Tensor | None]) -> list[Tensor]:
    return [t for t in tensors if t is not None]


def _flat(fn, tensors: Sequence[Tensor | None], static: tuple) -> Callable[..., tuple]:
    """``fn`` as a function of the tensors that are present, returning one flat tuple."""
    slots = [t is not None for t in tensors]

    def flat(*present: Tensor) -> tuple[Tensor, ...]:
        it = iter(present)
        args = [next(it) if filled else None for filled in slots]
        hs, finals = fn(*args, *static, True, None)
        return (hs, *finals)

    return flat


def _prepare(fn, tensors: Sequence[Tensor | None], static: tuple) -> _Graph | None:
    """Capture ``fn`` for arguments like ``tensors`` and check it against eager on them;
    None (and a one-time warning) if either fails."""
    flat = _flat(fn, tensors, static)
    present = _present(tensors)
    _capturing.on = True
    try:
        # Static inputs: copies (a replay copies each call's tensors into them), with the
        # same requires_grad; the weights' too, so a replay never writes a parameter.
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in present)
        call = _capture(flat, sample)
        if not _agrees(call, flat, present):
            raise RuntimeError("the graph disagrees with the eager path")
        return _Graph(call)
    except Exception as exc:  # anything at all: the eager path is always there
        _warn_once(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None
    finally:
        _capturing.on = False


def _capture(flat: Callable[..., tuple], sample: tuple[Tensor, ...]) -> Callable[..., tuple]:
    """The CUDA graphs (forward, backward) of ``flat`` for inputs like ``sample``."""
    dev = sample[0].device.type
    if torch.is_autocast_enabled(dev):  # graphs cannot capture autocast's weight cache
        with torch.autocast(dev, dtype=torch.get_autocast_dtype(dev), cache_enabled=False):
            return torch.cuda.make_graphed_callables(flat, sample,
                                                     num_warmup_iters=_WARMUP_ITERS)
    return torch.cuda.make_graphed_callables(flat, sample, num_warmup_iters=_WARMUP_ITERS)


def _agrees(call, flat, inputs: list[Tensor]) -> bool:
    """``call`` and ``flat`` on ``inputs``: the same outputs, and the same gradients of
    every input that requires one for the same random output gradients."""
    wrt = [t for t in inputs if t.requires_grad]
    results = []
    for f in (call, flat):
        outs = f(*inputs)
        gen = torch.Generator(device=outs[0].device).manual_seed(0)
        grads_out = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
                     for o in outs]
        grads = torch.autograd.grad([o for o in outs if o.requires_grad], wrt,
                                    [g for o, g in zip(outs, grads_out, strict=True)
                                     if o.requires_grad], allow_unused=True) if wrt else ()
        results.append([o.detach().clone() for o in outs] + [  # the graph's own buffers
            torch.zeros_like(t) if g is None else g.clone()
            for t, g in zip(wrt, grads, strict=True)])
    return all(_close(a, b) for a, b in zip(*results, strict=True))


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to the order of float additions (the same kernels, replayed)."""
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(a.dtype, 2e-2)
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol * max(scale, 1.0)))


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"charlm: could not use a CUDA graph for a recurrent layer ({reason}); using the "
            "eager CUDA path (correct, slower). Set CHARLM_CUDA_GRAPHS=0 to skip trying.",
            RuntimeWarning, stacklevel=4)


def clear() -> None:
    """Forget every graph (their memory goes back to the caching allocator)."""
    with _lock:
        _graphs.clear()
