"""Sampling: continue a text one character at a time through the model contract.

A recurrent model carries its hidden state (O(1) work per character, the prefix is never
re-run); the Transformer carries its key/value cache. Temperature 0 is greedy decoding;
top-k and top-p (nucleus) filtering restrict the choice to the most likely characters. The
model runs under `precision` (fp32, or bf16 autocast for a run trained in bf16).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .data import Vocab
from .device import autocast

MAX_LENGTH = 10**9  # characters one `charlm sample` generates at most
MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed


def check_sampling_options(length: int, temperature: float, top_k: int, top_p: float,
                           seed: int | None = None) -> None:
    """Raise ValueError naming the flag for any out-of-range sampling option."""
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"--length must be between 0 and {MAX_LENGTH:,}, got {length}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, got {seed}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1 = off), got {top_p}")


def pick_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """Choose the next id from logits (V,): greedy, or sampled after temperature/top-k/top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    # A diverged model can emit NaN/inf logits: NaN is never picked, +inf ties share the
    # probability, all-NaN is uniform. Shifting the maximum to 0 and dividing in float64 keeps
    # a tiny temperature or huge logits from turning into inf - inf or 0 / 0 = NaN.
    # The two special cases are chosen with torch.where, not a Python `if`: an `if` on a
    # tensor reads it back, a host sync per character on a GPU.
    logits = torch.nan_to_num(logits.double(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    posinf = torch.isposinf(logits)
    logits = torch.where(posinf.any(), torch.where(posinf, 0.0, -math.inf), logits)
    logits = torch.where(torch.isneginf(logits).all(), 0.0, logits)
    if top_k and top_k < logits.numel():
        # On the raw values: after the shift and the division, logits that differ by less
        # than their rounding tie (1e-45 - 1 == -1), and a tie would let more than k through.
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = (logits - logits.max()) / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p  # keep the first over p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    if generator is not None and generator.device != probs.device:
        # A CPU generator draws on the CPU (the same text for a seed on every device): this
        # copy is the one read-back per character, which the caller's int() then needs not.
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(0)


@torch.no_grad()
def generate(model: nn.Module, vocab: Vocab, prime: str, length: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, device: torch.device | str = "cpu",
             precision: str = "fp32") -> Iterator[str]:
    """Yield `length` new characters continuing `prime` (characters outside the vocabulary
    must already be removed). An empty prime starts from a newline, or the first character.
    `precision` (fp32 | bf16) is the autocast the model runs under."""
    check_sampling_options(length, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    start = prime or ("\n" if "\n" in vocab.stoi else vocab.chars[0])
    idx = vocab.encode(start).to(device)[None]  # (1, T)

    def forward(ids: torch.Tensor, state):
        with autocast(idx.device, precision):
            return model(ids, state)

    try:
        logits, state = forward(idx, None)
        for i in range(length):
            next_id = pick_next(logits[0, -1], temperature, top_k, top_p, generator)
            yield vocab.chars[int(next_id)]
            if i + 1 < length:
                logits, state = forward(next_id.to(idx.device).view(1, 1), state)
    finally:
        model.train(was_training)
