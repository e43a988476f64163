"""Device selection: `auto` picks CUDA, then MPS, then CPU; asking for an absent device is a
clear error rather than a crash deep inside torch."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """`auto|cpu|cuda|cuda:N|mps` -> an available torch.device, or ValueError naming the fix."""
    name = (name or "auto").strip().lower()
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"device '{name}' is not valid; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but CUDA is not available; "
                             "use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}' requested but only {torch.cuda.device_count()} "
                             "CUDA device(s) exist")
        return device
    if device.type == "mps":
        if not has_mps:
            raise ValueError(f"device '{name}' requested but MPS is not available; "
                             "use --device cpu (or auto)")
        return device
    raise ValueError(f"device '{name}' is not supported; use auto, cpu, cuda, cuda:N or mps")


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fast tensor cores, no loss scaling needed); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
