"""The finetuning loop: micro-batches, gradient accumulation, clipping, AdamW, validation.

Shape legend: B = batch, T = time, V = n_vocab.

One optimizer step averages the gradients of `grad_accum` micro-batches (each the mean loss of
its own targets), clips them by global norm, and takes an AdamW step at the schedule's learning
rate. Everything that varies between steps is a function of (seed, step): the batches
(`ref.data.batch_indices`) and the dropout masks (LoRA's and the model's, `TrainConfig.dropout`,
all from one generator seeded by (seed, 1, micro-step)); so a run resumed from a checkpoint of
step s, with its parameters and AdamW moments, computes exactly the losses the uninterrupted
run would have.

Trainable parameters are a flat dict {canonical name: array}: every tensor of the layout for
full finetuning (train="all"), the adapters alone with LoRA (train="lora").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from ref import ops as ref_ops
from ref.config import GPT2Config
from ref.data import EOT, Split, batch_indices, eval_batches, make_batch
from ref.generate import generate
from ref.lora import copy_params, has_dropout
from ref.model import Dropout, Model, loss_and_grads, loss_only
from ref.optim import AdamWConfig, adamw_init, adamw_step, clip_by_global_norm, decay_mask, lr_at


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimizer steps in the whole run
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr; 1.0 keeps lr constant
    weight_decay: float = 0.0
    decay: str = "matrices"  # which tensors decay: see ref.optim.decay_mask
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global norm; 0 disables
    eval_every: int = 0  # validate every N steps (and at the end); 0: only at the end
    eval_batches: int | None = None  # cap on validation batches per evaluation
    save_every: int = 0  # checkpoint every N steps (and at the end); 0: only at the end
    seed: int = 0
    mask_prompt: bool = False  # instruction data: ignore the prompt's targets in the loss
    train: str = "all"  # "all" | "lora"
    n_samples: int = 3  # responses generated from validation prompts at the end
    sample_tokens: int = 40
    sample_at_eval: bool = False  # also at every validation (pretraining, as the book does)
    # model dropout while training, (embd, attn, resid): see ref.model.Dropout; validation and
    # samples never drop
    dropout: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        Dropout(*self.dropout)  # three rates, each in [0, 1), or a ValueError that names it


# ---------------------------------------------------------------------------------------------
# flat names <-> nested params


def _node(params: dict, name: str) -> tuple[dict, str]:
    """The dict that holds parameter `name` and its key there."""
    parts = name.split("/")
    node = params
    if parts[0].startswith("h") and parts[0][1:].isdigit():
        node = params["blocks"][int(parts[0][1:])]
        parts = parts[1:]
    for p in parts[:-1]:
        node = node[p]
    leaf = parts[-1]
    if leaf in ("lora_a", "lora_b"):
        return node["lora"], leaf[-1]
    return node, leaf


# A block's projections in the layout's order, each with the LayerNorm that comes before it.
_BLOCK = (
    ("ln_1", "attn", "c_attn"),
    (None, "attn", "c_proj"),
    ("ln_2", "mlp", "c_fc"),
    (None, "mlp", "c_proj"),
)


def param_names(params: dict, train: str) -> list[str]:
    """The flat names of the trainable tensors, in the layout's order."""
    names = ["wte", "wpe", "ln_f/g", "ln_f/b"] if train == "all" else []
    if train == "all" and "lm_head" in params:  # an untied head
        names.append("lm_head")
    for i, block in enumerate(params["blocks"]):
        for ln, mod, proj in _BLOCK:
            pre = f"h{i}/{mod}/{proj}"
            if train == "all":
                names += [f"h{i}/{ln}/g", f"h{i}/{ln}/b"] if ln else []
                names += [pre + "/w", pre + "/b"]
            elif "lora" in block[mod][proj]:
                names += [pre + "/lora_a", pre + "/lora_b"]
    return names


