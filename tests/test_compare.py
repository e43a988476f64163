"""`charlm compare`: contenders become ordinary runs; table, CSV, Markdown and plot; --params
sizing; one-line errors before any training; no matplotlib; Ctrl-C keeps finished results."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from charlm.compare import parse_params, size_to_params
from charlm.config import load_config
from charlm.data import load_dataset
from charlm.model import REGISTRY
from charlm.train import TrainingInterrupted
from tests.conftest import invoke, tiny_overrides

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None



def shared_sets(corpus: Path, steps: int = 10) -> list[str]:
    """tiny_overrides for every contender, minus model.cell (each config keeps its own cell)."""
    overrides = [o for o in tiny_overrides(corpus, steps=steps) if not o.startswith("model.cell")]
    return [x for o in overrides + ["train.eval_interval=5", "train.sample_length=0"]
            for x in ("--set", o)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_compare_end_to_end(tmp_path, corpus):
    runs, out = tmp_path / "runs", tmp_path / "out"
    result = invoke("compare", "lstm", "transformer", "lstm", *shared_sets(corpus),
                    "--params", "5k", "--runs-dir", runs, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "transformer" in result.stdout and "val bits/char" in result.stdout
    rows = read_csv(out / "compare.csv")
    assert [r["cell"] for r in rows] == ["lstm", "transformer", "lstm"]
    assert len({r["run"] for r in rows}) == 3  # the two LSTMs get distinct runs
    for r in rows:
        assert r["device"] == "cpu" and r["steps"] == "10"
        assert abs(int(r["params"]) - 5000) <= 0.15 * 5000
        assert float(r["val_bpc"]) > 0 and float(r["tokens_per_s"]) > 0
        assert Path(r["run"]).parent == runs and (Path(r["run"]) / "best.pt").is_file()
        evaluated = invoke("eval", "--run", r["run"])
        assert evaluated.exit_code == 0 and "bits/char" in evaluated.stdout
    sampled = invoke("sample", "--run", rows[1]["run"], "--length", "5", "--seed", "1")
    assert sampled.exit_code == 0 and len(sampled.stdout) == 6
    markdown = (out / "compare.md").read_text()
    assert markdown.startswith("| cell |") and markdown.count("\n") == 2 + len(rows)
    # matplotlib comes with the dev extra; the path without it has its own test below
    assert HAS_MATPLOTLIB, 'install the dev extra: pip install -e ".[dev]"'
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1024
    import matplotlib.image

    assert matplotlib.image.imread(out / "compare.png").shape[0] > 100


@pytest.mark.parametrize("cell", list(REGISTRY))
def test_params_sizes_every_cell(corpus, cell):
    cfg = load_config(cell, [f"data.source={corpus}"])
    vocab_size = len(load_dataset(cfg.data).vocab)
    for target in (parse_params("250k"), parse_params("1M")):
        sized, count = size_to_params(cfg, vocab_size, target)
        assert abs(count - target) <= 0.15 * target
        assert sized.model.num_layers == cfg.model.num_layers
        assert sized.model.hidden_size % sized.model.num_heads == 0 or cell != "transformer"


def test_parse_params():
    assert [parse_params(x) for x in ("250k", "1M", "1.5M", "1000000")] == [
        250_000, 1_000_000, 1_500_000, 1_000_000]
    for bad in ("abc", "0", "-5", "1.5X", ""):
        with pytest.raises(ValueError, match="--params"):
            parse_params(bad)


@pytest.mark.parametrize("args, fragment", [
    (["lstn"], "did you mean 'lstm'"),
    (["lstm", "nope"], "not found"),  # the valid first config must not train either
    (["lstm", "--set", "train.lrr=1"], "did you mean 'train.lr'"),
    (["lstm", "--params", "abc"], "--params 'abc'"),
    (["lstm", "--params", "0"], "--params '0'"),
    (["lstm", "--device", "cuda:7"], "not available"),
    ([], "at least one config"),
])
def test_bad_input_fails_before_training(tmp_path, corpus, args, fragment):
    runs = tmp_path / "runs"
    result = invoke("compare", *args, "--set", f"data.source={corpus}", "--runs-dir", runs)
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr, result.stderr
    assert not runs.exists()  # nothing trained, nothing written


def test_without_matplotlib_everything_but_the_plot(tmp_path, corpus, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    out = tmp_path / "out"
    result = invoke("compare", "gru", *shared_sets(corpus, steps=5), "--runs-dir",
                    tmp_path / "runs", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert 'pip install "charlm[plot]"' in result.stderr
    assert len(read_csv(out / "compare.csv")) == 1 and (out / "compare.md").is_file()
    assert not (out / "compare.png").exists()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, TrainingInterrupted])
def test_interrupted_comparison_keeps_finished_contenders(tmp_path, corpus, monkeypatch,
                                                          interrupt):
    import charlm.train

    real_train, calls = charlm.train.train, []

    def train_then_ctrl_c(*args, **kwargs):  # Ctrl-C arrives while the 2nd contender trains
        calls.append(kwargs["name"])
        if len(calls) == 2:
            raise interrupt("interrupted at step 3")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(charlm.train, "train", train_then_ctrl_c)
    out = tmp_path / "out"
    result = invoke("compare", "rnn", "gru", "lstm", *shared_sets(corpus, steps=5),
                    "--runs-dir", tmp_path / "runs", "--out", out)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "1 finished" in result.stderr
    assert len(calls) == 2  # the third contender never started
    assert [r["cell"] for r in read_csv(out / "compare.csv")] == ["rnn"]
    assert (out / "compare.md").is_file()
    assert (out / "compare.png").is_file() == HAS_MATPLOTLIB
    assert "rnn" in result.stdout  # the table of what finished


def test_help_mentions_the_options():
    help_text = invoke("compare", "--help").stdout
    for option in ("--set", "--params", "--device", "--out", "--runs-dir"):
        assert option in help_text
