"""The training loop: one explicit `while` loop you can read top to bottom.

Per step: learning rate -> batch -> forward/backward -> clip (recording the gradient norm
before clipping) -> non-finite check -> optimizer step -> carry the detached hidden state ->
log. Every `eval_interval` steps: validation loss, a short sample, `last.pt` and (if better)
`best.pt`. Everything needed for an exact resume is in the checkpoint: model, optimizer,
step, best validation loss, RNG states, the data position, the carried hidden state and
the GEMM backends the run multiplies on; `charlm.runs` keeps that bookkeeping (a new or
resumed run directory, metrics, checkpoints), this module the loop.

Under torchrun the same loop runs in every process (charlm.distributed): the model is wrapped
in DistributedDataParallel, each rank reads its own part of the text, a tiny all-reduce per
step keeps the ranks' decisions identical, and rank 0 alone writes the run directory; the
per-rank RNG, data position and hidden state are gathered into its checkpoints.
"""

from __future__ import annotations

import dataclasses
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
from . import distributed, runs
from .cells.fused import gemm
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

# With train.skip_nonfinite, this many non-finite steps in a row stop training: the weights
# themselves have diverged and every further step would be skipped too (an endless loop).
MAX_SKIPPED_STEPS = 100


class TrainingInterrupted(Exception):
    """Ctrl-C/SIGTERM: `last.pt` was saved; the message says how to resume."""


class NonFiniteError(ValueError):
    """The loss or gradient became NaN/inf; the last good checkpoint was kept."""


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


