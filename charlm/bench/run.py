"""Running the benchmark: the groups round-robin with a progress bar, the precisions each
pair trains in, and the JSON-ready result (with the machine: CPU model and flags, threads,
the GEMM backends charlm chose by timing them)."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm

from .. import __version__
from ..cells.fused import gemm, inductor
from ..device import bf16_native, configure_math, math_settings, resolve_precision
from ..model import REGISTRY
from .groups import (
    Contender,
    Group,
    layer_variant_groups,
    recurrent_groups,
    registry_groups,
    transformer_groups,
)
from .models import RECURRENT_CELLS, BenchShape, reference_shape
from .timing import process_max_rss_bytes

# How many times faster than recomputing the context the KV cache should sample, per device:
# on a GPU one character's forward is launch-bound, and recomputing 256 positions costs
# little more than one, so the GPU's target is lower. Other devices: no target.
KV_TARGETS = {"cpu": 5.0, "cuda": 2.0}
# The precisions each kind of contender trains in (`--precision`, see `bench_precisions`).
# Recurrent pairs: both contenders of a pair always in the same one, fp32 (no autocast) or
# bf16 autocast. auto adds bf16 to fp32 on a CPU with native bf16 units only: under CUDA
# autocast torch sends nn.LSTM/nn.GRU through cuDNN in low precision while charlm's recurrence
# stays float32 there (charlm/cells/fused/precision.py), unlike with unlike. The Transformer
# trains as `charlm train` would with train.precision=--precision; the other registry cells
# (charlm against charlm) in the recurrent pairs' precisions and that one.
PRECISION_CHOICES = ("auto", "fp32", "bf16")
SCHEMA = "charlm-bench/1"


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
    cpu = cpu_features()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu["model"]
    return {
        "schema": SCHEMA,
        "charlm_version": __version__,
        "torch_version": torch.__version__,
        "device": {"type": device.type, "name": name,
                   "threads": torch.get_num_threads(),
                   # torch.nn's RNN kernels: oneDNN on CPU, cuDNN on CUDA (when enabled)
                   "onednn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
                   "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                   "autocast": "bf16" if "bf16" in precision["recurrent"].split("+")
                   or precision["transformer"] == "bf16" else None,
                   "cpu": cpu,
                   # charlm's GEMM backend per product shape, chosen by timing on this machine
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
