"""Configuration: the `data`, `model` and `train` dataclasses, YAML loading, presets by name,
`--set a.b=c` overrides and validation.

Data flows one way: YAML file (or preset) -> overrides -> `validate()` -> a `Config` that every
other module reads. Values derived from the data (the vocabulary size) are never written in YAML;
`build_model(cfg, vocab_size)` receives them from code. Validation collects every problem and
reports them together, each naming the key and what to do instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


def cell_names() -> list[str]:
    """The valid `model.cell` values: the model registry's keys (charlm.model.REGISTRY is the
    one list of cells; imported here on use, since charlm.model imports this module)."""
    from .model import REGISTRY

    return list(REGISTRY)


NONLINEARITIES = ("tanh", "relu")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
NAMED_CORPORA = ("python-stdlib", "tinyshakespeare", "hello")


@dataclass
class DataConfig:
    source: str = "python-stdlib"  # a file, a directory of text files, or a named corpus
    val_fraction: float = 0.1  # the LAST fraction of the text is validation (as nanoGPT)


@dataclass
class ModelConfig:
    cell: str = "lstm"  # a charlm.model.REGISTRY key: rnn, lstm, gru, mingru, minlstm, ...
    hidden_size: int = 256  # width of every layer (also the embedding size)
    num_layers: int = 2
    dropout: float = 0.0  # between layers (and on embedding/output); 0 disables
    nonlinearity: str = "tanh"  # rnn only: tanh | relu
    num_heads: int = 4  # transformer only; must divide hidden_size
    ff_mult: int = 4  # mingru/minlstm: each block's MLP is ff_mult * hidden_size wide


@dataclass
class TrainConfig:
    batch_size: int = 32
    seq_len: int = 128  # BPTT window; the Transformer's context length
    max_steps: int = 2000
    max_time: float | None = None  # seconds; stop at whichever of max_steps/max_time comes first
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine schedule decays to lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    weight_decay: float = 0.0  # AdamW decay on matrices only (never biases, norms, embeddings)
    grad_clip: float = 5.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 200  # steps between evaluations, checkpoints and samples
    eval_steps: int = 20  # validation batches per evaluation
    log_interval: int = 10  # steps between metric rows
    sample_length: int = 200  # characters sampled at each evaluation; 0 disables
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    stateful: bool = True  # recurrent cells: carry hidden state across windows
    precision: str = "auto"  # auto | fp32 | bf16: auto = bf16 on CUDA and on CPUs with bf16 units
    compile: bool = False  # torch.compile the model (best for the Transformer on CUDA)
    skip_nonfinite: bool = False  # skip a step with a NaN/inf loss or gradient instead of stopping


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. `train.lr`."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


# Names other tools use for charlm's keys (nanoGPT, torch-rnn, Hugging Face, ...): the
# nearest-key suggestion knows them.
ALIASES = {
    "learning_rate": "train.lr", "lr_rate": "train.lr", "max_lr": "train.lr",
    "max_iters": "train.max_steps", "iters": "train.max_steps", "steps": "train.max_steps",
    "num_steps": "train.max_steps", "max_epochs": "train.max_steps",
    "batch": "train.batch_size", "bs": "train.batch_size",
    "block_size": "train.seq_len", "context": "train.seq_len", "seq_length": "train.seq_len",
    "context_len": "train.seq_len", "bptt": "train.seq_len",
    "grad_clip_norm": "train.grad_clip", "max_grad_norm": "train.grad_clip",
    "clip": "train.grad_clip", "wd": "train.weight_decay",
    "warmup": "train.warmup_steps", "warmup_iters": "train.warmup_steps",
    "eval_iters": "train.eval_steps", "log_every": "train.log_interval",
    "eval_every": "train.eval_interval", "time_limit": "train.max_time",
    "hidden": "model.hidden_size", "n_embd": "model.hidden_size", "rnn_size": "model.hidden_size",
    "width": "model.hidden_size", "layers": "model.num_layers", "n_layer": "model.num_layers",
    "n_head": "model.num_heads", "heads": "model.num_heads", "model_type": "model.cell",
    "cell_type": "model.cell", "data": "data.source", "dataset": "data.source",
    "input": "data.source", "path": "data.source", "val_split": "data.val_fraction",
}
MAX_SHOWN = 200  # characters of a user's value that an error message shows at most


def show(value: Any) -> str:
    """``repr(value)``, cut to :data:`MAX_SHOWN` characters: errors echo what was given
    without printing megabytes of it."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text):,} chars)"


def cut(text: str) -> str:
    """A user's name or key, cut to :data:`MAX_SHOWN` characters."""
    text = str(text)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text):,} chars)"


