"""The `charlm` command line: parse options, call the library, turn errors into one line.

Library code raises ValueError / FileNotFoundError / OSError with messages that name the key,
file or flag and the fix; here they become `error: ...` on stderr and a non-zero exit, never a
traceback (set CHARLM_DEBUG=1 to see one).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .cli_look import register as register_look_commands
from .config import preset_names

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Train, sample and evaluate character-level language models "
         "(hand-written RNN/LSTM/GRU and minGRU/minLSTM cells, and a Transformer baseline).",
)

ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", help=f"Preset name ({', '.join(preset_names())}) or a YAML file.",
    show_default="none; required unless --resume")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config key, e.g. --set train.lr=1e-3 (repeatable).",
    show_default="no overrides")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Root directory of runs.")]
RunOpt = Annotated[str | None, typer.Option(
    "--run", "-r", help="Run directory or checkpoint file.",
    show_default="the newest run in --runs-dir")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", "-d", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU).",
    show_default="the config's train.device for train, auto otherwise")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly_errors(fn):
    """Run a command; expected errors become one line on stderr and exit code 1 (2 for usage)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .train import TrainingInterrupted

        warnings.showwarning = _one_line_warning
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TrainingInterrupted as e:
            from .distributed import is_main

            if is_main():  # every rank stopped at the same step: one message is enough
                typer.echo(str(e), err=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (ValueError, FileNotFoundError, OSError) as e:
            if os.environ.get("CHARLM_DEBUG"):
                raise
            _fail(" ".join(str(e).split()) or type(e).__name__)
        except Exception as e:  # noqa: BLE001 - the user gets one line, not a traceback
            if os.environ.get("CHARLM_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                  "(set CHARLM_DEBUG=1 for the traceback)")

    return wrapper


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Train, sample and evaluate character-level language models."""


# ---------------------------------------------------------------------------- train


@app.command()
@friendly_errors
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    name: Annotated[str | None, typer.Option(
        "--name", "-n", help="Run name.", show_default="<cell>-<timestamp>")] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue run --name (default: the newest) from its last.pt.")] = False,
    device: DeviceOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Train a model from a preset or YAML config into RUNS_DIR/NAME."""
    from .config import load_config
    from .train import train as run_training

    overrides = list(set_ or [])
    if device:
        overrides.append(f"train.device={device}")
    if config is None and not resume:
        _fail(f"--config is required (a preset: {', '.join(preset_names())}; or a YAML "
              "file), e.g. charlm train --config lstm", code=2)
    # the overrides apply before the file is checked, so --set can fix a bad value in it
    cfg = load_config(config, overrides) if config is not None else None
    result = run_training(cfg, runs_dir=runs_dir, name=name, resume=resume,
                          overrides=overrides, quiet=quiet)
    from .distributed import is_main

    if is_main():  # under torchrun, one summary line (from rank 0), not one per process
        typer.echo(f"done: {result.step} steps in {result.elapsed_s:.0f}s | best val bpc "
                   f"{result.best_val_bpc:.4f} | run {result.run_dir}", err=True)


# ---------------------------------------------------------------------------- sample


@app.command()
@friendly_errors
def sample(
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    prime: Annotated[str, typer.Option(
        "--prime", "-p", help="Text to continue.",
        show_default="empty: start after a newline")] = "",
    length: Annotated[int, typer.Option(
        "--length", "-n", help="Number of new characters.")] = 500,
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t", help="Sampling temperature; 0 = greedy (argmax).")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the K most likely; 0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(
        "--top-p", help="Nucleus sampling: keep the smallest set with mass P; 1 = off.")] = 1.0,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Random seed for reproducible samples.", show_default="random")] = None,
    device: DeviceOpt = None,
) -> None:
    """Continue --prime with the newest run (or --run); the text goes to stdout.

    The model runs in the precision the run trained in (its train.precision: fp32 or bf16)."""
    from .checkpoint import load_run_for_use
    from .device import resolve_device, resolve_precision
    from .sample import check_sampling_options, generate

    check_sampling_options(length, temperature, top_k, top_p, seed)
    dev = resolve_device(device or "auto")
    loaded = load_run_for_use(run, runs_dir, dev, notice=lambda m: typer.echo(m, err=True))
    missing = loaded.vocab.missing(prime)
    if missing:
        shown = "".join(missing[:20])
        typer.echo(f"notice: the model's vocabulary lacks {len(missing)} character(s) of the "
                   f"prime ({shown!r}); they are skipped when conditioning", err=True)
    known = "".join(c for c in prime if c in loaded.vocab.stoi)
    out = sys.stdout
    try:
        out.write(prime)
        out.flush()
        # in the precision the run trained in (its config records fp32 or bf16)
        precision = resolve_precision(loaded.cfg.train.precision, dev)
        for ch in generate(loaded.model, loaded.vocab, known, length, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, device=dev, precision=precision):
            out.write(ch)
            if ch == "\n":
                out.flush()
        out.write("\n")
        out.flush()
    except BrokenPipeError:
        # The reader left (`charlm sample | head`): stop quietly, as Unix tools do. Python
        # would report the pipe again when it flushes stdout at exit, so point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


