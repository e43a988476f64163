"""`charlm bench`: a speed benchmark anyone can rerun, in one process, on one device.

This module owns the benchmark's contenders, its timing and its report:

- training tokens/s of a full char-LM step (embedding -> 2 recurrent layers -> head ->
  cross-entropy -> backward -> gradient clip -> AdamW step, as `charlm train` does it) with a
  `charlm.cells` body against a `torch.nn` body of identical shape and identical weights
  inside the same `RecurrentLM` wrapper, so the recurrent body is the only difference; in
  float32 and, where the CPU multiplies bf16 natively, again with both under bf16 autocast
  (`--precision`), where charlm in bf16 is also measured against itself in float32;
- sampling characters/s (batch 1, one character at a time, state carried, the per-step work
  of `charlm.sample.generate`) for the same pairs;
- the Transformer baseline's training tokens/s, and its sampling with the KV cache against
  recomputing the whole context every character;
- peak memory where the device reports it.

Contenders that are compared run round-robin across repeats (A, B, A, B, ...) so that drift in
machine load hits both alike; medians over repeats are reported, their ratio, and an A/A
stability figure (median of the odd repeats / median of the even ones, ~1.0 when stable).
It knows nothing of the CLI: bad options are ValueErrors naming the flag.
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from tqdm import tqdm

from . import __version__
from . import cells as charlm_cells
from .cells.fused import gemm, inductor
from .config import Config, ModelConfig, TrainConfig
from .device import autocast, bf16_native, configure_math, math_settings, resolve_precision
from .model import REGISTRY, RecurrentLM, build_model, detach_state
from .sample import pick_next
from .train import make_optimizer
from .transformer import TransformerLM

RECURRENT_CELLS = ("rnn", "lstm", "gru")  # the cells with a torch.nn twin
# Every cell of the registry can be benched: the twins against torch.nn, the Transformer's
# KV cache against recomputation, the rest against the charlm cell they simplify
# (CLASSIC_OF) at the same width, or alone.
CLASSIC_OF = {"mingru": "gru", "minlstm": "lstm"}
CHARLM_BODIES: dict[str, Callable[..., nn.Module]] = {
    "rnn": charlm_cells.RNN, "lstm": charlm_cells.LSTM, "gru": charlm_cells.GRU}
NN_BODIES: dict[str, Callable[..., nn.Module]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
# How many times faster than recomputing the context the KV cache should sample, per device:
# on a GPU one character's forward is launch-bound, and recomputing 256 positions costs
# little more than one, so the GPU's target is lower. Other devices: no target.
KV_TARGETS = {"cpu": 5.0, "cuda": 2.0}
KV_TARGET = KV_TARGETS["cpu"]
# The precisions each kind of contender trains in (`--precision`, see `bench_precisions`).
# Recurrent pairs: both contenders of a pair always in the same one, fp32 (no autocast) or
# bf16 autocast. auto adds bf16 to fp32 on a CPU with native bf16 units only: under CUDA
# autocast torch sends nn.LSTM/nn.GRU through cuDNN in low precision while charlm's recurrence
# stays float32 there (charlm/cells/fused/precision.py), unlike with unlike. The Transformer
# trains as `charlm train` would with train.precision=--precision; the other registry cells
# (charlm against charlm) in the recurrent pairs' precisions and that one.
PRECISION_CHOICES = ("auto", "fp32", "bf16")
SCHEMA = "charlm-bench/1"
# charlm and torch.nn logits may differ by rounding (TF32/bf16 kernels on CUDA), not more.
SAME_FUNCTION_TOL = 1e-2


@dataclass(frozen=True)
class BenchShape:
    """Every size the benchmark uses; `reference_shape` and `quick_shape` give the presets."""

    batch_size: int
    seq_len: int  # training window; also the training Transformer's context
    hidden: tuple[int, ...]  # recurrent width(s): one pair of contenders per width
    num_layers: int = 2
    vocab_size: int = 65
    sample_chars: int = 1000  # characters generated per timed sampling repeat
    tf_width: int = 128
    tf_layers: int = 4
    tf_heads: int = 4
    kv_context: int = 256  # the Transformer's context for the KV-cache vs recompute contest
    warmup_steps: int = 3  # untimed training steps per contender before the repeats
    warmup_chars: int = 50  # untimed sampled characters per contender before the repeats
    smoke: bool = False  # a smoke-test shape (--quick): its figures judge no target


def reference_shape(device: torch.device) -> BenchShape:
    """The reference shape for `device`: the presets' sizes on CPU, GPU-sized on CUDA."""
    if device.type == "cuda":
        return BenchShape(batch_size=64, seq_len=256, hidden=(512, 1024), tf_width=384,
                          tf_layers=6, tf_heads=6)
    return BenchShape(batch_size=32, seq_len=128, hidden=(256,))


