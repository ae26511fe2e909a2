"""Resolve a `--model` argument and load its config and params.

`--model` takes:
    a size name: 124M 355M 774M 1558M (or gpt2, gpt2-medium, gpt2-large, gpt2-xl), looked up in
        the cache directory and downloaded on first use;
    a directory holding OpenAI's TensorFlow checkpoint (hparams.json, model.ckpt.*) or a
        Hugging Face model (config.json, model.safetensors or a sharded set with its
        model.safetensors.index.json), such as a `gpt2 finetune --out` directory;
    a `.safetensors` file, with config.json (or hparams.json) beside it;
    a `.gguf` file (llama.cpp's format, its config in its own metadata: weights/gguf.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ref.config import (
    SIZES,
    ConfigError,
    GPT2Config,
    brief,
    canonical_size,
    load_config,
    parse_json,
)
from weights import WeightsError, read_error
from weights import safetensors as st
from weights.layout import check_and_nest, hf_to_canonical

if TYPE_CHECKING:
    from weights.download import BarFactory

HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
TF_INDEX = "model.ckpt.index"


def detect_format(path: str) -> str:
    """'tf' | 'hf' | 'gguf' for a model directory or file; raises WeightsError if none."""
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "hf"
        if path.endswith(".gguf"):
            return "gguf"
        raise WeightsError(f"{path}: not a .safetensors or .gguf file or a model directory")
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such file or directory")
    if os.path.exists(os.path.join(path, HF_SINGLE)) or os.path.exists(
        os.path.join(path, HF_INDEX)
    ):
        return "hf"
    if os.path.exists(os.path.join(path, TF_INDEX)) or os.path.exists(
        os.path.join(path, "checkpoint")
    ):
        return "tf"
    raise WeightsError(
        f"{path}: no model found (expected {HF_SINGLE}, {HF_INDEX} or a TensorFlow "
        f"checkpoint with {TF_INDEX})"
    )


def _config_near(directory: str, prefer: tuple[str, ...]) -> GPT2Config:
    for name in prefer:
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return load_config(p)
    raise WeightsError(f"{directory}: missing file {prefer[0]} (the model's config)")


def _safe_join(directory: str, name: object, index_path: str) -> str:
    """A shard path from the index, refused if it would leave the model directory."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
        raise WeightsError(f"{index_path}: invalid shard file name {brief(name)}")
    try:
        os.fsencode(name)  # JSON can spell lone surrogates, which no file name holds
    except UnicodeEncodeError:
        raise WeightsError(f"{index_path}: invalid shard file name {brief(name)}") from None
    base = os.path.realpath(directory)
    full = os.path.realpath(os.path.join(base, name))
    if os.path.dirname(full) != base:
        raise WeightsError(f"{index_path}: shard path {brief(name)} escapes the model directory")
    return full


def hf_files(path: str) -> list[str]:
    """The safetensors file(s) of a HF model path (a file, or a directory single / sharded)."""
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, HF_INDEX)
    if os.path.exists(index):
        problem = f"{index}: not a valid shard index"
        try:
            with open(index, "rb") as f:
                doc = parse_json(f.read(), WeightsError, problem)
        except OSError as e:
            raise read_error(index, e) from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{problem} (no weight_map object)")
        # Each distinct name is resolved once: an index may name one shard for every tensor,
        # and resolving a path costs a system call per component.
        names = set()
        for v in weight_map.values():
            if not isinstance(v, str):
                raise WeightsError(f"{index}: invalid shard file name {brief(v)}")
            names.add(v)
        files = sorted({_safe_join(path, v, index) for v in names})
        for f in files:
            if not os.path.isfile(f):  # a name like "sub" may resolve to a directory
                raise WeightsError(f"{f}: shard named in {index} is missing")
        return files
    return [os.path.join(path, HF_SINGLE)]


