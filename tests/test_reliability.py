"""Reliability and safety: exact resume after kill -9, SIGTERM and Ctrl-C; non-finite training;
checkpoints from another device; hostile pointers; and the catalogue of bad inputs, each of
which must end in one `error: ` line and leave the user's files untouched."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.serialization

from charlm import checkpoint as ck
from charlm import nonfinite
from charlm import train as train_module
from charlm.data import load_dataset
from charlm.evaluate import evaluate_tokens
from tests.conftest import invoke, sets, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")






def weights(path: Path) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def val_loss(checkpoint: Path) -> float:
    """The loss `charlm eval` reports: the whole validation split, from the saved weights."""
    loaded = ck.load_run(checkpoint)
    ds = load_dataset(loaded.cfg.data)
    return evaluate_tokens(loaded.model, ds.val, loaded.cfg.train.seq_len, torch.device("cpu")).loss


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under `roots` with its bytes: to prove a failed command changed nothing."""
    files = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files.update({p: p.read_bytes() for p in paths})
    return files


# ---------------------------------------------------------------------------- kill -9


# Slow every fsync down in the child so a checkpoint write takes a while: a kill can then land
# inside one (the temp file exists) rather than only between writes.
_SLOW_WRITES = (
    "import os, sys, time\n"
    "_fsync = os.fsync\n"
    "def _slow_fsync(fd):\n"
    "    time.sleep(0.05)\n"
    "    _fsync(fd)\n"
    "os.fsync = _slow_fsync\n"
    "from charlm.cli import main\n"
    "sys.argv[0] = 'charlm'\n"
    "main()\n"
)


def _child_env() -> dict[str, str]:
    # One thread, as in this process (the reference run): the same float summation order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _temp_files(run: Path) -> list[Path]:
    return [p for p in run.glob(".*.tmp")] if run.is_dir() else []


def _wait(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll until `predicate()`; False if the process exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the training process made no progress in time")


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


KILL_RUN = ["model.dropout=0.1", "train.max_steps=40", "train.eval_interval=5",
            "train.sample_length=0"]


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path, corpus):
    """SIGKILL a real `charlm train` 3 times (once inside a checkpoint write, twice at seeded
    random moments after a new checkpoint), `--resume` each time: the final weights equal an
    uninterrupted run's exactly, and a loadable checkpoint existed after every kill.
    Stateful LSTM (hidden state carried) with dropout (RNG state)."""
    runs = tmp_path / "runs"
    overrides = tiny_overrides(corpus, "lstm") + KILL_RUN
    # one thread here (the fixture) and in the children: the same float summation order
    reference = invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "full",
                       "--quiet", *sets(overrides))
    assert reference.exit_code == 0, reference.stderr

    run = runs / "killed"
    rng = random.Random(5)
    kills = []
    args = ["train", "--config", "lstm", "--runs-dir", str(runs), "--name", "killed", "--quiet",
            *sets(overrides)]
    for attempt in range(3):
        log = open(tmp_path / f"attempt{attempt}.log", "w")
        before = _mtime(run / "last.pt")
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITES, *args], env=_child_env(),
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            # wait for a checkpoint this process wrote: progress since the last kill
            alive = _wait(lambda b=before: _mtime(run / "last.pt") not in (None, b), proc)
            if alive and attempt == 0:  # inside a write: its temp file exists
                alive = _wait(lambda: bool(_temp_files(run)), proc)
            elif alive:
                time.sleep(rng.uniform(0.0, 0.6))
            proc.kill()
        finally:
            proc.wait()
            log.close()
        assert proc.returncode in (-signal.SIGKILL, 0), (tmp_path / f"attempt{attempt}.log"
                                                         ).read_text()
        assert (run / "last.pt").is_file() or (run / "best.pt").is_file()
        step = ck.load_checkpoint(run / "last.pt")["step"]  # never half-written
        ck.load_run(run / "last.pt")
        if (run / "best.pt").is_file():
            ck.load_run(run / "best.pt")
        kills.append((proc.returncode, step, [p.name for p in _temp_files(run)]))
        args = ["train", "--resume", "--name", "killed", "--runs-dir", str(runs), "--quiet"]

    assert any(code == -signal.SIGKILL for code, _, _ in kills), kills
    # the first kill landed inside a checkpoint write: it left a temp file to clean up
    assert kills[0][0] == -signal.SIGKILL and kills[0][2], kills
    final = subprocess.run([sys.executable, "-m", "charlm", *args], env=_child_env(),
                           cwd=tmp_path, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    print("kills (exit code, last.pt step, temp files left):", kills)
    assert _temp_files(run) == []  # what the killed writers left was cleaned up
    assert_same_weights(runs / "full" / "last.pt", run / "last.pt")
    assert_same_weights(runs / "full" / "best.pt", run / "best.pt")
    assert ck.load_checkpoint(run / "last.pt")["step"] == 40
    assert abs(val_loss(run / "last.pt") - val_loss(runs / "full" / "last.pt")) <= 1e-6

    def curve(path: Path) -> list[tuple[str, str, str]]:
        rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
        return [(r[0], r[2], r[3]) for r in rows]  # step, train_loss, val_loss

    assert curve(run / "metrics.csv") == curve(runs / "full" / "metrics.csv")


# ---------------------------------------------------------------------------- SIGTERM, Ctrl-C


def _signal_at(monkeypatch, target: str, when: int, signals: list[int]) -> None:
    """Patch train.<target> to send `signals` to this process on its `when`-th call."""
    real = getattr(train_module, target)
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == when:
            for s in signals:
                os.kill(os.getpid(), s)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, target, patched)


