"""`charlm plot`: training curves from runs' `metrics.csv`, overlaid and labelled.

Four panels: train and validation bits per character against step and against wall time;
the gradient norm before clipping (log scale, with the run's `train.grad_clip` dashed: spikes
far above it are exploding gradients); the learning rate. Needs the optional `plot` extra
(matplotlib); `load_matplotlib` is the one place that imports it, for `charlm gradients` too.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

PLOT_HINT = 'pip install "charlm[plot]"'


def load_matplotlib():
    """(Figure, FigureCanvasAgg) or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


@dataclass
class Metrics:
    """One run's logged rows, as numbers (NaN where a row has no value)."""

    name: str
    grad_clip: float | None = None
    train: dict[str, list[float]] = field(default_factory=dict)  # step, elapsed_s, bpc, ...
    val: dict[str, list[float]] = field(default_factory=dict)  # step, elapsed_s, bpc


def run_dir_of(run: str | Path) -> Path:
    """A run directory, from itself or from one of its checkpoint files."""
    path = Path(run)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"run '{run}' not found: pass a run directory or a .pt file")
    return path


def read_metrics(run: str | Path) -> Metrics:
    """Parse `RUN/metrics.csv` (and `train.grad_clip` from `RUN/config.yaml`, if there)."""
    run_dir = run_dir_of(run)
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"run '{run}' has no metrics.csv (is it a charlm run?)")
    metrics = Metrics(run_dir.name, grad_clip=_grad_clip(run_dir / "config.yaml"))
    train_keys = ("step", "elapsed_s", "bpc", "lr", "grad_norm")
    metrics.train, metrics.val = {k: [] for k in train_keys}, {"step": [], "elapsed_s": [],
                                                                "bpc": []}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step, elapsed = _num(row.get("step")), _num(row.get("elapsed_s"))
            if math.isnan(step):
                continue
            if not math.isnan(_num(row.get("train_loss"))):
                values = (step, elapsed, _num(row["train_loss"]) / math.log(2),
                          _num(row.get("lr")), _num(row.get("grad_norm")))
                for k, v in zip(train_keys, values, strict=True):
                    metrics.train[k].append(v)
            if not math.isnan(_num(row.get("val_bpc"))):
                for k, v in zip(("step", "elapsed_s", "bpc"),
                                (step, elapsed, _num(row["val_bpc"])), strict=True):
                    metrics.val[k].append(v)
    if not metrics.train["step"] and not metrics.val["step"]:
        raise ValueError(f"run '{run}': metrics.csv has no rows yet; train a little first")
    return metrics


def _num(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _grad_clip(config: Path) -> float | None:
    try:
        clip = (yaml.safe_load(config.read_text(encoding="utf-8")) or {})["train"]["grad_clip"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return float(clip) if isinstance(clip, (int, float)) and clip > 0 else None


def write_plot(runs: list[Metrics], path: Path) -> None:
    """Draw the four panels for `runs` into `path` (PNG). ValueError without matplotlib."""
    mpl = load_matplotlib()
    if mpl is None:
        raise ValueError(f"charlm plot needs matplotlib, which is not installed: {PLOT_HINT}")
    Figure, Canvas = mpl
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    (by_step, by_time), (grad, lr) = fig.subplots(2, 2)
    for i, m in enumerate(runs):
        colour = f"C{i % 10}"
        t, v = m.train, m.val
        for ax, x in ((by_step, "step"), (by_time, "elapsed_s")):
            ax.plot(t[x], t["bpc"], color=colour, lw=1, alpha=0.55, label=f"{m.name} train")
            ax.plot(v[x], v["bpc"], color=colour, lw=2, marker="o", ms=3.5,
                    label=f"{m.name} validation")
        grad.plot(t["step"], t["grad_norm"], color=colour, lw=1, label=m.name)
        if m.grad_clip:
            grad.axhline(m.grad_clip, color=colour, ls="--", lw=1, alpha=0.8)
        lr.plot(t["step"], t["lr"], color=colour, lw=1.5, label=m.name)
    by_step.set(xlabel="step", ylabel="bits per character", title="loss against steps")
    by_time.set(xlabel="training time (s, evaluation excluded)", ylabel="bits per character",
                title="loss against time")
    grad.set(xlabel="step", ylabel="gradient norm before clipping", yscale="log",
             title="gradient norm (dashed: the clipping threshold)")
    lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for ax in (by_step, by_time, grad, lr):
        ax.grid(True, which="both", alpha=0.25)
    by_step.legend(fontsize=8, ncols=2 if len(runs) > 2 else 1)
    if len(runs) > 1:
        grad.legend(fontsize=8)
    Canvas(fig).print_png(str(path))


def default_out(runs: list[str | Path]) -> Path:
    """One run: RUN/metrics.png; several: plot-<timestamp>.png beside the first."""
    first = run_dir_of(runs[0])
    if len(runs) == 1:
        return first / "metrics.png"
    return first.parent / f"plot-{datetime.now().strftime('%Y%m%d-%H%M%S')}.png"
