"""Run directories, atomic checkpoints, safe loading, resume."""

from __future__ import annotations

import os
import pickle
import signal

import pytest
import torch

from charlm import checkpoint as ck
from charlm import train as train_module
from charlm.cells.fused import gemm
from charlm.config import apply_overrides, load_config
from charlm.train import TrainingInterrupted, train
from tests.conftest import tiny_overrides


def _train(tmp_path, corpus, name="run", steps=20, cell="lstm", extra=()):
    cfg = apply_overrides(load_config("lstm"), tiny_overrides(corpus, cell, steps) + list(extra))
    return train(cfg, runs_dir=tmp_path / "runs", name=name, quiet=True)


def test_run_directory_contents(tmp_path, corpus):
    result = _train(tmp_path, corpus)
    run = result.run_dir
    for name in ("config.yaml", "metrics.csv", "samples.txt", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,elapsed_s,train_loss,val_loss,val_bpc,lr,grad_norm,tokens_per_s"
    assert ck.find_latest(tmp_path / "runs") == run
    assert "vocab" not in (run / "config.yaml").read_text()


def test_checkpoint_round_trip(tmp_path, corpus):
    result = _train(tmp_path, corpus)
    loaded = ck.load_run(result.run_dir / "last.pt")
    raw = torch.load(result.run_dir / "last.pt", weights_only=True)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, raw["model"][k])
    assert raw["step"] == 20 and raw["format"] == ck.FORMAT


def test_existing_run_is_never_overwritten(tmp_path, corpus):
    result = _train(tmp_path, corpus)
    before = (result.run_dir / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        _train(tmp_path, corpus)
    assert (result.run_dir / "last.pt").read_bytes() == before


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/b", ".hidden", ""])
def test_bad_run_names_are_refused(name):
    with pytest.raises(ValueError, match="not a valid run name"):
        ck.check_run_name(name)


@pytest.mark.parametrize("cell, stop_at", [("lstm", 10), ("transformer", 13), ("mingru", 11)])
def test_resume_equals_uninterrupted(tmp_path, corpus, monkeypatch, cell, stop_at):
    """Ctrl-C (SIGINT) mid-run, then --resume: the same weights as a run never interrupted."""
    extra = ["train.eval_interval=10", "model.dropout=0.1", "model.num_layers=2",
             "train.stateful=true",
             f"model.cell={cell}"]
    full = _train(tmp_path, corpus, name="full", steps=30, extra=extra)
    real_get_lr = train_module.get_lr

    def interrupting_get_lr(step, progress, t):
        if step == stop_at - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_lr(step, progress, t)

    monkeypatch.setattr(train_module, "get_lr", interrupting_get_lr)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        _train(tmp_path, corpus, name="part", steps=30, extra=extra)
    monkeypatch.setattr(train_module, "get_lr", real_get_lr)
    assert torch.load(tmp_path / "runs/part/last.pt", weights_only=True)["step"] == stop_at
    resumed = train(None, runs_dir=tmp_path / "runs", name="part", resume=True, quiet=True)
    a = torch.load(full.run_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_val_loss == full.best_val_loss


def test_a_resume_multiplies_on_the_backends_its_run_started_on(tmp_path, corpus, monkeypatch):
    """The GEMM race's choices go into every checkpoint and a resume takes them: a choice
    that came out the other way in the new process would end a bit-exact resume."""
    key = "step torch.float32 32 256 1024 2"  # a shape this tiny run never multiplies
    monkeypatch.setattr(gemm, "_winner", {key: "mkl"})
    run = _train(tmp_path, corpus, steps=10)
    assert torch.load(run.run_dir / "last.pt", weights_only=True)["gemm_backends"] == {
        key: "mkl"}
    monkeypatch.setattr(gemm, "_winner", {})
    train(None, runs_dir=tmp_path / "runs", name="run", resume=True,
          overrides=["train.max_steps=12"], quiet=True)
    assert gemm._winner == {key: "mkl"}


def test_resume_with_another_cell_is_refused(tmp_path, corpus):
    _train(tmp_path, corpus, name="r")
    cfg = apply_overrides(load_config("gru"), tiny_overrides(corpus, "gru", 30))
    with pytest.raises(ValueError, match="model.cell"):
        train(cfg, runs_dir=tmp_path / "runs", name="r", resume=True, quiet=True)


def test_garbage_and_truncated_checkpoints(tmp_path, corpus):
    result = _train(tmp_path, corpus)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a loadable charlm checkpoint"):
        ck.load_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((result.run_dir / "last.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match="not a loadable charlm checkpoint"):
        ck.load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a charlm checkpoint"):
        ck.load_checkpoint(other)
    future = tmp_path / "future.pt"
    torch.save({"format": ck.FORMAT, "version": 99}, future)
    with pytest.raises(ValueError, match="format version 99"):
        ck.load_checkpoint(future)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": ck.FORMAT, "version": 1, "x": _Evil(marker)}, f)
    torch.save({"format": ck.FORMAT, "payload": _Evil(marker)}, tmp_path / "evil2.pt")
    for path in (evil, tmp_path / "evil2.pt"):
        with pytest.raises(ValueError):
            ck.load_checkpoint(path)
    assert not marker.exists()


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"step": 1})

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        with pytest.raises(OSError, match="previous checkpoint there, if any, is intact"):
            ck.save_checkpoint(path, {"step": 2})
    assert ck.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