def get_flat(params: dict, names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        node, key = _node(params, n)
        out[n] = node[key]
    return out


def with_flat(params: dict, flat: dict[str, np.ndarray]) -> dict:
    """A copy of params (sharing untouched arrays) with the tensors of `flat` replaced."""
    out = copy_params(params)
    for n, a in flat.items():
        node, key = _node(out, n)
        node[key] = a
    return out


# ---------------------------------------------------------------------------------------------
# evaluation and samples


def validate(
    batch_loss: Callable[[np.ndarray, np.ndarray], tuple[float, int]],
    split: Split,
    tcfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
    all_sum: Callable[[list[float]], list[float]] | None = None,
) -> tuple[float, float]:
    """(mean loss over every counted validation target, perplexity), for either trainer.

    batch_loss(ids, targets) -> (mean loss of the batch, targets counted). With `world`
    processes, rank r takes batches r, r + world, ...; `all_sum` adds their partial sums.
    """
    total, count = 0.0, 0
    for j, idx in enumerate(eval_batches(split, tcfg.batch_size, tcfg.eval_batches)):
        if j % world != rank:
            continue
        ids, tgt = make_batch(split, idx, tcfg.mask_prompt)
        loss, n = batch_loss(ids, tgt)
        total += loss * n
        count += n
    if all_sum is not None:
        total, count = all_sum([total, float(count)])
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 700.0))


def sample_prompts(split: Split, n: int) -> list[list[int]]:
    """Prompts for sample responses: the first validation instructions' prompts, or the first
    16 tokens of the first validation windows for plain text."""
    if split.kind == "instruction":
        return [tok[:n_prompt] for tok, n_prompt in split.examples[:n]]
    return [list(map(int, w[:16])) for w in split.windows[:n]]


