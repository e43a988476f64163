"""Data-parallel training: two CPU processes under torchrun (gloo) learn, write one run, record
the world size and resume exactly; plus the single-process behaviour of charlm.distributed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm import distributed
from charlm.checkpoint import load_checkpoint
from charlm.cli import app
from charlm.config import load_config
from charlm.data import StreamBatcher
from charlm.train import train

ROOT = Path(__file__).resolve().parents[1]


def torchrun(tmp: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m charlm train ARGS` on CPU, in its own cache dirs."""
    env = {**os.environ, "CHARLM_CACHE_DIR": str(tmp / "cache"),
           "CHARLM_DATA_DIR": str(tmp / "data"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # --standalone: a private rendezvous on a free port, so parallel test runs cannot collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "charlm", "train", "--device", "cpu",
           "--runs-dir", str(tmp / "runs"), *args]
    # Its own process group, so that a run that hangs is killed with all its ranks instead of
    # leaving orphans that load the machine for the tests after it.
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun hung for 240 s:\n{stderr[-3000:]}") from None
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def hello_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp-hello")
    out = torchrun(tmp, "--config", "hello")
    assert out.stderr.count("done:") == 1  # one summary, from rank 0
    return tmp / "runs"


def test_two_processes_learn_hello_and_write_one_run(hello_run):
    runs = [p for p in hello_run.iterdir() if p.is_dir()]
    assert len(runs) == 1  # every rank agreed on rank 0's default run name
    assert len(list(hello_run.rglob("metrics.csv"))) == 1
    assert (hello_run / "LATEST").read_text().strip() == runs[0].name
    ckpt = load_checkpoint(runs[0] / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == load_config("hello").train.max_steps
    assert len(ckpt["rng"]) == len(ckpt["data_state"]) == len(ckpt["hidden_state"]) == 2
    # the checkpoint holds the plain module's weights (no DistributedDataParallel prefix)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    result = CliRunner().invoke(app, ["sample", "--runs-dir", str(hello_run), "--prime", "hel",
                                      "--length", "2", "--temperature", "0"])
    assert result.exit_code == 0 and result.stdout.strip() == "hello"


def test_resume_with_another_world_size_is_refused(hello_run):
    name = next(p.name for p in hello_run.iterdir() if p.is_dir())
    with pytest.raises(ValueError, match=r"world_size 2.*torchrun --nproc_per_node 2"):
        train(None, runs_dir=hello_run, name=name, resume=True,
              overrides=["train.max_steps=310"], quiet=True)


@pytest.mark.parametrize("cell", ["lstm", "minlstm"])
def test_two_process_resume_is_exact(tmp_path, cell):
    """Stateful LSTM and minLSTM: 8 steps then a resume to 16 end with the same weights as
    16 straight. Each rank carries its own hidden state and stream position through the
    checkpoint."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    common = ["--config", cell, "--set", "train.stateful=true",  # per-rank stream positions
              "--set", "data.source=corpus.txt", "--set",
              "model.hidden_size=16", "--set", "model.num_layers=1", "--set",
              "train.batch_size=4", "--set", "train.seq_len=16", "--set", "train.eval_steps=2",
              "--set", "train.eval_interval=8", "--set", "train.sample_length=0", "--set",
              "train.schedule=constant", "--set", "train.warmup_steps=0", "--set",
              "train.max_time=null", "--quiet"]
    torchrun(tmp_path, *common, "--set", "train.max_steps=16", "--name", "straight")
    torchrun(tmp_path, *common, "--set", "train.max_steps=8", "--name", "resumed")
    torchrun(tmp_path, "--name", "resumed", "--resume", "--set", "train.max_steps=16",
             "--quiet")
    a = load_checkpoint(tmp_path / "runs" / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "runs" / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 16
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [s["pos"] for s in a["data_state"]] == [s["pos"] for s in b["data_state"]]
    # the two ranks carried different hidden states: they read different text
    h0, h1 = a["hidden_state"]
    assert not torch.equal(h0[0], h1[0])


def test_ranks_read_different_parts_of_the_text():
    tokens = torch.arange(1001)
    rank0 = StreamBatcher(tokens, batch_size=2, seq_len=10, rank=0, world_size=2)
    rank1 = StreamBatcher(tokens, batch_size=2, seq_len=10, rank=1, world_size=2)
    x0, _, _ = rank0.next()
    x1, _, _ = rank1.next()
    assert x0[:, 0].tolist() == [0, 250] and x1[:, 0].tolist() == [500, 750]


def test_single_process_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = distributed.setup()
    assert ctx == distributed.Context(0, 1, 0) and ctx.is_main and not ctx.active
    assert not torch.distributed.is_initialized()
    assert distributed.all_mean([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("name") == "name"
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu"), ctx) is model


def test_environment_and_device_checks(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.from_env()
    assert ctx == distributed.Context(1, 2, 1) and not ctx.is_main and not distributed.is_main()
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):  # one GPU for all ranks
        distributed.rank_device(torch.device("cuda:1"), ctx)
    assert distributed.rank_device(torch.device("cpu"), ctx) == torch.device("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.from_env()
    with pytest.raises(ValueError, match=r"charlm train --resume --name r"):
        distributed.check_resume_world_size(1, ctx, Path("runs/r"))
