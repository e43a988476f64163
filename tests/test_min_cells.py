"""minGRU and minLSTM: both parallel scans (cyclic reduction, which training uses, and the
paper's log-space scan) against the step equations (outputs and
every gradient to 1e-5 in float32, float64 gradcheck), from zero and from a carried state,
on long sequences (T = 4,096) without overflow, and step-by-step sampling against the
full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from charlm.cells.fused import min_scan
from charlm.cells.minimal import MinGRU, MinLSTM

LAYERS = [MinGRU, MinLSTM]
LOG_SCANS = {MinGRU: min_scan.min_gru_log_scan, MinLSTM: min_scan.min_lstm_log_scan}
SCANS = ["linear", "log"]


@pytest.fixture(params=SCANS)
def scan(request, monkeypatch):
    """Run the layers on each scan: "linear" (the default) or the paper's "log"."""
    if request.param == "log":
        for cls, fn in LOG_SCANS.items():
            monkeypatch.setattr(cls, "_scan", staticmethod(fn))
    return request.param


def pair(cls, n_in=5, n_h=7, **kw):
    torch.manual_seed(0)
    fast = cls(n_in, n_h, fused=True, **kw)
    loop = cls(n_in, n_h, fused=False, **kw)
    loop.load_state_dict(fast.state_dict())
    return fast, loop


def run(layer, x, h0):
    x = x.clone().requires_grad_()
    h0 = None if h0 is None else h0.clone().requires_grad_()
    out, h_n = layer(x, h0)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    ((out * w).sum() + h_n.square().sum()).backward()
    grads = [x.grad] + ([h0.grad] if h0 is not None else []) + [
        p.grad for p in layer.parameters()]
    return out, h_n, grads


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [2, 9, 64, 100])
def test_scan_equals_the_step_equations(cls, carried, bias, T, monkeypatch, scan):
    monkeypatch.setattr(min_scan, "CHUNK", 16)  # T = 64: four chunks, each carrying its state
    fast, loop = pair(cls, bias=bias)
    x = torch.randn(T, 3, 5)
    h0 = torch.rand(3, 7) if carried else None
    a, b = run(fast, x, h0), run(loop, x, h0)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
    # Gradients: 1e-5 of each gradient's scale (they reach ~10 here; float32 sums of a few
    # hundred terms each, in a different order, differ by that much in either path).
    for ga, gb in zip(a[2], b[2], strict=True):
        scale = float(gb.abs().max().clamp_min(1.0))
        torch.testing.assert_close(ga, gb, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("scan", [min_scan.min_gru_scan, min_scan.min_lstm_scan,
                                  min_scan.min_gru_log_scan, min_scan.min_lstm_log_scan])
def test_gradcheck_float64(scan, monkeypatch):
    monkeypatch.setattr(min_scan, "CHUNK", 3)  # two chunks and a remainder
    g = torch.Generator().manual_seed(0)
    chunks = 2 if scan in (min_scan.min_gru_scan, min_scan.min_gru_log_scan) else 3
    pre = torch.randn(7, 2, chunks * 3, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scan, (pre, h0))
    assert torch.autograd.gradcheck(lambda p: scan(p, None), (pre,))


@pytest.mark.parametrize("cls", LAYERS)
def test_long_sequences_stay_finite_and_close(cls, scan):
    """T = 4,096: no overflow or NaN in the outputs or the gradients, and the scan stays on
    the step equations (float32 rounding over 4,096 steps: 1e-4 relative)."""
    fast, loop = pair(cls, n_in=4, n_h=8)
    x = torch.randn(4096, 2, 4) * 3
    a, _ = fast(x)
    a.sum().backward()
    assert torch.isfinite(a).all()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())
    with torch.no_grad():
        b, _ = loop(x)
    torch.testing.assert_close(a.detach(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", LAYERS)
def test_one_step_at_a_time_equals_the_sequence(cls):
    fast, _ = pair(cls, batch_first=True)
    x = torch.randn(2, 12, 5)
    with torch.no_grad():
        full, h_n = fast(x)
        h = None
        for t in range(12):
            h = fast.step(x[:, t], h)
            torch.testing.assert_close(h, full[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_n, atol=1e-5, rtol=1e-5)
