"""Tests for charlm.cells.fused.inductor: the compiled RNN, LSTM and GRU step kernels and
the layer paths that use them.

The kernels are compiled for real (Inductor, once per shape; a few seconds the first time,
then from Inductor's disk cache), so the shapes here are few and tiny; ``MIN_NUMEL`` is
lowered to let them qualify. Checked: each compiled kernel against its eager torch-ops
reference (float32 and float64), the LSTM layer on the compiled path against torch.nn
(outputs, states, every gradient), float64 gradcheck through the compiled recurrence, the
eager backward reference, and the fallback when compiling fails or is turned off.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from test_cells import assert_same, initial_state, make_layers

from charlm.cells.fused import bptt, gru_step, inductor, lstm_step, rnn_step

N_IN, N_H, T = 5, 7, 6  # as in test_cells

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="Inductor needs a C++ compiler to build CPU kernels",
)


@pytest.fixture
def compiled(monkeypatch):
    """Let tiny steps qualify for compiled kernels, and report the kernels used."""
    monkeypatch.setattr(inductor, "ENABLED", True)
    monkeypatch.setattr(inductor, "MIN_NUMEL", 0)
    # This file compiles more shapes than one real model would: no cap on their number.
    monkeypatch.setattr(inductor, "_MAX_KERNELS", 10**6)
    used: list[object] = []
    real = inductor.kernel

    def spy(fn, *args, **kw):
        k = real(fn, *args, **kw)
        used.append((fn, k))
        return k

    monkeypatch.setattr(inductor, "kernel", spy)
    return used


# Per step function: the width (in H) of each (B, .) argument, and how many are outputs.
_SHAPES = {
    # lstm_forward: gemm, x, c_prev, then out: 4 gates, c, h; lstm_backward: dh_rec, dh_out,
    # dc, acts, c_prev, c, then out: 4 gate gradients, dc_prev.
    lstm_step.lstm_forward: ([4, 4, 1] + [1] * 6, 6),
    lstm_step.lstm_backward: ([1, 1, 1, 4, 1, 1] + [1] * 5, 5),
    rnn_step.rnn_forward: ([1, 1, 1], 1),
    rnn_step.rnn_forward_relu: ([1, 1, 1], 1),
    rnn_step.rnn_backward: ([1, 1, 1, 1], 1),
    rnn_step.rnn_backward_relu: ([1, 1, 1, 1], 1),
    gru_step.gru_forward: ([3, 3, 1, 1, 1, 1, 1, 1], 5),
    gru_step.gru_backward: ([1, 1, 1, 1, 2, 1, 1] + [1] * 7, 7),
}


def _random_args(fn, B: int, H: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn((B, w * H), generator=g, dtype=dtype) for w in _SHAPES[fn][0]]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fn", list(_SHAPES), ids=lambda f: f.__name__)
def test_compiled_kernel_matches_eager_reference(fn, dtype, compiled):
    args = _random_args(fn, 3, 5, dtype)
    k = inductor.kernel(fn, *args, state=args[-1])  # any (B, H) argument
    assert k is not None, "Inductor did not compile the kernel"
    want = [a.clone() for a in args]
    fn(*want)
    got = [a.clone() for a in args]
    k(*got)
    n_out = _SHAPES[fn][1]
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(got[-n_out:], want[-n_out:], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    for a, b in zip(got[:-n_out], args[:-n_out], strict=True):
        assert torch.equal(a, b)  # inputs untouched


@needs_compiler
@pytest.mark.parametrize("batch_first", [True, False])
def test_compiled_lstm_layer_matches_torch(batch_first, compiled):
    torch.manual_seed(0)
    ref, mine = make_layers("lstm", True, num_layers=2, batch_first=batch_first)
    g = torch.Generator().manual_seed(3)
    B = 4
    x = torch.randn((B, T, N_IN) if batch_first else (T, B, N_IN), generator=g)
    assert_same(ref, mine, x, initial_state("lstm", (2, B, N_H), g))
    assert_same(ref, mine, x, None)
    kinds = {fn for fn, k in compiled if k is not None}
    assert kinds == {lstm_step.lstm_forward, lstm_step.lstm_backward}, "compiled path not taken"


@needs_compiler
def test_compiled_lstm_under_bf16_autocast_matches_the_eager_loop(compiled, monkeypatch):
    """The bf16 kernels (bf16 projection and GEMM output in, float32 states and gates, bf16
    gate gradients out) compute what the eager bf16 loop computes, up to bf16 rounding."""
    torch.manual_seed(0)
    _, mine = make_layers("lstm", True, num_layers=2, batch_first=True)
    x = torch.randn(4, T, N_IN, generator=torch.Generator().manual_seed(5))

    def run() -> list[torch.Tensor]:
        mine.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = mine(xx)
        (out.square().sum() + c.sum()).backward()
        return [out, h, c, xx.grad, *(p.grad for p in mine.parameters())]

    got = run()
    kinds = {fn for fn, k in compiled if k is not None}
    assert kinds == {lstm_step.lstm_forward_mm, lstm_step.lstm_backward}, "bf16 kernels not used"
    monkeypatch.setattr(inductor, "ENABLED", False)
    want = run()
    assert all(t.dtype == torch.float32 for t in got)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3)


@needs_compiler
def test_compiled_lstm_eval_matches_torch(compiled):
    torch.manual_seed(0)
    ref, mine = make_layers("lstm", True, num_layers=2)
    x = torch.randn(T, 3, N_IN)
    with torch.no_grad():
        (o_r, (h_r, c_r)), (o_m, (h_m, c_m)) = ref(x), mine(x)
    for a, b in ((o_m, o_r), (h_m, h_r), (c_m, c_r)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any(k is not None for fn, k in compiled if fn is lstm_step.lstm_forward)


@needs_compiler
def test_gradcheck_compiled_lstm_function(compiled):
    g = torch.Generator().manual_seed(0)

    def f64(*shape):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    Tn, B, Hn = 4, 2, 3
    args = (f64(Tn, B, 4 * Hn), f64(B, Hn), f64(B, Hn), f64(4 * Hn, Hn))
    assert torch.autograd.gradcheck(bptt.LSTMRecurrence.apply, args)
    assert {fn for fn, k in compiled if k is not None} == {
        lstm_step.lstm_forward,
        lstm_step.lstm_backward,
    }


@needs_compiler
def test_eager_backward_reference_matches_torch(compiled, monkeypatch):
    """A compiled forward with the backward step run eagerly (its fallback) is exact too."""
    real = inductor.kernel
    monkeypatch.setattr(
        inductor, "kernel", lambda fn, *a: None if fn is lstm_step.lstm_backward else real(fn, *a)
    )
    torch.manual_seed(0)
    ref, mine = make_layers("lstm", True, num_layers=2, batch_first=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn((4, T, N_IN), generator=g)
    assert_same(ref, mine, x, initial_state("lstm", (2, 4, N_H), g))


def test_failed_compile_warns_once_and_falls_back(monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch._inductor, "standalone_compile", broken, raising=False)
    monkeypatch.setattr(inductor, "_kernels", {})
    monkeypatch.setattr(inductor, "_warned", False)
    monkeypatch.setattr(inductor, "ENABLED", True)
    monkeypatch.setattr(inductor, "MIN_NUMEL", 0)
    torch.manual_seed(0)
    ref, mine = make_layers("lstm", True, num_layers=1)
    x = torch.randn(T, 3, N_IN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same(ref, mine, x, None)
        assert_same(ref, mine, x, None)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "no compiler here" in messages[0] and "second line" not in messages[0]
    assert "CHARLM_COMPILE=0" in messages[0]
    assert all(k is None for k in inductor._kernels.values())


@pytest.mark.parametrize(
    "why",
    ["disabled", "small", "cuda-like"],
)
def test_no_kernel_when_not_worth_it(why, monkeypatch):
    """Off, below MIN_NUMEL, or not on the CPU: no compile is even attempted."""
    monkeypatch.setattr(inductor, "_compile", lambda fn, args: pytest.fail("compiled"))
    monkeypatch.setattr(inductor, "_kernels", {})
    monkeypatch.setattr(inductor, "ENABLED", why != "disabled")
    # Only the "small" case keeps the size threshold, so each case fails on its own reason.
    monkeypatch.setattr(inductor, "MIN_NUMEL", 10**9 if why == "small" else 0)
    args = _random_args(lstm_step.lstm_forward, 2, 3, torch.float32)
    if why == "cuda-like":
        args = [a.to("meta") for a in args]  # any non-CPU device
    assert inductor.kernel(lstm_step.lstm_forward, *args) is None


def test_reference_functions_are_the_lstm_equations():
    """The eager step functions compute torch.nn.LSTMCell's step and its gradient."""
    torch.manual_seed(0)
    B, H = 3, 4
    cell = torch.nn.LSTMCell(H, H, dtype=torch.float64)
    x, h, c = (torch.randn(B, H, dtype=torch.float64) for _ in range(3))
    c.requires_grad_()
    xg = x @ cell.weight_ih.T + cell.bias_ih + cell.bias_hh
    gemm = h @ cell.weight_hh.T
    acts, c_new, h_new = (torch.empty(B, n * H, dtype=torch.float64) for n in (4, 1, 1))
    with torch.no_grad():
        lstm_step.lstm_forward(gemm, xg, c.detach(), *acts.split(H, 1), c_new, h_new)
    h_ref, c_ref = cell(x, (h, c))
    torch.testing.assert_close(h_new, h_ref.detach())
    torch.testing.assert_close(c_new, c_ref.detach())
    # Backward: against autograd through the cell for a random upstream (dh, dc).
    pre = (xg + gemm).detach().requires_grad_()
    i, f, g_, o = pre.chunk(4, 1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g_)
    h2 = torch.sigmoid(o) * torch.tanh(c2)
    dh, dc = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    d_pre, d_c = torch.autograd.grad((h2 * dh).sum() + (c2 * dc).sum(), (pre, c))
    dpre = torch.empty(B, 4 * H, dtype=torch.float64)
    dc_prev = torch.empty(B, H, dtype=torch.float64)
    half = dh / 2  # dh arrives in two parts: through the next step and from the output
    lstm_step.lstm_backward(
        half, dh - half, dc, acts, c.detach(), c_new, *dpre.split(H, 1), dc_prev
    )
    torch.testing.assert_close(dpre, d_pre)
    torch.testing.assert_close(dc_prev, d_c)


