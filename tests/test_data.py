"""Corpora, vocabulary, the token cache and batching."""

from __future__ import annotations

import hashlib
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from charlm import sources
from charlm.config import DataConfig
from charlm.data import (
    RandomBatcher,
    StreamBatcher,
    Vocab,
    build_vocab,
    cache_dir,
    encode_text,
    load_dataset,
    token_dtype,
)
from tests.conftest import SHAKESPEARE


def test_vocab_round_trip_and_sorting():
    text = "hello, wörld 🙂 한국어 中文\r\n"
    vocab = build_vocab(text)
    assert vocab.chars == "".join(sorted(set(text)))
    ids = encode_text(text, vocab)
    assert vocab.decode(ids) == text
    assert torch.equal(ids.long(), vocab.encode(text))


def test_token_dtype_is_smallest_that_fits():
    assert token_dtype(65) == torch.uint8
    assert token_dtype(300) == torch.uint16
    assert token_dtype(70000) == torch.int32


def test_large_vocabulary_uses_uint16():
    text = "".join(chr(0x4E00 + i) for i in range(10_500)) * 2
    ds = load_dataset(DataConfig(source=_write(text)))
    assert len(ds.vocab) == 10_500 and ds.train.dtype == torch.uint16


def _write(text: str, name: str = "t.txt") -> str:
    import tempfile

    d = tempfile.mkdtemp()
    path = os.path.join(d, name)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def test_last_fraction_is_validation():
    text = "abcdefghij" * 10
    ds = load_dataset(DataConfig(source=_write(text), val_fraction=0.1))
    assert ds.vocab.decode(ds.val) == text[-10:]
    assert ds.vocab.decode(ds.train) == text[:-10]


def test_cache_is_reused(tmp_path):
    path = _write("some text to cache " * 50)
    first = load_dataset(DataConfig(source=path))
    cached = list(cache_dir().glob("*.tokens"))
    assert len(cached) == 1
    second = load_dataset(DataConfig(source=path))
    assert torch.equal(first.train, second.train)
    assert list(cache_dir().glob("*.tokens")) == cached


def test_windows_line_endings_are_normalised():
    ds = load_dataset(DataConfig(source=_write("line one\r\nline two\r\n" * 20)))
    assert "\r" not in ds.vocab.chars


def test_non_utf8_is_replaced_with_a_warning(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème ".encode("latin-1") * 20)
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        ds = load_dataset(DataConfig(source=str(path)))
    assert "\ufffd" in ds.vocab.chars


def test_directory_corpus_reads_sorted_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("BBBB")
    (tmp_path / "a.txt").write_text("AAAA")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    raw, files = sources.read_corpus(str(tmp_path))
    assert raw == b"AAAABBBB" and [f.name for f in files] == ["a.txt", "b.txt"]


def test_empty_directory_and_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no text files"):
        sources.read_corpus(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a file, a directory or a named corpus"):
        sources.read_corpus(str(tmp_path / "nope.txt"))


def test_empty_corpus_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_dataset(DataConfig(source=str(path)))


def test_hello_corpus():
    ds = load_dataset(DataConfig(source="hello", val_fraction=0.0))
    assert ds.vocab.chars == "ehlo" and ds.vocab.decode(ds.train) == "hello"


def test_stdlib_corpus_files():
    files = sources.stdlib_files()
    assert len(files) > 500
    assert all(f.suffix == ".py" for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts)
    assert files == sorted(files)


def test_stream_batcher_is_contiguous_and_wraps():
    tokens = torch.arange(101)
    b = StreamBatcher(tokens, batch_size=2, seq_len=10)  # streams of 50
    x1, y1, r1 = b.next()
    x2, _, _ = b.next()
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert torch.equal(x2[:, 0], x1[:, -1] + 1)  # row b continues where it stopped
    assert x1[1, 0] == 50
    for _ in range(3):
        b.next()
    _, _, reset = b.next()
    assert reset and b.pos == 10


def test_random_batcher_is_reproducible_through_its_state():
    tokens = torch.arange(1000)
    a = RandomBatcher(tokens, 4, 8, seed=1)
    a.next()
    saved = a.state_dict()
    x1, _, _ = a.next()
    b = RandomBatcher(tokens, 4, 8, seed=99)
    b.load_state_dict(saved)
    x2, _, _ = b.next()
    assert torch.equal(x1, x2)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_tinyshakespeare_download_is_verified(tmp_path, monkeypatch):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (tmp_path / "input.txt").write_bytes(payload)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/input.txt"
        monkeypatch.setenv("CHARLM_TINYSHAKESPEARE_URL", url)
        with pytest.raises(ValueError, match="SHA-256"):  # wrong content is refused, not saved
            sources.download_tinyshakespeare()
        assert not (sources.data_dir() / "tinyshakespeare.txt").exists()
        monkeypatch.setattr(sources, "TINYSHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
        path = sources.download_tinyshakespeare()
        assert path.read_bytes() == payload
        server.shutdown()
        assert sources.download_tinyshakespeare() == path  # second call: no network needed
    finally:
        server.server_close()


def test_tinyshakespeare_offline_message(monkeypatch):
    monkeypatch.setenv("CHARLM_TINYSHAKESPEARE_URL", "http://127.0.0.1:9/none.txt")
    with pytest.raises(FileNotFoundError, match="pass a local copy"):
        sources.download_tinyshakespeare()


def test_vocab_missing_characters():
    assert Vocab("abc").missing("abxcyx") == ["x", "y"]


def test_split_rounds_as_nanogpt_at_tinyshakespeare_size(tmp_path, monkeypatch):
    """Without ../shared too: 1,115,394 characters split into nanoGPT's 1,003,854 + 111,540
    (train = int(0.9 n)), the figures every published tiny shakespeare loss uses."""
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "same-size.txt"
    corpus.write_bytes((b"abcdefghij\n" * 101_400)[:1_115_394])
    ds = load_dataset(DataConfig(source=str(corpus)))
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_tinyshakespeare_split_matches_nanogpt():
    """65 characters, 1,003,854 training and 111,540 validation characters: nanoGPT's split."""
    ds = load_dataset(DataConfig(source=str(SHAKESPEARE)))
    assert (len(ds.vocab), len(ds.train), len(ds.val)) == (65, 1_003_854, 111_540)
