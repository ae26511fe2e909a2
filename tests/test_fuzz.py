"""Fuzzing every parser of untrusted input: bad bytes must end in the project's own error.

Each test feeds generated input to one parser and accepts exactly two outcomes: a result that
satisfies the parser's invariants, or the project's clear error type with a message
(`weights.WeightsError`, `ref.config.ConfigError`, `gpt2.cli.UsageError`, or the ValueError a
function documents). Anything else (KeyError, TypeError, OverflowError, MemoryError, a crash)
fails the test.

Example counts: FUZZ_EXAMPLES per test (default 300, what CI runs). The full run is
`python tests/fuzz/run_full.py` (10,000 per test); with FUZZ_REPORT=path the number of cases
each test really ran is written there as JSON.

Coverage-guided fuzzing (atheris, tests/fuzz/atheris_targets.py) runs each target for
ATHERIS_SECONDS (default 4) here; the long run is `python tests/fuzz/run_atheris.py --minutes
10`. Without atheris installed (`pip install atheris`, Linux x86-64 wheels) those tests skip.
"""

from __future__ import annotations

import collections
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from fuzz import tf_table
from fuzz.atheris_targets import TARGETS as ATHERIS_TARGETS
from fuzz.atheris_targets import put
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2.cli import UsageError
from ref.config import ConfigError, GPT2Config, load_config
from ref.model import ContextLengthError
from weights import WeightsError, loader
from weights import safetensors as sft
from weights.layout import canonical_to_hf, expected_shapes
from weights.tokenizer import EOT_ID, EOT_TOKEN, decode, decode_bytes, encode

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
fuzz = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)
CASES: collections.Counter = collections.Counter()  # cases run per test, for FUZZ_REPORT

# A tiny GPT-2 whose loading costs milliseconds; n_vocab 16 keeps its files small.
TINY = GPT2Config(n_vocab=16, n_ctx=8, n_embd=4, n_head=2, n_layer=1)
# Interesting integers for sizes and offsets: boundaries of int32/int64/uint64, 1 TB, and
# Python ints past any C type.
BIG_INTS = [0, 1, 3, 4, 7, 8, 255, 2**31 - 1, 2**31, 2**32, 10**12, 2**53 + 1, 2**62 - 1]
BIG_INTS += [2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -(2**63)]


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    path = os.environ.get("FUZZ_REPORT")
    if path:
        old = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        old.update(CASES)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(old, f, indent=1, sort_keys=True)


def _tiny_params(cfg: GPT2Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in expected_shapes(cfg).items()
    }


def _write_hf_model(directory, cfg: GPT2Config) -> None:
    flat = _tiny_params(cfg)
    sft.write(
        os.path.join(directory, "model.safetensors"),
        {canonical_to_hf(k): v for k, v in flat.items()},
    )
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf_config(), f)


def _message(e: BaseException) -> str:
    msg = str(e)
    assert msg.strip(), f"{type(e).__name__} without a message"
    return msg


# ---------------------------------------------------------------- mutations of a valid file


