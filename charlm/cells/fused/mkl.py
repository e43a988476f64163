"""MKL's packed-weight GEMM, as torch exposes it: the only user of ``torch.ops.mkl._*``.

A plain sgemm re-packs its weight operand into MKL's internal panels at every call; a time
loop multiplies by the same W_hh at every step, so ``mkl::_mkl_reorder_linear_weight``
packs it once per sequence and ``mkl::_mkl_linear`` (``x @ w.T``) reuses the packing. These
are the ops torch's own freezing pass uses for ``nn.Linear``. Private and float32 only: probed
once for presence and correct results (also for fewer rows than packed for, as a packed
batch's shrinking steps have); a build without them gets None and :mod:`.gemm` races the
other backends only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["pack", "packed_linear"]

_op: list[Callable[[Tensor, Tensor, Tensor, int], Tensor] | None] = []


def pack(w: Tensor, rows: int) -> Tensor:
    """``w`` (N, K) packed for products with ``rows`` rows; only :func:`packed_linear`'s op
    reads it."""
    return torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), rows)


def packed_linear() -> Callable[[Tensor, Tensor, Tensor, int], Tensor] | None:
    """``f(x, packed, w, rows) = x @ w.T`` with ``packed = pack(w, rows)``, if this build has
    working ops, else None."""
    if not _op:
        try:
            op = torch.ops.mkl._mkl_linear.default
            w = torch.arange(96.0).view(12, 8) / 50
            x = torch.arange(64.0).view(8, 8) / 40
            packed = pack(w, 8)
            ok = all(
                torch.allclose(op(x[:n], packed, w, None, 8), x[:n] @ w.t(), rtol=1e-5, atol=1e-5)
                for n in (8, 5)
            )
            _op.append((lambda x, p, w, rows: op(x, p, w, None, rows)) if ok else None)
        except Exception:  # op missing in this build, or unusable
            _op.append(None)
    return _op[0]
