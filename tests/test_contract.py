"""The torch.nn contract of charlm.cells: RNN, LSTM and GRU as drop-in twins of torch.nn's.

Every option torch.nn's layers take is checked here against torch.nn itself, alone and in
combination: bias, batch_first, bidirectional, proj_size (LSTM), num_layers, dropout (in
eval mode), unbatched input, a given or default initial state, and PackedSequence input
(sorted, unsorted, from padded tensors or a list). For each, both the fused path and the
plain autograd loop (``fused=False``) must give torch.nn's outputs, final states and the
gradients of the input, the initial state and every parameter (float32, atol/rtol 1e-5).
Also: the same seed gives the same init, state dicts load both ways, float64 gradcheck,
and every constructor argument and forward input torch.nn rejects is rejected with the
same exception type (torch's behaviour is read at test time, not written down here).
Sizes are tiny and seeds fixed, so the file runs in seconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

from charlm import cells

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
FUSED = [pytest.param(True, id="fused"), pytest.param(False, id="loop")]
N_IN, N_H, N_PROJ = 3, 4, 2  # input size, hidden size, LSTM projection size
ATOL = RTOL = 1e-5


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def layer_class(kind: str) -> tuple[str, dict]:
    """The class name for a kind, and the extra constructor keywords it needs."""
    if kind.startswith("rnn"):
        return "RNN", {"nonlinearity": kind.split("_")[1]}
    return kind.upper(), {}


def make_pair(
    kind: str, fused: bool = True, input_size: int = N_IN, hidden_size: int = N_H, **kw
) -> tuple[nn.Module, nn.Module]:
    """torch.nn's layer and charlm's twin, holding torch.nn's weights."""
    name, extra = layer_class(kind)
    with warnings.catch_warnings():  # dropout with one layer warns, in both
        warnings.simplefilter("ignore")
        ref = getattr(nn, name)(input_size, hidden_size, **extra, **kw)
        mine = getattr(cells, name)(input_size, hidden_size, **extra, fused=fused, **kw)
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine


def state_shapes(layer: dict, batch: int | None, hidden_size: int = N_H) -> list[tuple]:
    """Shapes of (h_0,) or (h_0, c_0) for a layer built with ``layer`` keywords."""
    lead = layer.get("num_layers", 1) * (2 if layer.get("bidirectional") else 1)
    lead_shape = (lead,) if batch is None else (lead, batch)
    h_size = layer.get("proj_size", 0) or hidden_size
    return [(*lead_shape, h_size), (*lead_shape, hidden_size)]


def initial_state(
    kind: str, layer: dict, batch: int | None, g: torch.Generator, hidden_size: int = N_H
):
    """A random h_0 (or (h_0, c_0) for the LSTM) for a layer built with ``layer``."""
    h_shape, c_shape = state_shapes(layer, batch, hidden_size)
    h = torch.randn(h_shape, generator=g)
    return (h, torch.randn(c_shape, generator=g)) if kind == "lstm" else h


def as_states(kind: str, state) -> tuple[torch.Tensor, ...]:
    """(h_n,) or (h_n, c_n) from what forward returned as its second value."""
    return tuple(state) if kind == "lstm" else (state,)


def forward_backward(
    module: nn.Module, x: torch.Tensor, hx, to_input: Callable | None = None
) -> tuple[object, tuple[torch.Tensor, ...], dict[str, torch.Tensor | None]]:
    """Forward on fresh leaf copies of x / hx (``to_input`` turns x into the module's input,
    e.g. packs it), backward a fixed random projection of the output and every final
    state; return (output, final states, {name: grad}) for x, hx and every parameter."""
    x = x.detach().clone().requires_grad_()
    leaves = {"input": x}
    if isinstance(hx, tuple):
        hx = tuple(h.detach().clone().requires_grad_() for h in hx)
        leaves.update(h_0=hx[0], c_0=hx[1])
    elif hx is not None:
        hx = hx.detach().clone().requires_grad_()
        leaves["h_0"] = hx
    module.zero_grad(set_to_none=True)
    inp = x if to_input is None else to_input(x)
    out, state = module(inp) if hx is None else module(inp, hx)
    states = state if isinstance(state, tuple) else (state,)
    g = torch.Generator().manual_seed(1234)
    out_data = out.data if isinstance(out, PackedSequence) else out
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in (out_data, *states))
    loss.backward()
    grads = {f"grad {k}": v.grad for k, v in leaves.items()}
    grads.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return out, states, grads


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, exact: bool = False) -> None:
    tol = 0.0 if exact else ATOL
    torch.testing.assert_close(
        actual, expected, atol=tol, rtol=tol if exact else RTOL, msg=lambda m: f"{what}: {m}"
    )


