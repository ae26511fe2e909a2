"""Backends: the same ops as `ref/ops.py`, selectable by name.

Every backend exposes the op functions of the reference contract, with the same names and
signatures, on its own array type:
    embedding_forward/backward, layernorm_forward/backward, linear_forward/backward,
    gelu_forward/backward, bias_gelu_forward/backward, attention_forward/backward,
    crossentropy_forward/backward
and `VARIANTS`: {op name: {variant name: (forward, backward)}} for tests and benchmarks to
sweep (the ops with named variants: layernorm, gelu, bias_gelu, attention, crossentropy).

`get_backend(name)` imports the backend lazily, so optional libraries (numba, torch, triton)
are loaded only when asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = {
    "ref": "fast.ref_backend",  # the numpy reference itself
    "numba": "fast.numba.backend",  # Numba CPU kernels (numpy arrays)
    "torch": "fast.torch.backend",  # plain torch ops (torch tensors, CPU or GPU)
    "triton": "fast.triton.backend",  # Triton GPU kernels (torch tensors)
}
NUMPY_BACKENDS = ("ref", "numba")  # run the numpy model of ref/model.py
TORCH_BACKENDS = ("torch", "triton")  # run the torch model of fast/torch/model.py

OPS = (
    "embedding",
    "layernorm",
    "linear",
    "gelu",
    "bias_gelu",
    "attention",
    "crossentropy",
)


class BackendUnavailable(RuntimeError):
    """The backend's library is not installed (or no device for it)."""


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise BackendUnavailable(
            f"--backend {name} needs a library that is not installed ({e}); "
            f"pip install 'gpt2-spec[{name}]'"
        ) from None
