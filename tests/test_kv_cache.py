"""The Transformer's KV cache: one character at a time through `_step` (the fast path) gives
the logits of a full forward over the window the cache holds (the spec), across rebuilds and
for several rows; the cache stays within the context; states are values; training keeps none."""

from __future__ import annotations

import pytest
import torch

from charlm.transformer import TransformerLM

CONTEXT = 12
VOCAB = 11


def tiny_model(seed: int = 0) -> TransformerLM:
    """Weights larger than the init's, so attention is sharp and logits are O(1): a wrong key
    or position shows in them."""
    torch.manual_seed(seed)
    model = TransformerLM(VOCAB, width=16, num_layers=2, num_heads=2, context_len=CONTEXT)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def windows(length: int, prime: int) -> list[list[int]]:
    """The positions the cache holds after each character from `prime` on: it grows to the
    context, then restarts from its last half context."""
    window, out = list(range(prime)), []
    for t in range(prime, length):
        window = (window + [t])[-(CONTEXT // 2):] if len(window) + 1 > CONTEXT else window + [t]
        out.append(window)
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_stepping_through_the_cache_equals_a_full_forward_over_its_window(batch):
    model, x, prime = tiny_model(), ids(batch, 4 * CONTEXT), 4
    with torch.no_grad():
        logits, state = model(x[:, :prime], None)
        torch.testing.assert_close(logits, model(x[:, :prime], None)[0])
        for t, window in zip(range(prime, x.size(1)), windows(x.size(1), prime), strict=True):
            logits, state = model(x[:, t : t + 1], state)
            want, _ = model(x[:, window], None)
            assert logits.shape == (batch, 1, VOCAB)
            torch.testing.assert_close(logits[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)
            assert state["len"] == len(window)
            torch.testing.assert_close(state["idx"][:, : state["len"]], x[:, window])


def test_the_cache_never_grows_beyond_the_context_and_steps_write_in_place():
    model, x = tiny_model(), ids(2, 5 * CONTEXT)
    moves, where = 0, None
    with torch.no_grad():
        _, state = model(x[:, :1], None)
        for t in range(1, x.size(1)):
            _, state = model(x[:, t : t + 1], state)
            assert 1 <= state["len"] <= CONTEXT
            assert state["idx"].size(1) <= CONTEXT
            for k, v in state["kv"]:
                assert k.size(2) <= CONTEXT and v.size(2) <= CONTEXT
            moves += state["kv"][0][0].data_ptr() != where
            where = state["kv"][0][0].data_ptr()
    # New buffers after the first character and after each rebuild only, not every step.
    rebuilds = sum(len(w) == CONTEXT // 2 for w in windows(x.size(1), 1))
    assert 0 < rebuilds and moves <= 2 * rebuilds + 1 < x.size(1) // 2


def test_a_state_continued_twice_gives_the_same_logits_both_times():
    """States are values: continuing one twice (a branch) never sees the other branch's keys."""
    model, x = tiny_model(), ids(1, 8)
    with torch.no_grad():
        _, state = model(x[:, :3], None)
        for t in range(3, 5):
            _, state = model(x[:, t : t + 1], state)  # the fast path: its buffers have room
        a1, a_state = model(x[:, 5:6], state)
        b1, _ = model(torch.tensor([[int(x[0, 5] + 1) % VOCAB]]), state)  # the other branch
        a2, _ = model(x[:, 6:7], a_state)
        a1_again, _ = model(x[:, 5:6], state)
        want, _ = model(x[:, :7], None)
        # the spec (trace, any length) continues a state the fast path wrote
        traced, _, _ = model.trace(x[:, 6:8], a_state)
    torch.testing.assert_close(a1_again, a1, atol=0, rtol=0)
    assert not torch.allclose(a1, b1)
    torch.testing.assert_close(a2[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traced, model(x[:, :8], None)[0][:, 6:], atol=1e-5, rtol=1e-5)


def test_steps_follow_weight_changes_and_dtype_and_restore_the_math_settings():
    model, x = tiny_model(), ids(1, 6)
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    with torch.no_grad():
        _, state = model(x[:, :4], None)
        model(x[:, 4:5], state)  # caches the transposed weights
        for p in model.parameters():  # what an optimizer step does: in place
            p.add_(0.05)
        _, state = model(x[:, :4], None)
        got, _ = model(x[:, 4:5], state)
        torch.testing.assert_close(got[:, -1], model(x[:, :5], None)[0][:, -1],
                                   atol=1e-5, rtol=1e-5)
        model.double()
        _, state = model(x[:, :4], None)
        got, _ = model(x[:, 4:5], state)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got[:, -1], model(x[:, :5], None)[0][:, -1])
    # the step's own settings (one thread, no oneDNN) are undone after it
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads, onednn)


def test_a_state_made_under_inference_mode_continues_under_no_grad():
    model, x = tiny_model(), ids(1, 6)
    with torch.inference_mode():
        _, state = model(x[:, :3], None)
        _, state = model(x[:, 3:4], state)
    with torch.no_grad():
        _, state = model(x[:, 4:5], state)
        got, _ = model(x[:, 5:6], state)
        torch.testing.assert_close(got[:, -1], model(x, None)[0][:, -1], atol=1e-5, rtol=1e-5)


def test_training_keeps_no_cache_and_eval_with_gradients_stays_differentiable():
    model, x = tiny_model().train(), ids(2, CONTEXT)
    _, state = model(x, None)
    assert state is None
    model.eval()
    logits, state = model(x[:, :3], None)  # gradients on: the spec path, no in-place writes
    logits2, state = model(x[:, 3:4], state)
    logits3, _ = model(x[:, 4:5], state)
    (logits2.sum() + logits3.sum()).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
