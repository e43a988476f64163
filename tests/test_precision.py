"""Mixed precision: `train.precision` (auto | fp32 | bf16) from config to device to the layers.

Checked: auto resolves from what torch reports about the device (monkeypatched both ways) and a
bad value names the key; `autocast` is bf16 only for bf16; every charlm cell under CPU bf16
autocast computes what torch.nn's layer computes under the same autocast, within bf16 rounding,
with float32 states and float32 gradients on the float32 parameters (and a wrong gate order is
far outside that tolerance); `charlm train` records the resolved precision in config.yaml, and
eval and sample run a bf16 run; `charlm bench --precision` parses, and its bf16 pairs are
recorded. Tiny models, fixed seeds.

bf16 tolerance, as norm-relative error ||charlm - nn|| / ||nn||: 2e-2 on outputs and final
states, 3e-2 on all gradients together. Measured at these sizes (8 seeds): outputs and states
4e-3 to 1.3e-2 (the projected LSTM), gradients 3e-3 to 1e-2, except ReLU RNNs, whose
pre-activations near 0 may fall on either side of the kink under rounding (up to 6e-2 for
some seeds; seed 0 here: 4e-3). Against float64 charlm's bf16 errors are below torch.nn's.
A wrong gate order is off by 4e-2 to 1.2 (i with g: 0.7).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import yaml
from torch import nn

from charlm import bench, cells
from charlm import device as dev
from charlm.bench import run as bench_run
from charlm.cells.fused import precision as fused_precision
from tests.conftest import invoke, sets, tiny_overrides

CPU = torch.device("cpu")
N_IN, N_H, T, B = 5, 8, 7, 4
OUT_TOL, GRAD_TOL = 2e-2, 3e-2

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- resolving the setting


@pytest.mark.parametrize(("native", "want"), [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_exactly_where_the_device_multiplies_bf16_natively(monkeypatch, native,
                                                                         want):
    monkeypatch.setattr(dev, "bf16_native", lambda device: native)
    assert dev.resolve_precision("auto", CPU) == want
    assert dev.resolve_precision("fp32", CPU) == "fp32"
    assert dev.resolve_precision("bf16", CPU) == "bf16"  # a choice anywhere: emulated if need be


def test_a_bad_precision_names_the_key():
    with pytest.raises(ValueError, match=r"train\.precision must be auto, fp32 or bf16.*fp16"):
        dev.resolve_precision("fp16", CPU)


def test_bf16_native_asks_torch_not_a_cpu_list(monkeypatch):
    dev._cpu_has_bf16_units.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    try:
        assert dev.bf16_native(CPU)
        dev._cpu_has_bf16_units.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        assert not dev.bf16_native(CPU)
        dev._cpu_has_bf16_units.cache_clear()
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe
        assert not dev.bf16_native(CPU)
        assert not dev.bf16_native(torch.device("meta"))
    finally:
        dev._cpu_has_bf16_units.cache_clear()


def test_autocast_is_bf16_only_for_bf16():
    with dev.autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert fused_precision.gemm_dtype("cpu") == torch.bfloat16
    with dev.autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert fused_precision.gemm_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.float16):  # other autocasts: float32 recurrence
        assert fused_precision.gemm_dtype("cpu") is None


# ---------------------------------------------------------------- the cells under autocast

KINDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]


def make_pair(kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(torch.nn layer, charlm layer) of 2 layers with the same weights."""
    torch.manual_seed(seed)
    name = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "lstm_proj": "LSTM",
            "gru": "GRU"}[kind]
    kw = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
    kw |= {"proj_size": 3} if kind == "lstm_proj" else {}
    ref = getattr(nn, name)(N_IN, N_H, num_layers=2, batch_first=True, **kw)
    mine = getattr(cells, name)(N_IN, N_H, num_layers=2, batch_first=True, **kw)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def bf16_run(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs, final states and the gradients of the input and of every parameter, of a
    random weighting of all outputs, under CPU bf16 autocast."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore")  # torch.nn: "LSTM with projections ... oneDNN"
        out, states = layer(x)
    states = list(states) if isinstance(states, tuple) else [states]
    g = torch.Generator().manual_seed(9)
    loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in [out, *states])
    loss.backward()
    found = {"out": out, **{f"state{k}": s for k, s in enumerate(states)}, "dx": x.grad}
    return found | {name: p.grad for name, p in layer.named_parameters()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def split(result: dict) -> tuple[list[str], torch.Tensor]:
    forward = [k for k in result if k == "out" or k.startswith("state")]
    grads = torch.cat([v.flatten().double() for k, v in result.items() if k not in forward])
    return forward, grads


@pytest.mark.parametrize("kind", KINDS)
def test_each_cell_under_bf16_autocast_matches_torch_nn_under_it(kind):
    ref, mine = make_pair(kind)
    x = torch.randn(B, T, N_IN, generator=torch.Generator().manual_seed(100))
    got, want = bf16_run(mine, x), bf16_run(ref, x)
    forward, got_grads = split(got)
    for k in forward:
        assert rel(got[k], want[k].float()) <= OUT_TOL, k
    assert rel(got_grads, split(want)[1]) <= GRAD_TOL
    # the master weights and their gradients stay float32; so do the states charlm returns
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in mine.parameters())
    assert got["dx"].dtype == torch.float32
    last_c = got["state1"] if kind.startswith("lstm") else got["state0"]
    assert last_c.dtype == torch.float32  # the LSTM's c, or the RNN's / GRU's h


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_a_recurrence_chosen_to_run_in_float32_under_autocast_still_matches(kind, monkeypatch):
    """Where the race finds a recurrence faster in float32 (gemm.recurrence_precision), its
    GEMMs run in float32 inside the bf16 autocast: still torch.nn's function under the same
    autocast, and the race really ran the layer that way (no bf16 copy of W_hh is made)."""
    from charlm.cells.fused import gemm

    monkeypatch.setattr(gemm, "RACE_MIN_MACS", 0)
    monkeypatch.setattr(gemm, "BACKEND", "auto")
    monkeypatch.setattr(gemm, "_winner", {})
    monkeypatch.setattr(gemm, "_fastest", lambda calls: "fp32")  # the race's verdict
    ref, mine = make_pair(kind)
    x = torch.randn(B, T, N_IN, generator=torch.Generator().manual_seed(100))
    got, want = bf16_run(mine, x), bf16_run(ref, x)
    assert {v for k, v in gemm.choices().items() if k.startswith("recurrence")} == {"fp32"}
    gemm._winner.clear()  # under inference_mode nothing can be raced (no backward): bf16
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(mine(x)[0].float(), got["out"].detach().float(),
                                   rtol=5e-2, atol=5e-2)
    assert not any(k.startswith("recurrence") for k in gemm.choices())
    forward, got_grads = split(got)
    for k in forward:
        assert rel(got[k], want[k].float()) <= OUT_TOL, k
    assert rel(got_grads, split(want)[1]) <= GRAD_TOL


