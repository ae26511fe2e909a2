"""Backward passes: every op against central finite differences in float64, the whole model
against torch autograd in float32, and LoRA's backward.

Finite differences: for a scalar L(x) = sum(R * op(x)) with a fixed random R, the directional
derivative along a random direction u is compared with <dL/dx, u> from the op's backward.
In float64 with step h = 1e-5 the central difference has truncation error O(h^2 |L'''|)
~ 1e-10 and round-off ~ 1e-16 * |L| / h ~ 1e-11, so a relative tolerance of 1e-6 leaves a
wide margin while catching any real mistake (a wrong term changes the result at O(1)).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tiny_model import TINY, tiny_params, torch_loss

from ref import ops
from ref.config import GPT2Config
from ref.lora import add_lora, lora_backward, lora_forward
from ref.model import forward, loss_and_grads, model_backward, model_forward
from ref.train import get_flat, param_names

H = 1e-5  # finite-difference step (float64)
RTOL_FD = 1e-6  # see the module docstring


def check_fd(f, args: list[np.ndarray], grads: list[np.ndarray], rng, n_dirs: int = 3):
    """f(*args) -> scalar; grads[i] = dL/dargs[i]. Checks random directional derivatives."""
    for _ in range(n_dirs):
        us = [rng.standard_normal(a.shape) for a in args]
        plus = f(*[a + H * u for a, u in zip(args, us, strict=True)])
        minus = f(*[a - H * u for a, u in zip(args, us, strict=True)])
        fd = (plus - minus) / (2 * H)
        an = sum(float((g * u).sum()) for g, u in zip(grads, us, strict=True))
        assert abs(fd - an) <= RTOL_FD * max(abs(fd), abs(an), 1e-3), (fd, an)


dims = st.integers(1, 5)


@given(B=dims, T=dims, C=st.integers(1, 9), V=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_embedding_backward_fd(B, T, C, V, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    pos = np.broadcast_to(np.arange(T), (B, T))
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((T + 2, C))
    R = rng.standard_normal((B, T, C))
    out, cache = ops.embedding_forward(ids, pos, wte, wpe)
    dwte, dwpe = ops.embedding_backward(R, cache)
    assert dwte.dtype == np.float64
    check_fd(
        lambda a, b: (R * ops.embedding_forward(ids, pos, a, b)[0]).sum(),
        [wte, wpe],
        [dwte, dwpe],
        rng,
    )


@given(B=dims, T=dims, C=st.integers(2, 17), seed=st.integers(0, 2**16))
def test_layernorm_backward_fd(B, T, C, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C)) * 3 + 1
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    R = rng.standard_normal((B, T, C))
    _, cache = ops.layernorm_forward(x, g, b)
    grads = ops.layernorm_backward(R, cache)
    check_fd(lambda *a: (R * ops.layernorm_forward(*a)[0]).sum(), [x, g, b], list(grads), rng)


@given(N=dims, Cin=st.integers(1, 9), Cout=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_linear_backward_fd(N, Cin, Cout, seed):
    rng = np.random.default_rng(seed)
    x, w, b = (
        rng.standard_normal((2, N, Cin)),
        rng.standard_normal((Cin, Cout)),
        rng.standard_normal(Cout),
    )
    R = rng.standard_normal((2, N, Cout))
    _, cache = ops.linear_forward(x, w, b)
    grads = ops.linear_backward(R, cache)
    check_fd(lambda *a: (R * ops.linear_forward(*a)[0]).sum(), [x, w, b], list(grads), rng)


@given(N=dims, C=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_gelu_and_bias_gelu_backward_fd(N, C, seed):
    rng = np.random.default_rng(seed)
    x, b = rng.standard_normal((N, C)) * 3, rng.standard_normal(C)
    R = rng.standard_normal((N, C))
    _, cache = ops.gelu_forward(x)
    check_fd(lambda a: (R * ops.gelu_forward(a)[0]).sum(), [x], [ops.gelu_backward(R, cache)], rng)
    _, cache = ops.bias_gelu_forward(x, b)
    grads = ops.bias_gelu_backward(R, cache)
    check_fd(lambda *a: (R * ops.bias_gelu_forward(*a)[0]).sum(), [x, b], list(grads), rng)


@given(
    B=st.integers(1, 3),
    NH=st.integers(1, 3),
    Tq=st.integers(1, 6),
    extra=st.integers(0, 3),
    hs=st.integers(1, 8),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_backward_fd(B, NH, Tq, extra, hs, masked, seed):
    """Causal attention, with keys from a cache (Tk > Tq) and padding masks."""
    rng = np.random.default_rng(seed)
    Tk = Tq + extra
    q = rng.standard_normal((B, NH, Tq, hs))
    k, v = rng.standard_normal((2, B, NH, Tk, hs))
    key_mask = rng.random((B, Tk)) < 0.7 if masked else None
    R = rng.standard_normal((B, NH, Tq, hs))
    _, cache = ops.attention_forward(q, k, v, key_mask)
    grads = ops.attention_backward(R, cache)
    f = lambda *a: (R * ops.attention_forward(*a, key_mask)[0]).sum()
    check_fd(f, [q, k, v], list(grads), rng)


@given(N=st.integers(1, 8), V=st.integers(2, 11), seed=st.integers(0, 2**16))
def test_crossentropy_backward_fd(N, V, seed):
    """Mean over the targets that are not -100; ignored rows get zero gradient."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, V)) * 4
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < 0.3] = -100
    loss, cache = ops.crossentropy_forward(logits, targets)
    assert loss.dtype == np.float64
    d = ops.crossentropy_backward(1.0, cache)
    assert np.all(d[targets == -100] == 0)
    if (targets != -100).any():
        lse = np.log(np.exp(logits).sum(-1))
        valid = targets != -100
        want = (lse - logits[np.arange(N), np.where(valid, targets, 0)])[valid].mean()
        assert loss == pytest.approx(want, rel=1e-12)  # float64 throughout
    check_fd(lambda a: ops.crossentropy_forward(a, targets)[0], [logits], [d], rng)