def assert_same_outputs(out_m, states_m, out_r, states_r) -> None:
    """Output (a tensor, or a PackedSequence with the same indices) and final states."""
    if isinstance(out_r, PackedSequence):
        assert isinstance(out_m, PackedSequence), f"expected a PackedSequence, got {type(out_m)}"
        close(out_m.data, out_r.data, "output.data")
        close(out_m.batch_sizes, out_r.batch_sizes, "output.batch_sizes", exact=True)
        for name in ("sorted_indices", "unsorted_indices"):
            a, b = getattr(out_m, name), getattr(out_r, name)
            if b is None:
                assert a is None, f"output.{name}: expected None, got {a}"
            else:
                assert a is not None, f"output.{name}: expected {b}, got None"
                close(a, b, f"output.{name}", exact=True)
    else:
        assert isinstance(out_m, torch.Tensor) and not isinstance(out_m, PackedSequence)
        close(out_m, out_r, "output")
    assert len(states_m) == len(states_r), "number of final states"
    for name, a, b in zip(("h_n", "c_n"), states_m, states_r, strict=False):
        close(a, b, name)


def assert_parity(ref, mine, x, hx, to_input: Callable | None = None) -> None:
    """Outputs, final states and all gradients of the two modules agree."""
    out_r, states_r, grads_r = forward_backward(ref, x, hx, to_input)
    out_m, states_m, grads_m = forward_backward(mine, x, hx, to_input)
    assert_same_outputs(out_m, states_m, out_r, states_r)
    assert list(grads_m) == list(grads_r)
    for name, gr in grads_r.items():
        assert gr is not None, f"test setup: torch.nn gives no {name}"
        assert grads_m[name] is not None, f"charlm gives no {name}"
        close(grads_m[name], gr, name)