# ---------------------------------------------------------------------------- eval


@app.command(name="eval")
@friendly_errors
def eval_(
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    data: Annotated[Path | None, typer.Option(
        "--data", help="Score this text file instead of the run's validation split.",
        show_default="the run's validation split")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Loss (nats/char), bits per character and perplexity of a run on its validation split.

    The model runs in the precision the run trained in (its train.precision: fp32 or bf16)."""
    from .checkpoint import load_run_for_use
    from .data import check_corpus, encode_text, load_dataset, missing_corpus
    from .device import resolve_device, resolve_precision
    from .evaluate import evaluate_tokens
    from .sources import decode_corpus, read_files

    dev = resolve_device(device or "auto")
    loaded = load_run_for_use(run, runs_dir, dev, notice=lambda m: typer.echo(m, err=True))
    if data is not None:
        if data.is_dir():
            raise ValueError(f"--data '{data}' is a directory; give one text file to score")
        if not data.is_file():
            raise FileNotFoundError(f"--data file '{data}' not found")
        text = decode_corpus(read_files([data]), str(data))  # as training reads: no BOM
        missing = loaded.vocab.missing(text)
        if missing:
            raise ValueError(f"--data '{data}' has {len(missing)} character(s) the model never "
                             f"saw (e.g. {''.join(missing[:10])!r}); it cannot be scored")
        if len(text) < 2:
            raise ValueError(f"--data '{data}' is empty or has a single character: nothing to "
                             "score")
        # the smallest dtype (uint8 for most vocabularies), not int64: scored window by window
        tokens, what = encode_text(text, loaded.vocab), str(data)
    else:
        recorded = loaded.ckpt.get("corpus")
        fix = "score a file of your choice with --data FILE"
        try:
            ds = load_dataset(loaded.cfg.data)
        except FileNotFoundError:
            raise missing_corpus(loaded.cfg.data.source, recorded, fix) from None
        check_corpus(ds, recorded, fix)
        if ds.vocab.chars != loaded.vocab.chars:
            raise ValueError(f"the corpus '{loaded.cfg.data.source}' changed since training "
                             "(different vocabulary); score a file with --data")
        tokens, what = ds.val, f"validation split of {loaded.cfg.data.source}"
    score = evaluate_tokens(loaded.model, tokens, loaded.cfg.train.seq_len, dev,
                            progress=sys.stderr.isatty(),
                            precision=resolve_precision(loaded.cfg.train.precision, dev))
    if as_json:
        typer.echo(json.dumps(score.to_dict()))
    else:
        typer.echo(f"{what}: loss {score.loss:.4f} nats/char | {score.bpc:.4f} bits/char | "
                   f"perplexity {score.perplexity:.3f} | {score.chars} chars")


# ---------------------------------------------------------------------------- compare


@app.command()
@friendly_errors
def compare(
    configs: Annotated[list[str] | None, typer.Argument(
        metavar="CONFIG...", show_default=False,
        help="Presets or YAML files to train and compare, e.g. rnn lstm gru transformer.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key for EVERY contender (same corpus, split and "
        "budget), e.g. --set train.max_time=300 (repeatable).",
        show_default="no overrides")] = None,
    params: Annotated[str | None, typer.Option(
        "--params", help="Size every model to about this many parameters (250k, 1M, 1.5M, "
        "1000000) by choosing model.hidden_size.", show_default="each config's own size")] = None,
    device: DeviceOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for compare.csv, compare.md and compare.png; its name "
        "prefixes the contenders' run names.", show_default="RUNS_DIR/compare-<timestamp>")] = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Train each CONFIG as a run under one budget; print a table, write CSV/Markdown/plot."""
    from .compare import ComparisonStopped, default_out_dir, format_table, write_outputs
    from .compare import compare as run_compare

    if not configs:
        _fail("give at least one config to compare (a preset or a YAML file), e.g. "
              "charlm compare rnn lstm gru transformer", code=2)
    out_dir = out if out is not None else default_out_dir(runs_dir)
    try:
        rows = run_compare(configs, list(set_ or []), params, runs_dir, out_dir, device)
    except ComparisonStopped as stopped:
        if stopped.rows:  # the finished contenders' results are kept
            typer.echo(format_table(stopped.rows))
            write_outputs(stopped.rows, out_dir)
            kept = f"results of the {len(stopped.rows)} finished contender(s) written to {out_dir}"
        else:
            kept = "no contender had finished, nothing written"
        if stopped.interrupted:
            typer.echo(f"interrupted: {kept}; {stopped}", err=True)
            raise typer.Exit(130) from None
        _fail(f"{stopped}; {kept}")
    typer.echo(format_table(rows))
    written = write_outputs(rows, out_dir)
    typer.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


# ---------------------------------------------------------------------------- bench


@app.command()
@friendly_errors
def bench(
    device: DeviceOpt = None,
    cells: Annotated[str, typer.Option(
        "--cells", help="Comma-separated cells, or 'all': every cell of charlm.model.REGISTRY "
        "(an unknown name lists them).")] = "all",
    repeats: Annotated[int | None, typer.Option(
        "--repeats", help="Timed repeats per contender (interleaved round-robin).",
        show_default="5; 2 with --quick")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Training steps per timed repeat.",
        show_default="10; 2 with --quick")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Training batch size.",
        show_default="32 on CPU, 64 on CUDA")] = None,
    seq_len: Annotated[int | None, typer.Option(
        "--seq-len", help="Training window (and the training Transformer's context).",
        show_default="128 on CPU, 256 on CUDA")] = None,
    hidden: Annotated[list[int] | None, typer.Option(
        "--hidden", help="Recurrent width; repeat for several (--hidden 512 --hidden 1024).",
        show_default="256 on CPU; 512 and 1024 on CUDA")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Tiny shapes and 2 repeats: a smoke test, not a measurement.")] = False,
    variants: Annotated[bool, typer.Option(
        "--variants/--no-variants",
        help="Also time bare layers with torch.nn's options: bidirectional (LSTM, GRU) and "
             "packed input (lengths uniform in \\[seq_len/2, seq_len]).")] = True,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto | fp32 | bf16: the precision charlm and torch.nn train in, "
        "always both in the same one. auto: fp32, and again under bf16 autocast (charlm bf16 "
        "also against its own fp32) on a CPU with native bf16 units (AMX, AVX512-BF16); the "
        "Transformer trains as `charlm train` would, the min cells in both of these.")] = "auto",
) -> None:
    """Time charlm.cells against torch.nn, and the Transformer's KV cache against recomputing.

    Training tokens/s and sampling chars/s, interleaved repeats, medians; progress on stderr,
    the table (or --json) on stdout."""
    from .bench import format_table, make_shape, parse_cells, run_bench
    from .device import resolve_device

    dev = resolve_device(device or "auto")
    shape = make_shape(dev, quick, batch_size, seq_len, hidden)
    default_repeats, default_steps = (2, 2) if quick else (5, 10)
    result = run_bench(dev, parse_cells(cells), shape,
                       repeats=default_repeats if repeats is None else repeats,
                       steps=default_steps if steps is None else steps, variants=variants,
                       precision=precision)
    typer.echo(json.dumps(result, indent=2) if as_json else format_table(result))


register_look_commands(app)  # charlm inspect, charlm gradients, charlm plot (charlm/cli_look.py)


def main() -> None:
    """Entry point of the `charlm` console script."""
    app(prog_name="charlm")
