"""`charlm gradients`: the window placement, the gradient against a direct autograd computation
for every cell, the Transformer's context, --init, and the command's outputs."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from charlm import checkpoint as ck
from charlm.gradients import fresh_model, gradient_norms, table_distances, window_starts
from charlm.minlm import MinLM
from charlm.model import REGISTRY, build_model
from tests.test_inspect import cli, make_run, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_window_starts_follow_the_formula():
    starts = window_starts(1000, 64, 128)
    assert len(starts) == 64 and starts[0] == 0 and starts[-1] == 1000 - 128 - 1
    assert starts == [j * (1000 - 129) // 63 for j in range(64)]
    assert window_starts(129, 1, 128) == [0]
    with pytest.raises(ValueError, match="--length"):
        window_starts(100, 4, 128)
    with pytest.raises(ValueError, match="--windows"):
        window_starts(1000, 0, 8)
    assert table_distances(128) == [0, 1, 2, 4, 8, 16, 32, 64, 127]


def direct_norms(model, x: torch.Tensor, y: int) -> torch.Tensor:
    """‖∂ℓ/∂e_t‖ for one window, by plain autograd through a hand-assembled forward (the
    recurrent body on its readable, unfused path), by distance k = K-1-t."""
    if hasattr(model, "rnn"):
        e = model.embed(x[None]).detach().requires_grad_(True)
        body = copy.deepcopy(model.rnn)
        body.fused = False
        out, _ = body(e)
        logits = model.head(out)
    elif isinstance(model, MinLM):  # the blocks with their cells on the step equations
        e = model.embed(x[None]).detach().requires_grad_(True)
        h = e
        for block in copy.deepcopy(model.blocks):
            block.cell.fused = False
            h = block(h, None)[0]
        logits = model.head(model.ln_f(h))
    else:
        e = model.tok(x[None]).detach().requires_grad_(True)
        h = e + model.pos(torch.arange(len(x)))
        for block in model.blocks:
            h = block(h, None)[0]
        logits = model.head(model.ln_f(h))
    loss = F.cross_entropy(logits[0, -1], torch.tensor(y))
    (grad,) = torch.autograd.grad(loss, e)
    return grad[0].norm(dim=-1).flip(0)


@pytest.mark.parametrize("cell", list(REGISTRY))
def test_gradients_match_a_direct_autograd_computation(cell):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(cell), 11).eval()
    tokens = torch.randint(0, 11, (300,), dtype=torch.uint8)
    norms = gradient_norms(model, tokens, windows=5, length=12)
    assert norms.shape == (5, 12)
    for j, s in enumerate(window_starts(300, 5, 12)):
        want = direct_norms(model, tokens[s : s + 12].long(), int(tokens[s + 12]))
        torch.testing.assert_close(norms[j], want, rtol=1e-4, atol=1e-9)
    assert (norms > 0).all()
    assert not model.training


def test_the_transformer_feels_nothing_beyond_its_context():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("transformer"), 11)  # context: train.seq_len = 16
    tokens = torch.randint(0, 11, (200,))
    norms = gradient_norms(model, tokens, windows=3, length=20)
    assert (norms[:, 16:] == 0).all() and (norms[:, :16] > 0).all()


def test_init_is_the_runs_config_freshly_initialised_with_its_seed(tmp_path):
    ckpt = make_run(tmp_path, "gru")  # make_run saves exactly the seeded initial weights
    loaded = ck.load_run(ckpt)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(1.0)  # as if trained
    fresh = fresh_model(loaded)
    saved = ck.load_checkpoint(ckpt)["model"]
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)


def test_cli_gradients_outputs(tmp_path):
    runs = [make_run(tmp_path, "lstm", name="a").parent, make_run(tmp_path, "transformer",
                                                                  name="b").parent]
    out = tmp_path / "out"
    result = cli("gradients", *runs, "--init", "--windows", 4, "--length", 8, "--out", out,
                 "--json")
    assert result.exit_code == 0, result.output
    runs_json = json.loads(result.stdout)["runs"]
    assert [(r["run"], r["cell"], r["init"]) for r in runs_json] == [
        ("a", "lstm", False), ("a", "lstm", True), ("b", "transformer", False),
        ("b", "transformer", True)]
    for r in runs_json:
        assert r["distance"] == list(range(8))
        assert all(lo <= mid <= hi for lo, mid, hi in zip(r["p25"], r["median"], r["p75"],
                                                          strict=True))
    # make_run's models are untrained: --init gives the same curve
    assert runs_json[0]["median"] == pytest.approx(runs_json[1]["median"])
    with open(out / "gradients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 8 and set(rows[0]) == {"run", "cell", "init", "distance", "median",
                                                   "p25", "p75"}
    assert math.isclose(float(rows[3]["median"]), runs_json[0]["median"][3], rel_tol=1e-5)
    assert (out / "gradients.png").stat().st_size > 10_000
    table = cli("gradients", runs[0], "--windows", 2, "--length", 8, "--out", out)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["0", "1", "2", "4", "7"]
    assert "lstm (a)" in lines[1]
    bad = cli("gradients", runs[0], "--length", 100000, "--out", out)
    assert bad.exit_code == 1 and "--length" in bad.stderr
    assert cli("gradients", tmp_path / "nope").exit_code == 1


def test_cli_gradients_without_matplotlib_still_writes_the_csv(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    run = make_run(tmp_path, "rnn").parent
    result = cli("gradients", run, "--windows", 2, "--length", 4)
    assert result.exit_code == 0, result.output
    assert (run / "gradients.csv").is_file() and not (run / "gradients.png").exists()
    assert 'pip install "charlm[plot]"' in result.stderr
