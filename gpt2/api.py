"""The small Python API, a front door over the layers below: load a model (`ref.model.Model`
on the numpy backends, `fast.torch.model.TorchModel` on the torch ones), tokenize, generate,
instruct, evaluate."""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fast import NUMPY_BACKENDS, get_backend
from gpt2.progress import download_bar, note
from ref import beam as ref_beam
from ref import evaluate as ref_evaluate
from ref import generate as ref_generate
from ref import quant as ref_quant
from ref.model import KV_DTYPES, Model, check_ids
from ref.prompts import INSTRUCTION_STOP, alpaca_prompt
from ref.sampling import SamplingParams
from weights import loader
from weights.tokenizer import decode_bytes, encode


def token_ids(ids, n_vocab: int, what: str = "generate(): prompt") -> list[int]:
    """Token ids given directly: integers in [0, n_vocab), or a ValueError naming the call,
    the argument and the bad id (numpy would truncate 1.5 to 1 and read wte[-1] for -1
    without a word)."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"{what}: token ids must be a 1-D integer array, got {ids.dtype} "
                             f"of shape {ids.shape}")  # fmt: skip
        ids = ids.tolist()
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{what}: token id {i!r} is not an integer")
    out = [int(i) for i in ids]
    try:
        check_ids(np.array(out, dtype=np.int64), n_vocab)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return out


def load(
    model: str = "124M",
    backend: str = "ref",
    cache_dir: str | None = None,
    dtype: str = "float32",
    kv_dtype: str = "float32",
):
    """Load `model` (a size name, a model directory, a .safetensors or a .gguf file) on `backend`.

    numpy backends (ref, numba): a `Model`; with dtype "bfloat16", "float16" or "int8" (q8_0)
    its weights are stored in that form (`ref.quant.quantize_params`: the projections and the
    LM head) and computed in float32; on numba float32 weights are stored that way as well
    (float32 QWeights, for its row kernel). Its KV caches store keys and values as `kv_dtype`
    ("float32", or "float16": half the bytes, `ref.model.KVCache`). torch and triton: a
    `fast.torch.model.TorchModel` whose weights and KV cache take `dtype` ("float32",
    "bfloat16" or "float16"). The logits are float32 whatever the dtype."""
    if dtype not in ref_quant.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(ref_quant.DTYPES)}, got {dtype!r}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    if dtype == "int8" and backend not in NUMPY_BACKENDS:
        raise ValueError(f"dtype int8 needs backend numba or ref ({backend} has no int8)")
    if kv_dtype != "float32" and backend not in NUMPY_BACKENDS:
        raise ValueError(
            f"kv_dtype {kv_dtype} needs backend numba or ref ({backend} keeps its KV cache in "
            "the model's dtype)"
        )
    ops = get_backend(backend)  # fail on a missing library before reading gigabytes
    cfg, params = loader.load(model, cache_dir=cache_dir, progress=download_bar(), notify=note)
    if ref_quant.is_quantized(params):  # a q8_0 GGUF file: its blocks run as they are stored
        if backend not in NUMPY_BACKENDS:
            raise ValueError(f"{model}: q8_0 weights run on backend numba or ref, not {backend}")
        if dtype not in ("float32", "int8"):
            raise ValueError(
                f"{model}: its weights are stored as q8_0; --dtype {dtype} would requantize "
                "them (leave --dtype out, or export another type)"
            )
        return Model(cfg, params, ops, kv_dtype)
    if backend in NUMPY_BACKENDS:
        # numba stores float32 weights as a float32 tree of QWeights too, (Cout, Cin): its
        # decode steps run on fast/numba/quant.py's row kernel, which reads each weight once at
        # memory speed without BLAS's thread pool (1.0-1.2x llama.cpp's f32 decode where the
        # plain tree through BLAS made 0.7-0.76x: `python -m bench.tools.vs_llama_cpp`);
        # prompts still go to BLAS. The float32 values are the same.
        if dtype != "float32" or backend == "numba":
            params = ref_quant.quantize_params(params, dtype)
        return Model(cfg, params, ops, kv_dtype)
    import torch

    from fast.torch.model import TorchModel

    return TorchModel(cfg, params, backend, dtype=getattr(torch, dtype))


@dataclass
class GenerateResult:
    text: str  # the completion, without the prompt (and cut before a stop string)
    token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop"
    logprobs: list[float] = field(default_factory=list)  # model log-prob of each token
    score: float | None = None  # beam search only: length-penalised sum of log-probs
    seed: int | None = None  # the run's seed (drawn when none was given): rerun with it


@dataclass
class Timing:
    prefill_s: float = 0.0  # prompt forward pass, up to the first token chosen
    decode_s: float = 0.0  # every later step
    new_tokens: int = 0  # token positions run through the model in the decode steps

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


def generate_batch(
    model,
    prompts: list[str | list[int]],
    max_new_tokens: int = 40,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    logit_bias: dict[int, float] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    stop: Sequence[str] = (),
    seed: int | None = None,
    eos_id: int | None = ref_generate.EOT,
    on_token: Callable[[int, int], None] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    timing: Timing | None = None,
) -> list[list[GenerateResult]]:
    """Continue each prompt (text, or token ids); one list of completions per prompt.

    Sampling (temperature > 0) returns num_return_sequences samples per prompt; beam search
    (num_beams > 1) the num_return_sequences best beams, best first, with their `score`;
    both together are beam sampling (`ref.beam.beam_search`).
    See `ref.sampling` for the order the sampling options apply in, and `ref.generate` for
    beam search and stop strings. The same seed and arguments give the same text.
    `on_token(row, id)` / `on_text(row, text)` stream (sampling and greedy only); row r
    belongs to prompt r // num_return_sequences.
    """
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        logit_bias=dict(logit_bias or {}),
    )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"generate(): seed must be an integer >= 0, got {seed!r}")
    if seed is None and temperature != 0:
        seed = draw_seed()  # sampling without a seed: draw one, so the run can be repeated
    ids = [
        encode(p)
        if isinstance(p, str)
        else token_ids(p, model.cfg.n_vocab, f"generate(): prompt {i}")
        for i, p in enumerate(prompts)
    ]
    stats: dict = {}
    common = dict(
        params=params,
        eos_id=eos_id,
        stop=list(stop),
        decode_bytes=decode_bytes,
        num_return_sequences=num_return_sequences,
        stats=stats,
    )
    if num_beams != 1:  # beam_search checks num_beams (0 and non-integers included)
        outs = ref_beam.beam_search(
            model,
            ids,
            max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            seed=seed,
            **common,
        )
    else:
        outs = ref_generate.generate(
            model,
            ids,
            max_new_tokens,
            seed=seed,
            on_token=on_token,
            on_text=on_text,
            **common,
        )
    if timing is not None:
        timing.prefill_s = stats["prefill_s"]
        timing.decode_s = stats["decode_s"]
        timing.new_tokens = stats["decode_tokens"]
    n = num_return_sequences
    results = [
        GenerateResult(o.text, o.token_ids, o.finish_reason, o.logprobs, o.score, seed)
        for o in outs
    ]
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


def draw_seed() -> int:
    """A fresh seed for a run that was given none (reported, so the run can be repeated)."""
    return secrets.randbelow(2**31)


_BATCH_OPTIONS = set(inspect.signature(generate_batch).parameters) - {"model", "prompts"}


def generate(
    model,
    prompt: str | list[int] | list[str] | np.ndarray,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    timing: Timing | None = None,
    **options,
) -> list[GenerateResult] | list[list[GenerateResult]]:
    """Continue `prompt`: text or token ids (a list or a 1-D array) give a list of
    num_return_sequences results; a list of texts is a batch, and gives one such list per
    prompt. `options` are those of `generate_batch` (the sampling, beam and stop options)."""
    unknown = sorted(set(options) - _BATCH_OPTIONS)
    if unknown:
        raise TypeError(
            f"generate() got an unexpected keyword argument {unknown[0]!r}; it takes "
            + ", ".join(sorted(_BATCH_OPTIONS))
        )
    batch = (
        isinstance(prompt, (list, tuple))
        and bool(prompt)
        and all(isinstance(p, str) for p in prompt)
    )
    out = generate_batch(
        model,
        list(prompt) if batch else [prompt],
        max_new_tokens,
        temperature=temperature,
        seed=seed,
        on_token=on_token,
        timing=timing,
        **options,
    )
    return out if batch else out[0]


def instruct(
    model, instruction: str, input: str = "", max_new_tokens: int = 256, **options
) -> GenerateResult:
    """Answer an instruction in the Alpaca format (`ref.prompts.alpaca_prompt`): the result
    holds only the response, which ends at <|endoftext|> or where the model starts a new
    `### Instruction` section; surrounding whitespace is stripped from its text."""
    stop = [INSTRUCTION_STOP, *options.pop("stop", ())]
    r = generate(model, alpaca_prompt(instruction, input), max_new_tokens, stop=stop, **options)[0]
    r.text = r.text.strip()
    return r


def evaluate(
    model,
    text: str | list[int],
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ref_evaluate.EvalResult:
    """Mean cross-entropy (nats/token) and perplexity of `text`; `progress(done, total)` is
    called after each window (see `ref.evaluate` for the windows and `stride`)."""
    ids = (
        encode(text)
        if isinstance(text, str)
        else token_ids(text, model.cfg.n_vocab, "evaluate(): text")
    )
    return ref_evaluate.evaluate(model, ids, stride=stride, progress=progress)
