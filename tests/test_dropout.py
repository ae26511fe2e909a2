"""Model dropout (embeddings, attention probabilities, residual branches; ref.model.Dropout):
its gradients, its masks, and that it changes nothing where it should not.

- Gradients with fixed masks against central finite differences in float64: the same seeded
  rng on every evaluation of the loss draws the same masks, so the loss is a smooth function
  of the inputs and test_backward's check applies (relative tolerance 1e-6; a wrong term is
  O(1)). Ops: its step 1e-5 (truncation ~1e-10, round-off ~1e-11). The whole model: a
  random direction over every tensor meets the inverted dropout's 1 / (1 - p) scales several
  times over, and the truncation error at step 1e-5 was measured at 1.06e-6 relative (1.06e-4
  at 1e-4, 1e-8 at 1e-6: it is h^2, not the gradient), so the model checks take h = 1e-6:
  truncation ~1e-8, round-off ~1e-16 |L| / h ~ 1e-9.
- Against torch autograd in float32 with the spec's own masks (taken from its caches): an
  independent torch GPT-2 written from the equations (as tests/tiny_model.py's), held to
  test_backward's GRAD_RTOL = 2e-5 of each tensor's largest gradient (sums of <= 32 rows and
  128 columns of float32 products: ~1e-6 relative round-off; measured 4.3e-7), losses to
  1e-6 relative.
- The torch GPT-2 (fast/torch/model.py) draws the spec's masks, draw for draw: the spec is
  given an rng that hands out the torch generator's uniforms (`TorchUniforms`), so both drop
  the same entries if and only if they draw in the same order with the same shapes. Losses to
  1e-6 relative, gradients to GRAD_RTOL of scale (measured: 5.8e-7 on the torch backend,
  7.5e-7 on triton in its interpreter, whose kernels reorder float32 sums).
- Rates of 0 are bit for bit no dropout (spec, numba, torch; the trainers too), and draw
  nothing: a LoRA-dropout run draws the same LoRA masks as before. Evaluation (no rng or
  generator) never drops, whatever the rates.
- Training with dropout: the loss falls, a run repeats bit for bit per seed (ref, numba,
  torch, triton) and differs from a run without; numba equals ref (the same masks, from the
  same numpy generator) within test_numba_model's LOSS_RTOL = 1e-6; triton equals torch (the
  same torch generator) within 2e-6, as test_torch_backend's compare_trainers.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_backward import RTOL_FD, batch, check_fd
from tiny_model import TINY, tiny_params

from ref import ops
from ref.config import GPT2Config
from ref.data import Split, text_windows
from ref.lora import add_lora
from ref.model import Dropout, Model, forward, loss_and_grads, loss_only, model_forward
from ref.train import (
    TrainConfig,
    get_flat,
    param_names,
    samples,
    train,
    validate,
    with_flat,
)

MODEL_H = 1e-6  # finite-difference step for the whole model: see the module docstring
GRAD_RTOL = 2e-5  # of max |grad| per tensor, float32 against torch: see the module docstring
ALL = Dropout(0.1, 0.2, 0.3)  # distinct rates, so a rate applied in the wrong place shows


def close_to_scale(got, want, rtol: float, what: str) -> None:
    err = float(np.abs(got - want).max(initial=0.0))
    scale = float(np.abs(want).max(initial=0.0))
    assert err <= rtol * scale + 1e-9, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def text_split(cfg: GPT2Config, n: int = 300, T: int = 12, seed: int = 0) -> Split:
    tokens = np.random.default_rng(seed).integers(0, cfg.n_vocab, n)
    return Split("text", windows=text_windows(tokens, T), context_length=T)


def state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


# ---------------------------------------------------------------------------------------------
# the op


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    p=st.sampled_from([0.0, 0.2, 0.5, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_dropout_backward_fd(shape, p, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    R = rng.standard_normal(shape)
    out, cache = ops.dropout_forward(x, p, np.random.default_rng(seed))
    kept = out != 0
    np.testing.assert_array_equal(out[kept], x[kept] * (1.0 / (1.0 - p)))  # inverted scaling
    f = lambda a: (R * ops.dropout_forward(a, p, np.random.default_rng(seed))[0]).sum()
    check_fd(f, [x], [ops.dropout_backward(R, cache)], rng)


def test_dropout_is_the_identity_without_rng_or_rate():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    rng = np.random.default_rng(0)
    before = state(rng)
    for p, r in ((0.0, rng), (0.5, None)):
        out, cache = ops.dropout_forward(x, p, r)
        assert out is x and cache is None
        assert ops.dropout_backward(x, cache) is x
    assert state(rng) == before  # nothing drawn
    for bad in (1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            ops.dropout_forward(x, bad, rng)
        with pytest.raises(ValueError, match="resid dropout"):
            Dropout(resid=bad)
        with pytest.raises(ValueError, match="attn dropout"):
            TrainConfig(steps=1, dropout=(0.0, bad, 0.0))


def test_dropout_masks_keep_one_minus_p_and_ignore_the_dtype():
    """The mask keeps each entry with probability 1 - p (1e5 entries: the kept fraction's
    standard deviation is sqrt(p (1 - p) / 1e5) ~ 1.4e-3; 0.01 is 7 of them) and depends on
    the rng alone: float32 and float64 inputs drop the same entries."""
    x = np.ones((1000, 100), np.float32)
    out32, _ = ops.dropout_forward(x, 0.3, np.random.default_rng(1))
    out64, _ = ops.dropout_forward(x.astype(np.float64), 0.3, np.random.default_rng(1))
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    np.testing.assert_array_equal(out32 != 0, out64 != 0)
    assert abs((out32 != 0).mean() - 0.7) < 0.01
    assert abs(out64.mean() - 1.0) < 0.02  # E[out] = x: the same 7 deviations, / 0.7


@given(
    B=st.integers(1, 3),
    NH=st.integers(1, 3),
    Tq=st.integers(1, 6),
    extra=st.integers(0, 3),
    hs=st.integers(1, 8),
    masked=st.booleans(),
    p=st.sampled_from([0.3, 0.6]),
    seed=st.integers(0, 2**16),
)
def test_attention_dropout_backward_fd(B, NH, Tq, extra, hs, masked, p, seed):
    """Dropout on the attention probabilities, with cached keys (Tk > Tq) and padding."""
    rng = np.random.default_rng(seed)
    Tk = Tq + extra
    q = rng.standard_normal((B, NH, Tq, hs))
    k, v = rng.standard_normal((2, B, NH, Tk, hs))
    key_mask = rng.random((B, Tk)) < 0.7 if masked else None
    R = rng.standard_normal((B, NH, Tq, hs))
    drop = lambda: np.random.default_rng(seed + 1)  # the same mask on every call
    _, cache = ops.attention_forward(q, k, v, key_mask, p, drop())
    grads = ops.attention_backward(R, cache)
    f = lambda *a: (R * ops.attention_forward(*a, key_mask, p, drop())[0]).sum()
    check_fd(f, [q, k, v], list(grads), rng)


def test_attention_dropout_zero_or_no_rng_is_bit_identical():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 2, 2, 5, 4)).astype(np.float32)
    km = np.array([[True] * 5, [False, True, True, False, True]])
    dout = rng.standard_normal(q.shape).astype(np.float32)
    want, cache = ops.attention_forward(q, k, v, km)
    want_g = ops.attention_backward(dout, cache)
    r = np.random.default_rng(3)
    before = state(r)
    for p, gen in ((0.0, r), (0.5, None)):
        out, cache = ops.attention_forward(q, k, v, km, p, gen)
        assert out.tobytes() == want.tobytes()
        for a, b in zip(ops.attention_backward(dout, cache), want_g, strict=True):
            assert a.tobytes() == b.tobytes()
    assert state(r) == before
    out, _ = ops.attention_forward(q, k, v, km, 0.5, r)
    assert not np.array_equal(out, want)


# ---------------------------------------------------------------------------------------------
# the whole model in float64 against finite differences


def model_fd(params, names, ids, targets, cfg, seed, dropout, train="all"):
    """Finite differences of the loss along the tensors `names`, the masks fixed by `seed`."""
    loss, grads = loss_and_grads(
        params, ids, targets, cfg, train=train, rng=np.random.default_rng(seed), dropout=dropout
    )
    assert set(grads) == set(names)

    def f(*arrays):
        p = with_flat(params, dict(zip(names, arrays, strict=True)))
        logits = forward(p, ids, cfg, rng=np.random.default_rng(seed), dropout=dropout)
        return float(ops.crossentropy_forward(logits.reshape(-1, cfg.n_vocab), targets.ravel())[0])

    flat = get_flat(params, names)
    rng = np.random.default_rng(0)
    for _ in range(2):  # check_fd's random directional derivatives, with the step h = 1e-6
        us = [rng.standard_normal(flat[n].shape) for n in names]
        plus = f(*[flat[n] + MODEL_H * u for n, u in zip(names, us, strict=True)])
        minus = f(*[flat[n] - MODEL_H * u for n, u in zip(names, us, strict=True)])
        fd = (plus - minus) / (2 * MODEL_H)
        an = sum(float((grads[n] * u).sum()) for n, u in zip(names, us, strict=True))
        assert abs(fd - an) <= RTOL_FD * max(abs(fd), abs(an), 1e-3), (fd, an)
    return loss


def test_model_with_all_three_dropouts_fd_float64():
    params = tiny_params(TINY, seed=3, dtype=np.float64)
    ids, targets = batch(TINY, 2, 7)
    loss = model_fd(params, param_names(params, "all"), ids, targets, TINY, 5, ALL)
    plain, _ = loss_and_grads(params, ids, targets, TINY)
    assert abs(loss - plain) > 1e-4  # the masks did drop something


def test_lora_and_model_dropout_fd_float64():
    """LoRA's dropout and the model's interleave in one rng; the adapters' gradients hold."""
    base = tiny_params(TINY, seed=4, dtype=np.float64)
    params = add_lora(base, ["c_attn", "c_proj", "c_fc", "mlp_c_proj"], 2, 4.0, 0.25)
    rng = np.random.default_rng(6)
    for block in params["blocks"]:
        for p in (*block["attn"].values(), *block["mlp"].values()):
            p["lora"]["a"] = p["lora"]["a"].astype(np.float64)
            p["lora"]["b"] = rng.normal(0, 0.05, p["lora"]["b"].shape)  # B != 0: dA != 0
    ids, targets = batch(TINY, 2, 6)
    model_fd(params, param_names(params, "lora"), ids, targets, TINY, 7, ALL, train="lora")


