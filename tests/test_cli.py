"""End-to-end CLI: train -> sample -> eval on tiny models, help, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from charlm import __version__
from charlm.checkpoint import load_checkpoint
from charlm.model import REGISTRY
from tests.conftest import invoke, sets, tiny_overrides


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.stdout
    for command in ("train", "sample", "eval"):
        help_text = invoke(command, "--help").stdout
        assert "--runs-dir" in help_text and "default" in help_text


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "charlm", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"charlm {__version__}"


def test_hello_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    result = invoke("train", "--config", "hello", "--runs-dir", runs)
    assert result.exit_code == 0, result.stderr
    assert "best val bpc" in result.stderr and str(runs) in result.stderr
    result = invoke("sample", "--runs-dir", runs, "--prime", "hel", "--length", "2",
                    "--temperature", "0")
    assert result.exit_code == 0 and result.stdout == "hello\n"
    result = invoke("eval", "--runs-dir", runs, "--json")
    scores = json.loads(result.stdout)
    assert set(scores) == {"loss", "bpc", "perplexity", "chars"} and scores["chars"] == 4
    assert scores["bpc"] < 0.1


@pytest.mark.parametrize("cell", list(REGISTRY))
def test_train_sample_eval_every_cell(tmp_path, corpus, cell):
    runs = tmp_path / "runs"
    result = invoke("train", "--config", cell, "--runs-dir", runs, "--name", "r",
                    *sets(tiny_overrides(corpus, cell)))
    assert result.exit_code == 0, result.stderr
    sampled = invoke("sample", "--run", runs / "r", "--prime", "the ", "--length", "30",
                     "--seed", "1")
    assert sampled.exit_code == 0
    assert sampled.stdout.startswith("the ") and len(sampled.stdout) == len("the ") + 30 + 1
    again = invoke("sample", "--run", runs / "r", "--prime", "the ", "--length", "30",
                   "--seed", "1")
    assert again.stdout == sampled.stdout
    evaluated = invoke("eval", "--run", runs / "r" / "best.pt", "--json")
    scores = json.loads(evaluated.stdout)
    n = len(corpus.read_text())
    assert scores["chars"] == int(n * 0.1) - 1  # the whole validation split, each char once
    assert scores["perplexity"] == pytest.approx(2 ** scores["bpc"], rel=1e-6)
    on_file = invoke("eval", "--run", runs / "r", "--data", corpus)
    assert on_file.exit_code == 0 and "bits/char" in on_file.stdout


def test_prime_with_unknown_characters_gets_a_notice(tmp_path):
    runs = tmp_path / "runs"
    trained = invoke("train", "--config", "hello", "--runs-dir", runs)
    assert trained.exit_code == 0, trained.stderr
    result = invoke("sample", "--runs-dir", runs, "--prime", "hex", "--length", "3")
    assert result.exit_code == 0
    assert result.stdout.startswith("hex") and "lacks 1 character" in result.stderr


def test_resume_continues_and_extends(tmp_path, corpus):
    runs = tmp_path / "runs"
    first = invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "r",
                   *sets(tiny_overrides(corpus, steps=20)))
    assert first.exit_code == 0, first.stderr
    before = (runs / "r" / "metrics.csv").read_text().splitlines()
    result = invoke("train", "--resume", "--name", "r", "--runs-dir", runs,
                    "--set", "train.max_steps=30")
    assert result.exit_code == 0, result.stderr
    assert "30 steps" in result.stderr
    after = (runs / "r" / "metrics.csv").read_text().splitlines()
    # The first 20 steps are kept as they were; only later steps were added.
    assert after[: len(before)] == before
    new_steps = [int(row.split(",")[0]) for row in after[len(before):]]
    assert new_steps and min(new_steps) > 20 and max(new_steps) == 30
    assert load_checkpoint(runs / "r" / "last.pt")["step"] == 30


# The catalogue of bad inputs (one `error: ` line each, nothing touched) lives in
# tests/test_reliability.py.


def test_pickle_that_is_not_a_checkpoint_is_refused_via_cli(tmp_path):
    import torch

    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, as some scripts do
    result = invoke("sample", "--run", path)
    assert result.exit_code == 1 and "not a loadable charlm checkpoint" in result.stderr