def outcome(factory: Callable[[], object]) -> type[BaseException] | None:
    """The type of the exception ``factory()`` raises, or None if it returns."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            factory()
    except Exception as exc:  # whatever torch raises is what charlm must raise
        return type(exc)
    return None


def assert_same_outcome(make_ref: Callable[[], object], make_mine: Callable[[], object]) -> None:
    """charlm raises what torch.nn raises (the same type or a subclass), or both succeed."""
    expected = outcome(make_ref)
    got = outcome(make_mine)
    if expected is None:
        assert got is None, f"torch.nn accepts this; charlm raised {got.__name__}"
    else:
        assert got is not None, f"torch.nn raises {expected.__name__}; charlm accepted it"
        assert issubclass(got, expected), (
            f"torch.nn raises {expected.__name__}; charlm raised {got.__name__}"
        )


# ---------------------------------------------------------------------------------------
# Dense (padded) input: every option alone and in combination
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    layer: dict = field(default_factory=dict)  # constructor keywords
    batch: int | None = 3  # None: one unbatched (T, I) sequence with (L*D, H) states
    seq_len: int = 4
    with_hx: bool = False
    eval: bool = False  # dropout > 0 is deterministic only in eval mode


BIDIR = {"bidirectional": True}

CASES = [
    pytest.param(Case(), id="defaults"),
    pytest.param(Case(with_hx=True), id="hx"),
    pytest.param(Case({"bias": False}, with_hx=True), id="no_bias-hx"),
    pytest.param(Case({"batch_first": True}, batch=2, with_hx=True), id="batch_first-hx"),
    pytest.param(Case({"num_layers": 3}, seq_len=3, with_hx=True), id="layers3-hx"),
    pytest.param(Case(BIDIR), id="bidir"),
    pytest.param(Case(BIDIR, batch=1, with_hx=True), id="bidir-batch1-hx"),
    pytest.param(Case(BIDIR, seq_len=1, with_hx=True), id="bidir-seq1-hx"),
    pytest.param(Case({**BIDIR, "num_layers": 2}, with_hx=True), id="bidir-layers2-hx"),
    pytest.param(
        Case(
            {**BIDIR, "num_layers": 3, "batch_first": True, "bias": False}, seq_len=5, with_hx=True
        ),
        id="bidir-layers3-batch_first-no_bias-hx",
    ),
    pytest.param(Case({"num_layers": 2}, batch=None, with_hx=True), id="unbatched-layers2-hx"),
    pytest.param(Case(BIDIR, batch=None), id="unbatched-bidir"),
    pytest.param(
        Case({**BIDIR, "num_layers": 2, "batch_first": True}, batch=None, with_hx=True),
        id="unbatched-bidir-layers2-batch_first-hx",
    ),
    pytest.param(
        Case({**BIDIR, "num_layers": 3, "dropout": 0.5}, eval=True),
        id="bidir-layers3-dropout-eval",
    ),
    pytest.param(
        Case({"num_layers": 2, "dropout": 1.0}, batch=2, with_hx=True, eval=True),
        id="layers2-dropout1-eval-hx",
    ),
]

PROJ = {"proj_size": N_PROJ}

PROJ_CASES = [
    pytest.param(Case(PROJ), id="proj"),
    pytest.param(Case(PROJ, with_hx=True), id="proj-hx"),
    pytest.param(Case(PROJ, seq_len=1, batch=1, with_hx=True), id="proj-seq1-batch1-hx"),
    pytest.param(
        Case({**PROJ, **BIDIR, "num_layers": 2}, with_hx=True), id="proj-bidir-layers2-hx"
    ),
    pytest.param(
        Case({**PROJ, "num_layers": 2, "bias": False, "batch_first": True}, batch=2),
        id="proj-layers2-no_bias-batch_first",
    ),
    pytest.param(Case({**PROJ, **BIDIR}, batch=None, with_hx=True), id="proj-unbatched-bidir-hx"),
    pytest.param(
        Case(
            {**PROJ, **BIDIR, "num_layers": 3, "dropout": 0.5}, seq_len=3, with_hx=True, eval=True
        ),
        id="proj-bidir-layers3-dropout-eval-hx",
    ),
]


def check_case(kind: str, fused: bool, case: Case) -> None:
    torch.manual_seed(0)
    ref, mine = make_pair(kind, fused, **case.layer)
    if case.eval:
        ref.eval()
        mine.eval()
    g = torch.Generator().manual_seed(1)
    T, B = case.seq_len, case.batch
    if B is None:
        shape = (T, N_IN)
    else:
        shape = (B, T, N_IN) if case.layer.get("batch_first") else (T, B, N_IN)
    x = torch.randn(shape, generator=g)
    hx = initial_state(kind, case.layer, B, g) if case.with_hx else None
    assert_parity(ref, mine, x, hx)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_torch(kind, fused, case):
    check_case(kind, fused, case)


@pytest.mark.parametrize("case", PROJ_CASES)
@pytest.mark.parametrize("fused", FUSED)
def test_lstm_projection_matches_torch(fused, case):
    check_case("lstm", fused, case)


# ---------------------------------------------------------------------------------------
# PackedSequence input
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    lengths: tuple[int, ...]  # one per sequence, in the caller's (unsorted) order
    how: str = "padded"  # "padded": pack_padded_sequence; "list": pack_sequence
    enforce_sorted: bool = False
    with_hx: bool = True
    layer: dict = field(default_factory=dict)  # constructor keywords (batch_first too)
    eval: bool = False


PACKED_CASES = [
    pytest.param(Packed((4, 3, 1), enforce_sorted=True), id="padded-sorted-hx"),
    pytest.param(Packed((4, 2, 2), enforce_sorted=True, with_hx=False), id="padded-sorted"),
    pytest.param(Packed((2, 4, 3)), id="padded-unsorted-hx"),
    pytest.param(
        Packed((3, 1, 4), layer={**BIDIR, "batch_first": True}),
        id="padded-unsorted-batch_first-bidir-hx",
    ),
    pytest.param(
        Packed((1, 4, 2), layer={**BIDIR, "num_layers": 2}), id="padded-unsorted-bidir-layers2-hx"
    ),
    pytest.param(
        Packed((3, 4, 3, 1), with_hx=False, layer={**BIDIR, "bias": False}),
        id="padded-unsorted-ties-bidir-no_bias",
    ),
    pytest.param(Packed((3, 3), layer=BIDIR), id="padded-unsorted-equal_lengths-bidir-hx"),
    pytest.param(Packed((2, 4, 3), how="list"), id="list-unsorted-hx"),
    pytest.param(
        Packed((3, 1, 3), how="list", layer={**BIDIR, "num_layers": 2}),
        id="list-unsorted-bidir-layers2-hx",
    ),
    pytest.param(
        Packed((4,), how="list", enforce_sorted=True, layer=BIDIR), id="list-sorted-batch1-bidir-hx"
    ),
    pytest.param(
        Packed((2, 4, 1), layer={**BIDIR, "num_layers": 3, "dropout": 0.5}, eval=True),
        id="padded-unsorted-bidir-layers3-dropout-eval-hx",
    ),
]

PACKED_PROJ_CASES = [
    pytest.param(
        Packed((2, 4, 3), layer={**PROJ, **BIDIR, "num_layers": 2}),
        id="proj-padded-unsorted-bidir-layers2-hx",
    ),
    pytest.param(
        Packed((1, 3, 2), how="list", layer={**PROJ, "bias": False}),
        id="proj-list-unsorted-no_bias-hx",
    ),
    pytest.param(
        Packed((4, 2, 1), enforce_sorted=True, with_hx=False, layer={**PROJ, "batch_first": True}),
        id="proj-padded-sorted-batch_first",
    ),
]


def packer(case: Packed) -> Callable[[torch.Tensor], PackedSequence]:
    """Turns the padded leaf x ((T, B, I), or (B, T, I) if batch_first) into the packed
    input, differentiably, so gradients reach x."""
    batch_first = case.layer.get("batch_first", False)
    if case.how == "padded":
        lengths = torch.tensor(case.lengths)
        return lambda x: pack_padded_sequence(
            x, lengths, batch_first=batch_first, enforce_sorted=case.enforce_sorted
        )

    def from_list(x: torch.Tensor) -> PackedSequence:
        seqs = [
            x[b, :n] if batch_first else x[:n, b] for b, n in enumerate(case.lengths)
        ]  # each (n, I)
        return pack_sequence(seqs, enforce_sorted=case.enforce_sorted)

    return from_list


def padded_input(case: Packed, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Random padded input; the padding is random too, so any leak of it shows."""
    T, B = max(case.lengths), len(case.lengths)
    shape = (B, T, N_IN) if case.layer.get("batch_first") else (T, B, N_IN)
    return torch.randn(shape, generator=g, dtype=dtype)


