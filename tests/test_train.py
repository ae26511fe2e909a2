"""AdamW against torch.optim.AdamW, the schedule and clipping, LoRA's properties, instruction
batches and their loss mask, overfitting a tiny data set, bit-identical resumption, and llm.c's
reference run on the real 124M weights."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from real_weights import SKIP_REASON, cached_124m
from tiny_model import TINY, tiny_params, torch_loss

from ref.config import GPT2Config
from ref.data import (
    EOT,
    IGNORE,
    Split,
    batch_indices,
    instruction_batch,
    instruction_splits,
    make_batch,
    text_splits,
    text_windows,
)
from ref.lora import (
    adapter_tensors,
    add_lora,
    merge_lora,
    parse_targets,
    set_adapter_tensors,
)
from ref.model import forward, loss_and_grads, loss_only
from ref.optim import (
    AdamWConfig,
    adamw_init,
    adamw_step,
    clip_by_global_norm,
    decay_mask,
    lr_at,
)
from ref.train import TrainConfig, TrainState, get_flat, param_names, train, with_flat


def fixed_batch(cfg: GPT2Config, B: int, T: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.n_vocab, (B, T + 1))
    return ids[:, :-1], ids[:, 1:].copy()


# ---------------------------------------------------------------------------------------------
# AdamW, schedule, clipping


# Ten steps, losses agree to 2e-5 relative. Each step's gradients agree to ~1e-6 relative
# (test_backward); Adam normalises by sqrt(v), so its update is insensitive to that round-off
# except where a gradient entry is near zero; the resulting parameter drift moves the
# loss by < 1e-6 per step here (measured 2e-7 after ten steps), 2e-5 leaves room for BLAS
# variations.
ADAM_LOSS_RTOL = 2e-5


def test_ten_adamw_steps_match_torch():
    torch = pytest.importorskip("torch")
    cfg = GPT2Config(n_vocab=127, n_ctx=16, n_embd=32, n_head=4, n_layer=2)
    params = tiny_params(cfg, seed=11)
    ids, targets = fixed_batch(cfg, 4, 12)
    acfg = AdamWConfig(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    names = param_names(params, "all")
    decay = decay_mask(names)  # biases, LayerNorm and embeddings do not decay

    flat = {n: np.array(a) for n, a in get_flat(params, names).items()}
    state = adamw_init(flat)
    ours = []
    for _ in range(10):
        loss, grads = loss_and_grads(with_flat(params, flat), ids, targets, cfg)
        ours.append(loss)
        flat, state = adamw_step(flat, grads, state, acfg, decay=decay)

    tp = {
        n: torch.tensor(np.array(a), requires_grad=True) for n, a in get_flat(params, names).items()
    }
    groups = [
        {"params": [tp[n] for n in names if decay[n]], "weight_decay": acfg.weight_decay},
        {"params": [tp[n] for n in names if not decay[n]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=acfg.lr, betas=(acfg.beta1, acfg.beta2), eps=acfg.eps)
    theirs = []
    for _ in range(10):
        opt.zero_grad()
        tl = torch_loss(tp, ids, targets, cfg)
        tl.backward()
        theirs.append(tl.item())
        opt.step()
    np.testing.assert_allclose(ours, theirs, rtol=ADAM_LOSS_RTOL)
    assert ours[-1] < 0.9 * ours[0]  # it did learn something


def test_decay_mask_selection():
    names = [
        "wte",
        "wpe",
        "ln_f/g",
        "h0/ln_1/b",
        "h0/attn/c_attn/w",
        "h0/attn/c_attn/b",
        "h0/mlp/c_fc/lora_a",
    ]
    assert [n for n, d in decay_mask(names).items() if d] == [
        "h0/attn/c_attn/w",
        "h0/mlp/c_fc/lora_a",
    ]
    assert decay_mask(names, "matrices+embeddings")["wte"]
    assert all(decay_mask(names, "all").values())
    with pytest.raises(ValueError, match="weight decay"):
        decay_mask(names, "biases")


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup reaches the peak
    assert lrs[4] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[-1] == pytest.approx(0.1)  # and ends at min_ratio * lr
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # non-increasing
    assert lrs[12] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 8 / 15)))
    assert {lr_at(s, 3e-4, 0, 10, 1.0) for s in range(10)} == {3e-4}  # ratio 1: constant


@given(scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.1, 10.0), seed=st.integers(0, 99))
def test_clip_by_global_norm_matches_torch(scale, max_norm, seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    grads = {
        f"g{i}": (rng.standard_normal(s) * scale).astype(np.float32)
        for i, s in enumerate([(3, 4), (5,), (2, 2, 2)])
    }
    ours, norm = clip_by_global_norm(grads, max_norm)
    ts = [torch.tensor(g) for g in grads.values()]
    for t in ts:
        t.grad = t.clone()
    tnorm = torch.nn.utils.clip_grad_norm_(ts, max_norm)
    # float64 sum here vs float32 in torch: the norms agree to float32 round-off
    assert norm == pytest.approx(float(tnorm), rel=1e-5)
    for g, t in zip(ours.values(), ts, strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-5, atol=1e-30)


def test_gradient_accumulation_equals_the_big_batch():
    """Two micro-batches of 2 windows average to the gradient of one batch of 4 (every target
    counts, so the mean over 4 rows is the mean of the two halves' means)."""
    params = tiny_params(TINY, seed=2)
    ids, targets = fixed_batch(TINY, 4, 9)
    _, big = loss_and_grads(params, ids, targets, TINY)
    _, g1 = loss_and_grads(params, ids[:2], targets[:2], TINY)
    _, g2 = loss_and_grads(params, ids[2:], targets[2:], TINY)
    for n, g in big.items():
        # float32 sums of the same terms in another order: 1e-5 of the tensor's scale
        np.testing.assert_allclose((g1[n] + g2[n]) * 0.5, g, atol=1e-5 * np.abs(g).max() + 1e-12)


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_starts_as_the_base_model_and_merges_exactly():
    params = tiny_params(TINY, seed=4)
    ids, _ = fixed_batch(TINY, 2, 10)
    base = forward(params, ids, TINY)
    lp = add_lora(
        params,
        parse_targets("c_attn,c_proj,c_fc,mlp_c_proj"),
        4,
        8.0,
        0.1,
        np.random.default_rng(0),
    )
    np.testing.assert_array_equal(forward(lp, ids, TINY), base)  # B = 0: exactly unchanged
    # give B values, then merged and unmerged adapters agree
    rng = np.random.default_rng(5)
    for n in param_names(lp, "lora"):
        if n.endswith("lora_b"):
            lp = with_flat(
                lp, {n: rng.normal(0, 0.1, get_flat(lp, [n])[n].shape).astype(np.float32)}
            )
    unmerged = forward(lp, ids, TINY)
    merged = forward(merge_lora(lp), ids, TINY)
    assert np.abs(unmerged - base).max() > 1e-3  # the adapters do change the model
    # float32: (x A) B vs x (A B) reassociate sums of C = 32..128 terms: 1e-5 of the logit scale
    np.testing.assert_allclose(merged, unmerged, atol=1e-5 * np.abs(unmerged).max())
    assert "lora" not in merge_lora(lp)["blocks"][0]["attn"]["c_attn"]
    # the base arrays are shared, never modified
    assert lp["blocks"][0]["attn"]["c_attn"]["w"] is params["blocks"][0]["attn"]["c_attn"]["w"]


def test_lora_at_full_rank_expresses_any_update():
    """With r = Cin, A = I and B = dW / scale give w + dW exactly: any update is reachable."""
    params = tiny_params(TINY, seed=6)
    C = TINY.n_embd
    lp = add_lora(params, ["c_attn", "c_fc"], rank=C, alpha=2.0 * C)
    rng = np.random.default_rng(7)
    target = copy.deepcopy(params)
    for block, tblock in zip(lp["blocks"], target["blocks"], strict=True):
        for mod, proj in (("attn", "c_attn"), ("mlp", "c_fc")):
            p = block[mod][proj]
            dw = rng.normal(0, 0.05, p["w"].shape).astype(np.float32)  # any update
            p["lora"]["a"] = np.eye(C, dtype=np.float32)
            p["lora"]["b"] = dw / np.float32(p["lora"]["scale"])
            tblock[mod][proj]["w"] = tblock[mod][proj]["w"] + dw
    ids, _ = fixed_batch(TINY, 2, 8)
    want = forward(target, ids, TINY)
    # x @ w + x @ dW vs x @ (w + dW): float32 reassociation, 1e-5 of the logit scale
    np.testing.assert_allclose(forward(lp, ids, TINY), want, atol=1e-5 * np.abs(want).max())


def test_lora_training_changes_only_the_adapters_and_saves_them_alone():
    params = tiny_params(TINY, seed=8)
    frozen = {n: np.array(a) for n, a in get_flat(params, param_names(params, "all")).items()}
    lp = add_lora(params, ["c_attn", "mlp_c_proj"], 2, 4.0, 0.1, np.random.default_rng(1))
    split = Split(
        "text", windows=text_windows(np.arange(200) % TINY.n_vocab, 16), context_length=16
    )
    tcfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, train="lora", n_samples=0)
    trained, state, losses = train(lp, TINY, split, None, tcfg)
    assert set(state.trainable) == set(adapter_tensors(lp))
    for n, a in get_flat(trained, list(frozen)).items():
        np.testing.assert_array_equal(a, frozen[n])  # the base model is untouched
    assert np.abs(adapter_tensors(trained)["h0/attn/c_attn/lora_b"]).max() > 0
    fresh = add_lora(params, ["c_attn", "mlp_c_proj"], 2, 4.0, 0.1, np.random.default_rng(9))
    set_adapter_tensors(fresh, adapter_tensors(trained))  # adapters alone restore the model
    ids, _ = fixed_batch(TINY, 1, 8)
    np.testing.assert_array_equal(forward(fresh, ids, TINY), forward(trained, ids, TINY))


