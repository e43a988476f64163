"""What the benchmark times, and how: a training step as `charlm train` takes it, one
sampled character as `charlm sample` makes it, a bare layer's training step; and the memory
a contender keeps."""

from __future__ import annotations

import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..config import TrainConfig
from ..device import autocast
from ..model import detach_state
from ..sample import pick_next


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_training(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor, steps: int, device: torch.device,
                  precision: str = "fp32") -> float:
    """Seconds for `steps` training steps on the batch (x, y), each as `charlm train` does it:
    forward (under `precision`: fp32, or bf16 autocast), cross-entropy, backward, gradient
    clip, optimizer step, state carried.

    `loss.item()` is left out: the benchmark should not add a host sync per step."""
    grad_clip = TrainConfig().grad_clip
    state = None
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(device, precision):
            logits, new_state = model(x, state)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        state = detach_state(new_state) if model.carries_state else None
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def generate_ids(model: nn.Module, n_chars: int, device: torch.device, *,
                 temperature: float = 1.0, recompute_context: int | None = None) -> list[int]:
    """`n_chars` ids continuing id 0, one at a time in eval mode, with the per-step
    work of `charlm.sample.generate`: a forward of one character, then `pick_next`.

    With `recompute_context` the state is thrown away: every step runs the model on the last
    `recompute_context` characters from scratch (what sampling costs without a KV cache)."""
    was_training = model.training
    model.eval()
    history = torch.tensor([[0]], device=device)
    ids: list[int] = []
    try:
        logits, state = model(history, None)
        for i in range(n_chars):
            next_id = pick_next(logits[0, -1], temperature, 0, 1.0, None)
            ids.append(int(next_id))  # generate() syncs here too: it yields a Python str
            if i + 1 == n_chars:
                break
            if recompute_context is None:
                logits, state = model(next_id.view(1, 1), state)
            else:
                history = torch.cat([history, next_id.view(1, 1)], dim=1)[:, -recompute_context:]
                logits, _ = model(history, None)
    finally:
        model.train(was_training)
    return ids


def time_sampling(model: nn.Module, n_chars: int, device: torch.device, *,
                  recompute_context: int | None = None) -> float:
    """Seconds to sample `n_chars` characters (temperature 1) with `generate_ids`."""
    torch.manual_seed(0)  # the same draws for every contender and repeat
    synchronize(device)
    start = time.perf_counter()
    generate_ids(model, n_chars, device, recompute_context=recompute_context)
    synchronize(device)
    return time.perf_counter() - start


def time_layer_training(model: nn.Module, optimizer: torch.optim.Optimizer, inp, steps: int,
                        device: torch.device) -> float:
    """Seconds for `steps` training steps of a bare recurrent layer on `inp` (a tensor or a
    PackedSequence): forward, mean squared output as the loss, backward, clip, AdamW step."""
    grad_clip = TrainConfig().grad_clip
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(inp)[0]
        loss = (out.data if isinstance(out, PackedSequence) else out).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- memory


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes a contender keeps between steps: parameters, buffers, gradients, optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def process_max_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