@pytest.mark.parametrize("extra", [
    ["model.dropout=0.1", "train.stateful=true"],  # hidden state carried, dropout RNG
    ["model.dropout=0.1", "train.stateful=false"],  # random windows: the batch generator
], ids=["stateful", "random-windows"])
def test_sigterm_behaves_like_ctrl_c(tmp_path, corpus, monkeypatch, extra):
    runs = tmp_path / "runs"
    args = ["--runs-dir", runs, "--quiet", *sets(tiny_overrides(corpus, "lstm", 25) + extra)]
    full = invoke("train", "--config", "lstm", "--name", "full", *args)
    assert full.exit_code == 0, full.stderr
    with monkeypatch.context() as m:  # (undo() would also drop conftest's isolated dirs)
        _signal_at(m, "get_lr", 13, [signal.SIGTERM])  # at the start of step 13
        stopped = invoke("train", "--config", "lstm", "--name", "part", *args)
    assert stopped.exit_code == 130
    assert "interrupted at step 13" in stopped.stderr
    assert f"charlm train --name part --runs-dir {runs} --resume" in stopped.stderr
    assert ck.load_checkpoint(runs / "part" / "last.pt")["step"] == 13
    resumed = invoke("train", "--resume", "--name", "part", "--runs-dir", runs, "--quiet")
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_weights(runs / "full" / "last.pt", runs / "part" / "last.pt")
    assert abs(val_loss(runs / "part" / "last.pt") - val_loss(runs / "full" / "last.pt")) <= 1e-6


def test_second_ctrl_c_mid_step_keeps_the_last_consistent_checkpoint(tmp_path, corpus,
                                                                     monkeypatch):
    """Two Ctrl-C after the weights were updated but before the step was counted: nothing
    half-done is saved, so resuming still reproduces the uninterrupted run exactly."""
    runs = tmp_path / "runs"
    args = ["--runs-dir", runs, "--quiet", *sets(tiny_overrides(corpus, "lstm", 25)),
            "--set", "train.stateful=true"]  # detach_state runs between update and count
    assert invoke("train", "--config", "lstm", "--name", "full", *args).exit_code == 0
    with monkeypatch.context() as m:  # after step 13's update, before it is counted
        _signal_at(m, "detach_state", 13, [signal.SIGINT, signal.SIGINT])
        stopped = invoke("train", "--config", "lstm", "--name", "part", *args)
    assert stopped.exit_code == 130 and "--resume" in stopped.stderr
    assert "nothing more was saved" in stopped.stderr
    assert ck.load_checkpoint(runs / "part" / "last.pt")["step"] == 10  # the last checkpoint
    assert invoke("train", "--resume", "--name", "part", "--runs-dir", runs).exit_code == 0
    assert_same_weights(runs / "full" / "last.pt", runs / "part" / "last.pt")