# ---------------------------------------------------------------------------------------------
# against torch with the spec's masks


def spec_masks(acts) -> dict:
    """The masks the spec drew, from model_forward's caches (layout of ref/model.py and
    ref/ops.py's attention cache (q, k, v, att, mask))."""
    _, embd, blocks, _, _ = acts
    out = {"embd": embd, "attn": [], "resid_attn": [], "resid_mlp": []}
    for _, attn, _, mlp in blocks:
        out["attn"].append(attn[1][4])
        out["resid_attn"].append(attn[3])
        out["resid_mlp"].append(mlp[3])
    return out


def documented_masks(seed: int, d: Dropout, B: int, T: int, cfg: GPT2Config) -> dict:
    """The masks ref/model.py's docstring says it draws, in its order, without LoRA:
    embd (B, T, C), then per layer attn (B, NH, T, T), resid (B, T, C), resid (B, T, C)."""
    rng = np.random.default_rng(seed)

    def draw(shape, p):
        keep = (rng.random(shape, dtype=np.float32) >= p).astype(np.float32)
        return keep * np.float32(1.0 / (1.0 - p))

    C, NH = cfg.n_embd, cfg.n_head
    out = {"embd": draw((B, T, C), d.embd), "attn": [], "resid_attn": [], "resid_mlp": []}
    for _ in range(cfg.n_layer):
        out["attn"].append(draw((B, NH, T, T), d.attn))
        out["resid_attn"].append(draw((B, T, C), d.resid))
        out["resid_mlp"].append(draw((B, T, C), d.resid))
    return out