@st.composite
def mutated(draw, base: bytes, max_ops: int = 4) -> bytes:
    """`base` with a few random edits: byte flips, overwrites, cuts, insertions, and the
    little-endian integers at a random offset replaced by a boundary value."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "int"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "int":
            value = draw(st.sampled_from(BIG_INTS)) % 2**64
            data[pos : pos + 8] = struct.pack("<Q", value)
    return bytes(data)


# ---------------------------------------------------------------------------- safetensors


def _valid_safetensors(tmp_dir) -> bytes:
    rng = np.random.default_rng(1)
    path = os.path.join(tmp_dir, "base.safetensors")
    sft.write(
        path,
        {
            "a": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal(7).astype(np.float16),
            "c": np.arange(4, dtype=np.int64),
            "empty": np.zeros((0, 3), np.float32),
        },
        metadata={"format": "pt"},
    )
    with open(path, "rb") as f:
        return f.read()


def _check_read(path: str) -> None:
    """st.read must return in-bounds arrays or raise WeightsError; never allocate more than
    the file could justify."""
    size = os.path.getsize(path)
    tracemalloc.start()
    try:
        out = sft.read(path)
    except WeightsError as e:
        assert path in _message(e)
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # Parsing the JSON header costs Python objects (tens of bytes per header byte) and a
        # BF16 tensor is widened to float32 (2x its bytes); nothing may scale with a declared
        # size. 64x the file plus 4 MiB of slack bounds both.
        assert peak <= 64 * size + 4 * 2**20, f"read allocated {peak} bytes for a {size}-byte file"
    # memory-mapped tensors are read-only views; a writeable one is a widened BF16 copy
    stored = sum(a.nbytes // (2 if a.flags.writeable else 1) for a in out.values())
    assert stored <= size
    for a in out.values():
        np.asarray(a).tobytes()  # every byte of every view really lies in the file


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz_st"))


@pytest.fixture(scope="module")
def st_base(st_dir):
    return _valid_safetensors(st_dir)


@fuzz
@given(data=st.data())
def test_safetensors_mutated_file(st_dir, st_base, data):
    """A valid file (F32, F16, I64, an empty tensor, metadata) with random edits."""
    CASES["safetensors_mutated"] += 1
    blob = data.draw(mutated(st_base))
    _check_read(put(os.path.join(st_dir, "m.safetensors"), blob))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(BIG_INTS),
    st.integers(-5, 40),
    st.floats(allow_nan=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)
dtypes = st.sampled_from(list(sft._DTYPES) + ["F8", "f32", "F32 ", "", "STR", "float32"])
dims = st.one_of(st.integers(0, 6), st.sampled_from(BIG_INTS))


@st.composite
def st_entry(draw, data_len: int):
    """A header entry that is mostly well-formed, so the checks after the first one run."""
    e = {
        "dtype": draw(dtypes | json_values) if draw(st.integers(0, 9)) == 0 else draw(dtypes),
        "shape": draw(st.lists(dims, max_size=4) | json_values)
        if draw(st.integers(0, 9)) == 0
        else draw(st.lists(dims, max_size=4)),
    }
    near = st.integers(0, data_len + 2) | st.sampled_from(BIG_INTS)
    e["data_offsets"] = (
        draw(json_values) if draw(st.integers(0, 9)) == 0 else [draw(near), draw(near)]
    )
    if draw(st.integers(0, 9)) == 0:
        del e[draw(st.sampled_from(sorted(e)))]
    return e


@fuzz
@given(data=st.data())
def test_safetensors_header(st_dir, data):
    """Huge declared sizes, overlapping and out-of-range offsets, wrong dtypes and shapes,
    non-UTF-8 and non-JSON headers, lying header lengths."""
    CASES["safetensors_header"] += 1
    data_len = data.draw(st.integers(0, 64))
    names = st.text(min_size=1, max_size=6)
    header = data.draw(st.dictionaries(names, st_entry(data_len), max_size=4))
    if data.draw(st.booleans()):
        header["__metadata__"] = data.draw(json_values)
    raw = json.dumps(header).encode("utf-8")
    kind = data.draw(st.sampled_from(["ok", "ok", "bytes", "non_utf8", "lie", "deep", "digits"]))
    if kind == "bytes":
        raw = data.draw(st.binary(max_size=64))
    elif kind == "non_utf8":
        pos = data.draw(st.integers(0, len(raw)))
        raw = (
            raw[:pos]
            + data.draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80"]))
            + raw[pos:]
        )
    elif kind == "deep":
        raw = b"[" * data.draw(st.integers(1, 100_000))
    elif kind == "digits":  # past Python's 4300-digit limit for int()
        raw = b'{"a": {"dtype": "F32", "shape": [' + b"9" * 4400 + b'], "data_offsets": [0, 0]}}'
    n = len(raw)
    if kind == "lie":
        n = data.draw(st.sampled_from(BIG_INTS)) % 2**64
    blob = struct.pack("<Q", n) + raw + data.draw(st.binary(min_size=data_len, max_size=data_len))
    _check_read(put(os.path.join(st_dir, "h.safetensors"), blob))


# ---------------------------------------------------------------------------- shard index


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """model/ with a shard, a shard in a subdirectory, a symlink out, and a file outside
    that an escaping path would reach."""
    root = tmp_path_factory.mktemp("fuzz_shards")
    model = root / "model"
    (model / "sub").mkdir(parents=True)
    for p in (
        model / "a.safetensors",
        model / "sub" / "b.safetensors",
        root / "outside.safetensors",
    ):
        p.write_bytes(b"x")
    (model / "link.safetensors").symlink_to(root / "outside.safetensors")
    (model / "uplink").symlink_to(root)
    (model / "inlink.safetensors").symlink_to(model / "a.safetensors")
    return str(model)


shard_names = st.one_of(
    st.sampled_from(
        [
            "a.safetensors",
            "./a.safetensors",
            "a.safetensors/",
            "inlink.safetensors",
            "missing.safetensors",
            "sub/b.safetensors",
            "sub",
            "..",
            ".",
            "",
            "../outside.safetensors",
            "../model/a.safetensors",
            "link.safetensors",
            "uplink/outside.safetensors",
            "/etc/passwd",
            "a.safetensors\x00.txt",
            "\\..\\outside.safetensors",
            "~/a.safetensors",
            "a" * 5000,
        ]
    ),
    st.text(max_size=12),
    st.lists(st.integers(0xD800, 0xDFFF).map(chr) | st.sampled_from(["a", "/", ".."])).map("".join),
    json_values,
)


@fuzz
@given(data=st.data())
def test_shard_index(shard_dir, data):
    """Every shard path hf_files returns is an existing file directly in the model
    directory; everything else is a WeightsError naming the index."""
    CASES["shard_index"] += 1
    weight_map = data.draw(st.dictionaries(st.text(max_size=8), shard_names, max_size=4))
    doc = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    kind = data.draw(st.sampled_from(["ok", "ok", "ok", "top", "no_map", "bytes", "deep"]))
    if kind == "top":
        doc = data.draw(json_values)
    elif kind == "no_map":
        doc = {"weight_map": data.draw(json_values)}
    raw = json.dumps(doc).encode("utf-8")
    if kind == "bytes":
        raw = data.draw(mutated(raw))
    elif kind == "deep":
        raw = b'{"weight_map": ' + b"{" * data.draw(st.integers(1, 100_000))
    index = put(os.path.join(shard_dir, loader.HF_INDEX), raw)
    try:
        files = loader.hf_files(shard_dir)
    except WeightsError as e:
        assert _message(e)
        return
    base = os.path.realpath(shard_dir)
    for f in files:
        assert os.path.dirname(os.path.realpath(f)) == base, (f, index)
        assert os.path.isfile(f)


# ---------------------------------------------------------------- a whole sharded model

HF_NAMES = st.sampled_from(
    [
        "transformer.h.0.attn.c_attn.weight",
        "h.0.attn.c_attn.weight",
        "lm_head.weight",
        "transformer.h.0.attn.bias",
        "h.0.attn.masked_bias",
        "transformer.h.99.ln_1.weight",
        "transformer.h.-1.ln_1.weight",
        "transformer.wte.bias",
        "transformer.h.0.wte.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.ln_f.weight",
        "wpe.weight",
        "",
        "transformer.h.00.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight ",
    ]
) | st.text(max_size=12)


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    """A copy of the fixture hf-tiny-sharded (4 shards, an index, transformer.-prefixed
    keys) and each shard's header and data, for edits that keep the file well-formed."""
    import shutil

    d = str(tmp_path_factory.mktemp("fuzz_sharded") / "model")
    shutil.copytree(os.path.join(TF_FIXTURES, "hf-tiny-sharded"), d)
    shards = _Quiet()
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            with open(os.path.join(d, name), "rb") as f:
                raw = f.read()
            (n,) = struct.unpack("<Q", raw[:8])
            shards[name] = (json.loads(raw[8 : 8 + n]), raw[8 + n :], raw)
    return d, shards


