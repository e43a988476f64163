"""Recycled CPU buffers for the fused time loops: the only user of storage use counts.

A training step of the fused layers needs a few large buffers per layer (saved activations,
hidden states, gate gradients: tens of MiB). Fresh memory of that size comes from the OS and
costs a page fault per 4 KiB on first touch, about as much as the arithmetic done in it, so
buffers of 1 MiB and more are recycled across calls on the CPU. Safety rests on handing out
*views*: the pool keeps the base tensor, and a base is reused only when nothing but the pool
refers to it, i.e. every view handed out (and anything derived from it: saved tensors, views,
detached aliases, Python references) is gone, which shows in the base's TensorImpl and
storage use counts. Those counts are private torch APIs, so they are probed once; where they
do not behave as relied on, every buffer is fresh memory.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

__all__ = ["WORKSPACE", "Workspace", "empty"]


def _use_counts(t: Tensor) -> tuple[int, int]:
    return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _probe_use_counts() -> tuple[int, int] | None:
    """The use counts of a tensor nothing else refers to, if the counts behave as relied
    on; None disables recycling."""
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


class Workspace:
    """A pool of large CPU buffers, handed out as views and reused once idle."""

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


WORKSPACE = Workspace()


def empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """:meth:`Workspace.empty` of the process-wide pool."""
    return WORKSPACE.empty(shape, like)
