"""Device and precision selection: `auto` picks CUDA, then MPS, then CPU, and asking for an
absent device is a clear error rather than a crash deep inside torch; `train.precision` auto
picks bf16 where the device multiplies bf16 natively, and `autocast` runs a block in it."""

from __future__ import annotations

import contextlib
import functools

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


@functools.cache
def _cpu_has_bf16_units() -> bool:
    """Whether torch's own CPU probe (cpuinfo) reports AMX tiles or AVX512-BF16: the units
    that make bf16 GEMMs faster than float32 ones. These `torch.cpu._is_*` probes are private
    (here, and nowhere else in charlm: tests/test_cells_layout.py), so a torch without them
    gets False: bf16 then stays a choice (`train.precision: bf16`), never the default."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except Exception:  # noqa: BLE001 - an older or newer torch without the probes
        return False


def bf16_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively: a CUDA GPU with bf16 support
    (Ampere or newer), or a CPU with AMX or AVX512-BF16 units (from torch, not a CPU-name
    list). Elsewhere bf16 still works, emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False)
    return device.type == "cpu" and _cpu_has_bf16_units()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` (auto | fp32 | bf16) -> "fp32" or "bf16" on `device`: auto is bf16
    where `bf16_native(device)`, else fp32. Anything else is a ValueError naming the key."""
    value = (precision or "").strip().lower() if isinstance(precision, str) else precision
    if value == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if value in ("fp32", "bf16"):
        return value
    raise ValueError(f"train.precision must be auto, fp32 or bf16, got {precision!r}")


def autocast(device: torch.device, precision: str):
    """The context a forward pass runs in: bf16 autocast (CPU and CUDA alike: matrix products
    in bf16, accumulated in float32, the rest float32) when `precision` resolves to bf16,
    else a no-op. How charlm's recurrent layers honour it: charlm/cells/fused/precision.py."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_math(device: torch.device) -> None:
    """The float32 math settings `charlm train` and `charlm bench` share: on CUDA, TF32 tensor
    cores for the float32 matmuls autocast leaves (cuDNN's own TF32 switch,
    `torch.backends.cudnn.allow_tf32`, stays at torch's default, True). Elsewhere nothing."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def math_settings() -> dict:
    """The float32 math settings in force, as `charlm bench --json` records them: whether
    cuBLAS matmuls and cuDNN (convolutions and RNNs) may use TF32, and cuDNN's state."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_enabled": torch.backends.cudnn.enabled}


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for cuBLAS and cuDNN inside the block, restored after: parity tests against
    cuDNN's RNNs need it, because cuDNN uses TF32 by default while charlm's GEMMs may not, and
    the two then differ by ~1e-4, not by float32 rounding."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def cuda_rng_state(device: torch.device) -> torch.Tensor:
    """The CUDA RNG state of `device` alone (not of every visible GPU: a resume may see fewer)."""
    return torch.cuda.get_rng_state(_cuda_index(device))


def set_cuda_rng_state(state, device: torch.device) -> bool:
    """Restore `device`'s CUDA RNG state from a checkpoint's "cuda" entry: one state (this
    version), or the list of every visible GPU's state that older versions saved, of which the
    entry of this device's index is taken (the first when there are fewer). False, and nothing
    is changed, when there is no state to take."""
    index = _cuda_index(device)
    if isinstance(state, (list, tuple)):
        if not state:
            return False
        state = state[min(index, len(state) - 1)]
    torch.cuda.set_rng_state(state, index)
    return True


def _cuda_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0
