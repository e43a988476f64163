"""charlm's CUDA time loop: each fused layer as a CUDA graph against the eager CUDA path.

    PYTHONPATH=. python benchmarks/cuda_time_loop.py [--device cuda] [--hidden 512]
        [--batch 64] [--seq 256] [--steps 20] [--repeats 3] [--cells rnn,lstm,gru]

For each cell, one charlm RecurrentLM (2 layers) trains with graphs on and with graphs off
(charlm.cells.fused.cuda_graph.ENABLED), interleaved repeats of ``--steps`` AdamW steps each,
medians; first a parity check: one forward and backward with each, from the same weights,
outputs and every gradient (max relative difference). Prints one line per cell and, with
--json, one JSON object. On a machine without CUDA every layer runs eagerly either way (the
script says so): benchmarks/gpu_smoke.sh --dry-run runs it that way at tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from charlm import cells
from charlm.cells.fused import cuda_graph
from charlm.model import RecurrentLM

LAYERS = {"rnn": cells.RNN, "lstm": cells.LSTM, "gru": cells.GRU}
VOCAB = 65


def build(cell: str, hidden: int, device: torch.device) -> RecurrentLM:
    torch.manual_seed(0)
    body = LAYERS[cell](hidden, hidden, num_layers=2, batch_first=True)
    return RecurrentLM(body, VOCAB, hidden, dropout=0.0).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_of(model, x, y):
    logits, _ = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def parity(cell, hidden, x, y, device) -> float:
    """max |graph - eager| / max |eager| over the loss and every gradient."""
    results = []
    for on in (True, False):
        cuda_graph.ENABLED = on
        model = build(cell, hidden, device)
        for _ in range(2):  # the first call captures and checks; the second replays
            model.zero_grad(set_to_none=True)
            loss = loss_of(model, x, y)
            loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    worst = 0.0
    for a, b in zip(*results, strict=True):
        worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12))
    return worst


def steps_per_s(model, opt, x, y, steps, device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()
    sync(device)
    return steps / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cells", default="rnn,lstm,gru")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(VOCAB, (a.batch, a.seq), generator=g).to(device) for _ in range(2))
    rows = []
    for cell in a.cells.split(","):
        diff = parity(cell, a.hidden, x, y, device)
        uses = cuda_graph.uses
        contenders = {}
        for on in (True, False):
            model = build(cell, a.hidden, device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            cuda_graph.ENABLED = on
            steps_per_s(model, opt, x, y, 2, device)  # warm-up (and the capture)
            contenders[on] = (model, opt, [])
        for _ in range(a.repeats):
            for on, (model, opt, rates) in contenders.items():
                cuda_graph.ENABLED = on
                rates.append(steps_per_s(model, opt, x, y, a.steps, device))
        cuda_graph.ENABLED = True
        graph, eager = (statistics.median(contenders[on][2]) for on in (True, False))
        row = {"cell": cell, "hidden": a.hidden, "batch": a.batch, "seq": a.seq,
               "graph_steps_per_s": graph, "eager_steps_per_s": eager,
               "speedup": graph / eager, "graphs_used": cuda_graph.uses > uses,
               "parity_max_rel_diff": diff}
        rows.append(row)
        used = "graphs used" if row["graphs_used"] else "graphs NOT used (eager both ways)"
        print(f"{cell:4} h{a.hidden} b{a.batch} t{a.seq}: graph {graph:.2f} steps/s, eager "
              f"{eager:.2f}, {graph / eager:.2f}x; parity {diff:.1e}; {used}", file=sys.stderr)
    if a.json:
        print(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows}))
    bad = [r for r in rows if r["parity_max_rel_diff"] > 1e-3]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
