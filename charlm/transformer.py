"""The causal Transformer baseline: decoder-only, pre-LayerNorm, learned positions, and
`scaled_dot_product_attention(is_causal=True)` (flash attention on CUDA).

It obeys the same contract as the recurrent models, `forward(idx, state) -> (logits, state)`.
For training `state` is None. For sampling the state is a key/value cache, so each new
character costs one position of attention instead of recomputing the whole context; when the
cache reaches the context length it is rebuilt from the last half-context of characters.
`_run` is the spec (any number of new characters, by concatenation); `_step` is its fast
path for the one-character steps of sampling, which writes into preallocated buffers.
`trace` (for `charlm inspect`) runs the spec with the attention written out by hand, so its
weights can be kept.
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
        None); `cache` holds the keys and values of the positions before x, (B, heads,
        cached, C / heads) each; S = cached + new positions."""
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
    """Decoder-only character Transformer with a context of `context_len` characters.

    The sampling state is {"kv": per layer (k, v), each (B, heads, S, C / heads), "idx":
    (B, S) the ids, "len": n, "version": int}: positions < n of the S hold the cache (the
    rest is room that `_step` writes into; n <= S <= context_len). A state stays valid after
    it is continued: `_step` writes only past its own n, and copies the buffers first when
    another continuation has written there since ("version").
    """

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
        self._step_cache: tuple | None = None  # see _step_params

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, state: dict | None = None):
        """idx (B, T) -> logits (B, T, V); `state` is the sampling KV cache (or None)."""
        if (state is not None and idx.size(1) == 1 and state["len"] < self.context_len
                and not self.training and not torch.is_grad_enabled()
                and not torch.is_inference_mode_enabled()):
            return self._step(idx, state)
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
        """The spec: the cache grows by concatenation, and a full one is rebuilt."""
        new_chars = idx.size(1)
        if state is not None and state["len"] + new_chars > self.context_len:
            # The cache is full. Learned positions cannot slide, so restart the cache from the
            # last half context (recomputed once every context/2 characters, not every step).
            keep = max(new_chars, self.context_len // 2)
            idx = torch.cat([state["idx"][:, : state["len"]], idx], dim=1)[:, -keep:]
            state = None
        if idx.size(1) > self.context_len:  # longer than the context: keep its end
            idx = idx[:, -self.context_len :]
        past = 0 if state is None else state["len"]
        T = idx.size(1)
        positions = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))  # (B, T, C)
        caches, trace = [], {}
        for i, block in enumerate(self.blocks):
            cache = None if state is None else tuple(t[:, :, :past] for t in state["kv"][i])
            x, kv, weights = block(x, cache, need_weights)
            caches.append(kv)
            if need_weights:
                trace[f"l{i}.attn"] = weights[:, :, -new_chars:]  # (B, heads, T, S)
                trace[f"l{i}.x"] = x[:, -new_chars:]  # (B, T, C)
        logits = self.head(self.ln_f(x[:, -new_chars:]))  # (B, T, V)
        if not torch.is_grad_enabled() or not self.training:
            prev = idx if state is None else torch.cat([state["idx"][:, :past], idx], dim=1)
            new_state = {"kv": caches, "len": past + T, "idx": prev, "version": 0}
        else:
            new_state = None  # training never reuses a cache; don't keep the graph alive
        return logits, new_state, trace

    def _step(self, idx: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """`_run` for one new character per row (idx (B, 1)) into a cache with room, in
        eval mode without autograd: the same function (tests/test_kv_cache.py holds its
        logits to the spec's), with what dominates a step at batch 1 taken out:

        - the new keys, values and id are written in place into buffers of the full context
          (made once after a fresh or rebuilt cache), not concatenated: no O(S) copies;
        - the parameters are gathered once (`_step_params`): a module attribute lookup
          costs as much as a small op, and a step would make about 60;
        - no masks and no (B, 1, C) reshapes: one query sees every cached key;
        - on the CPU no oneDNN for the step: torch sends float32 GELU through oneDNN,
          whose fixed cost is several times that of torch's own kernel at these sizes;
        - and at batch 1 one thread: MKL's one-row products and SDPA would each open an
          OpenMP region, whose fork and join cost more than the work they share out (far
          more on a loaded machine, where a thread waits for a core).
        """
        if idx.device.type != "cpu":
            return self._step_math(idx, state)
        threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
        if idx.size(0) == 1:
            torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False
        try:
            return self._step_math(idx, state)
        finally:
            torch.set_num_threads(threads)
            torch.backends.mkldnn.enabled = onednn

    def _step_math(self, idx: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        B, n = idx.size(0), state["len"]
        kv, ids = self._writable(state)
        blocks, (tok, pos, ln_f, w_head) = self._step_params()
        C = tok.size(1)
        ids[:, n] = idx[:, 0]
        x = F.embedding(idx[:, 0], tok).add_(pos[n])  # (B, C)
        for (k_cache, v_cache), params in zip(kv, blocks, strict=True):
            ln1, w_qkv, b_qkv, heads, w_proj, b_proj, ln2, w_fc, b_fc, w_out, b_out = params
            h = F.layer_norm(x, (C,), *ln1)
            # (B, 3C) -> q, k, v (B, heads, 1, C / heads); k_cache, v_cache are (B, heads,
            # context, C / heads), filled up to n
            q, k, v = torch.addmm(b_qkv, h, w_qkv).view(B, 3, heads, 1, -1).unbind(1)
            k_cache[:, :, n : n + 1] = k
            v_cache[:, :, n : n + 1] = v
            y = F.scaled_dot_product_attention(q, k_cache[:, :, : n + 1], v_cache[:, :, : n + 1])
            x = torch.addmm(x, y.reshape(B, C), w_proj).add_(b_proj)
            h = F.layer_norm(x, (C,), *ln2)
            x = torch.addmm(x, F.gelu(torch.addmm(b_fc, h, w_fc)), w_out).add_(b_out)
        logits = torch.mm(F.layer_norm(x, (C,), *ln_f), w_head).unsqueeze(1)  # (B, 1, V)
        return logits, {"kv": kv, "len": n + 1, "idx": ids, "version": ids._version}

    def _writable(self, state: dict) -> tuple[list, torch.Tensor]:
        """The state's (kv, idx) buffers if `_step` may write past its length into them;
        else fresh full-context buffers holding a copy of its filled prefix: after a fresh or
        rebuilt cache (no room yet), or when another continuation of an earlier state wrote
        into them since this state was made (their version moved on), or when they were made
        under inference_mode (such tensors cannot be written outside it)."""
        ids, n = state["idx"], state["len"]
        if (ids.size(1) == self.context_len and not ids.is_inference()
                and ids._version == state["version"]):
            return state["kv"], ids
        kv = [tuple(_with_room(t, 2, n, self.context_len) for t in pair) for pair in state["kv"]]
        return kv, _with_room(ids, 1, n, self.context_len)

    def _step_params(self) -> tuple[list[tuple], tuple]:
        """What `_step` reads: per block (ln1 (weight, bias, eps), W_qkv^T, b_qkv, heads,
        W_proj^T, b_proj, ln2, W_fc^T, b_fc, W_out^T, b_out) and (token embedding, position
        embedding, ln_f, W_head^T). Weights that multiply enter transposed, (in, out), and
        contiguous: a one-row addmm on them costs about half of F.linear's. Those copies
        are rebuilt when their source changes in place (its version: an optimizer step,
        load_state_dict) or gets new storage; train()/eval() and .to() forget everything
        (after replacing a parameter object by hand, call one of them)."""
        if self._step_cache is not None:
            sources, stamps, params = self._step_cache
            if [(p._version, p.data_ptr()) for p in sources] == stamps:
                return params
        sources, blocks = [], []

        def t(linear: nn.Linear) -> torch.Tensor:
            sources.append(linear.weight)
            return linear.weight.detach().t().contiguous()

        def ln(norm: nn.LayerNorm) -> tuple:
            return norm.weight, norm.bias, norm.eps

        for b in self.blocks:
            a, fc, out = b.attn, b.mlp[0], b.mlp[2]
            blocks.append((ln(b.ln1), t(a.qkv), a.qkv.bias, a.num_heads, t(a.proj), a.proj.bias,
                           ln(b.ln2), t(fc), fc.bias, t(out), out.bias))
        params = blocks, (self.tok.weight, self.pos.weight, ln(self.ln_f), t(self.head))
        self._step_cache = sources, [(p._version, p.data_ptr()) for p in sources], params
        return params

    def train(self, mode: bool = True) -> TransformerLM:
        self._step_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .double(), ...: new parameter data
        self._step_cache = None
        return super()._apply(fn, recurse)


def _with_room(t: torch.Tensor, dim: int, n: int, size: int) -> torch.Tensor:
    """A new tensor like `t` with `size` positions along `dim`, its first `n` copied from t."""
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_empty(shape)
    out.narrow(dim, 0, n).copy_(t.narrow(dim, 0, n))
    return out