@needs_compiler
def test_a_wrong_fast_call_path_is_never_used(compiled, monkeypatch):
    """The direct call into Inductor's generated code is checked like the kernel itself:
    one that does nothing is rejected in favour of the public compiled artifact."""
    monkeypatch.setattr(inductor, "_direct_call", lambda artifact: lambda *a: None)
    monkeypatch.setattr(inductor, "_kernels", {})
    args = _random_args(lstm_step.lstm_backward, 2, 5, torch.float32)
    k = inductor.kernel(lstm_step.lstm_backward, *args)
    assert k is not None
    want = [a.clone() for a in args]
    lstm_step.lstm_backward(*want)
    k(*args)
    torch.testing.assert_close(args[-5:], want[-5:])


def test_old_torch_says_which_version_it_needs(monkeypatch):
    monkeypatch.delattr(torch._inductor, "standalone_compile", raising=False)
    monkeypatch.setattr(inductor, "_kernels", {})
    monkeypatch.setattr(inductor, "_warned", False)
    monkeypatch.setattr(inductor, "MIN_NUMEL", 0)
    args = _random_args(lstm_step.lstm_forward, 2, 3, torch.float32)
    with pytest.warns(RuntimeWarning, match=r"needs torch >= 2\.8"):
        assert inductor.kernel(lstm_step.lstm_forward, *args) is None