def check_packed(kind: str, fused: bool, case: Packed) -> None:
    torch.manual_seed(0)
    ref, mine = make_pair(kind, fused, **case.layer)
    if case.eval:
        ref.eval()
        mine.eval()
    g = torch.Generator().manual_seed(2)
    x = padded_input(case, g)
    # hx is in the caller's batch order; torch.nn permutes it by sorted_indices, and h_n
    # comes back in the caller's order, each sequence's state at its own last step.
    hx = initial_state(kind, case.layer, len(case.lengths), g) if case.with_hx else None
    assert_parity(ref, mine, x, hx, to_input=packer(case))


@pytest.mark.parametrize("case", PACKED_CASES)
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_input_matches_torch(kind, fused, case):
    check_packed(kind, fused, case)


@pytest.mark.parametrize("backend", ["onednn", "torch", "mkl"])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_input_matches_torch_on_each_gemm_backend(kind, backend, monkeypatch):
    """A packed batch's shrinking steps on every GEMM backend (MKL's packing is for the
    full row count: shorter steps must not use it)."""
    from charlm.cells.fused import gemm

    monkeypatch.setattr(gemm, "BACKEND", backend)
    monkeypatch.setattr(gemm, "MIN_ROWS", 2)  # let the tiny batch reach every backend
    check_packed(kind, True, PACKED_CASES[0].values[0])


@pytest.mark.parametrize("case", PACKED_PROJ_CASES)
@pytest.mark.parametrize("fused", FUSED)
def test_lstm_projection_packed_input_matches_torch(fused, case):
    check_packed("lstm", fused, case)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_states_are_each_sequences_last_step(kind, fused):
    """Behaviour a user relies on, spelled out: with unsorted packed input, h_n[:, b] is
    what sequence b alone (with its own h_0[:, b]) ends in, for both directions."""
    torch.manual_seed(0)
    _, mine = make_pair(kind, fused, bidirectional=True)
    case = Packed((2, 4, 1))
    g = torch.Generator().manual_seed(3)
    x = padded_input(case, g)
    hx = initial_state(kind, BIDIR, 3, g)
    with torch.no_grad():
        _, state = mine(packer(case)(x), hx)
        for b, n in enumerate(case.lengths):
            h_b = tuple(h[:, b : b + 1] for h in as_states(kind, hx))
            _, alone = mine(x[:n, b : b + 1], h_b if kind == "lstm" else h_b[0])
            for k, (s, a) in enumerate(
                zip(as_states(kind, state), as_states(kind, alone), strict=True)
            ):
                close(s[:, b : b + 1], a, f"state {k} of sequence {b}")


# ---------------------------------------------------------------------------------------
# No-grad evaluation and step-by-step sampling (the one-step fast path)
# ---------------------------------------------------------------------------------------

NO_GRAD_CASES = [
    pytest.param({**BIDIR, "num_layers": 2}, 3, id="bidir-layers2"),
    pytest.param({**BIDIR, "batch_first": True}, 1, id="bidir-batch_first-batch1"),
    pytest.param({**BIDIR, "num_layers": 2}, None, id="unbatched-bidir-layers2"),
]


