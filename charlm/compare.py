"""`charlm compare`: train several configs under one budget and tabulate and plot the results.

This module owns the comparison: parsing `--params` (250k, 1M, ...), sizing each model to about
that many parameters by choosing `model.hidden_size`, validating every contender before any
training starts, training each one as an ordinary run in the runs directory, and writing
`compare.csv`, `compare.md` and (with matplotlib) `compare.png`. The `--set` overrides apply to
every contender, so all see the same corpus, split and budget. It knows nothing of the CLI:
bad input is a ValueError/FileNotFoundError, an interrupted or failed comparison is a
`ComparisonStopped` that carries the rows of the contenders that finished.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt_io
from . import train as training
from .config import Config, load_config
from .data import check_lengths, load_dataset
from .device import autocast, resolve_device, resolve_precision
from .model import build_model, count_parameters

PLOT_HINT = 'pip install "charlm[plot]"'
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


@dataclass
class Row:
    """One contender's result: a row of compare.csv and of the terminal table."""

    config: str
    cell: str
    run: str  # the run directory: `charlm sample --run` / `charlm eval --run` take it as is
    params: int
    hidden_size: int
    steps: int
    tokens_per_s: float
    wall_time_s: float
    best_val_loss: float
    val_bpc: float
    device: str
    precision: str  # what the run trained in: fp32 or bf16 (train.precision, resolved)


FIELDS = [f.name for f in dataclasses.fields(Row)]  # the columns of compare.csv
OUTPUT_NAMES = ("compare.csv", "compare.md", "compare.png")  # what a comparison writes


@dataclass
class Contender:
    config: str  # as the user wrote it (preset name or path)
    cfg: Config  # overrides applied, sized, validated
    name: str  # its run name in the runs directory


class ComparisonStopped(Exception):
    """Ctrl-C or a failed contender: `rows` holds the contenders that finished."""

    def __init__(self, message: str, rows: list[Row], interrupted: bool):
        super().__init__(message)
        self.rows, self.interrupted = rows, interrupted


# ---------------------------------------------------------------------------- sizing


