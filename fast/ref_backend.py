"""The reference backend: ref/ops.py itself, registered under the name "ref"."""

from ref.ops import (  # noqa: F401  (re-exported: the backend contract)
    attention_backward,
    attention_forward,
    bias_gelu_backward,
    bias_gelu_forward,
    crossentropy_backward,
    crossentropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    kv_store,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    qlinear_forward,
)

VARIANTS = {
    "layernorm": {"ref": (layernorm_forward, layernorm_backward)},
    "gelu": {"ref": (gelu_forward, gelu_backward)},
    "bias_gelu": {"ref": (bias_gelu_forward, bias_gelu_backward)},
    "attention": {"ref": (attention_forward, attention_backward)},
    "crossentropy": {"ref": (crossentropy_forward, crossentropy_backward)},
}