def check_no_grad(kind: str, fused: bool, layer: dict, batch: int | None) -> None:
    torch.manual_seed(0)
    ref, mine = make_pair(kind, fused, **layer)
    g = torch.Generator().manual_seed(4)
    T = 4
    if batch is None:
        xs = torch.randn(T, N_IN, generator=g)
    else:
        xs = torch.randn(
            (batch, T, N_IN) if layer.get("batch_first") else (T, batch, N_IN), generator=g
        )
    t_dim = 1 if layer.get("batch_first") and batch is not None else 0
    with torch.no_grad():
        state_r = state_m = None
        for t in range(T):  # one step at a time, carrying the state
            x_t = xs.narrow(t_dim, t, 1)
            out_r, state_r = ref(x_t) if state_r is None else ref(x_t, state_r)
            out_m, state_m = mine(x_t) if state_m is None else mine(x_t, state_m)
            assert_same_outputs(out_m, as_states(kind, state_m), out_r, as_states(kind, state_r))
        for x in (xs, packer(Packed((1, 3, 2)))(torch.randn(3, 3, N_IN, generator=g))):
            out_r, state_r = ref(x)  # the whole sequence; then packed (never batch_first)
            out_m, state_m = mine(x)
            assert_same_outputs(out_m, as_states(kind, state_m), out_r, as_states(kind, state_r))


@pytest.mark.parametrize(("layer", "batch"), NO_GRAD_CASES)
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_and_one_step_match_torch(kind, fused, layer, batch):
    check_no_grad(kind, fused, layer, batch)


@pytest.mark.parametrize(
    ("layer", "batch"),
    [
        pytest.param({**PROJ, **BIDIR, "num_layers": 2}, 3, id="proj-bidir-layers2"),
        pytest.param({**PROJ, "batch_first": True}, 2, id="proj-batch_first"),
        pytest.param(PROJ, None, id="proj-unbatched"),
    ],
)
@pytest.mark.parametrize("fused", FUSED)
def test_lstm_projection_no_grad_and_one_step_match_torch(fused, layer, batch):
    check_no_grad("lstm", fused, layer, batch)


# ---------------------------------------------------------------------------------------
# Parameters: init order, names, state dicts, attributes
# ---------------------------------------------------------------------------------------

PARAM_CASES = [
    pytest.param({}, id="defaults"),
    pytest.param({"num_layers": 3, "bias": False}, id="layers3-no_bias"),
    pytest.param({**BIDIR, "num_layers": 2}, id="bidir-layers2"),
    pytest.param({**BIDIR, "num_layers": 2, "bias": False}, id="bidir-layers2-no_bias"),
]
PROJ_PARAM_CASES = [
    pytest.param(PROJ, id="proj"),
    pytest.param({**PROJ, "num_layers": 2}, id="proj-layers2"),
    pytest.param(
        {**PROJ, **BIDIR, "num_layers": 2, "bias": False}, id="proj-bidir-layers2-no_bias"
    ),
]
ALL_PARAM_CASES = [(k, c) for k in KINDS for c in PARAM_CASES] + [
    ("lstm", c) for c in PROJ_PARAM_CASES
]


def _kind_and_case(pairs):
    return [pytest.param(k, c.values[0], id=f"{k}-{c.id}") for k, c in pairs]


@pytest.mark.parametrize(("kind", "layer"), _kind_and_case(ALL_PARAM_CASES))
def test_same_seed_gives_same_init(kind, layer):
    """Same names, shapes and registration order: the same seed draws the same weights."""
    name, extra = layer_class(kind)
    torch.manual_seed(11)
    ref = getattr(nn, name)(N_IN, N_H, **extra, **layer)
    torch.manual_seed(11)
    mine = getattr(cells, name)(N_IN, N_H, **extra, **layer)
    ref_params = dict(ref.named_parameters())
    mine_params = dict(mine.named_parameters())
    assert list(mine_params) == list(ref_params)
    for n, p in ref_params.items():
        close(mine_params[n].detach(), p.detach(), n, exact=True)
    # And reset_parameters() draws them again in that order.
    torch.manual_seed(12)
    ref.reset_parameters()
    torch.manual_seed(12)
    mine.reset_parameters()
    for n, p in ref.named_parameters():
        close(mine_params[n].detach(), p.detach(), f"{n} after reset_parameters()", exact=True)


