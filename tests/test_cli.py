"""End-to-end CLI: train -> sample -> eval on tiny models, help, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from charlm import __version__
from charlm.cli import app
from tests.conftest import tiny_overrides

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


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


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "transformer"])
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
    invoke("train", "--config", "hello", "--runs-dir", runs)
    result = invoke("sample", "--runs-dir", runs, "--prime", "hex", "--length", "3")
    assert result.exit_code == 0
    assert result.stdout.startswith("hex") and "lacks 1 character" in result.stderr


def test_resume_continues_and_extends(tmp_path, corpus):
    runs = tmp_path / "runs"
    invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "r",
           *sets(tiny_overrides(corpus)))
    result = invoke("train", "--resume", "--name", "r", "--runs-dir", runs,
                    "--set", "train.max_steps=30")
    assert result.exit_code == 0, result.stderr
    assert "30 steps" in result.stderr


def _trained(tmp_path: Path, corpus: Path) -> Path:
    runs = tmp_path / "runs"
    invoke("train", "--config", "gru", "--runs-dir", runs, "--name", "r",
           *sets(tiny_overrides(corpus, "gru", 10)))
    return runs


def bad_inputs(tmp: Path, corpus: Path, runs: Path) -> list[tuple[list[str], str]]:
    """(arguments, a fragment of the one-line error) for the bad inputs of the v1 issue."""
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model: [1, 2\n")
    not_mapping = tmp / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    empty = tmp / "empty.txt"
    empty.write_text("")
    short = tmp / "short.txt"
    short.write_text("abc")
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"\x00garbage")
    truncated = tmp / "truncated.pt"
    truncated.write_bytes((runs / "r" / "last.pt").read_bytes()[:300])
    t = ["--runs-dir", str(runs)]
    return [
        (["train", "--config", str(tmp / "missing.yaml")], "not found"),
        (["train", "--config", "lstn"], "did you mean 'lstm'"),
        (["train", "--config", str(bad_yaml)], "invalid YAML at line"),
        (["train", "--config", str(not_mapping)], "expected a mapping"),
        (["train", "--config", "lstm", "--set", "train.lrr=1"], "did you mean 'train.lr'"),
        (["train", "--config", "lstm", "--set", "train.batch_size=two"], "must be an integer"),
        (["train", "--config", "lstm", "--set", "model.hidden_size=-4"], "must be positive"),
        (["train", "--config", "lstm", "--set", "model.cell=cnn"], "valid cells: rnn, lstm"),
        (["train", "--config", "lstm", "--set", "train.lr"], "key=value"),
        (["train", "--config", "lstm", "--set", f"data.source={tmp / 'none.txt'}", *t],
         "not a file, a directory"),
        (["train", "--config", "lstm", "--set", f"data.source={empty}", *t], "is empty"),
        (["train", "--config", "lstm", "--set", f"data.source={short}", *t], "train.seq_len"),
        (["train", "--config", "lstm", "--device", "cuda:7", *t], "not available"),
        (["train", "--config", "gru", "--name", "r", *t], "already exists"),
        (["train", "--resume", "--name", "nothing", *t], "no last.pt"),
        (["train", "--config", "lstm", "--name", "../escape", *t], "not a valid run name"),
        (["sample", "--run", str(tmp / "no-run")], "not found"),
        (["sample", "--run", str(garbage)], "not a loadable charlm checkpoint"),
        (["sample", "--run", str(truncated)], "not a loadable charlm checkpoint"),
        (["sample", *t, "--temperature", "-1"], "--temperature"),
        (["sample", *t, "--top-p", "1.5"], "--top-p"),
        (["sample", *t, "--top-p", "0"], "--top-p"),
        (["sample", *t, "--top-k", "-2"], "--top-k"),
        (["sample", *t, "--length", "-5"], "--length"),
        (["eval", *t, "--data", str(tmp / "none.txt")], "not found"),
        (["eval", *t, "--data", str(empty)], "empty"),
        (["eval", "--runs-dir", str(tmp / "empty-runs")], "no runs found"),
    ]


def test_bad_inputs_give_one_line_errors(tmp_path, corpus):
    runs = _trained(tmp_path, corpus)
    before = {p: p.read_bytes() for p in (runs / "r").iterdir()}
    for args, fragment in bad_inputs(tmp_path, corpus, runs):
        result = invoke(*args)
        where = f"charlm {' '.join(args)}"
        assert result.exit_code != 0, where
        assert fragment in result.stderr, f"{where}: {result.stderr!r}"
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, where
        assert "Traceback" not in result.stderr + result.stdout, where
    after = {p: p.read_bytes() for p in (runs / "r").iterdir()}
    assert after == before  # nothing of the user's run was touched


def test_pickle_that_is_not_a_checkpoint_is_refused_via_cli(tmp_path):
    import torch

    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, as some scripts do
    result = invoke("sample", "--run", path)
    assert result.exit_code == 1 and "not a loadable charlm checkpoint" in result.stderr
