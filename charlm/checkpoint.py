"""Run directories, atomic checkpoint writes and safe loading.

A run lives in `runs/<name>/`: `config.yaml`, `metrics.csv`, `samples.txt`, `last.pt`,
`best.pt`. Checkpoints are plain dicts of state dicts, tensors and plain data, tagged with a
format name and version, written atomically (temp file in the same directory, flush, fsync,
rename) and read with `torch.load(weights_only=True)`, so loading never executes code. The file
`runs/LATEST` names the newest run (a pointer that works where symlinks don't).
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import time
import zipfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

FORMAT = "charlm-checkpoint"
VERSION = 1
LATEST = "LATEST"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_run_name(cell: str) -> str:
    return f"{cell}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def unique_name(base: str, taken: Callable[[str], bool]) -> str:
    """`base`, or `base-2`, `base-3`, ... (up to `base-999`): the first that is not `taken`."""
    name = base
    for i in range(2, 1000):
        if not taken(name):
            break
        name = f"{base}-{i}"
    return name


RESERVED = {LATEST.lower()}  # names the runs directory itself uses (case-insensitive file systems)


def _safe_name(name: str) -> bool:
    """A run name that stays inside the runs directory (no `../x`, `/etc/x`, ...)."""
    return bool(_NAME_RE.match(name)) and ".." not in name and name.lower() not in RESERVED


def check_run_name(name: str) -> str:
    """Refuse names that could escape the runs directory (`../x`, `/etc/x`, ...) or that it
    uses itself (`LATEST`)."""
    if isinstance(name, str) and name.lower() in RESERVED:
        raise ValueError(f"--name '{name}' is reserved (the runs directory's pointer to the "
                         "newest run); choose another name")
    if not _safe_name(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise ValueError(
            f"--name '{shown}' is not a valid run name: use letters, digits, '.', '_' and '-' "
            "(no '/', no '..', not starting with '.', at most 128 characters)"
        )
    return name


def check_runs_dir(runs_dir: Path) -> Path:
    """`runs_dir` if it is a directory or can become one."""
    runs_dir = Path(runs_dir)
    for parent in (runs_dir, *runs_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--runs-dir '{runs_dir}': '{parent}' is a file, not a "
                                 "directory; pass a directory for the runs")
            break
    return runs_dir


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """The path for a new run `runs_dir/name` (created by :func:`create_run_dir`); an
    existing run is never reused (that is what --resume is for)."""
    run = check_runs_dir(runs_dir) / check_run_name(name)
    if run.exists():
        raise ValueError(
            f"run '{run}' already exists; pass --resume to continue it or --name to start another"
        )
    return run


def create_run_dir(run: Path) -> None:
    """Create the directory of a new run, atomically: of two processes creating the same
    run, one wins and the other gets a clear error (never a half-shared directory)."""
    run.parent.mkdir(parents=True, exist_ok=True)
    try:
        run.mkdir()
    except FileExistsError:
        raise ValueError(f"run '{run}' was just created by another process; pass --name to "
                         "start another, or --resume to continue that one") from None


class RunLock:
    """An exclusive lock on a run directory while a process trains it.

    An OS file lock (``filelock``: ``flock`` on POSIX, ``msvcrt`` on Windows) on
    ``<run>/.lock``: the operating system releases it when the process ends, so ``kill -9``
    never leaves a stale lock. ``<run>/.lock.owner`` names the holder, for the error message.
    """

    def __init__(self, run: Path) -> None:
        self.run = Path(run)
        self._lock = None

    def acquire(self) -> RunLock:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.run / ".lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            try:
                who = (self.run / ".lock.owner").read_text(encoding="utf-8").strip()[:200]
            except OSError:
                who = "another process"
            raise ValueError(f"run '{self.run}' is being trained by {who}; wait for it to "
                             "finish (or stop it) before training or resuming it") from None
        self._lock = lock
        owner = f"process {os.getpid()} on {socket.gethostname()} (since " \
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})"
        atomic_write_text(self.run / ".lock.owner", owner + "\n")
        return self

    def release(self) -> None:
        if self._lock is not None:
            (self.run / ".lock.owner").unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def set_latest(runs_dir: Path, run: Path) -> None:
    atomic_write_text(Path(runs_dir) / LATEST, run.name + "\n")


def find_latest(runs_dir: Path) -> Path:
    """The newest run under `runs_dir`: the LATEST pointer, else the newest checkpoint."""
    runs_dir = check_runs_dir(runs_dir)
    pointer = runs_dir / LATEST
    try:  # a damaged or hostile pointer (`../../etc`, `/etc`, binary) is ignored, never followed
        name = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    if name and _safe_name(name) and has_checkpoint(runs_dir / name):
        return runs_dir / name
    candidates = [p.parent for p in runs_dir.glob("*/last.pt")]
    if not candidates:
        raise FileNotFoundError(
            f"no runs found in '{runs_dir}'; train one first (charlm train --config lstm) "
            "or pass --run / --runs-dir"
        )
    return max(candidates, key=lambda p: (p / "last.pt").stat().st_mtime)


def has_checkpoint(run: Path) -> bool:
    return (run / "last.pt").is_file() or (run / "best.pt").is_file()


def resolve_checkpoint(run: str | Path | None, runs_dir: Path, prefer: str = "best.pt") -> Path:
    """A checkpoint file from a run directory, a .pt file, or (None) the newest run."""
    path = find_latest(runs_dir) if run is None else Path(run)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (prefer, "last.pt", "best.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"run '{path}' has no checkpoint (best.pt or last.pt) yet")
    raise FileNotFoundError(f"run '{path}' not found: pass a run directory or a .pt file")


# ---------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes_via(path: Path, write) -> None:
    """Write `path` through `write(fileobj)` into a temp file, fsync, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temp files that a killed writer (kill -9, power loss) left in `directory`.

    Only files named like `atomic_write_bytes_via` names them, whose writer process is gone,
    are removed: a writer that is still alive keeps its file."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for path in entries:
        m = _TEMP_RE.match(path.name)
        if not m or not path.is_file():
            continue
        pid = int(m["pid"])
        if pid != os.getpid():
            if os.name == "nt":
                continue  # os.kill(pid, 0) would terminate the process on Windows
            try:
                os.kill(pid, 0)
                continue  # the writer still runs
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, OSError):
                continue  # someone else's live process, or not a pid we can check
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes_via(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Save a checkpoint atomically; on failure the previous file at `path` is untouched."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    try:
        atomic_write_bytes_via(path, lambda f: torch.save(payload, f))
    except OSError as e:
        raise OSError(
            f"could not save checkpoint '{path}' ({e.strerror or e}); the previous "
            f"checkpoint there, if any, is intact"
        ) from None


# ---------------------------------------------------------------------------- safe loading


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a charlm checkpoint with `weights_only=True`; anything else is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile,
            ValueError, AttributeError, TypeError, IndexError, KeyError) as e:
        first = first_sentences(str(e)) or type(e).__name__
        raise ValueError(
            f"'{path}' is not a loadable charlm checkpoint (truncated, corrupt, or not a "
            f"checkpoint; loading refused to run any code): {first}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a charlm checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(
            f"'{path}' is a charlm checkpoint of format version {ckpt.get('version')}, this "
            f"charlm reads version {VERSION}; use the charlm release that wrote it"
        )
    return ckpt