# ------------------------------------------------------------------ RNN and GRU kernels

_LAYER_KERNELS = {  # kind -> (fp32 kernels, bf16 kernels) its training step uses
    "rnn_tanh": ({rnn_step.rnn_forward, rnn_step.rnn_backward},
                 {rnn_step.rnn_forward_mm, rnn_step.rnn_backward}),
    "rnn_relu": ({rnn_step.rnn_forward_relu, rnn_step.rnn_backward_relu},
                 {rnn_step.rnn_forward_relu_mm, rnn_step.rnn_backward_relu}),
    "gru": ({gru_step.gru_forward, gru_step.gru_backward},
            {gru_step.gru_forward_mm, gru_step.gru_backward}),
}


@needs_compiler
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", list(_LAYER_KERNELS))
def test_compiled_rnn_gru_layers_match_torch(kind, batch_first, compiled):
    torch.manual_seed(0)
    ref, mine = make_layers(kind, True, num_layers=2, batch_first=batch_first)
    g = torch.Generator().manual_seed(3)
    B = 4
    x = torch.randn((B, T, N_IN) if batch_first else (T, B, N_IN), generator=g)
    assert_same(ref, mine, x, initial_state(kind, (2, B, N_H), g))
    assert_same(ref, mine, x, None)
    kinds = {fn for fn, k in compiled if k is not None}
    assert kinds == _LAYER_KERNELS[kind][0], "compiled path not taken"