@fuzz
@given(data=st.data())
def test_sharded_model_edits(sharded_model, data):
    """The whole loader on a real sharded model whose shard headers are edited: renamed,
    dropped and duplicated tensors, buffers and lm_head, other dtypes and shapes, raw byte
    edits. Either the config's model with every tensor finite float32, or a WeightsError."""
    CASES["sharded_model"] += 1
    d, shards = sharded_model
    name = data.draw(st.sampled_from(sorted(shards)))
    header, payload, original = shards[name]
    header = json.loads(json.dumps(header))
    tensors = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(tensors))
        op = data.draw(st.sampled_from(["rename", "drop", "copy", "dtype", "shape"]))
        if key not in header:
            continue
        if op == "rename":
            header[data.draw(HF_NAMES)] = header.pop(key)
        elif op == "drop":
            del header[key]
        elif op == "copy":
            header[data.draw(HF_NAMES)] = dict(header[key])
        elif op == "dtype":
            header[key]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "U8"]))
        elif op == "shape":
            header[key]["shape"] = data.draw(st.lists(st.integers(0, 40), max_size=3))
    raw = json.dumps(header).encode("utf-8")
    blob = struct.pack("<Q", len(raw)) + raw + payload
    if data.draw(st.integers(0, 4)) == 0:
        blob = data.draw(mutated(blob, max_ops=2))
    path = os.path.join(d, name)
    put(path, blob)
    try:
        cfg, params = loader.load(d)
        flat = [params["wte"], params["wpe"], params["ln_f"]["g"]]
        assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in flat)
        assert params["wte"].shape == (cfg.n_vocab, cfg.n_embd)
    except WeightsError as e:
        assert d in _message(e)
    finally:
        put(path, original)


