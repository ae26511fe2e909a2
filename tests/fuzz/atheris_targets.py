"""Coverage-guided fuzz targets (atheris, i.e. libFuzzer on Python) for every parser of
untrusted input.

    python tests/fuzz/atheris_targets.py TARGET [CORPUS_DIR] [libFuzzer flags]
    python tests/fuzz/atheris_targets.py safetensors -max_total_time=60
    python tests/fuzz/run_atheris.py --minutes 10      # every target in turn, with figures

Each target writes one input where the parser expects its file and accepts two outcomes: a
result that satisfies the parser's invariants, or the project's own clear error
(weights.WeightsError, ref.config.ConfigError, ref.data.DataError) whose message names the
file. Anything else propagates, and libFuzzer reports it as a crash with the input that caused
it; so are an input running past -timeout and an RSS past -rss_limit_mb (the bounded-cost rule:
no parser may take time or memory that its input's size does not justify).

Targets (each one's seeds, from tests/fixtures/, are written in that target's input format):
    safetensors   one .safetensors file -> weights.safetensors.read, and (as model.safetensors
                  of a directory) weights.checkpoint.read_state's metadata
    shard_index   model.safetensors.index.json beside the shards of hf-tiny-sharded, a
                  subdirectory and symlinks out -> weights.loader.hf_files, then load_hf
    tf_table      byte 0 even: a whole index file -> weights.tf_table.read_table. Odd: byte 1
                  is a compression type and the rest one data block's contents, wrapped in a
                  table whose checksums are right, so mutations reach past the crc32c
    tf_bundle     (key, value) entries and a data shard, written as a table with right
                  checksums -> weights.tf_checkpoint.read (byte 0 odd: crc32c of the tensors
                  checked, even: not, so mutated data reaches the conversions)
    config        hparams.json / config.json -> ref.config.load_config
    instructions  finetune's --data JSON -> ref.data.read_instructions, instruction_splits
    gguf          one .gguf file -> weights.gguf.load (seeds: small GPT-2s in F32 and Q8_0,
                  written by tests/fuzz/gguf_file.py's independent writer)

The project's modules are imported under atheris.instrument_imports, so libFuzzer's coverage
counts their branches (numpy and the stdlib are not instrumented).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
for p in (ROOT, os.path.dirname(HERE)):  # the project, and tests/ for fuzz.tf_table
    if p not in sys.path:
        sys.path.insert(0, p)

from fuzz import gguf_file  # noqa: E402  (the independent GGUF writer)
from fuzz import tf_table as writer  # noqa: E402  (the independent table writer)

# Filled by _import_project(), under instrumentation.
M: dict[str, object] = {}
WORK = ""  # scratch directory for the inputs (in /dev/shm when there is one)


def _import_project() -> None:
    import numpy as np

    from ref import config, data
    from weights import WeightsError, checkpoint, loader, safetensors, tf_checkpoint, tf_table
    from weights import gguf as gguf_reader
    from weights.tokenizer import encode

    M.update(
        np=np,
        config=config,
        data=data,
        WeightsError=WeightsError,
        checkpoint=checkpoint,
        loader=loader,
        safetensors=safetensors,
        tf_checkpoint=tf_checkpoint,
        tf_table=tf_table,
        encode=encode,
        gguf=gguf_reader,
    )


def put(path: str, data: bytes) -> str:
    """Write `data` as a new file (arrays still mapping the old one keep its pages)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _expect(e: BaseException, path: str) -> None:
    """The project's clear error: it has a message, and the message names the file."""
    msg = str(e)
    if not msg.strip() or path not in msg:
        raise AssertionError(f"{type(e).__name__} without the file's name: {msg!r}") from e


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------- safetensors


