"""Reading weights: the TensorFlow checkpoint reader (crc32c, sorted table, bundle entries) and
the loader on the fixtures that TensorFlow and transformers wrote (tests/fixtures/).

Corrupt variants are written into tmp_path: by editing bytes of the fixtures, or with the small
table writer below, which writes an index the way TensorFlow's TableBuilder does (prefix-
compressed keys, restart points, block trailers with masked crc32c, footer) so that a checkpoint
with any content can be made without TensorFlow.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from fuzz import tf_table as tf_writer
from hypothesis import given
from hypothesis import strategies as st

from weights import WeightsError, loader
from weights import safetensors as sft
from weights import tf_checkpoint as tc
from weights import tf_table as tt
from weights.layout import flatten, hf_to_canonical

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TF_TINY = os.path.join(FIX, "tf-tiny")
HF_TINY = os.path.join(FIX, "hf-tiny")
HF_SHARDED = os.path.join(FIX, "hf-tiny-sharded")
DATA = "model.ckpt.data-00000-of-00001"

# ---------------------------------------------------------------------------------------
# A writer for test checkpoints (the inverse of the reader, written from the format notes in
# weights/tf_table.py and weights/tf_checkpoint.py)
# ---------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value % (1 << 64))


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def entry_proto(dtype, shape, offset, size, crc, shard=0, sliced=False) -> bytes:
    """A BundleEntryProto (masks the raw crc)."""
    dims = b"".join(_field_bytes(2, _field_varint(1, d)) for d in shape)
    msg = _field_varint(1, dtype) + _field_bytes(2, dims)
    msg += (_field_varint(3, shard) if shard else b"") + _field_varint(4, offset)
    msg += _field_varint(5, size) + _varint(6 << 3 | 5) + struct.pack("<I", tt.mask_crc(crc))
    return msg + (_field_bytes(7, b"") if sliced else b"")


def header_proto(num_shards=1, endianness=0) -> bytes:
    return (
        _field_varint(1, num_shards) + _field_varint(2, endianness) + _field_bytes(3, b"\x08\x01")
    )


def _block(entries, restart_interval=3) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (k, v) in enumerate(entries):
        if i % restart_interval == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = len(os.path.commonprefix([prev, k]))
        out += _varint(shared) + _varint(len(k) - shared) + _varint(len(v)) + k[shared:] + v
        prev = k
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}II", *restarts, len(restarts))


def _snappy_literals(raw: bytes) -> bytes:
    """Snappy's format with literals only (tag 61 << 2: a 2-byte length follows)."""
    out = bytearray(_varint(len(raw)))
    for i in range(0, len(raw), 65536):
        piece = raw[i : i + 65536]
        out += bytes([61 << 2]) + struct.pack("<H", len(piece) - 1) + piece
    return bytes(out)


def write_table(path, entries, per_block=4, compression=0) -> None:
    """A LevelDB-style table of sorted (key, value) pairs, `per_block` entries per data block;
    compression 1 writes snappy data blocks, any other value is written as the type byte."""
    out, index = bytearray(), []

    def put(contents: bytes, kind: int = 0) -> bytes:
        handle = _varint(len(out)) + _varint(len(contents))
        trailer = bytes([kind]) + struct.pack(
            "<I", tt.mask_crc(tt.crc32c(contents + bytes([kind])))
        )
        out.extend(contents + trailer)
        return handle

    for i in range(0, len(entries), per_block):
        chunk = entries[i : i + per_block]
        contents = _block(chunk)
        if compression == 1:
            contents = _snappy_literals(contents)
        handle = put(contents, compression)
        index.append((chunk[-1][0], handle))
    meta = put(_block([]))
    idx = put(_block(index, restart_interval=1))
    footer = (meta + idx).ljust(40, b"\0") + struct.pack("<Q", tt.TABLE_MAGIC)
    with open(path, "wb") as f:
        f.write(out + footer)


