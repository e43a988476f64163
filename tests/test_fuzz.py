"""A fuzzer for the command line: generated bad arguments, YAML files and `--set` values,
driven in-process through every command. Whatever the input, charlm must answer with exit code
0, 1, 2 or 130, never a traceback, an error of a few short lines, and no change to a run that
already exists. Derandomized (the same examples every run) and bounded to about a minute;
counterexamples it found are kept as explicit examples (``@example``) and in test_hostile.py.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from charlm.config import all_keys
from tests.conftest import invoke, sets, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

# Keys whose *valid* values could make a fuzzed run slow or huge: the fuzzer gives them only
# values that validation must refuse. Every other key gets anything.
COSTLY = {"model.hidden_size", "model.num_layers", "model.num_heads", "train.batch_size",
          "train.seq_len", "train.max_steps", "train.max_time", "train.eval_steps",
          "train.eval_interval", "train.sample_length", "train.log_interval", "data.source",
          "train.device", "train.compile"}
REFUSED = ["-1", "0", "1e400", "-1e400", ".nan", ".inf", "1180591620717411303424", "abc",
           "[1, 2]", "{a: 1}", "''", "!!python/object/apply:os.system ['true']", "*x", "&x 1",
           "null", "true", "1.5e+30"]
ANY_VALUE = st.one_of(
    st.sampled_from(REFUSED + ["1e-3", ".5", "2", "0.1", "tanh", "relu", "cosine", "gru"]),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(string.printable, max_size=30),
)
KEYS = st.one_of(st.sampled_from(all_keys()),
                 st.sampled_from(["train.learning_rate", "model", "x.y", "train.", ".lr",
                                  "train.lr.extra", "", "=", "model.cell_type"]),
                 st.text(string.ascii_letters + "._", max_size=12))


@st.composite
def set_pair(draw) -> str:
    key = draw(KEYS)
    value = draw(st.sampled_from(REFUSED)) if key in COSTLY else draw(ANY_VALUE)
    return f"{key}={value}" if draw(st.booleans()) or not key else key


@st.composite
def yaml_text(draw) -> str:
    """A YAML config: sections of keys and values, or something that is not one at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["", "- a\n- b\n", "just text", "a: [unclosed", "\t:\n",
                                     "train: 5\n", "x: &a [1]\ny: *a\n", "train:\n  lr: 1\n"
                                     "  lr: 2\n", "\x00\x01", "model: {cell: lstm}\nmodel: {}\n"]))
    lines = []
    for section in draw(st.lists(st.sampled_from(["data", "model", "train", "optim"]),
                                 max_size=3)):
        lines.append(f"{section}:")
        for _ in range(draw(st.integers(0, 3))):
            key = f"{section}.{draw(st.sampled_from([k.split('.')[1] for k in all_keys()]))}"
            value = draw(st.sampled_from(REFUSED)) if key in COSTLY else draw(ANY_VALUE)
            lines.append(f"  {key.split('.')[1]}: {value}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A runs directory holding one finished run, a corpus and a few hostile files."""
    root = tmp_path_factory.mktemp("fuzz")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i} of the text\n" for i in range(300)))
    runs = root / "runs"
    result = invoke("train", "--config", "lstm", "--runs-dir", runs, "--name", "r",
                    *sets(tiny_overrides(corpus, "lstm", 4)))
    assert result.exit_code == 0, result.stderr
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "empty.txt").write_text("")
    return root, corpus, runs


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check(result, run_files_before, runs) -> None:
    text = result.stdout + result.stderr
    assert result.exit_code in (0, 1, 2, 130), (result.exit_code, text[-2000:])
    assert "Traceback" not in text, text[-2000:]
    if result.exit_code == 1:
        errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and len(errors[0]) <= 1500, result.stderr[-2000:]
        # every input is foreseen: none reaches the catch-all, none shows torch's C++ frames
        assert "unexpected" not in errors[0] and "frame #" not in errors[0], errors[0][:2000]
    now = snapshot(runs / "r")
    assert now == run_files_before, "a command changed an existing run"


# No shrinking phase: a failure is reported as found (shrinking a CLI run can take minutes).
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(config=yaml_text(), extra=st.lists(set_pair(), max_size=3),
       name=st.one_of(st.none(), st.sampled_from(["r", "LATEST", "../x", "a/b", ".x", "ok",
                                                   "x" * 300])))
@example(config="train:\n  lr: 1e-3\n", extra=[], name="r")  # the run exists: refused
@example(config="train:\n  weight_decay: .nan\n", extra=[], name=None)
@example(config="", extra=["train.seed=1180591620717411303424"], name=None)
def test_train_never_breaks(world, config, extra, name):
    root, corpus, runs = world
    before = snapshot(runs / "r")
    path = root / "fuzz.yaml"
    path.write_text(config, encoding="utf-8", errors="surrogatepass")
    base = tiny_overrides(corpus, "lstm", 2) + ["train.sample_length=0"]
    args = ["train", "--config", path, "--runs-dir", runs, *sets(base + extra)]
    if name is not None:
        args += ["--name", name]
    check(invoke(*args), before, runs)


@FUZZ
@given(run=st.sampled_from(["RUN", "RUN/last.pt", "RUN/config.yaml", "missing", "BIN", ""]),
       length=st.one_of(st.integers(-5, 40), st.just(10**30)),
       temperature=st.floats(allow_nan=True, allow_infinity=True),
       top_k=st.integers(-(2**70), 2**70), top_p=st.floats(allow_nan=True, allow_infinity=True),
       prime=st.text(max_size=20), seed=st.one_of(st.none(), st.integers(-(2**70), 2**70)))
def test_sample_never_breaks(world, run, length, temperature, top_k, top_p, prime, seed):
    root, _, runs = world
    before = snapshot(runs / "r")
    run = run.replace("RUN", str(runs / "r")).replace("BIN", str(root / "binary.bin"))
    args = ["sample", "--runs-dir", runs, "--length", length, "--temperature", temperature,
            "--top-k", top_k, "--top-p", top_p, "--prime", prime]
    args += ["--run", run] if run else []
    args += ["--seed", seed] if seed is not None else []
    check(invoke(*args), before, runs)


@FUZZ
@given(command=st.sampled_from(["eval", "compare", "bench", "sample", "nonsense"]),
       data=st.sampled_from(["BIN", "EMPTY", "missing.txt", "ROOT", "CORPUS", None]),
       params=st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["1e400", "-1", "0",
                                                                          "1M", "nan"])),
       junk=st.lists(st.text(string.printable, max_size=10), max_size=3))
def test_other_commands_never_break(world, command, data, params, junk):
    root, corpus, runs = world
    before = snapshot(runs / "r")
    files = {"BIN": root / "binary.bin", "EMPTY": root / "empty.txt", "ROOT": root,
             "CORPUS": corpus}
    args: list = [command]
    if command == "eval":
        args += ["--runs-dir", runs]
        if data is not None:
            args += ["--data", files.get(data, root / data)]
    elif command == "compare":
        # contenders that cannot train (missing presets, bad sizes): refused before training
        args += ["missing-preset", *junk, "--runs-dir", runs, "--out", runs / "r"]
        if params is not None:
            args += ["--params", params]
    elif command == "bench":
        args += ["--quick", "--repeats", "0", "--cells", ",".join(junk) or "lstm"]
    else:
        args += junk
    check(invoke(*args), before, runs)