def _safetensors_seeds() -> list[bytes]:
    d = os.path.join(FIXTURES, "hf-tiny-sharded")
    seeds = [_read(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    big = _read(os.path.join(FIXTURES, "hf-tiny", "model.safetensors"))
    (n,) = struct.unpack("<Q", big[:8])
    seeds.append(big[: 8 + n])  # hf-tiny's header (with the buffers), without its 5 MB of data
    meta = {"format": "pt", "gpt2_spec_state": json.dumps({"step": 3, "optimizer_file": "o"})}
    seeds.append(_small_safetensors(meta))
    return seeds


def _small_safetensors(metadata: dict) -> bytes:
    header = {
        "__metadata__": metadata,
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
        "c": {"dtype": "F16", "shape": [0, 5], "data_offsets": [22, 22]},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(22))


def _safetensors(data: bytes) -> None:
    np, WeightsError = M["np"], M["WeightsError"]
    directory = os.path.join(WORK, "st")
    path = put(os.path.join(directory, "model.safetensors"), data)
    try:
        out = M["safetensors"].read(path)
    except WeightsError as e:
        _expect(e, path)
    else:
        stored = sum(a.nbytes // (2 if a.flags.writeable else 1) for a in out.values())
        assert stored <= len(data), "tensors hold more bytes than the file"
        for a in out.values():
            np.asarray(a).tobytes()  # every byte of every view lies in the file
        del out
    try:
        state = M["checkpoint"].read_state(directory)
    except WeightsError as e:
        _expect(e, path)
    else:
        assert isinstance(state["step"], int) and state["step"] >= 0


# ---------------------------------------------------------------------------- shard index


def _shard_index_setup() -> None:
    """model/ with hf-tiny-sharded's shards and config, a shard in a subdirectory, a symlink
    out and one in, and a file outside that an escaping name would reach."""
    root = os.path.join(WORK, "shards")
    model = os.path.join(root, "model")
    os.makedirs(os.path.join(model, "sub"))
    src = os.path.join(FIXTURES, "hf-tiny-sharded")
    for f in os.listdir(src):
        if f != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, f), model)
    shutil.copy(os.path.join(src, "model-00004-of-00004.safetensors"), os.path.join(model, "sub"))
    put(os.path.join(root, "outside.safetensors"), b"x")
    os.symlink(os.path.join(root, "outside.safetensors"), os.path.join(model, "link.safetensors"))
    os.symlink(root, os.path.join(model, "uplink"))
    os.symlink(
        os.path.join(model, "model-00001-of-00004.safetensors"),
        os.path.join(model, "inlink.safetensors"),
    )


def _shard_index_seeds() -> list[bytes]:
    raw = _read(os.path.join(FIXTURES, "hf-tiny-sharded", "model.safetensors.index.json"))
    doc = json.loads(raw)
    names = ["sub/model-00004-of-00004.safetensors", "../outside.safetensors", "link.safetensors"]
    escapes = {"metadata": {}, "weight_map": {f"t{i}": n for i, n in enumerate(names)}}
    one = {"weight_map": dict.fromkeys(doc["weight_map"], "inlink.safetensors")}
    return [raw, json.dumps(escapes).encode(), json.dumps(one).encode()]


def _shard_index(data: bytes) -> None:
    loader, WeightsError = M["loader"], M["WeightsError"]
    model = os.path.join(WORK, "shards", "model")
    path = put(os.path.join(model, "model.safetensors.index.json"), data)
    try:
        files = loader.hf_files(model)
    except WeightsError as e:
        _expect(e, path)
        return
    base = os.path.realpath(model)
    for f in files:
        assert os.path.dirname(os.path.realpath(f)) == base, f"{f} lies outside {model}"
    try:
        cfg, params = loader.load_hf(model)
    except (WeightsError, M["config"].ConfigError) as e:
        _expect(e, model)
    else:
        assert params["wte"].shape == (cfg.n_vocab, cfg.n_embd)


# ---------------------------------------------------------------------------- TensorFlow


def _tf_table_seeds() -> list[bytes]:
    read_table = M["tf_table"].read_table
    seeds = []
    for prefix in ("tf-tiny/model.ckpt", "tf-dtypes/model.ckpt", "tf-dtypes/ints.ckpt"):
        index = _read(os.path.join(FIXTURES, prefix + ".index"))
        seeds.append(b"\x00" + index)
        entries = read_table(os.path.join(FIXTURES, prefix + ".index"))
        # a multi-block snappy table of the same entries, and one block's contents raw
        seeds.append(b"\x00" + writer.table(entries, per_block=3, compression=1))
        block = writer.block(entries[:6], restart_interval=2)
        seeds.append(b"\x01\x00" + block)
        seeds.append(b"\x01\x01" + writer.snappy(block))
    return seeds


def _tf_table(data: bytes) -> None:
    WeightsError = M["WeightsError"]
    if data[:1] and data[0] & 1:
        kind, contents = data[1:2] or b"\x00", data[2:]
        body = contents + kind + struct.pack("<I", writer.masked_crc32c(contents + kind))
        meta = writer.block([])
        meta_block = meta + b"\x00" + struct.pack("<I", writer.masked_crc32c(meta + b"\x00"))
        index = writer.block([(b"\xff" * 16, writer.varint(0) + writer.varint(len(contents)))], 1)
        index_block = index + b"\x00" + struct.pack("<I", writer.masked_crc32c(index + b"\x00"))
        handles = writer.varint(len(body)) + writer.varint(len(meta))
        handles += writer.varint(len(body) + len(meta_block)) + writer.varint(len(index))
        data = body + meta_block + index_block + handles.ljust(40, b"\x00")
        data += struct.pack("<Q", writer.MAGIC)
    else:
        data = data[1:]
    path = put(os.path.join(WORK, "table.index"), data)
    try:
        entries = M["tf_table"].read_table(path)
    except WeightsError as e:
        _expect(e, path)
        return
    keys = [k for k, _ in entries]
    assert keys == sorted(set(keys)), "keys out of order or repeated"
    assert sum(len(k) + len(v) for k, v in entries) <= 64 * len(data) + (1 << 20)


def _chunks(data: bytes) -> list[bytes]:
    """The tf_bundle format: chunks, each a 2-byte little-endian length then its bytes."""
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 2], "little")
        out.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out


