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

The step runners (`trainer_steps`, `autograd_steps`), `jobs` and `step_record` serve the train
suite too (bench/suite_train.py): the same steps, from GPT-2's initialisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from bench.backends import Backend, torch_devices
from bench.harness import error_text, record, step_stats, with_peak_memory
from bench.plan import SuiteSetup
from bench.workload import random_params, train_flops


@dataclass(frozen=True)
class Steps:
    """What a timed training run does: 1 + `timed` optimizer steps on batches of B x T random
    tokens, the first the warm-up (timed = 0: one step, counted); LoRA at rank `lora_rank`."""

    B: int
    T: int
    timed: int
    lora_rank: int = 8


def _split(cfg, spec: Steps, rng: np.random.Generator):
    from ref.data import text_splits

    n = spec.B * spec.T * (1 + spec.timed) + 1
    ids = rng.integers(0, cfg.n_vocab, n)  # (B * T * steps + 1,)
    train, _ = text_splits(ids, spec.T, 0.0)
    return train


def trainer_steps(be: Backend, params, cfg, spec: Steps, mode: str, rng) -> list[float]:
    """Step times of the project's trainer for backend `be` in `mode` ("all" or "lora")."""
    from ref.train import TrainConfig

    steps = 1 + spec.timed
    split = _split(cfg, spec, rng)
    tcfg = TrainConfig(steps=steps, batch_size=spec.B, train=mode, n_samples=0)
    step_s: list[float] = []

    def on_event(e: dict) -> None:
        if e.get("event") == "train":
            step_s.append(e["tokens"] / e["tokens_per_s"])

    if mode == "lora":
        from ref.lora import ALL_TARGETS, add_lora

        params = add_lora(
            params, ALL_TARGETS, spec.lora_rank, float(spec.lora_rank), rng=np.random.default_rng(0)
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


def autograd_steps(params, cfg, spec: Steps, mode: str, device: str, rng) -> list[float]:
    """Step times of bench/torch_gpt2.py's eager model with autograd and torch.optim.AdamW."""
    import torch

    from bench import torch_gpt2

    p = torch_gpt2.to_torch(params, device, copy=True)
    step = torch_gpt2.trainer(p, cfg, spec.lora_rank if mode == "lora" else None)
    ids = torch.from_numpy(rng.integers(0, cfg.n_vocab, (spec.B, spec.T))).to(device)  # (B, T)
    tgt = torch.from_numpy(rng.integers(0, cfg.n_vocab, (spec.B, spec.T))).to(device)  # (B, T)
    return _timed_steps(partial(step, ids, tgt), 1 + spec.timed, device)


def _hf_steps(cfg, spec: Steps, device: str, rng) -> list[float]:
    """Step times of transformers' GPT2LMHeadModel (random init, no dropout): loss from
    labels, backward, clip to norm 1, torch.optim.AdamW. Full finetuning only."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_config()))
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.from_numpy(rng.integers(0, cfg.n_vocab, (spec.B, spec.T))).to(device)  # (B, T)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed_steps(step, 1 + spec.timed, device)


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


def jobs(setup: SuiteSetup, params: dict, cfg, spec: Steps, modes: tuple[str, ...], hf: bool):
    """(label, device, train mode, fn() -> step times) of every trainer to time: each backend,
    then (with the baselines) torch-autograd on every torch device, and transformers on CUDA
    where `hf`."""
    rng = setup.rng
    for be in setup.backends:
        for mode in modes:
            yield be.name, be.device, mode, partial(trainer_steps, be, params, cfg, spec, mode, rng)
    if not setup.baselines:
        return
    devices = torch_devices()
    for device in devices:
        for mode in modes:
            fn = partial(autograd_steps, params, cfg, spec, mode, device, rng)
            yield "torch-autograd", device, mode, fn
    if hf and "all" in modes and "cuda" in devices:  # issue 6: the GPU trainers against HF
        yield "hf-transformers", "cuda", "all", partial(_hf_steps, cfg, spec, "cuda", rng)


def step_record(suite: str, label: str, rp: dict, fn, flops: int) -> dict:
    """The record of `fn()` -> step times (the first the warm-up) and its peak memory, at
    params `rp` (with device, B and T); "unavailable" with the reason where it raised."""
    try:
        steps, mem = with_peak_memory(fn, gpu=rp["device"] == "cuda")
    except Exception as e:
        reason = "not available: " + error_text(e)
        return record(suite, "step", label, params=rp, status="unavailable", reason=reason)
    t = step_stats(steps)
    metrics = {
        "tokens_per_s": rp["B"] * rp["T"] / t["min"],
        "flops": flops,
        "GFLOPs": flops / t["min"] / 1e9,
        **mem,
    }
    return record(suite, "step", label, params=rp, time_s=t, metrics=metrics)


def run(setup: SuiteSetup) -> list[dict]:
    plan = setup.plan
    size, cfg = plan.models[0]  # finetuning at the first model size only
    params = random_params(cfg, setup.rng)
    spec = Steps(plan.ft_batch, plan.ft_T, plan.ft_steps, plan.lora_rank)
    recs: list[dict] = []
    for label, device, mode, fn in jobs(setup, params, cfg, spec, ("all", "lora"), hf=True):
        setup.log(f"bench: finetune {size} {label} ({device}) train={mode}")
        rp = {"size": size, "device": device, "train": mode, "B": spec.B, "T": spec.T}
        if mode == "lora":
            rp["lora_rank"] = spec.lora_rank
        flops = train_flops(cfg, spec.B, spec.T, mode == "lora")
        recs.append(step_record("finetune", label, rp, fn, flops))
    return recs
