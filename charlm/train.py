"""The training loop: one explicit `while` loop you can read top to bottom (`_train`).

Per step: learning rate -> batch -> forward/backward -> clip (recording the gradient norm
before clipping) -> non-finite check (charlm.nonfinite) -> optimizer step -> carry the
detached hidden state -> log. Every `eval_interval` steps: validation loss, a short sample,
`last.pt` and (if better) `best.pt`. Everything needed for an exact resume is in the
checkpoint: model, optimizer, step, best validation loss, RNG states, the data position, the
carried hidden state and the GEMM backends the run multiplies on; `charlm.runs` keeps that
bookkeeping (a new or resumed run directory, metrics, checkpoints), this module the loop.

Under torchrun the same loop runs in every process (charlm.distributed): the model is wrapped
in DistributedDataParallel, each rank reads its own part of the text, a tiny all-reduce per
step keeps the ranks' decisions identical, and rank 0 alone writes the run directory; the
per-rank RNG, data position and hidden state are gathered into its checkpoints.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt_io
from . import distributed, nonfinite, runs
from .config import Config, config_to_yaml
from .data import (
    RandomBatcher,
    StreamBatcher,
    eval_batches,
)
from .device import (
    autocast,
    configure_math,
    resolve_device,
    resolve_precision,
)
from .evaluate import bits_per_char, estimate_loss
from .model import build_model, detach_state, map_state
from .sample import generate


class TrainingInterrupted(Exception):
    """Ctrl-C/SIGTERM: `last.pt` was saved; the message says how to resume."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    elapsed_s: float
    tokens_per_s: float
    params: int
    warmup_s: float = 0.0  # one-off compiling before the clock started (train.compile)

    @property
    def best_val_bpc(self) -> float:
        return bits_per_char(self.best_val_loss)


def get_lr(step: int, progress: float, t) -> float:
    """Linear warm-up for `t.warmup_steps`, then cosine decay to `lr * min_lr_ratio` over the
    budget. `progress` in [0, 1] is the larger of step/max_steps and elapsed/max_time, so a
    time-budgeted run still anneals."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    if t.schedule == "constant":
        return t.lr
    min_lr = t.lr * t.min_lr_ratio
    return min_lr + 0.5 * (t.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on the weight matrices of linear and recurrent layers only: never
    on biases, norms or embedding tables (token or position). The rule goes by module type
    (an `nn.Embedding`'s table is exempt) and tensor rank, not by parameter name. nanoGPT
    decays every matrix, embeddings included; charlm follows the more common choice of
    leaving lookup tables alone, whose rows a character only updates when it occurs."""
    embedding_tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embedding_tables else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.99), fused=fused or None)