def _unchunks(chunks: list[bytes]) -> bytes:
    return b"".join(len(c).to_bytes(2, "little") + c for c in chunks)


def _tf_bundle_seeds() -> list[bytes]:
    read_table = M["tf_table"].read_table
    seeds = []
    for prefix, limit in (
        ("tf-dtypes/model.ckpt", None),
        ("tf-dtypes/ints.ckpt", None),
        ("tf-tiny/model.ckpt", 4096),  # its 5 MB shard cut short: the entries past it fail
    ):
        entries = read_table(os.path.join(FIXTURES, prefix + ".index"))
        shard = _read(os.path.join(FIXTURES, prefix + ".data-00000-of-00001"))[:limit]
        chunks = [c for kv in entries for c in kv] + [shard]
        seeds += [b"\x01" + _unchunks(chunks), b"\x00" + _unchunks(chunks)]
    return seeds


def _tf_bundle(data: bytes) -> None:
    np, WeightsError = M["np"], M["WeightsError"]
    verify = bool(data[:1] and data[0] & 1)
    chunks = _chunks(data[1:])
    shard = chunks.pop() if len(chunks) % 2 else b""
    entries = dict(zip(chunks[0::2], chunks[1::2], strict=True))
    table = writer.table(sorted(entries.items()), per_block=4)
    prefix = os.path.join(WORK, "bundle")
    put(prefix + ".index", table)
    put(prefix + ".data-00000-of-00001", shard)
    try:
        out = M["tf_checkpoint"].read(prefix, verify=verify)
    except WeightsError as e:
        _expect(e, prefix)
        return
    for name, a in out.items():
        assert a.dtype == np.float32, name
        assert a.nbytes <= 2 * len(shard), name
    del out


# ---------------------------------------------------------------------------- configs, data


def _config_seeds() -> list[bytes]:
    return [
        _read(os.path.join(FIXTURES, "tf-tiny", "hparams.json")),
        _read(os.path.join(FIXTURES, "hf-tiny", "config.json")),
        _read(os.path.join(FIXTURES, "hf-tiny-sharded", "config.json")),
    ]


def _config(data: bytes) -> None:
    config = M["config"]
    path = put(os.path.join(WORK, "config.json"), data)
    try:
        cfg = config.load_config(path)
    except config.ConfigError as e:
        _expect(e, path)
        return
    for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
        v = getattr(cfg, k)
        assert type(v) is int and 1 <= v <= 10_000_000, (k, v)
    assert cfg.n_embd % cfg.n_head == 0 and 0 < cfg.eps < 1


