"""Finetuning the torch GPT-2 (`--backend torch|triton`), data-parallel under torchrun.

Shape legend: B = batch (one micro-batch, all ranks together), b = this rank's rows,
T = time, V = n_vocab, W = world size (processes).

The same run as the numpy trainer (`ref/train.py`): the same batches (`ref.data`, drawn by
(seed, step)), the same loss (each micro-batch's mean over its own counted targets, micro-
batches averaged), clipping by global norm, AdamW with decoupled decay on the tensors
`ref.optim.decay_mask` picks, and `ref.optim.lr_at`'s warmup + cosine schedule. Only the
arithmetic moves to torch: autograd through the backend's ops instead of
`ref.model.model_backward`.
Full finetuning or LoRA (train="lora": the adapters `ref.lora.add_lora` put on the params are
the only Parameters; the model adds scale * (drop(x) @ A) @ B to each adapted projection).
Model dropout (`TrainConfig.dropout`: embd, attn, resid) while training only, its masks and
LoRA's drawn from one torch.Generator seeded by (seed, micro-step), so a resumed run draws the
same; the masks are not the numpy trainer's (another generator), so runs with dropout match
it in distribution, not bit for bit. Validation and samples never drop.

Data parallelism (torch.distributed, DDP): with WORLD_SIZE > 1 (torchrun sets it, with RANK,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), every rank builds the whole micro-batch (cheap, and the
padding then matches a single process) and keeps its slice of the rows. Rank r's loss is
    sum of its rows' token losses / count of the whole micro-batch * W
so that DDP's gradient *average* over ranks is exactly the gradient of the micro-batch's mean
loss: the same run as one process with the same global batch, up to float32 summation order.
The process group is NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from fast import get_backend
from fast.torch.model import TorchModel, default_device, gpt2_loss, to_torch
from ref.config import GPT2Config
from ref.data import IGNORE, Split, batch_indices, make_batch
from ref.lora import has_dropout
from ref.model import Dropout
from ref.optim import decay_mask, lr_at
from ref.train import (
    TrainConfig,
    TrainState,
    emit_samples,
    get_flat,
    is_due,
    param_names,
    train_event,
    validate,
    with_flat,
)


class GPT2Module(torch.nn.Module):
    """The trainable tensors as nn.Parameters, so DDP can find and all-reduce them; the
    forward is the functional `gpt2_loss` over the nested params that hold those Parameters."""

    def __init__(self, cfg: GPT2Config, params: dict, names: list[str], ops, device):
        super().__init__()
        self.cfg, self.ops, self.names = cfg, ops, names
        tree = to_torch(params, device)  # nested tensors, LoRA adapters included
        flat = get_flat(tree, names)  # {canonical name: tensor} of the trainable ones
        self.flat = torch.nn.ParameterList([torch.nn.Parameter(flat[n]) for n in names])
        # nested, the trainable leaves replaced by the Parameters above; the rest stay frozen
        self.params = with_flat(tree, dict(zip(names, self.flat, strict=True)))

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor,
        scale: float,
        gen: torch.Generator | None = None,
        dropout: Dropout | None = None,
    ) -> torch.Tensor:
        """scale * (mean loss of this rank's rows); ids, targets (b, T); `gen` drives LoRA's
        dropout and the model's (`dropout`) (None: none)."""
        loss = gpt2_loss(
            self.params, ids, targets, self.cfg, self.ops, IGNORE, gen, dropout=dropout
        )
        return loss * scale


def distributed() -> tuple[int, int]:
    """(rank, world size), joining the process group torchrun describes if not yet joined."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown() -> None:
    """Leave the process group, if this process joined one (the end of a torchrun job)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK) or the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return default_device()


def _all_sum(values: list[float], world: int, device) -> list[float]:
    """Sum over ranks (on `device`: gloo reduces CPU tensors, NCCL GPU ones)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _rows(n: int, rank: int, world: int) -> np.ndarray:
    """This rank's rows of a micro-batch of n rows (contiguous slices, sizes differ by <= 1)."""
    if n < world:
        raise ValueError(
            f"a micro-batch of {n} rows cannot be split over {world} processes: raise "
            "--batch-size to at least the number of processes"
        )
    return np.array_split(np.arange(n), world)[rank]


