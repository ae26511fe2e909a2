"""Config, tokenizer, safetensors round trips and the eval windowing: the pieces the rest of
the project stands on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ref.config import SIZES, ConfigError, GPT2Config, canonical_size, config_from_dict
from ref.evaluate import windows
from weights import WeightsError
from weights import safetensors as sft
from weights.tokenizer import EOT_ID, decode, encode


def test_sizes_and_param_counts():
    # 124,439,808 is the parameter count of the released 124M model (tied LM head).
    assert SIZES["124M"].n_params() == 124_439_808
    assert canonical_size("gpt2-xl") == "1558M"
    assert canonical_size("openai-community/gpt2-medium") == "355M"
    assert canonical_size("nonsense") is None


def test_config_from_hparams_and_hf_config_agree():
    hp = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    hf = SIZES["124M"].to_hf_config()
    assert config_from_dict(hp) == config_from_dict(hf) == SIZES["124M"]


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12}, "n_layer"),
        ({"n_vocab": "x", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 1}, "n_vocab"),
        ({"n_vocab": 5, "n_ctx": 1024, "n_embd": 768, "n_head": 7, "n_layer": 1}, "divisible"),
        ({"n_vocab": 5, "n_ctx": 10**12, "n_embd": 8, "n_head": 1, "n_layer": 1}, "n_ctx"),
        ([1, 2], "JSON object"),
    ],
)
def test_config_errors_name_the_key(bad, word):
    with pytest.raises(ConfigError, match=word):
        config_from_dict(bad, "hparams.json")


def test_tokenizer_offline_and_eot():
    assert encode("Hello my name is") == [15496, 616, 1438, 318]
    # user text cannot forge the special token unless asked to
    assert EOT_ID not in encode("a <|endoftext|> b")
    assert EOT_ID in encode("a <|endoftext|> b", allow_eot=True)
    assert decode(encode("naïve café ☕")) == "naïve café ☕"


@given(st.text(max_size=200))
def test_tokenizer_round_trips_any_text(s):
    # lone surrogates cannot be encoded as UTF-8; tiktoken replaces them, everything else is exact
    s = s.encode("utf-8", "replace").decode("utf-8")
    assert decode(encode(s)) == s


def test_safetensors_round_trip_with_the_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(np.float16),
        "c": np.arange(6, dtype=np.int64).reshape(2, 3),
        "empty": np.zeros((0, 4), np.float32),
    }
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    sft.write(str(ours), tensors, metadata={"format": "np"})
    safetensors_numpy.save_file(tensors, str(theirs))
    for path in (ours, theirs):
        got = sft.read(str(path))
        assert set(got) == set(tensors)
        for k, v in tensors.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
    back = safetensors_numpy.load_file(str(ours))
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())


def test_safetensors_rejects_lying_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4 * 10**6]}})
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    with pytest.raises(WeightsError, match="outside"):
        sft.read(str(path))


def test_safetensors_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "m.safetensors"
    sft.write(str(path), {"x": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(WeightsError):
        sft.write(str(path), {"x": np.ones(3, np.float32), "bad": np.array(["s"])})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@given(n=st.integers(2, 400), n_ctx=st.integers(2, 64), data=st.data())
def test_eval_windows_score_every_target_once(n, n_ctx, data):
    stride = data.draw(st.integers(1, n_ctx))
    scored = []
    for start, end, first in windows(n, n_ctx, stride):
        assert end - start <= n_ctx and start < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_config_dataclass_validation():
    with pytest.raises(ConfigError):
        GPT2Config(n_embd=10, n_head=3)
