"""Property-based tests (hypothesis): `--set` parsing fails only with ValueError and puts typed
values into the config exactly as typed; sampling always picks a valid character, honours
temperature 0, top-k and top-p, and refuses out-of-range options with a ValueError."""

from __future__ import annotations

import math
import typing
from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import SECTIONS, Config, all_keys, apply_overrides, parse_override, validate
from charlm.sample import check_sampling_options, pick_next

FAST = settings(max_examples=80, deadline=None, database=None, derandomize=True)


pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = {f"{s}.{f.name}": typing.get_type_hints(cls)[f.name]
         for s, cls in SECTIONS.items() for f in fields(cls)}
KEYS_OF = {kind: sorted(k for k, a in TYPES.items() if a is kind or a == kind | None)
           for kind in (int, float, bool, str)}

# What users type, and what YAML does odd things with: tags, flow collections, anchors,
# dates, hex/octal, special floats, comments.
YAMLISH = st.sampled_from([
    "", " ", "~", "null", "[1, 2", "{a: 1}", "[1, 2]", "!!int abc", "!!float x", "!!binary ###",
    "!!python/object/apply:os.system ['true']", "*alias", "&a [*a]", "2001-12-14", "1:30",
    "0x1F", "0o17", "017", "1_000", "1e400", "-.inf", ".nan", "yes", "Off", "1e-3", "# c",
    "'quoted'", '"x', "=", "a=b", "- 1", "!!timestamp bad", "!!set {a}", "\x00", "\ud7ff",
])


@FAST
@given(key=st.one_of(st.sampled_from(all_keys()), st.sampled_from(list(SECTIONS)),
                     st.text(max_size=20)),
       value=st.one_of(YAMLISH, st.text(max_size=30)))
def test_overrides_fail_only_with_value_error(key, value):
    for text in (f"{key}={value}", key, value, f"{key}={value}={value}"):
        try:
            parse_override(text)
            validate(apply_overrides(Config(), [text]))
        except ValueError:
            pass  # the CLI turns it into one `error: ` line


def _typed_value(kind):
    if kind is int:
        return st.integers(-(10**15), 10**15).map(lambda v: (v, str(v)))
    if kind is float:
        return st.one_of(
            st.floats(allow_nan=False, allow_infinity=False).map(lambda v: (v, repr(v))),
            st.integers(-1000, 1000).map(lambda v: (float(v), str(v))),
        )
    return st.booleans().flatmap(lambda v: st.sampled_from(
        [str(v).lower(), str(v), str(v).upper(), "yes" if v else "no"]).map(lambda s: (v, s)))


@FAST
@given(st.sampled_from([int, float, bool]).flatmap(
    lambda kind: st.tuples(st.sampled_from(KEYS_OF[kind]), _typed_value(kind))))
def test_typed_values_round_trip_with_the_field_type(case):
    key, (value, text) = case
    section, name = key.split(".")
    cfg = apply_overrides(Config(), [f"{key}={text}"])
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value), (key, text, got)
    others = {k for k in TYPES if k != key}
    default = Config()
    assert all(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) ==
               getattr(getattr(default, k.split(".")[0]), k.split(".")[1]) for k in others)


NAME_CHARS = st.sampled_from("abcXYZ0189._/-")
TRICKY_NAMES = st.sampled_from(["1e3", "0123", "017", "yes", "true", "Off", "2024-01-01",
                                "1_000", "0x1F", ".5", "-1", "1:30", ".inf", "-", "3.14"])


@FAST
@given(key=st.sampled_from(KEYS_OF[str]),
       text=st.one_of(TRICKY_NAMES, st.text(NAME_CHARS, min_size=1, max_size=12)))
def test_text_values_are_kept_exactly_as_typed(key, text):
    """`--set data.source=1e3` names the file `1e3`, not `1000.0`."""
    section, name = key.split(".")
    cfg = apply_overrides(Config(), [f"{key}={text}"])
    assert getattr(getattr(cfg, section), name) == text