def write_checkpoint(prefix, tensors, dtype_codes=None, **table_kw) -> None:
    """Tensors (name -> array) as a one-shard checkpoint; dtype_codes overrides DataTypes."""
    codes = {np.dtype("<f4"): 1, np.dtype("<f8"): 2, np.dtype("<f2"): 19, np.dtype("<i4"): 3}
    data, entries = bytearray(), [(b"", header_proto())]
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        raw = a.tobytes()
        code = (dtype_codes or {}).get(name, codes[a.dtype])
        entries.append(
            (name.encode(), entry_proto(code, a.shape, len(data), len(raw), tt.crc32c(raw)))
        )
        data += raw
    write_table(prefix + ".index", entries, **table_kw)
    with open(f"{prefix}.data-00000-of-00001", "wb") as f:
        f.write(data)


def copy_tf(tmp_path) -> str:
    d = str(tmp_path / "tf")
    shutil.copytree(TF_TINY, d)
    return d


def copy_hf(tmp_path, edit=None) -> str:
    """hf-tiny copied, its tensors passed through `edit(dict) -> dict` first."""
    d = str(tmp_path / "hf")
    os.makedirs(d)
    shutil.copy(os.path.join(HF_TINY, "config.json"), d)
    # our writer has no BOOL: the one bool mask buffer goes back as float32 (skipped anyway)
    tensors = {
        k: np.array(v, np.float32 if v.dtype == bool else v.dtype)
        for k, v in sft.read(os.path.join(HF_TINY, "model.safetensors")).items()
    }
    sft.write(os.path.join(d, "model.safetensors"), edit(tensors) if edit else tensors)
    return d


def tf_entries(prefix) -> dict[str, dict]:
    return {
        k.decode(): tc._parse_entry(v, k.decode()) for k, v in tt.read_table(prefix + ".index") if k
    }


# ---------------------------------------------------------------------------------------
# crc32c
# ---------------------------------------------------------------------------------------


def test_crc32c_known_vectors():
    # RFC 3720, appendix B.4 (iSCSI CRC-32C examples)
    assert tt.crc32c(bytes(32)) == 0x8A9136AA
    assert tt.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tt.crc32c(bytes(range(32))) == 0x46DD794E
    assert tt.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    # the "check" value of the CRC catalogue
    assert tt.crc32c(b"123456789") == 0xE3069283
    assert tt.crc32c(b"") == 0