@needs_compiler
@pytest.mark.parametrize("kind", list(_LAYER_KERNELS))
def test_compiled_rnn_gru_under_bf16_autocast_match_the_eager_loop(kind, compiled, monkeypatch):
    """The bf16 kernels (bf16 projection and GEMM output in, biases added in float32, float32
    states, bf16 GEMM operands out) compute what the eager bf16 loop computes, up to bf16
    rounding."""
    torch.manual_seed(0)
    _, mine = make_layers(kind, True, num_layers=2, batch_first=True)
    x = torch.randn(4, T, N_IN, generator=torch.Generator().manual_seed(5))

    def run() -> list[torch.Tensor]:
        mine.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, h = mine(xx)
        (out.square().sum() + h.sum()).backward()
        return [out, h, xx.grad, *(p.grad for p in mine.parameters())]

    got = run()
    kinds = {fn for fn, k in compiled if k is not None}
    assert kinds == _LAYER_KERNELS[kind][1], "bf16 kernels not used"
    monkeypatch.setattr(inductor, "ENABLED", False)
    want = run()
    assert all(t.dtype == torch.float32 for t in got)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3)


@needs_compiler
@pytest.mark.parametrize("kind", list(_LAYER_KERNELS))
def test_gradcheck_compiled_rnn_gru_functions(kind, compiled):
    g = torch.Generator().manual_seed(0)

    def f64(*shape):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    Tn, B, Hn = 4, 2, 3
    if kind == "gru":
        args = (f64(Tn, B, 3 * Hn), f64(B, Hn), f64(3 * Hn, Hn), f64(3 * Hn))
        fn = bptt.GRURecurrence.apply
    else:
        relu = kind == "rnn_relu"
        args = (f64(Tn, B, Hn), f64(B, Hn), f64(Hn, Hn))

        def fn(*a):
            return bptt.RNNRecurrence.apply(*a, relu)

    assert torch.autograd.gradcheck(fn, args)
    assert {fn for fn, k in compiled if k is not None} == _LAYER_KERNELS[kind][0]


@needs_compiler
@pytest.mark.parametrize("kind", list(_LAYER_KERNELS))
def test_compiled_rnn_gru_eval_matches_torch(kind, compiled):
    torch.manual_seed(0)
    ref, mine = make_layers(kind, True, num_layers=2)
    x = torch.randn(T, 3, N_IN)
    with torch.no_grad():
        (o_r, h_r), (o_m, h_m) = ref(x), mine(x)
    torch.testing.assert_close(o_m, o_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_m, h_r, atol=1e-5, rtol=1e-5)
    forward = next(iter(f for f in _LAYER_KERNELS[kind][0] if "forward" in f.__name__))
    assert any(k is not None for fn, k in compiled if fn is forward)