@pytest.mark.parametrize("stop_before", ["best.pt", "last.pt"])
def test_resume_of_a_run_stopped_before_its_first_checkpoint(tmp_path, corpus, monkeypatch,
                                                             stop_before):
    """Killed before the first last.pt: --resume still works (from best.pt, or from step 0
    with the run's config) and gives the uninterrupted result; a plain restart would be
    refused as 'already exists'."""
    runs = tmp_path / "runs"
    args = ["--runs-dir", runs, "--quiet", *sets(tiny_overrides(corpus, "gru", 20))]
    assert invoke("train", "--config", "gru", "--name", "full", *args).exit_code == 0
    real_save = ck.save_checkpoint

    def dies_at_first_save(path, payload):
        if Path(path).name == stop_before:
            raise KeyboardInterrupt  # as if the process died here: nothing is written
        real_save(path, payload)

    with monkeypatch.context() as m:
        m.setattr(train_module.ckpt_io, "save_checkpoint", dies_at_first_save)
        assert invoke("train", "--config", "gru", "--name", "part", *args).exit_code == 130
    assert not (runs / "part" / "last.pt").exists()
    resumed = invoke("train", "--resume", "--name", "part", "--runs-dir", runs, "--quiet")
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_weights(runs / "full" / "last.pt", runs / "part" / "last.pt")
    assert (runs / "part" / "metrics.csv").read_text().count("step,") == 1  # one header


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".last.pt.{dead.pid}.tmp").write_bytes(b"half a checkpoint")
        (tmp_path / f".best.pt.{live.pid}.tmp").write_bytes(b"being written")
        (tmp_path / "last.pt").write_bytes(b"kept")
        (tmp_path / ".notes.tmp").write_bytes(b"not ours")
        ck.remove_stale_temp_files(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f".best.pt.{live.pid}.tmp", ".notes.tmp", "last.pt"]
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------- numerics


DIVERGES = ["model.cell=rnn", "model.nonlinearity=relu", "train.lr=1e6", "train.grad_clip=0",
            "train.warmup_steps=0"]


def test_non_finite_loss_stops_with_the_step_and_keeps_finite_weights(tmp_path, corpus):
    runs = tmp_path / "runs"
    result = invoke("train", "--config", "rnn", "--runs-dir", runs, "--name", "r",
                    *sets(tiny_overrides(corpus, "rnn") + DIVERGES))
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss at step 2;"), line
    assert "train.lr" in line and "train.skip_nonfinite=true" in line and "Traceback" not in line
    saved = ck.load_checkpoint(runs / "r" / "last.pt")
    assert saved["step"] == 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_skip_nonfinite_gives_up_after_many_consecutive_skips(tmp_path, corpus, monkeypatch):
    """Once the weights themselves diverged every step is non-finite: skipping would loop
    forever, so training stops with a clear error instead (after 100 skips; 10 here)."""
    monkeypatch.setattr(nonfinite, "MAX_SKIPPED_STEPS", 10)
    runs = tmp_path / "runs"
    result = invoke("train", "--config", "rnn", "--runs-dir", runs, "--name", "r",
                    *sets(tiny_overrides(corpus, "rnn") + DIVERGES +
                          ["train.skip_nonfinite=true"]))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert sum("step skipped (train.skip_nonfinite)" in x for x in lines) == 9
    assert lines[-1].startswith("error: non-finite loss or gradient in 10 consecutive steps")
    assert "train.lr" in lines[-1]
    saved = ck.load_checkpoint(runs / "r" / "last.pt")
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_skip_nonfinite_skips_a_bad_step_and_training_goes_on(tmp_path, corpus, monkeypatch):
    import types

    real_f = train_module.F
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):  # the 4th and 9th training losses are NaN
        calls["n"] += 1
        loss = real_f.cross_entropy(*args, **kwargs)
        return loss * math.nan if calls["n"] in (4, 9) else loss

    monkeypatch.setattr(train_module, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    runs = tmp_path / "runs"
    result = invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "r",
                    *sets(tiny_overrides(corpus, "lstm", 20) + ["train.skip_nonfinite=true"]))
    assert result.exit_code == 0, result.stderr
    assert "step 4: non-finite loss or gradient, step skipped" in result.stderr
    assert "step 8: non-finite loss or gradient, step skipped" in result.stderr  # 9th call
    saved = ck.load_checkpoint(runs / "r" / "last.pt")
    assert saved["step"] == 20 and all(torch.isfinite(t).all() for t in saved["model"].values())


