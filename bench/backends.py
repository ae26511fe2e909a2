"""Which backends this run can time, on which device, and how to hand them arrays.

Every name in `fast.BACKENDS` is tried; one that fails to import (or has no device) is
recorded with the reason and skipped. numpy backends take numpy arrays; torch backends take
torch tensors, on the GPU when there is one (Triton needs one: its CPU interpreter is for
tests, not timing).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from bench.harness import error_text
from fast import BACKENDS, NUMPY_BACKENDS, get_backend


@dataclass
class Backend:
    name: str
    module: ModuleType
    kind: str  # "numpy" or "torch"
    device: str  # "cpu" or "cuda"

    def asarray(self, a):
        """A numpy input -> this backend's array type on its device."""
        if self.kind == "numpy" or not isinstance(a, np.ndarray):
            return a
        import torch

        return torch.from_numpy(a).to(self.device)

    def sync(self):
        """A function that waits for the device, or None on the CPU."""
        if self.device == "cpu":
            return None
        import torch

        return torch.cuda.synchronize


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def torch_devices() -> list[str]:
    """Where the torch baselines run: the CPU, and the GPU when there is one; none without
    torch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return []
    return ["cpu"] + (["cuda"] if cuda_available() else [])


def load_backends(names: list[str]) -> tuple[list[Backend], dict[str, dict]]:
    """The backends of `names` that work here, and {name: {"status", "reason", "device",
    "variants"}} for every one of them."""
    ok: list[Backend] = []
    status: dict[str, dict] = {}
    for name in names:
        if name not in BACKENDS:
            raise ValueError(
                f"--backends: unknown backend {name!r}; choose from {', '.join(BACKENDS)}"
            )
        try:
            mod = get_backend(name)
        except Exception as e:  # a half-written backend must not stop the others
            status[name] = {"status": "unavailable", "reason": error_text(e)}
            continue
        if name in NUMPY_BACKENDS:
            kind, device = "numpy", "cpu"
        else:
            kind = "torch"
            device = "cuda" if cuda_available() else "cpu"
            if name == "triton" and device == "cpu":
                status[name] = {
                    "status": "unavailable",
                    "reason": "no CUDA device (the Triton interpreter is not timed)",
                }
                continue
        variants = getattr(mod, "VARIANTS", None)
        if not isinstance(variants, dict):
            status[name] = {"status": "unavailable", "reason": "the module has no VARIANTS dict"}
            continue
        status[name] = {
            "status": "ok",
            "reason": None,
            "device": device,
            "variants": {op: sorted(v) for op, v in variants.items()},
        }
        ok.append(Backend(name, mod, kind, device))
    return ok, status
