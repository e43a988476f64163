"""`charlm plot`: training curves from metrics.csv (a real training run's and hand-written
ones), several runs overlaid, and the missing-matplotlib message."""

from __future__ import annotations

import math
import sys

import pytest

from charlm.plot import read_metrics
from tests.conftest import invoke, sets, tiny_overrides
from tests.test_inspect import cli

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER = "step,elapsed_s,train_loss,val_loss,val_bpc,lr,grad_norm,tokens_per_s\n"


def fake_run(tmp_path, name: str, clip: float = 1.0):
    run = tmp_path / name
    run.mkdir()
    rows = [HEADER]
    for step in range(10, 110, 10):
        rows.append(f"{step},{step / 10:.2f},{3 - step / 100:.4f},,,{1e-3:.6g},"
                    f"{10.0 if step == 50 else 0.5},1000\n")
        if step % 50 == 0:
            rows.append(f"{step},{step / 10:.2f},,{2.9 - step / 100:.4f},"
                        f"{(2.9 - step / 100) / math.log(2):.4f},{1e-3:.6g}\n")
    (run / "metrics.csv").write_text("".join(rows), encoding="utf-8")
    (run / "config.yaml").write_text(f"train:\n  grad_clip: {clip}\n", encoding="utf-8")
    return run


def test_read_metrics_splits_train_and_validation_rows(tmp_path):
    m = read_metrics(fake_run(tmp_path, "r", clip=5.0))
    assert m.name == "r" and m.grad_clip == 5.0
    assert m.train["step"] == [float(s) for s in range(10, 110, 10)]
    assert m.train["bpc"][0] == pytest.approx(2.9 / math.log(2))
    assert max(m.train["grad_norm"]) == 10.0
    assert m.val["step"] == [50.0, 100.0]
    assert m.val["bpc"][1] == pytest.approx(1.9 / math.log(2), abs=1e-4)


def test_plot_of_a_real_run_and_of_several_overlaid(tmp_path, corpus):
    runs = tmp_path / "runs"
    trained = invoke("train", "--config", "rnn", "--runs-dir", runs, "--name", "real",
                     *sets(tiny_overrides(corpus, "rnn", steps=20)), "--quiet")
    assert trained.exit_code == 0, trained.output
    result = cli("plot", runs / "real")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(runs / "real" / "metrics.png")
    assert (runs / "real" / "metrics.png").stat().st_size > 20_000
    m = read_metrics(runs / "real" / "last.pt")  # a checkpoint names its run too
    assert len(m.train["step"]) == 4 and len(m.val["step"]) == 2
    out = tmp_path / "both.png"
    result = cli("plot", runs / "real", fake_run(tmp_path, "fake"), "--out", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 20_000


def test_plot_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("plot", empty)
    assert result.exit_code == 1 and "metrics.csv" in result.stderr
    assert cli("plot", tmp_path / "nope").exit_code == 1
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    result = cli("plot", fake_run(tmp_path, "r"))
    assert result.exit_code == 1
    assert result.stderr.strip() == ('error: charlm plot needs matplotlib, which is not '
                                     'installed: pip install "charlm[plot]"')