def test_sampling_from_a_diverged_model_never_crashes(tmp_path, corpus):
    """Huge weights overflow to inf/NaN logits: sampling (at each evaluation, and `charlm
    sample`) still yields characters from the vocabulary."""
    runs = tmp_path / "runs"
    result = invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "r",
                    *sets(tiny_overrides(corpus, "lstm", 10) +
                          ["train.lr=1e20", "train.grad_clip=0", "train.warmup_steps=0",
                           # fp32 on every CPU: in bf16 (auto, where native) the blown-up
                           # weights give a NaN loss, which stops training before sampling
                           "train.precision=fp32"]))
    assert result.exit_code == 0, result.stderr
    sampled = invoke("sample", "--run", runs / "r", "--length", "30", "--seed", "0")
    assert sampled.exit_code == 0, sampled.stderr
    assert len(sampled.stdout) == 31 and set(sampled.stdout) <= set(corpus.read_text())


# ---------------------------------------------------------------------------- safety


def test_checkpoint_saved_on_a_gpu_loads_on_cpu(tmp_path, corpus, monkeypatch):
    """Rewrite a run's checkpoint as a CUDA machine saves it (storages tagged `cuda:0`): it
    samples, scores and resumes here with --device cpu and auto."""
    runs = tmp_path / "runs"
    assert invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "r", "--quiet",
                  *sets(tiny_overrides(corpus, "lstm", 10))).exit_code == 0
    path = runs / "r" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, path)
    if not torch.cuda.is_available():  # the file really is a GPU checkpoint for torch
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    (runs / "r" / "best.pt").unlink()
    for device in ("cpu", "auto"):
        sampled = invoke("sample", "--run", runs / "r", "--length", "5", "--device", device)
        assert sampled.exit_code == 0 and len(sampled.stdout) == 6, sampled.stderr
        scored = invoke("eval", "--run", runs / "r", "--device", device, "--json")
        assert scored.exit_code == 0 and '"bpc"' in scored.stdout, scored.stderr
    resumed = invoke("train", "--resume", "--name", "r", "--runs-dir", runs, "--device", "cpu",
                     "--quiet", "--set", "train.max_steps=15")
    assert resumed.exit_code == 0, resumed.stderr
    assert ck.load_checkpoint(path)["step"] == 15


@pytest.mark.parametrize("pointer", [b"../../etc\n", b"/etc\n", b"..\n", b"../outside\n",
                                     b"\xff\xfe garbage", b""])