def samples(model, split: Split, tcfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    """[(prompt ids, response ids)]: greedy responses of `model` (the model interface of
    ref.generate, over the params being trained) to the first validation prompts, stopping
    at <|endoftext|>."""
    room = model.cfg.n_ctx - tcfg.sample_tokens  # prompt tokens that fit beside the response
    prompts = [p[-room:] for p in sample_prompts(split, tcfg.n_samples) if p and room > 0]
    if not prompts:
        return []
    outs = generate(model, prompts, tcfg.sample_tokens, temperature=0.0, eos_id=EOT)
    return [(p, o.token_ids) for p, o in zip(prompts, outs, strict=True)]


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainState:
    """What a checkpoint must hold to resume: the step reached, the trainable tensors and the
    AdamW state."""

    step: int
    trainable: dict[str, np.ndarray]
    opt: dict


def init_state(params: dict, train: str) -> TrainState:
    names = param_names(params, train)
    if not names:
        raise ValueError("nothing to train: LoRA mode but the model carries no adapters")
    # writable float32 copies: loaded weights are read-only memory maps
    trainable = {n: np.array(a, np.float32) for n, a in get_flat(params, names).items()}
    return TrainState(0, trainable, adamw_init(trainable))


def micro_step(
    params: dict,
    split: Split,
    cfg: GPT2Config,
    tcfg: TrainConfig,
    k: int,
    lora_dropout: bool,
    ops=ref_ops,
) -> tuple[float, dict[str, np.ndarray], int]:
    """Loss, gradients and token count of micro-batch k.

    One generator, seeded by (seed, 1, k), draws LoRA's masks and the model's (in the order of
    ref/model.py); model rates of 0 draw nothing, so LoRA's masks are those of a run without
    model dropout."""
    idx = batch_indices(len(split), tcfg.batch_size, k, tcfg.seed)
    ids, tgt = make_batch(split, idx, tcfg.mask_prompt)
    dropout = Dropout(*tcfg.dropout)
    drops = lora_dropout or dropout != Dropout()
    rng = np.random.default_rng([tcfg.seed, 1, k]) if drops else None
    loss, grads = loss_and_grads(
        params, ids, tgt, cfg, ops=ops, train=tcfg.train, rng=rng, dropout=dropout
    )
    return loss, grads, ids.size


def is_due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (validation, a save) runs after optimizer step `step`
    (1-based): every `every` steps and after the last (every = 0: after the last only)."""
    return step == total or (every > 0 and step % every == 0)


def train_event(step: int, loss: float, lr: float, norm: float, tokens: int, seconds: float):
    """The log record of one optimizer step (the trainers' shared `--json` format)."""
    return {
        "event": "train",
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": norm,
        "tokens": tokens,
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }


def train(
    params: dict,
    cfg: GPT2Config,
    train_split: Split,
    val_split: Split | None,
    tcfg: TrainConfig,
    *,
    ops=ref_ops,
    state: TrainState | None = None,
    on_event: Callable[[dict], None] | None = None,
    save: Callable[[dict, TrainState], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict, TrainState, list[float]]:
    """Train from `state` (a fresh one when None) up to tcfg.steps, or until `stop()` says so
    after a step (Ctrl-C): that step is then saved and {"event": "interrupted", step} ends it.

    on_event receives dicts: {"event": "train", step, loss, lr, grad_norm, tokens,
    tokens_per_s}, {"event": "val", step, val_loss, val_perplexity},
    {"event": "sample", prompt, response} (token ids). save(params, state) is called every
    save_every steps and at the end. Returns (params, final state, the train losses).
    """
    state = init_state(params, tcfg.train) if state is None else state
    params = with_flat(params, state.trainable)
    acfg = AdamWConfig(tcfg.lr, tcfg.beta1, tcfg.beta2, tcfg.eps, tcfg.weight_decay)
    decay = decay_mask(list(state.trainable), tcfg.decay)
    dropout = tcfg.train == "lora" and has_dropout(params)
    emit = on_event or (lambda e: None)
    has_val = val_split is not None and len(val_split) > 0
    losses: list[float] = []
    for step in range(state.step, tcfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, tcfg.lr, tcfg.warmup, tcfg.steps, tcfg.min_lr_ratio)
        loss_sum, tokens, acc = 0.0, 0, None
        for micro in range(tcfg.grad_accum):
            loss, grads, n = micro_step(
                params, train_split, cfg, tcfg, step * tcfg.grad_accum + micro, dropout, ops
            )
            loss_sum += loss
            tokens += n
            acc = grads if acc is None else {k: acc[k] + g for k, g in grads.items()}
        if tcfg.grad_accum > 1:
            acc = {k: g * np.float32(1.0 / tcfg.grad_accum) for k, g in acc.items()}
        loss = loss_sum / tcfg.grad_accum
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: the loss is {loss}; lower --lr")
        acc, norm = clip_by_global_norm(acc, tcfg.grad_clip)
        trainable, opt = adamw_step(state.trainable, acc, state.opt, acfg, lr, decay)
        state = TrainState(step + 1, trainable, opt)
        params = with_flat(params, trainable)
        losses.append(loss)
        emit(train_event(step + 1, loss, lr, norm, tokens, time.perf_counter() - t0))
        if has_val and is_due(step + 1, tcfg.eval_every, tcfg.steps):
            batch_loss = partial(loss_only, params, cfg=cfg, ops=ops)
            vl, ppl = validate(batch_loss, val_split, tcfg)
            tl, _ = validate(batch_loss, train_split, tcfg)  # the book's train loss: no dropout
            emit({"event": "val", "step": step + 1, "val_loss": vl, "val_perplexity": ppl,
                  "train_eval_loss": tl})  # fmt: skip
            if tcfg.sample_at_eval and step + 1 < tcfg.steps:
                emit_samples(emit, Model(cfg, params, ops), val_split, tcfg, step + 1)
        saved = save is not None and is_due(step + 1, tcfg.save_every, tcfg.steps)
        if saved:
            save(params, state)
        if stop is not None and step + 1 < tcfg.steps and stop():
            if save is not None and not saved:
                save(params, state)
            emit({"event": "interrupted", "step": step + 1})
            return params, state, losses
    if has_val:
        emit_samples(emit, Model(cfg, params, ops), val_split, tcfg, tcfg.steps)
    return params, state, losses


def emit_samples(emit: Callable[[dict], None], model, split: Split, tcfg: TrainConfig, step: int):
    """{"event": "sample", step, prompt, response} for each of `samples`' responses."""
    if tcfg.n_samples > 0:
        for prompt, response in samples(model, split, tcfg):
            emit({"event": "sample", "step": step, "prompt": prompt, "response": response})
