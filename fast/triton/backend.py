"""The triton backend: GPT-2's ops as Triton kernels on torch tensors (CUDA, or CPU under
TRITON_INTERPRET=1 for tests).

Same contract as `ref/ops.py` (`<op>_forward -> (out, cache)`, `<op>_backward(dout, cache)`),
plus the differentiable functions `layernorm, gelu, bias_gelu, attention, crossentropy`
(each a `torch.autograd.Function` over the kernels) that `fast/torch/model.py` trains through.
Kernels, one file per op: fast/triton/layernorm.py, gelu.py, attention.py,
crossentropy.py (each file's docstring gives its maths, variants and limits).
Embedding and linear are torch ops here (an index and a cuBLAS matmul, which a hand-written
Triton matmul would not beat), so every op of the contract is present under one name.
Dropout is the torch backend's (a draw from the generator `gen` and a multiply). The flash
attention kernels have no dropout (the probabilities never leave the chip, and a mask drawn
inside a kernel would not follow the trainer's torch.Generator): `attention` with dropout > 0
and a generator, which only training asks for, runs the torch backend's unfused attention;
`attention_forward` (the contract pair) refuses dropout > 0.

The kernels are defined when this module is imported: TRITON_INTERPRET must be set before
that to run them on CPU tensors.
"""

from __future__ import annotations

import functools

import torch

from fast.torch import backend as torch_backend
from fast.triton import attention as triton_attention
from fast.triton.attention import attention_backward
from fast.triton.common import TritonDeviceError, is_interpreted
from fast.triton.crossentropy import (
    crossentropy,
    crossentropy_backward,
    crossentropy_forward,
    crossentropy_forward_fused,
)
from fast.triton.gelu import (
    bias_gelu,
    bias_gelu_backward,
    bias_gelu_forward,
    gelu,
    gelu_backward,
    gelu_forward,
)
from fast.triton.layernorm import layernorm, layernorm_backward, layernorm_forward

embedding_forward = torch_backend.embedding_forward
embedding_backward = torch_backend.embedding_backward
linear_forward = torch_backend.linear_forward
linear_backward = torch_backend.linear_backward
dropout = torch_backend.dropout
dropout_forward = torch_backend.dropout_forward
dropout_backward = torch_backend.dropout_backward

__all__ = [
    "attention",
    "attention_backward",
    "attention_forward",
    "bias_gelu",
    "bias_gelu_backward",
    "bias_gelu_forward",
    "check_device",
    "crossentropy",
    "crossentropy_backward",
    "crossentropy_forward",
    "dropout",
    "dropout_backward",
    "dropout_forward",
    "embedding_backward",
    "embedding_forward",
    "gelu",
    "gelu_backward",
    "gelu_forward",
    "layernorm",
    "layernorm_backward",
    "layernorm_forward",
    "linear_backward",
    "linear_forward",
    "VARIANTS",
]


def attention_forward(q, k, v, key_mask=None, dropout: float = 0.0, gen=None, **launch):
    """The flash kernels' forward (fast/triton/attention.py; `launch`: its block and config
    arguments). No dropout: a ValueError for dropout > 0 (train through `attention`)."""
    if dropout > 0.0:
        raise ValueError(
            "triton attention_forward has no dropout (the flash kernels draw no mask); "
            "the model's attention dropout runs through `attention`, on the torch path"
        )
    return triton_attention.attention_forward(q, k, v, key_mask, **launch)


def attention(q, k, v, key_mask=None, dropout: float = 0.0, gen=None, **launch):
    """Differentiable causal attention: the flash kernels, or with dropout > 0 and a generator
    the torch backend's unfused attention (softmax, dropout drawn from `gen`, att @ v)."""
    if dropout > 0.0 and gen is not None:
        return torch_backend.attention(q, k, v, key_mask, dropout, gen)
    return triton_attention.attention(q, k, v, key_mask, **launch)


def check_device(device: torch.device) -> None:
    """Raise a clear error unless the kernels can run on `device`."""
    from fast.triton.layernorm import _layernorm_fwd_kernel

    if torch.device(device).type == "cpu" and not is_interpreted(_layernorm_fwd_kernel):
        raise TritonDeviceError(
            "--backend triton needs a CUDA GPU; on CPU it runs only in Triton's interpreter "
            "(set TRITON_INTERPRET=1; slow, meant for tests)"
        )


VARIANTS = {
    "layernorm": {"triton": (layernorm_forward, layernorm_backward)},
    "gelu": {"triton": (gelu_forward, gelu_backward)},
    "bias_gelu": {"triton": (bias_gelu_forward, bias_gelu_backward)},
    "attention": {
        "flash": (triton_attention.attention_forward, attention_backward),
        "flash64": (
            functools.partial(triton_attention.attention_forward, block_m=64, block_n=64),
            attention_backward,
        ),
        "flash32": (
            functools.partial(triton_attention.attention_forward, block_m=32, block_n=32),
            attention_backward,
        ),
    },
    "crossentropy": {
        "online": (crossentropy_forward, crossentropy_backward),
        "fused": (crossentropy_forward_fused, crossentropy_backward),
        "inplace": (
            functools.partial(crossentropy_forward_fused, inplace=True),
            crossentropy_backward,
        ),
    },
}
