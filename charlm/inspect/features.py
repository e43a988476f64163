"""Simple features of a text, the units that correlate with them, and gate saturation.

Each feature is one number per character: the state of the text *after reading* that
character, which is all a left-to-right model can know there (so "position in the line" is 0
right after a newline). `top_units` ranks every unit of every traced quantity by |Pearson r|
with each feature, the way Karpathy, Johnson & Fei-Fei (2015) found their quote and
line-length cells by hand; `saturation` is their per-gate plot: for each unit, the fraction of
steps its gate is below 0.1 (left-saturated) and above 0.9 (right-saturated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TAB_WIDTH = 4  # columns of indentation one tab counts for

# key -> (label shown on the page, what it measures)
FEATURES: dict[str, tuple[str, str]] = {
    "line_position": ("position in the line", "characters read since the last newline"),
    "double_quotes": ("inside double quotes", 'between an opening " and its closing "'),
    "single_quotes": ("inside single quotes",
                      "between ' and ' on one line (apostrophes inside words excluded)"),
    "bracket_depth": ("bracket depth", "open (, [ and { not yet closed"),
    "in_word": ("inside a word", "the character is a letter, digit or _"),
    "indentation": ("indentation level",
                    f"leading spaces of the current line (a tab counts {TAB_WIDTH})"),
    "comment": ("inside a # comment", "from a # outside strings to the end of its line"),
    "docstring": ("inside a docstring", 'between """ and """ (or \'\'\' and \'\'\')'),
}


def text_features(text: str) -> dict[str, torch.Tensor]:
    """Every feature of FEATURES for `text`: {key: (n,) float32}, one value per character."""
    n = len(text)
    out = {key: torch.zeros(n) for key in FEATURES}
    column = indent = depth = 0
    at_line_start = True
    in_double = in_single = in_comment = False
    docstring: str | None = None  # the triple quote that opened the docstring we are in
    opened_at = 0  # where it opened: its closing quotes cannot overlap the opening ones
    for j, ch in enumerate(text):
        prev = text[j - 1] if j else ""
        nxt = text[j + 1] if j + 1 < n else ""
        if ch == "\n":
            column, indent, at_line_start = 0, 0, True
            in_single = in_comment = False
        else:
            column += 1
            if at_line_start and ch in " \t":
                indent += TAB_WIDTH if ch == "\t" else 1
            else:
                at_line_start = False
        if not in_comment:
            triple = text[j - 2 : j + 1] if j >= 2 else ""
            if docstring is None and triple in ('"""', "'''") and (j < 3 or text[j - 3] != ch):
                docstring, opened_at = triple, j
            elif docstring is not None and triple == docstring and j >= opened_at + 3:
                docstring = None
            if ch == '"' and prev != "\\":
                in_double = not in_double
            elif ch == "'" and not (prev.isalpha() and nxt.isalpha()) and prev != "\\":
                in_single = not in_single
            elif ch == "#" and not (in_double or in_single or docstring):
                in_comment = True
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth = max(depth - 1, 0)
        values = (column, in_double, in_single, depth, ch.isalnum() or ch == "_", indent,
                  in_comment, docstring is not None)
        for key, value in zip(FEATURES, values, strict=True):
            out[key][j] = float(value)
    return out


@dataclass
class Match:
    quantity: str  # the traced quantity's name, "l0.c"
    unit: int
    r: float  # Pearson correlation with the feature


def top_units(activations: dict[str, torch.Tensor], features: dict[str, torch.Tensor],
              k: int = 5) -> dict[str, list[Match]]:
    """For each feature (n,), the `k` units over every quantity in `activations` ({name:
    (n, units)}) whose values correlate most with it by |Pearson r|; constant units never
    match. All features in one product, so a unit's values are standardised once."""
    names = list(activations)
    acts = torch.cat([activations[q].double() for q in names], dim=1)  # (n, all units)
    owner = [(q, u) for q in names for u in range(activations[q].shape[1])]
    keys = list(features)
    r = correlations(acts, torch.stack([features[f].double() for f in keys], dim=1))
    found = {}
    for j, key in enumerate(keys):
        best = r[:, j].abs().nan_to_num(-1.0).topk(min(k, len(owner))).indices.tolist()
        found[key] = [Match(*owner[i], float(r[i, j])) for i in best if torch.isfinite(r[i, j])]
    return found


def correlations(columns: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Pearson r of each column of `columns` (n, m) with each of `features` (n, K): (m, K);
    NaN where either is constant."""
    a = columns - columns.mean(0)
    b = features - features.mean(0)
    scale = a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :]
    return torch.where(scale > 0, (a.t() @ b) / scale, float("nan"))


def pearson(columns: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson r of each column of `columns` (n, m) with `y` (n,)."""
    return correlations(columns, y[:, None])[:, 0]


def saturation(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For gate values (n, units) in [0, 1]: per unit, the fraction of steps below 0.1 and
    the fraction above 0.9."""
    return (gate < 0.1).float().mean(0), (gate > 0.9).float().mean(0)
