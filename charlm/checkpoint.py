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


def _safe_name(name: str) -> bool:
    """A run name that stays inside the runs directory (no `../x`, `/etc/x`, ...)."""
    return bool(_NAME_RE.match(name)) and ".." not in name


def check_run_name(name: str) -> str:
    """Refuse names that could escape the runs directory (`../x`, `/etc/x`, ...)."""
    if not _safe_name(name):
        raise ValueError(
            f"--name '{name}' is not a valid run name: use letters, digits, '.', '_' and '-' "
            "(no '/', no '..', not starting with '.')"
        )
    return name


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """The path for a new run `runs_dir/name` (created later, once training can start); an
    existing run is never reused (that is what --resume is for)."""
    run = Path(runs_dir) / check_run_name(name)
    if run.exists():
        raise ValueError(
            f"run '{run}' already exists; pass --resume to continue it or --name to start another"
        )
    return run


def set_latest(runs_dir: Path, run: Path) -> None:
    atomic_write_text(Path(runs_dir) / LATEST, run.name + "\n")


def find_latest(runs_dir: Path) -> Path:
    """The newest run under `runs_dir`: the LATEST pointer, else the newest checkpoint."""
    runs_dir = Path(runs_dir)
    pointer = runs_dir / LATEST
    try:  # a damaged or hostile pointer (`../../etc`, `/etc`, binary) is ignored, never followed
        name = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    if name and _safe_name(name) and (runs_dir / name).is_dir():
        return runs_dir / name
    candidates = [p.parent for p in runs_dir.glob("*/last.pt")]
    if not candidates:
        raise FileNotFoundError(
            f"no runs found in '{runs_dir}'; train one first (charlm train --config lstm) "
            "or pass --run / --runs-dir"
        )
    return max(candidates, key=lambda p: (p / "last.pt").stat().st_mtime)


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
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
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