@given(
    n=st.one_of(st.integers(0, 5000), st.integers(4000, 300_000)),
    cut=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_crc32c_vectorised_matches_serial_and_continues(n, cut, seed):
    # lengths around _SERIAL_MAX and several lane counts; the serial loop is the reference
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    want = tt._crc_serial(0xFFFFFFFF, data.tobytes()) ^ 0xFFFFFFFF
    assert tt.crc32c(data) == want
    assert tt.crc32c(data.tobytes()) == want
    k = int(cut * n)
    assert tt.crc32c(data[k:], tt.crc32c(data[:k])) == want


@given(st.integers(0, 2**32 - 1))
def test_crc_mask_round_trips(c):
    assert tt.unmask_crc(tt.mask_crc(c)) == c


def test_snappy_copies_and_literals():
    # "abc" as a literal (tag (3-1) << 2), then a 1-byte-offset copy of length 7 from 3 back:
    # tag = 1 | (7 - 4) << 2; the copy overlaps its own output
    assert tt._snappy_decompress(b"\x0a\x08abc\x0d\x03") == b"abcabcabca"
    # a 2-byte-offset copy (tag 2 | (len-1) << 2) of length 2 from 1 back
    assert tt._snappy_decompress(b"\x03\x00x\x06\x01\x00") == b"xxx"
    with pytest.raises(tt._Malformed, match="offset"):
        tt._snappy_decompress(b"\x05\x0d\x03")


@given(data=st.lists(st.sampled_from([b"a", b"b", b"ab", b"\x00", b"abcabcab"]), max_size=80))
def test_snappy_round_trips_overlapping_copies(data):
    """The fuzz writer's encoder (copies whenever 4 bytes repeat, overlapping their own output
    in runs) against the reader, which copies a piece at a time."""
    raw = b"".join(data)
    assert tt._snappy_decompress(tf_writer.snappy(raw)) == raw


def test_snappy_declared_length_is_charged_before_decompressing():
    with pytest.raises(tt._Malformed, match="declaring 1152921504606846976 bytes would expand"):
        tt._snappy_decompress(b"\x80\x80\x80\x80\x80\x80\x80\x80\x10\x08abc")
    with pytest.raises(tt._Malformed, match="longer than its declared length"):
        tt._snappy_decompress(b"\x02\x08abc")


# ---------------------------------------------------------------------------------------
# The fixtures load, and agree
# ---------------------------------------------------------------------------------------


def test_tf_and_hf_fixtures_load_to_identical_params():
    cfg_tf, p_tf = loader.load(TF_TINY)
    cfg_hf, p_hf = loader.load(HF_TINY)
    assert cfg_tf == cfg_hf
    assert (cfg_tf.n_vocab, cfg_tf.n_embd, cfg_tf.n_layer) == (50257, 24, 2)
    f_tf, f_hf = flatten(p_tf), flatten(p_hf)
    assert f_tf.keys() == f_hf.keys()
    for k in f_tf:
        assert f_tf[k].dtype == np.float32
        np.testing.assert_array_equal(f_tf[k], f_hf[k], err_msg=k)  # the same bits


def test_hf_fixture_has_the_buffers_the_loader_skips():
    tensors = sft.read(os.path.join(HF_TINY, "model.safetensors"))
    names = tensors.keys()
    assert {"h.0.attn.bias", "h.1.attn.bias", "h.0.attn.masked_bias"} <= set(names)
    assert tensors["h.0.attn.bias"].dtype == np.float32  # as in openai-community's files
    assert tensors["h.1.attn.bias"].dtype == bool  # as newer transformers saved it
    assert not any(n.startswith("transformer.") for n in names)  # bare keys, like openai's files
    loader.load(HF_TINY)


def test_sharded_set_with_transformer_prefix_loads():
    with open(os.path.join(HF_SHARDED, loader.HF_INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert all(k.startswith("transformer.") for k in weight_map)
    cfg, params = loader.load(HF_SHARDED)
    assert (cfg.n_vocab, cfg.n_ctx) == (96, 32)
    flat = flatten(params)
    for name, file in weight_map.items():
        a = sft.read(os.path.join(HF_SHARDED, file))[name]
        key = hf_to_canonical(name)
        np.testing.assert_array_equal(flat[key], a, err_msg=name)


def test_tf_dtypes_widen_to_float32():
    vals = np.array([[0.5, -1.25, 3.0], [65504.0, -0.0, 1e-3]])
    got = tc.read(os.path.join(FIX, "tf-dtypes", "model.ckpt"))
    assert all(a.dtype == np.float32 for a in got.values())
    np.testing.assert_array_equal(got["float"], vals.astype(np.float32))
    np.testing.assert_array_equal(got["half"], vals.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["double"], (vals / 3.0).astype(np.float32))
    # bfloat16 keeps 8 significant bits: TensorFlow rounds to nearest even
    bf = got["bfloat16"].view(np.uint32)
    assert not (bf & 0xFFFF).any()
    np.testing.assert_allclose(got["bfloat16"], vals, rtol=2**-8)


def test_double_past_float32_range_is_refused_without_a_warning(tmp_path):
    """1e300 in a DT_DOUBLE tensor widens to inf, refused by name; numpy's overflow warning
    would print a second line under the CLI's one-line error."""
    import warnings

    def edit(t):
        t["model/wte"] = np.full(t["model/wte"].shape, 1e300)  # float64
        return t

    d = _tf_variant(tmp_path, edit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError, match="tensor wte contains NaN or Inf"):
            loader.load(d)


def test_unsupported_dtype_written_by_tensorflow():
    with pytest.raises(WeightsError, match=r"ints\.ckpt\.index: tensor 'step' .*DT_INT32"):
        tc.read(os.path.join(FIX, "tf-dtypes", "ints.ckpt"))


@pytest.mark.parametrize("compression", [0, 1])
def test_written_table_round_trips(tmp_path, compression):
    # multi-block tables, prefix compression and snappy blocks, which TensorFlow's own bundles
    # (one uncompressed block at this size) do not exercise
    tensors = tc.read(os.path.join(TF_TINY, "model.ckpt"))
    prefix = str(tmp_path / "model.ckpt")
    write_checkpoint(prefix, tensors, per_block=5, compression=compression)
    again = tc.read(prefix)
    assert again.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(again[k], tensors[k])


# ---------------------------------------------------------------------------------------
# checkpoint_prefix
# ---------------------------------------------------------------------------------------


def test_checkpoint_prefix_honours_the_checkpoint_file(tmp_path):
    d = copy_tf(tmp_path)
    assert tc.checkpoint_prefix(d) == os.path.join(d, "model.ckpt")
    for ext in (".index", ".data-00000-of-00001"):
        os.rename(os.path.join(d, "model.ckpt" + ext), os.path.join(d, "step-7" + ext))
    with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "step-7"\n')
    assert tc.checkpoint_prefix(d) == os.path.join(d, "step-7")
    loader.load(d)
    # an absolute path from the machine that saved it: found by its base name
    with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "/home/openai/run3/step-7"\n')
    assert tc.checkpoint_prefix(d) == os.path.join(d, "step-7")
    # text format writes non-ASCII as octal-escaped UTF-8 bytes
    for ext in (".index", ".data-00000-of-00001"):
        os.rename(os.path.join(d, "step-7" + ext), os.path.join(d, '模 "7"' + ext))
    with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "\\346\\250\\241 \\"7\\""\n')
    assert tc.checkpoint_prefix(d) == os.path.join(d, '模 "7"')


def test_checkpoint_prefix_falls_back_to_model_ckpt(tmp_path):
    d = copy_tf(tmp_path)
    os.remove(os.path.join(d, "checkpoint"))
    assert tc.checkpoint_prefix(d) == os.path.join(d, "model.ckpt")
    with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "gone"\n')
    assert tc.checkpoint_prefix(d) == os.path.join(d, "model.ckpt")
    os.remove(os.path.join(d, "model.ckpt.index"))
    with pytest.raises(WeightsError, match=r"gone\.index: file not found"):
        tc.checkpoint_prefix(d)


def test_checkpoint_file_naming_the_original_reads_the_copy(tmp_path):
    """TensorFlow's saver writes absolute paths. A copy whose `checkpoint` names the original
    (intact) checkpoint, and whose own index is truncated, must fail on the copy's index:
    never load the original's files from outside the directory."""
    original = copy_tf(tmp_path / "a")
    loader.load(original)
    copy = str(tmp_path / "b" / "tf")
    shutil.copytree(original, copy)
    with open(os.path.join(copy, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{os.path.join(original, "model.ckpt")}"\n')
    os.truncate(os.path.join(copy, "model.ckpt.index"), 200)
    index = os.path.join(copy, "model.ckpt.index")
    assert tc.checkpoint_prefix(copy) == os.path.join(copy, "model.ckpt")
    with pytest.raises(WeightsError, match=rf"^{index}: bad checkpoint index") as e:
        loader.load(copy)
    assert original not in str(e.value)


@pytest.mark.parametrize(
    "written", ["../a/tf/model.ckpt", "../../a/tf/model.ckpt", "sub/../../a/tf/model.ckpt"]
)
def test_checkpoint_file_with_dotdot_stays_inside(tmp_path, written):
    """A relative path through `..` is taken by its base name inside the directory."""
    original = copy_tf(tmp_path / "a")
    copy = str(tmp_path / "b" / "tf")
    shutil.copytree(original, copy)
    with open(os.path.join(copy, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{written}"\n')
    assert tc.checkpoint_prefix(copy) == os.path.join(copy, "model.ckpt")
    os.remove(os.path.join(copy, "model.ckpt.index"))
    with pytest.raises(WeightsError, match=rf"^{copy}/model\.ckpt\.index: file not found"):
        loader.load(copy)


@pytest.mark.parametrize("written", ["..", ".", "", "/", "run/..", "x\\000y"])
def test_checkpoint_file_naming_no_file_is_refused(tmp_path, written):
    d = copy_tf(tmp_path)
    with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{written}"\n')
    with pytest.raises(WeightsError, match=r"checkpoint: model_checkpoint_path .* names no"):
        tc.checkpoint_prefix(d)


@pytest.mark.parametrize("which", ["index", "data"])
def test_checkpoint_files_symlinked_out_are_refused(tmp_path, which):
    """As for safetensors shards: a checkpoint's files may not resolve outside its directory."""
    original = copy_tf(tmp_path / "a")
    copy = str(tmp_path / "b")
    os.makedirs(copy)
    for f in os.listdir(original):
        src = os.path.join(original, f)
        if (which == "index") == f.endswith(".index"):
            os.symlink(src, os.path.join(copy, f))
        else:
            shutil.copy(src, copy)
    with pytest.raises(WeightsError, match="outside the checkpoint's directory"):
        loader.load(copy)
    # a symlink that stays inside the directory is fine
    inside = copy_tf(tmp_path / "c")
    name = DATA if which == "data" else "model.ckpt.index"
    os.rename(os.path.join(inside, name), os.path.join(inside, "real"))
    os.symlink(os.path.join(inside, "real"), os.path.join(inside, name))
    loader.load(inside)


def test_checkpoint_file_of_blank_lines_is_read_in_linear_time(tmp_path):
    """`^\\s*` over a run of blank lines backtracked from each line: O(n**2), hours for this."""
    import time

    d = copy_tf(tmp_path)
    with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write("\n" * 1_000_000 + 'model_checkpoint_path: "' + " " * 1_000_000)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="no model_checkpoint_path line"):
        tc.checkpoint_prefix(d)
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------
# Errors name the file and the tensor
# ---------------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    d = copy_tf(tmp_path)
    os.remove(os.path.join(d, DATA))
    with pytest.raises(WeightsError, match=f"{DATA}: file not found"):
        loader.load(d)
    with pytest.raises(WeightsError, match=r"nope\.index: file not found"):
        tc.read(os.path.join(d, "nope"))
    os.remove(os.path.join(d, "hparams.json"))
    with pytest.raises(WeightsError, match="hparams.json"):
        loader.load(d)


def test_truncated_data_shard_is_caught_before_reading(tmp_path):
    d = copy_tf(tmp_path)
    prefix = os.path.join(d, "model.ckpt")
    last = max(tf_entries(prefix).items(), key=lambda kv: kv[1]["offset"])[0]
    size = os.path.getsize(os.path.join(d, DATA))
    os.truncate(os.path.join(d, DATA), size - 10)
    with pytest.raises(WeightsError, match=rf"{DATA}: tensor '{last}' needs bytes .*truncated"):
        loader.load(d)


def test_flipped_byte_fails_the_tensor_crc(tmp_path):
    d = copy_tf(tmp_path)
    e = tf_entries(os.path.join(d, "model.ckpt"))["model/wpe"]
    with open(os.path.join(d, DATA), "r+b") as f:
        f.seek(e["offset"] + 101)
        b = f.read(1)
        f.seek(e["offset"] + 101)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(WeightsError, match=rf"{DATA}: tensor 'model/wpe' fails its crc32c"):
        loader.load(d)
    tc.read(os.path.join(d, "model.ckpt"), verify=False)  # the check is what caught it


@pytest.mark.parametrize(
    "where, message",
    [
        (lambda n: n - 1, "bad table magic"),  # the magic's last byte
        (lambda n: 30, "data block at offset 0 fails its crc32c"),
        (lambda n: n - 48 - 3, "index block .*fails its crc32c"),  # inside the index trailer
    ],
)
def test_corrupt_index(tmp_path, where, message):
    d = copy_tf(tmp_path)
    path = os.path.join(d, "model.ckpt.index")
    raw = bytearray(open(path, "rb").read())
    raw[where(len(raw))] ^= 0x01
    open(path, "wb").write(raw)
    with pytest.raises(WeightsError, match=rf"model\.ckpt\.index: bad checkpoint index: {message}"):
        loader.load(d)


def test_truncated_index(tmp_path):
    d = copy_tf(tmp_path)
    path = os.path.join(d, "model.ckpt.index")
    for keep in (20, 200):
        os.truncate(path, keep)
        with pytest.raises(WeightsError, match=r"model\.ckpt\.index: bad checkpoint index"):
            loader.load(d)


def _tf_variant(tmp_path, edit, **kw) -> str:
    """tf-tiny rewritten with edit(tensors) applied (crcs recomputed: only content changes)."""
    d = copy_tf(tmp_path)
    prefix = os.path.join(d, "model.ckpt")
    tensors = {k: np.array(v) for k, v in tc.read(prefix).items()}
    write_checkpoint(prefix, edit(tensors), **kw)
    return d


def _hf_variant(tmp_path, edit) -> str:
    return copy_hf(tmp_path, edit)


def _set(d, key, value):
    d = dict(d)
    d[key] = value
    return d


def _drop(d, key):
    return {k: v for k, v in d.items() if k != key}


def _nan(d, key):
    a = d[key].copy()
    a.flat[5] = np.nan
    return _set(d, key, a)


CASES = {
    "unknown": (
        lambda t: _set(t, "model/h0/mlp/c_gate/w", np.zeros((1, 24, 24), np.float32)),
        lambda t: _set(t, "h.0.mlp.c_gate.weight", np.zeros((24, 24), np.float32)),
        r"unknown tensor.*h0/mlp/c_gate/w|unknown tensor.*c_gate",
    ),
    "missing": (
        lambda t: _drop(t, "model/h1/ln_2/b"),
        lambda t: _drop(t, "h.1.ln_2.bias"),
        r"missing tensor\(s\) h1/ln_2/b",
    ),
    "nan": (
        lambda t: _nan(t, "model/h1/mlp/c_fc/w"),
        lambda t: _nan(t, "h.1.mlp.c_fc.weight"),
        r"tensor h1/mlp/c_fc/w contains NaN",
    ),
    "shape": (
        lambda t: _set(t, "model/wpe", t["model/wpe"][:64]),
        lambda t: _set(t, "wpe.weight", t["wpe.weight"][:64]),
        r"tensor wpe has shape \(64, 24\), but the config .*needs \(128, 24\)",
    ),
}


@pytest.mark.parametrize("fmt", ["tf", "hf"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_content_errors_name_file_and_tensor(tmp_path, fmt, case):
    edit_tf, edit_hf, message = CASES[case]
    d = _tf_variant(tmp_path, edit_tf) if fmt == "tf" else _hf_variant(tmp_path, edit_hf)
    source = "model.ckpt" if fmt == "tf" else "hf"
    with pytest.raises(WeightsError, match=source) as info:
        loader.load(d)
    assert info.match(message)


def test_shape_mismatch_with_the_config_file(tmp_path):
    d = copy_tf(tmp_path)
    with open(os.path.join(d, "hparams.json"), "w") as f:
        json.dump({"n_vocab": 50257, "n_ctx": 128, "n_embd": 24, "n_head": 3, "n_layer": 3}, f)
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) h2/"):
        loader.load(d)
    with open(os.path.join(d, "hparams.json"), "w") as f:
        json.dump({"n_vocab": 50000, "n_ctx": 128, "n_embd": 24, "n_head": 3, "n_layer": 2}, f)
    with pytest.raises(WeightsError, match=r"tensor wte has shape \(50257, 24\)"):
        loader.load(d)


def test_unsupported_dtype_and_slices_in_the_index(tmp_path):
    t = {"model/a": np.zeros(3, np.float32)}
    prefix = str(tmp_path / "model.ckpt")
    write_checkpoint(prefix, t, dtype_codes={"model/a": 7})
    with pytest.raises(WeightsError, match=r"tensor 'model/a' has unsupported dtype DT_STRING"):
        tc.read(prefix)
    write_checkpoint(prefix, t, dtype_codes={"model/a": 2})  # 12 bytes cannot be 3 doubles
    with pytest.raises(WeightsError, match=r"'model/a': 12 bytes stored but DT_DOUBLE"):
        tc.read(prefix)
    entries = [(b"", header_proto()), (b"model/a", entry_proto(1, (3,), 0, 12, 0, sliced=True))]
    write_table(prefix + ".index", entries)
    with pytest.raises(WeightsError, match=r"'model/a' is saved in slices"):
        tc.read(prefix)
    entries = [(b"", header_proto()), (b"model/a", entry_proto(1, (3,), 0, 12, 0, shard=1))]
    write_table(prefix + ".index", entries)
    with pytest.raises(WeightsError, match=r"'model/a': shard 1 is not one of 1"):
        tc.read(prefix)


def test_shape_unknown_rank_flag():
    # TensorShapeProto {dim {size 4}, unknown_rank}: only unknown_rank = true is an error (the
    # check once read the whole shape's bytes, always non-empty, and refused an explicit false)
    def entry(unknown_rank: int) -> bytes:
        shape = b"\x12\x02\x08\x04" + bytes([0x18, unknown_rank])
        return b"\x08\x01" + bytes([0x12, len(shape)]) + shape + b"\x28\x10"

    assert tc._parse_entry(entry(0), "a")["shape"] == [4]
    with pytest.raises(tc._Malformed, match="unknown rank"):
        tc._parse_entry(entry(1), "a")


def test_bad_index_structure(tmp_path):
    prefix = str(tmp_path / "model.ckpt")
    good = (b"model/a", entry_proto(1, (3,), 0, 12, tt.crc32c(bytes(12))))
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(bytes(12))
    write_table(prefix + ".index", [good])
    with pytest.raises(WeightsError, match="no bundle header"):
        tc.read(prefix)
    write_table(prefix + ".index", [(b"", header_proto()), (b"model/b", good[1]), good])
    with pytest.raises(WeightsError, match="out of order"):
        tc.read(prefix)
    write_table(prefix + ".index", [(b"", header_proto(num_shards=0)), good])
    with pytest.raises(WeightsError, match="0 shards"):
        tc.read(prefix)
    write_table(prefix + ".index", [(b"", header_proto()), (b"model/a", b"\x08\x81")])
    with pytest.raises(WeightsError, match="varint runs past"):
        tc.read(prefix)
    write_table(prefix + ".index", [(b"", header_proto()), good], compression=4)
    with pytest.raises(WeightsError, match="data block at offset 0 has unknown compression type 4"):
        tc.read(prefix)
    write_table(prefix + ".index", [(b"", header_proto()), good])
    assert tc.read(prefix)["model/a"].tolist() == [0.0, 0.0, 0.0]
    # big-endian bundles (endianness = 1) are byte-swapped
    data = np.array([1.5, -2.0, 3.25], ">f4").tobytes()
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)
    big = (b"model/a", entry_proto(1, (3,), 0, 12, tt.crc32c(data)))
    write_table(prefix + ".index", [(b"", header_proto(endianness=1)), big])
    assert tc.read(prefix)["model/a"].tolist() == [1.5, -2.0, 3.25]


def test_unknown_tensor_name_outside_model_scope(tmp_path):
    d = _tf_variant(tmp_path, lambda t: _set(t, "global_step", np.zeros(1, np.float32)))
    with pytest.raises(WeightsError, match=r"model\.ckpt\.index: unknown tensor 'global_step'"):
        loader.load(d)


@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_index_bit_gives_weights_error_or_same_tensors(tmp_path_factory, pos, bit):
    raw = bytearray(open(os.path.join(TF_TINY, "model.ckpt.index"), "rb").read())
    pos %= len(raw)
    raw[pos] ^= 1 << bit
    d = tmp_path_factory.mktemp("flip")
    os.symlink(os.path.join(TF_TINY, DATA), d / DATA)
    (d / "model.ckpt.index").write_bytes(raw)
    try:
        got = tc.read(str(d / "model.ckpt"))
    except WeightsError:
        return
    # only the footer's padding is not covered by a checksum
    assert len(raw) - tt.FOOTER_SIZE <= pos
    assert got.keys() == tc.read(os.path.join(TF_TINY, "model.ckpt")).keys()


entry_values = st.one_of(
    st.binary(max_size=40),
    st.builds(
        entry_proto,
        dtype=st.integers(0, 30),
        shape=st.lists(st.integers(0, 6), max_size=3),
        offset=st.integers(0, 80),
        size=st.integers(0, 80),
        crc=st.integers(0, 2**32 - 1),
        shard=st.integers(0, 2),
    ),
)


@given(
    entries=st.lists(st.tuples(st.binary(min_size=1, max_size=12), entry_values), max_size=12),
    header=st.one_of(st.just(header_proto()), st.binary(max_size=12)),
    per_block=st.integers(1, 5),
    compression=st.sampled_from([0, 1]),
)
def test_garbage_entries_in_a_valid_table_give_weights_error(
    tmp_path_factory, entries, header, per_block, compression
):
    # checksums are right, so this reaches the key and protobuf decoding with arbitrary bytes
    d = tmp_path_factory.mktemp("garbage")
    prefix = str(d / "model.ckpt")
    entries = [(b"", header), *sorted(dict(entries).items())]
    write_table(prefix + ".index", entries, per_block=per_block, compression=compression)
    (d / DATA).write_bytes(np.arange(16, dtype=np.float32).tobytes())
    try:
        got = tc.read(prefix)
    except WeightsError:
        return
    assert all(a.dtype == np.float32 for a in got.values())