def quick_shape() -> BenchShape:
    """Tiny shapes for tests and smoke runs: seconds on a laptop CPU, numbers meaningless."""
    return BenchShape(batch_size=4, seq_len=16, hidden=(32,), sample_chars=48, tf_width=32,
                      tf_layers=2, tf_heads=2, kv_context=32, warmup_steps=1, warmup_chars=8,
                      smoke=True)


def make_shape(device: torch.device, quick: bool = False, batch_size: int | None = None,
               seq_len: int | None = None, hidden: Sequence[int] | None = None) -> BenchShape:
    """The device's reference shape (or the quick one) with the given sizes replaced."""
    shape = quick_shape() if quick else reference_shape(device)
    for flag, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if hidden is not None and (not hidden or min(hidden) < 1):
        raise ValueError(f"--hidden must be one or more sizes >= 1, got {list(hidden)}")
    return dataclasses.replace(
        shape,
        batch_size=shape.batch_size if batch_size is None else batch_size,
        seq_len=shape.seq_len if seq_len is None else seq_len,
        hidden=shape.hidden if not hidden else tuple(dict.fromkeys(hidden)),
    )


def parse_cells(text: str) -> list[str]:
    """`rnn,lstm` -> ['rnn', 'lstm'], or ValueError naming the valid choices."""
    valid = list(REGISTRY)  # read on use: a cell registered at runtime is benched too
    names = [c.strip().lower() for c in text.split(",") if c.strip()]
    if names == ["all"]:
        return valid
    bad = [c for c in names if c not in valid]
    if bad or not names:
        raise ValueError(f"--cells: unknown or missing cell(s) {bad or text!r}; choose from "
                         f"{','.join(valid)} (or all)")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------- models


def build_charlm_lm(cell: str, shape: BenchShape, hidden: int,
                    device: torch.device) -> RecurrentLM:
    """charlm's RecurrentLM of `cell` at the bench's shape, from seed 0 (the first of
    :func:`build_recurrent_pair`'s twins)."""
    torch.manual_seed(0)
    body = CHARLM_BODIES[cell](hidden, hidden, num_layers=shape.num_layers, batch_first=True)
    return RecurrentLM(body, shape.vocab_size, hidden, dropout=0.0).to(device)


def build_recurrent_pair(cell: str, shape: BenchShape, hidden: int,
                         device: torch.device) -> tuple[RecurrentLM, RecurrentLM]:
    """(charlm, torch.nn) RecurrentLMs of identical shape computing the same function: the
    torch.nn one loads the charlm one's state dict (the cells use torch.nn's parameter names)."""
    ours = build_charlm_lm(cell, shape, hidden, torch.device("cpu"))
    body = NN_BODIES[cell](hidden, hidden, num_layers=shape.num_layers, batch_first=True)
    theirs = RecurrentLM(body, shape.vocab_size, hidden, dropout=0.0)
    theirs.load_state_dict(ours.state_dict())
    # .to() after loading: torch.nn re-packs its weights for cuDNN when it moves.
    return ours.to(device), theirs.to(device)


def build_transformer(shape: BenchShape, context: int, device: torch.device) -> TransformerLM:
    """The Transformer baseline at the bench's width/depth with the given context."""
    torch.manual_seed(0)
    return TransformerLM(shape.vocab_size, shape.tf_width, shape.tf_layers, shape.tf_heads,
                         context_len=context, dropout=0.0).to(device)


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, idx: torch.Tensor) -> float:
    """Largest |logit| difference of two models on `idx` in fp32: ~0 when they are the same
    function, which is what makes their speeds comparable."""
    return float((a(idx, None)[0] - b(idx, None)[0]).abs().max())