def torch_loss_dropout(tp: dict, ids, targets, cfg: GPT2Config, masks: dict):
    """tests/tiny_model.py's torch GPT-2 with dropout where GPT-2 has it, the masks given
    (0 or 1 / (1 - p)): on the embeddings, the attention probabilities and both branches."""
    import math

    import torch
    import torch.nn.functional as F

    B, T = ids.shape
    C, NH = cfg.n_embd, cfg.n_head
    ids_t = torch.as_tensor(ids)
    M = torch.as_tensor

    def lin(x, pre):
        return x @ tp[pre + "/w"] + tp[pre + "/b"]

    x = (tp["wte"][ids_t] + tp["wpe"][:T]) * M(masks["embd"])
    for i in range(cfg.n_layer):
        h = F.layer_norm(x, (C,), tp[f"h{i}/ln_1/g"], tp[f"h{i}/ln_1/b"], cfg.eps)
        q, k, v = lin(h, f"h{i}/attn/c_attn").split(C, dim=-1)
        q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // NH)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        att = att.softmax(-1) * M(masks["attn"][i])
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, f"h{i}/attn/c_proj") * M(masks["resid_attn"][i])
        h = F.layer_norm(x, (C,), tp[f"h{i}/ln_2/g"], tp[f"h{i}/ln_2/b"], cfg.eps)
        m = lin(F.gelu(lin(h, f"h{i}/mlp/c_fc"), approximate="tanh"), f"h{i}/mlp/c_proj")
        x = x + m * M(masks["resid_mlp"][i])
    x = F.layer_norm(x, (C,), tp["ln_f/g"], tp["ln_f/b"], cfg.eps)
    logits = x @ tp["wte"].T
    return F.cross_entropy(logits.view(B * T, -1), torch.as_tensor(targets).view(-1))


