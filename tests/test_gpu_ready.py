"""ISSUE 15's fixes to the CUDA code paths, each held on the CPU: the CUDA RNG state is saved
and restored for the run's own GPU only (a stub stands in for torch.cuda); the bench compares
charlm and torch.nn in one precision and records the TF32 switches; compiling happens before
the clock (a stub compiler that is slow on its first call); the loss and non-finite checks
can stay on the device and read only on logging steps, with the same numbers; sampling reads
one number per character."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from torch.utils._python_dispatch import TorchDispatchMode

from charlm import bench, compare, device, nonfinite, runs, sample
from charlm import train as training
from charlm.bench import run as bench_run
from charlm.bench import timing as bench_timing
from charlm.checkpoint import load_checkpoint
from charlm.config import load_config

CUDA0 = torch.device("cuda", 0)


# ---------------------------------------------------------------- 4. RNG on resume


class FakeCuda:
    """torch.cuda's RNG functions for `n` GPUs; the *_all ones fail as torch's do when a
    checkpoint has more states than there are GPUs."""

    def __init__(self, monkeypatch, n: int):
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(n)}
        self.set_calls: list[tuple[int, list[int]]] = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d=0: self.states[d].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states.values()))

        def set_all(states):
            for i, s in enumerate(states):
                self.states[i]  # IndexError-like: a GPU that is not there
                self.set(s, i)

        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)

    def set(self, state, d=0):
        if d not in self.states:
            raise IndexError(d)
        self.set_calls.append((d, state.tolist()))
        self.states[d] = state


def test_rng_state_holds_the_runs_own_gpu_only_and_restores_with_fewer_gpus(monkeypatch):
    saved_on = FakeCuda(monkeypatch, 4)
    state = runs.rng_state(torch.device("cuda", 2))
    assert torch.equal(state["cuda"], saved_on.states[2])  # one state, not a list of four
    resumed_on = FakeCuda(monkeypatch, 1)  # CUDA_VISIBLE_DEVICES=0 at resume time
    runs.set_rng_state(state, CUDA0)
    assert resumed_on.set_calls == [(0, [2])]


def test_an_older_checkpoints_list_of_states_restores_this_devices_entry(monkeypatch):
    old = {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
           "cuda": [torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)]}
    fake = FakeCuda(monkeypatch, 1)
    runs.set_rng_state(old, CUDA0)  # saved with two GPUs, resumed with one: no IndexError
    assert fake.set_calls == [(0, [7])]
    fake = FakeCuda(monkeypatch, 2)
    runs.set_rng_state(old, torch.device("cuda", 1))
    assert fake.set_calls == [(1, [8])]


# ---------------------------------------------------------------- 5. strict float32


def test_strict_fp32_turns_tf32_off_and_restores_it():
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with device.strict_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert device.math_settings()["float32_matmul_precision"] == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision("highest")


# ---------------------------------------------------------------- 2. and 7. the bench


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_compares_recurrent_pairs_in_one_precision_and_records_it(monkeypatch, precision):
    entered = []

    def recording_autocast(dev, p):
        entered.append(p)
        return device.autocast(dev, p)

    monkeypatch.setattr(bench_timing, "autocast", recording_autocast)
    result = bench.run_bench(torch.device("cpu"), ["lstm"], bench.quick_shape(), repeats=1,
                             steps=1, progress=False, variants=False, precision=precision)
    assert set(entered) == {precision}  # charlm and torch.nn under the same autocast, or none
    trains = [c for c in result["contenders"] if c["task"] == "train"]
    assert {c["precision"] for c in trains} == {precision} and len(trains) == 2
    p = result["precision"]
    assert p["recurrent"] == p["requested"] == precision
    assert set(p["math"]) == {"float32_matmul_precision", "matmul_allow_tf32",
                              "cudnn_allow_tf32", "cudnn_enabled"}
    how = "(no autocast)" if precision == "fp32" else "(autocast)"
    assert f"precision: charlm vs torch.nn both {precision} {how}" in bench.format_table(result)


@pytest.mark.parametrize("native", [True, False])
def test_the_transformer_trains_as_charlm_train_would(monkeypatch, native):
    entered = []
    monkeypatch.setattr(device, "bf16_native", lambda dev: native)
    monkeypatch.setattr(bench_run, "bf16_native", lambda dev: native)
    monkeypatch.setattr(bench_timing, "autocast",
                        lambda dev, p: entered.append(p) or device.autocast(dev, p))
    result = bench.run_bench(torch.device("cpu"), ["transformer"], bench.quick_shape(),
                             repeats=1, steps=1, progress=False)
    want = "bf16" if native else "fp32"  # train.precision auto, resolved for this device
    assert set(entered) == {want} and result["precision"]["transformer"] == want


def test_each_device_is_judged_by_its_own_kv_cache_target():
    assert bench.kv_cache_target("cpu") == 5.0
    assert bench.kv_cache_target("cuda") == 2.0
    assert bench.kv_cache_target("mps") is None
    assert bench.kv_cache_target("cuda", smoke=True) is None


# ---------------------------------------------------------------- 3. compiling off the clock


COMPILE_S = 1.5


class SlowFirstCall(torch.nn.Module):
    """What torch.compile returns, minus the compiling: the model, slow on its first call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == 1:
            time.sleep(COMPILE_S)
        return self.model(*args)


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("cell", ["transformer", "lstm"])
def test_compiling_happens_before_the_clock_and_leaves_the_run_unchanged(
        corpus, tmp_path, monkeypatch, cell):
    over = tiny_overrides(corpus, cell, steps=6) + ["model.dropout=0.2"]  # dropout uses the RNG
    plain = training.train(load_config(cell, over), tmp_path / "a", "r", quiet=True)
    monkeypatch.setattr(torch, "compile", SlowFirstCall)
    compiled = training.train(load_config(cell, over + ["train.compile=true"]),
                              tmp_path / "b", "r", quiet=True)
    assert compiled.warmup_s >= COMPILE_S
    assert compiled.elapsed_s < COMPILE_S  # the first step's compile is not training time
    assert plain.warmup_s == 0.0
    a, b = (load_checkpoint(d / "r" / "last.pt") for d in (tmp_path / "a", tmp_path / "b"))
    for k, v in a["model"].items():  # the warm-up drew no random numbers, changed no weight
        assert torch.equal(v, b["model"][k]), k
    strip = [{k: r[k] for k in ("step", "train_loss", "val_loss", "lr", "grad_norm")}
             for r in _rows(tmp_path / "a" / "r")]
    assert strip == [{k: r[k] for k in ("step", "train_loss", "val_loss", "lr", "grad_norm")}
                     for r in _rows(tmp_path / "b" / "r")]


