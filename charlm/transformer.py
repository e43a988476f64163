"""The causal Transformer baseline: decoder-only, pre-LayerNorm, learned positions, and
`scaled_dot_product_attention(is_causal=True)` (flash attention on CUDA).

It obeys the same contract as the recurrent models, `forward(idx, state) -> (logits, state)`.
For training `state` is None. For sampling the state is a key/value cache, so each new
character costs one position of attention instead of recomputing the whole context; when the
cache reaches the context length it is rebuilt from the last half-context of characters.
`trace` (for `charlm inspect`) runs the same model with the attention written out by hand,
so its weights can be kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: tuple | None, need_weights: bool = False):
        """x (B, T, C) -> (output (B, T, C), new cache (k, v), weights (B, heads, T, S) or
        None); S = cached + new positions."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache[0].size(2)
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        if past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new query sees every cached key
        else:  # several new queries after a cache: causal over the new block only
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            causal = False
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # the manual four lines, which keep the weights (charlm inspect)
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, heads, T, S)
            weights = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            y = F.dropout(weights, dropout_p, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y), (k, v), weights


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: tuple | None, need_weights: bool = False):
        a, cache, weights = self.attn(self.ln1(x), cache, need_weights)
        x = x + self.drop(a)
        x = x + self.mlp(self.ln2(x))
        return x, cache, weights


class TransformerLM(nn.Module):
    """Decoder-only character Transformer with a context of `context_len` characters."""

    carries_state = False  # training windows are independent; the KV cache is for sampling

    def __init__(self, vocab_size: int, width: int, num_layers: int, num_heads: int,
                 context_len: int, dropout: float = 0.0):
        super().__init__()
        self.context_len = context_len
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, num_heads, dropout) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * num_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, state: dict | None = None):
        """idx (B, T) -> logits (B, T, V); `state` is the sampling KV cache (or None)."""
        logits, new_state, _ = self._run(idx, state, need_weights=False)
        return logits, new_state

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.tok

    def trace_kinds(self) -> dict[str, str]:
        """"attn": attention weights; "x": the residual stream after each block (unbounded)."""
        return {"attn": "attention", "x": "free"}

    def trace(self, idx: torch.Tensor, state: dict | None = None):
        """`forward` that also returns {"l{layer}.attn": (B, heads, T, S), "l{layer}.x":
        (B, T, C)}: row t of attn holds the weights of the t-th new character over the S
        positions ending with it (unseen later ones get 0), each row summing to 1."""
        return self._run(idx, state, need_weights=True)

    def _run(self, idx: torch.Tensor, state: dict | None, need_weights: bool):
        new_chars = idx.size(1)
        if state is not None and state["len"] + new_chars > self.context_len:
            # The cache is full. Learned positions cannot slide, so restart the cache from the
            # last half context (recomputed once every context/2 characters, not every step).
            keep = max(new_chars, self.context_len // 2)
            idx, state = torch.cat([state["idx"], idx], dim=1)[:, -keep:], None
        if idx.size(1) > self.context_len:  # longer than the context: keep its end
            idx = idx[:, -self.context_len :]
        past = 0 if state is None else state["len"]
        T = idx.size(1)
        positions = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))  # (B, T, C)
        caches, trace = [], {}
        for i, block in enumerate(self.blocks):
            x, kv, weights = block(x, None if state is None else state["kv"][i], need_weights)
            caches.append(kv)
            if need_weights:
                trace[f"l{i}.attn"] = weights[:, :, -new_chars:]  # (B, heads, T, S)
                trace[f"l{i}.x"] = x[:, -new_chars:]  # (B, T, C)
        logits = self.head(self.ln_f(x))[:, -new_chars:]  # (B, T, V)
        if not torch.is_grad_enabled() or not self.training:
            prev = idx if state is None else torch.cat([state["idx"], idx], dim=1)
            new_state = {"kv": caches, "len": past + T, "idx": prev}
        else:
            new_state = None  # training never reuses a cache; don't keep the graph alive
        return logits, new_state, trace