class BudgetBar:
    """The progress bar of the budget that will end the run first: steps (`train.max_steps`)
    or seconds of training (`train.max_time`), so that its ETA is true. It starts in steps and
    switches to seconds once the measured time per step says the clock will run out first."""

    def __init__(self, t, step: int, elapsed: float, enabled: bool) -> None:
        self.t, self.step0, self.elapsed0 = t, step, elapsed
        self.by_time = False
        self.bar = tqdm(total=t.max_steps, initial=step, unit="step", dynamic_ncols=True,
                        disable=not enabled)

    def advance(self, step: int, elapsed: float) -> None:
        t, ran = self.t, step - self.step0
        if not self.by_time and t.max_time is not None and ran >= 3:
            per_step = (elapsed - self.elapsed0) / ran
            if per_step > 0 and step + (t.max_time - elapsed) / per_step < t.max_steps:
                self.by_time = True
                self.bar.unit = "s"
                self.bar.reset(total=round(t.max_time))
                self.bar.update(round(elapsed))
        if self.by_time:
            self.bar.set_description(f"step {step}", refresh=False)
            self.bar.update(max(0, min(round(elapsed), self.bar.total) - self.bar.n))
        else:
            self.bar.update(1)

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(**kw)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def _graceful_stop():
    """SIGINT/SIGTERM set a flag the loop checks between steps, so the checkpoint written on
    interrupt is consistent; a second Ctrl-C stops at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)



def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def train(cfg: Config | None, runs_dir: str | Path = "runs", name: str | None = None,
          resume: bool = False, overrides: list[str] | None = None,
          quiet: bool = False) -> TrainResult:
    """Train `cfg` into `runs_dir/name`, or resume that run, and return a summary.

    With `resume`, `cfg` may be None: the run's own config is used, with `overrides` applied
    (e.g. `train.max_steps=5000` to train longer)."""
    runs_dir = Path(runs_dir)
    # Under torchrun: join the process group; rank 0 alone writes files and prints progress.
    ctx = distributed.setup()
    quiet = quiet or not ctx.is_main
    run_dir, cfg, resumed = runs.prepare_run(cfg, runs_dir, name, resume, overrides)
    # Every rank has checked the run (the collective below waits for all); rank 0 alone then
    # creates and locks it, and its outcome is every rank's.
    lock, created, refused = None, False, distributed.broadcast_object(None)
    if ctx.is_main:
        try:
            if resumed is None and not run_dir.exists():
                ckpt_io.create_run_dir(run_dir)  # atomic: a concurrent creator gets an error
                created = True
            lock = ckpt_io.RunLock(run_dir).acquire()  # one process trains a run at a time
        except ValueError as e:
            if created:
                run_dir.rmdir()
            refused = str(e)
    refused = distributed.broadcast_object(refused)
    if refused:
        raise ValueError(refused)
    try:
        return _train(ctx, cfg, runs_dir, run_dir, resumed, quiet)
    except (TrainingInterrupted, KeyboardInterrupt):
        raise  # the resume command it prints needs the directory
    except BaseException:
        # A run that failed before its first checkpoint (out of memory, a bad device) leaves
        # nothing behind: no half run for `LATEST`, `sample` or `eval` to trip over.
        if created and not ckpt_io.has_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()



def train_step(fwd, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, hidden, grad_clip: float, device: torch.device, ctx,
               precision: str = "fp32"):
    """Forward, backward and clip one batch; the optimizer step is left to the caller, which
    first checks the result is finite. Returns (loss, gradient norm before clipping, the new
    hidden state); loss and norm are 0-d tensors, read by the caller only when it needs them
    (a read is a host sync on a GPU). Under torchrun the loss is the mean over all ranks. The
    forward runs under `precision` (fp32, or bf16 autocast); the loss is taken in float32."""
    with autocast(device, precision):
        logits, new_hidden = fwd(x, hidden)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # clip, recording the norm before clipping (exploding gradients show here)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    loss = loss.detach()
    if ctx.active:  # the global mean: logged, and non-finite on every rank or none
        loss = torch.tensor(distributed.all_mean([loss.item()])[0], dtype=torch.float64)
    return loss, grad_norm, new_hidden


def warm_up_compiled(fwd, model: torch.nn.Module, x: torch.Tensor, hidden, device: torch.device,
                     stateful: bool, precision: str = "fp32") -> float:
    """Compile `fwd` (a `torch.compile`d model) before the clock starts; returns the seconds.

    torch.compile compiles on the first call, forward and backward: run inside the first timed
    step, tens of seconds of compiling would count as training (and the cosine schedule,
    which follows elapsed / max_time, would jump ahead). So one forward and backward on a
    batch of the run's shape runs here, with the carried state as well when the run carries
    one (a second graph), and leaves no trace: the RNG states are restored (dropout draws
    from them) and the gradients dropped; the optimizer is not touched."""
    start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        state = hidden
        for _ in range(2 if stateful and hidden is None else 1):
            with autocast(device, precision):
                logits, state = fwd(x, state)
                loss = F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
            loss.backward()
            state = detach_state(state)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _stop_vote(st: runs.TrainState, stop: dict, ctx) -> bool:
    """Whether to stop after this step; under torchrun all ranks agree, and share one clock."""
    stopping = stop["stop"]
    if ctx.active:
        st.elapsed_s, votes = distributed.all_mean([st.elapsed_s, float(stopping)])
        stopping = votes > 0
    return stopping


def _train(ctx, cfg: Config, runs_dir: Path, run_dir: Path, resumed: dict | None,
           quiet: bool) -> TrainResult:
    """The body of :func:`train` once the run directory is chosen (and locked): the loop."""
    run = _Run(ctx, cfg, runs_dir, run_dir, resumed, quiet)
    t, st, optimizer = run.t, run.st, run.optimizer
    try:
        with _graceful_stop() as stop:
            while not run.done():
                t0 = time.perf_counter()
                # learning rate for this step: the budget that ends first sets the schedule
                progress = st.step / t.max_steps
                if t.max_time:
                    progress = max(progress, st.elapsed_s / t.max_time)
                run.lr = get_lr(st.step, progress, t)
                for group in optimizer.param_groups:
                    group["lr"] = run.lr
                # batch; a wrapped stream starts from a fresh state
                x, y, reset = run.batcher.next()
                x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
                if reset:
                    st.hidden = None
                # forward, backward, clip
                loss, grad_norm, new_hidden = train_step(
                    run.fwd, run.model, optimizer, x, y, st.hidden, t.grad_clip, run.device, ctx,
                    t.precision)
                # the optimizer step, unless non-finite; None: skipped, or nothing more to do
                if run.checks is not None:  # CUDA: the fused AdamW skips a bad step itself
                    stopping = run.apply_deferred(loss, grad_norm, new_hidden, t0, stop)
                else:
                    stopping = run.apply_checked(loss, grad_norm, new_hidden, t0, stop)
                if stopping is None:
                    continue
                # log; evaluate, sample, checkpoint; stop
                run.log()
                run.bar.advance(st.step, st.elapsed_s)
                if st.step % t.eval_interval == 0 or run.done() or stopping:
                    run.evaluate()
                if stopping:
                    raise run.interrupted()
    except KeyboardInterrupt:
        # A second Ctrl-C can land mid-step (batch drawn, weights half-updated): saving then
        # would make a resume silently inexact, so the last checkpoint is kept as it is.
        raise TrainingInterrupted(
            f"stopped at once (second Ctrl-C) during step {st.step + 1}; nothing more was saved. "
            f"Resume from the last checkpoint with: {run.resume_command}") from None
    finally:
        run.bar.close()
    # a resumed run that had nothing left to do (rank 0 decides: it alone sees the files)
    if distributed.broadcast_object(not (run_dir / "last.pt").exists()):
        run.saver.save("last.pt", st)
    # The DDP wrapper's reducer holds the process group: free it now, while the group is
    # alive, not at some later garbage collection after the group was torn down.
    del run.fwd, run.wrapped
    distributed.cleanup()
    return TrainResult(run_dir, st.step, st.best_val_loss, st.elapsed_s, run.tokens_per_s,
                       run.saver.params, run.warmup_s)


class _Run:
    """What :func:`_train`'s loop works with, built (new or resumed) in ``__init__``, and the
    loop's larger phases: the checked optimizer step (:meth:`apply_checked`,
    :meth:`apply_deferred`), logging and evaluation. ``st`` is what checkpoints keep; the
    rest is the logging window and the non-finite streak."""

    def __init__(self, ctx, cfg: Config, runs_dir: Path, run_dir: Path, resumed: dict | None,
                 quiet: bool) -> None:
        t = self.t = cfg.train
        self.ctx, self.run_dir, self.quiet = ctx, run_dir, quiet
        device = self.device = distributed.rank_device(resolve_device(t.device), ctx)
        configure_math(device)  # TF32 tensor cores on CUDA for the float32 matmuls autocast leaves
        # auto becomes what this device does (bf16 where it multiplies bf16 natively), and that
        # is what config.yaml and the checkpoints record: the run says what it really trained in.
        t.precision = resolve_precision(t.precision, device)
        ds = self.ds = runs.load_checked_dataset(cfg, ctx, run_dir, resumed)

        # ---- model, optimizer, data order
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        model = self.model = build_model(cfg, len(ds.vocab)).to(device)
        if ctx.rank:  # the same initial weights on every rank, but each its own dropout masks
            torch.manual_seed(t.seed + ctx.rank)
        optimizer = self.optimizer = make_optimizer(model, t, device)
        self.stateful = model.carries_state and t.stateful
        # Each rank reads its own part of the text: its own streams, or its own random windows.
        self.batcher = (
            StreamBatcher(ds.train, t.batch_size, t.seq_len, ctx.rank, ctx.world_size)
            if self.stateful else
            RandomBatcher(ds.train, t.batch_size, t.seq_len, t.seed, ctx.rank, ctx.world_size))
        self.wrapped = distributed.wrap(model, device, ctx)  # DDP: gradients all-reduced
        self.fwd = torch.compile(self.wrapped) if t.compile else self.wrapped
        self.st = runs.TrainState()
        self.metrics = runs.MetricsLog(run_dir / "metrics.csv")
        if resumed is not None:
            self._resume(resumed)
        elif ctx.is_main:  # config and metrics appear once data, model and device work
            ckpt_io.atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
            self.metrics.start()
        self.saver = runs.Checkpointer(ctx, run_dir, runs_dir, cfg, ds, model, optimizer,
                                       self.batcher, device)
        self.val_batches = list(eval_batches(ds.val, t.batch_size, t.seq_len, t.eval_steps))
        self.interactive = not quiet and sys.stderr.isatty()
        self.bar = BudgetBar(t, self.st.step, self.st.elapsed_s, enabled=self.interactive)
        self.tokens_per_step = t.batch_size * t.seq_len * ctx.world_size  # all ranks together
        self.loss_sum, self.loss_count, self.window_steps = 0.0, 0, 0
        self.window_start = time.perf_counter()
        self.tokens_per_s, self.last_val, self.lr = 0.0, None, t.lr
        self.skipped = 0  # consecutive non-finite steps
        self.grad_norm: float | None = None
        self.checks = (nonfinite.DeferredChecks(device)
                       if nonfinite.defers_checks(device, ctx, optimizer) else None)
        self.resume_command = (f"{distributed.launch_command(ctx)} --name {run_dir.name} "
                               f"--runs-dir {runs_dir} --resume")
        model.train()
        self.warmup_s = 0.0
        if t.compile:  # compile now, untimed: not out of train.max_time
            x0 = torch.zeros(t.batch_size, t.seq_len, dtype=torch.long, device=device)
            self.warmup_s = warm_up_compiled(self.fwd, model, x0, self.st.hidden, device,
                                             self.stateful, t.precision)
            if not quiet:
                print(f"compiled the model in {self.warmup_s:.1f} s (before the clock: not "
                      "counted in train.max_time)", file=sys.stderr, flush=True)

    def _resume(self, resumed: dict) -> None:
        """Model, optimizer, this rank's data position, RNG, hidden state and GEMM backends
        as the checkpoint left them; the metrics log cut back to its step."""
        self.model.load_state_dict(resumed["model"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        mine = runs.rank_part(resumed, self.ctx)
        self.batcher.load_state_dict(mine["data_state"])
        runs.restore_process(mine, self.device)
        self.st = runs.TrainState(resumed["step"], resumed["best_val_loss"], resumed["elapsed_s"],
                                  map_state(lambda x: x.to(self.device), mine["hidden_state"]))
        runs.check_budget_left(self.run_dir, self.t, self.st.step, self.st.elapsed_s)
        if self.ctx.is_main:
            self.metrics.truncate(self.st.step)

    def interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(f"interrupted at step {self.st.step}; saved "
                                   f"{self.run_dir / 'last.pt'}. Resume with: "
                                   f"{self.resume_command}")

    def done(self) -> bool:
        t, st = self.t, self.st
        return st.step >= t.max_steps or (t.max_time is not None and st.elapsed_s >= t.max_time)

    def apply_checked(self, loss, grad_norm, new_hidden, t0: float, stop: dict) -> bool | None:
        """CPU (a read is no sync there) and torchrun: read the loss and norm, then apply the
        step, or skip it (``train.skip_nonfinite``: returns None) or stop the run if either
        is non-finite. Returns whether to stop after it."""
        t, st = self.t, self.st
        loss_value, self.grad_norm = float(loss), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(self.grad_norm)):
            self.skipped += 1
            if not (t.skip_nonfinite and self.skipped < nonfinite.MAX_SKIPPED_STEPS):
                self.saver.save("last.pt", st)  # the weights are still the last good ones
                raise nonfinite.error(st.step, t, loss_value, self.skipped, self.run_dir)
            self.optimizer.zero_grad(set_to_none=True)
            st.hidden = None
            if not self.quiet:
                tqdm.write(f"step {st.step + 1}: non-finite loss or gradient, step skipped "
                           "(train.skip_nonfinite)", file=sys.stderr)
            # a skipped step still spends the time budget and still stops on Ctrl-C
            st.elapsed_s += time.perf_counter() - t0
            if _stop_vote(st, stop, self.ctx):
                self.saver.save("last.pt", st)
                raise self.interrupted()
            return None
        # optimizer step; carry the hidden state, detached: gradients stop at the window start
        self.optimizer.step()
        self.skipped = 0
        st.hidden = detach_state(new_hidden) if self.stateful else None
        st.step += 1
        st.elapsed_s += time.perf_counter() - t0
        stopping = _stop_vote(st, stop, self.ctx)
        self.loss_sum, self.loss_count = self.loss_sum + loss_value, self.loss_count + 1
        self.window_steps += 1
        return stopping

    def apply_deferred(self, loss, grad_norm, new_hidden, t0: float, stop: dict) -> bool | None:
        """CUDA with the fused AdamW: the step is applied on the device unless non-finite
        (:class:`.nonfinite.DeferredChecks`), and the bookkeeping read only on logging,
        evaluation and final steps (else returns None). Returns whether to stop."""
        t, st, checks = self.t, self.st, self.checks
        finite = checks.record(loss, grad_norm)
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        if self.stateful:  # a non-finite step's state restarts from zeros
            st.hidden = map_state(lambda h, f=finite: torch.where(f, h, 0.0),
                                  detach_state(new_hidden))
        else:
            st.hidden = None
        st.step += 1
        self.window_steps += 1
        st.elapsed_s += time.perf_counter() - t0
        stopping = _stop_vote(st, stop, self.ctx)
        if not (st.step % t.log_interval == 0 or st.step % t.eval_interval == 0
                or self.done() or stopping):
            self.bar.advance(st.step, st.elapsed_s)
            return None
        tally = checks.settle()
        self.loss_sum += tally["loss_sum"]
        self.loss_count += tally["count"]
        self.grad_norm = tally["grad_norm"]
        if tally["bad"]:
            st.step -= tally["bad"]  # the skipped steps were never applied
            self.window_steps -= tally["bad"]
            first = st.step - tally["count"] + tally["first_bad"] + 1
            self.skipped = tally["longest"]
            if not (t.skip_nonfinite and self.skipped < nonfinite.MAX_SKIPPED_STEPS):
                self.saver.save("last.pt", st)  # finite: the bad steps were never applied
                raise nonfinite.error(first - 1, t, math.nan if tally["loss_bad"] else 0.0,
                                      self.skipped, self.run_dir)
            if not self.quiet:
                tqdm.write(f"steps {first}-{st.step + tally['bad']}: {tally['bad']} non-finite "
                           "step(s) skipped (train.skip_nonfinite)", file=sys.stderr)
        return stopping

    def log(self) -> None:
        """Every ``log_interval`` steps: a metrics row (mean loss and tokens/s of the window
        since the last row) and the bar's numbers."""
        st = self.st
        if not (st.step % self.t.log_interval == 0 and self.loss_count):
            return
        now = time.perf_counter()
        self.tokens_per_s = (self.window_steps * self.tokens_per_step
                             / max(now - self.window_start, 1e-9))
        mean = self.loss_sum / self.loss_count
        self.metrics.write(step=st.step, elapsed_s=f"{st.elapsed_s:.2f}", train_loss=_fmt(mean),
                           lr=f"{self.lr:.6g}", grad_norm=_fmt(self.grad_norm),
                           tokens_per_s=f"{self.tokens_per_s:.0f}")
        self.bar.set_postfix(loss=f"{mean:.3f}",
                             val_bpc=_fmt(self.last_val and bits_per_char(self.last_val), 3),
                             tok_s=f"{self.tokens_per_s:.0f}")
        self.loss_sum, self.loss_count, self.window_start, self.window_steps = 0.0, 0, now, 0

    def evaluate(self) -> None:
        """Validation loss, a sample into samples.txt, a metrics row, then best.pt (if
        better) and last.pt, off the tokens/s clock. Rank 0 scores the plain module (not the
        DDP wrapper: no collectives) and samples while the others wait in the broadcast, so
        all take the same best.pt decision."""
        eval_start, st, t = time.perf_counter(), self.st, self.t
        main = self.ctx.is_main
        val = estimate_loss(self.model, self.val_batches, self.device, t.precision) if main \
            else math.nan
        if t.sample_length and main:
            text = "".join(generate(self.model, self.ds.vocab, "", t.sample_length,
                                    temperature=0.8, seed=t.seed + st.step, device=self.device,
                                    precision=t.precision))
            with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"=== step {st.step} | val bpc {bits_per_char(val):.3f} ===\n{text}\n\n")
            if self.interactive:
                tqdm.write(f"step {st.step} sample: {text[:100]!r}", file=sys.stderr)
        val = self.last_val = distributed.broadcast_object(val)
        # The row is written before the checkpoints: a kill between the two then loses nothing
        # (a resume from the previous checkpoint drops this row and logs it again).
        self.metrics.write(step=st.step, elapsed_s=f"{st.elapsed_s:.2f}", val_loss=_fmt(val),
                           val_bpc=_fmt(bits_per_char(val)), lr=f"{self.lr:.6g}")
        if val < st.best_val_loss:
            st.best_val_loss = val
            self.saver.save("best.pt", st)
        self.saver.save("last.pt", st)
        if not self.interactive and not self.quiet:
            print(f"step {st.step}/{t.max_steps} | val loss {val:.4f} | val bpc "
                  f"{bits_per_char(val):.4f} | {self.tokens_per_s:.0f} tok/s | "
                  f"{st.elapsed_s:.0f}s", file=sys.stderr, flush=True)
        self.window_start += time.perf_counter() - eval_start  # keep tok/s training-only