def test_lora_target_names():
    assert parse_targets("c_attn, mlp_c_proj") == ["c_attn", "mlp_c_proj"]
    assert parse_targets("attn_c_proj,c_proj") == ["c_proj"]
    with pytest.raises(ValueError, match="--lora-targets.*'q_proj'"):
        parse_targets("c_attn,q_proj")


# ---------------------------------------------------------------------------------------------
# data


examples_st = st.lists(
    st.tuples(st.lists(st.integers(0, 50000), min_size=1, max_size=12), st.integers(0, 14)),
    min_size=1,
    max_size=5,
)


@given(examples=examples_st, T=st.integers(2, 20), mask_prompt=st.booleans())
def test_instruction_batch_ignores_exactly_the_intended_targets(examples, T, mask_prompt):
    examples = [(tok, min(n_prompt, len(tok))) for tok, n_prompt in examples]
    ids, targets = instruction_batch(examples, T, mask_prompt)
    # no column of padding alone (one was once added: compute for nothing)
    width = min(max(len(t) for t, _ in examples), T)
    assert ids.shape == targets.shape == (len(examples), width)
    for r, (tok, n_prompt) in enumerate(examples):
        n = len(tok)
        row = tok + [EOT] + [EOT] * (width + 1)  # the padded sequence: text, end token, pad
        np.testing.assert_array_equal(ids[r], row[:width])
        for j in range(width):
            ignored = j >= n or (mask_prompt and j < n_prompt - 1)
            # position j predicts row[j + 1]: the example's next token or its first end token
            assert targets[r, j] == (IGNORE if ignored else row[j + 1]), (r, j)
        if n <= width and not (mask_prompt and n_prompt - 1 > n - 1):
            assert targets[r, n - 1] == EOT  # the model learns to stop


