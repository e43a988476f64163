"""Vocabulary, the encoded token cache, the dataset and batching.

A corpus (:mod:`charlm.sources`: a file, a directory, a glob or a named corpus) is encoded
once, vectorised (no Python loop per character), into a token file of the smallest integer
dtype that holds the vocabulary; the file is keyed by the corpus content and memory-mapped
afterwards, so a 100 MB corpus never lives in RAM as int64. This module knows nothing of the
CLI: it raises ValueError/FileNotFoundError with messages that name the file and the fix.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig
from .sources import (
    corpus_digest,
    read_files,
    source_files,
    text_pieces,
    warn_undecodable,
)

_MAX_CODEPOINT = 0x110000
# Text is encoded in pieces of this many characters to bound peak memory on huge corpora.
_CHUNK_CHARS = 8_000_000
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
        """Ids of `text` as int64 (every character must be in the vocabulary, else
        ValueError). Long texts take the vectorised path of `encode_text`."""
        if len(text) > 4096:
            return encode_text(text, self).long()
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def missing(self, text: str) -> list[str]:
        """Characters of `text` the vocabulary lacks, in order of first appearance."""
        absent = set(text).difference(self.stoi)  # set() runs in C: fast on a big file
        if len(absent) > 256:  # ordering by text.index would rescan the text for each one
            return list(dict.fromkeys(c for c in text if c in absent))
        return sorted(absent, key=text.index)


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every id."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 65536:
        return torch.uint16
    return torch.int32


def _codepoints(text: str) -> torch.Tensor:
    """The code points of `text` as int32, without a Python loop per character."""
    if not text:
        return torch.empty(0, dtype=torch.int32)
    # UTF-32 gives one int32 per character. The bytes are read-only and torch warns about
    # that; the tensor is only ever read, so wrapping them saves a copy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(text.encode("utf-32-le"), dtype=torch.int32)


def _str_pieces(text: str) -> Iterator[str]:
    for start in range(0, len(text), _CHUNK_CHARS):
        yield text[start : start + _CHUNK_CHARS]


def _scan(pieces: Iterable[str]) -> tuple[Vocab, int]:
    """The vocabulary (from a histogram of code points) and the length of text in pieces."""
    counts = torch.zeros(_MAX_CODEPOINT, dtype=torch.int64)
    length = 0
    for piece in pieces:
        points = _codepoints(piece)
        counts += torch.bincount(points, minlength=_MAX_CODEPOINT)
        length += len(points)
    present = torch.nonzero(counts).flatten().tolist()
    return Vocab("".join(map(chr, present))), length


def build_vocab(text: str) -> Vocab:
    """The sorted set of characters of `text`, found with a histogram of code points."""
    return _scan(_str_pieces(text))[0]


def _lookup_table(vocab: Vocab) -> torch.Tensor:
    """code point -> id (int32), -1 for characters outside the vocabulary."""
    lut = torch.full((_MAX_CODEPOINT,), -1, dtype=torch.int32)
    lut[torch.tensor([ord(c) for c in vocab.chars], dtype=torch.long)] = torch.arange(
        len(vocab), dtype=torch.int32
    )
    return lut


def _encode_piece(text: str, lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # index_select is an order of magnitude faster than advanced indexing (lut[points]) here.
    ids = lut.index_select(0, _codepoints(text))
    if bool((ids < 0).any()):
        raise ValueError("text contains characters outside the vocabulary")
    return ids.to(dtype)


def encode_text(text: str, vocab: Vocab) -> torch.Tensor:
    """Encode `text` into a 1-D tensor of `token_dtype(len(vocab))`, vectorised."""
    lut, dtype = _lookup_table(vocab), token_dtype(len(vocab))
    out = torch.empty(len(text), dtype=dtype)
    for i, piece in enumerate(_str_pieces(text)):
        out[i * _CHUNK_CHARS : i * _CHUNK_CHARS + len(piece)] = _encode_piece(piece, lut, dtype)
    return out


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
    digest: str = ""  # SHA-256 of the corpus files as stored, joined in order
    size_bytes: int = 0

    def identity(self) -> dict:
        """What a run records of its corpus, to notice later if it changed or went away."""
        return {"source": self.source, "bytes": self.size_bytes, "sha256": self.digest}


def check_corpus(ds: Dataset, recorded: dict | None, fix: str) -> None:
    """Refuse a corpus that is not the one a run recorded (`Dataset.identity`)."""
    if not recorded or not recorded.get("sha256") or recorded["sha256"] == ds.digest:
        return
    raise ValueError(
        f"the corpus '{ds.source}' changed since the run was trained: it was "
        f"{recorded['bytes']:,} bytes with SHA-256 {recorded['sha256'][:16]}..., it is now "
        f"{ds.size_bytes:,} bytes with SHA-256 {ds.digest[:16]}...; {fix}"
    )


def missing_corpus(source: str, recorded: dict | None, fix: str) -> FileNotFoundError:
    """The error for a run's corpus that is gone, with what was recorded of it."""
    was = ""
    if recorded and recorded.get("sha256"):
        was = (f" (it was {recorded['bytes']:,} bytes with SHA-256 "
               f"{recorded['sha256'][:16]}...)")
    return FileNotFoundError(f"the run's corpus '{source}' is gone{was}; {fix}")


