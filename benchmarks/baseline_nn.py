"""The reference a user would otherwise write: a plain torch.nn.LSTM/GRU char-LM script.

2 layers x 256, batch 32, seq 128, Adam 2e-3 (constant), gradient clip 5, random windows, trained
for a wall-clock budget on a text file whose last 10% is validation. It reports the validation
loss scored two ways, the same two ways charlm reports its runs:
  - `val_loss_windows`: mean loss over fixed evenly spaced windows, each from a zero state
    (what `charlm train` logs as val_loss, with the same window count);
  - `val_loss_stream`: every validation character scored once with the state carried
    (what `charlm eval` prints).

    python benchmarks/baseline_nn.py --cell lstm --data ../shared/data/tinyshakespeare.txt \
        --seconds 300
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import DataConfig
from charlm.data import eval_batches, load_dataset
from charlm.evaluate import estimate_loss, evaluate_tokens


class NNCharLM(nn.Module):
    """Embedding -> torch.nn.LSTM/GRU -> Linear, behind charlm's model contract for scoring."""

    carries_state = True

    def __init__(self, cell: str, vocab_size: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_cls(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx, state=None):
        out, state = self.rnn(self.embed(idx), state)
        return self.head(out), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--data", required=True)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--eval-steps", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    ds = load_dataset(DataConfig(source=args.data, val_fraction=0.1))
    model = NNCharLM(args.cell, len(ds.vocab), 256, 2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    B, T = 32, 128
    train_tokens = ds.train.long()
    steps, trained = 0, 0.0
    while trained < args.seconds:
        t0 = time.perf_counter()
        ix = torch.randint(0, len(train_tokens) - T - 1, (B,))
        chunk = train_tokens[ix[:, None] + torch.arange(T + 1)]
        logits, _ = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        steps += 1
        trained += time.perf_counter() - t0
    cpu = torch.device("cpu")
    windows = estimate_loss(model, eval_batches(ds.val, B, T, args.eval_steps), cpu)
    stream = evaluate_tokens(model, ds.val, T, cpu)
    print(json.dumps({
        "script": f"torch.nn.{args.cell.upper()} baseline", "steps": steps,
        "train_seconds": round(trained, 1), "tokens_per_s": round(steps * B * T / trained),
        "val_loss_windows": round(windows, 4), "val_loss_stream": round(stream.loss, 4),
        "val_bpc_stream": round(stream.bpc, 4),
    }))


if __name__ == "__main__":
    main()