def first_sentences(text: str, limit: int = 200) -> str:
    """The first line of `text`, cut after whole sentences (or words) to about `limit`
    characters, so that a quoted error never stops mid-word."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = max(line.rfind(". ", 0, limit), line.rfind("; ", 0, limit))
    if cut > 0:  # whole sentences
        return line[: cut + 1]
    return line[: line.rfind(" ", 0, limit)].rstrip(",;:") + " ..."


# ---------------------------------------------------------------------------- load a run


class LoadedRun:
    """A model rebuilt from a checkpoint, with its config, vocabulary and raw checkpoint."""

    def __init__(self, path: Path, ckpt: dict, model, cfg, vocab):
        self.path, self.ckpt, self.model, self.cfg, self.vocab = path, ckpt, model, cfg, vocab


def load_run(checkpoint: Path, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild the model of a checkpoint on `device` (a GPU checkpoint loads on a CPU)."""
    from .config import from_dict, validate
    from .data import Vocab
    from .model import build_model

    ckpt = load_checkpoint(checkpoint)
    try:
        cfg = validate(from_dict(ckpt["config"], origin=f"{checkpoint} (saved config)"))
        vocab = Vocab(ckpt["vocab"])
        model = build_model(cfg, len(vocab))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"'{checkpoint}' is a damaged charlm checkpoint: {e}") from None
    return LoadedRun(Path(checkpoint), ckpt, model.to(device), cfg, vocab)


def load_run_for_use(run: str | Path | None, runs_dir: Path, device: torch.device | str,
                     notice: Callable[[str], None]) -> LoadedRun:
    """The run `sample` and `eval` use: `best.pt` of a run directory (or of the newest run),
    else `last.pt`; a damaged `best.pt` falls back to `last.pt` with a one-line notice. A
    checkpoint file named explicitly is loaded as it is."""
    path = resolve_checkpoint(run, runs_dir)
    try:
        return load_run(path, device)
    except ValueError as e:
        fallback = path.with_name("last.pt")
        if path.name != "best.pt" or not fallback.is_file() or (
                run is not None and Path(run).is_file()):
            raise
        notice(f"notice: {path} is damaged ({first_sentences(str(e), 120)}); using {fallback}")
        return load_run(fallback, device)
