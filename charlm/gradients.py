"""`charlm gradients`: how far back a model's prediction can still feel a character.

For each run, N windows of K characters of the validation split (window j starts at
j * (n - K - 1) // (N - 1)), each followed by the character it predicts, run from a zero state
(the Transformer with no cache) in eval mode. ℓ is the cross-entropy of the prediction at the
window's last position; for each distance k = 0 … K-1 the quantity is ‖∂ℓ / ∂e_{K-1-k}‖₂, with
e_t the output of the model's token embedding (`model.token_embedding`, part of the model
contract) at position t. Reported: the median over the windows and the 25th/75th percentiles.

A plain RNN multiplies the gradient by W_hh and tanh' at every step back, so its curve falls
geometrically; the LSTM's forget gate and the GRU's update gate pass it on almost unchanged
when they are near 1; the Transformer reaches every position of its context in one step, and
none beyond it (distances past the context are 0).
"""

from __future__ import annotations

import csv
import math
import random
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import LoadedRun, load_run, resolve_checkpoint
from .model import build_model


@dataclass
class Curve:
    run: str  # the run's name (its directory)
    cell: str
    init: bool  # True: the run's config freshly initialised with its seed (untrained)
    distance: list[int]
    median: list[float]
    p25: list[float]
    p75: list[float]

    @property
    def label(self) -> str:
        name = self.cell if self.run == self.cell else f"{self.cell} ({self.run})"
        return name + (", untrained" if self.init else "")


def window_starts(n: int, windows: int, length: int) -> list[int]:
    """Where each of `windows` windows of `length` characters starts in a split of `n`, so
    the last one still has its next character: j * (n - K - 1) // (N - 1)."""
    if length < 1:
        raise ValueError(f"--length must be >= 1, got {length}")
    if windows < 1:
        raise ValueError(f"--windows must be >= 1, got {windows}")
    if n < length + 1:
        raise ValueError(f"--length {length} needs a validation split of at least {length + 1} "
                         f"characters; this one has {n}: lower --length")
    if windows == 1:
        return [0]
    return [j * (n - length - 1) // (windows - 1) for j in range(windows)]


def gradient_norms(model: nn.Module, tokens: torch.Tensor, windows: int, length: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """‖∂ℓ/∂e_{K-1-k}‖₂ for every window (rows) and distance k (columns): (N, K)."""
    starts = torch.tensor(window_starts(len(tokens), windows, length))
    chunk = tokens[starts[:, None] + torch.arange(length + 1)].long().to(device)  # (N, K+1)
    x, y = chunk[:, :-1], chunk[:, -1]
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):  # make e_t a leaf of the graph, to differentiate by it
        e = output.detach().requires_grad_(True)
        captured.append(e)
        return e

    was_training = model.training
    model.eval()
    handle = model.token_embedding.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits, _ = model(x, None)
            # summed over windows: each window's ℓ depends on its own e only
            loss = F.cross_entropy(logits[:, -1].float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, captured[-1])
    finally:
        handle.remove()
        model.train(was_training)
    norms = grad.float().norm(dim=-1).cpu()  # (N, T'): T' < K if the model kept only its context
    if norms.size(1) < length:  # characters it never saw get gradient 0
        norms = torch.cat([norms.new_zeros(len(norms), length - norms.size(1)), norms], dim=1)
    return norms.flip(1)  # column k = distance k from the last position


def curve(norms: torch.Tensor, run: str, cell: str, init: bool) -> Curve:
    q = torch.quantile(norms.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.double), dim=0)
    return Curve(run, cell, init, list(range(norms.size(1))), q[1].tolist(), q[0].tolist(),
                 q[2].tolist())


def fresh_model(loaded: LoadedRun) -> nn.Module:
    """The run's config freshly initialised with its seed, as `charlm train` initialises it."""
    seed = loaded.cfg.train.seed
    torch.manual_seed(seed)
    random.seed(seed)
    return build_model(loaded.cfg, len(loaded.vocab))


