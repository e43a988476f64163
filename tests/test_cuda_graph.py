"""charlm.cells.fused.cuda_graph on the CPU: everything around the CUDA graph itself.

The capture (torch.cuda.make_graphed_callables) needs a GPU; here it is stubbed by a "graph"
that runs the captured function, and the device check accepts the CPU. Checked: the graphed
path gives the eager path's outputs, states and gradients for every cell, with one graph per
layer and weights entering as copies; what is not eligible (no gradient, packed input,
graphs off, not CUDA) never asks for a graph; a failed capture and a graph that disagrees
with eager both warn once and leave that key eager; a graph whose backward is still pending
is not replayed; keys separate shapes, and the number of graphs is capped.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from charlm import cells
from charlm.cells.fused import cuda_graph

LAYERS = {"rnn": cells.RNN, "lstm": cells.LSTM, "gru": cells.GRU}
REAL_DEVICE_OK = cuda_graph._device_ok


def _replaying(flat):
    """A stand-in graph: calls ``flat`` as a replay would, without re-entering run()."""

    def call(*args):
        was = getattr(cuda_graph._capturing, "on", False)
        cuda_graph._capturing.on = True
        try:
            return flat(*args)
        finally:
            cuda_graph._capturing.on = was

    return call


@pytest.fixture
def graphs(monkeypatch):
    """Graphs on, the CPU accepted, captures stubbed; yields the samples each capture got."""
    captured = []

    def capture(flat, sample):
        captured.append(sample)
        return _replaying(flat)

    monkeypatch.setattr(cuda_graph, "ENABLED", True)
    monkeypatch.setattr(cuda_graph, "_device_ok", lambda x: True)
    monkeypatch.setattr(cuda_graph, "_capture", capture)
    monkeypatch.setattr(cuda_graph, "_warned", False)
    cuda_graph.clear()
    yield captured
    cuda_graph.clear()


def _layer(kind, **kw):
    torch.manual_seed(0)
    return LAYERS[kind](5, 7, num_layers=2, **kw)


def _train_pass(layer, x):
    x = x.clone().requires_grad_()
    out, states = layer(x)
    states = states if isinstance(states, tuple) else (states,)
    loss = (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum()
    (loss + sum(s.square().sum() for s in states)).backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return [out.detach(), *(s.detach() for s in states), *grads]


@pytest.mark.parametrize("kind", list(LAYERS))
def test_graphed_layers_equal_the_eager_path(kind, graphs, monkeypatch):
    layer = _layer(kind)
    x = torch.randn(6, 3, 5)
    uses = cuda_graph.uses
    got = [_train_pass(layer, x) for _ in range(2)]
    assert cuda_graph.uses == uses + 4  # two layers, twice: the second call replays
    assert len(graphs) == 2  # one capture per layer
    params = {p.data_ptr() for p in layer.parameters()}
    assert not any(t.data_ptr() in params for sample in graphs for t in sample)  # copies
    monkeypatch.setattr(cuda_graph, "ENABLED", False)
    want = _train_pass(layer, x)
    for run in got:
        for a, b in zip(run, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_only_dense_training_with_gradients_asks_for_a_graph(graphs, monkeypatch):
    layer = _layer("lstm")
    x = torch.randn(6, 3, 5)
    uses = cuda_graph.uses
    with torch.no_grad():
        layer(x)  # evaluation
    packed = pack_padded_sequence(x.clone().requires_grad_(), torch.tensor([6, 4, 2]))
    layer(packed)[0].data.sum().backward()
    monkeypatch.setattr(cuda_graph, "ENABLED", False)
    _train_pass(layer, x)
    monkeypatch.setattr(cuda_graph, "ENABLED", True)
    monkeypatch.setattr(cuda_graph, "_device_ok", REAL_DEVICE_OK)
    _train_pass(layer, x)  # the CPU itself
    assert cuda_graph.uses == uses and not graphs


@pytest.mark.parametrize("how", ["capture fails", "graph disagrees"])
def test_a_bad_graph_warns_once_and_the_eager_path_runs(how, graphs, monkeypatch):
    def failing(flat, sample):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    def wrong(flat, sample):
        call = _replaying(flat)
        return lambda *a: tuple(o * 1.01 for o in call(*a))

    monkeypatch.setattr(cuda_graph, "_capture", failing if how == "capture fails" else wrong)
    layer = _layer("gru")
    x = torch.randn(6, 3, 5)
    uses = cuda_graph.uses
    with pytest.warns(RuntimeWarning, match="could not use a CUDA graph") as record:
        got = _train_pass(layer, x)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_pass(layer, x)  # no second warning, and no second try
    assert cuda_graph.uses == uses
    monkeypatch.setattr(cuda_graph, "ENABLED", False)
    for a, b in zip(got, _train_pass(layer, x), strict=True):
        torch.testing.assert_close(a, b)


def test_a_graph_waiting_for_its_backward_is_not_replayed(graphs, monkeypatch):
    layer = _layer("rnn", batch_first=True)
    x = torch.randn(3, 6, 5)
    uses = cuda_graph.uses
    first = layer(x)[0]
    second = layer(x)[0]  # the graphs of both layers are busy: eager
    assert cuda_graph.uses == uses + 2
    (first.sum() + 2 * second.sum()).backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    layer(x)[0].sum().backward()
    assert cuda_graph.uses == uses + 4  # free again after the backward
    monkeypatch.setattr(cuda_graph, "ENABLED", False)
    layer.zero_grad(set_to_none=True)
    (3 * layer(x)[0].sum()).backward()
    for a, p in zip(got, layer.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_keys_separate_shapes_and_the_number_of_graphs_is_capped(graphs, monkeypatch):
    layer = _layer("lstm")
    for T in (6, 6, 7):
        _train_pass(layer, torch.randn(T, 3, 5))
    assert len(graphs) == 4  # two layers x two shapes
    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 4)
    uses = cuda_graph.uses
    _train_pass(layer, torch.randn(8, 3, 5))  # a third shape: over the cap, eager
    assert len(graphs) == 4 and cuda_graph.uses == uses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_real_cuda_graphs_equal_the_eager_path_on_a_gpu(kind, monkeypatch):
    """On a GPU: the real capture is used (no fallback warning) and matches eager."""
    monkeypatch.setattr(cuda_graph, "ENABLED", True)
    monkeypatch.setattr(cuda_graph, "_warned", False)
    cuda_graph.clear()
    layer = _layer(kind).cuda()
    x = torch.randn(6, 3, 5, device="cuda")
    uses = cuda_graph.uses
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = [_train_pass(layer, x) for _ in range(2)]
    assert cuda_graph.uses == uses + 4
    monkeypatch.setattr(cuda_graph, "ENABLED", False)
    want = _train_pass(layer, x)
    for run in got:
        for a, b in zip(run, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    cuda_graph.clear()
