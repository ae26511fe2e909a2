"""One params layout for the whole project, and the name maps of the two checkpoint formats.

Canonical flat names are OpenAI's TensorFlow names without the `model/` scope:
    wte, wpe, ln_f/g, ln_f/b, h{i}/ln_1/g, h{i}/attn/c_attn/w, h{i}/mlp/c_proj/b, ...
`nest` turns a flat dict into the nested params of `ref/model.py`; `flatten` goes back.
Hugging Face names (`[transformer.]h.{i}.attn.c_attn.weight`) map one to one onto these;
HF's Conv1D stores weights as (in, out) like OpenAI's, so no transpose is needed.
"""

from __future__ import annotations

import re

import numpy as np

from ref.config import GPT2Config
from weights import WeightsError

_LEAVES = {
    "ln_1": ("g", "b"),
    "attn/c_attn": ("w", "b"),
    "attn/c_proj": ("w", "b"),
    "ln_2": ("g", "b"),
    "mlp/c_fc": ("w", "b"),
    "mlp/c_proj": ("w", "b"),
}


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every canonical name and its shape for `cfg`."""
    C = cfg.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte": (cfg.n_vocab, C),
        "wpe": (cfg.n_ctx, C),
        "ln_f/g": (C,),
        "ln_f/b": (C,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.n_vocab, C)
    per_block = {
        "ln_1/g": (C,),
        "ln_1/b": (C,),
        "attn/c_attn/w": (C, 3 * C),
        "attn/c_attn/b": (3 * C,),
        "attn/c_proj/w": (C, C),
        "attn/c_proj/b": (C,),
        "ln_2/g": (C,),
        "ln_2/b": (C,),
        "mlp/c_fc/w": (C, 4 * C),
        "mlp/c_fc/b": (4 * C,),
        "mlp/c_proj/w": (4 * C, C),
        "mlp/c_proj/b": (C,),
    }
    for i in range(cfg.n_layer):
        for k, s in per_block.items():
            shapes[f"h{i}/{k}"] = s
    return shapes


# HF name pieces -> canonical: weight -> g/w, bias -> b
_HF_RE = re.compile(r"^(?:transformer\.)?(?:h\.(\d+)\.)?([a-z_0-9.]+)\.(weight|bias)$")
# Buffers some HF files carry that are not parameters: the causal mask of each layer
# (h.N.attn.bias, 1x1xn_ctx x n_ctx) and, in older files, h.N.attn.masked_bias.
_HF_BUFFER_RE = re.compile(r"^(?:transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")


def hf_to_canonical(name: str) -> str | None:
    """`transformer.h.3.mlp.c_fc.weight` -> `h3/mlp/c_fc/w`; None for a buffer to skip."""
    if _HF_BUFFER_RE.match(name):
        return None
    if name in ("lm_head.weight",):
        return "lm_head"
    m = _HF_RE.match(name)
    if not m:
        return "?" + name
    layer, mod, kind = m.groups()
    mod = mod.replace(".", "/")
    if mod in ("ln_1", "ln_2", "ln_f"):
        leaf = "g" if kind == "weight" else "b"
    elif mod in ("wte", "wpe"):
        return mod if kind == "weight" and layer is None else "?" + name
    else:
        leaf = "w" if kind == "weight" else "b"
    prefix = "" if layer is None else f"h{layer}/"
    return f"{prefix}{mod}/{leaf}"


def canonical_to_hf(name: str) -> str:
    """`h3/mlp/c_fc/w` -> `h.3.mlp.c_fc.weight` (the key layout transformers saves)."""
    if name in ("wte", "wpe"):
        return f"{name}.weight"
    if name == "lm_head":
        return "lm_head.weight"
    parts = name.split("/")
    leaf = parts[-1]
    kind = "weight" if leaf in ("g", "w") else "bias"
    mods = parts[:-1]
    if mods[0].startswith("h") and mods[0][1:].isdigit():
        mods = ["h", mods[0][1:]] + mods[1:]
    return ".".join(mods + [kind])


def check_and_nest(
    flat: dict[str, np.ndarray], cfg: GPT2Config, source: str, check_finite: bool = True
) -> dict:
    """Validate a flat canonical dict against `cfg` and nest it.

    Errors name `source` (the file) and the tensor: unknown or missing keys, wrong shapes,
    unsupported dtypes, non-finite values.
    """
    if cfg.n_layer > len(flat):
        # Checked before building the table of 12 names per layer: a config.json may say
        # n_layer=10,000,000, and that table alone would take gigabytes.
        raise WeightsError(
            f"{source}: missing tensor(s): the config's n_layer={cfg.n_layer} needs "
            f"{12 * cfg.n_layer + 4} tensors, the file holds {len(flat)}"
        )
    shapes = expected_shapes(cfg)
    unknown = sorted(set(flat) - set(shapes))
    if unknown:
        raise WeightsError(
            f"{source}: unknown tensor(s) {', '.join(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    missing = [k for k in shapes if k not in flat]
    if missing:
        raise WeightsError(
            f"{source}: missing tensor(s) {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    for name, want in shapes.items():
        a = flat[name]
        if tuple(a.shape) != want:
            raise WeightsError(
                f"{source}: tensor {name} has shape {tuple(a.shape)}, but the config "
                f"(n_embd={cfg.n_embd}, n_ctx={cfg.n_ctx}, n_vocab={cfg.n_vocab}) needs {want}"
            )
        if a.dtype != np.float32:
            raise WeightsError(f"{source}: tensor {name} has dtype {a.dtype}, expected float32")
        if check_finite and not np.isfinite(a).all():
            raise WeightsError(f"{source}: tensor {name} contains NaN or Inf values")
    return nest(flat, cfg)


def nest(flat: dict[str, np.ndarray], cfg: GPT2Config) -> dict:
    blocks = []
    for i in range(cfg.n_layer):
        block: dict = {"attn": {}, "mlp": {}}
        for mod, leaves in _LEAVES.items():
            d = {leaf: flat[f"h{i}/{mod}/{leaf}"] for leaf in leaves}
            if "/" in mod:
                outer, inner = mod.split("/")
                block[outer][inner] = d
            else:
                block[mod] = d
        blocks.append(block)
    params = {
        "wte": flat["wte"],
        "wpe": flat["wpe"],
        "ln_f": {"g": flat["ln_f/g"], "b": flat["ln_f/b"]},
        "blocks": blocks,
    }
    if "lm_head" in flat:  # an untied head (cfg.tie_word_embeddings False)
        params["lm_head"] = flat["lm_head"]
    return params


def flatten(params: dict) -> dict[str, np.ndarray]:
    """Nested params -> flat canonical dict (the inverse of `nest`)."""
    flat = {
        "wte": params["wte"],
        "wpe": params["wpe"],
        "ln_f/g": params["ln_f"]["g"],
        "ln_f/b": params["ln_f"]["b"],
    }
    if "lm_head" in params:
        flat["lm_head"] = params["lm_head"]
    for i, block in enumerate(params["blocks"]):
        for mod, leaves in _LEAVES.items():
            node = block
            for part in mod.split("/"):
                node = node[part]
            for leaf in leaves:
                flat[f"h{i}/{mod}/{leaf}"] = node[leaf]
    return flat
