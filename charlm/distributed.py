"""Data-parallel training: the process group, this process's rank and device, and the few
collective operations the training loop needs.

`torchrun --nproc_per_node N -m charlm train ...` starts N processes and gives each RANK,
WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR/MASTER_PORT) in its environment. `setup()` reads
them and joins the process group: gloo carries CPU tensors and pickled objects, NCCL carries
CUDA tensors (DistributedDataParallel's gradient all-reduce on GPUs). Without torchrun, or with
a single process, nothing is initialised and every helper here is a no-op, so the
single-process training loop runs unchanged.

Rank 0 is the main process: it alone writes the run directory (config, metrics, samples,
checkpoints, LATEST) and prints progress. Every collective here must be called by all ranks
in the same order; the training loop keeps its decisions (stop, skip, save) identical on
every rank so that they always are.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its node: picks the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Several processes train together (gradients are all-reduced)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set "
                         "by torchrun, do not set it by hand") from None


def from_env() -> Context:
    """The rank, world size and local rank torchrun put in the environment (0, 1, 0 if none)."""
    ctx = Context(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if ctx.world_size < 1 or not 0 <= ctx.rank < ctx.world_size:
        raise ValueError(f"RANK={ctx.rank} and WORLD_SIZE={ctx.world_size} are inconsistent; "
                         "launch with torchrun --nproc_per_node N -m charlm train ...")
    return ctx


def is_main() -> bool:
    """Whether this process is rank 0; reads the environment, so it holds before `setup()`
    and after `cleanup()` too (for the CLI's last message)."""
    return _env_int("RANK", 0) == 0


def setup() -> Context:
    """Join the process group torchrun describes (idempotent); a no-op for one process."""
    ctx = from_env()
    if not ctx.active or _initialized():
        return ctx
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed: train with one process "
                         "(without torchrun)")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        # NCCL for CUDA tensors (gradients), gloo for CPU ones (objects, the per-step sync).
        backend = "cpu:gloo,cuda:nccl"
        if ctx.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
    return ctx


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if _initialized():
        # Leave together: a rank that tears down its gloo pairs while a peer is still
        # finishing its last collective can abort the peer at exit.
        dist.barrier()
        # Gloo's worker threads free finished work (and its tensors) after the fact, which
        # needs the GIL; the group's destructor joins those threads while holding the GIL. A
        # worker caught mid-free then deadlocks the rank at exit (seen in gdb:
        # ~ProcessGroupGloo -> thread::join vs. decref_pyobject -> take_gil). Sleeping
        # releases the GIL so they finish first.
        time.sleep(0.1)
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_device(device: torch.device, ctx: Context) -> torch.device:
    """The device of this rank: with several processes on CUDA, rank r uses cuda:LOCAL_RANK."""
    if not ctx.active:
        return device
    if device.type == "mps":
        raise ValueError("data-parallel training on MPS is not supported; use --device cpu "
                         "or one process")
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {device} names one GPU, but under torchrun each of the "
                         f"{ctx.world_size} processes uses its own (cuda:LOCAL_RANK): pass "
                         "--device cuda, and choose GPUs with CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise ValueError(f"process with LOCAL_RANK {ctx.local_rank} has no GPU: this node has "
                         f"{count}; launch at most torchrun --nproc_per_node {count}")
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


def wrap(model: nn.Module, device: torch.device, ctx: Context) -> nn.Module:
    """`model` in DistributedDataParallel when several processes train, else `model` itself.

    The wrapper is only for the training forward/backward (it all-reduces the gradients);
    evaluation, sampling and checkpoints use the plain module."""
    if not ctx.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the others: e.g. rank 0 encodes the token cache and
    the other ranks then find it ready instead of each encoding the corpus again."""
    if _initialized() and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:  # rank 0 failing in the block must still release the others, not hang them
        if _initialized() and dist.get_rank() == 0:
            dist.barrier()


# torch's broadcast_object_list/all_gather_object turn tensors back into bytes through NumPy,
# which torch does not depend on; these two pickle through plain uint8 tensors instead.


def _encode(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _decode(t: torch.Tensor, size: int) -> Any:
    return pickle.loads(bytes(t.contiguous().untyped_storage())[:size])  # our own ranks' data


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled through gloo)."""
    if not _initialized():
        return obj
    data = _encode(obj) if dist.get_rank() == src else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, src=src)
    if dist.get_rank() != src:
        data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=src)
    return _decode(data, int(size))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank, on every rank (`[obj]` for one process)."""
    if not _initialized():
        return [obj]
    world = dist.get_world_size()
    data = _encode(obj)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64))
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    out = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, padded)
    return [_decode(t, int(n)) for t, n in zip(out, sizes, strict=True)]


def all_mean(values: list[float]) -> list[float]:
    """The mean of each value over all ranks, identical on every rank."""
    if not _initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)  # a CPU tensor: goes through gloo
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def launch_command(ctx: Context) -> str:
    """How to start `charlm train` again with this many processes (for messages)."""
    if ctx.active:
        return f"torchrun --nproc_per_node {ctx.world_size} -m charlm train"
    return "charlm train"


def check_resume_world_size(saved: int, ctx: Context, run_dir: Path) -> None:
    """Refuse to resume a run with a different number of processes than it was trained with:
    each rank's data position, RNG and hidden state were saved for exactly that many."""
    if saved == ctx.world_size:
        return
    launch = launch_command(Context(world_size=saved))
    raise ValueError(
        f"cannot resume '{run_dir}' with {ctx.world_size} process(es): it was trained with "
        f"world_size {saved} (its checkpoint holds the data position, RNG and hidden state of "
        f"each of its {saved} rank(s)). Resume it with as many processes: {launch} --resume "
        f"--name {run_dir.name} --runs-dir {run_dir.parent}; or start a new run with --name")
