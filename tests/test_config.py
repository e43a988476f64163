"""Config loading, presets by name, overrides and validation errors."""

from __future__ import annotations

import pytest

from charlm.config import (
    Config,
    all_keys,
    apply_overrides,
    load_config,
    parse_override,
    preset_names,
    resolve_config_path,
    validate,
)
from charlm.model import REGISTRY

PRESETS = ["hello", "rnn", "lstm", "gru", "mingru", "minlstm", "transformer"]


def test_all_presets_ship_and_validate():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.model.cell in REGISTRY


def test_presets_start_with_the_command_that_runs_them():
    for name in PRESETS:
        head = resolve_config_path(name).read_text().splitlines()[:4]
        assert any(f"charlm train --config {name}" in line for line in head), name


@pytest.mark.parametrize("spelling", ["lstm", "lstm.yaml", "configs/lstm.yaml"])
def test_config_by_name_from_any_directory(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(spelling).model.cell == "lstm"


def test_config_by_absolute_path(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  cell: gru\ntrain:\n  lr: 0.01\n")
    cfg = load_config(str(path))
    assert (cfg.model.cell, cfg.train.lr) == ("gru", 0.01)


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["train.lr=1e-3", "train.max_time=30", "model.cell=gru",
                                     "train.stateful=false", "train.max_steps=7"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_time == 30.0 and cfg.train.max_steps == 7
    assert cfg.model.cell == "gru" and cfg.train.stateful is False


def test_override_does_not_mutate_input():
    base = Config()
    apply_overrides(base, ["train.lr=0.5"])
    assert base.train.lr == Config().train.lr


@pytest.mark.parametrize("text, fragment", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("lr=1", "did you mean 'train.lr'"),
    ("model.hiden_size=3", "did you mean 'model.hidden_size'"),
    ("train.lr", "key=value"),
    ("train.max_steps=abc", "must be an integer"),
    ("train.stateful=maybe", "true or false"),
])
def test_override_errors_name_the_key(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        apply_overrides(Config(), [text])


def test_parse_override_values():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


@pytest.mark.parametrize("override, fragment", [
    ("model.cell=lstmm", "valid cells: " + ", ".join(REGISTRY)),
    ("model.hidden_size=0", "model.hidden_size must be positive"),
    ("model.dropout=1.5", "model.dropout must be in"),
    ("train.batch_size=-1", "train.batch_size must be positive"),
    ("data.val_fraction=1", "data.val_fraction"),
    ("train.lr=0", "train.lr must be a positive number"),
    ("model.nonlinearity=sigmoid", "tanh or relu"),
])
def test_validation_errors(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate(apply_overrides(Config(), [override]))


def test_validation_reports_every_problem_together():
    with pytest.raises(ValueError) as info:
        validate(apply_overrides(Config(), ["model.hidden_size=0", "train.seq_len=0"]))
    assert "hidden_size" in str(info.value) and "seq_len" in str(info.value)


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  cell: lstm\n   oops: [\n")
    with pytest.raises(ValueError, match="invalid YAML at line"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(str(listy))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  hidden: 3\n")
    with pytest.raises(ValueError, match="did you mean 'model.hidden_size'"):
        load_config(str(unknown))


def test_missing_config_suggests_presets():
    with pytest.raises(FileNotFoundError, match="did you mean 'lstm'"):
        load_config("lstn")


def test_vocab_size_is_not_a_config_key():
    assert not any("vocab" in key for key in all_keys())