@given(
    N=dims,
    Cin=st.integers(1, 9),
    Cout=st.integers(1, 9),
    r=st.integers(1, 4),
    p=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_lora_backward_fd(N, Cin, Cout, r, p, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, N, Cin))
    lora = {
        "a": rng.standard_normal((Cin, r)),
        "b": rng.standard_normal((r, Cout)),
        "scale": 1.7,
        "dropout": p,
    }
    R = rng.standard_normal((2, N, Cout))

    def f(x, a, b):  # the same dropout mask every call: a fresh generator with one seed
        out, _ = lora_forward(x, {**lora, "a": a, "b": b}, np.random.default_rng(seed))
        return (R * out).sum()

    _, cache = lora_forward(x, lora, np.random.default_rng(seed))
    grads = lora_backward(R, cache)
    check_fd(f, [x, lora["a"], lora["b"]], list(grads), rng)


# ---------------------------------------------------------------------------------------------
# the whole model


def batch(cfg: GPT2Config, B: int, T: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.n_vocab, (B, T))
    targets = rng.integers(0, cfg.n_vocab, (B, T))
    targets[0, -2:] = -100  # ignored targets, as in padded instruction batches
    return ids, targets


def test_model_backward_fd_float64():
    """The whole model in float64 (every op is dtype-generic) against finite differences."""
    params = tiny_params(TINY, seed=3, dtype=np.float64)
    ids, targets = batch(TINY, 2, 7)
    loss, grads = loss_and_grads(params, ids, targets, TINY)
    names = param_names(params, "all")
    assert set(grads) == set(names)  # a gradient for every tensor of the layout
    rng = np.random.default_rng(0)
    flat = get_flat(params, names)
    from ref.train import with_flat

    def f(*arrays):
        p = with_flat(params, dict(zip(names, arrays, strict=True)))
        logits = forward(p, ids, TINY)
        return float(
            ops.crossentropy_forward(logits.reshape(-1, TINY.n_vocab), targets.reshape(-1))[0]
        )

    check_fd(f, [flat[n] for n in names], [grads[n] for n in names], rng, n_dirs=2)


def test_untied_head_backward_matches_torch_float64():
    """An untied LM head (params["lm_head"], cfg.tie_word_embeddings False): its gradient is
    the head's alone and wte gets only the embedding's. Against torch autograd in float64
    (every op is dtype-generic): both sides are exact to round-off, so 1e-12 of the largest
    gradient (measured: 1e-16). Finite differences would need H ~ 1e-5 and reach only ~1e-6
    relative here, the curvature of a head of its own."""
    import dataclasses

    torch = pytest.importorskip("torch")
    cfg = dataclasses.replace(TINY, tie_word_embeddings=False)
    params = tiny_params(cfg, seed=4, dtype=np.float64)  # lm_head (V, C) included
    ids, targets = batch(cfg, 2, 5)
    loss, grads = loss_and_grads(params, ids, targets, cfg)
    names = param_names(params, "all")
    assert "lm_head" in names and set(grads) == set(names)
    tp = {n: torch.tensor(a, requires_grad=True) for n, a in get_flat(params, names).items()}
    tl = torch_loss(tp, ids, targets, cfg)
    tl.backward()
    assert loss == pytest.approx(tl.item(), rel=1e-12)
    for n in names:
        want = tp[n].grad.numpy()
        assert np.abs(grads[n] - want).max() <= 1e-12 * np.abs(want).max() + 1e-300, n
    unused = np.setdiff1d(np.arange(cfg.n_vocab), ids)  # tokens never read: no wte gradient
    assert not grads["wte"][unused].any() and grads["lm_head"][unused].any()


# Per-tensor tolerance against torch in float32: max |ours - torch| <= 2e-5 * max |torch grad|
# (+1e-9 for all-but-zero tensors). Both sides sum float32 products over at most B*T = 32 rows
# and C = 128 columns; the round-off of such sums is ~sqrt(n) * 6e-8 ~ 1e-6 relative, so 2e-5 is
# 20x that (measured: 7e-7 at worst), while llm.c holds its own check to 1e-2.
GRAD_RTOL = 2e-5