def test_model_dropout_matches_torch_autograd_with_the_same_masks():
    torch = pytest.importorskip("torch")
    cfg = GPT2Config(n_vocab=211, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
    params = tiny_params(cfg, seed=5)
    ids, targets = batch(cfg, 4, 8)
    _, acts = model_forward(params, ids, cfg, rng=np.random.default_rng(8), dropout=ALL)
    masks = spec_masks(acts)
    documented = documented_masks(8, ALL, 4, 8, cfg)  # the draw order is the documented one
    assert masks["embd"].tobytes() == documented["embd"].tobytes()
    for key in ("attn", "resid_attn", "resid_mlp"):
        for i, (got, want) in enumerate(zip(masks[key], documented[key], strict=True)):
            assert got.tobytes() == want.tobytes(), (key, i)
    rng = np.random.default_rng(8)
    loss, grads = loss_and_grads(params, ids, targets, cfg, rng=rng, dropout=ALL)
    names = param_names(params, "all")
    tp = {
        n: torch.tensor(np.array(a), requires_grad=True) for n, a in get_flat(params, names).items()
    }
    tl = torch_loss_dropout(tp, ids, targets, cfg, masks)
    tl.backward()
    assert loss == pytest.approx(tl.item(), rel=1e-6)
    for n in names:
        close_to_scale(grads[n], tp[n].grad.numpy(), GRAD_RTOL, n)


# ---------------------------------------------------------------------------------------------
# the torch GPT-2 draws the spec's masks


class TorchUniforms:
    """A stand-in for the spec's numpy Generator that hands out a torch generator's uniforms:
    `random(shape, dtype=float32)` is `torch.rand(shape, generator=gen)`. The torch model
    given a generator seeded alike then drops what the spec drops, if both draw alike."""

    def __init__(self, seed: int):
        import torch

        self.torch = torch
        self.gen = torch.Generator().manual_seed(seed)

    def random(self, shape, dtype=np.float32):
        assert dtype == np.float32
        return self.torch.rand(tuple(shape), generator=self.gen).numpy()


def lora_params(cfg: GPT2Config, seed: int, p: float) -> dict:
    """Adapters on c_attn and mlp/c_proj with dropout p and B != 0 (so they change the loss)."""
    params = add_lora(tiny_params(cfg, seed=seed), ["c_attn", "mlp_c_proj"], 2, 4.0, p)
    rng = np.random.default_rng(seed)
    for block in params["blocks"]:
        for proj in (block["attn"]["c_attn"], block["mlp"]["c_proj"]):
            proj["lora"]["b"] = rng.normal(0, 0.05, proj["lora"]["b"].shape).astype(np.float32)
    return params


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_model_draws_the_spec_masks(backend):
    torch = pytest.importorskip("torch")
    from fast import BackendUnavailable, get_backend
    from fast.torch.model import gpt2_loss, to_torch

    try:
        tops = get_backend(backend)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    params = lora_params(TINY, 6, 0.3)  # LoRA's masks interleave with the model's
    ids, targets = batch(TINY, 2, 7)
    loss, grads = loss_and_grads(params, ids, targets, TINY, rng=TorchUniforms(9), dropout=ALL)
    names = param_names(params, "all")
    tparams = to_torch(params, "cpu")
    for t in get_flat(tparams, names).values():
        t.requires_grad_(True)
    gen = torch.Generator().manual_seed(9)
    tl = gpt2_loss(tparams, torch.as_tensor(ids), torch.as_tensor(targets), TINY, tops, gen=gen,
                   dropout=ALL)  # fmt: skip
    tl.backward()
    assert loss == pytest.approx(tl.item(), rel=1e-6)
    for n, t in get_flat(tparams, names).items():
        close_to_scale(grads[n], t.grad.numpy(), GRAD_RTOL, n)
    plain, _ = loss_and_grads(params, ids, targets, TINY)
    assert abs(loss - plain) > 1e-4


def test_torch_attention_dropout_equals_the_spec_with_its_mask():
    """The torch backend's attention with dropout (the differentiable one and the contract
    pair) against ref.ops with the same uniforms; the triton backend's falls back to it."""
    torch = pytest.importorskip("torch")
    from fast.torch import backend as pb

    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 3, 6, 5)).astype(np.float32)
    km = np.array([[True] * 6, [False] * 3 + [True] * 3])  # row 1: queries that see no key
    dout = rng.standard_normal(q.shape).astype(np.float32)
    want, cache = ops.attention_forward(q, k, v, km, 0.4, TorchUniforms(3))
    want_g = ops.attention_backward(dout, cache)
    leaves = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    out = pb.attention(*leaves, torch.as_tensor(km), 0.4, torch.Generator().manual_seed(3))
    out.backward(torch.as_tensor(dout))
    # float32 sums of <= 6 terms of order 1: within 1e-6
    np.testing.assert_allclose(out.detach().numpy(), want, atol=1e-6)
    for t, g in zip(leaves, want_g, strict=True):
        assert torch.isfinite(t.grad).all()
        np.testing.assert_allclose(t.grad.numpy(), g, atol=1e-5)
    T = torch.as_tensor
    out2, tcache = pb.attention_forward(T(q), T(k), T(v), T(km), 0.4,
                                        torch.Generator().manual_seed(3))  # fmt: skip
    np.testing.assert_allclose(out2.numpy(), want, atol=1e-6)
    for a, g in zip(pb.attention_backward(T(dout), tcache), want_g, strict=True):
        np.testing.assert_allclose(a.numpy(), g, atol=1e-5)
    tb = pytest.importorskip("fast.triton.backend")
    got = tb.attention(T(q), T(k), T(v), T(km), 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(got, out.detach())  # the same torch path
    with pytest.raises(ValueError, match="no dropout"):
        tb.attention_forward(T(q), T(k), T(v), T(km), 0.4, torch.Generator())


# ---------------------------------------------------------------------------------------------
# rates of 0 and evaluation change nothing


@pytest.mark.parametrize("backend", ["ref", "numba"])
def test_zero_rates_are_bit_identical_and_draw_nothing(backend):
    """With LoRA dropout on, Dropout(0, 0, 0) gives today's losses, gradients and LoRA masks
    (the rng ends in the same state), and a model without adapters draws nothing at all."""
    from fast import get_backend

    if backend == "numba":
        pytest.importorskip("numba")
    be = get_backend(backend)
    params = lora_params(TINY, 7, 0.3)
    ids, targets = batch(TINY, 2, 9)
    runs = []
    for kw in ({}, {"dropout": Dropout()}, {"dropout": Dropout(0.0, 0.0, 0.0)}):
        rng = np.random.default_rng(11)
        loss, grads = loss_and_grads(params, ids, targets, TINY, ops=be, train="lora", rng=rng,
                                     **kw)  # fmt: skip
        runs.append((loss, grads, state(rng)))
    for loss, grads, st_ in runs[1:]:
        assert loss == runs[0][0] and st_ == runs[0][2]
        for n, g in runs[0][1].items():
            assert grads[n].tobytes() == g.tobytes(), n
    plain = tiny_params(TINY, seed=7)
    rng = np.random.default_rng(11)
    before = state(rng)
    loss, grads = loss_and_grads(plain, ids, targets, TINY, ops=be, rng=rng, dropout=Dropout())
    want_loss, want = loss_and_grads(plain, ids, targets, TINY, ops=be)
    assert state(rng) == before and loss == want_loss
    for n, g in want.items():
        assert grads[n].tobytes() == g.tobytes(), n


def test_numba_attention_with_dropout_is_the_references():
    nb = pytest.importorskip("fast.numba.backend", reason="numba is not installed")
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 2, 2, 6, 4)).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    want, rcache = ops.attention_forward(q, k, v, None, 0.3, np.random.default_rng(1))
    got, cache = nb.attention_forward(q, k, v, None, 0.3, np.random.default_rng(1))
    assert cache[0] is ops and got.tobytes() == want.tobytes()
    for a, b in zip(nb.attention_backward(dout, cache), ops.attention_backward(dout, rcache),
                    strict=True):  # fmt: skip
        assert a.tobytes() == b.tobytes()
    _, cache = nb.attention_forward(q, k, v, None, 0.0, np.random.default_rng(1))
    assert cache[0] is not ops  # no dropout: the kernels


