"""What a demanding user hits sooner or later, each case from the hardening issue: run
directories that cannot be corrupted or lost, a corpus that stays the one a run was trained on,
bounded one-line errors, values that validation catches by name, and budgets and progress that
tell the truth. Every CLI case ends in exit 0, or 1 with one `error:` line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from charlm import checkpoint as ck
from charlm import nonfinite
from charlm import train as train_module
from charlm.config import load_config
from charlm.evaluate import evaluate_tokens
from tests.conftest import invoke, sets, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def train_run(runs: Path, corpus: Path, name: str = "r", *extra: str, cell: str = "lstm"):
    return invoke("train", "--config", cell, "--runs-dir", runs, "--name", name,
                  *sets(tiny_overrides(corpus, cell, 10) + list(extra)))


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- run directories


@pytest.mark.parametrize("name", ["LATEST", "latest", ".hidden"])
def test_reserved_run_names_are_refused(tmp_path, corpus, name):
    runs = tmp_path / "runs"
    assert train_run(runs, corpus, "good").exit_code == 0
    line = one_error_line(train_run(runs, corpus, name))
    assert "--name" in line
    assert (runs / "LATEST").is_file() and (runs / "LATEST").read_text().strip() == "good"
    assert train_run(runs, corpus, "again").exit_code == 0  # the runs directory still works


def test_a_run_being_trained_is_locked(tmp_path, corpus):
    runs = tmp_path / "runs"
    assert train_run(runs, corpus).exit_code == 0
    before = snapshot(runs / "r")
    with ck.RunLock(runs / "r"):  # as a training process holds it
        line = one_error_line(invoke("train", "--runs-dir", runs, "--name", "r", "--resume",
                                     "--set", "train.max_steps=20"))
    assert "is being trained by process" in line and str(os.getpid()) in line
    after = snapshot(runs / "r")
    assert {p: b for p, b in after.items() if ".lock" not in p.name} == {
        p: b for p, b in before.items() if ".lock" not in p.name}
    assert invoke("train", "--runs-dir", runs, "--name", "r", "--resume",
                  "--set", "train.max_steps=20").exit_code == 0  # released: it resumes


def test_the_lock_dies_with_its_process(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    code = ("import sys; from charlm.checkpoint import RunLock; RunLock(sys.argv[1]).acquire();"
            " import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(run)], check=True)  # exits holding it
    with ck.RunLock(run):  # the OS released it: no stale lock, and this process owns it now
        assert (run / ".lock.owner").read_text().startswith(f"process {os.getpid()} ")


def test_creating_a_run_directory_is_atomic(tmp_path):
    run = tmp_path / "runs" / "r"
    ck.create_run_dir(run)
    with pytest.raises(ValueError, match="just created by another process"):
        ck.create_run_dir(run)


def test_compare_refuses_an_out_folder_with_results(tmp_path, corpus):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.csv").write_text("earlier results\n")
    line = one_error_line(invoke("compare", "lstm", "--out", out, "--runs-dir", tmp_path / "runs",
                                 *sets(tiny_overrides(corpus, "lstm", 4))))
    assert "--out" in line and "already holds a comparison" in line
    assert (out / "compare.csv").read_text() == "earlier results\n"


def test_a_failed_start_leaves_no_half_run_and_latest_stays(tmp_path, corpus, monkeypatch):
    runs = tmp_path / "runs"
    assert train_run(runs, corpus, "good").exit_code == 0

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(train_module, "build_model", out_of_memory)
    assert train_run(runs, corpus, "bad").exit_code == 1
    assert not (runs / "bad").exists()
    assert (runs / "LATEST").read_text().strip() == "good"
    monkeypatch.undo()
    assert invoke("sample", "--runs-dir", runs, "--length", "5", "--seed", "1").exit_code == 0


def test_latest_moves_only_with_the_first_checkpoint(tmp_path, corpus, monkeypatch):
    runs = tmp_path / "runs"
    assert train_run(runs, corpus, "good").exit_code == 0
    seen = []
    real = train_module.ckpt_io.save_checkpoint

    def spy(path, payload):
        seen.append((runs / "LATEST").read_text().strip())
        real(path, payload)

    monkeypatch.setattr(train_module.ckpt_io, "save_checkpoint", spy)
    assert train_run(runs, corpus, "new").exit_code == 0
    assert seen[0] == "good"  # not yet moved when the first checkpoint was being written
    assert (runs / "LATEST").read_text().strip() == "new"


def test_a_damaged_best_checkpoint_falls_back_to_last(tmp_path, corpus):
    runs = tmp_path / "runs"
    assert train_run(runs, corpus).exit_code == 0
    (runs / "r" / "best.pt").write_bytes(b"PK\x03\x04 damaged")
    result = invoke("sample", "--runs-dir", runs, "--length", "5", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert "notice:" in result.stderr and "last.pt" in result.stderr
    assert invoke("eval", "--runs-dir", runs).exit_code == 0


def test_a_damaged_checkpoint_error_is_whole_sentences(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(ValueError) as err:
        ck.load_checkpoint(bad)
    assert not str(err.value).endswith(("there is a high", " a", " the"))
    long = ("Weights only load failed. If you are seeing this error, there is a high "
            "chance that " + "x " * 200)
    cut = ck.first_sentences(long)
    assert cut == "Weights only load failed." and len(cut) <= 200


# ---------------------------------------------------------------------------- corpus identity


def test_a_relative_corpus_is_the_same_file_from_any_directory(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "text.txt").write_text("abcabcabc abc abcab cabca\n" * 200)
    (b / "text.txt").write_text("zzzyyy zy yzyzyzyzy zyzy\n" * 200)  # same name, other text
    monkeypatch.chdir(a)
    overrides = [o for o in tiny_overrides(a / "text.txt") if not o.startswith("data.source")]
    result = invoke("train", "--config", "lstm", "--runs-dir", tmp_path / "runs", "--name", "r",
                    *sets(overrides + ["data.source=text.txt"]))
    assert result.exit_code == 0, result.stderr
    saved = load_config(str(tmp_path / "runs" / "r" / "config.yaml"))
    assert saved.data.source == str((a / "text.txt").resolve())
    monkeypatch.chdir(b)
    result = invoke("eval", "--runs-dir", tmp_path / "runs", "--json")
    assert result.exit_code == 0, result.stderr
    assert "abc" not in result.stderr


def test_a_changed_or_missing_corpus_is_named_with_its_digest(tmp_path, corpus):
    runs = tmp_path / "runs"
    assert train_run(runs, corpus).exit_code == 0
    size = corpus.stat().st_size
    corpus.write_text(corpus.read_text().replace("fox", "cat"))
    line = one_error_line(invoke("eval", "--runs-dir", runs))
    assert str(corpus) in line and f"{size:,} bytes" in line and "SHA-256" in line
    assert "--data FILE" in line
    line = one_error_line(invoke("train", "--runs-dir", runs, "--name", "r", "--resume",
                                 "--set", "train.max_steps=20"))
    assert "changed since the run was trained" in line
    corpus.unlink()
    line = one_error_line(invoke("eval", "--runs-dir", runs))
    assert "is gone" in line and "SHA-256" in line and "--data FILE" in line


# ---------------------------------------------------------------------------- validation


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, want", [("1e-3", 1e-3), (".5", 0.5), ("1E+4", 1e4),
                                        ("2.5e-2", 0.025)])
def test_yaml_floats_in_every_common_form(tmp_path, text, want):
    cfg = load_config(str(write(tmp_path / "c.yaml", f"train:\n  lr: {text}\n")))
    assert cfg.train.lr == want


@pytest.mark.parametrize("text, key", [("train:\n  lr: 0.1\n  lr: 0.2\n", "lr"),
                                       ("train:\n  lr: 0.1\ntrain:\n  seed: 1\n", "train")])
def test_duplicate_yaml_keys_are_errors(tmp_path, text, key):
    with pytest.raises(ValueError, match=f"duplicate key '{key}'"):
        load_config(str(write(tmp_path / "c.yaml", text)))


def test_billion_laughs_is_refused_quickly_and_briefly(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        lines.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [" + ",".join(
            [f"*{prev}"] * 9) + "]")
    path = write(tmp_path / "lol.yaml", "\n".join(lines) + "\n")
    start = time.perf_counter()
    result = invoke("train", "--config", path)
    assert time.perf_counter() - start < 5
    line = one_error_line(result)
    assert "not supported" in line and len(line) < 400


@pytest.mark.parametrize("override, key", [
    ("train.seed=1180591620717411303424", "train.seed"),  # 2**70
    ("train.seed=-1", "train.seed"),
    ("model.hidden_size=1000000000000000000000000000000", "model.hidden_size"),
    ("train.batch_size=100000000000000000000", "train.batch_size"),
    ("train.max_steps=100000000000000000000000", "train.max_steps"),
    ("train.weight_decay=.nan", "train.weight_decay"),
    ("train.grad_clip=.nan", "train.grad_clip"),
    ("train.grad_clip=.inf", "train.grad_clip"),
    ("train.max_time=.inf", "train.max_time"),
    ("train.lr=.nan", "train.lr"),
    ("data.val_fraction=.nan", "data.val_fraction"),
    ("model.dropout=.nan", "model.dropout"),
    ("train.eval_steps=1e300", "train.eval_steps"),
])
def test_overflowing_and_non_finite_numbers_name_their_key(tmp_path, corpus, override, key):
    line = one_error_line(train_run(tmp_path / "runs", corpus, "r", override))
    assert key in line and "c10" not in line and "frame #" not in line
    assert not (tmp_path / "runs" / "r").exists()


def test_set_fixes_a_bad_value_in_the_file(tmp_path, corpus):
    path = write(tmp_path / "c.yaml", "train:\n  lr: fast\n  seed: 99999999999999999999999\n")
    result = invoke("train", "--config", path, "--runs-dir", tmp_path / "runs", "--name", "r",
                    *sets(tiny_overrides(corpus, "lstm", 4) + ["train.lr=0.01", "train.seed=3"]))
    assert result.exit_code == 0, result.stderr
    result = invoke("compare", path, "--runs-dir", tmp_path / "runs", "--out", tmp_path / "cmp",
                    *sets(tiny_overrides(corpus, "lstm", 4) + ["train.lr=0.01", "train.seed=3"]))
    assert result.exit_code == 0, result.stderr


def test_an_error_never_prints_a_huge_user_value(tmp_path, corpus):
    huge = "x" * 100_000
    for args in (["--set", f"train.schedule={huge}"], ["--set", f"train.{huge}=1"],
                 ["--name", huge]):
        result = invoke("train", "--config", "lstm", "--runs-dir", tmp_path / "runs", *args)
        assert len(one_error_line(result)) < 700


@pytest.mark.parametrize("alias, key", [("learning_rate", "train.lr"),
                                        ("n_layer", "model.num_layers"),
                                        ("block_size", "train.seq_len")])
def test_the_suggestion_knows_common_aliases(alias, key):
    section = key.split(".")[0]
    with pytest.raises(ValueError, match=f"did you mean '{key}'"):
        load_config("lstm", [f"{section}.{alias}=1"])


def test_runs_dir_that_is_a_file(tmp_path, corpus):
    runs = write(tmp_path / "runs", "not a directory")
    for cmd in (["train", "--config", "lstm", *sets(tiny_overrides(corpus))], ["sample"], ["eval"]):
        assert "--runs-dir" in one_error_line(invoke(*cmd, "--runs-dir", runs))


# ---------------------------------------------------------------------------- budgets, progress


def test_resuming_a_spent_budget_says_how_to_extend_it(tmp_path, corpus):
    runs = tmp_path / "runs"
    assert train_run(runs, corpus).exit_code == 0
    line = one_error_line(invoke("train", "--runs-dir", runs, "--name", "r", "--resume"))
    assert "train.max_steps=10" in line and "--set train.max_steps=20" in line


def test_a_time_limited_run_trains_longer_when_max_time_is_raised(tmp_path, corpus):
    runs = tmp_path / "runs"
    result = train_run(runs, corpus, "r", "train.max_steps=100000", "train.max_time=0.3",
                       "train.eval_interval=100000")
    assert result.exit_code == 0, result.stderr
    first = ck.load_checkpoint(runs / "r" / "last.pt")
    line = one_error_line(invoke("train", "--runs-dir", runs, "--name", "r", "--resume"))
    assert "train.max_time" in line
    result = invoke("train", "--runs-dir", runs, "--name", "r", "--resume",
                    "--set", "train.max_time=0.6")
    assert result.exit_code == 0, result.stderr
    assert ck.load_checkpoint(runs / "r" / "last.pt")["step"] > first["step"]


def test_the_progress_bar_follows_the_budget_that_ends_first():
    t = types.SimpleNamespace(max_steps=1_000_000, max_time=60.0)
    bar = train_module.BudgetBar(t, 0, 0.0, enabled=True)
    for step in range(1, 6):
        bar.advance(step, step * 0.5)  # 0.5 s a step: the clock ends the run, not the steps
    assert bar.by_time and bar.bar.total == 60 and bar.bar.n == 2
    steps = train_module.BudgetBar(types.SimpleNamespace(max_steps=10, max_time=600.0), 0, 0.0,
                                   enabled=True)
    for step in range(1, 6):
        steps.advance(step, step * 0.5)
    assert not steps.by_time and steps.bar.n == 5


def test_eval_shows_a_bar_when_asked(capsys):
    from charlm.config import Config
    from charlm.model import build_model

    cfg = Config()
    cfg.model.hidden_size, cfg.model.num_layers = 8, 1
    m = build_model(cfg, 5)
    tokens = torch.randint(5, (3000,), dtype=torch.uint8)
    evaluate_tokens(m, tokens, 16, torch.device("cpu"), progress=True)
    assert "char" in capsys.readouterr().err


def test_sample_into_a_closed_pipe_ends_quietly(tmp_path, corpus):
    runs = tmp_path / "runs"
    assert train_run(runs, corpus).exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "charlm", "sample", "--runs-dir", str(runs),
                             "--length", "200000", "--seed", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.read(10)
    proc.stdout.close()  # as `| head` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Broken pipe" not in err and "error" not in err


def test_bench_quick_judges_no_target():
    from charlm.bench import format_table, quick_shape, run_bench

    result = run_bench(torch.device("cpu"), ["transformer"], quick_shape(), repeats=1, steps=1,
                       progress=False)
    assert result["kv_cache"]["meets_target"] is None and result["kv_cache"]["target"] is None
    assert "MISSES" not in format_table(result) and "no target is judged" in format_table(result)


# ---------------------------------------------------------------------------- review fixes


def test_skipped_non_finite_steps_spend_the_time_budget(tmp_path, corpus, monkeypatch):
    real_f = train_module.F

    def cross_entropy(*args, **kwargs):  # every loss is NaN
        return real_f.cross_entropy(*args, **kwargs) * math.nan

    monkeypatch.setattr(train_module, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    # before the fix the clock stood still: 3000 skipped steps, then exit 1
    monkeypatch.setattr(nonfinite, "MAX_SKIPPED_STEPS", 3000)
    result = train_run(tmp_path / "runs", corpus, "r", "train.skip_nonfinite=true",
                       "train.max_steps=1000000", "train.max_time=0.3")
    assert result.exit_code == 0, result.stderr[-500:]  # the clock ran out: training ended


def test_weight_decay_goes_by_module_type_not_by_name():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_proj = nn.Linear(4, 4)  # a matrix whose name contains "pos"
            self.table = nn.Embedding(5, 4)  # a lookup table whose name says nothing

    model = Model()
    opt = train_module.make_optimizer(model, types.SimpleNamespace(weight_decay=0.1, lr=1e-3),
                                      torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.pos_proj.weight) in decayed
    assert id(model.table.weight) not in decayed and id(model.pos_proj.bias) not in decayed