def test_null_clears_an_optional_number():
    assert apply_overrides(Config(), ["train.max_time=null"]).train.max_time is None


# ---------------------------------------------------------------------------- sampling


LOGITS = st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=40)
ANY_LOGITS = st.lists(st.floats(width=32), min_size=1, max_size=40)  # NaN and inf too
TEMPERATURE = st.one_of(st.floats(1e-3, 10.0), st.sampled_from([1e-300, 5e-324, 1e300]))


@FAST
@given(logits=LOGITS, temperature=TEMPERATURE, top_k=st.integers(0, 50),
       top_p=st.floats(1e-3, 1.0), seed=st.integers(0, 2**32 - 1))
def test_pick_is_a_valid_index_within_the_top_k(logits, temperature, top_k, top_p, seed):
    idx = int(pick_next(torch.tensor(logits), temperature, top_k, top_p,
                        torch.Generator().manual_seed(seed)))
    assert 0 <= idx < len(logits)
    if top_k:
        kth = sorted(logits, reverse=True)[min(top_k, len(logits)) - 1]
        assert logits[idx] >= kth


def test_top_k_holds_when_temperature_rounds_logits_together():
    """Found by hypothesis: with temperature 1e300 (and even after subtracting the max),
    1e-45 and 0 become equal, so top-k applied afterwards let 0-logits in."""
    logits = [0.0] * 5 + [1.0] * 6 + [0.0] + [1.0] * 2 + [1.401298464324817e-45]
    picked = {int(pick_next(torch.tensor(logits), 1e300, 9, 1.0,
                            torch.Generator().manual_seed(seed))) for seed in range(200)}
    assert all(logits[i] > 0 for i in picked)
    assert len(picked) == 9  # the huge temperature makes the nine survivors equally likely


@FAST
@given(logits=ANY_LOGITS, temperature=TEMPERATURE, top_k=st.integers(0, 50),
       top_p=st.floats(1e-3, 1.0), seed=st.integers(0, 2**32 - 1))
def test_pick_survives_non_finite_logits(logits, temperature, top_k, top_p, seed):
    """A diverged model's NaN/inf logits never crash sampling, and NaN is never chosen while
    some logit is a number."""
    idx = int(pick_next(torch.tensor(logits), temperature, top_k, top_p,
                        torch.Generator().manual_seed(seed)))
    assert 0 <= idx < len(logits)
    if not all(math.isnan(x) for x in logits):
        assert not math.isnan(logits[idx])


@FAST
@given(logits=LOGITS, top_k=st.integers(0, 50), top_p=st.floats(1e-3, 1.0))
def test_temperature_zero_is_argmax(logits, top_k, top_p):
    idx = int(pick_next(torch.tensor(logits), 0.0, top_k, top_p, None))
    assert logits[idx] == max(logits)


@FAST
@given(logits=LOGITS, temperature=st.floats(0.05, 5.0), data=st.data())
def test_top_p_below_the_largest_probability_is_greedy(logits, temperature, data):
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, -1)
    top_p = data.draw(st.floats(1e-6, max(float(probs.max()) - 1e-6, 1e-6)))
    idx = int(pick_next(torch.tensor(logits), temperature, 0, top_p,
                        torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))))
    assert logits[idx] == max(logits)


@FAST
@given(length=st.integers(-3, 3), temperature=st.floats(), top_k=st.integers(-3, 3),
       top_p=st.floats())
def test_sampling_options_are_accepted_or_a_value_error(length, temperature, top_k, top_p):
    valid = length >= 0 and 0 <= temperature < math.inf and top_k >= 0 and 0 < top_p <= 1
    if valid:
        check_sampling_options(length, temperature, top_k, top_p)
    else:
        with pytest.raises(ValueError, match="--"):
            check_sampling_options(length, temperature, top_k, top_p)
