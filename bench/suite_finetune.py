"""The finetune suite: tokens/s and peak memory of a training step, per backend, full
finetuning against LoRA. Random weights and random tokens at the real shapes.

A step is what the project's trainers do per optimizer step: forward, cross-entropy, backward,
clip to global norm 1, AdamW. The numpy backends run `ref.train.train` (with `ops=` the
backend), the torch backends `fast.torch.train.train`; each is asked for 1 + ft_steps steps and
reports its own tokens/s per step in its "train" events; the first step is the warm-up. Where a
trainer is missing or refuses a mode, the record says "not available" and why.

Baseline: "torch-autograd" is bench/torch_gpt2.py's eager model with autograd and
torch.optim.AdamW (LoRA on the same four projections, the same rank). On a CUDA device also
"hf-transformers": transformers' GPT2LMHeadModel with the same step (full finetuning only).
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from bench.backends import Backend, torch_devices
from bench.harness import error_text, record, step_stats, with_peak_memory
from bench.plan import Plan, SuiteSetup
from bench.workload import random_params, train_flops


def _split(cfg, B: int, T: int, steps: int, rng: np.random.Generator):
    from ref.data import text_splits

    ids = rng.integers(0, cfg.n_vocab, B * T * steps + 1)  # (B * T * steps + 1,)
    train, _ = text_splits(ids, T, 0.0)
    return train


def _trainer_steps(be: Backend, params, cfg, plan: Plan, mode: str, rng) -> list[float]:
    """Step times of the project's trainer for backend `be` in `mode` ("all" or "lora")."""
    from ref.train import TrainConfig

    steps = 1 + plan.ft_steps
    split = _split(cfg, plan.ft_batch, plan.ft_T, steps, rng)
    tcfg = TrainConfig(steps=steps, batch_size=plan.ft_batch, train=mode, n_samples=0)
    step_s: list[float] = []

    def on_event(e: dict) -> None:
        if e.get("event") == "train":
            step_s.append(e["tokens"] / e["tokens_per_s"])

    if mode == "lora":
        from ref.lora import ALL_TARGETS, add_lora

        params = add_lora(
            params, ALL_TARGETS, plan.lora_rank, float(plan.lora_rank), rng=np.random.default_rng(0)
        )
    if be.kind == "numpy":
        from ref.train import train

        train(params, cfg, split, None, tcfg, ops=be.module, on_event=on_event)
    else:
        from fast.torch.train import train

        train(params, cfg, split, None, tcfg, backend=be.name, device=be.device, on_event=on_event)
    if not step_s:
        raise RuntimeError("the trainer emitted no train events")
    return step_s


def _autograd_steps(params, cfg, plan: Plan, mode: str, device: str, rng) -> list[float]:
    import torch

    from bench import torch_gpt2

    p = torch_gpt2.to_torch(params, device, copy=True)
    step = torch_gpt2.trainer(p, cfg, plan.lora_rank if mode == "lora" else None)
    B, T = plan.ft_batch, plan.ft_T
    ids = torch.from_numpy(rng.integers(0, cfg.n_vocab, (B, T))).to(device)  # (B, T)
    tgt = torch.from_numpy(rng.integers(0, cfg.n_vocab, (B, T))).to(device)  # (B, T)
    return _timed_steps(partial(step, ids, tgt), 1 + plan.ft_steps, device)


def _hf_steps(cfg, plan: Plan, device: str, rng) -> list[float]:
    """Step times of transformers' GPT2LMHeadModel (random init, no dropout): loss from
    labels, backward, clip to norm 1, torch.optim.AdamW. Full finetuning only."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_config()))
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, T = plan.ft_batch, plan.ft_T
    ids = torch.from_numpy(rng.integers(0, cfg.n_vocab, (B, T))).to(device)  # (B, T)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed_steps(step, 1 + plan.ft_steps, device)


def _timed_steps(step, n: int, device: str) -> list[float]:
    """The wall time of each of `n` calls of `step()`, the device's queue included."""
    import torch

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _jobs(setup: SuiteSetup, params: dict, cfg):
    """(label, device, train mode, fn() -> step times) of every trainer to time."""
    plan, rng = setup.plan, setup.rng
    for be in setup.backends:
        for mode in ("all", "lora"):
            fn = partial(_trainer_steps, be, params, cfg, plan, mode, rng)
            yield be.name, be.device, mode, fn
    if not setup.baselines:
        return
    devices = torch_devices()
    for device in devices:
        for mode in ("all", "lora"):
            fn = partial(_autograd_steps, params, cfg, plan, mode, device, rng)
            yield "torch-autograd", device, mode, fn
    if "cuda" in devices:  # issue 6 compares the GPU trainers with transformers
        yield "hf-transformers", "cuda", "all", partial(_hf_steps, cfg, plan, "cuda", rng)


def run(setup: SuiteSetup) -> list[dict]:
    plan = setup.plan
    size, cfg = plan.models[0]  # finetuning at the first model size only
    params = random_params(cfg, setup.rng)
    B, T = plan.ft_batch, plan.ft_T
    recs: list[dict] = []
    for label, device, mode, fn in _jobs(setup, params, cfg):
        setup.log(f"bench: finetune {size} {label} ({device}) train={mode}")
        rp = {"size": size, "device": device, "train": mode, "B": B, "T": T}
        if mode == "lora":
            rp["lora_rank"] = plan.lora_rank
        try:
            steps, mem = with_peak_memory(fn, gpu=device == "cuda")
        except Exception as e:
            reason = "not available: " + error_text(e)
            recs.append(
                record("finetune", "step", label, params=rp, status="unavailable", reason=reason)
            )
            continue
        t = step_stats(steps)
        flops = train_flops(cfg, B, T, mode == "lora")
        metrics = {
            "tokens_per_s": B * T / t["min"],
            "flops": flops,
            "GFLOPs": flops / t["min"] / 1e9,
            **mem,
        }
        recs.append(record("finetune", "step", label, params=rp, time_s=t, metrics=metrics))
    return recs
