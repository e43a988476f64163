"""A run directory's bookkeeping: opening a new run, or the one to resume (refusing a resume
that would change the model or the data order, or whose budget is spent), its corpus checked
against what the run recorded, `metrics.csv`, and the checkpoints `last.pt` and `best.pt` with
every rank's RNG, data position and hidden state (:mod:`charlm.train` runs the loop)."""

from __future__ import annotations

import csv
import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from . import distributed
from .cells.fused import gemm
from .config import Config, apply_overrides, from_dict, load_config, validate
from .data import check_corpus, check_lengths, load_dataset, missing_corpus
from .device import cuda_rng_state, set_cuda_rng_state
from .model import count_parameters, map_state
from .sources import absolute_source

METRIC_FIELDS = ["step", "elapsed_s", "train_loss", "val_loss", "val_bpc", "lr", "grad_norm",
                 "tokens_per_s"]
# Keys that must not change on --resume: the data order and the model depend on them.
RESUME_LOCKED = ["data.source", "data.val_fraction", "model.*", "train.batch_size",
                 "train.seq_len", "train.seed", "train.stateful"]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_compatible(saved: Config, new: Config) -> None:
    """Refuse a resume whose config changes the model or the data order."""
    a, b = _flat(saved.to_dict()), _flat(new.to_dict())
    changed = [k for k in a if a[k] != b.get(k) and any(
        k == lock or (lock.endswith(".*") and k.startswith(lock[:-1])) for lock in RESUME_LOCKED)]
    if changed:
        details = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume with a different config ({details}); resume with the run's own "
            "config (omit --config) or start a new run with --name"
        )


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":  # this run's own GPU only: a resume may see fewer GPUs
        state["cuda"] = cuda_rng_state(device)
    return state


def rank_part(ckpt: dict, ctx: distributed.Context) -> dict:
    """This rank's RNG state, data position, hidden state and GEMM backends from a
    checkpoint: plain values when it was written by one process, lists indexed by rank when by
    several. Checkpoints from before the backends were kept have none ({})."""
    part = {k: ckpt[k][ctx.rank] if ctx.active else ckpt[k]
            for k in ("rng", "data_state", "hidden_state")}
    backends = ckpt.get("gemm_backends", {})
    part["gemm_backends"] = backends[ctx.rank] if ctx.active and backends else backends
    return part


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        set_cuda_rng_state(state["cuda"], device)


def restore_process(part: dict, device: torch.device) -> None:
    """What a checkpoint's :func:`rank_part` sets in this process for an exact resume: the RNG
    states, and the GEMM backends the run multiplied on."""
    set_rng_state(part["rng"], device)
    gemm.restore(part["gemm_backends"])


@dataclass
class TrainState:
    """The loop's own state: what a checkpoint holds besides the model, the optimizer, the
    data position and the RNGs (each saved from its own object)."""

    step: int = 0
    best_val_loss: float = math.inf
    elapsed_s: float = 0.0  # seconds of training; evaluation excluded
    hidden: object = None  # the carried recurrent state (None between random windows)

    def state_dict(self) -> dict:
        return {"step": self.step, "best_val_loss": self.best_val_loss,
                "elapsed_s": self.elapsed_s}


