"""`charlm inspect`: the model contract's trace, every quantity the page holds against the
reference equations, the Transformer's attention, the correlation finder, the text features,
escaping of hostile text, the size budget and the command line."""

from __future__ import annotations

import base64
import json
import math
import re
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from charlm import checkpoint as ck
from charlm.config import Config, apply_overrides, config_to_yaml, validate
from charlm.data import Vocab, build_vocab
from charlm.inspect import collect, inspect_run
from charlm.inspect.features import pearson, saturation, text_features, top_units
from charlm.inspect.page import page_data
from charlm.model import REGISTRY, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ('def greet(name):\n    """Say hello."""\n    # a comment (with brackets)\n'
          '    return f"hello {name}" + \'!\'\n\n') * 6 + "The quick brown fox; \"quoted\".\n"
HOSTILE = ('</script><script>window.pwned=1</script><img src=x onerror="window.pwned=1">'
           '<!-- --> ]]> \u2028\u2029 & &amp; {{data}} {{script}} ${x} `x`\ttab\r\n'
           '"quotes" \'single\' \u00e9\u0301 \U0001f600 \x00\x7f\n')


def tiny_cfg(cell: str, source: str = "corpus.txt", **extra) -> Config:
    sets = [f"model.cell={cell}", "model.hidden_size=16", "model.num_layers=2",
            "model.num_heads=2", "train.seq_len=16", f"data.source={source}",
            "train.seed=7", *(f"{k}={v}" for k, v in extra.items())]
    return validate(apply_overrides(Config(), sets))


def make_run(tmp_path: Path, cell: str, extra: str = "", name: str = "run", **overrides) -> Path:
    """A run directory with a freshly initialised model (seed 7) and its config: what
    `charlm train` leaves, without the training. Returns its best.pt."""
    corpus = tmp_path / f"corpus-{cell}.txt"
    corpus.write_text(CORPUS + extra, encoding="utf-8", newline="")
    cfg = tiny_cfg(cell, str(corpus), **overrides)
    vocab = build_vocab(CORPUS + extra)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, len(vocab))
    run = tmp_path / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    ck.save_checkpoint(run / "best.pt", {"config": cfg.to_dict(), "vocab": vocab.chars,
                                         "model": model.state_dict(), "step": 0})
    return run / "best.pt"


def read_page(path: Path) -> tuple[dict, bytes]:
    """The JSON data and the inflated activation bytes of a generated page."""
    html = path.read_text(encoding="utf-8")
    data = re.search(r'<script id="charlm-data" type="application/json">(.*?)</script>',
                     html, re.S).group(1)
    blob = re.search(r'<script id="charlm-blob" type="application/octet-stream">(.*?)</script>',
                     html, re.S).group(1)
    return json.loads(data), zlib.decompress(base64.b64decode(blob))


def decoded(data: dict, raw: bytes, name: str) -> torch.Tensor:
    """A quantity of the page, decoded as the page's script decodes it: (n, units)."""
    q = next(q for q in data["quantities"] if q["name"] == name)
    n = len(data["text"])
    b = torch.frombuffer(bytearray(raw[q["offset"] : q["offset"] + q["units"] * n]),
                         dtype=torch.uint8).view(q["units"], n).t().double()
    if q["kind"] == "gate":
        return b / 255
    scale = torch.tensor(q["scale"], dtype=torch.double) if q["scale"] else 1.0
    return (b / 127.5 - 1) * scale


# ---------------------------------------------------------------------------- the trace