def parse_params(text: str) -> int:
    """`250k`, `1M`, `1.5M`, `1000000` -> a positive parameter count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([kKmMgGbB]?)\s*", str(text))
    if match:
        number, exponent, suffix = match.groups()
        value = float(number) * 10 ** int(exponent or 0) * _SUFFIXES[suffix.lower()]
        if math.isfinite(value) and round(value) >= 1:
            return int(round(value))
    raise ValueError(f"--params '{text}' is not a positive parameter count; use e.g. 250k, 1M, "
                     "1.5M or 1000000")


def _count(cfg: Config, vocab_size: int) -> int:
    # On the meta device no memory is allocated, so sizing a 100M model is instant.
    try:
        with torch.device("meta"):
            return count_parameters(build_model(cfg, vocab_size))
    except (RuntimeError, NotImplementedError):  # a layer that insists on real tensors
        return count_parameters(build_model(cfg, vocab_size))


def size_to_params(cfg: Config, vocab_size: int, target: int) -> tuple[Config, int]:
    """A copy of `cfg` whose `model.hidden_size` gives the parameter count closest to `target`
    (num_layers kept; for the Transformer a multiple of num_heads), and that count."""
    unit = cfg.model.num_heads if cfg.model.cell == "transformer" else 1
    counts: dict[int, int] = {}

    def sized(k: int) -> Config:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=k * unit))

    def count(k: int) -> int:
        if k not in counts:
            counts[k] = _count(sized(k), vocab_size)
        return counts[k]

    # The count grows with the width: double until past the target, then bisect.
    lo = hi = 1
    while count(hi) < target and hi < 2**20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(mid) >= target else (mid, hi)
    best = min((lo, hi), key=lambda k: (abs(count(k) - target), k))
    return sized(best), count(best)


# ---------------------------------------------------------------------------- preparation


def default_out_dir(runs_dir: str | Path) -> Path:
    """A new `compare-<timestamp>` folder inside the runs directory (not created here)."""
    runs_dir = Path(runs_dir)
    # two comparisons started in the same second get distinct names
    name = ckpt_io.unique_name(
        ckpt_io.default_run_name("compare"),
        lambda n: (runs_dir / n).exists() or any(runs_dir.glob(f"{n}-*")))
    return runs_dir / name


def prepare(configs: list[str], overrides: list[str] | None, params: str | None,
            runs_dir: Path, out_dir: Path, device: str | None = None,
            log: Callable[[str], None] | None = None) -> list[Contender]:
    """Load, override, size and check every contender, so bad input fails before any training."""
    if not configs:
        raise ValueError("give at least one config to compare, e.g. charlm compare rnn lstm "
                         "gru transformer")
    ckpt_io.check_runs_dir(runs_dir)
    taken = [n for n in OUTPUT_NAMES if (Path(out_dir) / n).exists()]
    if taken:
        raise ValueError(f"--out '{out_dir}' already holds a comparison ({', '.join(taken)}); "
                         "pass another --out, or leave it out for a fresh "
                         "RUNS_DIR/compare-<timestamp> folder")
    target = parse_params(params) if params is not None else None
    overrides = list(overrides or []) + ([f"train.device={device}"] if device else [])
    cfgs = [load_config(c, overrides) for c in configs]
    datasets: dict[tuple, object] = {}
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(out_dir).name).strip(".-") or "compare"
    contenders: list[Contender] = []
    for config, cfg in zip(configs, cfgs, strict=True):
        key = (cfg.data.source, cfg.data.val_fraction)
        if key not in datasets:
            datasets[key] = load_dataset(cfg.data)
        ds = datasets[key]
        check_lengths(ds, cfg.train.seq_len)
        resolve_device(cfg.train.device)
        if target is not None:
            cfg, count = size_to_params(cfg, len(ds.vocab), target)
            if log:
                log(f"{config}: model.hidden_size={cfg.model.hidden_size} -> {count:,} "
                    f"parameters (target {target:,})")
        taken = {c.name for c in contenders}
        name = ckpt_io.unique_name(f"{prefix}-{cfg.model.cell}", taken.__contains__)
        ckpt_io.check_run_name(name)
        if (Path(runs_dir) / name).exists():
            raise ValueError(f"run '{Path(runs_dir) / name}' already exists; pass another --out "
                             "(its folder name prefixes the contenders' run names)")
        contenders.append(Contender(config, cfg, name))
    return contenders


# ---------------------------------------------------------------------------- the comparison


def warm_up(contenders: list[Contender]) -> None:
    """One tiny untimed training step per (cell, device): the first step in a process pays
    one-off costs (lazy imports, kernel and thread-pool set-up) of a second or more, which
    would otherwise come out of the first contender's time budget alone."""
    seen = set()
    for c in contenders:
        device = resolve_device(c.cfg.train.device)
        precision = resolve_precision(c.cfg.train.precision, device)  # as the run will train
        if (c.cfg.model.cell, device, precision) in seen:
            continue
        seen.add((c.cfg.model.cell, device, precision))
        model = build_model(c.cfg, 2).to(device)
        optimizer = training.make_optimizer(model, c.cfg.train, device)
        x = torch.zeros(1, min(8, c.cfg.train.seq_len), dtype=torch.long, device=device)
        with autocast(device, precision):
            logits, _ = model(x, None)
            loss = F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
        loss.backward()
        optimizer.step()


