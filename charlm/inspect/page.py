"""Turn what `collect` gathered into one self-contained HTML page.

Everything is inline: CSS, JS and data. Numbers per character (loss, entropy, top-5) go into a
JSON block; the activations are quantized to one byte each (gates and attention weights as
v * 255; values in [-1, 1] as (v + 1) * 127.5; unbounded ones likewise after dividing by the
unit's largest |value|, kept beside them), laid out unit by unit so one unit is one contiguous
run of bytes, deflated and base64-encoded. The page inflates them with the browser's own
DecompressionStream: no URL is ever fetched.

Hostile text cannot break out: the JSON escapes <, >, & and the line separators, base64 has
no markup characters, the script only ever writes corpus text with textContent, and the
Content-Security-Policy allows no network and no script but the page's own (by its hash).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import zlib
from importlib import resources

import torch

from .collect import Collected, kind_of, layer_of
from .features import FEATURES, saturation, text_features, top_units

# What each traced quantity is called on the page (by its name in the trace; unknown names
# are shown as they are).
TITLES = {
    "h": "hidden state", "c": "cell state", "i": "input gate", "f": "forget gate",
    "g": "candidate (tanh)", "o": "output gate", "r": "reset gate", "z": "update gate",
    "n": "candidate (tanh)", "attn": "attention weights", "x": "residual stream after the block",
}
NOTES = {
    "gate": "a gate: 0 = closed, 1 = open (sequential colours)",
    "signed": "in [-1, 1] (diverging colours: blue negative, red positive)",
    "free": "unbounded: coloured by tanh(value), the value itself is shown on hover",
}


def quantize(values: torch.Tensor, kind: str) -> tuple[torch.Tensor, list[float] | None]:
    """values (n, units) -> (uint8 (units, n), per-unit scale or None); see the docstring."""
    values = values.float().t()  # (units, n): one unit's values contiguous
    if kind == "gate":
        return (values * 255).round().clamp(0, 255).to(torch.uint8), None
    scale = None
    if kind == "free":
        peak = values.abs().amax(dim=1).clamp_min(1e-12)
        scale = [_round_up(float(p)) for p in peak]
        values = values / torch.tensor(scale)[:, None]
    q = ((values.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return q, scale


def _round_up(x: float) -> float:
    """x rounded up to 4 significant digits (so |value| / scale never exceeds 1)."""
    digits = 3 - math.floor(math.log10(x))
    return math.ceil(x * 10**digits) / 10**digits


def page_data(c: Collected, meta: dict) -> tuple[dict, bytes]:
    """The page's JSON data and its raw (uncompressed) activation bytes."""
    n = len(c.text)
    chunks, offset = [], 0

    def add(array: torch.Tensor) -> int:
        nonlocal offset
        start = offset
        chunks.append(array.contiguous().numpy().tobytes())
        offset += array.numel()
        return start

    quantities, attention, saturations = [], [], []
    for name, values in c.units.items():
        kind, q = kind_of(c.kinds, name), name.split(".", 1)[1]
        packed, scale = quantize(values, kind)
        quantities.append({"name": name, "layer": layer_of(name), "q": q, "kind": kind,
                           "units": values.shape[1], "offset": add(packed), "scale": scale,
                           "title": TITLES.get(q, q), "note": NOTES[kind]})
        if kind == "gate":
            left, right = saturation(values)
            saturations.append({"quantity": name, "layer": layer_of(name), "q": q,
                                "title": TITLES.get(q, q), "left": _round(left),
                                "right": _round(right)})
    for name, weights in c.attention.items():  # (heads, n, width)
        q = name.split(".", 1)[1]
        packed = (weights * 255).round().clamp(0, 255).to(torch.uint8)
        attention.append({"name": name, "layer": layer_of(name), "q": q, "kind": "attention",
                          "heads": weights.shape[0], "width": weights.shape[2],
                          "offset": add(packed), "title": TITLES.get(q, q)})

    features, absent = [], []
    varying = {key: values for key, values in text_features(c.text).items()
               if c.units and n >= 2 and not bool((values == values[0]).all())}
    matches = top_units(c.units, varying) if varying else {}
    for key in FEATURES:
        label, help_text = FEATURES[key]
        if key not in varying:
            absent.append(label)
            continue
        top = [{"quantity": m.quantity, "unit": m.unit, "r": round(m.r, 3)} for m in matches[key]]
        features.append({"key": key, "label": label, "help": help_text, "top": top,
                         "values": [int(v) for v in varying[key].tolist()]})

    k = c.top_ids.shape[1]
    data = {
        "meta": meta,
        "text": list(c.text),
        "vocab": list(meta.pop("vocab")),
        "topK": k,
        "loss": _round(c.loss_bits),
        "entropy": _round(c.entropy_bits),
        "top": c.top_ids.reshape(-1).tolist(),
        "topP": _round(c.top_probs.reshape(-1)),
        "quantities": quantities,
        "attention": attention,
        "features": features,
        "absentFeatures": absent,
        "saturation": saturations,
        "blobBytes": offset,
    }
    return data, b"".join(chunks)


def _round(values: torch.Tensor, digits: int = 3) -> list:
    return [None if not math.isfinite(v) else round(v, digits) for v in values.tolist()]


def script_json(data: dict) -> str:
    """JSON that is safe inside a <script> element: no <, >, & or line separators, so
    neither `</script>` nor `<!--` can appear, whatever the corpus holds."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def render(c: Collected, meta: dict, title: str, lede: str) -> str:
    """The whole page as a string."""
    data, raw = page_data(c, dict(meta))
    script = _asset("page.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
           "img-src data:; base-uri 'none'; form-action 'none'")
    fields = {
        "csp": csp,
        "title": _html(title),
        "lede": _html(lede),
        "chars": f"{len(c.text):,}",
        "style": _asset("page.css"),
        "data": script_json(data),
        "blob": base64.b64encode(zlib.compress(raw, 6)).decode("ascii"),
        "script": script,
    }
    # One pass: text that was substituted in is never scanned for placeholders again.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: fields[m.group(1)], _asset("page.html"))


def _html(text: str) -> str:
    import html

    return html.escape(text, quote=True)