def test_the_recurrence_precision_race_runs_forward_and_backward_once_per_shape(monkeypatch):
    from charlm.cells.fused import gemm

    monkeypatch.setattr(gemm, "BACKEND", "auto")
    monkeypatch.setattr(gemm, "_winner", {})
    xg, w = torch.zeros(16, 32, 256), torch.zeros(256, 64)  # over the race's floor
    runs = []

    def run(dtype):
        runs.append((dtype, torch.is_grad_enabled()))
        __import__("time").sleep(2e-3 if dtype == torch.bfloat16 else 1e-3)

    with torch.no_grad():  # as under an evaluation: the race still differentiates
        assert gemm.recurrence_precision("rnn", xg, w, run) is None  # fp32 was faster
    assert {d for d, _ in runs} == {torch.bfloat16, None} and all(g for _, g in runs)
    n = len(runs)
    assert gemm.recurrence_precision("rnn", xg, w, run) is None and len(runs) == n  # kept
    small = torch.zeros(2, 2, 8)
    assert gemm.recurrence_precision("rnn", small, w[:8], run) == torch.bfloat16  # floor
    monkeypatch.setattr(gemm, "BACKEND", "onednn")
    assert gemm.recurrence_precision("gru", xg, w, run) == torch.bfloat16  # forced
    monkeypatch.setattr(gemm, "BACKEND", "auto")
    gemm.restore({f"recurrence lstm 16 32 256 64 {torch.get_num_threads()}": "fp32"})
    n = len(runs)
    assert gemm.recurrence_precision("lstm", xg, w, run) is None  # restored: fp32, no race
    assert len(runs) == n