def run_gradients(runs: list[str | Path], *, init: bool = False, windows: int = 64,
                  length: int = 128, device: torch.device | str = "cpu") -> list[Curve]:
    """One Curve per run (and one more per run for its untrained twin with `init`)."""
    from .data import load_dataset

    window_starts(length + 1, windows, length)  # check the options before loading anything
    curves = []
    for run in runs:
        checkpoint = resolve_checkpoint(run, Path("runs"))
        loaded = load_run(checkpoint, device)
        ds = load_dataset(loaded.cfg.data)
        if ds.vocab.chars != loaded.vocab.chars:
            raise ValueError(f"the corpus '{loaded.cfg.data.source}' of run '{run}' changed "
                             "since training (different vocabulary)")
        name = checkpoint.parent.name
        models = [(loaded.model, False)] + ([(fresh_model(loaded).to(device), True)]
                                            if init else [])
        for model, untrained in models:
            norms = gradient_norms(model, ds.val, windows, length, device)
            curves.append(curve(norms, name, loaded.cfg.model.cell, untrained))
    return curves


def table_distances(length: int) -> list[int]:
    """0, 1, 2, 4, 8, ... and K-1."""
    ks, k = [0], 1
    while k < length - 1:
        ks.append(k)
        k *= 2
    return ks + ([length - 1] if length > 1 else [])


def format_table(curves: list[Curve]) -> str:
    """The median gradient at k = 0, 1, 2, 4, ... K-1, one column per curve."""
    width = max(12, *(len(c.label) + 2 for c in curves))
    lines = ["median ‖∂ℓ/∂e‖ over the windows, by distance k (characters back); "
             "percentiles in gradients.csv",
             "k".rjust(5) + "".join(c.label.rjust(width) for c in curves)]
    for k in table_distances(len(curves[0].distance)):
        lines.append(f"{k:5d}" + "".join(f"{c.median[k]:.3e}".rjust(width) for c in curves))
    return "\n".join(lines)


def write_csv(curves: list[Curve], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["run", "cell", "init", "distance", "median", "p25", "p75"])
        for c in curves:
            for k in c.distance:
                w.writerow([c.run, c.cell, int(c.init), k, f"{c.median[k]:.6g}",
                            f"{c.p25[k]:.6g}", f"{c.p75[k]:.6g}"])


def to_json(curves: list[Curve]) -> dict:
    return {"runs": [asdict(c) for c in curves]}


def write_plot(curves: list[Curve], path: Path, windows: int) -> bool:
    """gradients.png: log-scale y, a line and interquartile band per curve (untrained ones
    dashed, in their run's colour). False, with a notice, without matplotlib."""
    from .plot import PLOT_HINT, load_matplotlib

    mpl = load_matplotlib()
    if mpl is None:
        print(f"notice: matplotlib is not installed, so {path.name} was not written; for "
              f"plots: {PLOT_HINT}", file=sys.stderr)
        return False
    Figure, Canvas = mpl
    fig = Figure(figsize=(8, 4.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    colours: dict[str, str] = {}
    for c in curves:
        colour = colours.setdefault(c.run, f"C{len(colours) % 10}")
        ax.plot(c.distance, _positive(c.median), color=colour, lw=1.8,
                ls="--" if c.init else "-", label=c.label)
        ax.fill_between(c.distance, _positive(c.p25), _positive(c.p75), color=colour,
                        alpha=0.12 if c.init else 0.22, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("distance k: characters back from the last one read")
    ax.set_ylabel("‖∂ℓ / ∂e$_{K-1-k}$‖₂  (median, 25–75% band)")
    ax.set_title(f"How far back the prediction still feels a character ({windows} windows "
                 f"of {len(curves[0].distance)})", fontsize=11)
    ax.set_xlim(0, len(curves[0].distance) - 1)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=9)
    Canvas(fig).print_png(str(path))
    return True


def _positive(values: list[float]) -> list[float]:
    """Zeros (characters past a Transformer's context) have no place on a log scale."""
    return [v if v > 0 else math.nan for v in values]


def default_out_dir(runs: list[str | Path]) -> Path:
    """One run: its own directory; several: gradients-<timestamp> beside the first."""
    first = Path(runs[0])
    run_dir = first.parent if first.is_file() else first
    if len(runs) == 1:
        return run_dir
    return run_dir.parent / f"gradients-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