def test_instruction_records_split_and_mask_the_prompt():
    from ref.data import read_instructions
    from weights.tokenizer import encode

    path = os.path.join(os.path.dirname(__file__), "..", "weights", "data", "instruction-data.json")
    records = read_instructions(path)
    assert len(records) == 1100
    train_s, val_s = instruction_splits(records[:40], encode, 1024, 0.1)
    assert (len(train_s), len(val_s)) == (36, 4)
    assert val_s.records[0] is records[36]  # in-order split, validation last
    tok, n_prompt = train_s.examples[2]
    assert encode(records[2]["output"]) == tok[n_prompt:]
    ids, targets = make_batch(train_s, [2], mask_prompt=True)
    assert (targets[0, : n_prompt - 1] == IGNORE).all()
    assert targets[0, n_prompt - 1] == tok[n_prompt]  # the first response token counts


def test_text_windows_and_split():
    ids = np.arange(101)
    w = text_windows(ids, 10)
    assert w.shape == (10, 11) and (w[:, 0] == np.arange(0, 100, 10)).all()
    np.testing.assert_array_equal(w[3], np.arange(30, 41))
    tr, va = text_splits(ids, 10, 0.2)
    assert tr.windows.max() < 81 and va.windows.min() >= 81  # validation = the last 20 tokens
    x, y = make_batch(tr, [0, 1])
    np.testing.assert_array_equal(y, x + 1)


def test_batch_order_is_a_function_of_seed_and_step():
    a = [batch_indices(10, 3, k, seed=1).tolist() for k in range(6)]
    assert a == [batch_indices(10, 3, k, seed=1).tolist() for k in range(6)]
    assert sorted(sum(a[:3], [])) == sorted(set(sum(a[:3], [])))  # no repeats within an epoch
    assert a != [batch_indices(10, 3, k, seed=2).tolist() for k in range(6)]


# ---------------------------------------------------------------------------------------------
# training


def test_overfits_a_tiny_data_set():
    """Four windows, 60 steps of full finetuning: the training loss must at least halve
    (measured: 4.17 -> 1.27)."""
    cfg = GPT2Config(n_vocab=64, n_ctx=32, n_embd=32, n_head=4, n_layer=2)
    params = tiny_params(cfg, seed=12)
    rng = np.random.default_rng(3)
    split = Split("text", windows=rng.integers(0, 64, (4, 17)), context_length=16)
    tcfg = TrainConfig(steps=60, batch_size=4, lr=3e-3, warmup=5, n_samples=0)
    _, _, losses = train(params, cfg, split, None, tcfg)
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])