@pytest.mark.parametrize("cell", list(REGISTRY))
def test_trace_equals_forward_with_the_state_carried(cell):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(cell), 11).eval()
    idx = torch.randint(0, 11, (2, 20))
    with torch.no_grad():
        logits1, state1 = model(idx[:, :9], None)
        logits2, state2 = model(idx[:, 9:], state1)
        t_logits1, t_state1, trace1 = model.trace(idx[:, :9], None)
        t_logits2, t_state2, trace2 = model.trace(idx[:, 9:], t_state1)
    torch.testing.assert_close(t_logits1, logits1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_logits2, logits2, atol=1e-5, rtol=1e-5)
    kinds = model.trace_kinds()
    for name, value in trace2.items():
        assert name.split(".")[1] in kinds
        assert value.shape[0] == 2 and torch.isfinite(value).all()
    if model.carries_state:  # the state the trace carries is the model's own
        for a, b in zip(torch.utils._pytree.tree_leaves(t_state2),
                        torch.utils._pytree.tree_leaves(state2), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lstm_trace_h_and_c_equal_the_layers_forward():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("lstm"), 11).eval()
    idx = torch.randint(0, 11, (3, 14))
    with torch.no_grad():
        out, (h_n, c_n) = model.rnn(model.embed(idx))  # the fused path: what training runs
        _, (th, tc), trace = model.trace(idx)
    torch.testing.assert_close(trace["l1.h"], out, atol=1e-5, rtol=1e-5)  # every step
    for layer in range(2):
        torch.testing.assert_close(trace[f"l{layer}.h"][:, -1], h_n[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(trace[f"l{layer}.c"][:, -1], c_n[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(th, h_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(tc, c_n, atol=1e-5, rtol=0)


def reference_quantities(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each cell's quantities written out from its weights, independent of model.trace and of
    charlm.cells: (n, units) per "l{layer}.{q}", for one sequence from a zero state."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = sd["embed.weight"][ids]  # (n, H)
    mode, out = model.rnn.mode, {}
    for layer in range(model.rnn.num_layers):
        w_ih, w_hh = sd[f"rnn.weight_ih_l{layer}"], sd[f"rnn.weight_hh_l{layer}"]
        b_ih, b_hh = sd[f"rnn.bias_ih_l{layer}"], sd[f"rnn.bias_hh_l{layer}"]
        H = w_hh.shape[1]
        h, c, rows = torch.zeros(H, dtype=torch.double), torch.zeros(H, dtype=torch.double), []
        for x_t in x:
            gi, gh = w_ih @ x_t + b_ih, w_hh @ h + b_hh
            if mode == "LSTM":
                i, f, g, o = torch.sigmoid(gi[:H] + gh[:H]), torch.sigmoid(gi[H:2*H] + gh[H:2*H]), \
                    torch.tanh(gi[2*H:3*H] + gh[2*H:3*H]), torch.sigmoid(gi[3*H:] + gh[3*H:])
                c = f * c + i * g
                h = o * torch.tanh(c)
                rows.append({"h": h, "c": c, "i": i, "f": f, "g": g, "o": o})
            elif mode == "GRU":
                r = torch.sigmoid(gi[:H] + gh[:H])
                z = torch.sigmoid(gi[H:2*H] + gh[H:2*H])
                n = torch.tanh(gi[2*H:] + r * gh[2*H:])
                h = (1 - z) * n + z * h
                rows.append({"h": h, "r": r, "z": z, "n": n})
            else:
                h = torch.tanh(gi + gh)
                rows.append({"h": h})
        for q in rows[0]:
            out[f"l{layer}.{q}"] = torch.stack([r[q] for r in rows])
        x = out[f"l{layer}.h"]
    return out


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_every_quantity_on_the_page_equals_the_reference_equations(tmp_path, cell):
    ckpt = make_run(tmp_path, cell)
    text = CORPUS[:40]  # more than two windows of 16: the state is carried across them
    result = inspect_run(ckpt, prime=text, out=tmp_path / "p.html")
    data, raw = read_page(result.path)
    assert data["text"] == list(text)
    model = ck.load_run(ckpt).model.eval()
    vocab = Vocab("".join(data["vocab"]))
    ids = vocab.encode(text)
    reference = reference_quantities(model, ids)
    assert {q["name"] for q in data["quantities"]} == set(reference)
    for q in data["quantities"]:  # within half a quantization step of each unit
        step = torch.full((q["units"],), 1 / 255 if q["kind"] == "gate" else 1 / 127.5)
        if q["scale"]:
            step = step * torch.tensor(q["scale"])
        error = (decoded(data, raw, q["name"]) - reference[q["name"]]).abs()
        assert (error <= step / 2 + 1e-6).all(), (q["name"], float(error.max()))
    # loss, entropy and the top 5: char j is predicted from characters 0..j-1
    with torch.no_grad():
        logits, _ = model(ids[None], None)
    logp = F.log_softmax(logits[0].double(), -1)
    want_loss = (-logp[:-1].gather(1, ids[1:, None])[:, 0] / math.log(2)).tolist()
    assert data["loss"][0] is None
    assert data["loss"][1:] == pytest.approx(want_loss, abs=2e-3)
    want_entropy = (-(logp.exp() * logp).sum(-1) / math.log(2))[:-1].tolist()
    assert data["entropy"][1:] == pytest.approx(want_entropy, abs=2e-3)
    probs, top = logp[:-1].exp().topk(5, dim=-1)
    k = data["topK"]
    assert k == 5
    for j in range(1, len(text)):
        assert data["topP"][j * k : (j + 1) * k] == pytest.approx(probs[j - 1].tolist(), abs=1e-3)
        assert data["top"][j * k : (j + 1) * k] == top[j - 1].tolist()
    assert result.bits_per_char == pytest.approx(sum(want_loss) / len(want_loss), abs=1e-4)
    # gate saturation: the fractions below 0.1 and above 0.9 of each gate's units
    for s in data["saturation"]:
        left, right = saturation(reference[s["quantity"]])
        assert s["left"] == pytest.approx(left.tolist(), abs=1e-3)
        assert s["right"] == pytest.approx(right.tolist(), abs=1e-3)
    assert {s["q"] for s in data["saturation"]} == \
        {"lstm": {"i", "f", "o"}, "gru": {"r", "z"}, "rnn": set()}[cell]


def test_transformer_attention_rows_sum_to_one_and_are_causal(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("transformer"), 11).eval()
    idx = torch.randint(0, 11, (2, 12))
    with torch.no_grad():
        _, _, trace = model.trace(idx)
    for layer in range(2):
        w = trace[f"l{layer}.attn"]  # (B, heads, T, S)
        assert w.shape == (2, 2, 12, 12)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 12))
        assert (w.triu(diagonal=1) == 0).all()  # nothing attends to a later character
    # layer 0 by hand: softmax(q k^T / sqrt(d)) over the embedded, layer-normed input
    block = model.blocks[0]
    with torch.no_grad():
        x = block.ln1(model.tok(idx) + model.pos(torch.arange(12)))
        q, k, _ = block.attn.qkv(x).split(16, dim=2)
        q, k = (t.view(2, 12, 2, 8).transpose(1, 2) for t in (q, k))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(trace["l0.attn"], scores.softmax(-1), atol=1e-6, rtol=1e-5)
    # on the page, char j of a fresh window sees only the window's characters before it
    ckpt = make_run(tmp_path, "transformer")
    text = CORPUS[:40]
    data, raw = read_page(inspect_run(ckpt, prime=text, out=tmp_path / "t.html").path)
    a = data["attention"][0]
    n, width = len(text), a["width"]
    w = torch.frombuffer(bytearray(raw[a["offset"] : a["offset"] + a["heads"] * n * width]),
                         dtype=torch.uint8).view(a["heads"], n, width).double() / 255
    for j in range(n):
        seen = j % 16 + 1  # windows of train.seq_len = 16, each from a fresh context
        assert (w[:, j, seen:] == 0).all()
        assert w[:, j, :seen].sum(-1).tolist() == pytest.approx([1.0] * a["heads"], abs=0.02)
    assert data["saturation"] == []  # no gates


# ---------------------------------------------------------------------------- features


def test_text_features_read_the_state_after_each_character():
    text = 'a = (b["x#"], c)  # note (\n    """doc\'s"""\n'
    f = {k: v.tolist() for k, v in text_features(text).items()}
    at = text.index
    assert f["line_position"][at("\n")] == 0 and f["line_position"][at("a")] == 1
    assert f["bracket_depth"][at("b")] == 1 and f["bracket_depth"][at("x")] == 2
    assert f["bracket_depth"][at(" c")] == 1 and f["bracket_depth"][at("note")] == 0
    assert f["double_quotes"][at("x")] == 1 and f["double_quotes"][at("]")] == 0
    assert f["comment"][at("#")] == 0 and f["comment"][at("note")] == 1  # '#' in a string
    assert f["comment"][at("\n")] == 0
    assert f["indentation"][at("doc") - 1] == 4 and f["indentation"][at("\n")] == 0
    assert f["docstring"][at("doc")] == 1 and f["docstring"][len(text) - 2] == 0
    assert f["single_quotes"][at("'s")] == 0  # an apostrophe inside a word is no quote
    assert f["in_word"][at("a")] == 1 and f["in_word"][at(" =")] == 0


def test_pearson_and_top_units():
    torch.manual_seed(0)
    y = torch.arange(50.0)
    acts = {"l0.h": torch.randn(50, 6), "l1.h": torch.randn(50, 4)}
    acts["l1.h"][:, 2] = -0.5 * y + 0.01 * torch.randn(50)
    acts["l0.h"][:, 0] = 3.0  # a constant unit correlates with nothing
    r = pearson(torch.stack([y, -y, torch.ones(50)], 1), y)
    assert r[:2].tolist() == pytest.approx([1.0, -1.0]) and math.isnan(r[2])
    best = top_units(acts, {"y": y, "-y": -y}, k=5)["y"]
    assert (best[0].quantity, best[0].unit) == ("l1.h", 2) and best[0].r < -0.99
    assert len(best) == 5 and all((m.quantity, m.unit) != ("l0.h", 0) for m in best)
    assert top_units(acts, {"-y": -y})["-y"][0].r > 0.99


def test_the_correlation_finder_recovers_a_unit_wired_to_the_line_position(tmp_path):
    """A ReLU RNN whose unit 3 counts the characters read since the last newline
    (h3' = relu(h3 + 1), and a newline's embedding drives it to 0): the page's finder must
    name exactly that unit first for "position in the line", with r = 1."""
    ckpt = make_run(tmp_path, "rnn", **{"model.nonlinearity": "relu"})
    loaded = ck.load_run(ckpt)
    model, vocab = loaded.model.eval(), loaded.vocab
    with torch.no_grad():
        rnn = model.rnn
        rnn.weight_ih_l0[3].zero_()
        rnn.weight_hh_l0[3].zero_()
        rnn.weight_hh_l0[3, 3] = 1.0
        rnn.bias_ih_l0[3], rnn.bias_hh_l0[3] = 1.0, 0.0
        model.embed.weight[:, :] = 0.0
        model.embed.weight[vocab.stoi["\n"], 0] = 1.0
        rnn.weight_ih_l0[3, 0] = -1000.0  # a newline resets the counter
    collected = collect(model, vocab, CORPUS, window=16)
    data, _ = page_data(collected, {"vocab": vocab.chars})
    feature = next(f for f in data["features"] if f["key"] == "line_position")
    assert (feature["top"][0]["quantity"], feature["top"][0]["unit"]) == ("l0.h", 3)
    assert feature["top"][0]["r"] == pytest.approx(1.0, abs=1e-3)
    assert len(feature["top"]) == 5
    absent = data["absentFeatures"]
    assert "inside a # comment" not in absent and "inside a docstring" not in absent


# ---------------------------------------------------------------------------- the page


def test_hostile_text_cannot_break_or_script_the_page(tmp_path):
    ckpt = make_run(tmp_path, "gru", extra=HOSTILE)
    path = inspect_run(ckpt, prime=HOSTILE, out=tmp_path / "h.html").path
    html = path.read_text(encoding="utf-8")
    # only the page's own three script elements, and no markup from the text anywhere
    assert html.count("<script") == 3 and html.count("</script") == 3
    assert "<img" not in html
    assert "pwned" not in html.split('<script id="charlm-data"')[0]  # not in the markup
    assert "<!--" not in html
    data, _ = read_page(path)
    assert "".join(data["text"]) == HOSTILE  # every character, as the corpus has it
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    # no URL the browser would fetch: the only one is the SVG namespace name
    assert set(re.findall(r"(?:https?|ftp)://[^\s\"'<>)]+", html)) <= {"http://www.w3.org/2000/svg"}
    assert not re.search(r"\b(src|href)=\"(?!#)", html)


def test_page_budget_for_a_2x256_lstm_at_2000_characters(tmp_path):
    ckpt = make_run(tmp_path, "lstm", **{"model.hidden_size": 256, "train.seq_len": 128})
    text = (CORPUS * 10)[:2000]
    result = inspect_run(ckpt, prime=text, out=tmp_path / "big.html")
    assert result.chars == 2000
    assert result.size_bytes <= 10_000_000


# ---------------------------------------------------------------------------- the CLI


def cli(*args):
    import typer

    from charlm.cli import app
    from charlm.cli_look import register

    register(app)  # idempotent: cli.py may already have done it
    assert isinstance(app, typer.Typer)
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_inspect_writes_the_page_into_the_run_and_prints_its_path(tmp_path):
    ckpt = make_run(tmp_path, "gru")
    result = cli("inspect", "--run", ckpt.parent, "--chars", 50)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(ckpt.parent / "inspect.html")
    data, _ = read_page(ckpt.parent / "inspect.html")
    n_val = len(CORPUS) - int(len(CORPUS) * 0.9)
    assert data["text"] == list(CORPUS[-n_val:][:50])  # the validation split's start
    result = cli("inspect", "--runs-dir", tmp_path, "--run", ckpt, "--text", tmp_path / "x.txt")
    assert result.exit_code == 1 and "--text file" in result.stderr
    result = cli("inspect", "--run", ckpt, "--text", tmp_path / "x.txt", "--prime", "x")
    assert result.exit_code == 1 and "not both" in result.stderr
    result = cli("inspect", "--run", ckpt, "--chars", 0)
    assert result.exit_code == 1 and "--chars" in result.stderr
    (tmp_path / "other.txt").write_text("héllo wörld", encoding="utf-8")
    out = tmp_path / "o" / "page.html"
    result = cli("inspect", "--run", ckpt, "--text", tmp_path / "other.txt", "--out", out)
    assert result.exit_code == 0 and "left out" in result.stderr
    assert read_page(out)[0]["text"] == list("hllo wrld")


def test_register_is_idempotent():
    import typer

    from charlm.cli_look import register

    app = typer.Typer()
    register(app)
    register(app)
    names = [c.name for c in app.registered_commands]
    assert sorted(names) == ["gradients", "inspect", "plot"]


def test_the_look_inside_section_shows_real_pictures_and_real_options():
    """docs/look-inside.md (the README's "Look inside" section): its pictures exist and stay
    small, and every option its commands use is one the command has."""
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "look-inside.md").read_text(encoding="utf-8")
    pictures = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", doc)
    assert len(pictures) >= 3
    for picture in pictures:
        assert (root / picture).stat().st_size < 300_000, picture
    commands = re.findall(r"^\s*charlm (inspect|gradients|plot)\b(.*)$", doc, re.M)
    assert {c for c, _ in commands} == {"inspect", "gradients", "plot"}
    for command, rest in commands:
        help_text = cli(command, "--help").stdout
        for flag in re.findall(r"(?<![\w-])(--[a-z-]+)", rest):
            assert flag in help_text, f"charlm {command} has no {flag}"
