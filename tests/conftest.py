"""Shared fixtures: every test gets its own token cache and data directory, so the suite never
writes into the user's ~/.cache or the checkout's data/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm.cli import app

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path_factory, monkeypatch):
    base = tmp_path_factory.mktemp("charlm-home")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("CHARLM_DATA_DIR", str(base / "data"))
    monkeypatch.delenv("CHARLM_DEBUG", raising=False)
    return base


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small corpus with enough text for tiny models (about 6 KB)."""
    text = "".join(f"the quick brown fox {i % 7} jumps over the lazy dog.\n" for i in range(120))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_overrides(corpus: Path, cell: str = "lstm", steps: int = 20) -> list[str]:
    """Overrides that make any preset train in about a second, in float32 on every machine
    (`train.precision: auto` would pick bf16 on some CPUs: tests/test_precision.py covers it)."""
    return [f"data.source={corpus}", f"model.cell={cell}", "model.hidden_size=16",
            "model.num_layers=1", "model.num_heads=2", "train.batch_size=4", "train.seq_len=16",
            f"train.max_steps={steps}", "train.max_time=null", "train.eval_interval=10",
            "train.eval_steps=2", "train.log_interval=5", "train.sample_length=20",
            "train.device=cpu", "train.warmup_steps=2", "train.precision=fp32"]


def invoke(*args):
    """Run `charlm ARGS...` in-process; the result has .exit_code, .stdout and .stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def sets(overrides: list[str]) -> list[str]:
    """`["a=1", "b=2"]` -> `["--set", "a=1", "--set", "b=2"]`."""
    return [x for o in overrides for x in ("--set", o)]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a loaded 2-core machine every
    parallel op otherwise waits for a descheduled second thread; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