class MetricsLog:
    """`metrics.csv`: one row every `log_interval` steps and one per evaluation; written by
    rank 0 alone."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def start(self) -> None:
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, METRIC_FIELDS).writeheader()

    def truncate(self, step: int) -> None:
        """On resume, drop rows a crashed run logged after its last checkpoint."""
        if not self.path.is_file():
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= step]
        text_rows = [",".join(METRIC_FIELDS)] + [
            ",".join(str(r.get(k, "")) for k in METRIC_FIELDS) for r in rows]
        ckpt_io.atomic_write_text(self.path, "\n".join(text_rows) + "\n")

    def write(self, **row) -> None:
        if not distributed.is_main():  # one metrics file, written by rank 0
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, METRIC_FIELDS).writerow(row)


class Checkpointer:
    """Writes `last.pt` and `best.pt`. Saving is a collective under torchrun: every rank's
    RNG, data position and hidden state are gathered (for an exact resume of each rank), so all
    ranks call `save` at the same steps, and rank 0 writes the file."""

    def __init__(self, ctx, run_dir: Path, runs_dir: Path, cfg: Config, ds, model, optimizer,
                 batcher, device: torch.device) -> None:
        self.ctx, self.run_dir, self.runs_dir, self.cfg, self.ds = ctx, run_dir, runs_dir, cfg, ds
        self.model, self.optimizer, self.batcher, self.device = model, optimizer, batcher, device
        self.params = count_parameters(model)

    def save(self, name: str, st: TrainState) -> None:
        ranks = distributed.all_gather_object({
            "rng": rng_state(self.device), "data_state": self.batcher.state_dict(),
            "hidden_state": map_state(lambda x: x.cpu(), st.hidden),
            # the backend each product shape runs on: a resume takes the same ones, bit-exact
            "gemm_backends": gemm.choices()})
        if not self.ctx.is_main:
            return
        per_rank = {k: [r[k] for r in ranks] for k in ranks[0]} if self.ctx.active else ranks[0]
        ckpt_io.save_checkpoint(self.run_dir / name, {
            "config": self.cfg.to_dict(), "vocab": self.ds.vocab.chars,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            **st.state_dict(), **per_rank, "world_size": self.ctx.world_size,
            "params": self.params, "corpus": self.ds.identity(),
        })
        if name == "last.pt":  # LATEST names a run only once it has a checkpoint
            ckpt_io.set_latest(self.runs_dir, self.run_dir)


def load_checked_dataset(cfg: Config, ctx, run_dir: Path, resumed: dict | None):
    """The corpus, checked against what a resumed run recorded of it. Rank 0 fills the
    token cache, then the other ranks map it."""
    recorded = resumed.get("corpus") if resumed is not None else None
    try:
        with distributed.main_first():
            ds = load_dataset(cfg.data)
    except FileNotFoundError:
        if resumed is None:
            raise
        raise missing_corpus(cfg.data.source, recorded, "restore it to resume this run, or "
                             "start a new run with --name") from None
    check_lengths(ds, cfg.train.seq_len)
    if resumed is not None:
        distributed.check_resume_world_size(resumed.get("world_size", 1), ctx, run_dir)
        check_corpus(ds, recorded, "restore that text to resume this run, or start a new run "
                     "on the new text with --name")
        if resumed["vocab"] != ds.vocab.chars:
            raise ValueError(f"cannot resume '{run_dir}': the corpus '{cfg.data.source}' "
                             "changed since the run started (different vocabulary)")
    return ds


def prepare_run(cfg: Config | None, runs_dir: Path, name: str | None, resume: bool,
                 overrides: list[str] | None) -> tuple[Path, Config, dict | None]:
    """Create a new run directory, or load `last.pt` of the run to resume (nothing is lost)."""
    ckpt_io.check_runs_dir(runs_dir)
    if not resume:
        if cfg is None:
            raise ValueError("no config given: pass --config (a preset name or a YAML file)")
        cfg = absolute_config(validate(apply_overrides(cfg, overrides)))
        if name is None:  # default names are unique even for runs started in the same second
            name = ckpt_io.unique_name(ckpt_io.default_run_name(cfg.model.cell),
                                       lambda n: (runs_dir / n).exists())
            name = distributed.broadcast_object(name)  # rank 0's choice, for every rank
        return ckpt_io.new_run_dir(runs_dir, name), cfg, None
    if name is None:
        run_dir = ckpt_io.find_latest(runs_dir)
    else:
        run_dir = runs_dir / ckpt_io.check_run_name(name)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: there is no run '{run_dir}'; start it without "
                                "--resume, or give the --name and --runs-dir of an existing run")
    ckpt_io.remove_stale_temp_files(run_dir)  # left by a writer that was killed mid-save
    # best.pt is a full checkpoint too: it stands in for last.pt when a kill came between the
    # first writes of the two.
    source = next((run_dir / n for n in ("last.pt", "best.pt") if (run_dir / n).is_file()), None)
    if source is None:
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(
                f"--resume: run '{run_dir}' has no checkpoint and no config.yaml (it stopped "
                "before training began); remove that directory or choose another --name")
        # Stopped before its first checkpoint: nothing was learnt, and a run started over from
        # step 0 with the same config and seed is exactly the run that was interrupted.
        resumed, saved = None, load_config(str(run_dir / "config.yaml"))
    else:
        resumed = ckpt_io.load_checkpoint(source)
        saved = validate(from_dict(resumed["config"], origin=str(source)))
    # Keys not locked (max_steps, max_time, device, lr, ...) may change on resume.
    new = validate(apply_overrides(cfg if cfg is not None else saved, overrides))
    if cfg is not None:  # a config file given again names its corpus as the user typed it
        absolute = absolute_config(new)
        new = absolute if absolute.data.source == saved.data.source else new
    check_resume_compatible(saved, new)
    return run_dir, new, resumed


def absolute_config(cfg: Config) -> Config:
    """`cfg` with `data.source` absolute (see `sources.absolute_source`)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source=absolute_source(cfg.data.source)))


def check_budget_left(run_dir: Path, t, step: int, elapsed: float) -> None:
    """A resumed run whose budget is spent would train nothing: say which budget stopped it
    and how to extend it."""
    resume = f"charlm train --name {run_dir.name} --runs-dir {run_dir.parent} --resume"
    if step >= t.max_steps:
        raise ValueError(
            f"run '{run_dir}' has already trained its train.max_steps={t.max_steps} steps; "
            f"to train longer: {resume} --set train.max_steps={2 * t.max_steps}")
    if t.max_time is not None and elapsed >= t.max_time:
        raise ValueError(
            f"run '{run_dir}' has already used its train.max_time={t.max_time:g} s "
            f"({elapsed:.0f} s trained); to train longer: {resume} --set "
            f"train.max_time={2 * t.max_time:g}")