def test_hostile_latest_pointer_is_ignored(tmp_path, corpus, pointer):
    runs = tmp_path / "runs"
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "last.pt").write_bytes(b"not to be read")
    assert invoke("train", "--config", "gru", "--runs-dir", runs, "--name", "r", "--quiet",
                  *sets(tiny_overrides(corpus, "gru", 5))).exit_code == 0
    (runs / "LATEST").write_bytes(pointer)
    assert ck.find_latest(runs) == runs / "r"  # the newest checkpoint instead
    sampled = invoke("sample", "--runs-dir", runs, "--length", "3")
    assert sampled.exit_code == 0, sampled.stderr


def test_non_utf8_corpus_trains_with_a_one_line_warning(tmp_path, corpus):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(corpus.read_text().replace("fox", "f\xf6x").encode("latin-1"))
    runs = tmp_path / "runs"
    result = invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "r", "--quiet",
                    *sets(tiny_overrides(latin1, "lstm", 5)))
    assert result.exit_code == 0, result.stderr
    warnings = [x for x in result.stderr.splitlines() if x.startswith("warning: ")]
    assert len(warnings) == 1 and "not valid UTF-8" in warnings[0] and "U+FFFD" in warnings[0]
    assert "\ufffd" in ck.load_checkpoint(runs / "r" / "last.pt")["vocab"]


def test_top_k_larger_than_the_vocabulary_just_works(tmp_path, corpus):
    runs = tmp_path / "runs"
    assert invoke("train", "--config", "gru", "--runs-dir", runs, "--name", "r", "--quiet",
                  *sets(tiny_overrides(corpus, "gru", 5))).exit_code == 0
    result = invoke("sample", "--run", runs / "r", "--top-k", "100000", "--length", "20",
                    "--top-p", "0.5", "--seed", "3")
    assert result.exit_code == 0 and len(result.stdout) == 21, result.stderr


# ---------------------------------------------------------------------------- bad input