def _swap_gates(layer: nn.Module, k: int) -> None:
    """Exchange gate block 0 with gate block k in every weight and bias: the same layer with
    its gates in a wrong order, a wrong equation."""
    H = layer.hidden_size
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "weight_hr" not in name:
                first = p[:H].clone()
                p[:H] = p[k * H : (k + 1) * H]
                p[k * H : (k + 1) * H] = first


@pytest.mark.parametrize(("kind", "block"), [("lstm", 2), ("gru", 2), ("rnn_tanh", None)])
def test_the_tolerance_catches_a_wrong_equation(kind, block):
    ref, mine = make_pair(kind)
    x = torch.randn(B, T, N_IN, generator=torch.Generator().manual_seed(100))
    if block is None:
        mine.nonlinearity = "relu"  # tanh -> relu
    else:
        _swap_gates(mine, block)  # LSTM: i <-> g, GRU: r <-> n
    assert rel(bf16_run(mine, x)["out"], bf16_run(ref, x)["out"].float()) > 10 * OUT_TOL


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bf16_autocast_is_at_least_as_close_to_float64_as_torch_nn(kind):
    ref, mine = make_pair(kind)
    x = torch.randn(B, T, N_IN, generator=torch.Generator().manual_seed(100))
    ours, theirs = bf16_run(mine, x), bf16_run(ref, x)
    truth = bf16_run(copy.deepcopy(ref).double(), x.double())  # no bf16 in float64
    assert rel(ours["out"], truth["out"]) <= rel(theirs["out"], truth["out"])
    assert rel(split(ours)[1], split(truth)[1]) <= rel(split(theirs)[1], split(truth)[1])