def _batch_loss(module: GPT2Module, device):
    """`ref.train.validate`'s batch_loss on the torch model: (mean loss, targets counted)."""

    def batch_loss(ids: np.ndarray, tgt: np.ndarray) -> tuple[float, int]:
        ids_t = torch.as_tensor(ids, device=device)
        tgt_t = torch.as_tensor(tgt, device=device)
        with torch.no_grad():
            return float(module(ids_t, tgt_t, 1.0)), int((tgt != IGNORE).sum())

    return batch_loss


def export_state(module: GPT2Module, opt: torch.optim.Optimizer, step: int) -> TrainState:
    """The numpy trainer's TrainState (flat float32 tensors and AdamW moments): checkpoints
    are interchangeable between backends."""
    trainable = {
        n: p.detach().cpu().numpy().copy() for n, p in zip(module.names, module.flat, strict=True)
    }
    m, v = {}, {}
    for n, p in zip(module.names, module.flat, strict=True):
        s = opt.state.get(p, {})
        m[n] = s["exp_avg"].cpu().numpy().copy() if s else np.zeros_like(trainable[n])
        v[n] = s["exp_avg_sq"].cpu().numpy().copy() if s else np.zeros_like(trainable[n])
    return TrainState(step, trainable, {"step": step, "m": m, "v": v})


def _import_state(module: GPT2Module, opt: torch.optim.Optimizer, state: TrainState) -> None:
    """Resume from a TrainState (written by either trainer)."""
    with torch.no_grad():
        for n, p in zip(module.names, module.flat, strict=True):
            if n not in state.trainable:
                raise ValueError(f"checkpoint lacks trainable tensor {n!r}")
            p.copy_(torch.as_tensor(state.trainable[n]))
            if state.opt["step"] > 0:
                opt.state[p] = {
                    "step": torch.tensor(float(state.opt["step"])),
                    "exp_avg": torch.as_tensor(state.opt["m"][n], device=p.device).clone(),
                    "exp_avg_sq": torch.as_tensor(state.opt["v"][n], device=p.device).clone(),
                }