def cache_dir() -> Path:
    """Where encoded token caches go: $CHARLM_CACHE_DIR or ~/.cache/charlm/tokens."""
    if os.environ.get("CHARLM_CACHE_DIR"):
        return Path(os.environ["CHARLM_CACHE_DIR"])
    return Path.home() / ".cache" / "charlm" / "tokens"


def _cache_paths(key: str) -> tuple[Path, Path]:
    root = cache_dir()
    return root / f"{key}.json", root / f"{key}.tokens"


def _open_cached(key: str) -> tuple[Vocab, torch.Tensor] | None:
    """Memory-map the cached tokens of corpus `key`, or None if absent, stale or damaged."""
    meta_path, tok_path = _cache_paths(key)
    if not (meta_path.is_file() and tok_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            return None
        dtype = getattr(torch, meta["dtype"])
        if tok_path.stat().st_size != meta["length"] * dtype.itemsize:
            return None
        # A private, read-only-in-practice mapping: pages are read from disk as batches touch
        # them and can be dropped again by the kernel, so RSS stays far below the corpus size.
        tokens = torch.from_file(str(tok_path), shared=False, size=meta["length"], dtype=dtype)
        return Vocab(meta["vocab"]), tokens
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError):
        return None  # a damaged cache entry is rebuilt


def _encode_into_cache(raw: bytes, source: str, key: str) -> tuple[Vocab, torch.Tensor]:
    """Encode `raw` in two passes over pieces (vocabulary, then ids) straight into the token
    cache file named by `key`, and memory-map the result; if the cache is not writable, keep
    it in RAM."""
    bad = 0

    def pieces() -> Iterator[str]:
        nonlocal bad
        bad = 0
        for text, undecodable in text_pieces(raw):
            bad += undecodable
            yield text

    vocab, length = _scan(pieces())
    if bad:
        warn_undecodable(source, bad)
    lut, dtype = _lookup_table(vocab), token_dtype(len(vocab))
    meta_path, tok_path = _cache_paths(key)
    tmp = tok_path.with_name(f"{tok_path.name}.{os.getpid()}.tmp")
    try:
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"")
        # A shared mapping writes straight through to the file: the ids never exist in RAM
        # beyond the page cache.
        out = torch.from_file(str(tmp), shared=True, size=length, dtype=dtype)
    except (OSError, RuntimeError) as e:  # a read-only cache is an inconvenience, not an error
        reason = getattr(e, "strerror", None) or e
        print(f"charlm: could not write token cache in {tok_path.parent}: {reason}",
              file=sys.stderr)
        tmp, out = None, torch.empty(length, dtype=dtype)
    pos = 0
    try:
        for text in pieces():
            ids = _encode_piece(text, lut, dtype)
            out[pos : pos + len(ids)] = ids
            pos += len(ids)
    except BaseException:  # Ctrl-C mid-encoding: leave no corpus-sized temp file behind
        del out
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    if tmp is None:
        return vocab, out
    del out  # unmap (flushes to the file) before the rename
    try:
        os.replace(tmp, tok_path)
        meta = {"format": CACHE_FORMAT, "vocab": vocab.chars, "length": length,
                "dtype": str(dtype).removeprefix("torch.")}
        tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp_meta, meta_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write token cache in {tok_path.parent}: {e.strerror}") from None
    return vocab, torch.from_file(str(tok_path), shared=False, size=length, dtype=dtype)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read, encode (cached) and split the corpus named by `cfg.source`.

    The cache is keyed by the SHA-256 of the corpus bytes, so an edited corpus is re-encoded
    and an unchanged one is only hashed (streamed) and memory-mapped."""
    files = source_files(cfg.source)
    # One key for lookup and write: the digest of the files as stored (a byte-order mark
    # included), so the corpus is hashed once, and a BOM file hits the cache too.
    digest = corpus_digest(files)
    key = digest[:24]
    cached = _open_cached(key)
    if cached is None:
        raw = read_files(files)
        # isspace() stops at the first non-space byte; strip() would copy the whole corpus.
        if not raw or raw.isspace():
            raise ValueError(f"data.source '{cfg.source}' is empty: give a file with some text")
        cached = _encode_into_cache(raw, cfg.source, key)
        del raw
    vocab, tokens = cached
    n = len(tokens)
    # Split as nanoGPT's shakespeare_char does (train = first int(0.9 n)), so figures compare.
    n_train = int(n * (1 - cfg.val_fraction))
    size = sum(f.stat().st_size for f in files)
    if n_train >= n:
        return Dataset(vocab, tokens, tokens, cfg.source, n, True, digest, size)
    return Dataset(vocab, tokens[:n_train], tokens[n_train:], cfg.source, n, False, digest, size)


def check_lengths(ds: Dataset, seq_len: int) -> None:
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
