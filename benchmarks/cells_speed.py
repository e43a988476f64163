"""Speed of charlm.cells' recurrent layers against torch.nn's on a char-LM workload.

This script owns the benchmark behind the claim that charlm's hand-written RNN/LSTM/GRU
layers are at least as fast as torch.nn's: a full char-LM training step (embedding
65 -> 256, a 2-layer recurrent layer of width 256, a linear head to 65 classes, cross-entropy,
backward, Adam step; batch 32, sequence 128) and sampling (1000 characters, one at a time,
batch 1, under ``torch.no_grad``, carrying the recurrent state). Both contenders start from
the same weights and see the same data; they are interleaved across repeats so that noise
from other processes on the machine hits both alike, and medians are reported.

Run from the repository root:  python benchmarks/cells_speed.py  [--kinds lstm gru ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from charlm import cells  # noqa: E402

VOCAB = 65
KINDS = ("rnn", "lstm", "gru")


class CharLM(nn.Module):
    """Embedding -> recurrent layer -> linear head, with either implementation."""

    def __init__(self, impl: str, kind: str, width: int, layers: int) -> None:
        super().__init__()
        lib = torch.nn if impl == "torch.nn" else cells
        cls = {"rnn": lib.RNN, "lstm": lib.LSTM, "gru": lib.GRU}[kind]
        self.emb = nn.Embedding(VOCAB, width)
        self.rnn = cls(width, width, num_layers=layers, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, x: torch.Tensor, state=None):
        """x: (B, T) int64 -> logits (B, T, VOCAB) and the final recurrent state."""
        h, state = self.rnn(self.emb(x), state)  # (B, T, H)
        return self.head(h), state


def make_pair(kind: str, width: int, layers: int, fused: bool = True) -> dict[str, CharLM]:
    """Both implementations with identical weights (loaded through the state dict)."""
    torch.manual_seed(0)
    ref = CharLM("torch.nn", kind, width, layers)
    mine = CharLM("charlm", kind, width, layers)
    mine.load_state_dict(ref.state_dict())
    mine.rnn.fused = fused
    return {"torch.nn": ref, "charlm": mine}


def train_steps(model: CharLM, opt: torch.optim.Optimizer, x, y, steps: int) -> float:
    """Run ``steps`` training steps; return the seconds they took."""
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def sample(model: CharLM, n_chars: int, seed: int = 0) -> float:
    """Sample ``n_chars`` characters one at a time; return the seconds it took."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.zeros((1, 1), dtype=torch.long)
    state = None
    t0 = time.perf_counter()
    for _ in range(n_chars):
        logits, state = model(c, state)  # (1, 1, VOCAB)
        probs = torch.softmax(logits[:, -1], dim=-1)
        c = torch.multinomial(probs, 1, generator=gen)  # (1, 1)
    return time.perf_counter() - t0


def bench_kind(kind: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Median training tokens/s and sampling chars/s per implementation for one kind."""
    models = make_pair(kind, args.width, args.layers, fused=not args.unfused)
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randint(VOCAB, (args.batch, args.seq), generator=g)
    y = torch.randint(VOCAB, (args.batch, args.seq), generator=g)
    for name, m in models.items():
        train_steps(m, opts[name], x, y, args.warmup)
        sample(m, 50)
    tok: dict[str, list[float]] = {k: [] for k in models}
    chars: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(args.repeats):
        # Alternate who goes first, so slow drifts in machine load do not favour one side.
        order = list(models) if rep % 2 == 0 else list(models)[::-1]
        for name in order:
            secs = train_steps(models[name], opts[name], x, y, args.steps)
            tok[name].append(args.steps * args.batch * args.seq / secs)
        for name in order:
            chars[name].append(args.sample_chars / sample(models[name], args.sample_chars, rep))
    return {k: (statistics.median(tok[k]), statistics.median(chars[k])) for k in models}


def main() -> None:
    """Parse arguments, run the benchmark for each kind and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="training steps per repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sample-chars", type=int, default=1000)
    p.add_argument(
        "--unfused", action="store_true", help="time charlm's plain autograd loop instead"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; train: batch "
        f"{args.batch} x seq {args.seq}, width {args.width}, {args.layers} layers, "
        f"{args.repeats} repeats x {args.steps} steps; sample: {args.sample_chars} chars"
        + ("; charlm path: autograd loop (fused=False)" if args.unfused else "")
    )
    header = (
        f"{'kind':<5} {'nn tok/s':>10} {'charlm tok/s':>13} {'ratio':>6}   "
        f"{'nn chars/s':>11} {'charlm chars/s':>15} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        r = bench_kind(kind, args)
        (nt, ns), (ct, cs) = r["torch.nn"], r["charlm"]
        print(
            f"{kind:<5} {nt:>10.0f} {ct:>13.0f} {ct / nt:>6.2f}   "
            f"{ns:>11.0f} {cs:>15.0f} {cs / ns:>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