# ---------------------------------------------------------------------------- configs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_tiny")
    _write_hf_model(str(d), TINY)
    return str(d)


config_keys = st.sampled_from(
    [
        "n_vocab",
        "vocab_size",
        "n_ctx",
        "n_positions",
        "n_embd",
        "hidden_size",
        "n_head",
        "num_attention_heads",
        "n_layer",
        "num_hidden_layers",
        "layer_norm_epsilon",
        "activation_function",
    ]
)
config_values = st.one_of(
    st.integers(1, 16),
    st.sampled_from(BIG_INTS + [10_000_000, 10_000_001]),
    st.sampled_from([1e-5, 0.0, 1.0, float("inf"), float("nan"), "gelu_new", "relu"]),
    json_values,
)


@st.composite
def config_docs(draw) -> bytes:
    base = TINY.to_hf_config() if draw(st.booleans()) else TINY.to_hparams()
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "del"]))
        key = draw(config_keys)
        if op == "set":
            base[key] = draw(config_values)
        else:
            base.pop(key, None)
    kind = draw(st.sampled_from(["ok", "ok", "ok", "absurd", "top", "bytes", "deep", "digits"]))
    if kind == "absurd":  # valid JSON, a valid config, a model no file could hold
        base[draw(st.sampled_from(["n_layer", "n_embd", "n_ctx"]))] = draw(
            st.sampled_from([9_999_998, 10_000_000, 1 << 20])
        )
    if kind == "top":
        base = draw(json_values)
    raw = json.dumps(base).encode("utf-8")
    if kind == "bytes":
        raw = draw(mutated(raw))
    elif kind == "deep":
        raw = b'{"n_layer": ' + b"[" * draw(st.integers(1, 100_000))
    elif kind == "digits":  # past Python's 4300-digit limit for int()
        raw = b'{"n_layer": ' + b"7" * draw(st.integers(4000, 5000)) + b"}"
    return raw


@fuzz
@given(raw=config_docs(), name=st.sampled_from(["config.json", "hparams.json"]))
def test_config_file(tiny_model, raw, name):
    """load_config on missing keys, wrong types, absurd sizes, non-JSON: a valid config or a
    ConfigError naming the file."""
    CASES["config"] += 1
    path = put(os.path.join(tiny_model, "..", f"fuzz-{name}"), raw)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert path in _message(e)
        return
    for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
        v = getattr(cfg, k)
        assert type(v) is int and 1 <= v <= 10_000_000
    assert cfg.n_embd % cfg.n_head == 0 and 0 < cfg.eps < 1


@fuzz
@given(raw=config_docs())
def test_model_with_fuzzed_config(tiny_model, raw):
    """A real model directory whose config.json lies (n_layer=10,000,000 included): loading
    fails fast with a WeightsError, or succeeds only when the config fits the tensors."""
    CASES["model_config"] += 1
    put(os.path.join(tiny_model, "config.json"), raw)
    try:
        cfg, params = loader.load_hf(tiny_model)
    except (WeightsError, ConfigError) as e:
        assert tiny_model in _message(e)
        return
    assert (cfg.n_vocab, cfg.n_ctx, cfg.n_embd, cfg.n_layer) == (16, 8, 4, 1)
    assert params["wte"].shape == (16, 4)