def compare(configs: list[str], overrides: list[str] | None = None, params: str | None = None,
            runs_dir: str | Path = "runs", out_dir: str | Path | None = None,
            device: str | None = None, quiet: bool = False) -> list[Row]:
    """Train every config (same overrides, optionally sized to `params`) into `runs_dir` and
    return one Row per contender. Outputs are written by `write_outputs`."""
    runs_dir = Path(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(runs_dir)

    def log(msg: str) -> None:
        if not quiet:
            tqdm.write(msg, file=sys.stderr)

    contenders = prepare(configs, overrides, params, runs_dir, out_dir, device, log)
    try:  # fail now, not after the whole budget has been trained
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out '{out_dir}' cannot be created: {e.strerror or e}") from None
    warm_up(contenders)
    rows: list[Row] = []
    bar = tqdm(total=len(contenders), unit="run", file=sys.stderr, dynamic_ncols=True,
               disable=quiet or not sys.stderr.isatty())
    current = None
    try:
        for c in contenders:
            current = c
            bar.set_description(f"training {c.name}")
            result = training.train(c.cfg, runs_dir=runs_dir, name=c.name, quiet=True)
            t = c.cfg.train
            tokens_per_s = result.tokens_per_s or (
                result.step * t.batch_size * t.seq_len / max(result.elapsed_s, 1e-9))
            rows.append(Row(
                config=c.config, cell=c.cfg.model.cell, run=str(result.run_dir),
                params=result.params, hidden_size=c.cfg.model.hidden_size, steps=result.step,
                tokens_per_s=tokens_per_s, wall_time_s=result.elapsed_s,
                best_val_loss=result.best_val_loss, val_bpc=result.best_val_bpc,
                device=str(resolve_device(t.device)),
                precision=resolve_precision(t.precision, resolve_device(t.device))))
            bar.update(1)
            log(f"[{len(rows)}/{len(contenders)}] {c.name}: {result.step} steps, val bpc "
                f"{result.best_val_bpc:.4f}, {result.elapsed_s:.1f}s")
    except (KeyboardInterrupt, training.TrainingInterrupted) as e:
        raise ComparisonStopped(str(e) or f"interrupted while training {current.name}", rows,
                                interrupted=True) from None
    except (ValueError, OSError) as e:  # e.g. a contender whose loss diverged
        raise ComparisonStopped(f"{current.name} failed: {' '.join(str(e).split())}", rows,
                                interrupted=False) from e
    finally:
        bar.close()
    return rows


# ---------------------------------------------------------------------------- outputs


def _human(n: int) -> str:
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def _table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["cell", "run", "params", "steps", "tokens/s", "wall time (s)", "best val loss",
              "val bits/char", "device", "precision"]
    body = [[r.cell, Path(r.run).name, _human(r.params), str(r.steps), f"{r.tokens_per_s:,.0f}",
             f"{r.wall_time_s:.1f}", f"{r.best_val_loss:.4f}", f"{r.val_bpc:.4f}", r.device,
             r.precision] for r in rows]
    return header, body


def format_table(rows: list[Row]) -> str:
    """The terminal table: aligned columns, text left, numbers right."""
    header, body = _table_cells(rows)
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 or i >= len(cells) - 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(rows: list[Row]) -> str:
    header, body = _table_cells(rows)
    align = ["---", "---"] + ["---:"] * (len(header) - 4) + ["---", "---"]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *body]) + "\n"


def read_val_curve(run: str | Path) -> list[tuple[int, float, float]]:
    """(step, elapsed_s, val_bpc) for every evaluation logged in a run's metrics.csv."""
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [(int(r["step"]), float(r["elapsed_s"]), float(r["val_bpc"]))
                for r in csv.DictReader(f) if r.get("val_bpc")]


def write_plot(rows: list[Row], path: Path) -> bool:
    """compare.png: validation bits/char against wall time and against steps. False (and a
    notice on stderr) when matplotlib, an optional extra, is missing."""
    try:  # imported lazily: charlm works without it; Agg renders without a display
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"notice: matplotlib is not installed, so {path.name} was not written; for plots: "
              f"{PLOT_HINT}", file=sys.stderr)
        return False
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    by_time, by_step = fig.subplots(1, 2, sharey=True)
    for r in rows:
        curve = read_val_curve(r.run)
        if not curve:
            continue
        steps, times, bpc = zip(*curve, strict=True)
        label = f"{Path(r.run).name} ({_human(r.params)})"
        by_time.plot(times, bpc, marker=".", label=label)
        by_step.plot(steps, bpc, marker=".", label=label)
    by_time.set(xlabel="wall time (s)", ylabel="validation bits/char",
                title="validation bits/char vs wall time")
    by_step.set(xlabel="step", title="validation bits/char vs steps")
    for ax in (by_time, by_step):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def write_outputs(rows: list[Row], out_dir: str | Path) -> list[Path]:
    """Write compare.csv, compare.md and compare.png into `out_dir`; return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        d = dataclasses.asdict(r)
        d.update(tokens_per_s=f"{r.tokens_per_s:.1f}", wall_time_s=f"{r.wall_time_s:.2f}",
                 best_val_loss=f"{r.best_val_loss:.6f}", val_bpc=f"{r.val_bpc:.6f}")
        writer.writerow(d)
    written = [out_dir / "compare.csv", out_dir / "compare.md"]
    ckpt_io.atomic_write_text(written[0], buf.getvalue())
    ckpt_io.atomic_write_text(written[1], markdown_table(rows))
    if write_plot(rows, out_dir / "compare.png"):
        written.append(out_dir / "compare.png")
    return written
