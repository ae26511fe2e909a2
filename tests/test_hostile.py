"""Inputs built to expand: every parser's time and memory stay bounded by a small multiple of its
input's size, whatever the input declares or implies.

A fuzzer's small random inputs do not find these: each case is a file of at most a few MB
written to make one parser do far more work than its bytes justify (a declared size, a count,
prefix-compressed keys, a snappy block, a JSON number or nesting, a regular expression that
backtracks). Each runs through the command line (`gpt2 eval --model DIR FILE`,
`gpt2 finetune --data FILE`, `gpt2 finetune --resume DIR`) in a child whose address space is
capped at what the interpreter holds after its imports plus 256 MiB. A case passes when the
child exits with status 2 within TIME_LIMIT seconds and prints one line on stderr, the
command's error naming the file; a traceback, a MemoryError or a timeout fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from fuzz import tf_table as tw

from ref.config import GPT2Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TIME_LIMIT = 20  # seconds per case, start-up included (about 1 s); the old parsers took hours
TINY = GPT2Config(n_vocab=16, n_ctx=8, n_embd=4, n_head=2, n_layer=1)

# The child: import everything the commands use, cap the address space, show that the cap
# bites, then run the CLI exactly as `python -m gpt2 ARGS` does.
_CLI_UNDER_LIMIT = """
    import resource, runpy, sys
    import numpy as np
    import fast, gpt2, gpt2.cli, gpt2.finetune
    from ref import config, data
    from weights import checkpoint, loader, safetensors, tf_checkpoint, tf_table
    gpt2.cli.build_parser()  # imports every subcommand's module
    fast.get_backend("ref")
    gpt2.encode("warm up the tokenizer")
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    limit = vm + 256 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        np.ones(2**30, np.uint8)
        sys.exit("limit not effective")
    except MemoryError:
        pass
    sys.argv = ["gpt2", *sys.argv[1:]]
    runpy.run_module("gpt2", run_name="__main__", alter_sys=True)