def test_torch_zero_rates_are_bit_identical_and_draw_nothing():
    torch = pytest.importorskip("torch")
    from fast.torch import backend as pb
    from fast.torch.model import gpt2_loss, to_torch

    params = lora_params(TINY, 8, 0.3)
    ids, targets = (torch.as_tensor(a) for a in batch(TINY, 2, 9))
    runs = []
    for kw in ({}, {"dropout": Dropout()}):
        tparams = to_torch(params, "cpu")
        leaves = list(get_flat(tparams, param_names(params, "lora")).values())
        for t in leaves:
            t.requires_grad_(True)
        gen = torch.Generator().manual_seed(4)
        loss = gpt2_loss(tparams, ids, targets, TINY, pb, gen=gen, **kw)
        loss.backward()
        runs.append((loss.detach(), [t.grad for t in leaves], gen.get_state()))
    (l0, g0, s0), (l1, g1, s1) = runs
    assert torch.equal(l0, l1) and torch.equal(s0, s1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_evaluation_never_drops():
    """Without an rng (or generator) the rates do nothing: forward, model_forward,
    loss_and_grads, the torch model; bit for bit."""
    params = tiny_params(TINY, seed=9)
    ids, targets = batch(TINY, 2, 8)
    big = Dropout(0.5, 0.5, 0.5)
    want = forward(params, ids, TINY)
    assert forward(params, ids, TINY, dropout=big).tobytes() == want.tobytes()
    logits, _ = model_forward(params, ids, TINY, dropout=big)
    assert logits.tobytes() == want.tobytes()
    loss, _ = loss_and_grads(params, ids, targets, TINY, dropout=big)
    assert loss == loss_and_grads(params, ids, targets, TINY)[0]
    torch = pytest.importorskip("torch")
    from fast.torch import backend as pb
    from fast.torch.model import gpt2_forward, to_torch

    tparams = to_torch(params, "cpu")
    t = torch.as_tensor(ids)
    assert torch.equal(gpt2_forward(tparams, t, TINY, pb, dropout=big),
                       gpt2_forward(tparams, t, TINY, pb))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the trainers


def tcfg_for(**kw) -> TrainConfig:
    base = dict(steps=3, batch_size=2, lr=1e-2, seed=2, n_samples=0, eps=1e-4)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("backend", ["ref", "numba", "torch"])
def test_trainer_with_zero_rates_is_todays_run(backend, monkeypatch):
    """TrainConfig.dropout = (0, 0, 0) with LoRA dropout: the losses of the trainer as it was,
    which passed no model dropout at all (the loss functions patched to drop the argument)."""
    params = lora_params(TINY, 10, 0.3)
    split = text_split(TINY, seed=10)
    tcfg = tcfg_for(train="lora", dropout=(0.0, 0.0, 0.0))
    if backend == "torch":
        pytest.importorskip("torch")
        import fast.torch.train as trainer

        run = partial(trainer.train, backend="torch")
        name, original = "gpt2_loss", trainer.gpt2_loss
    else:
        import ref.train as trainer
        from fast import get_backend

        if backend == "numba":
            pytest.importorskip("numba")
        run = partial(trainer.train, ops=get_backend(backend))
        name, original = "loss_and_grads", trainer.loss_and_grads
    _, _, got = run(params, TINY, split, None, tcfg)

    def today(*a, dropout=None, **kw):
        assert dropout in (None, Dropout())
        return original(*a, **kw)

    monkeypatch.setattr(trainer, name, today)
    _, _, want = run(params, TINY, split, None, tcfg)
    assert got == want


def test_dropout_trains_and_resumes_bit_for_bit():
    """Full finetuning with all three dropouts: the loss at least halves (test_train's
    overfitting run; measured 4.17 -> 1.75 in 60 steps, 1.27 without dropout), and a run
    resumed at step 3 repeats the uninterrupted one exactly (the masks follow (seed,
    micro-step))."""
    cfg = GPT2Config(n_vocab=64, n_ctx=32, n_embd=32, n_head=4, n_layer=2)
    params = tiny_params(cfg, seed=12)
    windows = np.random.default_rng(3).integers(0, 64, (4, 17))
    split = Split("text", windows=windows, context_length=16)
    tcfg = TrainConfig(steps=60, batch_size=4, lr=3e-3, warmup=5, n_samples=0, dropout=(0.1,) * 3)
    _, _, losses = train(params, cfg, split, None, tcfg)
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    short = TrainConfig(**{**tcfg.__dict__, "steps": 6, "grad_accum": 2, "save_every": 3})
    saved = []
    _, _, full = train(params, cfg, split, None, short, save=lambda p, s: saved.append(s))
    _, _, resumed = train(params, cfg, split, None, short, state=saved[0])
    assert saved[0].step == 3 and resumed == full[3:]


def backend_trainer(backend: str):
    """train(params, cfg, split, val, tcfg, **kw) of `backend`, or a skip."""
    if backend in ("ref", "numba"):
        from fast import get_backend

        if backend == "numba":
            pytest.importorskip("numba")
        return partial(train, ops=get_backend(backend))
    pytest.importorskip("torch")
    from fast import BackendUnavailable, get_backend
    from fast.torch.train import train as torch_train

    try:
        get_backend(backend)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    return partial(torch_train, backend=backend)


@pytest.mark.parametrize("backend", ["ref", "numba", "torch", "triton"])
def test_dropout_repeats_per_seed_and_differs_from_none(backend):
    """Each trainer with dropout: the same seed repeats bit for bit, a run without dropout (or
    with another seed) differs, from step 1. Small for triton's interpreter."""
    run = backend_trainer(backend)
    split = text_split(TINY, n=120, T=8, seed=11)
    params = tiny_params(TINY, seed=11)
    steps = 2 if backend == "triton" else 3
    drop = tcfg_for(steps=steps, dropout=(0.1, 0.2, 0.3))
    first = run(params, TINY, split, None, drop)[2]
    assert run(params, TINY, split, None, drop)[2] == first
    assert all(np.isfinite(first))
    if backend != "triton":  # triton: its match with torch below covers the rest
        none = run(params, TINY, split, None, tcfg_for(steps=steps))[2]
        assert none[0] != first[0]
        other = TrainConfig(**{**drop.__dict__, "seed": 5})
        assert run(params, TINY, split, None, other)[2] != first
    reference = {"numba": "ref", "triton": "torch"}.get(backend)
    if reference is not None:
        # the same generator draws the same masks: numba = ref within 1e-6 (LOSS_RTOL of
        # test_numba_model), triton = torch within 2e-6 (compare_trainers)
        want = backend_trainer(reference)(params, TINY, split, None, drop)[2]
        np.testing.assert_allclose(first, want, rtol=1e-6 if backend == "numba" else 2e-6)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_validation_and_samples_never_drop(backend):
    """A run with dropout validates and samples the model as evaluation does: its last val
    loss and samples equal those computed afresh, without dropout, from its final params."""
    run = backend_trainer(backend)
    split = text_split(TINY, n=200, T=8, seed=12)
    val = text_split(TINY, n=60, T=8, seed=13)
    tcfg = tcfg_for(steps=2, dropout=(0.3, 0.3, 0.3), n_samples=1, sample_tokens=3)
    events = []
    final, _, _ = run(tiny_params(TINY, seed=12), TINY, split, val, tcfg, on_event=events.append)
    (got,) = [e["val_loss"] for e in events if e["event"] == "val"]
    if backend == "ref":
        model = Model(TINY, final)
        want = validate(partial(loss_only, final, cfg=TINY), val, tcfg)[0]
    else:
        import torch

        from fast.torch import backend as pb
        from fast.torch.model import TorchModel, gpt2_loss, to_torch

        model = TorchModel(TINY, final, "torch", "cpu")
        tparams = to_torch(final, "cpu")

        def batch_loss(ids, tgt):
            with torch.no_grad():
                loss = gpt2_loss(tparams, torch.as_tensor(ids), torch.as_tensor(tgt), TINY, pb)
            return float(loss), int((tgt != -100).sum())

        want = validate(batch_loss, val, tcfg)[0]
    assert got == want
    want_samples = [{"prompt": p, "response": r} for p, r in samples(model, val, tcfg)]
    got_samples = [
        {"prompt": e["prompt"], "response": e["response"]} for e in events if e["event"] == "sample"
    ]
    assert got_samples == want_samples and got_samples