# ---------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_training(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor, steps: int, device: torch.device,
                  precision: str = "fp32") -> float:
    """Seconds for `steps` training steps on the batch (x, y), each as `charlm train` does it:
    forward (under `precision`: fp32, or bf16 autocast), cross-entropy, backward, gradient
    clip, optimizer step, state carried.

    `loss.item()` is left out: the benchmark should not add a host sync per step."""
    grad_clip = TrainConfig().grad_clip
    state = None
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(device, precision):
            logits, new_state = model(x, state)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        state = detach_state(new_state) if model.carries_state else None
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def generate_ids(model: nn.Module, n_chars: int, device: torch.device, *,
                 temperature: float = 1.0, recompute_context: int | None = None) -> list[int]:
    """`n_chars` ids continuing id 0, one at a time in eval mode, with the per-step
    work of `charlm.sample.generate`: a forward of one character, then `pick_next`.

    With `recompute_context` the state is thrown away: every step runs the model on the last
    `recompute_context` characters from scratch (what sampling costs without a KV cache)."""
    was_training = model.training
    model.eval()
    history = torch.tensor([[0]], device=device)
    ids: list[int] = []
    try:
        logits, state = model(history, None)
        for i in range(n_chars):
            next_id = pick_next(logits[0, -1], temperature, 0, 1.0, None)
            ids.append(int(next_id))  # generate() syncs here too: it yields a Python str
            if i + 1 == n_chars:
                break
            if recompute_context is None:
                logits, state = model(next_id.view(1, 1), state)
            else:
                history = torch.cat([history, next_id.view(1, 1)], dim=1)[:, -recompute_context:]
                logits, _ = model(history, None)
    finally:
        model.train(was_training)
    return ids


def time_sampling(model: nn.Module, n_chars: int, device: torch.device, *,
                  recompute_context: int | None = None) -> float:
    """Seconds to sample `n_chars` characters (temperature 1) with `generate_ids`."""
    torch.manual_seed(0)  # the same draws for every contender and repeat
    synchronize(device)
    start = time.perf_counter()
    generate_ids(model, n_chars, device, recompute_context=recompute_context)
    synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- memory


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes a contender keeps between steps: parameters, buffers, gradients, optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def process_max_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ---------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One timed thing: `timed()` does `work` tokens or characters and returns seconds."""

    task: str  # "train" | "sample"
    name: str
    unit: str  # "tokens/s" | "chars/s"
    work: int
    timed: Callable[[], float]
    warmup: Callable[[], object]
    resident: Callable[[], int]
    reference: str | None = None  # the contender (same task) its ratio is taken against
    against: Contender | None = field(default=None, repr=False)  # that contender itself
    # further references of the same group for the "ratios" list (charlm bf16 vs its fp32)
    also_against: list[Contender] = field(default_factory=list, repr=False)
    info: dict = field(default_factory=dict)
    rates: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None

    def release(self) -> None:
        """Drop the closures, and with them the model and optimizer, once measured."""
        self.timed = self.warmup = self.resident = _released


def _released() -> float:
    raise RuntimeError("this contender was already measured and released")


def _train_contender(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     steps: int, warmup_steps: int, device: torch.device,
                     precision: str = "fp32", **info) -> Contender:
    opt = make_optimizer(model, TrainConfig(), device)
    return Contender(
        "train", name, "tokens/s", steps * x.numel(),
        timed=lambda: time_training(model, opt, x, y, steps, device, precision),
        warmup=lambda: time_training(model, opt, x, y, warmup_steps, device, precision),
        resident=lambda: resident_bytes(model, opt), info={**info, "precision": precision})


def _sample_contender(name: str, model: nn.Module, shape: BenchShape, device: torch.device,
                      recompute_context: int | None = None, **info) -> Contender:
    def timed(n: int) -> float:
        return time_sampling(model, n, device, recompute_context=recompute_context)

    return Contender("sample", name, "chars/s", shape.sample_chars,
                     timed=lambda: timed(shape.sample_chars),
                     warmup=lambda: timed(shape.warmup_chars),
                     resident=lambda: resident_bytes(model), info=info)


@dataclass(frozen=True)
class Group:
    """Contenders timed together (round-robin); built only when their turn comes, so one
    group's models are in memory at a time."""

    label: str  # e.g. "train lstm h256"
    size: int  # number of contenders
    build: Callable[[], list[Contender]]


def _batch(shape: BenchShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(shape.vocab_size, (shape.batch_size, shape.seq_len), generator=g)
            for _ in range(2))
    return x.to(device), y.to(device)


