"""The look-inside commands, `charlm inspect`, `charlm gradients` and `charlm plot`: parse
options and call `charlm.inspect`, `charlm.gradients` and `charlm.plot`.

`register(app)` adds them to the Typer app of `charlm.cli` (idempotent). Errors follow the
CLI's policy through its `friendly_errors`: library code raises ValueError /
FileNotFoundError naming the flag, the user sees one `error: ...` line and exit code 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

RunsArg = Annotated[list[str], typer.Argument(
    metavar="RUN...", show_default=False,
    help="Run directories (best.pt, else last.pt) or checkpoint files.")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", "-d", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU).",
    show_default="auto")]


def inspect(
    run: Annotated[str | None, typer.Option(
        "--run", "-r", help="Run directory or checkpoint file.",
        show_default="the newest run in --runs-dir")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Root directory of runs.")
                        ] = Path("runs"),
    text: Annotated[Path | None, typer.Option(
        "--text", help="Inspect this text file instead of the validation split.",
        show_default="the run's validation split")] = None,
    prime: Annotated[str | None, typer.Option(
        "--prime", "-p", help="Inspect this text, given on the command line (as sample's "
        "--prime, the model reads it).")] = None,
    chars: Annotated[int, typer.Option(
        "--chars", "-n", help="Characters to inspect (from the start of the text).")] = 2000,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="The HTML file to write.",
        show_default="inspect.html in the run's directory")] = None,
    device: DeviceOpt = None,
) -> None:
    """Write one self-contained HTML page of what every unit and gate does with each
    character: surprise, top-5 guesses, units and gates (attention for the Transformer),
    units that track features of the text, gate saturation. Prints the page's path."""
    from .checkpoint import resolve_checkpoint
    from .inspect import inspect_run

    started = time.perf_counter()
    result = inspect_run(resolve_checkpoint(run, runs_dir), text_file=text, prime=prime,
                         chars=chars, out=out, device=device or "auto")
    typer.echo(f"{result.chars:,} characters, {result.bits_per_char:.4f} bits/char; "
               f"{result.size_bytes / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s; "
               "open it in a browser (no network needed)", err=True)
    typer.echo(str(result.path))


def gradients(
    runs: RunsArg,
    init: Annotated[bool, typer.Option(
        "--init", help="Also each run's config freshly initialised with its seed (untrained), "
        "to see what training changed.")] = False,
    windows: Annotated[int, typer.Option(
        "--windows", "-N", help="Windows of the validation split per run.")] = 64,
    length: Annotated[int, typer.Option(
        "--length", "-K", help="Characters per window (distances 0 to K-1).")] = 128,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for gradients.csv and gradients.png.",
        show_default="the run's directory; for several runs gradients-<timestamp> beside "
        "the first")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: DeviceOpt = None,
) -> None:
    """How far back each model's prediction still feels a character: the median (and
    interquartile range) over windows of ‖∂ℓ/∂e‖ at each distance k, e the token embedding.
    Prints a table (or --json), writes gradients.csv and gradients.png."""
    from .device import resolve_device
    from .gradients import (
        default_out_dir,
        format_table,
        run_gradients,
        to_json,
        write_csv,
        write_plot,
    )

    curves = run_gradients(runs, init=init, windows=windows, length=length,
                           device=resolve_device(device or "auto"))
    out_dir = out if out is not None else default_out_dir(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(curves, out_dir / "gradients.csv")
    written = [out_dir / "gradients.csv"]
    if write_plot(curves, out_dir / "gradients.png", windows):
        written.append(out_dir / "gradients.png")
    typer.echo(json.dumps(to_json(curves)) if as_json else format_table(curves))
    typer.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


def plot(
    runs: RunsArg,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="The PNG file to write.",
        show_default="RUN/metrics.png; for several runs plot-<timestamp>.png beside the first"
    )] = None,
) -> None:
    """Training curves from each run's metrics.csv: train and validation bits/char against
    step and time, the gradient norm before clipping (log scale) and the learning rate."""
    from .plot import PLOT_HINT, default_out, load_matplotlib, read_metrics, write_plot

    if load_matplotlib() is None:
        raise ValueError(f"charlm plot needs matplotlib, which is not installed: {PLOT_HINT}")
    metrics = [read_metrics(r) for r in runs]
    path = out if out is not None else default_out(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_plot(metrics, path)
    typer.echo(str(path))


COMMANDS = {"inspect": inspect, "gradients": gradients, "plot": plot}


def register(app: typer.Typer) -> None:
    """Add the three commands to `app` (once: calling it again changes nothing)."""
    from .cli import friendly_errors  # here, not at the top: charlm.cli imports this module

    have = {c.name or (c.callback.__name__ if c.callback else None)
            for c in app.registered_commands}
    for name, fn in COMMANDS.items():
        if name not in have:
            app.command(name=name)(friendly_errors(fn))