def test_compare_charges_no_compile_time_to_a_contender(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", SlowFirstCall)
    rows = compare.compare(["transformer"], tiny_overrides(corpus, "transformer", steps=4)
                           + ["train.compile=true"], runs_dir=tmp_path, quiet=True)
    assert rows[0].wall_time_s < COMPILE_S


# ---------------------------------------------------------------- 6. host syncs


class CountReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (.item(), int(), bool(), .tolist()): each
    is a host sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _train_run(corpus, runs, deferred: bool, monkeypatch, extra=(), steps=20, nan_at=()):
    monkeypatch.setattr(nonfinite, "defers_checks", lambda *a: deferred)
    real_make = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer",
                        lambda m, t, d: fused_cpu_optimizer_from(real_make, m, t, d))
    real_step, attempts = training.train_step, [0]

    def step(*args):
        loss, norm, hidden = real_step(*args)
        attempts[0] += 1
        if attempts[0] in nan_at:
            loss = loss * math.nan
        return loss, norm, hidden

    monkeypatch.setattr(training, "train_step", step)
    over = tiny_overrides(corpus, "lstm", steps=steps) + [
        "train.schedule=constant", "train.warmup_steps=0", *extra]
    return training.train(load_config("lstm", over), runs, "r", quiet=True)