def recurrent_groups(cell: str, shape: BenchShape, steps: int, device: torch.device,
                     checks: dict, precisions: Sequence[str] = ("fp32",)) -> list[Group]:
    """One recurrent cell's groups: per width, training (in each of `precisions`, all of them
    interleaved in one group) and sampling (fp32), charlm vs torch.nn."""
    x, y = _batch(shape, device)

    def train(h: int) -> list[Contender]:
        info = {"cell": cell, "hidden": h}
        group: list[Contender] = []
        for precision in precisions:
            ours, theirs = build_recurrent_pair(cell, shape, h, device)
            if not group:
                checks["max_logit_diff"][f"{cell}-{h}"] = max_logit_difference(ours, theirs, x)
            tag = "" if precision == "fp32" else f"-{precision}"
            group += _with_reference([
                _train_contender(f"charlm-{cell}-{h}{tag}", ours, x, y, steps,
                                 shape.warmup_steps, device, precision, impl="charlm.cells",
                                 **info),
                _train_contender(f"nn-{cell}-{h}{tag}", theirs, x, y, steps,
                                 shape.warmup_steps, device, precision, impl="torch.nn",
                                 **info)])
        for c in group[2::2]:  # charlm in bf16 against charlm in fp32, when both ran
            c.also_against.append(group[0])
        return group

    def sample(h: int) -> list[Contender]:
        ours, theirs = build_recurrent_pair(cell, shape, h, device)
        info = {"cell": cell, "hidden": h}
        return [_sample_contender(f"charlm-{cell}-{h}", ours, shape, device,
                                  impl="charlm.cells", **info),
                _sample_contender(f"nn-{cell}-{h}", theirs, shape, device,
                                  impl="torch.nn", **info)]

    groups = []
    for h in shape.hidden:
        groups += [Group(f"train {cell} h{h}", 2 * len(precisions), lambda h=h: train(h)),
                   Group(f"sample {cell} h{h}", 2, lambda h=h: _with_reference(sample(h)))]
    return groups