def load_hf(path: str, check_finite: bool = True) -> tuple[GPT2Config, dict]:
    """A Hugging Face GPT-2: `transformer.`-prefixed or bare keys, buffers skipped."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg = _config_near(directory, ("config.json", "hparams.json"))
    flat: dict[str, np.ndarray] = {}
    lm_head = None
    for file in hf_files(path):
        for name, a in st.read(file).items():
            key = hf_to_canonical(name)
            if key is None:
                continue  # the attention-mask buffers: not parameters
            if key.startswith("?"):
                raise WeightsError(f"{file}: unknown tensor {name!r}")
            if a.dtype != np.float32:
                if a.dtype.kind != "f":
                    raise WeightsError(f"{file}: tensor {name!r} has unsupported dtype {a.dtype}")
                a = a.astype(np.float32)
            if key == "lm_head":
                lm_head = (file, a)
                continue
            if key in flat:
                raise WeightsError(f"{file}: tensor {name!r} appears twice")
            flat[key] = a
    if lm_head is not None and not cfg.tie_word_embeddings:
        flat["lm_head"] = lm_head[1]  # the head of its own that the config announces
    elif lm_head is not None and "wte" in flat:
        file, a = lm_head
        if a.shape != flat["wte"].shape or not np.array_equal(a, flat["wte"]):
            raise WeightsError(
                f"{file}: lm_head.weight differs from wte, but the config ties them "
                "(tie_word_embeddings is true or absent)"
            )
    return cfg, check_and_nest(flat, cfg, path, check_finite)


def load_tf(directory: str, check_finite: bool = True) -> tuple[GPT2Config, dict]:
    """OpenAI's TensorFlow checkpoint, read with numpy (see weights/tf_checkpoint.py)."""
    from weights import tf_checkpoint

    cfg = _config_near(directory, ("hparams.json", "config.json"))
    prefix = tf_checkpoint.checkpoint_prefix(directory)
    flat = {}
    for name, a in tf_checkpoint.read(prefix).items():
        if not name.startswith("model/"):
            raise WeightsError(f"{prefix}.index: unknown tensor {name!r}")
        key = name[len("model/") :]
        if key.startswith("h") and key.endswith("/w") and a.ndim == 3 and a.shape[0] == 1:
            a = a[0]  # OpenAI stores conv1d weights as (1, in, out)
        flat[key] = a
    return cfg, check_and_nest(flat, cfg, prefix, check_finite)


# Models that ship inside the package (weights/models/NAME/): trained by this project with
# `gpt2 train`, each with the command, its log.jsonl and loss.png beside it (README.md there).
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
SHIPPED = {"shakespeare": os.path.join(MODELS_DIR, "shakespeare")}


def read_config(model: str) -> GPT2Config:
    """The config of `--model` without reading (or downloading) any weights: a size name's
    is known; a directory's or a .safetensors file's is its config file. So the flags that
    depend on the model (its context) are checked before any weights are loaded."""
    bare = "/" not in model.removeprefix("openai-community/") and os.sep not in model
    size = canonical_size(model) if bare else None
    if bare and model in SHIPPED:
        model = SHIPPED[model]
    elif size is not None:
        return SIZES[size]
    if bare and not os.path.exists(model) and looks_like_size(model):
        from weights import download as dl

        raise WeightsError(dl.unknown_size(model))
    fmt = detect_format(model)
    if fmt == "gguf":
        from weights import gguf

        return gguf.read_config(model)
    directory = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))
    prefer = ("config.json", "hparams.json") if fmt == "hf" else ("hparams.json", "config.json")
    try:
        return _config_near(directory, prefer)
    except ConfigError as e:
        raise WeightsError(str(e)) from None


def looks_like_size(name: str) -> bool:
    """'125M', '1.5B', 'gpt2-small': meant as a released size, not as a path."""
    key = name.strip().lower().removeprefix("openai-community/")
    return bool(re.fullmatch(r"\d+(\.\d+)?[mb]|gpt-?2([-_]\w+)?", key))


def load(
    model: str,
    cache_dir: str | None = None,
    download: bool = True,
    progress: BarFactory | None = None,
    notify: Callable[[str], None] | None = None,
):
    """`--model` -> (cfg, params). Size names come from the cache, downloaded on first use,
    with a bar per file from `progress` (a weights.download.BarFactory; None draws none) and
    retries announced to `notify`. A name that looks like a size but is none (125M) and is
    no path either is refused as an unknown model, not as a missing file."""
    # A bare size name always means the cache (write ./gpt2 for a directory named gpt2).
    bare = "/" not in model.removeprefix("openai-community/") and os.sep not in model
    size = canonical_size(model) if bare else None
    if bare and model in SHIPPED:  # a model in the package itself: no cache, no network
        model = SHIPPED[model]
    elif size is not None:
        from weights import download as dl

        path = dl.model_dir(size, cache_dir)
        if not dl.is_complete(size, cache_dir):
            if not download:
                raise WeightsError(f"{path}: model {size} is not downloaded (gpt2 download {size})")
            path = dl.download(size, cache_dir, progress=progress, notify=notify)
        model = path
    elif bare and not os.path.exists(model) and looks_like_size(model):
        from weights import download as dl

        raise WeightsError(dl.unknown_size(model))
    try:
        fmt = detect_format(model)
        if fmt == "gguf":
            from weights import gguf

            return gguf.load(model)
        return load_hf(model) if fmt == "hf" else load_tf(model)
    except ConfigError as e:
        raise WeightsError(str(e)) from None
