"""Which device and which number format the work runs on: shared by training and inference.

`resolve_device("auto")` picks CUDA, then Apple's MPS, then the CPU. `precision` names how a
network's matmuls and convolutions run: "fp32", "bf16" or "fp16" autocast, or "auto", which
means bf16 where the hardware does it natively (CUDA, CPUs with AVX512-bf16) and fp32 elsewhere,
where bf16 would be emulated and slower. Training (learner/precision.py) and the pipelines both
resolve it here, so a model samples in the precision it trained in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import ConfigError

__all__ = ["PRECISIONS", "default_device", "resolve_device", "synchronize", "bf16_is_fast", "check_precision",
           "resolve_precision", "autocast_dtype", "with_autocast"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def default_device() -> torch.device:
    """Return the best available device: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Return torch.device(name), where "auto" means `default_device()` (cuda > mps > cpu).

    An unknown name, or a device this machine lacks, raises ConfigError naming what exists.
    """
    if str(name) == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but this machine has no CUDA GPU; use device auto or cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} was asked for but MPS is not available here; use device auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on a GPU `device`, so a wall-clock timing covers it (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bf16_is_fast(device: torch.device) -> bool:
    """Return True where bf16 autocast runs natively: CUDA, or a CPU with AVX512-bf16 (AMX CPUs have it too).

    Elsewhere bf16 is emulated and slower than float32 (speed-ups measured in BENCHMARKS.md).
    """
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def check_precision(precision: str) -> str:
    """Return `precision` if it is one of PRECISIONS, else raise ConfigError naming them."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """Return "bf16", "fp16" or "fp32" for `precision` on `device` ("auto": bf16 where `bf16_is_fast`)."""
    if check_precision(precision) == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """Return the autocast dtype of a resolved precision ("bf16", "fp16"), or None for "fp32"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[check_precision(precision)]


def with_autocast(fn: Callable[..., torch.Tensor], device: torch.device, precision: str
                  ) -> Callable[..., torch.Tensor]:
    """Return `fn` run under autocast for `precision` on `device`, its output cast to float32.

    With a precision that resolves to fp32 it returns `fn` itself (bit-identical results).
    """
    dtype = autocast_dtype(resolve_precision(precision, device))
    if dtype is None:
        return fn

    def run(*args, **kwargs) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return fn(*args, **kwargs).float()

    return run