def test_packed_and_bidirectional_layers_under_bf16_autocast():
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    ref = nn.GRU(N_IN, N_H, num_layers=2, bidirectional=True)
    mine = cells.GRU(N_IN, N_H, num_layers=2, bidirectional=True)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, N_IN, generator=torch.Generator().manual_seed(1))
    packed = pack_padded_sequence(x, torch.tensor([7, 5, 3, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (a, ha), (b, hb) = mine(packed), ref(packed)
    assert rel(a.data, b.data.float()) <= OUT_TOL and rel(ha, hb.float()) <= OUT_TOL


# ---------------------------------------------------------------- train, eval, sample


@pytest.mark.parametrize(("native", "want"), [(True, "bf16"), (False, "fp32")])
def test_a_run_records_the_precision_it_resolved(tmp_path, corpus, monkeypatch, native, want):
    monkeypatch.setattr(dev, "bf16_native", lambda device: native)
    runs = tmp_path / "runs"
    over = [*tiny_overrides(corpus, "lstm", steps=10), "train.precision=auto",
            "train.sample_length=0"]
    result = invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "r", *sets(over))
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load((runs / "r" / "config.yaml").read_text())["train"]["precision"] == want


@pytest.mark.parametrize("cell", ["lstm", "transformer"])
def test_eval_and_sample_run_a_bf16_run(tmp_path, corpus, cell, monkeypatch):
    runs = tmp_path / "runs"
    over = [*tiny_overrides(corpus, cell, steps=10), "train.precision=bf16"]
    assert invoke("train", "--config", cell, "--runs-dir", runs, "--name", "r",
                  *sets(over)).exit_code == 0
    entered = []
    real = dev.autocast
    monkeypatch.setattr(dev, "autocast", lambda d, p: entered.append(p) or real(d, p))
    import charlm.evaluate
    import charlm.sample

    monkeypatch.setattr(charlm.evaluate, "autocast", dev.autocast)
    monkeypatch.setattr(charlm.sample, "autocast", dev.autocast)
    scored = invoke("eval", "--run", runs / "r", "--json")
    assert scored.exit_code == 0, scored.stderr
    assert json.loads(scored.stdout)["bpc"] > 0
    sampled = invoke("sample", "--run", runs / "r", "--prime", "the ", "--length", "20",
                     "--seed", "1")
    assert sampled.exit_code == 0 and len(sampled.stdout) == len("the ") + 20 + 1
    assert entered and set(entered) == {"bf16"}  # both ran the model as it was trained


# ---------------------------------------------------------------- bench --precision


def test_bench_precision_parses_and_bad_values_name_the_flag(monkeypatch):
    monkeypatch.setattr(bench_run, "bf16_native", lambda device: True)
    monkeypatch.setattr(dev, "bf16_native", lambda device: True)
    assert bench.bench_precisions("auto", CPU) == (["fp32", "bf16"], "bf16")
    assert bench.bench_precisions("fp32", CPU) == (["fp32"], "fp32")
    assert bench.bench_precisions("bf16", CPU) == (["bf16"], "bf16")
    monkeypatch.setattr(bench_run, "bf16_native", lambda device: False)
    monkeypatch.setattr(dev, "bf16_native", lambda device: False)
    assert bench.bench_precisions("auto", CPU) == (["fp32"], "fp32")
    result = invoke("bench", "--quick", "--device", "cpu", "--precision", "fp16")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: --precision must be auto, fp32 or bf16, got 'fp16'"]


def test_bench_times_both_precisions_in_one_group_and_records_them(monkeypatch):
    monkeypatch.setattr(bench_run, "bf16_native", lambda device: True)
    result = bench.run_bench(CPU, ["lstm"], bench.quick_shape(), repeats=1, steps=1,
                             progress=False, variants=False)
    trains = {c["name"]: c["precision"] for c in result["contenders"] if c["task"] == "train"}
    assert trains == {"charlm-lstm-32": "fp32", "nn-lstm-32": "fp32",
                      "charlm-lstm-32-bf16": "bf16", "nn-lstm-32-bf16": "bf16"}
    ratios = {(r["contender"], r["reference"]) for r in result["ratios"]}
    assert {("charlm-lstm-32-bf16", "nn-lstm-32-bf16"),
            ("charlm-lstm-32-bf16", "charlm-lstm-32"), ("charlm-lstm-32", "nn-lstm-32")} <= ratios
    p = result["precision"]
    assert p["requested"] == "auto" and p["recurrent"] == "fp32+bf16" and p["bf16_native"]
    assert result["device"]["autocast"] == "bf16"
    table = bench.format_table(result)
    assert "both fp32 (no autocast) and both bf16 (autocast)" in table
    assert "charlm bf16 / charlm fp32 (same group): charlm-lstm-32-bf16" in table


def test_bench_times_a_min_cell_in_both_precisions_against_its_classic_cell(monkeypatch):
    monkeypatch.setattr(bench_run, "bf16_native", lambda device: True)
    result = bench.run_bench(CPU, ["mingru"], bench.quick_shape(), repeats=1, steps=1,
                             progress=False, variants=False)
    trains = {c["name"]: c["precision"] for c in result["contenders"] if c["task"] == "train"}
    assert trains == {"mingru-32-nomlp": "fp32", "mingru-32": "fp32", "charlm-gru-32": "fp32",
                      "mingru-32-nomlp-bf16": "bf16", "mingru-32-bf16": "bf16",
                      "charlm-gru-32-bf16": "bf16"}
    ratios = {(r["contender"], r["reference"]) for r in result["ratios"]}
    assert {("mingru-32-nomlp", "charlm-gru-32"), ("mingru-32-nomlp-bf16", "charlm-gru-32-bf16"),
            ("mingru-32-nomlp-bf16", "mingru-32-nomlp"), ("mingru-32-bf16", "mingru-32")} <= ratios
    assert result["precision"]["registry"] == "fp32+bf16"