# ---------------------------------------------------------------------------- tokenizer

# Arbitrary Unicode with the awkward parts made likely: lone surrogates (which argv decoding
# produces from invalid UTF-8), control characters, the special token's text.
awkward = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x10FFFF),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.integers(0, 0x1F).map(chr),
    st.sampled_from([EOT_TOKEN, "<|endoftext", "|>", "<|", "\r\n", "\u200b", "\ufeff", " "]),
)
texts = st.lists(awkward, max_size=60).map("".join)


@fuzz
@given(text=texts, allow_eot=st.booleans())
def test_tokenizer_encode(text, allow_eot):
    """Any text encodes to ids in the vocabulary; user text never yields <|endoftext|>
    unless allowed; decoding gives the text back (lone surrogates become U+FFFD)."""
    CASES["tokenizer_encode"] += 1
    ids = encode(text, allow_eot=allow_eot)
    assert all(type(i) is int and 0 <= i <= EOT_ID for i in ids)
    assert ids.count(EOT_ID) == (text.count(EOT_TOKEN) if allow_eot else 0)
    # tiktoken's own fallback for text UTF-8 cannot hold: surrogate pairs join, lone ones
    # become U+FFFD
    want = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert decode(ids) == want


@fuzz
@given(
    ids=st.lists(
        st.one_of(
            st.integers(0, EOT_ID),
            st.sampled_from(BIG_INTS + [EOT_ID + 1]),
            st.sampled_from([1.5, "3", None, True, np.int64(5), np.uint8(7), -0.0]),
        ),
        max_size=12,
    )
)
def test_tokenizer_decode(ids):
    """Arbitrary id lists: text (invalid UTF-8 becomes U+FFFD) or a ValueError naming the id."""
    CASES["tokenizer_decode"] += 1
    try:
        text = decode(ids)
        raw = decode_bytes(ids)
    except ValueError as e:
        assert "token id" in _message(e)
        return
    assert text == raw.decode("utf-8", "replace")


# ---------------------------------------------------------------- generate / eval inputs


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory):
    """A one-layer model with GPT-2's full vocabulary (C=4) for the text paths."""
    import gpt2

    d = tmp_path_factory.mktemp("fuzz_vocab")
    _write_hf_model(str(d), GPT2Config(n_ctx=16, n_embd=4, n_head=1, n_layer=1))
    return str(d), gpt2.load(str(d))


@fuzz
@given(
    raw=st.one_of(texts.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=80))
)
def test_eval_inputs(vocab_model, raw):
    """eval's FILE: any bytes (empty, non-UTF-8, control characters, longer than the context)
    give a loss or a UsageError/ValueError with a message."""
    import gpt2
    from gpt2.cmd_eval import read_text

    CASES["eval_input"] += 1
    directory, model = vocab_model
    path = put(os.path.join(directory, "..", "eval.txt"), raw)
    try:
        text = read_text(path)
        res = gpt2.evaluate(model, text, stride=8)
    except (UsageError, ValueError) as e:
        _message(e)
        return
    assert np.isfinite(res.loss) and res.tokens == len(encode(text)) - 1


@fuzz
@given(prompt=texts, n=st.integers(1, 4))
def test_generate_prompts(vocab_model, prompt, n):
    """Any prompt (empty, surrogates, control characters, <|endoftext|>, too long) gives
    completions of valid ids or a ContextLengthError."""
    import gpt2

    CASES["generate_prompt"] += 1
    _, model = vocab_model
    try:
        out = gpt2.generate(model, prompt, max_new_tokens=n, temperature=1.0, seed=0)
    except ContextLengthError as e:
        assert "context" in _message(e)
        return
    assert all(0 <= t <= EOT_ID for r in out for t in r.token_ids)
    assert all(isinstance(r.text, str) for r in out)