@pytest.mark.parametrize(("kind", "layer"), _kind_and_case(ALL_PARAM_CASES))
def test_state_dict_loads_both_ways(kind, layer):
    torch.manual_seed(0)
    ref, mine = make_pair(kind, **layer)
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [tuple(p.shape) for p in mine.parameters()] == [tuple(p.shape) for p in ref.parameters()]
    assert list(mine.state_dict()) == list(ref.state_dict())
    # Fresh twins with other weights, loaded strictly from the other library.
    torch.manual_seed(1)
    other_ref, other_mine = make_pair(kind, **layer)
    with torch.no_grad():
        for p in other_mine.parameters():
            p.mul_(-2.0)  # other_mine differs from other_ref, mine and ref
    res = other_ref.load_state_dict(mine.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    res = other_mine.load_state_dict(ref.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for n, p in ref.state_dict().items():
        close(other_ref.state_dict()[n], p, f"torch.nn <- charlm: {n}", exact=True)
        close(other_mine.state_dict()[n], p, f"charlm <- torch.nn: {n}", exact=True)


@pytest.mark.parametrize(("kind", "layer"), _kind_and_case(ALL_PARAM_CASES))
def test_public_attributes_match_torch(kind, layer):
    ref, mine = make_pair(kind, **layer)
    names = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first"]
    names += ["dropout", "bidirectional", "proj_size"]
    for n in names:
        assert getattr(mine, n) == getattr(ref, n), n
    if kind.startswith("rnn"):
        assert mine.nonlinearity == ref.nonlinearity
    assert [[tuple(p.shape) for p in ws] for ws in mine.all_weights] == [
        [tuple(p.shape) for p in ws] for ws in ref.all_weights
    ]


# ---------------------------------------------------------------------------------------
# Gradcheck (float64)
# ---------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    pytest.param({**BIDIR, "num_layers": 2}, None, id="bidir-layers2"),
    pytest.param(BIDIR, (2, 3), id="bidir-packed-unsorted"),
]
GRADCHECK_PROJ_CASES = [
    pytest.param({**PROJ, "num_layers": 2}, None, id="proj-layers2"),
    pytest.param({**PROJ, **BIDIR}, (3, 1), id="proj-bidir-packed-unsorted"),
]


def check_gradcheck(kind: str, fused: bool, layer: dict, lengths: tuple | None) -> None:
    n_in, n_h, T, B = 2, 3, 3, 2
    torch.manual_seed(0)
    _, mine = make_pair(kind, fused, input_size=n_in, hidden_size=n_h, **layer)
    mine = mine.double()
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(T, B, n_in, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    h_shape, c_shape = state_shapes(layer, B, hidden_size=n_h)
    states = [torch.randn(h_shape, generator=g, dtype=torch.float64) * 0.5]
    if kind == "lstm":
        states.append(torch.randn(c_shape, generator=g, dtype=torch.float64) * 0.5)
    states = [s.requires_grad_() for s in states]
    to_input = (lambda x: x) if lengths is None else packer(Packed(lengths))

    def run(params, x, *states):
        hx = tuple(states) if kind == "lstm" else states[0]
        out, state = torch.func.functional_call(mine, params, (to_input(x), hx))
        out = out.data if isinstance(out, PackedSequence) else out
        return (out, *(state if kind == "lstm" else (state,)))

    params = {n: p.detach() for n, p in mine.named_parameters()}
    assert torch.autograd.gradcheck(lambda x, *s: run(params, x, *s), (x, *states))
    # Every parameter, too: float64 grads agree with finite differences (along random
    # directions: fast_mode keeps this to a few forwards however many weights there are).
    names = list(params)
    leaves = tuple(p.clone().requires_grad_() for p in params.values())
    inputs = (x.detach(), *(s.detach() for s in states))
    assert torch.autograd.gradcheck(
        lambda *ps: run(dict(zip(names, ps, strict=True)), *inputs), leaves, fast_mode=True
    )


@pytest.mark.parametrize(("layer", "lengths"), GRADCHECK_CASES)
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_gradcheck(kind, fused, layer, lengths):
    check_gradcheck(kind, fused, layer, lengths)


@pytest.mark.parametrize(("layer", "lengths"), GRADCHECK_PROJ_CASES)
@pytest.mark.parametrize("fused", FUSED)
def test_gradcheck_lstm_projection(fused, layer, lengths):
    check_gradcheck("lstm", fused, layer, lengths)


# ---------------------------------------------------------------------------------------
# Constructor arguments: rejected (or accepted) exactly as torch.nn does
# ---------------------------------------------------------------------------------------

_LAYER_ARGS = [
    ("bias", 1),
    ("bias", "True"),
    ("bias", 0),
    ("batch_first", 0),
    ("batch_first", "False"),
    ("bidirectional", 1),  # torch 2.13 accepts any truthy value here
    ("bidirectional", 0),
    ("hidden_size", 2.0),
    ("hidden_size", 0),
    ("hidden_size", -1),
    ("input_size", 0),
    ("input_size", -1),
    ("input_size", 2.0),
    ("num_layers", 0),
    ("num_layers", -1),
    ("num_layers", 1.5),
    ("dropout", 1.5),
    ("dropout", -0.1),
    ("dropout", True),
    ("dropout", False),
    ("dropout", "0.5"),
    ("dropout", None),
    ("dropout", 1),
    ("dropout", 0),
    ("dropout", 1.0),
    ("dropout", 0.25),
]
_LSTM_ARGS = [
    ("proj_size", -1),
    ("proj_size", N_H),  # == hidden_size
    ("proj_size", N_H + 1),
    ("proj_size", 2.0),
    ("proj_size", 0),
    ("proj_size", 1),
    ("proj_size", N_H - 1),
]
_RNN_ARGS = [("nonlinearity", "gelu"), ("nonlinearity", "relu"), ("nonlinearity", "Tanh")]


def _arg_id(cls: str, name: str, value: object) -> str:
    if name == "proj_size" and value == N_H:
        return f"{cls}-proj_size=hidden_size"
    return f"{cls}-{name}={value!r}"


CONSTRUCTOR_CASES = [
    pytest.param(cls, {name: value}, id=_arg_id(cls, name, value))
    for cls in ("RNN", "LSTM", "GRU")
    for name, value in _LAYER_ARGS
    + (_LSTM_ARGS if cls == "LSTM" else [])
    + (_RNN_ARGS if cls == "RNN" else [])
] + [
    pytest.param("RNN", {"num_layers": 1, "dropout": 0.5}, id="RNN-dropout_with_one_layer"),
    pytest.param("LSTM", {"proj_size": 2, "bidirectional": True}, id="LSTM-proj_size=2-bidir"),
    pytest.param("GRU", {"bidirectional": True, "num_layers": 3}, id="GRU-bidir-layers3"),
]


@pytest.mark.parametrize(("cls", "kw"), CONSTRUCTOR_CASES)
def test_constructor_arguments_checked_like_torch(cls, kw):
    args = {"input_size": N_IN, "hidden_size": N_H, "num_layers": 2, **kw}
    assert_same_outcome(
        lambda: getattr(nn, cls)(**args), lambda: getattr(cells, cls)(**args, fused=False)
    )
    assert_same_outcome(
        lambda: getattr(nn, cls)(**args), lambda: getattr(cells, cls)(**args, fused=True)
    )
    if outcome(lambda: getattr(nn, cls)(**args)) is None:  # accepted: the same parameters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref, mine = getattr(nn, cls)(**args), getattr(cells, cls)(**args)
        assert [(n, p.shape) for n, p in mine.named_parameters()] == [
            (n, p.shape) for n, p in ref.named_parameters()
        ]


# torch.nn's cells check less than its layers: any bias is taken for its truth value, and
# sizes of 0 or below and RNNCell(nonlinearity="gelu") are not rejected when the cell is
# built (negative sizes fail in torch.empty, an unknown nonlinearity only in forward).
# charlm rejects those early with a ValueError (tests/test_cells.py), so they are not here.
_CELL_ARGS = [("bias", 1), ("bias", "True"), ("bias", 0), ("hidden_size", 2.0)]
_CELL_ARGS += [("input_size", 2.0)]
CELL_CASES = [
    pytest.param(cls, {name: value}, id=f"{cls}-{name}={value!r}")
    for cls in ("RNNCell", "LSTMCell", "GRUCell")
    for name, value in _CELL_ARGS + ([("nonlinearity", "relu")] if cls == "RNNCell" else [])
]


@pytest.mark.parametrize(("cls", "kw"), CELL_CASES)
def test_cell_constructor_arguments_checked_like_torch(cls, kw):
    args = {"input_size": N_IN, "hidden_size": N_H, **kw}
    assert_same_outcome(lambda: getattr(nn, cls)(**args), lambda: getattr(cells, cls)(**args))
    if outcome(lambda: getattr(nn, cls)(**args)) is None:
        ref, mine = getattr(nn, cls)(**args), getattr(cells, cls)(**args)
        assert [(n, p.shape) for n, p in mine.named_parameters()] == [
            (n, p.shape) for n, p in ref.named_parameters()
        ]


def test_fused_is_keyword_only():
    """The positional arguments are torch.nn's; ``fused`` cannot be passed by position."""
    #            input hidden layers bias  batch_first dropout bidir proj device dtype
    ref = nn.LSTM(N_IN, N_H, 2, True, False, 0.0, True, N_PROJ, None, None)
    mine = cells.LSTM(N_IN, N_H, 2, True, False, 0.0, True, N_PROJ, None, None)
    assert (
        (mine.bidirectional, mine.proj_size) == (ref.bidirectional, ref.proj_size) == (True, N_PROJ)
    )
    with pytest.raises(TypeError):
        cells.LSTM(N_IN, N_H, 2, True, False, 0.0, True, N_PROJ, None, None, False)
    gru = cells.GRU(N_IN, N_H, 2, True, True, 0.0, True, fused=False)
    assert (gru.batch_first, gru.bidirectional, gru.fused) == (True, True, False)


# ---------------------------------------------------------------------------------------
# Forward inputs: rejected as torch.nn does
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    x_shape: tuple[int, ...]
    layer: dict = field(default_factory=dict)
    h_shape: tuple[int, ...] | None = None  # None: no hx
    c_shape: tuple[int, ...] | None = None  # LSTM only; None: like h_shape, last dim H
    packed: tuple[int, ...] | None = None  # lengths: pack x (T, B, ...) first


L2 = {"num_layers": 2}
FORWARD_CASES = [
    pytest.param(BadInput((4, 3, N_IN + 1)), id="input_size+1"),
    pytest.param(BadInput((4, N_IN + 1)), id="unbatched-input_size+1"),
    pytest.param(BadInput((4, 3, N_IN + 1), packed=(4, 2, 1)), id="packed-input_size+1"),
    pytest.param(BadInput((4, 3, N_IN, 1)), id="input_4d"),
    pytest.param(BadInput((N_IN,)), id="input_1d"),
    pytest.param(BadInput((4, 3, N_IN), L2, h_shape=(2, 2, N_H)), id="hx_wrong_batch"),
    pytest.param(BadInput((4, 3, N_IN), L2, h_shape=(2, 3, N_H + 1)), id="hx_wrong_hidden"),
    pytest.param(BadInput((4, 3, N_IN), L2, h_shape=(1, 3, N_H)), id="hx_wrong_layers"),
    pytest.param(BadInput((4, 3, N_IN), L2, h_shape=(2, N_H)), id="batched_input-2d_hx"),
    pytest.param(BadInput((4, N_IN), L2, h_shape=(2, 1, N_H)), id="unbatched_input-3d_hx"),
    pytest.param(
        BadInput((4, 3, N_IN), BIDIR, h_shape=(1, 3, N_H)), id="bidir-hx_layers_not_doubled"
    ),
    pytest.param(
        BadInput((4, 3, N_IN), {**BIDIR, **L2}, h_shape=(2, 3, N_H)),
        id="bidir-layers2-hx_layers_not_doubled",
    ),
    pytest.param(BadInput((4, N_IN), BIDIR, h_shape=(1, N_H)), id="unbatched-bidir-hx_not_doubled"),
    pytest.param(BadInput((4, 3, N_IN), BIDIR, h_shape=(2, 3, N_H)), id="bidir-hx_ok"),
    pytest.param(
        BadInput((4, 3, N_IN), BIDIR, h_shape=(2, 3, N_H + 1), packed=(2, 4, 1)),
        id="packed-bidir-hx_wrong_hidden",
    ),
    pytest.param(
        BadInput((4, 3, N_IN), BIDIR, h_shape=(1, 3, N_H), packed=(2, 4, 1)),
        id="packed-bidir-hx_not_doubled",
    ),
]
FORWARD_PROJ_CASES = [
    pytest.param(BadInput((4, 3, N_IN), PROJ, h_shape=(1, 3, N_H)), id="proj-h_of_hidden_size"),
    pytest.param(
        BadInput((4, 3, N_IN), PROJ, h_shape=(1, 3, N_PROJ), c_shape=(1, 3, N_PROJ)),
        id="proj-c_of_proj_size",
    ),
    pytest.param(BadInput((4, 3, N_IN), PROJ, h_shape=(1, 3, N_PROJ)), id="proj-hx_ok"),
    pytest.param(
        BadInput((4, 3, N_IN), {**PROJ, **BIDIR}, h_shape=(1, 3, N_PROJ)),
        id="proj-bidir-hx_not_doubled",
    ),
    pytest.param(BadInput((4, N_IN), PROJ, h_shape=(1, N_H)), id="proj-unbatched-h_of_hidden_size"),
    pytest.param(
        BadInput((4, 3, N_IN), PROJ, h_shape=(1, 3, N_H), packed=(3, 4, 2)),
        id="proj-packed-h_of_hidden_size",
    ),
]


def check_bad_input(kind: str, fused: bool, case: BadInput) -> None:
    torch.manual_seed(0)
    ref, mine = make_pair(kind, fused, **case.layer)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(case.x_shape, generator=g)
    if case.packed is not None:
        x = pack_padded_sequence(x, torch.tensor(case.packed), enforce_sorted=False)
    hx = None
    if case.h_shape is not None:
        hx = torch.randn(case.h_shape, generator=g)
        if kind == "lstm":
            c_shape = case.c_shape or (*case.h_shape[:-1], N_H)
            hx = (hx, torch.randn(c_shape, generator=g))
    args = (x,) if hx is None else (x, hx)
    assert_same_outcome(lambda: ref(*args), lambda: mine(*args))


@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_forward_inputs_raise_like_torch(kind, fused, case):
    check_bad_input(kind, fused, case)


@pytest.mark.parametrize("case", FORWARD_PROJ_CASES)
@pytest.mark.parametrize("fused", FUSED)
def test_lstm_projection_bad_hx_raise_like_torch(fused, case):
    check_bad_input("lstm", fused, case)
