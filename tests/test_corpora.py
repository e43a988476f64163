"""Unusual corpora through the whole CLI (train -> sample -> eval) on tiny models: Hangul, CJK
and emoji; Windows line endings and a byte-order mark; a single repeated character; vocabularies
of 10,000 and 70,000 distinct characters (uint16 and int32 token files)."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch

from charlm import checkpoint as ck
from charlm import data as data_module
from charlm import sources
from charlm.config import DataConfig
from tests.conftest import invoke, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")




def train_tiny(tmp_path: Path, corpus: Path, cell: str = "lstm", steps: int = 10,
               extra: tuple[str, ...] = ()) -> Path:
    runs = tmp_path / "runs"
    overrides = tiny_overrides(corpus, cell, steps) + list(extra)
    result = invoke("train", "--config", cell, "--runs-dir", runs, "--name", "r", "--quiet",
                    *[x for o in overrides for x in ("--set", o)])
    assert result.exit_code == 0, result.stderr
    return runs / "r"


def vocab_of(run: Path) -> str:
    return ck.load_checkpoint(run / "last.pt")["vocab"]


def scores(run: Path, *extra) -> dict:
    result = invoke("eval", "--run", run, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


MULTILINGUAL = ("안녕하세요, 세계! 한국어 문장입니다.\n你好，世界。这是中文。\n"
                "こんにちは世界、日本語です。\n"
                "emoji 🌍🚀🎉 and a family 👩‍👩‍👧 (joined by ZWJ), flags 🇰🇷🇯🇵\n")


def test_hangul_cjk_and_emoji(tmp_path):
    corpus = tmp_path / "multi.txt"
    corpus.write_text(MULTILINGUAL * 40, encoding="utf-8")
    run = train_tiny(tmp_path, corpus)
    vocab = vocab_of(run)
    assert {"안", "你", "こ", "🌍", "\u200d", "🇰"} <= set(vocab)  # one token per code point
    assert vocab == "".join(sorted(set(MULTILINGUAL)))
    sampled = invoke("sample", "--run", run, "--prime", "안녕", "--length", "40", "--seed", "1")
    assert sampled.exit_code == 0, sampled.stderr
    assert sampled.stdout.startswith("안녕") and len(sampled.stdout) == 2 + 40 + 1
    assert set(sampled.stdout[:-1]) <= set(vocab)
    assert scores(run, "--data", corpus)["chars"] == len(MULTILINGUAL) * 40 - 1


def test_windows_line_endings_and_byte_order_mark(tmp_path):
    text = "first line of a windows file\r\nsecond line, \u00e9t\u00e9\r\n" * 60
    corpus = tmp_path / "windows.txt"
    corpus.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    run = train_tiny(tmp_path, corpus)
    vocab = vocab_of(run)
    assert "\r" not in vocab and "\ufeff" not in vocab and "\n" in vocab
    unix = tmp_path / "unix.txt"
    unix.write_text(text.replace("\r\n", "\n"), encoding="utf-8")
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(text.encode("utf-8"))
    assert scores(run, "--data", crlf) == scores(run, "--data", unix)
    # The BOM file itself scores like the same text without one (eval reads as training does)
    assert scores(run, "--data", corpus) == scores(run, "--data", unix)


def test_a_byte_order_mark_corpus_is_encoded_once(tmp_path, monkeypatch):
    """The token cache is looked up and written under one key, BOM included."""
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "bom.txt"
    corpus.write_bytes(b"\xef\xbb\xbf" + ("some text to cache\n" * 50).encode("utf-8"))
    encoded = []
    real = data_module._encode_into_cache
    monkeypatch.setattr(data_module, "_encode_into_cache",
                        lambda *a: encoded.append(a[1]) or real(*a))
    first = data_module.load_dataset(DataConfig(source=str(corpus)))
    second = data_module.load_dataset(DataConfig(source=str(corpus)))
    assert len(encoded) == 1  # the second load came from the cache
    assert first.vocab.chars == second.vocab.chars and "\ufeff" not in first.vocab.chars
    assert torch.equal(first.train, second.train)


@pytest.mark.parametrize("text", [
    "안녕\r\n世界🌍👩‍💻 é\r\n\r\nab\rc" * 3,
    "ab\r\ncé\r\n中文\r\n🙂x\r\r\nend 🙂é\n" * 7,  # a lone CR right before a CRLF
])
@pytest.mark.parametrize("chunk", range(4, 14))  # cut at every possible offset
def test_decoding_in_chunks_never_splits_a_character_or_a_crlf(monkeypatch, chunk, text):
    monkeypatch.setattr(sources, "_CHUNK_BYTES", chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a split character would be reported as undecodable
        assert sources.decode_corpus(text.encode("utf-8"), "x") == text.replace("\r\n", "\n")


@pytest.mark.parametrize("cell", ["lstm", "transformer"])
def test_a_single_repeated_character(tmp_path, cell):
    corpus = tmp_path / "a.txt"
    corpus.write_text("a" * 2000, encoding="utf-8")
    run = train_tiny(tmp_path, corpus, cell)
    assert vocab_of(run) == "a"
    assert ck.load_checkpoint(run / "last.pt")["best_val_loss"] == pytest.approx(0.0, abs=1e-6)
    sampled = invoke("sample", "--run", run, "--length", "12", "--top-k", "5", "--top-p", "0.9")
    assert sampled.exit_code == 0 and sampled.stdout == "a" * 12 + "\n", sampled.stderr
    score = scores(run)
    assert score["bpc"] == pytest.approx(0.0, abs=1e-6)
    assert score["perplexity"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("distinct, dtype", [(10_500, "uint16"), (70_000, "int32")])
def test_a_huge_vocabulary(tmp_path, distinct, dtype):
    # every code point from U+00A1 up, skipping the surrogates UTF-8 cannot encode
    chars = [chr(c) for c in range(0xA1, 0xA1 + distinct + 2048) if not 0xD800 <= c <= 0xDFFF]
    chars = chars[:distinct]
    text = "".join(random.Random(0).sample(chars, len(chars)))  # each character once
    corpus = tmp_path / "huge.txt"
    corpus.write_text(text, encoding="utf-8")
    ds = data_module.load_dataset(data_module.DataConfig(source=str(corpus)))
    assert len(ds.vocab) == distinct and str(ds.train.dtype) == f"torch.{dtype}"
    run = train_tiny(tmp_path, corpus, "gru", steps=3,
                     extra=("model.hidden_size=8", "train.sample_length=5"))
    assert len(vocab_of(run)) == distinct
    sampled = invoke("sample", "--run", run, "--prime", chars[123], "--length", "20",
                     "--top-k", "50", "--seed", "2")
    assert sampled.exit_code == 0, sampled.stderr
    assert len(sampled.stdout) == 1 + 20 + 1 and set(sampled.stdout[:-1]) <= set(chars)
    sample_file = tmp_path / "some.txt"
    sample_file.write_text(text[:300], encoding="utf-8")
    assert scores(run, "--data", sample_file)["chars"] == 299