def test_reference_functions_are_the_gru_equations():
    """The eager GRU step functions compute torch.nn.GRUCell's step and its gradient."""
    torch.manual_seed(0)
    B, H = 3, 4
    f64 = torch.float64
    cell = torch.nn.GRUCell(H, H, dtype=f64)
    x, h = torch.randn(B, H, dtype=f64), torch.randn(B, H, dtype=f64)
    h.requires_grad_()
    xg = (x @ cell.weight_ih.T + cell.bias_ih).detach()
    gemm = (h @ cell.weight_hh.T + cell.bias_hh).detach().requires_grad_()
    rz, n, hgn, h_new = (torch.empty(B, k * H, dtype=f64) for k in (2, 1, 1, 1))
    with torch.no_grad():
        gru_step.gru_forward(gemm, xg, h.detach(), *rz.split(H, 1), n, hgn, h_new)
    torch.testing.assert_close(h_new, cell(x, h).detach())
    # Backward: against autograd through the step for a random upstream dh.
    xg.requires_grad_()
    r = torch.sigmoid(xg[:, :H] + gemm[:, :H])
    z = torch.sigmoid(xg[:, H : 2 * H] + gemm[:, H : 2 * H])
    n_ = torch.tanh(xg[:, 2 * H :] + r * gemm[:, 2 * H :])
    h2 = n_ + z * (h - n_)
    dh = torch.randn(B, H, dtype=f64)
    d_x, d_gemm, d_h = torch.autograd.grad((h2 * dh).sum(), (xg, gemm, h))
    d_rec, d_xg = torch.empty(B, 3 * H, dtype=f64), torch.empty(B, 3 * H, dtype=f64)
    dh_direct_prev = torch.empty(B, H, dtype=f64)
    third = dh / 3  # dh arrives in three parts: GEMM, direct path, output
    gru_step.gru_backward(
        third, third, dh - 2 * third, h.detach(), rz, n, hgn, *d_rec.split(H, 1),
        *d_xg.split(H, 1), dh_direct_prev,
    )  # fmt: skip
    torch.testing.assert_close(d_xg, d_x)
    torch.testing.assert_close(d_rec, d_gemm)  # [dr, dz, d(hg_n)] = dL/d(gemm)
    # gemm is a leaf here: dL/dh_prev through h' = ... + z h alone, the GEMM's part being
    # d(gemm) W_hh
    torch.testing.assert_close(dh_direct_prev, d_h)


@pytest.mark.parametrize("relu", [False, True])
def test_reference_functions_are_the_rnn_equations(relu):
    """The eager RNN step functions compute torch.nn.RNNCell's step and its gradient."""
    torch.manual_seed(0)
    B, H = 3, 4
    f64 = torch.float64
    cell = torch.nn.RNNCell(H, H, nonlinearity="relu" if relu else "tanh", dtype=f64)
    x, h = torch.randn(B, H, dtype=f64), torch.randn(B, H, dtype=f64)
    xg = (x @ cell.weight_ih.T + cell.bias_ih + cell.bias_hh).detach()
    gemm = (h @ cell.weight_hh.T).detach()
    forward, _, backward = rnn_step.step_functions(relu)
    h_new = torch.empty(B, H, dtype=f64)
    forward(gemm, xg, h_new)
    torch.testing.assert_close(h_new, cell(x, h).detach())
    pre = (xg + gemm).requires_grad_()
    act = torch.relu(pre) if relu else torch.tanh(pre)
    dh = torch.randn(B, H, dtype=f64)
    (want,) = torch.autograd.grad((act * dh).sum(), pre)
    dpre = torch.empty(B, H, dtype=f64)
    backward(dh / 2, dh / 2, h_new, dpre)
    torch.testing.assert_close(dpre, want)
