"""minGRU and minLSTM: both parallel scans (cyclic reduction, which training uses, and the
paper's log-space scan) against the step equations (outputs and
every gradient to 1e-5 in float32, float64 gradcheck), from zero and from a carried state,
on long sequences (T = 4,096) without overflow, and step-by-step sampling against the
full-sequence forward."""

from __future__ import annotations

import shutil

import pytest
import torch

from charlm.cells.equations import min_gru_step, min_lstm_step
from charlm.cells.fused import inductor, min_scan
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


def loop_recurrence(a, b, reverse=False):
    """h_t = a_t h_{t-1} + b_t (or d_t = a_{t+1} d_{t+1} + b_t backwards), step by step."""
    out, h = torch.empty_like(b), torch.zeros_like(b[0])
    steps = range(a.shape[0] - 1, -1, -1) if reverse else range(a.shape[0])
    for t in steps:
        if reverse:
            h = b[t] + (a[t + 1] * h if t + 1 < a.shape[0] else 0)
        else:
            h = a[t] * h + b[t]
        out[t] = h
    return out


@pytest.mark.parametrize("T", list(range(1, 18)) + [64, 100])
@pytest.mark.parametrize("batch_major", [False, True])
def test_recurrences_equal_the_loop(T, batch_major):
    """Cyclic reduction, forwards and backwards in time, on every T's parity pattern, into a
    time-major buffer or a (T, B) view of batch-major memory."""
    g = torch.Generator().manual_seed(T)
    a, b = torch.rand(T, 3, 4, generator=g), torch.randn(T, 3, 4, generator=g)
    out = torch.empty(3, T, 4).transpose(0, 1) if batch_major else torch.empty(T, 3, 4)
    got = min_scan.linear_recurrence(a, b, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, loop_recurrence(a, b), atol=1e-6, rtol=1e-5)
    got = min_scan.reverse_linear_recurrence(a, b, out)
    torch.testing.assert_close(got, loop_recurrence(a, b, reverse=True), atol=1e-6, rtol=1e-5)


POINTWISE = [(min_scan.min_gru_coefficients, min_scan.min_gru_gradients, 2),
             (min_scan.min_lstm_coefficients, min_scan.min_lstm_gradients, 3)]


@pytest.mark.parametrize(("coefficients", "gradients", "chunks"), POINTWISE)
def test_pointwise_passes_are_the_equations_and_their_gradient(coefficients, gradients, chunks):
    """a_t h_{t-1} + b_t from the coefficient pass is the step equation; the gradient pass is
    autograd's gradient of it, given dL/dh_t and h_{t-1} (both sides of g's kink at 0)."""
    g = torch.Generator().manual_seed(0)
    T, B, H = 5, 3, 4
    pre = torch.randn(T, B, chunks * H, generator=g, dtype=torch.float64) * 3
    h_prev = torch.rand(T, B, H, generator=g, dtype=torch.float64)
    dh = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    a, b = torch.empty_like(h_prev), torch.empty_like(h_prev)
    coefficients(pre, a, b)
    step = min_gru_step if chunks == 2 else min_lstm_step
    eye = torch.eye(chunks * H, dtype=torch.float64)  # pre as the step's x, identity W
    want = torch.stack([step(pre[t], h_prev[t], eye, None) for t in range(T)])
    torch.testing.assert_close(a * h_prev + b, want)

    pre_ = pre.clone().requires_grad_()
    a_, b_ = torch.empty_like(h_prev), torch.empty_like(h_prev)
    coefficients(pre_, a_, b_)  # copy_ into a_, b_ is differentiable
    (want_grad,) = torch.autograd.grad(a_ * h_prev + b_, pre_, dh)
    dpre = torch.empty_like(pre)
    gradients(pre, dh, h_prev, *dpre.split(H, dim=-1))
    torch.testing.assert_close(dpre, want_grad)


needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="Inductor needs a C++ compiler to build CPU kernels")


@needs_compiler
@pytest.mark.parametrize("cls", LAYERS)
def test_compiled_passes_equal_the_step_equations(cls, monkeypatch):
    """The pointwise passes compiled by Inductor (as on a real-sized batch: MIN_NUMEL
    lowered so a tiny one qualifies), batch_first with a carried state: the step loop's
    outputs and gradients, and a kernel was really used (forward and backward)."""
    monkeypatch.setattr(inductor, "ENABLED", True)
    monkeypatch.setattr(inductor, "MIN_NUMEL", 0)
    monkeypatch.setattr(inductor, "_MAX_KERNELS", 10**6)  # the suite compiles many shapes
    fast, loop = pair(cls, batch_first=True)
    x, h0 = torch.randn(3, 9, 5), torch.rand(3, 7)
    uses = inductor.uses
    a, b = run(fast, x, h0), run(loop, x, h0)
    assert inductor.uses == uses + 2
    for got, want in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