"""


def _run_cli(args: list[str], cwd: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CLI_UNDER_LIMIT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=3 * TIME_LIMIT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    return r, time.perf_counter() - t0


# ---------------------------------------------------------------------------- file builders


def _write(path: str, data: bytes | str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def _st(header: dict | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file: header length (or `n`), the header's JSON, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def _raw_table(blocks: list[tuple[bytes, int]], handles: list | None = None) -> bytes:
    """A checkpoint index of the given data blocks (contents, compression type), every
    checksum right; the index block points at `handles` (default: each block once)."""
    out = bytearray()

    def put(contents: bytes, kind: int = 0) -> tuple[int, int]:
        handle = (len(out), len(contents))
        trailer = bytes([kind]) + struct.pack("<I", tw.masked_crc32c(contents + bytes([kind])))
        out.extend(contents + trailer)
        return handle

    own = [put(c, k) for c, k in blocks]
    index = [
        (b"\xff" + struct.pack(">I", i), tw.varint(o) + tw.varint(n))
        for i, (o, n) in enumerate(own if handles is None else handles)
    ]
    meta = put(tw.block([]))
    idx = put(tw.block(index, 1))
    footer = b"".join(tw.varint(x) for x in (*meta, *idx)).ljust(40, b"\x00")
    return bytes(out + footer + struct.pack("<Q", tw.MAGIC))


def _tf_dir(d: str, index: bytes, checkpoint: str | None = None) -> str:
    _write(os.path.join(d, "hparams.json"), json.dumps(TINY.to_hparams()))
    _write(os.path.join(d, "model.ckpt.index"), index)
    _write(os.path.join(d, "model.ckpt.data-00000-of-00001"), b"\x00" * 64)
    if checkpoint is not None:
        _write(os.path.join(d, "checkpoint"), checkpoint)
    return d


def _hf_dir(d: str, weights: bytes = b"", config: bytes | None = None) -> str:
    _write(os.path.join(d, "model.safetensors"), weights)
    _write(os.path.join(d, "config.json"), config or json.dumps(TINY.to_hf_config()).encode())
    return d


def _sharded_dir(d: str, index: bytes) -> str:
    shutil.copytree(os.path.join(FIXTURES, "hf-tiny-sharded"), d)
    _write(os.path.join(d, "model.safetensors.index.json"), index)
    return d


def _hf_config(**over) -> bytes:
    return json.dumps({**TINY.to_hf_config(), **over}).encode()


def _quadratic_keys_block(n: int) -> bytes:
    """n entries, each sharing the whole previous key and adding one byte: n bytes of keys
    per entry on average, n**2 / 2 in all (31 GB for this 1.5 MB block)."""
    out = bytearray()
    for i in range(n):
        out += tw.varint(i) + b"\x01\x00a"  # shared = i, unshared = 1, no value, key byte
    return bytes(out) + struct.pack("<II", 0, 1)  # one restart point, at 0


def _empty_block(n_restarts: int) -> bytes:
    """A valid block with no entries: only its restart array (4 bytes a point)."""
    return struct.pack(f"<{n_restarts}I", *([0] * n_restarts)) + struct.pack("<I", n_restarts)


DEEP = b"[" * 1_000_000
DIGITS = b"1" * 1_000_000


# ---------------------------------------------------------------------------- the cases

# name -> builder(case_dir) -> (CLI arguments after the command, the file the error names)
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _eval(model: str, file: str) -> tuple[list[str], str]:
    return ["eval", "--model", model, os.path.join(os.path.dirname(model), "text.txt")], file


# safetensors headers
@case
def st_shape_2_to_40(d):
    header = {"wte.weight": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 64]}}
    m = _hf_dir(f"{d}/m", _st(header, b"\x00" * 64))
    return _eval(m, f"{m}/model.safetensors")


@case
def st_many_huge_dims(d):
    # 200,000 dims of 2**61: their product (12M bits, O(n**2) to compute) was taken first
    shape = b"[" + b",".join([b"2305843009213693952"] * 200_000) + b"]"
    header = b'{"wte.weight": {"dtype": "F32", "shape": ' + shape + b', "data_offsets": [0, 0]}}'
    m = _hf_dir(f"{d}/m", _st(header))
    return _eval(m, f"{m}/model.safetensors")


@case
def st_million_digit_int(d):
    header = b'{"wte.weight": {"dtype": "F32", "shape": [' + DIGITS + b'], "data_offsets": [0, 0]}}'
    m = _hf_dir(f"{d}/m", _st(header))
    return _eval(m, f"{m}/model.safetensors")


@case
def st_deep_nesting(d):
    m = _hf_dir(f"{d}/m", _st(DEEP))
    return _eval(m, f"{m}/model.safetensors")


@case
def st_header_length_2_to_63(d):
    m = _hf_dir(f"{d}/m", _st(b"{}", n=2**63))
    return _eval(m, f"{m}/model.safetensors")


# the shard index
@case
def shard_index_million_digits(d):
    m = _sharded_dir(f"{d}/m", b'{"metadata": {"total_size": ' + DIGITS + b'}, "weight_map": {}}')
    return _eval(m, f"{m}/model.safetensors.index.json")


@case
def shard_index_deep_nesting(d):
    m = _sharded_dir(f"{d}/m", b'{"weight_map": ' + DEEP)
    return _eval(m, f"{m}/model.safetensors.index.json")


# config.json / hparams.json
@case
def config_epsilon_401_digits(d):
    # float(10**400) raises OverflowError: it was converted before any range check
    m = _hf_dir(f"{d}/m", config=_hf_config(layer_norm_epsilon=10**400))
    return _eval(m, f"{m}/config.json")


@case
def config_million_digit_layers(d):
    m = _hf_dir(f"{d}/m", config=b'{"n_layer": ' + DIGITS + b"}")
    return _eval(m, f"{m}/config.json")


@case
def config_deep_value(d):
    deep = "[" * 900 + "]" * 900  # a value nested about as deep as the decoder allows
    raw = _hf_config(n_layer=0)[:-1] + f', "activation_function": {deep}}}'.encode()
    m = _hf_dir(f"{d}/m", config=raw)
    return _eval(m, f"{m}/config.json")


@case
def hparams_deep_nesting(d):
    m = _tf_dir(f"{d}/m", b"")
    _write(f"{m}/hparams.json", b'{"n_vocab": ' + DEEP)
    return _eval(m, f"{m}/hparams.json")


# TensorFlow checkpoints
@case
def tf_prefix_compressed_keys(d):
    m = _tf_dir(f"{d}/m", _raw_table([(_quadratic_keys_block(250_000), 0)]))
    return _eval(m, f"{m}/model.ckpt.index")


@case
def tf_snappy_declares_2_to_60(d):
    block = tw.varint(2**60) + b"\x08abc"  # a literal of 3 bytes, 2**60 declared
    m = _tf_dir(f"{d}/m", _raw_table([(block, 1)]))
    return _eval(m, f"{m}/model.ckpt.index")


@case
def tf_snappy_expands_21x(d):
    # 350,000 copies of 64 bytes from 3 bytes each: a 1 MB block of 22 MB
    n = 350_000
    block = tw.varint(1 + 64 * n) + b"\x00a" + b"\xfe\x01\x00" * n
    m = _tf_dir(f"{d}/m", _raw_table([(block, 1)]))
    return _eval(m, f"{m}/model.ckpt.index")


@case
def tf_one_block_indexed_50000_times(d):
    # a 1 MB block (no entries, a long restart array) that the index names 50,000 times:
    # 50 GB of checksums and restart arrays
    table = _raw_table([(_empty_block(250_000), 0)], handles=[(0, 1_000_004)] * 50_000)
    m = _tf_dir(f"{d}/m", table)
    return _eval(m, f"{m}/model.ckpt.index")


@case
def tf_200000_huge_dims(d):
    entry = tw.bundle_entry(dtype=1, shape=[2**62] * 200_000, offset=0, size=0, crc=0)
    m = _tf_dir(f"{d}/m", tw.table([(b"", tw.bundle_header()), (b"model/wte", entry)]))
    return _eval(m, f"{m}/model.ckpt.index")


@case
def tf_500000_proto_fields(d):
    entry = tw.bundle_entry(dtype=1, shape=[], offset=0, size=4, crc=0) + b"\x78\x00" * 500_000
    m = _tf_dir(f"{d}/m", tw.table([(b"", tw.bundle_header()), (b"model/wte", entry)]))
    return _eval(m, f"{m}/model.ckpt.data-00000-of-00001")


@case
def tf_checkpoint_file_of_blank_lines(d):
    m = _tf_dir(
        f"{d}/m", b"", checkpoint="\n" * 1_000_000 + 'model_checkpoint_path: "' + "x" * 10**6
    )
    return _eval(m, f"{m}/checkpoint")


# finetune's instruction data
def _finetune_data(d: str, raw: bytes) -> tuple[list[str], str]:
    data = _write(f"{d}/data.json", raw)
    model = os.path.join(FIXTURES, "hf-tiny-sharded")
    return ["finetune", "--model", model, "--data", data, "--out", f"{d}/out", "--steps", "1"], data


@case
def data_million_digit_number(d):
    return _finetune_data(d, b'[{"instruction": ' + DIGITS + b', "output": ""}]')


@case
def data_number_past_float(d):
    return _finetune_data(d, b'[{"instruction": 1e999999, "output": "x"}]')


@case
def data_deep_nesting(d):
    return _finetune_data(d, DEEP)


@case
def data_deep_record_field(d):
    deep = b"[" * 900 + b"]" * 900
    return _finetune_data(d, b'[{"instruction": ' + deep + b', "output": ""}]')


# the training state of a finetune checkpoint (--resume)
def _resume(d: str, state: dict | bytes, n: int | None = None) -> tuple[list[str], str]:
    raw = state if isinstance(state, bytes) else json.dumps(state).encode()
    header = {"__metadata__": {"format": "pt", "gpt2_spec_state": raw.decode()}}
    ck = _hf_dir(f"{d}/ck", _st(header, n=n))
    return ["finetune", "--resume", ck], f"{ck}/model.safetensors"


@case
def resume_step_2_to_64(d):
    return _resume(d, {"step": 2**64, "optimizer_file": "optimizer-1.safetensors"})


@case
def resume_setting_10_to_300(d):
    return _resume(d, {"step": 1, "settings": {"lr": 10**300, "batch_size": 10**200}})


@case
def resume_header_length_100_mb(d):
    return _resume(d, {"step": 1}, n=100 * 2**20)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_fails_cleanly_and_quickly(tmp_path, name):
    d = str(tmp_path)
    _write(f"{d}/text.txt", "hello world, a text of several tokens")
    args, named = CASES[name](d)
    r, elapsed = _run_cli(args, d)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-3000:])
    assert "\n" not in err and err.startswith(f"gpt2 {args[0]}: error: "), err[:500]
    assert named in err, err[:500]
    assert len(err) < 1000, f"a {len(err)}-character message"
    assert elapsed < TIME_LIMIT, f"{elapsed:.1f} s"
