"""The benchmark's contenders, in the groups that are timed together (round-robin): per
recurrent cell charlm against torch.nn, per min cell against the classic cell it simplifies,
torch.nn's layer options on bare layers, and the Transformer's KV cache against
recomputation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..config import TrainConfig
from ..train import make_optimizer
from .models import (
    CHARLM_BODIES,
    CLASSIC_OF,
    NN_BODIES,
    BenchShape,
    build_charlm_lm,
    build_recurrent_pair,
    build_registry_model,
    build_transformer,
    max_logit_difference,
)
from .timing import (
    generate_ids,
    resident_bytes,
    time_layer_training,
    time_sampling,
    time_training,
)


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
