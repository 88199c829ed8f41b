"""Which precision a model runs at: bf16 where the hardware runs it natively, else fp16 on a GPU or fp32."""

from __future__ import annotations

from ..errors import UserError
from ..options import PRECISIONS, ModelOptions

# CPU flags of units that run bf16 matrix products natively; without them torch emulates bf16 slowly.
NATIVE_BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def choose_precision(precision: str = ModelOptions.precision, device: str = "cpu") -> str:
    """`auto` → bf16 where the hardware runs it natively (AMX or AVX-512 BF16; a bf16 GPU), fp16 on
    older GPUs, fp32 otherwise; an explicit precision is kept as asked."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; pick one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_flags() & NATIVE_BF16_CPU_FLAGS else "fp32"
