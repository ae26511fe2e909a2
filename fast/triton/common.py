"""What every Triton kernel file shares: the device check and block-size helpers.

Triton compiles for a GPU. On a machine without one, its interpreter runs the same kernels
on CPU tensors with numpy, slowly, which is how the tests check them here. The interpreter is
chosen when the kernels are *defined* (`@triton.jit` reads TRITON_INTERPRET at decoration
time), so TRITON_INTERPRET=1 must be in the environment before any `fast.triton.*` module is
imported; a launcher whose kernel is compiled refuses CPU tensors with a clear error instead
of crashing inside the driver.
"""

from __future__ import annotations

import torch
import triton

from fast import BackendUnavailable

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what check_float accepts


class TritonDeviceError(BackendUnavailable, ValueError):
    """The tensors are not where the kernel can run (CPU tensors without the interpreter).

    A ValueError too, so the CLI reports it in one line like any other bad --backend value.
    """


def is_interpreted(kernel) -> bool:
    """True when `kernel` was defined under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, op: str, **tensors: torch.Tensor | None) -> None:
    """Every tensor on one device the kernel can use: CUDA, or CPU under the interpreter."""
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items() if t is not None)
        raise TritonDeviceError(f"{op}: tensors are on different devices ({where})")
    (device,) = devices
    if device.type == "cpu" and not is_interpreted(kernel):
        raise TritonDeviceError(
            f"{op}: the Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before "
            "importing fast.triton.backend (the interpreter is slow: for tests only)"
        )


def row_block(n: int, op: str, name: str, limit: int = 1 << 16) -> int:
    """A power-of-two block that holds a whole row of `n` elements, or a clear error."""
    if n < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {n}")
    if n > limit:
        raise ValueError(f"{op}: {name}={n} exceeds the kernel's row limit of {limit}")
    return triton.next_power_of_2(n)


def check_float(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