def test_resuming_gives_bit_identical_losses():
    """Stop at step 3 (keeping its state), resume: steps 4..6 equal the uninterrupted run's,
    with LoRA dropout, gradient accumulation and a warmup + cosine schedule."""
    params = add_lora(
        tiny_params(TINY, seed=13), ["c_attn", "c_fc"], 2, 4.0, 0.2, np.random.default_rng(0)
    )
    split = Split(
        "text", windows=text_windows(np.arange(300) * 7 % TINY.n_vocab, 12), context_length=12
    )
    tcfg = TrainConfig(
        steps=6,
        batch_size=2,
        grad_accum=2,
        lr=1e-2,
        warmup=2,
        weight_decay=0.1,
        train="lora",
        n_samples=0,
    )
    saved: list[TrainState] = []
    _, _, full = train(
        params, TINY, split, None, tcfg, save=lambda p, s: saved.append(copy.deepcopy(s))
    )
    tcfg_save = TrainConfig(**{**tcfg.__dict__, "save_every": 3})
    saved.clear()
    train(params, TINY, split, None, tcfg_save, save=lambda p, s: saved.append(copy.deepcopy(s)))
    assert saved[0].step == 3
    _, _, resumed = train(params, TINY, split, None, tcfg, state=saved[0])
    assert resumed == full[3:]  # exact float equality


def test_validation_loss_counts_every_target_once():
    params = tiny_params(TINY, seed=14)
    ids, targets = fixed_batch(TINY, 3, 8)
    targets[1, 5:] = IGNORE
    loss, n = loss_only(params, ids, targets, TINY)
    assert n == 3 * 8 - 3
    logits = forward(params, ids, TINY).astype(np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    valid = targets != IGNORE
    want = lse - np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    assert loss == pytest.approx(want[valid].mean(), rel=1e-5)  # float32 logsumexp of V = 96


# ---------------------------------------------------------------------------------------------
# llm.c's reference run on the real weights


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# llm.c (train_gpt2.c / test_gpt2.c): the expected losses of ten AdamW steps on one batch.
LLMC_LOSSES = [
    5.270007,
    4.059707,
    3.375123,
    2.800783,
    2.315382,
    1.849029,
    1.394656,
    0.999147,
    0.624080,
    0.376511,
]


def llmc_shakespeare_tokens() -> list[int]:
    """llm.c's dev/data/tinyshakespeare.py: the text split on "\\n\\n", <|endoftext|> before
    each section, "\\n\\n" after all but the last, GPT-2 tokens."""
    from weights.tokenizer import encode

    # karpathy/char-rnn's input.txt, shipped under weights/data (sha256 in SOURCES.md there)
    with open(os.path.join(ROOT, "weights", "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        sections = f.read().split("\n\n")
    ids: list[int] = []
    for i, s in enumerate(sections):
        ids.append(EOT)
        ids += encode(s + ("\n\n" if i < len(sections) - 1 else ""))
    return ids


def test_llmc_tiny_shakespeare_tokens():
    """llm.c's script reports 32,768 validation and 305,260 training tokens."""
    ids = llmc_shakespeare_tokens()
    assert len(ids) == 32768 + 305260
    assert ids[:5] == [EOT, 5962, 22307, 25, 198]  # <|endoftext|>First Citizen:\n


@pytest.mark.real_weights
def test_llmc_reference_run_124m():
    path = cached_124m()
    if path is None:
        pytest.skip(SKIP_REASON)
    from weights.loader import load

    val = np.array(llmc_shakespeare_tokens()[:32768])  # the validation split
    B, T = 4, 64
    chunk = val[: B * T + 1]
    x, y = chunk[:-1].reshape(B, T), chunk[1:].reshape(B, T)
    cfg, params = load(path)
    names = param_names(params, "all")
    flat = {n: np.array(a) for n, a in get_flat(params, names).items()}
    state = adamw_init(flat)
    acfg = AdamWConfig(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    losses = []
    for _ in range(10):
        loss, grads = loss_and_grads(with_flat(params, flat), x, y, cfg)
        losses.append(loss)
        flat, state = adamw_step(flat, grads, state, acfg)  # decay on every parameter, as llm.c
    # llm.c's own test accepts 1e-2. The expected values are printed to 6 decimals (5e-7), and
    # float32 round-off compounding over ten Adam steps of 124M parameters is expected at the
    # 1e-5..1e-4 level; 5e-4 is 20x tighter than llm.c.
    np.testing.assert_allclose(losses, LLMC_LOSSES, atol=5e-4)