def fused_cpu_optimizer_from(make, model, t, dev):
    """make_optimizer's groups in a fused AdamW, as on CUDA: the deferred checks need it."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in make(model, t, dev).param_groups]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.99), fused=True)


@pytest.mark.parametrize("extra", [[], ["train.skip_nonfinite=true"]])
def test_deferred_checks_log_the_same_numbers_as_per_step_checks(corpus, tmp_path, monkeypatch,
                                                                 extra):
    nan_at = (7,) if extra else ()  # a skipped step, found only at the next logging step
    for name, deferred in (("step", False), ("deferred", True)):
        _train_run(corpus, tmp_path / name, deferred, monkeypatch, extra, nan_at=nan_at)
    keys = ("step", "train_loss", "val_loss", "val_bpc", "lr", "grad_norm")
    a, b = ([{k: r[k] for k in keys} for r in _rows(tmp_path / n / "r")]
            for n in ("step", "deferred"))
    assert a == b and len(a) >= 4
    ca, cb = (load_checkpoint(tmp_path / n / "r" / "last.pt") for n in ("step", "deferred"))
    assert ca["step"] == cb["step"] == 20
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k


def test_deferred_checks_stop_a_run_at_its_first_nonfinite_step(corpus, tmp_path, monkeypatch):
    with pytest.raises(nonfinite.NonFiniteError, match="non-finite loss at step 7"):
        _train_run(corpus, tmp_path, True, monkeypatch, nan_at=(7,))
    ckpt = load_checkpoint(tmp_path / "r" / "last.pt")
    assert ckpt["step"] == 9  # found at logging step 10; the bad step was never applied
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_deferred_checks_read_the_device_only_on_logging_steps(corpus, tmp_path, monkeypatch):
    reads = {}
    for steps in (20, 40):
        with CountReads() as counter:
            _train_run(corpus, tmp_path / str(steps), True, monkeypatch,
                       ["train.eval_interval=1000", "train.log_interval=20",
                        "train.sample_length=0"], steps=steps)
        reads[steps] = counter.reads
    # 20 more steps cost one more logging step's reads, not one or two per step
    assert reads[40] - reads[20] < 10, reads


def test_picking_a_character_reads_nothing_back():
    logits_cases = [torch.tensor([0.1, 2.0, -1.0, 0.5]),
                    torch.tensor([math.inf, 0.0, math.inf, math.nan]),
                    torch.full((4,), -math.inf), torch.full((4,), math.nan)]
    for logits in logits_cases:
        for temperature, top_k, top_p in ((0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 2, 0.9)):
            with CountReads() as counter:
                sample.pick_next(logits, temperature, top_k, top_p, None)
            assert counter.reads == 0, (logits, temperature)
    g = torch.Generator().manual_seed(0)
    assert {int(sample.pick_next(logits_cases[1], 1.0, 0, 1.0, g)) for _ in range(40)} == {0, 2}
    assert int(sample.pick_next(logits_cases[2], 0.0, 0, 1.0, None)) == 0


# ---------------------------------------------------------------- benchmarks/gpu_smoke.sh


SMOKE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.sh"


def test_gpu_smoke_script_dry_run_on_the_cpu(tmp_path):
    """The script parses, runs its CPU part (here the bench and time-loop steps, the
    quickest), and reports what needs CUDA, or was not selected, as skipped; its exit code
    says whether all passed."""
    assert subprocess.run(["bash", "-n", str(SMOKE)]).returncode == 0
    out = tmp_path / "smoke"
    done = subprocess.run(["bash", str(SMOKE), "--dry-run", "--skip-tests", "--steps", "4,5",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS  4-bench" in summary and "precision: recurrent fp32" in summary
    assert "SKIP  1-cuda-tests" in summary and "SKIP  2-lstm (not selected)" in summary
    assert "PASS  5-cuda-time-loop" in summary and "graphs NOT used" in summary  # no CUDA
    assert "all steps that ran passed" in summary
    assert json.loads((out / "bench.json").read_text())["schema"] == bench.SCHEMA
    loop = json.loads((out / "time-loop.json").read_text())["rows"]
    assert [r["cell"] for r in loop] == ["rnn", "lstm", "gru"]
    assert all(r["parity_max_rel_diff"] < 1e-6 for r in loop)
    bad = subprocess.run(["bash", str(SMOKE), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