def _instructions_seeds() -> list[bytes]:
    with open(os.path.join(ROOT, "weights", "data", "instruction-data.json"), "rb") as f:
        records = json.load(f)
    return [
        json.dumps(records[:3]).encode(),
        json.dumps(records[3:4] + [{"instruction": "<|endoftext|>", "output": ""}]).encode(),
    ]


def _instructions(data: bytes) -> None:
    read_instructions, DataError = M["data"].read_instructions, M["data"].DataError
    path = put(os.path.join(WORK, "instructions.json"), data)
    try:
        records = read_instructions(path)
    except DataError as e:
        _expect(e, path)
        return
    try:
        train, val = M["data"].instruction_splits(records, M["encode"], 16, 0.1)
    except DataError as e:  # knows no file: `gpt2 finetune` puts the name in front
        assert str(e).strip(), "DataError without a message"
        return
    for ids, n_prompt in train.examples + val.examples:
        assert all(0 <= i < 50256 for i in ids)  # user text cannot forge <|endoftext|>
        assert 0 < n_prompt <= len(ids)


# ---------------------------------------------------------------------------- GGUF


def _gguf_seeds() -> list[bytes]:
    meta = gguf_file.gpt2_metadata(4, 32, 2, 1)
    return [
        gguf_file.gguf_bytes(meta, gguf_file.gpt2_tensors(8, 4, 32, 1)),
        gguf_file.gguf_bytes(meta, gguf_file.gpt2_tensors(8, 4, 32, 1, q8=True)),
    ]


def _gguf(data: bytes) -> None:
    np, WeightsError = M["np"], M["WeightsError"]
    path = put(os.path.join(WORK, "model.gguf"), data)
    try:
        cfg, params = M["gguf"].load(path)
    except WeightsError as e:
        _expect(e, path)
        return
    assert params["wte"].shape == (cfg.n_vocab, cfg.n_embd)
    assert len(params["blocks"]) == cfg.n_layer
    made = params["wte"].nbytes + params["wpe"].nbytes
    for block in params["blocks"]:
        for mod, proj in (
            ("attn", "c_attn"),
            ("attn", "c_proj"),
            ("mlp", "c_fc"),
            ("mlp", "c_proj"),
        ):
            w = block[mod][proj]["w"]
            made += w.nbytes
            assert np.isfinite(w.scale if hasattr(w, "scale") and w.scale is not None else w).all()
    # F16 widens to float32 (2x), Q8_0's head also makes wte (4 bytes per 34/32): bounded by
    # the file's own size, whatever its header says
    assert made <= 8 * len(data), (made, len(data))


# name -> (one input, seeds, setup)
TARGETS: dict[str, tuple[Callable[[bytes], None], Callable[[], list[bytes]], Callable | None]] = {
    "safetensors": (_safetensors, _safetensors_seeds, lambda: os.makedirs(f"{WORK}/st")),
    "shard_index": (_shard_index, _shard_index_seeds, _shard_index_setup),
    "tf_table": (_tf_table, _tf_table_seeds, None),
    "tf_bundle": (_tf_bundle, _tf_bundle_seeds, None),
    "config": (_config, _config_seeds, None),
    "instructions": (_instructions, _instructions_seeds, None),
    "gguf": (_gguf, _gguf_seeds, None),
}


def write_seeds(name: str, corpus: str) -> None:
    """Put the target's seeds into `corpus` (created if need be)."""
    os.makedirs(corpus, exist_ok=True)
    for i, seed in enumerate(TARGETS[name][1]()):
        put(os.path.join(corpus, f"seed-{i:02d}"), seed)


def main(argv: list[str] | None = None) -> None:
    global WORK
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [CORPUS_DIR] [libFuzzer flags]")
    name = argv.pop(1)
    import atheris

    with atheris.instrument_imports(include=["ref", "weights"]):
        _import_project()
    one_input, _, setup = TARGETS[name]
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    WORK = tempfile.mkdtemp(prefix=f"atheris-{name}-", dir=shm)
    try:
        if setup is not None:
            setup()
        dirs = [a for a in argv[1:] if not a.startswith("-")]
        if not dirs:  # no corpus given: a scratch one, seeded
            dirs = [os.path.join(WORK, "corpus")]
            argv.append(dirs[0])
        for d in dirs[:1]:
            write_seeds(name, d)
        atheris.Setup(argv, one_input)
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
