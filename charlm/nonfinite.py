"""Non-finite training steps: the check after each step, on the host or on the device.

A step whose loss or gradient norm is NaN/inf is never applied. Without
``train.skip_nonfinite`` the run stops with :class:`NonFiniteError` (the last good weights
saved); with it the step is skipped, up to :data:`MAX_SKIPPED_STEPS` in a row. On the CPU
and under torchrun the loop reads both numbers after every step (a read is no sync there);
on CUDA with the fused AdamW, :class:`DeferredChecks` keeps the bookkeeping on the device and
reads it at logging steps only.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["MAX_SKIPPED_STEPS", "DeferredChecks", "NonFiniteError", "defers_checks", "error"]

# With train.skip_nonfinite, this many non-finite steps in a row stop training: the weights
# themselves have diverged and every further step would be skipped too (an endless loop).
MAX_SKIPPED_STEPS = 100


class NonFiniteError(ValueError):
    """The loss or gradient became NaN/inf; the last good checkpoint was kept."""


def defers_checks(device: torch.device, ctx, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the loss and non-finite bookkeeping stays on the device (DeferredChecks).

    On CUDA, where reading a number waits for the whole queue, and only with the fused AdamW
    (which `make_optimizer` picks there): it can skip a step on the device itself. On the CPU
    a read is no sync at all (there is no queue), so the per-step check stays: bit for bit the
    behaviour the exact-resume tests guard. Under torchrun the per-step all-reduce of the loss
    syncs anyway."""
    return device.type == "cuda" and not ctx.active and bool(optimizer.defaults.get("fused"))


class DeferredChecks:
    """The per-step loss sum and non-finite check kept on the device, read at logging steps.

    Every step records its loss and gradient norm into device tensors and hands the fused
    AdamW a `found_inf` flag, with which the kernel itself leaves a non-finite step out
    (weights, moments and step count untouched, as a skipped step on the CPU); the carried
    hidden state of such a step is zeroed on the device (what a fresh state is). `settle()`,
    called on logging, evaluation and checkpoint steps, at the end and before stopping, reads
    everything in one transfer. A finite run logs exactly the numbers of the per-step path:
    the loss sum is float64, added in the same order as Python adds the floats.

    What differs after a non-finite step: it is found at the next settle, not at once. The
    step counter counts it until then (so the learning rate of the steps in between is that
    of one step later), and a run without `train.skip_nonfinite` stops there, with the good
    steps after the bad one kept (the bad one was never applied)."""

    def __init__(self, device: torch.device) -> None:
        def zero(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        self.loss_sum, self.count = zero(torch.float64), zero(torch.int64)
        self.bad, self.first_bad, self.loss_bad = zero(torch.int64), zero(torch.int64), \
            zero(torch.bool)
        self.run, self.longest = zero(torch.int64), zero(torch.int64)  # consecutive bad steps
        self.grad_norm: torch.Tensor | None = None
        self.attempts = 0  # steps recorded since the last settle

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Book one step; returns its device-side `finite` flag (the optimizer's found_inf
        is set from it)."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        bad = ~finite
        self.loss_sum += torch.where(finite, loss.double(), 0.0)
        self.count += finite
        # the index (since the last settle) of the first non-finite step
        self.first_bad = torch.where((self.bad == 0) & bad, self.attempts, self.first_bad)
        self.bad += bad
        self.loss_bad |= ~torch.isfinite(loss)
        self.run = torch.where(finite, 0, self.run + 1)
        self.longest = torch.maximum(self.longest, self.run)
        self.grad_norm = grad_norm
        self.attempts += 1
        return finite

    def settle(self) -> dict:
        """Read the bookkeeping (one device-to-host transfer) and restart it."""
        values = torch.stack([self.loss_sum, self.count.double(), self.bad.double(),
                              self.first_bad.double(), self.loss_bad.double(),
                              self.longest.double()]).tolist()
        out = {"loss_sum": values[0], "count": int(values[1]), "bad": int(values[2]),
               "first_bad": int(values[3]), "loss_bad": bool(values[4]),
               "longest": int(values[5]), "attempts": self.attempts,
               "grad_norm": None if self.grad_norm is None else float(self.grad_norm)}
        for t in (self.loss_sum, self.count, self.bad, self.first_bad, self.longest):
            t.zero_()
        self.loss_bad.zero_()
        self.attempts = 0
        return out


def error(step: int, t, loss_value: float, skipped: int, run_dir: Path) -> NonFiniteError:
    """The error that stops a run after ``step`` good steps (step ``step + 1`` went
    non-finite): what went non-finite, where the weights are, and the fix."""
    what = "loss" if not math.isfinite(loss_value) else "gradient"
    or_skip = "; or --set train.skip_nonfinite=true to skip such steps"
    if t.skip_nonfinite:  # skipping cannot help: the weights themselves diverged
        what, or_skip = f"loss or gradient in {skipped} consecutive steps", ""
    return NonFiniteError(
        f"non-finite {what} at step {step + 1}; training stopped and the last good weights "
        f"are in {run_dir / 'last.pt'}. Lower train.lr (now {t.lr:g}) or set train.grad_clip "
        f"(now {t.grad_clip:g}), then --resume{or_skip}")