def _defers_checks(device: torch.device, ctx, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the loss and non-finite bookkeeping stays on the device (DeferredChecks).

    On CUDA, where reading a number waits for the whole queue, and only with the fused AdamW
    (which `make_optimizer` picks there): it can skip a step on the device itself. On the CPU
    a read is no sync at all (there is no queue), so the per-step check stays: bit for bit the
    behaviour the exact-resume tests guard. Under torchrun the per-step all-reduce of the loss
    syncs anyway."""
    return device.type == "cuda" and not ctx.active and bool(optimizer.defaults.get("fused"))


class DeferredChecks:
    """The per-step loss sum and non-finite check kept on the device, read at logging steps.

    Every step records its loss and gradient norm into device tensors and hands the fused
    AdamW a `found_inf` flag, with which the kernel itself leaves a non-finite step out
    (weights, moments and step count untouched, as a skipped step on the CPU); the carried
    hidden state of such a step is zeroed on the device (what a fresh state is). `settle()`,
    called on logging, evaluation and checkpoint steps, at the end and before stopping, reads
    everything in one transfer. A finite run logs exactly the numbers of the per-step path:
    the loss sum is float64, added in the same order as Python adds the floats.

    What differs after a non-finite step: it is found at the next settle, not at once. The
    step counter counts it until then (so the learning rate of the steps in between is that
    of one step later), and a run without `train.skip_nonfinite` stops there, with the good
    steps after the bad one kept (the bad one was never applied)."""

    def __init__(self, device: torch.device) -> None:
        def zero(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        self.loss_sum, self.count = zero(torch.float64), zero(torch.int64)
        self.bad, self.first_bad, self.loss_bad = zero(torch.int64), zero(torch.int64), \
            zero(torch.bool)
        self.run, self.longest = zero(torch.int64), zero(torch.int64)  # consecutive bad steps
        self.grad_norm: torch.Tensor | None = None
        self.attempts = 0  # steps recorded since the last settle

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Book one step; returns its device-side `finite` flag (the optimizer's found_inf
        is set from it)."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        bad = ~finite
        self.loss_sum += torch.where(finite, loss.double(), 0.0)
        self.count += finite
        # the index (since the last settle) of the first non-finite step
        self.first_bad = torch.where((self.bad == 0) & bad, self.attempts, self.first_bad)
        self.bad += bad
        self.loss_bad |= ~torch.isfinite(loss)
        self.run = torch.where(finite, 0, self.run + 1)
        self.longest = torch.maximum(self.longest, self.run)
        self.grad_norm = grad_norm
        self.attempts += 1
        return finite

    def settle(self) -> dict:
        """Read the bookkeeping (one device-to-host transfer) and restart it."""
        values = torch.stack([self.loss_sum, self.count.double(), self.bad.double(),
                              self.first_bad.double(), self.loss_bad.double(),
                              self.longest.double()]).tolist()
        out = {"loss_sum": values[0], "count": int(values[1]), "bad": int(values[2]),
               "first_bad": int(values[3]), "loss_bad": bool(values[4]),
               "longest": int(values[5]), "attempts": self.attempts,
               "grad_norm": None if self.grad_norm is None else float(self.grad_norm)}
        for t in (self.loss_sum, self.count, self.bad, self.first_bad, self.longest):
            t.zero_()
        self.loss_bad.zero_()
        self.attempts = 0
        return out


def _stop_vote(st: runs.TrainState, stop: dict, ctx) -> bool:
    """Whether to stop after this step; under torchrun all ranks agree, and share one clock."""
    stopping = stop["stop"]
    if ctx.active:
        st.elapsed_s, votes = distributed.all_mean([st.elapsed_s, float(stopping)])
        stopping = votes > 0
    return stopping


def _non_finite_error(st: runs.TrainState, t, loss_value: float, skipped: int,
                      run_dir: Path) -> NonFiniteError:
    what = "loss" if not math.isfinite(loss_value) else "gradient"
    or_skip = "; or --set train.skip_nonfinite=true to skip such steps"
    if t.skip_nonfinite:  # skipping cannot help: the weights themselves diverged
        what, or_skip = f"loss or gradient in {skipped} consecutive steps", ""
    return NonFiniteError(
        f"non-finite {what} at step {st.step + 1}; training stopped and the last good weights "
        f"are in {run_dir / 'last.pt'}. Lower train.lr (now {t.lr:g}) or set train.grad_clip "
        f"(now {t.grad_clip:g}), then --resume{or_skip}")


def _evaluate(st: runs.TrainState, model, val_batches, ds, t, device, ctx, run_dir: Path,
              metrics: runs.MetricsLog, saver: runs.Checkpointer, lr: float,
              interactive: bool) -> float:
    """Validation loss, a sample into samples.txt, a metrics row, then best.pt (if better)
    and last.pt. Rank 0 scores the plain module (not the DDP wrapper: no collectives) and
    samples while the others wait in the broadcast, so all take the same best.pt decision."""
    val = estimate_loss(model, val_batches, device, t.precision) if ctx.is_main else math.nan
    if t.sample_length and ctx.is_main:
        text = "".join(generate(model, ds.vocab, "", t.sample_length, temperature=0.8,
                                seed=t.seed + st.step, device=device, precision=t.precision))
        with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {st.step} | val bpc {bits_per_char(val):.3f} ===\n{text}\n\n")
        if interactive:
            tqdm.write(f"step {st.step} sample: {text[:100]!r}", file=sys.stderr)
    val = distributed.broadcast_object(val)
    # The row is written before the checkpoints: a kill between the two then loses nothing (a
    # resume from the previous checkpoint drops this row and logs it again).
    metrics.write(step=st.step, elapsed_s=f"{st.elapsed_s:.2f}", val_loss=_fmt(val),
                  val_bpc=_fmt(bits_per_char(val)), lr=f"{lr:.6g}")
    if val < st.best_val_loss:
        st.best_val_loss = val
        saver.save("best.pt", st)
    saver.save("last.pt", st)
    return val


def _train(ctx, cfg: Config, runs_dir: Path, run_dir: Path, resumed: dict | None,
           quiet: bool) -> TrainResult:
    """The body of :func:`train` once the run directory is chosen (and locked)."""
    t = cfg.train
    device = distributed.rank_device(resolve_device(t.device), ctx)  # cuda:LOCAL_RANK
    configure_math(device)  # TF32 tensor cores on CUDA for the float32 matmuls autocast leaves
    # auto becomes what this device does (bf16 where it multiplies bf16 natively), and that is
    # what config.yaml and the checkpoints record: the run says what it really trained in.
    t.precision = resolve_precision(t.precision, device)
    ds = runs.load_checked_dataset(cfg, ctx, run_dir, resumed)

    # ---- model, optimizer, data order
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    model = build_model(cfg, len(ds.vocab)).to(device)
    if ctx.rank:  # the same initial weights on every rank, but each its own dropout masks
        torch.manual_seed(t.seed + ctx.rank)
    optimizer = make_optimizer(model, t, device)
    stateful = model.carries_state and t.stateful
    # Each rank reads its own part of the text: its own streams, or its own random windows.
    batcher = (StreamBatcher(ds.train, t.batch_size, t.seq_len, ctx.rank, ctx.world_size)
               if stateful else RandomBatcher(ds.train, t.batch_size, t.seq_len, t.seed,
                                              ctx.rank, ctx.world_size))
    wrapped = distributed.wrap(model, device, ctx)  # DDP: gradients all-reduced in backward
    fwd = torch.compile(wrapped) if t.compile else wrapped
    st = runs.TrainState()
    metrics = runs.MetricsLog(run_dir / "metrics.csv")
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        mine = runs.rank_part(resumed, ctx)  # this rank's data position, RNG, hidden state
        batcher.load_state_dict(mine["data_state"])
        runs.set_rng_state(mine["rng"], device)
        gemm.restore(mine["gemm_backends"])  # and GEMM backends
        st = runs.TrainState(resumed["step"], resumed["best_val_loss"], resumed["elapsed_s"],
                             map_state(lambda x: x.to(device), mine["hidden_state"]))
        runs.check_budget_left(run_dir, t, st.step, st.elapsed_s)
        if ctx.is_main:
            metrics.truncate(st.step)
    elif ctx.is_main:  # config and metrics appear once data, model and device work
        ckpt_io.atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        metrics.start()
    saver = runs.Checkpointer(ctx, run_dir, runs_dir, cfg, ds, model, optimizer, batcher, device)
    val_batches = list(eval_batches(ds.val, t.batch_size, t.seq_len, t.eval_steps))
    interactive = not quiet and sys.stderr.isatty()
    bar = BudgetBar(t, st.step, st.elapsed_s, enabled=interactive)
    tokens_per_step = t.batch_size * t.seq_len * ctx.world_size  # all ranks together
    loss_sum, loss_count, window_start, window_steps = 0.0, 0, time.perf_counter(), 0
    tokens_per_s, last_val, lr = 0.0, None, t.lr
    skipped = 0  # consecutive non-finite steps
    grad_norm: float | None = None
    checks = DeferredChecks(device) if _defers_checks(device, ctx, optimizer) else None
    resume_command = (f"{distributed.launch_command(ctx)} --name {run_dir.name} "
                      f"--runs-dir {runs_dir} --resume")
    model.train()
    warmup_s = 0.0
    if t.compile:  # compile now, untimed: not out of train.max_time
        x0 = torch.zeros(t.batch_size, t.seq_len, dtype=torch.long, device=device)
        warmup_s = warm_up_compiled(fwd, model, x0, st.hidden, device, stateful, t.precision)
        if not quiet:
            print(f"compiled the model in {warmup_s:.1f} s (before the clock: not counted in "
                  "train.max_time)", file=sys.stderr, flush=True)

    def interrupted() -> TrainingInterrupted:
        return TrainingInterrupted(f"interrupted at step {st.step}; saved {run_dir / 'last.pt'}"
                                   f". Resume with: {resume_command}")

    # ---- the loop
    try:
        with _graceful_stop() as stop:
            while st.step < t.max_steps and (t.max_time is None or st.elapsed_s < t.max_time):
                t0 = time.perf_counter()
                # learning rate for this step: the budget that ends first sets the schedule
                progress = st.step / t.max_steps
                if t.max_time:
                    progress = max(progress, st.elapsed_s / t.max_time)
                lr = get_lr(st.step, progress, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # batch; a wrapped stream starts from a fresh state
                x, y, reset = batcher.next()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if reset:
                    st.hidden = None
                # forward, backward, clip
                loss, grad_norm_t, new_hidden = train_step(
                    fwd, model, optimizer, x, y, st.hidden, t.grad_clip, device, ctx, t.precision)
                if checks is not None:  # CUDA: the fused AdamW skips a non-finite step itself
                    finite = checks.record(loss, grad_norm_t)
                    optimizer.found_inf = (~finite).float()
                    optimizer.step()
                    if stateful:  # a non-finite step's state restarts from zeros
                        st.hidden = map_state(lambda h, f=finite: torch.where(f, h, 0.0),
                                              detach_state(new_hidden))
                    else:
                        st.hidden = None
                    st.step += 1
                    window_steps += 1
                    st.elapsed_s += time.perf_counter() - t0
                    stopping = _stop_vote(st, stop, ctx)
                    done = st.step >= t.max_steps or (
                        t.max_time is not None and st.elapsed_s >= t.max_time)
                    if not (st.step % t.log_interval == 0 or st.step % t.eval_interval == 0
                            or done or stopping):
                        bar.advance(st.step, st.elapsed_s)
                        continue
                    tally = checks.settle()
                    loss_sum, loss_count = loss_sum + tally["loss_sum"], loss_count + tally[
                        "count"]
                    grad_norm = tally["grad_norm"]
                    if tally["bad"]:
                        st.step -= tally["bad"]  # the skipped steps were never applied
                        window_steps -= tally["bad"]
                        first = st.step - tally["count"] + tally["first_bad"] + 1
                        skipped = tally["longest"]
                        if not (t.skip_nonfinite and skipped < MAX_SKIPPED_STEPS):
                            saver.save("last.pt", st)  # finite: the bad steps were never applied
                            raise _non_finite_error(
                                dataclasses.replace(st, step=first - 1), t,
                                math.nan if tally["loss_bad"] else 0.0, skipped, run_dir)
                        if not quiet:
                            tqdm.write(f"steps {first}-{st.step + tally['bad']}: "
                                       f"{tally['bad']} non-finite step(s) skipped "
                                       "(train.skip_nonfinite)", file=sys.stderr)
                else:
                    # CPU (a read is no sync there) and torchrun: the check before every step
                    loss_value, grad_norm = float(loss), float(grad_norm_t)
                    # a non-finite step is skipped (train.skip_nonfinite) or stops the run
                    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                        skipped += 1
                        if not (t.skip_nonfinite and skipped < MAX_SKIPPED_STEPS):
                            saver.save("last.pt", st)  # the weights are still the last good ones
                            raise _non_finite_error(st, t, loss_value, skipped, run_dir)
                        optimizer.zero_grad(set_to_none=True)
                        st.hidden = None
                        if not quiet:
                            tqdm.write(f"step {st.step + 1}: non-finite loss or gradient, step "
                                       "skipped (train.skip_nonfinite)", file=sys.stderr)
                        # a skipped step still spends the time budget and still stops on Ctrl-C
                        st.elapsed_s += time.perf_counter() - t0
                        if _stop_vote(st, stop, ctx):
                            saver.save("last.pt", st)
                            raise interrupted()
                        continue
                    # optimizer step; carry the hidden state, detached: gradients stop at the
                    # window start
                    optimizer.step()
                    skipped = 0
                    st.hidden = detach_state(new_hidden) if stateful else None
                    st.step += 1
                    st.elapsed_s += time.perf_counter() - t0
                    stopping = _stop_vote(st, stop, ctx)
                    loss_sum, loss_count, window_steps = loss_sum + loss_value, loss_count + 1, \
                        window_steps + 1
                # log
                if st.step % t.log_interval == 0 and loss_count:
                    now = time.perf_counter()
                    tokens_per_s = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                    metrics.write(step=st.step, elapsed_s=f"{st.elapsed_s:.2f}",
                                  train_loss=_fmt(loss_sum / loss_count), lr=f"{lr:.6g}",
                                  grad_norm=_fmt(grad_norm), tokens_per_s=f"{tokens_per_s:.0f}")
                    bar.set_postfix(loss=f"{loss_sum / loss_count:.3f}",
                                    val_bpc=_fmt(last_val and bits_per_char(last_val), 3),
                                    tok_s=f"{tokens_per_s:.0f}")
                    loss_sum, loss_count, window_start, window_steps = 0.0, 0, now, 0
                bar.advance(st.step, st.elapsed_s)
                # evaluate, sample, checkpoint
                done = st.step >= t.max_steps or (
                    t.max_time is not None and st.elapsed_s >= t.max_time)
                if st.step % t.eval_interval == 0 or done or stopping:
                    eval_start = time.perf_counter()
                    last_val = _evaluate(st, model, val_batches, ds, t, device, ctx, run_dir,
                                         metrics, saver, lr, interactive)
                    if not interactive and not quiet:
                        print(f"step {st.step}/{t.max_steps} | val loss {last_val:.4f} | val "
                              f"bpc {bits_per_char(last_val):.4f} | {tokens_per_s:.0f} tok/s | "
                              f"{st.elapsed_s:.0f}s", file=sys.stderr, flush=True)
                    window_start += time.perf_counter() - eval_start  # keep tok/s training-only
                # stop
                if stopping:
                    raise interrupted()
    except KeyboardInterrupt:
        # A second Ctrl-C can land mid-step (batch drawn, weights half-updated): saving then
        # would make a resume silently inexact, so the last checkpoint is kept as it is.
        raise TrainingInterrupted(
            f"stopped at once (second Ctrl-C) during step {st.step + 1}; nothing more was saved. "
            f"Resume from the last checkpoint with: {resume_command}") from None
    finally:
        bar.close()
    # a resumed run that had nothing left to do (rank 0 decides: it alone sees the files)
    if distributed.broadcast_object(not (run_dir / "last.pt").exists()):
        saver.save("last.pt", st)
    # The DDP wrapper's reducer holds the process group: free it now, while the group is
    # alive, not at some later garbage collection after the group was torn down.
    del fwd, wrapped
    distributed.cleanup()
    return TrainResult(run_dir, st.step, st.best_val_loss, st.elapsed_s, tokens_per_s,
                       saver.params, warmup_s)


