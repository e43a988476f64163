"""Corpora, vocabulary, the encoded token cache, and batching.

A corpus is a text file, a directory of text files (sorted), a glob, or a named corpus
(`python-stdlib`, `tinyshakespeare`, `hello`). It is encoded once, vectorised (no Python loop
per character), into a token file of the smallest integer dtype that holds the vocabulary; the
file is keyed by the corpus content and memory-mapped afterwards, so a 100 MB corpus never lives
in RAM as int64. This module knows nothing of the CLI: it raises ValueError/FileNotFoundError
with messages that name the file and the fix.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sys
import sysconfig
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".csv", ".tsv", ".json", ".html", ".tex"}
_MAX_CODEPOINT = 0x110000
_CHUNK_CHARS = 8_000_000  # encode in chunks to bound peak memory on huge corpora
CACHE_FORMAT = 1


# ---------------------------------------------------------------------------- vocabulary


class Vocab:
    """Characters <-> integer ids, sorted by code point (as nanoGPT's shakespeare_char)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Ids of `text` (every character must be in the vocabulary)."""
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def missing(self, text: str) -> list[str]:
        """Characters of `text` the vocabulary lacks, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every id."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 65536:
        return torch.uint16
    return torch.int32


def _codepoints(text: str) -> torch.Tensor:
    # UTF-32 gives one int32 per character: the vectorised way from str to integers.
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)


def build_vocab(text: str) -> Vocab:
    """The sorted set of characters of `text`, found with a histogram of code points."""
    counts = torch.zeros(_MAX_CODEPOINT, dtype=torch.int64)
    for start in range(0, len(text), _CHUNK_CHARS):
        counts += torch.bincount(_codepoints(text[start : start + _CHUNK_CHARS]),
                                 minlength=_MAX_CODEPOINT)
    present = torch.nonzero(counts).flatten().tolist()
    return Vocab("".join(map(chr, present)))


def encode_text(text: str, vocab: Vocab) -> torch.Tensor:
    """Encode `text` into a 1-D tensor of `token_dtype(len(vocab))`, vectorised."""
    lut = torch.full((_MAX_CODEPOINT,), -1, dtype=torch.int32)
    lut[torch.tensor([ord(c) for c in vocab.chars], dtype=torch.long)] = torch.arange(
        len(vocab), dtype=torch.int32
    )
    dtype = token_dtype(len(vocab))
    out = torch.empty(len(text), dtype=dtype)
    for start in range(0, len(text), _CHUNK_CHARS):
        ids = lut[_codepoints(text[start : start + _CHUNK_CHARS]).long()]
        if bool((ids < 0).any()):
            raise ValueError("text contains characters outside the vocabulary")
        out[start : start + len(ids)] = ids.to(dtype)
    return out


# ---------------------------------------------------------------------------- corpus sources


def data_dir() -> Path:
    """Where downloaded corpora go: $CHARLM_DATA_DIR, the checkout's data/, or ~/.cache/charlm."""
    if os.environ.get("CHARLM_DATA_DIR"):
        return Path(os.environ["CHARLM_DATA_DIR"])
    checkout = Path(__file__).resolve().parent.parent / "data"
    if (checkout / "hello.txt").is_file() and os.access(checkout, os.W_OK):
        return checkout
    return Path.home() / ".cache" / "charlm" / "data"


def cache_dir() -> Path:
    """Where encoded token caches go: $CHARLM_CACHE_DIR or ~/.cache/charlm/tokens."""
    if os.environ.get("CHARLM_CACHE_DIR"):
        return Path(os.environ["CHARLM_CACHE_DIR"])
    return Path.home() / ".cache" / "charlm" / "tokens"


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


def read_corpus(source: str) -> tuple[bytes, list[Path]]:
    """The raw bytes of a corpus (files joined in order) and the files they came from."""
    files = source_files(source)
    parts = []
    for f in files:
        try:
            parts.append(f.read_bytes())
        except OSError as e:
            raise FileNotFoundError(f"cannot read corpus file '{f}': {e.strerror}") from None
    return b"".join(parts), files


def decode_corpus(raw: bytes, source: str) -> str:
    """UTF-8 text; invalid bytes are replaced by U+FFFD with a warning (never a crash)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        warnings.warn(
            f"data.source '{source}' is not valid UTF-8: {text.count(chr(0xFFFD))} "
            "undecodable byte sequences were replaced by U+FFFD",
            stacklevel=2,
        )
    # Windows line endings would double every line break's cost; normalise like text mode does.
    return text.replace("\r\n", "\n")


# ---------------------------------------------------------------------------- dataset


@dataclass
class Dataset:
    """A tokenised corpus split into training and validation token tensors (1-D)."""

    vocab: Vocab
    train: torch.Tensor
    val: torch.Tensor
    source: str
    num_chars: int
    val_is_train: bool = False  # val_fraction 0: the training text doubles as validation


def _cached_tokens(raw: bytes, source: str) -> tuple[Vocab, torch.Tensor]:
    """Encode `raw` once into the token cache; later calls memory-map the cached file."""
    key = _sha256(raw)[:24]
    root = cache_dir()
    meta_path, tok_path = root / f"{key}.json", root / f"{key}.tokens"
    if meta_path.is_file() and tok_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") == CACHE_FORMAT:
                dtype = getattr(torch, meta["dtype"])
                tokens = torch.from_file(str(tok_path), shared=False, size=meta["length"],
                                         dtype=dtype)
                return Vocab(meta["vocab"]), tokens
        except (OSError, ValueError, KeyError, RuntimeError, AttributeError):
            pass  # a damaged cache entry is rebuilt below
    text = decode_corpus(raw, source)
    vocab = build_vocab(text)
    tokens = encode_text(text, vocab)
    del text
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tok_path.with_name(f"{tok_path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"")
        # A shared mapping writes straight through to the file: no extra copy in RAM.
        torch.from_file(str(tmp), shared=True, size=len(tokens), dtype=tokens.dtype).copy_(tokens)
        os.replace(tmp, tok_path)
        meta = {"format": CACHE_FORMAT, "vocab": vocab.chars, "length": len(tokens),
                "dtype": str(tokens.dtype).removeprefix("torch.")}
        tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp_meta, meta_path)
    except OSError as e:  # a read-only cache is an inconvenience, not an error
        print(f"charlm: could not write token cache in {root}: {e.strerror}", file=sys.stderr)
    return vocab, tokens


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read, encode (cached) and split the corpus named by `cfg.source`."""
    raw, files = read_corpus(cfg.source)
    if not raw.strip():
        raise ValueError(f"data.source '{cfg.source}' is empty: give a file with some text")
    vocab, tokens = _cached_tokens(raw, cfg.source)
    n = len(tokens)
    n_val = int(n * cfg.val_fraction)
    if n_val == 0:
        return Dataset(vocab, tokens, tokens, cfg.source, n, val_is_train=True)
    return Dataset(vocab, tokens[: n - n_val], tokens[n - n_val :], cfg.source, n)


def check_lengths(ds: Dataset, batch_size: int, seq_len: int, world_size: int = 1) -> None:
    """Fail early, naming the keys to change, if the splits are too short to batch."""
    need = seq_len + 1
    if len(ds.train) < need:
        raise ValueError(
            f"corpus '{ds.source}' has {len(ds.train)} training characters but train.seq_len="
            f"{seq_len} needs at least {need}; lower train.seq_len or use a longer corpus"
        )
    if len(ds.val) < need:
        raise ValueError(
            f"the validation split of '{ds.source}' has {len(ds.val)} characters, fewer than "
            f"train.seq_len + 1 = {need}; raise data.val_fraction or lower train.seq_len"
        )


# ---------------------------------------------------------------------------- batching


class StreamBatcher:
    """Stateful batches: `batch_size` contiguous streams through the text, advanced by `seq_len`.

    Row b of consecutive batches continues where it stopped, so a recurrent model can carry its
    hidden state across windows (char-rnn, word_language_model). When the streams run out they
    wrap to their start and `next()` reports `reset=True` so the caller drops the state.
    With several ranks, each rank owns its own streams (a different part of the text).
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1):
        total = batch_size * world_size
        self.stream_len = (len(tokens) - 1) // total
        if self.stream_len < seq_len:
            # Too little text for this many streams: fall back to overlapping streams.
            self.stream_len = seq_len
            starts = torch.linspace(0, len(tokens) - seq_len - 1, total).long()
        else:
            starts = torch.arange(total) * self.stream_len
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = starts[rank * batch_size : (rank + 1) * batch_size]
        self.offsets = torch.arange(seq_len + 1)
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        reset = False
        if self.pos + self.seq_len > self.stream_len:
            self.pos, reset = 0, True
        idx = self.starts[:, None] + self.pos + self.offsets  # (B, T+1)
        chunk = self.tokens[idx].long()
        self.pos += self.seq_len
        return chunk[:, :-1], chunk[:, 1:], reset

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


class RandomBatcher:
    """Independent random windows (nanoGPT style); reproducible through its own generator."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed + 1000003 * rank)
        self.offsets = torch.arange(seq_len + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        high = len(self.tokens) - self.seq_len
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        chunk = self.tokens[starts[:, None] + self.offsets].long()  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:], True

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, num_batches: int):
    """Fixed, evenly spaced validation windows: the same every evaluation, no RNG used."""
    count = batch_size * num_batches
    starts = torch.linspace(0, len(tokens) - seq_len - 1, count).long()
    offsets = torch.arange(seq_len + 1)
    for b in range(num_batches):
        chunk = tokens[starts[b * batch_size : (b + 1) * batch_size, None] + offsets].long()
        yield chunk[:, :-1], chunk[:, 1:]
