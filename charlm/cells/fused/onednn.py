"""oneDNN's GEMM, as torch exposes it: the only user of ``torch.ops.mkldnn._*``.

torch.nn's own CPU LSTM runs on oneDNN. charlm uses the same library's plain matrix product,
the linear op ``mkldnn::_linear_pointwise`` (``x @ w.T + b``; no recurrent kernel is
involved), and its weight reorder ``mkldnn::_reorder_linear_weight``, which lays a weight out
once in oneDNN's blocked format so that the per-step products of a time loop skip the
re-layout. Both are private ops: each is probed once for presence and for correct results,
and a build without them (or with broken ones) gets None / False and the callers fall back
to ``torch.addmm``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["linear_op", "packing_works", "reorder"]

_linear: Callable[..., Tensor] | None | bool = False  # False: not probed yet
_packs: bool | None = None  # None: not probed yet


def linear_op() -> Callable[[Tensor, Tensor, Tensor | None], Tensor] | None:
    """``f(x, w, b) = x @ w.T + b`` on oneDNN, if this build has a working op, else None."""
    global _linear
    if _linear is False:
        try:
            op = torch.ops.mkldnn._linear_pointwise.default
            x = torch.arange(6.0).view(2, 3)
            w = torch.arange(12.0).view(4, 3)
            ok = torch.equal(op(x, w, None, "none", [], ""), x @ w.t())
            _linear = (lambda x, w, b: op(x, w, b, "none", [], "")) if ok else None
        except Exception:  # op missing in this build, or unusable: fall back to addmm
            _linear = None
    return _linear  # type: ignore[return-value]


def reorder(w: Tensor, rows: int) -> Tensor:
    """``w`` (N, K) laid out in oneDNN's blocked format for products with ``rows`` rows; the
    result only goes into :func:`linear_op`'s ``w``."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def packing_works() -> bool:
    """Whether :func:`reorder` exists and :func:`linear_op` multiplies correctly with its
    output, also for a row count other than the one it was reordered for."""
    global _packs
    if _packs is None:
        try:
            op = linear_op()
            w = torch.arange(96.0).view(12, 8) / 50
            x = torch.arange(64.0).view(8, 8) / 40
            packed = reorder(w, 8)
            _packs = op is not None and all(
                torch.allclose(op(x[:n], packed, None), x[:n] @ w.t(), rtol=1e-5, atol=1e-5)
                for n in (8, 5)
            )
        except Exception:  # op missing in this build, or unusable: plain weights
            _packs = False
    return _packs
