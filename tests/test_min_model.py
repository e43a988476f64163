"""The minGRU / minLSTM language model (charlm.minlm): the parallel-scan forward equals the
step equations (outputs, states and every gradient), one character at a time equals the
whole sequence, a carried state equals one long window, and long windows stay finite."""

from __future__ import annotations

import pytest
import torch

from charlm.cells import MinGRU, MinLSTM
from charlm.config import load_config
from charlm.minlm import MinLM
from charlm.model import build_model, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = [MinGRU, MinLSTM]


def twins(cls, ff_mult=4, dtype=torch.float32, width=16, layers=2):
    """The same weights twice: one model scans in parallel, the other loops the equations."""
    torch.manual_seed(0)
    fast = MinLM(cls, 11, width, layers, ff_mult).to(dtype)
    slow = MinLM(cls, 11, width, layers, ff_mult).to(dtype)
    slow.load_state_dict(fast.state_dict())
    for block in slow.blocks:
        block.cell.fused = False
    return fast, slow


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("ff_mult", [4, 0])
def test_scan_equals_the_equations_outputs_states_and_gradients(cls, carried, ff_mult):
    fast, slow = twins(cls, ff_mult)
    idx = torch.randint(0, 11, (3, 70))  # > one scan chunk (32 steps)
    state = torch.rand(2, 3, 16) * 2 if carried else None
    results = []
    for model in (fast, slow):
        logits, h = model(idx, state)
        (logits.square().mean() + h.sum()).backward()
        results.append((logits, h, {n: p.grad for n, p in model.named_parameters()}))
    (la, ha, ga), (lb, hb, gb) = results
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-5)
    assert set(ga) == set(gb)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cls", LAYERS)
def test_gradcheck_float64_through_the_model(cls):
    """The scan's gradients (autograd through cumsum and logcumsumexp) against finite
    differences: the initial state and the first block's cell weights."""
    fast, _ = twins(cls, dtype=torch.float64, width=3, layers=2)
    idx = torch.randint(0, 11, (2, 6))
    h0 = torch.rand(2, 2, 3, dtype=torch.float64, requires_grad=True)
    cell = {n: p.detach().clone().requires_grad_() for n, p in fast.named_parameters()
            if n.startswith("blocks.0.cell.")}

    def logits(h, *weights):
        return torch.func.functional_call(fast, dict(zip(cell, weights, strict=True)), (idx, h))[0]

    assert torch.autograd.gradcheck(logits, (h0, *cell.values()))


@pytest.mark.parametrize("cls", LAYERS)
def test_one_character_at_a_time_equals_the_whole_sequence(cls):
    fast, _ = twins(cls)
    fast.eval()
    idx = torch.randint(0, 11, (2, 40))
    with torch.no_grad():
        whole, h_whole = fast(idx)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = fast(idx[:, t : t + 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, h_whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", LAYERS)
def test_a_carried_state_equals_one_long_window(cls):
    fast, _ = twins(cls)
    idx = torch.randint(0, 11, (2, 90))
    with torch.no_grad():
        whole, h_whole = fast(idx)
        first, h = fast(idx[:, :50])
        second, h = fast(idx[:, 50:], h)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", LAYERS)
def test_long_windows_stay_finite_and_match_the_equations(cls):
    fast, slow = twins(cls, width=8)
    for model in (fast, slow):  # large weights: gates saturate, candidates grow
        with torch.no_grad():
            for block in model.blocks:
                block.cell.weight.mul_(8)
    idx = torch.randint(0, 11, (1, 4096))
    with torch.no_grad():
        (la, ha), (lb, hb) = fast(idx), slow(idx)
    assert torch.isfinite(la).all() and torch.isfinite(ha).all()
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ha, hb, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", LAYERS)
def test_trace_is_the_forward_and_its_gates_are_gates(cls):
    fast, _ = twins(cls)
    fast.eval()
    idx = torch.randint(0, 11, (2, 20))
    with torch.no_grad():
        logits, h = fast(idx)
        t_logits, t_h, trace = fast.trace(idx)
    torch.testing.assert_close(t_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_h, h, atol=1e-5, rtol=1e-5)
    kinds = fast.trace_kinds()
    assert set(kinds) == {name.split(".")[1] for name in trace}
    for name, values in trace.items():
        assert values.shape == (2, 20, 16)
        if kinds[name.split(".")[1]] == "gate":
            assert values.min() >= 0 and values.max() <= 1
    assert (trace["l0.h"] > 0).all()  # g keeps h positive (h0 = 0)
    if cls is MinLSTM:  # the normalised gates sum to one
        torch.testing.assert_close(trace["l1.f"] + trace["l1.i"], torch.ones(2, 20, 16))


@pytest.mark.parametrize("cell, cls", [("mingru", MinGRU), ("minlstm", MinLSTM)])
def test_presets_build_the_papers_blocks(cell, cls):
    cfg = load_config(cell)
    model = build_model(cfg, 65)
    assert isinstance(model, MinLM) and len(model.blocks) == cfg.model.num_layers
    assert all(isinstance(b.cell, cls) for b in model.blocks)
    H, ff = cfg.model.hidden_size, cfg.model.ff_mult
    chunks = 2 if cls is MinGRU else 3
    per_block = chunks * H * (H + 1) + 2 * ff * H * H + ff * H + H + 4 * H
    embed, final_norm, head = 65 * H, 2 * H, 65 * (H + 1)
    assert count_parameters(model) == embed + cfg.model.num_layers * per_block + final_norm + head
