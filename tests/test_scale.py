"""Corpora at scale, in miniature: globbed corpora, piecewise decoding that matches decoding
the whole, the memory-mapped token cache, and scoring a split window by window."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from charlm import data, sources
from charlm.config import DataConfig, apply_overrides, load_config
from charlm.data import Vocab, build_vocab, encode_text, load_dataset
from charlm.evaluate import evaluate_tokens
from charlm.model import build_model, detach_state
from charlm.sources import decode_corpus

# Multi-byte characters of every UTF-8 length, CRLF pairs and a lone CR.
MIXED = "ab\r\ncé\r\n中文\r\n🙂x\r\r\nend 🙂é\n" * 7


def test_glob_of_files_is_one_corpus(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("BBBB\n")
    (tmp_path / "a.txt").write_text("AAAA\n")
    (tmp_path / "sub" / "c.txt").write_text("CCCC\n")
    (tmp_path / "skip.md").write_text("not matched\n")
    ds = load_dataset(DataConfig(source=str(tmp_path / "**" / "*.txt"), val_fraction=0.0))
    assert ds.vocab.decode(ds.train) == "AAAA\nBBBB\nCCCC\n"  # sorted paths, joined


@pytest.mark.parametrize("chunk", [4, 7, 9])
def test_piecewise_decoding_of_invalid_bytes(monkeypatch, chunk):
    raw = b"caf\xe9 cr\xe8me \xff\xfe ok" * 5  # latin-1 and stray bytes: 4 bad per copy
    monkeypatch.setattr(sources, "_CHUNK_BYTES", chunk)
    with pytest.warns(UserWarning, match="20 undecodable"):
        text = decode_corpus(raw, "latin")
    assert text == raw.decode("utf-8", errors="replace")


def test_chunked_encoding_into_the_cache_matches_the_text(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_CHUNK_BYTES", 5)
    path = tmp_path / "mixed.txt"
    path.write_bytes(MIXED.encode("utf-8"))
    ds = load_dataset(DataConfig(source=str(path), val_fraction=0.0))
    expected = MIXED.replace("\r\n", "\n")
    assert ds.vocab.chars == "".join(sorted(set(expected)))
    assert ds.train.dtype == torch.uint8 and ds.vocab.decode(ds.train) == expected


def test_cached_tokens_are_memory_mapped_not_loaded(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("memory mapped tokens\n" * 500, encoding="utf-8")
    load_dataset(DataConfig(source=str(path)))
    (tok_file,) = data.cache_dir().glob("*.tokens")
    assert tok_file.stat().st_size == 21 * 500  # one byte per character (uint8)
    ds = load_dataset(DataConfig(source=str(path)))
    assert ds.train.dtype == torch.uint8
    maps = Path("/proc/self/maps")
    if sys.platform.startswith("linux") and maps.exists():
        assert str(tok_file.resolve()) in maps.read_text()


def test_edited_corpus_gets_a_new_cache_entry_and_stale_format_is_rebuilt(tmp_path,
                                                                           monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("first version " * 20)
    load_dataset(DataConfig(source=str(path)))
    path.write_text("second version " * 20)
    ds = load_dataset(DataConfig(source=str(path), val_fraction=0.0))
    assert ds.vocab.decode(ds.train) == "second version " * 20
    assert len(list(data.cache_dir().glob("*.tokens"))) == 2
    monkeypatch.setattr(data, "CACHE_FORMAT", data.CACHE_FORMAT + 1)
    again = load_dataset(DataConfig(source=str(path), val_fraction=0.0))
    assert torch.equal(again.train, ds.train)


def test_unwritable_cache_still_loads(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(blocker / "cache"))
    path = tmp_path / "t.txt"
    path.write_text("no cache here " * 20)
    ds = load_dataset(DataConfig(source=str(path), val_fraction=0.0))
    assert ds.vocab.decode(ds.train) == "no cache here " * 20
    assert "could not write token cache" in capsys.readouterr().err


def test_vocab_fast_paths_agree_with_the_simple_ones():
    text = MIXED * 60  # long enough for Vocab.encode's vectorised path
    vocab = build_vocab(text)
    assert torch.equal(vocab.encode(text), torch.tensor([vocab.stoi[c] for c in text]))
    assert torch.equal(encode_text(text, vocab).long(), vocab.encode(text))
    assert Vocab("abc").missing("a🙂bxé" * 3000) == ["🙂", "x", "é"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Vocab("abc").encode("abz")


class _Recording:
    """Tokens that record the largest gather: proves scoring never materialises the split."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.largest = tokens, 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        out = self.tokens[index]
        self.largest = max(self.largest, out.numel())
        return out


def _score_all_at_once(model, tokens: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """The reference: the whole split as int64, cut into streams (what evaluate_tokens did)."""
    n = len(tokens) - 1
    streams = max(1, min(batch_size, n // seq_len))
    stream_len = n // streams
    body = tokens[: streams * stream_len + 1].long()
    total = 0.0
    rows = [(body[:-1].view(streams, stream_len), body[1:].view(streams, stream_len))]
    tail = tokens[streams * stream_len :].long()
    if len(tail) > 1:
        rows.append((tail[:-1][None], tail[1:][None]))
    for x_all, y_all in rows:
        state = None
        for s in range(0, x_all.size(1), seq_len):
            logits, state = model(x_all[:, s : s + seq_len],
                                  state if model.carries_state else None)
            state = detach_state(state)
            total += F.cross_entropy(logits.flatten(0, 1), y_all[:, s : s + seq_len].flatten(),
                                     reduction="sum").item()
    return total / n


@pytest.mark.parametrize("cell", ["lstm", "transformer"])
def test_evaluation_streams_window_by_window(cell):
    torch.manual_seed(0)
    cfg = apply_overrides(load_config("lstm"), [f"model.cell={cell}", "model.hidden_size=16",
                                                "model.num_layers=1", "model.num_heads=2",
                                                "train.seq_len=8"])
    model = build_model(cfg, 20).eval()
    tokens = torch.randint(0, 20, (403,), dtype=torch.uint8)
    recorded = _Recording(tokens)
    score = evaluate_tokens(model, recorded, 8, torch.device("cpu"), batch_size=4)
    assert score.chars == 402
    assert recorded.largest <= 4 * (8 + 1)  # one window of the batch at a time
    with torch.no_grad():
        expected = _score_all_at_once(model, tokens, 8, 4)
    assert math.isclose(score.loss, expected, rel_tol=1e-5)
