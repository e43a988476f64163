"""`charlm bench`: the report is complete and its arithmetic right, and the things it times are
the same function (charlm vs torch.nn bodies; KV cache vs recompute). No timing assertions."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm.bench import format_table, models, quick_shape, run_bench
from charlm.bench.models import build_recurrent_pair, build_transformer
from charlm.bench.run import stability
from charlm.bench.timing import generate_ids
from charlm.cli import app

# the bare-layer groups: bidirectional for LSTM and GRU, packed input for every cell
VARIANTS = [("rnn", "packed"), ("lstm", "bidir"), ("lstm", "packed"), ("gru", "bidir"),
            ("gru", "packed")]

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_result() -> dict:
    """One `charlm bench --quick --json` run on CPU, shared by the report tests; in fp32, so
    that every machine times the same contenders (bf16 ones: tests/test_precision.py)."""
    result = CliRunner().invoke(app, ["bench", "--quick", "--json", "--device", "cpu",
                                      "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_quick_json_has_every_contender_with_positive_rates(quick_result):
    h = quick_shape().hidden[0]
    names = {(c["task"], c["name"]) for c in quick_result["contenders"]}
    for cell in ("rnn", "lstm", "gru"):
        for task in ("train", "sample"):
            assert {(task, f"charlm-{cell}-{h}"), (task, f"nn-{cell}-{h}")} <= names
    assert {("train", "transformer-2x32"), ("sample", "transformer-2x32-kv"),
            ("sample", "transformer-2x32-recompute")} <= names
    variants = {("train", f"{who}-{cell}-32-{v}") for who in ("charlm", "nn")
                for cell, v in VARIANTS}
    assert variants <= names
    mins = {(task, f"{cell}-{h}{v}") for cell in ("mingru", "minlstm")
            for task, v in (("train", ""), ("train", "-nomlp"), ("sample", ""))}
    assert mins <= names  # each against charlm's classic cell of its width
    assert len(names) == 15 + len(variants) + len(mins)
    for c in quick_result["contenders"]:
        assert len(c["repeats"]) == quick_result["repeats"] == 2
        assert all(rate > 0 for rate in c["repeats"])
        assert c["median"] == pytest.approx(statistics.median(c["repeats"]))
        assert c["stability"] == pytest.approx(c["repeats"][0] / c["repeats"][1])
    assert quick_result["device"]["type"] == "cpu" and quick_result["torch_version"]
    assert quick_result["process_max_rss_bytes"] > 0


def test_ratios_are_charlm_over_nn_medians_of_the_raw_repeats(quick_result):
    rows = quick_result["contenders"]
    raw = {(c["task"], c["name"]): c["repeats"] for c in rows}
    # 3 cells x (train, sample) + KV vs recompute + one per layer variant + 2 min cells x 3
    assert len(quick_result["ratios"]) == 7 + len(VARIANTS) + 6
    classic = {"mingru": "gru", "minlstm": "lstm"}
    for r in quick_result["ratios"]:
        if r["contender"].startswith("charlm-"):
            assert r["reference"] == "nn-" + r["contender"].removeprefix("charlm-")
        elif r["contender"].startswith("min"):
            cell, h = r["contender"].split("-")[:2]
            assert r["reference"] == f"charlm-{classic[cell]}-{h}"
    # each ratio is against the reference timed in its own group: the row after it
    for i, c in enumerate(rows):
        if c["ratio"] is not None:
            ref = rows[i + 1]
            assert ref["name"] == c["reference"] and ref["task"] == c["task"]
            assert c["ratio"] == pytest.approx(statistics.median(c["repeats"])
                                               / statistics.median(ref["repeats"]))
    kv = quick_result["kv_cache"]
    assert kv["speedup"] == pytest.approx(
        statistics.median(raw["sample", "transformer-2x32-kv"])
        / statistics.median(raw["sample", "transformer-2x32-recompute"]))


def test_the_bench_checks_what_it_measures(quick_result):
    checks = quick_result["checks"]
    assert set(checks["max_logit_diff"]) == {"rnn-32", "lstm-32", "gru-32"} | {
        f"{cell}-32-{v}" for cell, v in VARIANTS}
    assert max(checks["max_logit_diff"].values()) < 1e-5
    assert checks["kv_cache_greedy"] == {"chars_compared": quick_shape().kv_context,
                                         "matches_recompute": True}


def test_table_lists_every_contender(quick_result):
    table = format_table(quick_result)
    for c in quick_result["contenders"]:
        assert c["name"] in table
    assert "KV cache speedup" in table and "CHECK FAILED" not in table
    # The quick shape is below kernels.MIN_NUMEL, so the LSTM ran eagerly, and says so.
    assert quick_result["checks"]["compiled_steps"] is False
    assert "charlm RNN/LSTM/GRU steps: eager torch ops" in table


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_both_contenders_share_parameters_and_compute_the_same_function(cell):
    ours, theirs = build_recurrent_pair(cell, quick_shape(), 24, CPU)
    assert type(ours.rnn).__module__.startswith("charlm.cells")
    assert type(theirs.rnn).__module__.startswith("torch.nn")
    theirs_sd = theirs.state_dict()
    for name, p in ours.state_dict().items():
        assert torch.equal(p, theirs_sd[name]), name
    idx = torch.randint(65, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, state_a = ours(idx, None)
        b, state_b = theirs(idx, None)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # carrying the state, as training and sampling do
        torch.testing.assert_close(ours(idx, state_a)[0], theirs(idx, state_b)[0],
                                   rtol=1e-5, atol=1e-5)


def test_kv_cache_greedy_text_equals_recomputing_the_context():
    shape = quick_shape()
    model = build_transformer(shape, shape.kv_context, CPU)
    with torch.no_grad():  # larger weights than the init, so greedy text is not one char repeated
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    n = shape.kv_context  # beyond this the cache restarts from half a context: texts may differ
    kv = generate_ids(model, n, CPU, temperature=0.0)
    full = generate_ids(model, n, CPU, temperature=0.0, recompute_context=shape.kv_context)
    assert len(set(kv)) > 3
    assert kv == full
    assert model.training  # sampling restored the mode it found


def test_stability_is_odd_over_even_repeat_medians():
    assert stability([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(3.0 / 3.0)
    assert stability([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.0 / 3.0)
    assert stability([7.0]) is None


def test_bad_options_give_one_line_errors():
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--quick", "--cells", "lstm,foo", "--device", "cpu"])
    assert result.exit_code == 1 and "--cells" in result.stderr and "foo" in result.stderr
    result = runner.invoke(app, ["bench", "--quick", "--hidden", "0", "--device", "cpu"])
    assert result.exit_code == 1 and "--hidden" in result.stderr


def test_a_failing_group_is_reported_and_the_others_still_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this dtype")

    monkeypatch.setitem(models.NN_BODIES, "gru", broken)
    result = run_bench(CPU, ["gru", "rnn"], quick_shape(), repeats=1, steps=1, progress=False,
                       precision="fp32")
    assert [f["group"] for f in result["failures"]] == [
        "train gru h32", "sample gru h32", "train gru h32 bidir", "train gru h32 packed"]
    assert {c["name"] for c in result["contenders"]} == {
        "charlm-rnn-32", "nn-rnn-32", "charlm-rnn-32-packed", "nn-rnn-32-packed"}
    assert "FAILED train gru h32: no kernel for this dtype" in format_table(result)


def test_the_json_names_the_cpu_and_its_matrix_units(quick_result):
    cpu = quick_result["device"]["cpu"]
    assert cpu["model"]
    if Path("/proc/cpuinfo").is_file():
        flags = Path("/proc/cpuinfo").read_text().split()
        assert cpu["flags"]["avx512f"] == ("avx512f" in flags)
        assert cpu["flags"]["amx_bf16"] == ("amx_bf16" in flags)


def test_the_json_names_the_gemm_backend_each_shape_raced_to(monkeypatch):
    from charlm.cells.fused import gemm, onednn

    monkeypatch.setattr(gemm, "RACE_MIN_MACS", 0)  # the quick shape's products race too
    monkeypatch.setattr(gemm, "_winner", {})
    result = run_bench(CPU, ["rnn"], quick_shape(), repeats=1, steps=1, progress=False,
                       variants=False, precision="fp32")
    backends = result["device"]["gemm_backends"]
    assert set(backends.values()) <= {"onednn", "torch", "mkl"}
    if gemm.BACKEND == "auto" and onednn.linear_op() is not None:
        assert any(key.startswith("mm_nt torch.float32") for key in backends)


def test_user_loops_script_runs_and_reports_both_ratios():
    """benchmarks/user_loops.py (the loops a drop-in user writes) runs end to end."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "user_loops.py"
    done = subprocess.run(
        [sys.executable, str(script), "--cells", "rnn", "--rounds", "1", "--chars", "5",
         "--steps", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("RNN") and line.count("x") >= 2 and "chars/s" in line
