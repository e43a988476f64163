"""`charlm inspect`: a self-contained HTML page of what every unit and gate of a trained model
does with each character of a text.

Read in this order: `collect` (run the model over the text through `model.trace`, keep
every quantity per character), `features` (simple features of the text, the units that
correlate with them, gate saturation), `page` (quantize, encode, escape, fill `page.html` with
`page.css` and `page.js`). This module picks the text and writes the file.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import LoadedRun, load_run
from ..model import count_parameters
from .collect import Collected, collect
from .page import render

__all__ = ["Collected", "collect", "inspect_run", "pick_text", "render", "InspectResult"]

DEFAULT_CHARS = 2000


@dataclass
class InspectResult:
    path: Path
    chars: int
    bits_per_char: float
    size_bytes: int


def pick_text(loaded: LoadedRun, text_file: Path | None, prime: str | None,
              chars: int) -> tuple[str, str]:
    """(the text to inspect, where it comes from): the first `chars` characters of
    `text_file`, of `prime`, or of the run's validation split. Characters the model never saw
    are left out, with a notice on stderr."""
    from ..data import load_dataset
    from ..sources import decode_corpus, read_files

    if chars < 1:
        raise ValueError(f"--chars must be >= 1, got {chars}")
    if text_file is not None and prime is not None:
        raise ValueError("give --text FILE or --prime TEXT, not both")
    vocab = loaded.vocab
    if text_file is not None:
        if text_file.is_dir():
            raise ValueError(f"--text '{text_file}' is a directory; give one text file")
        if not text_file.is_file():
            raise FileNotFoundError(f"--text file '{text_file}' not found")
        text, what, flag = decode_corpus(read_files([text_file]), str(text_file)), \
            str(text_file), "--text"
    elif prime is not None:
        text, what, flag = prime, "the --prime text", "--prime"
    else:
        ds = load_dataset(loaded.cfg.data)
        if ds.vocab.chars != vocab.chars:
            raise ValueError(f"the corpus '{loaded.cfg.data.source}' changed since training "
                             "(different vocabulary); inspect a file with --text")
        return vocab.decode(ds.val[:chars].tolist()), \
            f"the validation split of {loaded.cfg.data.source}"
    missing = vocab.missing(text)
    if missing:
        print(f"notice: the model's vocabulary lacks {len(missing)} character(s) of {flag} "
              f"({''.join(missing[:20])!r}); they are left out", file=sys.stderr)
        text = "".join(ch for ch in text if ch in vocab.stoi)
    if not text:
        raise ValueError(f"{flag} has no character the model knows: nothing to inspect")
    return text[:chars], what


def inspect_run(checkpoint: Path, *, text_file: Path | None = None, prime: str | None = None,
                chars: int = DEFAULT_CHARS, out: Path | None = None,
                device: str = "cpu") -> InspectResult:
    """Write the inspect page for `checkpoint` (default: `inspect.html` in its run
    directory) and return where, with its size and the bits per character it shows."""
    from ..device import resolve_device

    dev = resolve_device(device)
    loaded = load_run(checkpoint, dev)
    text, source = pick_text(loaded, text_file, prime, chars)
    collected = collect(loaded.model, loaded.vocab, text, loaded.cfg.train.seq_len, dev)
    out = Path(out) if out is not None else Path(checkpoint).parent / "inspect.html"
    html = render(collected, _meta(loaded, collected, source, text_file, prime, chars, out),
                  title=Path(checkpoint).parent.name,
                  lede=f"{_model_words(loaded)}: {collected.bits_per_char:.3f} bits per "
                       f"character on {len(text):,} characters of {source}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return InspectResult(out, len(text), collected.bits_per_char, out.stat().st_size)


def _model_words(loaded: LoadedRun) -> str:
    m = loaded.cfg.model
    size = f"{m.num_layers}×{m.hidden_size}"
    extra = f", {m.num_heads} heads, context {loaded.cfg.train.seq_len}" \
        if loaded.model.trace_kinds().get("attn") else ""
    return f"{m.cell} {size}{extra}, {count_parameters(loaded.model):,} parameters"


def _meta(loaded: LoadedRun, c: Collected, source: str, text_file: Path | None,
          prime: str | None, chars: int, out: Path) -> dict:
    run_dir = loaded.path.parent
    step = loaded.ckpt.get("step")
    command = ["charlm", "inspect", "--run", str(loaded.path), "--chars", str(chars)]
    if text_file is not None:
        command += ["--text", str(text_file)]
    if prime is not None:
        command += ["--prime", prime]
    command += ["--out", str(out)]
    commands = [shlex.join(command)]
    if (run_dir / "config.yaml").is_file():
        commands.insert(0, "# the model (train.max_time makes a timed run depend on the machine):")
        commands.insert(1, shlex.join(["charlm", "train", "--config",
                                       str(run_dir / "config.yaml")]))
        commands.insert(2, "# this page:")
    scored = max(len(c.text) - 1, 0)
    facts = [
        ["run", str(run_dir)],
        ["checkpoint", f"{loaded.path.name}" + (f" (step {step})" if step is not None else "")],
        ["model", _model_words(loaded)],
        ["trained on", str(loaded.cfg.data.source)],
        ["text", f"{len(c.text):,} characters of {source}, read {loaded.cfg.train.seq_len} "
                 "at a time" + (" with the state carried" if loaded.model.carries_state
                                else ", each window from a fresh context") + ", as charlm eval"],
        ["bits per character", f"{c.bits_per_char:.4f} over the {scored:,} characters after "
                               "the first"],
    ]
    return {"facts": facts, "commands": commands, "vocab": loaded.vocab.chars,
            "surpriseMaxBits": max(4, min(8, (len(loaded.vocab) - 1).bit_length()))}
