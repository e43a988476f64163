"""oneDNN's GEMM, as torch exposes it: the only user of ``torch.ops.mkldnn._*``.

torch.nn's own CPU LSTM runs on oneDNN. charlm uses the same library's plain matrix product,
the linear op ``mkldnn::_linear_pointwise`` (``x @ w.T + b``; no recurrent kernel is
involved), and its weight reorder ``mkldnn::_reorder_linear_weight``, which lays a weight out
once in oneDNN's blocked format so that the per-step products of a time loop skip the
re-layout. Both are private ops: each is probed once per operand dtype (float32, and bf16
under autocast: see :mod:`.precision`) for presence and for correct results, and a build or
CPU without them (or with broken ones) gets None / False and the callers fall back to
``torch.addmm``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["linear_op", "packing_works", "reorder"]

# Per dtype (float32; bfloat16 under autocast): the probed op, or None where it fails.
_linear: dict[torch.dtype, Callable[..., Tensor] | None] = {}
_packs: dict[torch.dtype, bool] = {}
_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # the probes' tolerance per dtype


def linear_op(
    dtype: torch.dtype = torch.float32,
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor] | None:
    """``f(x, w, b) = x @ w.T + b`` on oneDNN for ``dtype`` operands, if this build (and, for
    bf16, this CPU) has a working op, else None."""
    if dtype not in _linear:
        try:
            op = torch.ops.mkldnn._linear_pointwise.default
            # Small integers: every product and sum is exact in bf16 too.
            x = torch.arange(6.0).view(2, 3).to(dtype)
            w = torch.arange(12.0).view(4, 3).to(dtype)
            ok = torch.equal(op(x, w, None, "none", [], ""), x @ w.t())
            _linear[dtype] = (lambda x, w, b: op(x, w, b, "none", [], "")) if ok else None
        except Exception:  # op missing in this build, or unusable: fall back to addmm
            _linear[dtype] = None
    return _linear[dtype]


def reorder(w: Tensor, rows: int) -> Tensor:
    """``w`` (N, K) laid out in oneDNN's blocked format for products with ``rows`` rows; the
    result only goes into :func:`linear_op`'s ``w``."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def packing_works(dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`reorder` exists and :func:`linear_op` multiplies ``dtype`` operands
    correctly with its output, also for a row count other than the one it was reordered for."""
    if dtype not in _packs:
        try:
            op = linear_op(dtype)
            w = (torch.arange(96.0).view(12, 8) / 50).to(dtype)
            x = (torch.arange(64.0).view(8, 8) / 40).to(dtype)
            packed = reorder(w, 8)
            tol = _TOL.get(dtype, 1e-5)
            _packs[dtype] = op is not None and all(
                torch.allclose(op(x[:n], packed, None).float(), x[:n].float() @ w.float().t(),
                               rtol=tol, atol=tol)
                for n in (8, 5)
            )
        except Exception:  # op missing in this build, or unusable: plain weights
            _packs[dtype] = False
    return _packs[dtype]
