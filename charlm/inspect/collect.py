"""Run a model over a text and keep everything `charlm inspect` shows, per character.

The text is read in windows of the run's `train.seq_len` characters, carrying the state for
models that carry one, exactly as `charlm eval` scores a split; each window goes through
`model.trace` (the model contract), so nothing here knows which cell it is looking at.
Character j's prediction is the distribution the model gave *before* reading it (from
characters 0..j-1); its activations are the values *after* reading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Vocab

TOP_K = 5


@dataclass
class Collected:
    """Per character j of `text` (n characters); predictions exist for j >= 1."""

    text: str
    loss_bits: torch.Tensor  # (n,) -log2 p(char j); NaN for j = 0 (nothing read yet)
    entropy_bits: torch.Tensor  # (n,) entropy of the prediction for char j; NaN for j = 0
    top_ids: torch.Tensor  # (n, TOP_K) the most likely characters for position j
    top_probs: torch.Tensor  # (n, TOP_K)
    kinds: dict[str, str]  # quantity short name ("h", "f", "attn") -> its kind
    units: dict[str, torch.Tensor] = field(default_factory=dict)  # "l0.h" -> (n, units)
    # "l0.attn" -> (heads, n, W): [h, j, d] = weight of char j on char j - d (0 where unseen)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def bits_per_char(self) -> float:
        scored = self.loss_bits[1:]
        return float(scored.mean()) if len(scored) else math.nan


def kind_of(kinds: dict[str, str], name: str) -> str:
    """The kind of a traced quantity "l{layer}.{q}"."""
    return kinds[name.split(".", 1)[1]]


def layer_of(name: str) -> int:
    return int(name.split(".", 1)[0][1:])


@torch.no_grad()
def collect(model: nn.Module, vocab: Vocab, text: str, window: int,
            device: torch.device | str = "cpu") -> Collected:
    """Trace `model` over `text` (every character in `vocab`), `window` characters at a time."""
    if not text:
        raise ValueError("nothing to inspect: the text is empty")
    was_training = model.training
    model.eval()
    kinds = model.trace_kinds()
    ids = vocab.encode(text).to(device)[None]  # (1, n)
    n = ids.size(1)
    logits_parts: list[torch.Tensor] = []
    parts: dict[str, list[torch.Tensor]] = {}
    state = None
    threads = torch.get_num_threads()
    if ids.device.type == "cpu":
        # One character at a time is a chain of tiny products: a second thread only adds
        # waiting (and on a busy machine, a lot of it).
        torch.set_num_threads(1)
    try:
        for start in range(0, n, window):
            chunk = ids[:, start : start + window]
            logits, state, trace = model.trace(chunk, state if model.carries_state else None)
            logits_parts.append(logits[0].float().cpu())
            for name, value in trace.items():
                value = value.float().cpu()
                if kind_of(kinds, name) == "attention":
                    value = _by_distance(value[0], window)  # (heads, T, window)
                else:
                    value = value[0]  # (T, units)
                parts.setdefault(name, []).append(value)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    logits = torch.cat(logits_parts)  # (n, V): row j predicts character j + 1
    logp = F.log_softmax(logits, dim=-1)
    nan = torch.full((1,), math.nan)
    loss = -logp[:-1].gather(1, ids[0, 1:].cpu()[:, None])[:, 0] / math.log(2)
    entropy = -(logp[:-1].exp() * logp[:-1]).sum(-1) / math.log(2)
    top_p, top_i = logp[:-1].exp().topk(min(TOP_K, logp.size(1)), dim=-1)
    pad = torch.zeros(1, top_i.size(1), dtype=top_i.dtype)
    out = Collected(text, torch.cat([nan, loss]), torch.cat([nan, entropy]),
                    torch.cat([pad, top_i]), torch.cat([pad.float(), top_p]), kinds)
    for name, pieces in parts.items():
        if kind_of(kinds, name) == "attention":
            out.attention[name] = torch.cat(pieces, dim=1)
        else:
            out.units[name] = torch.cat(pieces, dim=0)
    return out


def _by_distance(weights: torch.Tensor, width: int) -> torch.Tensor:
    """Attention rows (heads, T, S) over the S positions ending with the last row's
    character -> (heads, T, width), column d = the weight on the character d before."""
    heads, T, S = weights.shape
    rows = torch.arange(T)[:, None]
    key = rows - torch.arange(width)[None, :] + (S - T)  # (T, width) index into S
    ok = (key >= 0) & (key < S)
    picked = weights.gather(2, key.clamp(0, S - 1).expand(heads, T, width))
    return picked * ok
