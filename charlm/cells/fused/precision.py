"""Which dtype each part of a fused layer runs in under autocast.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` every matrix product of a layer is a
bf16 GEMM (oneDNN, on AMX or AVX512-BF16 where the CPU has them, accumulates in float32):

- the input projection of every step, W_ih x_t: autocast's own ``addmm``, forward and
  backward;
- the per-step recurrent products h_{t-1} W_hh^T, and dpre_t W_hh in the backward pass, on a
  bf16 copy of W_hh made once per forward (the layer functions in :mod:`charlm.cells.fused`);
- the weight gradient dW_hh = sum_t dpre_t^T h_{t-1}, one GEMM over all steps.

The loops keep bf16 copies of those GEMMs' operands (h_t, dpre_t: :class:`.scan.GemmCopy`),
each written once when its step is done, which then also feed the weight-gradient GEMM.
Everything else stays float32: the states h and c, the gate arithmetic (each step reads the
bf16 products and adds them in float32), the master weights, and so the gradients of float32
parameters. Outputs keep the dtype autocast gives the op that makes them: h = o tanh(c) is
pointwise, so float32; the LSTM's projected h = W_hr m is a GEMM, so bf16 (as in torch.nn).

Every other autocast (CUDA, CPU float16) runs the recurrence in float32, as
:func:`float32_region` always did: float16 gradients would need loss scaling, and the CUDA
path is not measured here. The one-step (sampling) path stays float32: measured, its batch-1
products are slower in bf16 (oneDNN's fixed cost per call outweighs the arithmetic).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

__all__ = ["float32_region", "gemm_dtype", "recurrence_region"]


def gemm_dtype(device_type: str) -> torch.dtype | None:
    """bf16 under CPU bf16 autocast (the recurrences' GEMMs then run in bf16), else None."""
    if device_type == "cpu" and torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") == torch.bfloat16:
            return torch.bfloat16
    return None


def float32_region(
    device_type: str, *tensors: Tensor | None
) -> tuple[AbstractContextManager, tuple[Tensor | None, ...]]:
    """(context, tensors) for running a recurrence in float32 under autocast.

    Autocast is switched off inside (the in-place/``out=`` ops would otherwise meet mixed
    dtypes: the projection comes out of autocast in low precision, the weights do not) and
    the floating-point inputs are cast up; without autocast nothing changes. (The Functions'
    ``custom_fwd`` decorators do the same for CUDA by themselves.)
    """
    if not torch.is_autocast_enabled(device_type):
        return nullcontext(), tensors
    cast = tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)
    return torch.autocast(device_type, enabled=False), cast


def recurrence_region(xg: Tensor, *tensors: Tensor | None):
    """(context, GEMM dtype, xg, tensors) for running a recurrence over the projection ``xg``.

    Under CPU bf16 autocast: autocast off inside, ``xg`` as the bf16 projection left it,
    ``tensors`` (states, weights, biases) in float32, and bf16 for the GEMMs. Otherwise
    :func:`float32_region` of them all, and None: the GEMMs in the tensors' own dtype.
    """
    device_type = xg.device.type
    low = gemm_dtype(device_type)
    if low is None:
        ctx, (xg, *cast) = float32_region(device_type, xg, *tensors)
    else:
        ctx, cast = float32_region(device_type, *tensors)
    return ctx, low, xg, tuple(cast)
