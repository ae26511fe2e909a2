"""GPT-2 hyperparameters: one config type for the four released sizes.

OpenAI's `hparams.json` says n_vocab, n_ctx, n_embd, n_head, n_layer; Hugging Face's
`config.json` says vocab_size, n_positions (or n_ctx), n_embd, n_head, n_layer and
layer_norm_epsilon. Both map onto `GPT2Config`.
"""

from __future__ import annotations

import json
import os
import reprlib
from dataclasses import asdict, dataclass
from typing import IO

# JSON integers longer than this are refused before int() sees them: no size, count or offset
# needs more than 20 digits, every shorter integer converts to a float (float() of an int past
# 1.8e308 raises OverflowError), and int() of a d-digit string costs O(d**2), so the cost per
# input byte stays bounded whatever the interpreter's own digit limit (sys.int_info).
MAX_JSON_DIGITS = 300


class ConfigError(ValueError):
    """A config file is missing, malformed or describes an impossible model."""


@dataclass(frozen=True)
class GPT2Config:
    n_vocab: int = 50257  # V
    n_ctx: int = 1024  # maximum sequence length (rows of wpe)
    n_embd: int = 768  # C
    n_head: int = 12  # NH; head size hs = C // NH
    n_layer: int = 12  # L
    eps: float = 1e-5  # LayerNorm epsilon (OpenAI's code hard-codes 1e-5)
    # the LM head is wte (GPT-2, every released size); False: a head of its own, params
    # ["lm_head"] (V, C), as the book's GPTModel has (transformers' tie_word_embeddings)
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
            if value > 10_000_000:
                raise ConfigError(f"config: {name}={brief(value)} is absurdly large")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(
                f"config: tie_word_embeddings must be true or false, got "
                f"{brief(self.tie_word_embeddings)}"
            )
        if not (isinstance(self.eps, float) and 0.0 < self.eps < 1.0):
            raise ConfigError(f"config: eps must be a float in (0, 1), got {brief(self.eps)}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        """Parameter count (124M, its head tied to wte -> 124,439,808; untied: + V * C)."""
        C, L = self.n_embd, self.n_layer
        per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C)
        per_block += 4 * C * C + C
        head = 0 if self.tie_word_embeddings else self.n_vocab * C
        return self.n_vocab * C + self.n_ctx * C + L * per_block + 2 * C + head

    def to_hparams(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "eps"}
        if self.tie_word_embeddings:  # OpenAI's hparams.json has no such key: GPT-2 ties
            del out["tie_word_embeddings"]
        return out

    def to_hf_config(self) -> dict:
        """A `config.json` that transformers' GPT2LMHeadModel loads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.n_vocab,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        }


# The four released sizes (OpenAI's hparams.json for each).
SIZES: dict[str, GPT2Config] = {
    "124M": GPT2Config(n_embd=768, n_head=12, n_layer=12),
    "355M": GPT2Config(n_embd=1024, n_head=16, n_layer=24),
    "774M": GPT2Config(n_embd=1280, n_head=20, n_layer=36),
    "1558M": GPT2Config(n_embd=1600, n_head=25, n_layer=48),
}
ALIASES: dict[str, str] = {
    "gpt2": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
    "117M": "124M",  # the name OpenAI first used for the small model
    "345M": "355M",
}


def canonical_size(name: str) -> str | None:
    """'gpt2-medium' -> '355M'; None when `name` is not a size name."""
    key = name.strip()
    key = key.removeprefix("openai-community/")
    if key in SIZES:
        return key
    return ALIASES.get(key.lower())


def _get(d: dict, path: str, *names: str, required: bool = True):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if required:
        raise ConfigError(f"{path}: missing key {names[0]!r}")
    return None


def config_from_dict(d: object, path: str = "<config>") -> GPT2Config:
    """Build a config from an `hparams.json` or a `config.json` dict."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    kw = {
        "n_vocab": _get(d, path, "n_vocab", "vocab_size"),
        "n_ctx": _get(d, path, "n_ctx", "n_positions"),
        "n_embd": _get(d, path, "n_embd", "hidden_size"),
        "n_head": _get(d, path, "n_head", "num_attention_heads"),
        "n_layer": _get(d, path, "n_layer", "num_hidden_layers"),
    }
    # config.json may hold both n_ctx and n_positions; n_positions is the wpe size.
    if "n_positions" in d and d["n_positions"] is not None:
        kw["n_ctx"] = d["n_positions"]
    for k, v in kw.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{path}: {k} must be an integer, got {brief(v)}")
    eps = d.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, int) and not isinstance(eps, bool):
        if not 0 <= eps <= 1:  # range-checked before float(), which overflows past 1.8e308
            raise ConfigError(f"{path}: layer_norm_epsilon must be in (0, 1), got {brief(eps)}")
        eps = float(eps)
    if not isinstance(eps, float):
        raise ConfigError(f"{path}: layer_norm_epsilon must be a number, got {brief(eps)}")
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{path}: activation_function {brief(act)} is not GPT-2's tanh GELU")
    tie = d.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise ConfigError(f"{path}: tie_word_embeddings must be true or false, got {brief(tie)}")
    try:
        return GPT2Config(eps=eps, tie_word_embeddings=tie, **kw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_json(path: str, error: type[Exception], what: str = "file") -> object:
    """The JSON value in `path`, or `error` with a message naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_json(f, error, f"{path}: not valid UTF-8 JSON")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None


def parse_json(src: bytes | str | IO[str], error: type[Exception], problem: str) -> object:
    """The JSON value in `src` (bytes are UTF-8, a text file is read to its end), or
    `error(f"{problem} ({why})")`; an OSError reading the file is left to the caller.

    The one place that knows what json can raise: UnicodeDecodeError for bytes that are not
    UTF-8; ValueError for bad syntax and for integers of more than MAX_JSON_DIGITS digits;
    RecursionError for deep nesting (the decoder stops at sys.getrecursionlimit() levels, so
    nesting costs no more than its bytes); TypeError when `src` is not text at all (a metadata
    value, say).
    """
    try:
        if hasattr(src, "read"):
            src = src.read()
        if isinstance(src, bytes):
            src = src.decode("utf-8")
        return json.loads(src, parse_int=_json_int)
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError) as e:
        raise error(f"{problem} ({e})") from None


def _json_int(digits: str) -> int:
    if len(digits) > MAX_JSON_DIGITS + 1:  # + 1 for a minus sign
        raise ValueError(f"an integer of {len(digits)} digits (at most {MAX_JSON_DIGITS})")
    return int(digits)


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 80, 80, 40
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 8


def brief(value: object) -> str:
    """repr(value) cut to about 80 characters (and 3 levels of nesting), for error messages
    that quote what an input file said: a quoted value may be megabytes long or nested too
    deep for repr()."""
    return _BRIEF.repr(value)


def load_config(path: str) -> GPT2Config:
    """Read `hparams.json` or `config.json`."""
    return config_from_dict(read_json(path, ConfigError, "config file"), os.fspath(path))