def test_model_backward_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    cfg = GPT2Config(n_vocab=211, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
    params = tiny_params(cfg, seed=5)
    ids, targets = batch(cfg, 4, 8)
    loss, grads = loss_and_grads(params, ids, targets, cfg)
    names = param_names(params, "all")
    tp = {
        n: torch.tensor(np.array(a), requires_grad=True) for n, a in get_flat(params, names).items()
    }
    tl = torch_loss(tp, ids, targets, cfg)
    tl.backward()
    assert loss == pytest.approx(tl.item(), rel=1e-6)  # one float32 mean of ~30 terms
    for n in names:
        want = tp[n].grad.numpy()
        err = np.abs(grads[n] - want).max()
        assert err <= GRAD_RTOL * np.abs(want).max() + 1e-9, (n, err, np.abs(want).max())


def test_lora_backward_matches_torch_and_freezes_the_base():
    torch = pytest.importorskip("torch")
    cfg = GPT2Config(n_vocab=101, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
    base = tiny_params(cfg, seed=7)
    params = add_lora(
        base, ["c_attn", "mlp_c_proj"], rank=3, alpha=6.0, rng=np.random.default_rng(1)
    )
    # B starts at zero, which would make dA zero: give it values so both gradients are tested
    for block in params["blocks"]:
        for p in (block["attn"]["c_attn"], block["mlp"]["c_proj"]):
            p["lora"]["b"] = (
                np.random.default_rng(2).normal(0, 0.05, p["lora"]["b"].shape).astype(np.float32)
            )
    ids, targets = batch(cfg, 2, 8)
    loss, grads = loss_and_grads(params, ids, targets, cfg, train="lora")
    assert set(grads) == set(param_names(params, "lora"))
    assert all(n.endswith(("lora_a", "lora_b")) for n in grads)
    tp = {n: torch.tensor(np.array(a)) for n, a in get_flat(base, param_names(base, "all")).items()}
    lora_t = {}
    for i, block in enumerate(params["blocks"]):
        for pre, p in (
            (f"h{i}/attn/c_attn", block["attn"]["c_attn"]),
            (f"h{i}/mlp/c_proj", block["mlp"]["c_proj"]),
        ):
            lora_t[pre] = (
                torch.tensor(p["lora"]["a"], requires_grad=True),
                torch.tensor(p["lora"]["b"], requires_grad=True),
                p["lora"]["scale"],
            )
    tl = torch_loss(tp, ids, targets, cfg, lora_t)
    tl.backward()
    assert loss == pytest.approx(tl.item(), rel=1e-6)
    for pre, (a, b, _) in lora_t.items():
        for leaf, t in (("lora_a", a), ("lora_b", b)):
            want = t.grad.numpy()
            err = np.abs(grads[f"{pre}/{leaf}"] - want).max()
            assert err <= GRAD_RTOL * np.abs(want).max() + 1e-9, (pre, leaf, err)


def test_backward_takes_its_ops_from_the_backend():
    """model_backward calls the backend's *_backward, so a backend trains with its kernels."""
    calls: dict[str, int] = {}

    def counted(name):
        fn = getattr(ops, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)

        return wrapper

    names = [n for n in dir(ops) if n.endswith(("_forward", "_backward"))]
    backend = SimpleNamespace(**{n: counted(n) for n in names})
    params = tiny_params(TINY)
    ids, targets = batch(TINY, 2, 5)
    _, grads = loss_and_grads(params, ids, targets, TINY, ops=backend)
    _, want = loss_and_grads(params, ids, targets, TINY)
    L = TINY.n_layer
    assert calls["attention_backward"] == L
    assert calls["layernorm_backward"] == 2 * L + 1
    assert calls["linear_backward"] == 4 * L
    assert calls["bias_gelu_backward"] == L
    assert calls["embedding_backward"] == 1
    assert calls["crossentropy_backward"] == 1
    for n, g in want.items():
        np.testing.assert_array_equal(grads[n], g)


def test_model_backward_rejects_unknown_mode():
    params = tiny_params(TINY)
    logits, acts = model_forward(params, np.zeros((1, 3), np.int64), TINY)
    with pytest.raises(ValueError, match="train"):
        model_backward(logits, acts, params, TINY, train="some")


@pytest.mark.parametrize("backend", ["ref", "numba"])
def test_model_gradients_on_each_numpy_backend(backend):
    """`--backend numba` trains with its own kernels through the same model_backward.

    Tolerance: the numba kernels reorder float32 sums (and use fastmath); measured 5e-7 of each
    tensor's scale, held to 1e-5."""
    from fast import BackendUnavailable, get_backend

    if backend == "numba":
        pytest.importorskip("numba")
    try:
        ops_b = get_backend(backend)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    params = tiny_params(TINY, seed=3)
    ids, targets = batch(TINY, 2, 9)
    loss_b, grads_b = loss_and_grads(params, ids, targets, TINY, ops=ops_b)
    loss, grads = loss_and_grads(params, ids, targets, TINY)
    assert loss_b == pytest.approx(loss, rel=1e-6)
    for n, g in grads.items():
        np.testing.assert_allclose(grads_b[n], g, atol=1e-5 * np.abs(g).max() + 1e-12)