@settings(fuzz, max_examples=max(FUZZ_EXAMPLES // 10, 20))
@given(prompt=texts)
def test_generate_cli_prompts(vocab_model, prompt):
    """`gpt2 generate PROMPT` end to end on a UTF-8 stdout: exit 0, or exit 2 with one line
    on stderr; never a traceback. (Fewer cases: each one loads the model.)"""
    from gpt2.cli import main

    CASES["generate_cli"] += 1
    directory, _ = vocab_model
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        rc = main(["generate", prompt, "--model", directory, "--max-new-tokens", "2", "--json"])
    except SystemExit as e:  # argparse's own usage error, e.g. a prompt that looks like a flag
        rc = e.code
    finally:
        sys.stdout, sys.stderr = old
    assert rc in (0, 2)
    if rc == 2:
        assert err.getvalue().startswith("gpt2 generate: error:")


# ---------------------------------------------------------------- TensorFlow checkpoints

TF_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TF_SOURCES = {  # fixture prefix -> its real index bytes and data bytes, written by TensorFlow
    name: os.path.join(TF_FIXTURES, name, "model.ckpt") for name in ("tf-tiny", "tf-dtypes")
}
TF_DTYPES = [1, 2, 19, 14, 3, 7, 9, 0, 8, 2**31, 2**32 + 1, 2**63]


class _Quiet(dict):
    """A dict that hypothesis prints as one short line in a failure report."""

    def __repr__(self) -> str:
        return f"<{len(self)} fixture checkpoints>"


@pytest.fixture(scope="module")
def tf_dir(tmp_path_factory):
    """A scratch directory with one data shard per fixture (copied, so a test may rewrite
    it) and the fixtures' index tables decoded into (key, value) pairs."""
    from weights.tf_table import read_table

    missing = [p for p in TF_SOURCES.values() if not os.path.exists(p + ".index")]
    assert not missing, f"TensorFlow fixtures missing: {missing}"
    d = str(tmp_path_factory.mktemp("fuzz_tf"))
    src = _Quiet()
    for name, prefix in TF_SOURCES.items():
        with open(prefix + ".index", "rb") as f:
            index = f.read()
        with open(prefix + ".data-00000-of-00001", "rb") as f:
            shard = f.read()
        put(os.path.join(d, f"{name}.data-00000-of-00001"), shard)
        src[name] = (index, shard, read_table(prefix + ".index"))
    return d, src


def _check_tf(prefix: str) -> None:
    """tf_checkpoint.read gives float32 arrays that lie in the data file, or a WeightsError
    naming a file; it never allocates what only a declared size justifies."""
    from weights import tf_checkpoint

    files = [prefix + ".index", prefix + ".data-00000-of-00001"]
    size = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    tracemalloc.start()
    try:
        out = tf_checkpoint.read(prefix)
    except WeightsError as e:
        assert prefix in _message(e)
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # the index is read whole and parsed into Python objects; float16/bfloat16 tensors
        # are widened (2x); nothing may scale with a declared size (same bound as above)
        assert peak <= 64 * size + 4 * 2**20, f"read allocated {peak} bytes for {size} bytes"
    for name, a in out.items():
        assert a.dtype == np.float32, name
        assert a.nbytes <= 2 * size, name


@fuzz
@given(data=st.data())
def test_tf_index_mutated_bytes(tf_dir, data):
    """Real TensorFlow index files with random edits: truncated blocks, bad footers and
    magic, checksums that no longer match."""
    CASES["tf_index_bytes"] += 1
    d, src = tf_dir
    name = data.draw(st.sampled_from(sorted(src)))
    blob = data.draw(mutated(src[name][0]))
    put(os.path.join(d, f"{name}.index"), blob)
    _check_tf(os.path.join(d, name))


tf_ints = st.one_of(st.integers(0, 300), st.sampled_from(BIG_INTS))


@st.composite
def bundle_entries(draw, data_len: int) -> bytes:
    """A BundleEntryProto that is mostly plausible: dtypes real and not, shapes with huge,
    zero and very many dimensions, offsets past the end, lying sizes, missing checksums."""
    shape = draw(
        st.lists(st.integers(0, 5) | st.sampled_from(BIG_INTS), max_size=4)
        | st.lists(st.sampled_from([0, 1, 2**40]), min_size=60, max_size=70)
    )
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    size = itemsize * int(np.prod(shape, dtype=object)) if draw(st.booleans()) else None
    near = st.integers(0, data_len + 2) | st.sampled_from(BIG_INTS)
    return dict(
        dtype=draw(st.sampled_from(TF_DTYPES)),
        shape=shape,
        offset=draw(near),
        size=draw(near) if size is None else size,
        crc=draw(st.none() | st.integers(0, 2**32 - 1)),
        shard_id=draw(st.sampled_from([0, 0, 0, 1, -1, 2**40])),
    )


@st.composite
def edited_entries(draw, entries: list[tuple[bytes, bytes]], data_len: int):
    """The fixture's (key, value) pairs with a few edits at the level of entries and protos;
    the table around them is re-encoded with valid checksums, so the checks behind the
    checksums get exercised."""
    entries = list(entries)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(["value", "value", "entry", "key", "drop", "dup", "swap", "header"])
        )
        i = draw(st.integers(0, len(entries) - 1)) if entries else 0
        if not entries:
            break
        key, value = entries[i]
        if op == "value":
            entries[i] = (key, draw(mutated(value, max_ops=2)))
        elif op == "entry" and i:
            entries[i] = (key, tf_table.bundle_entry(**draw(bundle_entries(data_len))))
        elif op == "key":
            entries[i] = (draw(mutated(key, max_ops=2)) if key else b"\xff", value)
        elif op == "drop":
            del entries[i]
        elif op == "dup":
            entries.insert(i, entries[i])
        elif op == "swap" and len(entries) > 1:
            j = draw(st.integers(0, len(entries) - 1))
            entries[i], entries[j] = entries[j], entries[i]
        elif op == "header":
            shards = draw(st.sampled_from([0, 1, 1, 2, 100_001, -1, 2**63]))
            entries[0] = (b"", tf_table.bundle_header(shards, draw(st.sampled_from([0, 1, 2]))))
    return entries


@fuzz
@given(data=st.data())
def test_tf_index_entries(tf_dir, data):
    """Tables with valid checksums around bad contents: bad protos and varints, keys out of
    order or repeated, lying sizes, offsets past the end of the data file, bad block
    structure (restart arrays, shared-prefix lengths), bad footer handles."""
    CASES["tf_index_entries"] += 1
    d, src = tf_dir
    name = data.draw(st.sampled_from(sorted(src)))
    index, shard, entries = src[name]
    entries = data.draw(edited_entries(entries, len(shard)))
    target = data.draw(st.sampled_from([None, None, "data", "metaindex", "index"]))
    which = data.draw(st.integers(0, 3))
    edits = {}

    def edit(kind: str, i: int, contents: bytes) -> bytes:
        if kind == target and (kind != "data" or i == which):
            contents = edits.setdefault((kind, i), data.draw(mutated(contents, max_ops=2)))
        return contents

    blob = tf_table.table(
        entries,
        per_block=data.draw(st.integers(1, 8)),
        restart_interval=data.draw(st.integers(1, 16)),
        edit_block=edit,
    )
    if data.draw(st.integers(0, 9)) == 0:  # a footer whose handles point anywhere
        handles = b"".join(tf_table.varint(data.draw(tf_ints)) for _ in range(4))
        blob = blob[:-48] + handles.ljust(40, b"\x00")[:40] + blob[-8:]
    put(os.path.join(d, f"{name}.index"), blob)
    _check_tf(os.path.join(d, name))


@fuzz
@given(data=st.data())
def test_tf_bundle_entries(tf_dir, data):
    """Generated index entries over a small random data file: the size and offset checks
    against the real file, with right and wrong checksums."""
    CASES["tf_bundle_entries"] += 1
    d, _ = tf_dir
    shard = data.draw(st.binary(max_size=64))
    entries = [(b"", tf_table.bundle_header())]
    for k in sorted(data.draw(st.sets(st.sampled_from([b"a", b"b", b"model/wte"]), max_size=3))):
        e = data.draw(bundle_entries(len(shard)))
        if data.draw(st.booleans()) and e["offset"] >= 0 and e["size"] >= 0:
            # the right checksum for the bytes it names, so the checks past it run
            e["crc"] = tf_table.masked_crc32c(shard[e["offset"] : e["offset"] + e["size"]])
        entries.append((k, tf_table.bundle_entry(**e)))
    put(os.path.join(d, "gen.index"), tf_table.table(entries))
    put(os.path.join(d, "gen.data-00000-of-00001"), shard)
    _check_tf(os.path.join(d, "gen"))


@fuzz
@given(data=st.data())
def test_tf_data_file(tf_dir, data):
    """The fixture's real index over a data shard that is cut short or has flipped bytes."""
    CASES["tf_data_file"] += 1
    d, src = tf_dir
    index, shard, _ = src["tf-dtypes"]
    put(os.path.join(d, "cut.index"), index)
    put(os.path.join(d, "cut.data-00000-of-00001"), data.draw(mutated(shard, max_ops=2)))
    _check_tf(os.path.join(d, "cut"))


# ---------------------------------------------------------------- finetune instruction data

record_values = st.one_of(texts, json_values)


@st.composite
def instruction_docs(draw) -> bytes:
    """Alpaca-style JSON: records with missing, non-string or awkward fields, non-lists,
    empty files, bytes that are not UTF-8, deep nesting, numbers past the digit limit."""
    kind = draw(st.sampled_from(["records"] * 4 + ["any", "bytes", "empty", "deep", "digits"]))
    if kind == "empty":
        return b""
    if kind == "deep":
        return b"[" * draw(st.integers(1, 100_000))
    if kind == "digits":
        return b'[{"instruction": ' + b"1" * 4400 + b"}]"
    if kind == "any":
        return json.dumps(draw(json_values)).encode("utf-8")
    records = []
    for _ in range(draw(st.integers(0, 5))):
        r = {"instruction": draw(texts), "input": draw(texts), "output": draw(texts)}
        for _ in range(draw(st.integers(0, 2))):
            key = draw(st.sampled_from(["instruction", "input", "output", "extra"]))
            if draw(st.booleans()):
                r[key] = draw(record_values)
            else:
                r.pop(key, None)
        records.append(r if draw(st.integers(0, 9)) else draw(json_values))
    raw = json.dumps(records).encode("utf-8", "surrogatepass")  # lone surrogates stay escaped
    return draw(mutated(raw)) if kind == "bytes" else raw


@fuzz
@given(raw=instruction_docs())
def test_instruction_data(tmp_path_factory, raw):
    """finetune's --data FILE.json: records whose every token id is in the vocabulary, with
    user text unable to forge <|endoftext|>, or a DataError naming the file."""
    from ref.data import DataError, instruction_splits, read_instructions

    CASES["instruction_data"] += 1
    path = put(os.path.join(str(tmp_path_factory.getbasetemp()), "instructions.json"), raw)
    try:
        records = read_instructions(path)
        train, val = instruction_splits(records, encode, 16, 0.1)
    except DataError as e:
        _message(e)
        return
    for ids, n_prompt in train.examples + val.examples:
        assert all(0 <= i < EOT_ID for i in ids)  # no record can smuggle in the special token
        assert 0 < n_prompt <= len(ids)


# ---------------------------------------------------------------- coverage-guided (atheris)

ATHERIS_SECONDS = int(os.environ.get("ATHERIS_SECONDS", "4"))


@pytest.mark.parametrize("target", sorted(ATHERIS_TARGETS))
def test_atheris_target_short_run(target, tmp_path):
    """Each atheris target for a few seconds from its seeds (tests/fixtures/): libFuzzer exits
    0 when no input crashed (an exception other than the project's own, an assertion of the
    target's, an input over -timeout seconds or an RSS over -rss_limit_mb)."""
    pytest.importorskip(
        "atheris", reason="atheris is not installed (pip install atheris): no coverage-guided run"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        os.path.join(root, "tests", "fuzz", "atheris_targets.py"),
        target,
        str(tmp_path / "corpus"),
        f"-max_total_time={ATHERIS_SECONDS}",
        "-timeout=60",  # per input; generous, for a loaded shared machine
        # libFuzzer reads the peak RSS from getrusage, and Linux carries the forking process's
        # RSS into the child's peak across exec (measured: a 3 GB parent, a child reading
        # 3,099 MB): the limit is 2 GB above this pytest process's own peak
        f"-rss_limit_mb={2048 + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}",
        f"-artifact_prefix={tmp_path}{os.sep}",
    ]
    if os.environ.get("CI"):  # the same mutations every run, as the hypothesis "ci" profile
        cmd.append("-seed=1")
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120 + ATHERIS_SECONDS)
    crashes = [f for f in os.listdir(tmp_path) if f != "corpus"]
    assert r.returncode == 0 and not crashes, r.stderr[-6000:]
    assert "Done" in r.stderr and " runs in " in r.stderr, r.stderr[-2000:]
