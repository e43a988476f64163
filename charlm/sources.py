"""Corpus sources: where a corpus's files come from, and how their bytes become text.

A corpus is a text file, a directory of text files (sorted), a glob, or a named corpus
(`python-stdlib`, `tinyshakespeare`, `hello`). Named ones are found here (tiny shakespeare is
downloaded once and verified by SHA-256); bytes are decoded as UTF-8 in bounded pieces, a
byte-order mark dropped, CRLF made LF and undecodable bytes replaced with a warning.
:mod:`charlm.data` encodes and caches the text. Errors are ValueError/FileNotFoundError
naming the file and the fix.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import sysconfig
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

from .config import NAMED_CORPORA

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".csv", ".tsv", ".json", ".html", ".tex"}
# Bytes are decoded in pieces of this size to bound peak memory on huge corpora.
_CHUNK_BYTES = 8 << 20



def data_dir() -> Path:
    """Where downloaded corpora go: $CHARLM_DATA_DIR, the checkout's data/, or ~/.cache/charlm."""
    if os.environ.get("CHARLM_DATA_DIR"):
        return Path(os.environ["CHARLM_DATA_DIR"])
    checkout = Path(__file__).resolve().parent.parent / "data"
    if (checkout / "hello.txt").is_file() and os.access(checkout, os.W_OK):
        return checkout
    return Path.home() / ".cache" / "charlm" / "data"


def _shipped(name: str) -> Path:
    checkout = Path(__file__).resolve().parent.parent / "data" / name
    if checkout.is_file():
        return checkout
    return Path(__file__).resolve().parent / "corpora" / name  # installed as package data


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, minus tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "idle_test"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files)


def download_tinyshakespeare() -> Path:
    """Download tiny shakespeare once into `data_dir()`, verified by SHA-256."""
    target = data_dir() / "tinyshakespeare.txt"
    if target.is_file() and _sha256(target.read_bytes()) == TINYSHAKESPEARE_SHA256:
        return target
    url = os.environ.get("CHARLM_TINYSHAKESPEARE_URL", TINYSHAKESPEARE_URL)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise FileNotFoundError(
            f"could not download tinyshakespeare from {url} ({reason}); you seem to be offline: "
            "pass a local copy instead, e.g. --set data.source=path/to/tinyshakespeare.txt"
        ) from None
    digest = _sha256(payload)
    if digest != TINYSHAKESPEARE_SHA256:
        raise ValueError(
            f"downloaded tinyshakespeare from {url} has SHA-256 {digest[:12]}..., expected "
            f"{TINYSHAKESPEARE_SHA256[:12]}...; not saved. Pass a local copy with "
            "--set data.source=FILE"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(payload)
    os.replace(tmp, target)
    return target


def source_files(source: str) -> list[Path]:
    """The files a `data.source` names, in reading order."""
    if source == "python-stdlib":
        return stdlib_files()
    if source == "hello":
        return [_shipped("hello.txt")]
    if source == "tinyshakespeare":
        return [download_tinyshakespeare()]
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise FileNotFoundError(
                f"data.source directory '{source}' holds no text files "
                f"({', '.join(sorted(TEXT_SUFFIXES))})"
            )
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data.source glob '{source}' matches no files")
        return files
    raise FileNotFoundError(
        f"data.source '{source}' is not a file, a directory or a named corpus "
        "(python-stdlib, tinyshakespeare, hello)"
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_files(files: list[Path]) -> bytes:
    """The bytes of `files` joined in order, each without a UTF-8 byte-order mark."""
    parts = []
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as e:
            raise FileNotFoundError(f"cannot read corpus file '{f}': {e.strerror}") from None
        # Windows editors start UTF-8 files with a byte-order mark: not text, so not a token
        parts.append(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw)
    return parts[0] if len(parts) == 1 else b"".join(parts)  # one file: no second copy


def read_corpus(source: str) -> tuple[bytes, list[Path]]:
    """The raw bytes of a corpus (files joined in order) and the files they came from."""
    files = source_files(source)
    return read_files(files), files


def corpus_digest(files: list[Path]) -> str:
    """SHA-256 of the files joined, read in blocks: a cache hit never holds the corpus in RAM."""
    h = hashlib.sha256()
    for f in files:
        try:
            with open(f, "rb") as fh:
                while block := fh.read(_CHUNK_BYTES):
                    h.update(block)
        except OSError as e:
            raise FileNotFoundError(f"cannot read corpus file '{f}': {e.strerror}") from None
    return h.hexdigest()


def text_pieces(raw: bytes) -> Iterator[tuple[str, int]]:
    """Decode UTF-8 `raw` about `_CHUNK_BYTES` at a time, with CRLF normalised to LF; yields
    (text, number of undecodable byte sequences replaced by U+FFFD). Cuts fall between
    characters and never inside a CRLF, so the pieces joined are the whole text decoded, while
    a str of the whole corpus (up to 4 bytes per character) is never built."""
    n, start = len(raw), 0
    while start < n:
        end = min(start + _CHUNK_BYTES, n)
        if end < n:
            lowest = max(start + 1, end - 3)  # a character has at most 3 continuation bytes
            while end > lowest and raw[end] & 0xC0 == 0x80:  # 0b10xxxxxx: continuation byte
                end -= 1
            if raw[end - 1] == 0x0D and end - 1 > start:  # keep "\r\n" in one piece
                end -= 1
        piece = raw[start:end]
        try:
            text, bad = piece.decode("utf-8"), 0
        except UnicodeDecodeError:
            text = piece.decode("utf-8", errors="replace")
            bad = text.count("\ufffd") - piece.count("\ufffd".encode("utf-8"))
        # Windows line endings would double every line break's cost; normalise like text mode.
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        yield text, bad
        start = end


def warn_undecodable(source: str, bad: int) -> None:
    warnings.warn(
        f"data.source '{source}' is not valid UTF-8: {bad} undecodable byte sequences were "
        "replaced by U+FFFD",
        stacklevel=3,
    )


def decode_corpus(raw: bytes, source: str) -> str:
    """UTF-8 text; invalid bytes are replaced by U+FFFD with a warning (never a crash)."""
    pieces = list(text_pieces(raw))
    bad = sum(b for _, b in pieces)
    if bad:
        warn_undecodable(source, bad)
    return "".join(text for text, _ in pieces)


def absolute_source(source: str) -> str:
    """`data.source` with a relative path (or glob) made absolute, so that a run's saved
    config names the same files from any directory; named corpora stay as they are."""
    if source in NAMED_CORPORA:
        return source
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?[") and not path.exists():
        return os.path.abspath(os.path.expanduser(source))
    return str(path.resolve())