def _suggest(key: str, choices: list[str]) -> str:
    key = str(key)[:MAX_SHOWN]
    tail = key.rsplit(".", 1)[-1].lower()
    if tail in ALIASES and ALIASES[tail] in choices:
        return f" (did you mean '{ALIASES[tail]}'?)"
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    if not close:  # try the last component alone: `lr` -> `train.lr`
        tail = key.rsplit(".", 1)[-1]
        close = [c for c in choices if c.rsplit(".", 1)[-1] == tail][:1]
        if not close:
            tails = {c.rsplit(".", 1)[-1]: c for c in choices}
            near = difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.6)
            close = [tails[near[0]]] if near else []
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------------------- type checking


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {show(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(f"{key} must be an integer, got {show(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key} must be a number, got {show(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key} must be a string, got {show(value)}")
    return value


def from_dict(raw: Any, origin: str = "config") -> Config:
    """Build a `Config` from a nested mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"{origin}: expected a mapping with sections data/model/train, "
            f"got {type(raw).__name__}"
        )
    cfg = Config()
    problems: list[str] = []
    for section, body in raw.items():
        if section not in SECTIONS:
            problems.append(
                f"unknown section '{cut(section)}'{_suggest(str(section), list(SECTIONS))}; "
                "valid sections: data, model, train"
            )
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"section '{cut(section)}' must be a mapping of key: value")
            continue
        for key, value in body.items():
            try:
                set_key(cfg, f"{section}.{key}", value)
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise ValueError(f"{origin}: " + "; ".join(problems))
    return cfg


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set one dotted key (`train.lr`) on `cfg`, type-checked against the dataclass."""
    parts = dotted.split(".")
    if dotted in SECTIONS:
        first = fields(SECTIONS[dotted])[0].name
        raise ValueError(f"'{dotted}' is a section, not a key: set one of its keys, e.g. "
                         f"{dotted}.{first}=...")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ValueError(f"unknown key '{cut(dotted)}'{_suggest(dotted, all_keys())}")
    section, name = parts
    obj = getattr(cfg, section)
    hints = _field_types(type(obj))
    if name not in hints:
        raise ValueError(f"unknown key '{cut(dotted)}'{_suggest(dotted, all_keys())}")
    setattr(obj, name, _coerce(dotted, value, hints[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """Split `train.lr=1e-3` into a key and a YAML-parsed value (text keys keep the text)."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value (e.g. train.lr=1e-3), got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--set expects key=value with a key before '=', got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError):
        value = raw  # PyYAML fails on some bad tags (`!!timestamp x`) with plain errors
    # YAML reads 1e-3 as a string (it wants 1.0e-3); accept what Python accepts as a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    if value is not None and not isinstance(value, str) and _is_text_key(key):
        # a file or cell name that YAML reads as a number, date or bool (`1e3`, `0123`,
        # `yes`) is kept exactly as typed
        value = raw.strip()
    return key, value


def _is_text_key(dotted: str) -> bool:
    section, _, name = dotted.partition(".")
    return section in SECTIONS and _field_types(SECTIONS[section]).get(name) is str


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply `--set key=value` strings to a copy of `cfg`."""
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data),
        model=dataclasses.replace(cfg.model),
        train=dataclasses.replace(cfg.train),
    )
    problems = []
    for text in overrides or []:
        try:
            set_key(cfg, *parse_override(text))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


# The largest values charlm accepts, far past any real use but well inside what torch and
# memory can hold, so that an overflowing number fails here, naming its key, not in torch.
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
MAX_COUNT = 2**62  # steps, intervals, lengths
LIMITS = {  # key: (smallest, largest) for the integer keys
    "model.hidden_size": (1, 2**16),
    "model.num_layers": (1, 1024),
    "model.num_heads": (1, 2**16),
    "model.ff_mult": (0, 64),
    "train.batch_size": (1, 2**24),
    "train.seq_len": (1, 2**24),
    "train.max_steps": (1, MAX_COUNT),
    "train.eval_interval": (1, MAX_COUNT),
    "train.eval_steps": (1, 2**24),
    "train.log_interval": (1, MAX_COUNT),
    "train.warmup_steps": (0, MAX_COUNT),
    "train.sample_length": (0, 10**7),
    "train.seed": (0, MAX_SEED),
}
MAX_ACTIVATIONS = 2**40  # batch * seq_len * hidden_size * num_layers: ~4 TB of float32 at 1


def validate(cfg: Config) -> Config:
    """Check every value's range (and that every number is finite), naming its key; raise
    one ValueError listing every problem."""
    p: list[str] = []
    d, m, t = cfg.data, cfg.model, cfg.train
    if not d.source:
        p.append("data.source must name a file, a directory or one of " + ", ".join(NAMED_CORPORA))
    if not 0.0 <= d.val_fraction < 1.0:
        p.append(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    cells = cell_names()
    if m.cell not in cells:
        p.append(f"model.cell '{cut(m.cell)}' is unknown; valid cells: {', '.join(cells)}")
    if t.precision not in PRECISIONS:
        p.append(f"train.precision must be auto, fp32 or bf16, got '{cut(t.precision)}'")
    if m.nonlinearity not in NONLINEARITIES:
        p.append(f"model.nonlinearity must be tanh or relu, got '{cut(m.nonlinearity)}'")
    for key, (low, high) in LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not low <= value <= high:
            what = "positive" if low == 1 else ">= 0"
            p.append(f"{key} must be {what} and at most {high:,}, got {show(value)}")
    if not 0.0 <= m.dropout < 1.0:
        p.append(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.cell == "transformer" and m.num_heads > 0 and m.hidden_size % m.num_heads:
        p.append(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads "
            f"({m.num_heads})"
        )
    if t.batch_size * t.seq_len * m.hidden_size * m.num_layers > MAX_ACTIVATIONS:
        p.append(f"train.batch_size x train.seq_len x model.hidden_size x model.num_layers "
                 f"({t.batch_size} x {t.seq_len} x {m.hidden_size} x {m.num_layers}) is far "
                 "beyond any machine's memory; make them smaller")
    if t.max_time is not None and not 0 < t.max_time < math.inf:
        p.append(f"train.max_time must be a positive number of seconds or null, got {t.max_time}")
    if not 0 < t.lr <= 1e30:  # AdamW's first step is 10 * lr: larger overflows float32
        p.append(f"train.lr must be a positive number (at most 1e30), got {t.lr}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.schedule not in SCHEDULES:
        p.append(f"train.schedule must be one of {', '.join(SCHEDULES)}, got '{cut(t.schedule)}'")
    if not 0 <= t.weight_decay <= 1e30:
        p.append(f"train.weight_decay must be a number >= 0, got {t.weight_decay}")
    if not 0 <= t.grad_clip <= 1e30:
        p.append(f"train.grad_clip must be a number >= 0 (0 disables clipping), got {t.grad_clip}")
    if p:
        raise ValueError("invalid config: " + "; ".join(p))
    return cfg


# ---------------------------------------------------------------------------- files and presets


def presets_dir() -> Path:
    """Where the shipped presets live: `configs/` in a checkout, `charlm/configs` installed."""
    source_tree = Path(__file__).resolve().parent.parent / "configs"
    if (source_tree / "lstm.yaml").is_file():
        return source_tree
    return Path(__file__).resolve().parent / "configs"  # installed as package data


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """Accept `lstm`, `lstm.yaml`, `configs/lstm.yaml` or any path to a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(f"--config '{name_or_path}' is a directory; give a YAML file or a preset")
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem.endswith(".yml"):
        stem = stem[:-4]
    preset = presets_dir() / f"{stem}.yaml"
    looks_like_preset = len(path.parts) == 1 or (
        len(path.parts) == 2 and path.parts[0] == "configs"
    )
    if looks_like_preset and preset.is_file():
        return preset
    names = preset_names()
    hint = difflib.get_close_matches(stem, names, n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise FileNotFoundError(
        f"config '{name_or_path}' not found: no such file and no such preset{did_you_mean}; "
        f"presets: {', '.join(names)}"
    )


# A YAML number as Python writes it: YAML 1.1 (PyYAML) reads 1e-3 and 1E+4 as strings.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader for charlm configs, with three changes: every common float form
    (``1e-3``, ``.5``, ``1E+4``) is a number; a key given twice in a mapping is an error; and
    anchors/aliases (``&a`` / ``*a``) are refused before anything is expanded, so a small file
    cannot grow into gigabytes ("billion laughs")."""

    yaml_implicit_resolvers = {
        k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not supported in charlm configs; write "
                "the value out", event.start_mark)
        node = super().compose_node(parent, index)
        if getattr(node, "anchor", None):
            raise yaml.composer.ComposerError(
                None, None, "YAML anchors (&name) are not supported in charlm configs",
                node.start_mark)
        return node

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{cut(key)}' (each key may appear once)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


ConfigLoader.add_implicit_resolver(  # after the int resolver: plain integers stay ints
    "tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path}: invalid YAML{where}: {cut(problem)}") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        # PyYAML fails on some bad tagged values (`!!timestamp x`, `!!int x`) with plain errors
        raise ValueError(f"{path}: invalid YAML: a tagged value cannot be read "
                         f"({type(e).__name__})") from None


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file, apply `--set` overrides and validate.

    The overrides replace the file's values *before* anything is checked, so a bad value in
    a file can be fixed from the command line (``--set train.lr=1e-3``)."""
    if name_or_path is None:
        return validate(apply_overrides(Config(), overrides))
    path = resolve_config_path(name_or_path)
    raw = load_yaml(path)
    pending = []
    if isinstance(raw, dict):
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
        for text in overrides or []:
            key, value = parse_override(text)
            section, _, name = key.partition(".")
            if section in SECTIONS and name and isinstance(raw.get(section, {}), dict | None):
                raw[section] = raw.get(section) or {}
                raw[section][name] = value  # from_dict checks the key and its type
            else:
                pending.append(text)  # a malformed override: apply_overrides reports it
    cfg = from_dict(raw, origin=str(path))
    return validate(apply_overrides(cfg, pending))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