def bad_inputs(tmp: Path, corpus: Path, runs: Path) -> list[tuple[list[str], str]]:
    """(arguments, a fragment of the one-line error): 70 bad inputs, 63 for train, sample and
    eval, 6 for compare, and `--device cuda` where CUDA is absent. `runs/r` is a trained GRU
    run, `runs/nockpt` a run without checkpoints, `runs/broken` one with a truncated last.pt."""
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model: [1, 2\n")
    not_mapping = tmp / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    unknown_section = tmp / "optim.yaml"
    unknown_section.write_text("model:\n  cell: lstm\noptim:\n  lr: 0.1\n")
    section_scalar = tmp / "scalar.yaml"
    section_scalar.write_text("train: 3\n")
    tagged = tmp / "tagged.yaml"
    tagged.write_text("train:\n  lr: !!float abc\n  max_time: !!timestamp soon\n")
    binary_yaml = tmp / "binary.yaml"
    binary_yaml.write_bytes(b"model:\n  cell: \xff\xfe\n")
    empty = tmp / "empty.txt"
    empty.write_text("")
    short = tmp / "short.txt"
    short.write_text("abc")
    other = tmp / "other.txt"
    other.write_text("another corpus entirely " * 50)
    unseen = tmp / "unseen.txt"
    unseen.write_text("日本語のテキスト")
    no_text = tmp / "no-text"
    no_text.mkdir()
    (no_text / "data.bin").write_bytes(b"\x00\x01")
    (no_text / ".hidden.txt").write_text("hidden files are not corpus files")
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"\x00garbage")
    truncated = tmp / "truncated.pt"
    truncated.write_bytes((runs / "r" / "last.pt").read_bytes()[:300])
    t = ["--runs-dir", str(runs)]
    tiny = sets(tiny_overrides(corpus, "lstm"))
    cases = [
        # ---- train: config files and presets
        (["train", "--config", str(tmp / "missing.yaml"), *t], "not found"),
        (["train", "--config", "lstn", *t], "did you mean 'lstm'"),
        (["train", "--config", str(bad_yaml), *t], "invalid YAML at line"),
        (["train", "--config", str(not_mapping), *t], "expected a mapping"),
        (["train", "--config", str(unknown_section), *t], "unknown section 'optim'"),
        (["train", "--config", str(section_scalar), *t], "section 'train' must be a mapping"),
        (["train", "--config", str(binary_yaml), *t], "not a UTF-8 text file"),
        (["train", "--config", str(tagged), *t], "invalid YAML"),
        (["train", "--config", str(tmp), *t], "is a directory"),
        (["train", *t], "--config is required"),
        # ---- train: --set
        (["train", "--config", "lstm", "--set", "train.lrr=1", *t], "did you mean 'train.lr'"),
        (["train", "--config", "lstm", "--set", "train.batch_size=two", *t],
         "must be an integer"),
        (["train", "--config", "lstm", "--set", "model.hidden_size=-4", *t], "must be positive"),
        (["train", "--config", "lstm", "--set", "model.cell=cnn", *t], "valid cells: rnn, lstm"),
        (["train", "--config", "lstm", "--set", "train.lr", *t], "key=value"),
        (["train", "--config", "lstm", "--set", "=3", *t], "a key before '='"),
        (["train", "--config", "lstm", "--set", "train=3", *t], "'train' is a section"),
        (["train", "--config", "lstm", "--set", "optim.lr=0.1", *t], "unknown key 'optim.lr'"),
        (["train", "--config", "lstm", "--set", "model.dropout=1.5", *t],
         "model.dropout must be in [0, 1)"),
        (["train", "--config", "lstm", "--set", "model.dropout=-0.1", *t], "model.dropout"),
        (["train", "--config", "lstm", "--set", "data.val_fraction=1", *t],
         "data.val_fraction must be in [0, 1)"),
        (["train", "--config", "lstm", "--set", "train.lr=0", *t],
         "train.lr must be a positive number"),
        (["train", "--config", "lstm", "--set", "train.lr=1e40", *t], "at most 1e30"),
        (["train", "--config", "lstm", "--set", "train.lr=nan", *t], "train.lr must be a number"),
        (["train", "--config", "lstm", "--set", "train.max_steps=0", *t], "must be positive"),
        (["train", "--config", "lstm", "--set", "train.skip_nonfinite=maybe", *t],
         "true or false"),
        (["train", "--config", "lstm", "--set", "model.cell=transformer", "--set",
          "model.num_heads=3", *t], "divisible by model.num_heads"),
        # ---- train: data
        (["train", "--config", "lstm", "--set", f"data.source={tmp / 'none.txt'}", *t],
         "not a file, a directory"),
        (["train", "--config", "lstm", "--set", f"data.source={empty}", *t], "is empty"),
        (["train", "--config", "lstm", "--set", f"data.source={short}", *t], "train.seq_len"),
        (["train", "--config", "lstm", *tiny, "--set", "train.seq_len=100000", *t],
         "lower train.seq_len"),
        (["train", "--config", "lstm", "--set", f"data.source={no_text}", *t],
         "holds no text files"),
        (["train", "--config", "lstm", *tiny, "--set", "data.val_fraction=0.001", *t],
         "raise data.val_fraction"),
        # ---- train: device, names, resume
        (["train", "--config", "lstm", *tiny, "--device", "tpu", *t], "not valid"),
        (["train", "--config", "gru", "--name", "r", *t], "already exists"),
        (["train", "--config", "lstm", "--name", "../escape", *t], "not a valid run name"),
        (["train", "--config", "lstm", "--name", "/etc/x", *t], "not a valid run name"),
        (["train", "--resume", "--name", "nothing", *t], "there is no run"),
        (["train", "--resume", "--runs-dir", str(tmp / "empty-runs")], "no runs found"),
        (["train", "--resume", "--name", "r", "--config", "lstm", *t], "model.cell"),
        (["train", "--resume", "--name", "r", "--set", "model.cell=lstm", *t],
         "model.cell: 'gru' -> 'lstm'"),
        (["train", "--resume", "--name", "r", "--set", "model.hidden_size=32", *t],
         "model.hidden_size"),
        (["train", "--resume", "--name", "r", "--set", f"data.source={other}", *t],
         "data.source"),
        (["train", "--resume", "--name", "r", "--set", "train.batch_size=8", *t],
         "train.batch_size"),
        (["train", "--resume", "--name", "broken", *t], "not a loadable charlm checkpoint"),
        # ---- sample
        (["sample", "--run", str(tmp / "no-run")], "not found"),
        (["sample", "--run", str(garbage)], "not a loadable charlm checkpoint"),
        (["sample", "--run", str(truncated)], "not a loadable charlm checkpoint"),
        (["sample", "--run", str(runs / "nockpt")], "has no checkpoint"),
        (["sample", *t, "--temperature", "-1"], "--temperature"),
        (["sample", *t, "--temperature", "inf"], "--temperature"),
        (["sample", *t, "--top-p", "1.5"], "--top-p"),
        (["sample", *t, "--top-p", "0"], "--top-p"),
        (["sample", *t, "--top-k", "-2"], "--top-k"),
        (["sample", *t, "--length", "-5"], "--length"),
        (["sample", *t, "--device", "tpu"], "not valid"),
        # ---- eval
        (["eval", *t, "--data", str(tmp / "none.txt")], "not found"),
        (["eval", *t, "--data", str(empty)], "empty"),
        (["eval", *t, "--data", str(tmp)], "is a directory"),
        (["eval", *t, "--data", str(unseen)], "never saw"),
        (["eval", "--runs-dir", str(tmp / "empty-runs")], "no runs found"),
        (["eval", "--run", str(runs / "nockpt")], "has no checkpoint"),
        (["eval", "--run", str(truncated)], "not a loadable charlm checkpoint"),
    ]
    if not torch.cuda.is_available():
        cases.append((["sample", *t, "--device", "cuda"], "CUDA is not available"))
    blocker = tmp / "a-file"
    blocker.write_text("not a directory")
    cases += [
        (["compare", "hello", "--out", str(blocker / "out"), *t], "cannot be created"),
        (["compare", *t], "give at least one config"),
        (["compare", "lstn", *t], "did you mean 'lstm'"),
        (["compare", "lstm", "--params", "abc", *t], "--params 'abc'"),
        (["compare", "lstm", "--set", "train.lr=-1", *t], "train.lr must be a positive"),
        (["compare", "lstm", "gru", "--set", f"data.source={tmp / 'none.txt'}", *t],
         "not a file, a directory"),
    ]
    return cases