def train(
    params: dict,
    cfg: GPT2Config,
    train_split: Split,
    val_split: Split | None,
    tcfg: TrainConfig,
    *,
    backend: str = "torch",
    device: str | torch.device | None = None,
    state: TrainState | None = None,
    on_event: Callable[[dict], None] | None = None,
    save: Callable[[dict, TrainState], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict, TrainState, list[float]]:
    """`ref.train.train` on a torch backend, data-parallel when torch.distributed is set up
    (see `distributed()`). Same events, same return: (numpy params, final state, losses),
    and the same `stop` (checked after each step, agreed by every rank).

    Every rank returns the same params and losses; events and saves happen on rank 0 only.
    """
    if tcfg.grad_accum < 1 or tcfg.batch_size < 1 or tcfg.steps < 0:
        raise ValueError("steps >= 0, batch size >= 1 and grad_accum >= 1 are required")
    rank, world = distributed()
    device = (rank_device() if world > 1 else default_device()) if device is None else device
    device = torch.device(device)
    ops = get_backend(backend)
    if backend == "triton":
        ops.check_device(device)
    names = param_names(params, tcfg.train)
    if not names:
        raise ValueError("LoRA training needs adapters: none of the params carries one")
    model_dropout = Dropout(*tcfg.dropout)
    dropout = (tcfg.train == "lora" and has_dropout(params)) or model_dropout != Dropout()
    module = GPT2Module(cfg, params, names, ops, device)
    model = module
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    decay = decay_mask(names, tcfg.decay)
    groups = [
        {"params": [p for n, p in zip(names, module.flat, strict=True) if decay[n]]},
        {
            "params": [p for n, p in zip(names, module.flat, strict=True) if not decay[n]],
            "weight_decay": 0.0,
        },
    ]
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=tcfg.lr,
        betas=(tcfg.beta1, tcfg.beta2),
        eps=tcfg.eps,
        weight_decay=tcfg.weight_decay,
    )
    start = 0
    if state is not None:
        _import_state(module, opt, state)
        start = state.step
    emit = (on_event or (lambda e: None)) if rank == 0 else (lambda e: None)
    has_val = val_split is not None and len(val_split) > 0
    losses: list[float] = []
    for step in range(start, tcfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, tcfg.lr, tcfg.warmup, tcfg.steps, tcfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum, tokens = 0.0, 0
        for micro in range(tcfg.grad_accum):
            k = step * tcfg.grad_accum + micro
            idx = batch_indices(len(train_split), tcfg.batch_size, k, tcfg.seed)
            ids, tgt = make_batch(train_split, idx, tcfg.mask_prompt)  # (B, T) each
            gen = None
            if dropout:  # the dropout masks follow (seed, micro-step): resumable
                gen = torch.Generator(device=device).manual_seed(tcfg.seed * 1_000_003 + k)
            count = max(int((tgt != IGNORE).sum()), 1)
            rows = _rows(len(ids), rank, world)
            local_count = int((tgt[rows] != IGNORE).sum())
            # this rank's share of the micro-batch mean, x W because DDP averages over ranks,
            # / grad_accum because the numpy trainer averages the micro-batches
            scale = local_count / count * world / tcfg.grad_accum
            ids_t = torch.as_tensor(ids[rows], device=device)  # (b, T)
            tgt_t = torch.as_tensor(tgt[rows], device=device)  # (b, T)
            last = micro == tcfg.grad_accum - 1
            if world > 1 and not last:
                with model.no_sync():  # all-reduce once, after the last micro-batch
                    loss = model(ids_t, tgt_t, scale, gen, model_dropout)
                    loss.backward()
            else:
                loss = model(ids_t, tgt_t, scale, gen, model_dropout)
                loss.backward()
            loss_sum += float(loss.detach()) / world  # this rank's share of the micro-batch mean
            tokens += ids.size
        (loss_sum,) = _all_sum([loss_sum], world, device)
        loss = loss_sum  # the mean of the micro-batch means, as ref/train.py reports
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: the loss is {loss}; lower --lr")
        if tcfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), tcfg.grad_clip))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in module.flat]))
        opt.step()
        losses.append(loss)
        emit(train_event(step + 1, loss, lr, norm, tokens, time.perf_counter() - t0))
        if has_val and is_due(step + 1, tcfg.eval_every, tcfg.steps):
            vl, ppl = validate(
                _batch_loss(module, device), val_split, tcfg, rank=rank, world=world,
                all_sum=lambda v: _all_sum(v, world, device),
            )  # fmt: skip
            tl, _ = validate(
                _batch_loss(module, device),
                train_split,
                tcfg,
                rank=rank,
                world=world,
                all_sum=lambda v: _all_sum(v, world, device),
            )  # fmt: skip  (the book's train loss: the first batches, no dropout)
            emit({"event": "val", "step": step + 1, "val_loss": vl, "val_perplexity": ppl,
                  "train_eval_loss": tl})  # fmt: skip
            if rank == 0 and tcfg.sample_at_eval and step + 1 < tcfg.steps:
                model_i = TorchModel(cfg, module.params, backend, device)
                emit_samples(emit, model_i, val_split, tcfg, step + 1)
        saved = is_due(step + 1, tcfg.save_every, tcfg.steps)
        if save is not None and rank == 0 and saved:
            st = export_state(module, opt, step + 1)
            save(_numpy_params(module, params), st)
        if stop is not None and step + 1 < tcfg.steps:
            # every rank stops after the same step, or the next all-reduce would wait forever
            (asked,) = _all_sum([1.0 if stop() else 0.0], world, device)
            if asked > 0:
                if save is not None and rank == 0 and not saved:
                    save(_numpy_params(module, params), export_state(module, opt, step + 1))
                emit({"event": "interrupted", "step": step + 1})
                return _numpy_params(module, params), export_state(module, opt, step + 1), losses
    if rank == 0 and has_val:
        emit_samples(
            emit, TorchModel(cfg, module.params, backend, device), val_split, tcfg, tcfg.steps
        )
    return _numpy_params(module, params), export_state(module, opt, tcfg.steps), losses


def _numpy_params(module: GPT2Module, like: dict) -> dict:
    """`like` (numpy, adapters included) with the trained tensors' current values."""
    trained = zip(module.names, module.flat, strict=True)
    return with_flat(like, {n: p.detach().cpu().numpy().copy() for n, p in trained})
