"""Scoring: loss in nats per character, bits per character and perplexity.

`evaluate_tokens` streams through a whole split: the text is cut into `batch_size` contiguous
streams scored window by window, carrying the state for models that carry one, so every
character is scored exactly once. Only one window of ids is gathered at a time, so scoring a
memory-mapped split of any size needs memory for a batch, not for the split. `estimate_loss`
is the quick version used during training. Both run the model under `precision` (fp32 or bf16
autocast; `charlm eval` passes the run's recorded train.precision) and score in float32.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .device import autocast
from .model import detach_state


@dataclass
class Score:
    loss: float  # nats per character
    chars: int  # characters scored

    @property
    def bpc(self) -> float:
        return bits_per_char(self.loss)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def to_dict(self) -> dict:
        return {"loss": self.loss, "bpc": self.bpc, "perplexity": self.perplexity,
                "chars": self.chars}


def bits_per_char(loss_nats: float) -> float:
    return loss_nats / math.log(2)


@torch.no_grad()
def estimate_loss(model: nn.Module, batches, device: torch.device,
                  precision: str = "fp32") -> float:
    """Mean cross-entropy (nats) over `batches` of (x, y), each scored from a fresh state."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits, _ = model(x, None)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def evaluate_tokens(model: nn.Module, tokens: torch.Tensor, seq_len: int, device: torch.device,
                    batch_size: int = 64, progress: bool = False,
                    precision: str = "fp32") -> Score:
    """Score every character of `tokens` (after the first) once; returns the mean loss.
    `progress` shows a bar (on stderr) of the characters scored."""
    was_training = model.training
    model.eval()
    n = len(tokens) - 1
    streams = max(1, min(batch_size, n // max(seq_len, 1)))
    stream_len = n // streams
    total = 0.0
    bar = tqdm(total=n, unit="char", unit_scale=True, dynamic_ncols=True, leave=False,
               file=sys.stderr, disable=not progress)

    def score(starts: torch.Tensor, length: int) -> float:
        """Loss summed over `length` characters of each stream starting at `starts` (B,)."""
        loss_sum, state = 0.0, None
        for s in range(0, length, seq_len):
            width = min(seq_len, length - s)
            # Gather only this window (B, width + 1) from the (possibly memory-mapped, uint8)
            # tokens: the split is never materialised as int64.
            chunk = tokens[starts[:, None] + s + torch.arange(width + 1)].long().to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            with autocast(device, precision):
                logits, state = model(x, state if model.carries_state else None)
            state = detach_state(state)
            loss_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                        reduction="sum").item()
            bar.update(y.numel())
        return loss_sum

    total += score(torch.arange(streams) * stream_len, stream_len)
    tail = n - streams * stream_len  # what the streams left over, scored as one more stream
    if tail > 0:
        total += score(torch.tensor([streams * stream_len]), tail)
    bar.close()
    model.train(was_training)
    return Score(loss=total / n, chars=n)