def build_registry_model(cell: str, shape: BenchShape, hidden: int, device: torch.device,
                         **model) -> nn.Module:
    """`cell` as `charlm train` builds it (from charlm.model.REGISTRY) at the bench's shape."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(cell=cell, hidden_size=hidden, num_layers=shape.num_layers,
                                   **model), train=TrainConfig(seq_len=shape.seq_len))
    return build_model(cfg, shape.vocab_size).to(device)


def registry_groups(cell: str, shape: BenchShape, steps: int, device: torch.device,
                    precisions: Sequence[str] = ("fp32",)) -> list[Group]:
    """A registry cell without a torch.nn twin, per width: training (in each of
    `precisions`, interleaved in one group) and sampling (fp32) against the charlm cell it
    simplifies (CLASSIC_OF), or alone. A min cell trains twice: as bare residual layers
    (`ff_mult=0`, "-nomlp": what the scan buys against the classic cell's loop) and as its
    preset builds it, with the MLPs."""
    x, y = _batch(shape, device)
    classic = CLASSIC_OF.get(cell)
    variants = [{"ff_mult": 0}, {}] if classic else [{}]
    n = 1 if classic is None else 2

    def pair(first: Contender, h: int, make: Callable[..., Contender], tag: str = ""):
        if classic is None:
            return [first]
        return _with_reference([first, make(f"charlm-{classic}-{h}{tag}",
                                            build_charlm_lm(classic, shape, h, device),
                                            impl="charlm.cells", cell=classic, hidden=h)])

    def train(h: int, extra: dict) -> list[Contender]:
        group: list[Contender] = []
        for precision in precisions:
            def make(name, model, precision=precision, **info):
                return _train_contender(name, model, x, y, steps, shape.warmup_steps, device,
                                        precision, **info)

            tag = "" if precision == "fp32" else f"-{precision}"
            model = build_registry_model(cell, shape, h, device, **extra)
            name = f"{cell}-{h}" + ("-nomlp" if extra else "") + tag
            group += pair(make(name, model, impl="charlm.model", cell=cell, hidden=h, **extra),
                          h, make, tag)
        for c in group[n::n]:  # the cell in bf16 against itself in fp32, when both ran
            c.also_against.append(group[0])
        return group

    def sample(h: int) -> list[Contender]:
        def make(name, model, **info):
            return _sample_contender(name, model, shape, device, **info)

        model = build_registry_model(cell, shape, h, device)
        return pair(make(f"{cell}-{h}", model, impl="charlm.model", cell=cell, hidden=h), h,
                    make)

    groups = []
    for h in shape.hidden:
        for extra in variants:
            label = f"train {cell} h{h}" + (" (no MLP)" if extra else "")
            groups.append(Group(label, n * len(precisions),
                                lambda h=h, extra=extra: train(h, extra)))
        groups.append(Group(f"sample {cell} h{h}", n, lambda h=h: sample(h)))
    return groups


def time_layer_training(model: nn.Module, optimizer: torch.optim.Optimizer, inp, steps: int,
                        device: torch.device) -> float:
    """Seconds for `steps` training steps of a bare recurrent layer on `inp` (a tensor or a
    PackedSequence): forward, mean squared output as the loss, backward, clip, AdamW step."""
    grad_clip = TrainConfig().grad_clip
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(inp)[0]
        loss = (out.data if isinstance(out, PackedSequence) else out).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def layer_variant_groups(cell: str, shape: BenchShape, steps: int, device: torch.device,
                         checks: dict) -> list[Group]:
    """torch.nn's layer options on a bare layer (no LM around it), charlm vs torch.nn:
    bidirectional (LSTM, GRU) and a packed batch of lengths uniform in [seq_len/2, seq_len]
    (every cell); `num_layers` layers of width `hidden`, input width `hidden`."""
    B, T = shape.batch_size, shape.seq_len
    variants = (["bidir"] if cell in ("lstm", "gru") else []) + ["packed"]

    def build(variant: str, h: int) -> list[Contender]:
        kw = {"num_layers": shape.num_layers, "bidirectional": variant == "bidir"}
        torch.manual_seed(0)
        ours = CHARLM_BODIES[cell](h, h, **kw)
        theirs = NN_BODIES[cell](h, h, **kw)
        theirs.load_state_dict(ours.state_dict())
        ours, theirs = ours.to(device), theirs.to(device)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(T, B, h, generator=g).to(device)
        inp, work = x, B * T
        if variant == "packed":
            lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
            inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
            work = int(lengths.sum())
        with torch.no_grad():
            a, b = ours(inp)[0], theirs(inp)[0]
            if variant == "packed":
                a, b = a.data, b.data
            checks["max_logit_diff"][f"{cell}-{h}-{variant}"] = float((a - b).abs().max())
        info = {"cell": cell, "hidden": h, "variant": variant}
        out = []
        for name, model, impl in ((f"charlm-{cell}-{h}-{variant}", ours, "charlm.cells"),
                                  (f"nn-{cell}-{h}-{variant}", theirs, "torch.nn")):
            opt = make_optimizer(model, TrainConfig(), device)
            out.append(Contender(
                "train", name, "tokens/s", steps * work,
                timed=lambda m=model, o=opt: time_layer_training(m, o, inp, steps, device),
                warmup=lambda m=model, o=opt: time_layer_training(
                    m, o, inp, shape.warmup_steps, device),
                resident=lambda m=model, o=opt: resident_bytes(m, o),
                info={"impl": impl, **info}))
        return _with_reference(out)

    return [Group(f"train {cell} h{h} {v}", 2, lambda v=v, h=h: build(v, h))
            for h in shape.hidden for v in variants]


def transformer_groups(shape: BenchShape, steps: int, device: torch.device,
                       checks: dict, precision: str = "fp32") -> list[Group]:
    """The Transformer's groups: training (in `precision`) alone; sampling with the KV cache
    vs recompute."""
    name = f"transformer-{shape.tf_layers}x{shape.tf_width}"
    info = {"cell": "transformer", "hidden": shape.tf_width, "layers": shape.tf_layers}

    def train() -> list[Contender]:
        x, y = _batch(shape, device)
        model = build_transformer(shape, shape.seq_len, device)
        return [_train_contender(name, model, x, y, steps, shape.warmup_steps, device,
                                 precision, impl="charlm.transformer", context=shape.seq_len,
                                 **info)]

    def sample() -> list[Contender]:
        ctx = shape.kv_context
        model = build_transformer(shape, ctx, device)
        n = min(ctx, shape.sample_chars)  # up to here both must pick the same greedy text
        kv, full = (generate_ids(model, n, device, temperature=0.0, recompute_context=r)
                    for r in (None, ctx))
        checks["kv_cache_greedy"] = {"chars_compared": n, "matches_recompute": kv == full}
        return _with_reference([
            _sample_contender(f"{name}-kv", model, shape, device, impl="kv-cache",
                              context=ctx, **info),
            _sample_contender(f"{name}-recompute", model, shape, device, recompute_context=ctx,
                              impl="recompute", context=ctx, **info)])

    return [Group("train transformer", 1, train),
            Group("sample transformer kv-cache vs recompute", 2, sample)]


def _with_reference(group: list[Contender]) -> list[Contender]:
    """A pair's first contender is measured against its second (charlm vs nn, kv vs full)."""
    group[0].reference, group[0].against = group[1].name, group[1]
    return group


# ---------------------------------------------------------------------------- running


def _measure(c: Contender, device: torch.device) -> None:
    """One timed repeat; on CUDA also the peak memory this contender would need alone."""
    if device.type != "cuda":
        c.rates.append(c.work / c.timed())
        return
    # Other contenders' weights are resident too, so the raw max_memory_allocated would
    # include them: count the peak above the starting point plus this contender's own state.
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    c.rates.append(c.work / c.timed())
    peak = torch.cuda.max_memory_allocated(device) - start + c.resident()
    c.peak_mem_bytes = max(c.peak_mem_bytes or 0, peak)


def run_group(group: list[Contender], repeats: int, device: torch.device,
              bar: tqdm | None = None) -> None:
    """Warm every contender up, then time them round-robin, `repeats` rounds."""
    for c in group:
        c.warmup()
    for _ in range(repeats):
        for c in group:
            if bar is not None:
                bar.set_description(f"{c.task} {c.name}")
            _measure(c, device)
            if bar is not None:
                bar.update(1)


def stability(rates: Sequence[float]) -> float | None:
    """A/A check: median of the odd repeats (1st, 3rd, ...) / median of the even ones."""
    if len(rates) < 2:
        return None
    return statistics.median(rates[0::2]) / statistics.median(rates[1::2])


def bench_precisions(precision: str, device: torch.device) -> tuple[list[str], str]:
    """`--precision` -> (the precisions the recurrent pairs train in, the one the Transformer
    and the other registry cells train in). auto: fp32, plus bf16 on a CPU that multiplies
    bf16 natively (see PRECISION_CHOICES), and the others as `charlm train` resolves auto;
    fp32 or bf16: that one for all. Anything else is a ValueError naming the flag."""
    value = precision.strip().lower() if isinstance(precision, str) else precision
    if value not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if value != "auto":
        return [value], value
    native = device.type == "cpu" and bf16_native(device)
    return (["fp32", "bf16"] if native else ["fp32"]), resolve_precision("auto", device)


def run_bench(device: torch.device, cells: Sequence[str] | None = None,
              shape: BenchShape | None = None, repeats: int = 5, steps: int = 10,
              progress: bool = True, variants: bool = True, precision: str = "auto") -> dict:
    """Run every contender of `cells` and return the JSON-ready result (see `format_table`);
    `variants` adds the bidirectional and packed-input layer groups (float32); `precision`
    (auto | fp32 | bf16) is `bench_precisions`'s."""
    precisions, train_precision = bench_precisions(precision, device)
    registry_precisions = list(dict.fromkeys([*precisions, train_precision]))
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    shape = shape or reference_shape(device)
    cells = list(REGISTRY) if cells is None else cells
    if shape.tf_width % shape.tf_heads:
        raise ValueError(f"the Transformer width {shape.tf_width} is not divisible by its "
                         f"{shape.tf_heads} heads")
    configure_math(device)  # the float32 math `charlm train` uses (TF32 on CUDA)
    checks: dict = {"max_logit_diff": {}}
    kernel_uses = inductor.uses
    groups: list[Group] = []
    for cell in cells:
        if cell == "transformer":
            groups += transformer_groups(shape, steps, device, checks, train_precision)
        elif cell in RECURRENT_CELLS:
            groups += recurrent_groups(cell, shape, steps, device, checks, precisions)
            if variants:
                groups += layer_variant_groups(cell, shape, steps, device, checks)
        else:
            groups += registry_groups(cell, shape, steps, device, registry_precisions)
    contenders: list[Contender] = []
    failures: list[dict] = []
    bar = tqdm(total=repeats * sum(g.size for g in groups), unit="repeat", file=sys.stderr,
               dynamic_ncols=True, disable=not (progress and sys.stderr.isatty()))
    try:
        for g in groups:
            try:
                members = g.build()
                run_group(members, repeats, device, bar)
            except RuntimeError as e:
                # A kernel missing for this dtype/device, or out of memory: the other groups'
                # figures are still worth having, so record the failure and go on.
                failures.append({"group": g.label, "error": " ".join(str(e).split())[:300]})
                line = f"{g.label}: FAILED ({failures[-1]['error']})"
            else:
                contenders += members
                line = _progress_line(members)
                for c in members:  # free this group's models before the next group's are built
                    c.release()
            members = []
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if progress:
                tqdm.write(line, file=sys.stderr)
    finally:
        bar.close()
    checks["compiled_steps"] = inductor.uses > kernel_uses
    used = {"requested": precision, "recurrent": "+".join(precisions),
            "transformer": train_precision, "registry": "+".join(registry_precisions),
            "sampling": "fp32", "variants": "fp32", "bf16_native": bf16_native(device)}
    return _result(contenders, failures, device, shape, repeats, steps, checks, used)


def kv_cache_target(device_type: str, smoke: bool = False) -> float | None:
    """The KV-cache speedup `device_type` is judged by (KV_TARGETS), or None: a smoke-test
    shape, or a device without a measured target."""
    return None if smoke else KV_TARGETS.get(device_type)


def _progress_line(group: list[Contender]) -> str:
    return f"{group[0].task}: " + ", ".join(
        f"{c.name} {statistics.median(c.rates):,.0f} {c.unit}" for c in group)


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def cpu_features() -> dict:
    """The host CPU's model and the vector/matrix units that decide GEMM speed (from
    /proc/cpuinfo where there is one), and the SIMD level torch's kernels dispatch to."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"model": model, "torch_capability": capability,
            "flags": {name: name in flags for name in CPU_FLAGS} if flags else None}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _result(contenders: list[Contender], failures: list[dict], device: torch.device,
            shape: BenchShape, repeats: int, steps: int, checks: dict, precision: dict) -> dict:
    quick = shape.smoke
    rows, ratios = [], []
    for c in contenders:
        ratio = None
        if c.against is not None:  # the reference timed in the same group, interleaved
            ratio = statistics.median(c.rates) / statistics.median(c.against.rates)
            ratios.append({"task": c.task, "contender": c.name, "reference": c.reference,
                           "ratio": ratio})
        for other in c.also_against:  # e.g. charlm in bf16 against charlm in fp32
            ratios.append({"task": c.task, "contender": c.name, "reference": other.name,
                           "ratio": statistics.median(c.rates) / statistics.median(other.rates)})
        rows.append({"task": c.task, "name": c.name, **c.info, "unit": c.unit,
                     "work_per_repeat": c.work, "median": statistics.median(c.rates),
                     "repeats": list(c.rates), "reference": c.reference, "ratio": ratio,
                     "stability": stability(c.rates), "peak_mem_bytes": c.peak_mem_bytes})
    kv = next((r["ratio"] for r in ratios if r["contender"].endswith("-kv")), None)
    kv_target = kv_cache_target(device.type, quick)
    return {
        "schema": SCHEMA,
        "charlm_version": __version__,
        "torch_version": torch.__version__,
        "device": {"type": device.type, "name": _device_name(device),
                   "threads": torch.get_num_threads(),
                   # torch.nn's RNN kernels: oneDNN on CPU, cuDNN on CUDA (when enabled)
                   "onednn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
                   "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                   "autocast": "bf16" if "bf16" in precision["recurrent"].split("+")
                   or precision["transformer"] == "bf16" else None,
                   "cpu": cpu_features(),
                   # charlm's GEMM backend per product shape, raced on this machine
                   # (charlm.cells.fused.gemm)
                   "gemm_backends": gemm.choices()},
        # One precision per comparison: each recurrent pair (charlm vs torch.nn) in one of
        # fp32 / bf16 autocast, the others as `charlm train` runs them (PRECISION_CHOICES);
        # and the TF32 switches in force for all.
        "precision": {**precision, "math": math_settings()},
        "shape": dataclasses.asdict(shape),
        "repeats": repeats,
        "steps": steps,
        "contenders": rows,
        "ratios": ratios,
        # A smoke test's tiny shapes say nothing about speed: no target is judged on them.
        "kv_cache": {"speedup": kv, "target": kv_target, "device": device.type,
                     "meets_target": None if kv is None or kv_target is None
                     else kv >= kv_target},
        "checks": checks,
        "failures": failures,
        "memory": ("cuda: max_memory_allocated above the starting point + own weights, grads "
                   "and optimizer state" if device.type == "cuda"
                   else "not reported per contender; see process_max_rss_bytes"),
        "process_max_rss_bytes": process_max_rss_bytes(),
    }


# ---------------------------------------------------------------------------- report


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def format_table(result: dict) -> str:
    """The terminal report: a header line, one row per contender, and a legend."""
    s, d = result["shape"], result["device"]
    header = ["task", "contender", "median", "unit", "ratio", "vs", "A/A", "peak mem"]
    body = []
    for r in result["contenders"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        aa = "" if r["stability"] is None else f"{r['stability']:.3f}"
        body.append([r["task"], r["name"], f"{r['median']:,.0f}", r["unit"], ratio,
                     r["reference"] or "", aa, _mib(r["peak_mem_bytes"])])
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    right = {2, 4, 6, 7}

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    kv = result["kv_cache"]
    legend = [
        f"{d['name']} ({d['type']}, {d['threads']} threads), torch {result['torch_version']}; "
        f"batch {s['batch_size']} x seq {s['seq_len']}, hidden {','.join(map(str, s['hidden']))}"
        f" x {s['num_layers']} layers, vocab {s['vocab_size']}; {result['repeats']} repeats x "
        f"{result['steps']} steps; sampling {s['sample_chars']} chars",
    ]
    notes = ["ratio: median / median of 'vs' (charlm/nn; KV cache/recompute); A/A: median of "
             "odd / even repeats (~1.000 = stable)"]
    p = result.get("precision")
    if p:
        m = p["math"]
        pairs = " and ".join(f"both {q}" + (" (no autocast)" if q == "fp32" else " (autocast)")
                             for q in p["recurrent"].split("+"))
        registry = p.get("registry", p["transformer"]).replace("+", " and ")
        notes.append(f"precision: charlm vs torch.nn {pairs}; Transformer {p['transformer']}, "
                     f"min cells {registry}, sampling and layer variants fp32; TF32 matmul "
                     f"{m['matmul_allow_tf32']}, cuDNN TF32 {m['cudnn_allow_tf32']}")
        own = [f"{r['contender']} {r['ratio']:.2f}x" for r in result["ratios"]
               if r["contender"] == r["reference"] + "-bf16"]
        if own:
            notes.append(f"charlm bf16 / charlm fp32 (same group): {', '.join(own)}")
    if kv["speedup"] is not None and kv["target"] is None:
        why = "a smoke-test shape" if s.get("smoke") else f"no target for {d['type']}"
        notes.append(f"KV cache speedup {kv['speedup']:.1f}x at context {s['kv_context']} "
                     f"({why}: no target is judged)")
    elif kv["speedup"] is not None:
        verdict = "meets" if kv["meets_target"] else "MISSES"
        notes.append(f"KV cache speedup {kv['speedup']:.1f}x at context {s['kv_context']} "
                     f"({verdict} the {kv['target']:g}x target)")
    if d["type"] != "cuda":
        notes.append(f"peak memory: process max RSS {_mib(result['process_max_rss_bytes'])}")
    ran = result["contenders"]
    if any(r.get("cell") in ("rnn", "lstm", "gru") and r["name"].startswith("charlm")
           for r in ran):
        checks = result["checks"]  # (files from before 2026-12-01 name it compiled_lstm_step)
        compiled = checks.get("compiled_steps", checks.get("compiled_lstm_step"))
        how = "compiled kernels" if compiled else "eager torch ops"
        notes.append(f"charlm RNN/LSTM/GRU steps: {how} (charlm/cells/fused/inductor.py; "
                     "CHARLM_COMPILE=0 for eager)")
    backends = list(d.get("gemm_backends", {}).values())
    if backends:
        counts = ", ".join(f"{backends.count(b)} on {b}" for b in ("torch", "onednn", "mkl")
                           if b in backends)
        notes.append(f"charlm GEMMs, by a race per product shape: {counts} (--json: "
                     "device.gemm_backends; CHARLM_GEMM=torch|onednn|mkl to force)")
    checks = result["checks"]
    bad = [f"{name} logits differ by {diff:.2g}" for name, diff in checks["max_logit_diff"].items()
           if not diff <= SAME_FUNCTION_TOL]
    if not checks.get("kv_cache_greedy", {}).get("matches_recompute", True):
        bad.append("KV-cache greedy text differs from recompute")
    if bad:
        notes.append(f"CHECK FAILED: {', '.join(bad)}")
    notes += [f"FAILED {f['group']}: {f['error']}" for f in result["failures"]]
    return "\n".join([*legend, line(header), line(["-" * w for w in widths]),
                      *map(line, body), *notes])