def test_bad_inputs_give_one_line_errors_and_touch_nothing(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that wrongly went ahead would write here, not in
    runs = tmp_path / "runs"     # the checkout
    assert invoke("train", "--config", "gru", "--runs-dir", runs, "--name", "r", "--quiet",
                  *sets(tiny_overrides(corpus, "gru", 10))).exit_code == 0
    (runs / "nockpt").mkdir()
    (runs / "nockpt" / "config.yaml").write_bytes((runs / "r" / "config.yaml").read_bytes())
    (runs / "broken").mkdir()
    (runs / "broken" / "last.pt").write_bytes((runs / "r" / "last.pt").read_bytes()[:1000])
    (runs / "LATEST").write_text("r\n")
    cases = bad_inputs(tmp_path, corpus, runs)
    assert len(cases) == 70 - torch.cuda.is_available()
    before = snapshot(runs, corpus)
    for args, fragment in cases:
        result = invoke(*args)
        where = f"charlm {' '.join(args)}"
        assert result.exit_code != 0, where
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (
            f"{where}: {result.stderr!r}")
        assert fragment in result.stderr, f"{where}: {result.stderr!r}"
        assert len(result.stderr) < 400, f"{where}: too long: {result.stderr!r}"
        assert "unexpected" not in result.stderr, f"{where}: {result.stderr!r}"
        assert "Traceback" not in result.stderr + result.stdout, where
    assert snapshot(runs, corpus) == before  # nothing of the user's was touched
    assert not (tmp_path / "empty-runs").exists()
