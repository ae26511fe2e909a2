"""The whole model on the Numba backend against the reference backend.

Logits (prompt, padded batch, KV-cache decode; a property over any padding and cache), exp32,
greedy tokens, the committed Hugging Face fixture, training (loss, every gradient, a few
optimizer steps), run-to-run determinism of the gradients, one compiled signature per kernel,
and `gpt2 generate/eval --backend numba` end to end.

Tolerances: every op of the Numba backend agrees with the reference to a few float32 ulps of
its output's scale (tests/test_backends.py); through L blocks the differences add up, growing
with depth and with the length of the reductions (C, T), and are read here against the scale
of the compared array (max |ref|). Measured on these models: logits within 5e-7 of
max |logits|, every gradient within 5e-7 of its tensor's max, losses within 1e-7 (five
training steps included); the bounds below leave 10x room or more.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tiny_model import TINY, tiny_params

nb = pytest.importorskip("fast.numba.backend", reason="numba is not installed")

from fast import get_backend  # noqa: E402
from gpt2 import cli  # noqa: E402
from ref import generate as ref_generate  # noqa: E402
from ref import ops as ref_ops  # noqa: E402
from ref.config import GPT2Config  # noqa: E402
from ref.data import Split  # noqa: E402
from ref.model import KVCache, Model, forward, loss_and_grads  # noqa: E402
from ref.train import TrainConfig, train  # noqa: E402
from weights import loader  # noqa: E402

HF_TINY = os.path.join(os.path.dirname(__file__), "fixtures", "hf-tiny")
LOGITS_RTOL = 5e-6  # of max |logits|; see the module docstring
GRAD_RTOL = 5e-6  # of max |grad| per tensor
LOSS_RTOL = 1e-6

# awkward on purpose: head size 5, a prime vocabulary, C not a multiple of the vector width
ODD = GPT2Config(n_vocab=211, n_ctx=48, n_embd=15, n_head=3, n_layer=3)


def close_to_scale(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    err = float(np.abs(got - want).max(initial=0.0))
    scale = float(np.abs(want).max(initial=0.0))
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["tiny", "odd"])
def test_logits_match_reference_prompt_padding_and_decode(cfg):
    params = tiny_params(cfg, seed=7)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.n_vocab, (3, 11))
    mask = np.ones(ids.shape, bool)
    mask[1, :4] = False  # left padding
    mask[2, :10] = False  # a single real token
    want = forward(params, ids, cfg, mask=mask)
    got = forward(params, ids, cfg, mask=mask, ops=nb)
    close_to_scale(got, want, LOGITS_RTOL, "prompt logits")
    # decode: the prompt into a cache, then one token at a time against it
    caches = {name: KVCache(cfg, 3, capacity=20) for name in ("ref", "numba")}
    for name, ops in (("ref", ref_ops), ("numba", nb)):
        forward(params, ids, cfg, cache=caches[name], mask=mask, ops=ops)
    for step in range(4):
        new = rng.integers(0, cfg.n_vocab, (3, 1))
        want = forward(params, new, cfg, cache=caches["ref"], last_only=True)
        got = forward(params, new, cfg, cache=caches["numba"], last_only=True, ops=nb)
        close_to_scale(got, want, LOGITS_RTOL, f"decode step {step}")


@given(
    B=st.integers(1, 3),
    T=st.integers(1, 20),
    P=st.integers(0, 12),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_logits_match_reference_any_padding_and_cache(B, T, P, data, seed):
    """Any left padding per row, any prompt length, with or without P cached tokens."""
    cfg = ODD
    params = tiny_params(cfg, seed=1)
    rng = np.random.default_rng(seed)
    pads = data.draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B))
    mask = np.arange(T)[None, :] >= np.array(pads)[:, None]  # (B, T), row b padded by pads[b]
    ids = rng.integers(0, cfg.n_vocab, (B, T))
    if P == 0:
        want = forward(params, ids, cfg, mask=mask)
        got = forward(params, ids, cfg, mask=mask, ops=nb)
    else:
        first = rng.integers(0, cfg.n_vocab, (B, P))
        caches = [KVCache(cfg, B, capacity=P + T) for _ in range(2)]
        forward(params, first, cfg, cache=caches[0])
        forward(params, first, cfg, cache=caches[1], ops=nb)
        want = forward(params, ids, cfg, cache=caches[0], mask=mask)
        got = forward(params, ids, cfg, cache=caches[1], mask=mask, ops=nb)
    close_to_scale(got, want, LOGITS_RTOL, "logits")


def test_exp32_is_within_one_ulp():
    """exp32 (fast/numba/common.py) against float64 exp over its whole unclamped range;
    measured 0.66 ulp at most (a relative error of 7.9e-8)."""
    import numba

    from fast.numba.common import FASTMATH, exp32

    @numba.njit(fastmath=FASTMATH)
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = exp32(x[i])

    x = np.linspace(-87.0, 88.0, 1_000_003, dtype=np.float32)
    out = np.empty_like(x)
    exp_all(x, out)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(out - want) / want
    assert rel.max() <= float(np.finfo(np.float32).eps)  # 1 ulp at the top of a binade
    special = np.array([np.nan, -np.inf, np.inf, -1e30, 1e30], np.float32)
    out = np.empty_like(special)
    exp_all(special, out)
    assert np.isnan(out[0]) and np.all(np.isfinite(out[1:])) and np.all(out[1:] > 0)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    (out,) = ref_generate.generate(model, [prompt], n, temperature=0.0, eos_id=None)
    return out.token_ids


def test_greedy_tokens_identical():
    cfg = ODD
    params = tiny_params(cfg, seed=3)
    prompt = [5, 17, 99, 3, 150]
    want = greedy(Model(cfg, params, get_backend("ref")), prompt, 20)
    assert greedy(Model(cfg, params, get_backend("numba")), prompt, 20) == want


@pytest.mark.skipif(not os.path.isdir(HF_TINY), reason="fixture tests/fixtures/hf-tiny absent")
def test_hf_tiny_fixture_logits_and_greedy_tokens():
    cfg, params = loader.load(HF_TINY)
    ids = np.array([[15496, 11, 616, 1438, 318, 1757, 13, 314, 588]])
    close_to_scale(
        forward(params, ids, cfg, ops=nb), forward(params, ids, cfg), LOGITS_RTOL, "hf-tiny"
    )
    prompt = ids[0].tolist()
    want = greedy(Model(cfg, params, get_backend("ref")), prompt, 16)
    assert greedy(Model(cfg, params, get_backend("numba")), prompt, 16) == want


def batch(cfg: GPT2Config, B: int, T: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.n_vocab, (B, T + 1))
    targets = ids[:, 1:].copy()
    targets[0, :3] = -100  # ignored targets (a masked prompt)
    return ids[:, :-1], targets


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["tiny", "odd"])
def test_loss_and_every_gradient_match_reference(cfg):
    params = tiny_params(cfg, seed=11)
    ids, targets = batch(cfg, 3, 13, seed=2)
    loss, grads = loss_and_grads(params, ids, targets, cfg, ops=nb)
    want_loss, want = loss_and_grads(params, ids, targets, cfg)
    assert abs(loss - want_loss) <= LOSS_RTOL * abs(want_loss)
    assert grads.keys() == want.keys()
    for name, g in want.items():
        close_to_scale(grads[name], g, GRAD_RTOL, name)


def test_finetuning_losses_match_reference():
    """Five AdamW steps: the per-step losses agree (the parameters drift apart only by the
    gradients' round-off, which Adam's normalisation does not amplify at this scale)."""
    params = tiny_params(TINY, seed=12)
    rng = np.random.default_rng(3)
    split = Split("text", windows=rng.integers(0, TINY.n_vocab, (6, 17)), context_length=16)
    tcfg = TrainConfig(steps=5, batch_size=3, lr=3e-3, n_samples=0)
    _, _, want = train(params, TINY, split, None, tcfg)
    _, _, got = train(params, TINY, split, None, tcfg, ops=nb)
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)


def test_whole_model_gradients_bit_identical_run_to_run():
    cfg = GPT2Config(n_vocab=97, n_ctx=80, n_embd=32, n_head=2, n_layer=2)
    params = tiny_params(cfg, seed=5)
    ids, targets = batch(cfg, 4, 70, seed=6)  # enough rows for every parallel loop to split
    _, first = loss_and_grads(params, ids, targets, cfg, ops=nb)
    _, second = loss_and_grads(params, ids, targets, cfg, ops=nb)
    for name, g in first.items():
        assert g.tobytes() == second[name].tobytes(), name


@pytest.mark.skipif(not os.path.isdir(HF_TINY), reason="fixture tests/fixtures/hf-tiny absent")
def test_cli_generate_and_eval_with_backend_numba(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. It was a sunny day.")
    out = {}
    for backend in ("ref", "numba"):
        gen = ["generate", "Hello, my name is", "--model", HF_TINY, "--backend", backend]
        assert cli.main([*gen, "--max-new-tokens", "8", "--json"]) == 0
        g = json.loads(capsys.readouterr().out)
        ev = ["eval", str(text), "--model", HF_TINY, "--backend", backend, "--json"]
        assert cli.main(ev) == 0
        e = json.loads(capsys.readouterr().out)
        out[backend] = (g, e)
    assert out["numba"][0]["backend"] == "numba"
    ids = [c["token_ids"] for c in out["numba"][0]["completions"]]
    assert ids == [c["token_ids"] for c in out["ref"][0]["completions"]]
    assert out["numba"][1]["loss"] == pytest.approx(out["ref"][1]["loss"], rel=LOSS_RTOL)


def test_each_kernel_compiles_one_signature():
    """Views, read-only weights and contiguous arrays all reach one compiled signature per
    kernel (compile time and the on-disk cache stay small). Run after the other tests of the
    session, it also checks that none of them made a second one."""
    import numba

    from fast.numba import attention as numba_attention
    from fast.numba import crossentropy as numba_crossentropy
    from fast.numba import gelu as numba_gelu
    from fast.numba import layernorm as numba_layernorm

    cfg, params = loader.load(HF_TINY) if os.path.isdir(HF_TINY) else (ODD, tiny_params(ODD))
    ids = np.arange(12).reshape(2, 6) % cfg.n_vocab
    cache = KVCache(cfg, 2, capacity=10)
    forward(params, ids, cfg, cache=cache, ops=nb, last_only=True)  # views, read-only g, b
    forward(params, ids[:, :1], cfg, cache=cache, ops=nb)
    loss_and_grads(tiny_params(TINY), *batch(TINY, 2, 7, seed=1), TINY, ops=nb)
    modules = (numba_attention, numba_crossentropy, numba_gelu, numba_layernorm)
    kernels = [
        obj
        for m in modules
        for name, obj in vars(m).items()
        if name.endswith("_kernel") and isinstance(obj, numba.core.registry.CPUDispatcher)
    ]
    # forward and backward of five ops, the serial forwards of attention, LayerNorm, GELU
    # and bias + GELU (small calls), and attention over per-row caches (the server's step)
    assert len(kernels) == 15
    # the attention forwards read KV caches of two dtypes: one signature each (float32, and
    # uint16, the bits of a float16 cache)
    kv_kernels = {"_attention_forward_kernel", "_attention_forward_serial_kernel",
                  "_attention_rows_kernel"}  # fmt: skip
    for k in kernels:
        most = 2 if k.__name__ in kv_kernels else 1
        assert len(k.signatures) <= most, (k.__name__, k.signatures)


def test_the_command_sets_libgomp_spin_before_numba_loads_it():
    """fast/numba/common.py sets GOMP_SPINCOUNT=3000 and the omp layer when it loads (libgomp
    reads the count once, at load); `gpt2 train`/`finetune` ask for 300 first (gpt2/cli.py:
    training interleaves kernels with BLAS); -t N imports fast/numba before starting numba's
    pool. Each in a fresh process: the count is read once per process."""
    import subprocess
    import sys

    code = (
        "import os, sys; import gpt2.cli as c; c._spin_for(sys.argv[1]);"
        "c.set_threads(1, 'numba'); import numba;"
        "print(os.environ.get('GOMP_SPINCOUNT'), numba.threading_layer())"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER")
    }
    got = {}
    for command in ("train", "finetune", "generate"):
        out = subprocess.run(
            [sys.executable, "-c", code, command],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        got[command] = out.stdout.split()
    assert got["train"] == got["finetune"] == ["300", "omp"], got
    assert got["generate"] == ["3000", "omp"], got


_GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


@pytest.mark.skipif(not _GLIBC, reason="malloc's thresholds are glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    """fast/numba/common.py keeps freed memory in malloc's heap (keep_freed_memory): blocks the
    size of a prompt's activations, freed and allocated again, come back without touching new
    pages, where glibc's defaults give the freed heap back to the system each time (and the
    next blocks fault their pages in again). A user's own MALLOC_TRIM_THRESHOLD_ is left in
    force. Each in a fresh process; the free bytes malloc holds from mallinfo2 (glibc 2.33+),
    page faults from getrusage (how many depends on huge pages: only ours is asserted)."""
    import subprocess

    code = (
        "import ctypes, resource, sys, numpy as np\n"
        "if sys.argv[1] == 'import': import fast.numba.common as c\n"
        "class Info(ctypes.Structure): _fields_ = [(f, ctypes.c_size_t) for f in 'abcdefghij']\n"
        "libc = ctypes.CDLL(None); libc.mallinfo2.restype = Info\n"
        "def churn():\n"
        "    a = [np.ones(2 << 20, np.float32) for _ in range(3)]  # three 8 MB blocks\n"
        "    del a\n"
        "churn(); churn()\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): churn()\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0\n"
        "flag = c.MALLOC_SET if sys.argv[1] == 'import' else None\n"
        "print(flag, faults, libc.mallinfo2().i >> 20)  # i: fordblks, free bytes held\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    got = {}
    for name, arg, extra in (
        ("ours", "import", {}),
        ("glibc's defaults", "no import", {}),
        ("user's", "import", {"MALLOC_TRIM_THRESHOLD_": "0"}),
    ):
        out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                             env={**base, **extra}, check=True)  # fmt: skip
        flag, faults, free_mb = out.stdout.split()
        got[name] = (flag, int(faults), int(free_mb))
    # measured here: ours 0 faults and 24 MB kept free; glibc's defaults 4,990 faults (30,000
    # pages of 4 KB come fresh without huge pages) and 8 MB kept; trimming at 0, 7,740 and 0 MB
    assert got["ours"][0] == "True" and got["ours"][1] < 100 and got["ours"][2] >= 20, got
    assert got["glibc's defaults"][2] < 16, got
    assert got["user's"][0] == "False" and got["user's"][2] < 16, got
