"""The loops a user writes around a recurrent layer, timed for charlm.cells against torch.nn.

`charlm bench` times charlm's own sampler and training step, inside its char-LM. A user who
takes `charlm.cells.GRU` as a drop-in for `torch.nn.GRU` writes the loops below instead, so
this script times those, for both layer types holding the same weights (embedding -> 2 x 256
layers, batch_first -> linear, as in issue 12):

- sampling: one character at a time, greedy, the state carried, in eval mode, no_grad;
- training: one step of batch 32 x seq 128 (forward, cross-entropy, backward), no optimizer.

Contenders are interleaved round by round and the medians compared; `--precision bf16`
wraps the training step of both in CPU bf16 autocast.

    python benchmarks/user_loops.py                       # RNN, LSTM, GRU, fp32
    python benchmarks/user_loops.py --cells gru --precision bf16 --rounds 9
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from charlm import cells
from charlm.bench import cpu_features

VOCAB, WIDTH, LAYERS = 65, 256, 2


class LM(nn.Module):
    def __init__(self, layers, cell: str):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.rnn = getattr(layers, cell)(WIDTH, WIDTH, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)


def sample_rate(lm: LM, chars: int) -> float:
    """Characters per second of the plain greedy loop."""
    lm.eval()
    with torch.no_grad():
        h, tok = None, torch.zeros(1, 1, dtype=torch.long)
        start = time.perf_counter()
        for _ in range(chars):
            o, h = lm.rnn(lm.emb(tok), h)
            tok = lm.head(o)[:, -1].argmax(-1, keepdim=True)
        return chars / (time.perf_counter() - start)


def train_rate(lm: LM, x: torch.Tensor, y: torch.Tensor, steps: int, precision: str) -> float:
    """Tokens per second of forward + loss + backward."""
    lm.train()
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    start = time.perf_counter()
    for _ in range(steps):
        with ctx:
            o, _ = lm.rnn(lm.emb(x))
            loss = F.cross_entropy(lm.head(o).flatten(0, 1).float(), y.flatten())
        lm.zero_grad(set_to_none=True)
        loss.backward()
    return steps * x.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="rnn,lstm,gru")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chars", type=int, default=300)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    print(f"{cpu_features()['model'] or platform.processor()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; training in {args.precision}, "
          f"{args.rounds} interleaved rounds, medians")
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(VOCAB, (32, 128), generator=g) for _ in range(2))
    for cell in args.cells.split(","):
        name = cell.strip().upper()
        torch.manual_seed(0)
        ours, theirs = LM(cells, name), LM(nn, name)
        theirs.load_state_dict(ours.state_dict())
        rates: dict[str, list[float]] = {k: [] for k in ("s-charlm", "s-nn", "t-charlm", "t-nn")}
        # Warm-up: caches, compiled kernels and the GEMM choices; the in-loop one for the
        # per-step products takes 3 sequences per candidate, up to 9 (4.5 steps of 2 layers).
        for lm in (ours, theirs):
            sample_rate(lm, 30)
            train_rate(lm, x, y, 5, args.precision)
        for _ in range(args.rounds):
            rates["s-charlm"].append(sample_rate(ours, args.chars))
            rates["s-nn"].append(sample_rate(theirs, args.chars))
            rates["t-charlm"].append(train_rate(ours, x, y, args.steps, args.precision))
            rates["t-nn"].append(train_rate(theirs, x, y, args.steps, args.precision))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"{name:4s} sample {med['s-charlm']:8,.0f} / {med['s-nn']:8,.0f} chars/s = "
              f"{med['s-charlm'] / med['s-nn']:.2f}x   train {med['t-charlm']:8,.0f} / "
              f"{med['t-nn']:8,.0f} tokens/s = {med['t-charlm'] / med['t-nn']:.2f}x")


if __name__ == "__main__":
    main()
