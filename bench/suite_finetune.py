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

import statistics
import time
from functools import partial

import numpy as np

from bench.backends import Backend, cuda_available
from bench.harness import error_text, peak_rss, record, silent
from bench.plan import Plan
from bench.workload import random_params, train_flops


def _split(cfg, B: int, T: int, steps: int, rng: np.random.Generator):
    from ref.data import text_splits

    ids = rng.integers(0, cfg.n_vocab, B * T * steps + 1)  # (B * T * steps + 1,)
    train, _ = text_splits(ids, T, 0.0)
    return train


def _stats(step_s: list[float]) -> dict:
    timed = step_s[1:] if len(step_s) > 1 else step_s
    return {
        "min": min(timed),
        "median": statistics.median(timed),
        "n": len(timed),
        "warmup": len(step_s) - len(timed),
    }


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
    out = []
    for _ in range(1 + plan.ft_steps):
        t0 = time.perf_counter()
        step(ids, tgt)
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


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
    out = []
    for _ in range(1 + plan.ft_steps):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _into(box: dict, fn) -> None:
    box["steps"] = fn()


def run(
    plan: Plan,
    backends: list[Backend],
    limits: dict,
    rng: np.random.Generator,
    baselines: bool = True,
    log=silent,
) -> list[dict]:
    recs: list[dict] = []
    for size, cfg in plan.models[:1]:  # finetuning at the first model size only
        params = random_params(cfg, rng)
        jobs = []
        for be in backends:
            for mode in ("all", "lora"):
                jobs.append(
                    (
                        be.name,
                        be.device,
                        mode,
                        partial(_trainer_steps, be, params, cfg, plan, mode, rng),
                    )
                )
        if baselines:
            try:
                import torch  # noqa: F401

                devices = ["cpu"] + (["cuda"] if cuda_available() else [])
            except ImportError:
                devices = []
            for device in devices:
                for mode in ("all", "lora"):
                    jobs.append(
                        (
                            "torch-autograd",
                            device,
                            mode,
                            partial(_autograd_steps, params, cfg, plan, mode, device, rng),
                        )
                    )
            if "cuda" in devices:  # issue 6 compares the GPU trainers with transformers
                jobs.append(
                    ("hf-transformers", "cuda", "all", partial(_hf_steps, cfg, plan, "cuda", rng))
                )
        for label, device, mode, fn in jobs:
            log(f"bench: finetune {size} {label} ({device}) train={mode}")
            B, T = plan.ft_batch, plan.ft_T
            rp = {"size": size, "device": device, "train": mode, "B": B, "T": T}
            if mode == "lora":
                rp["lora_rank"] = plan.lora_rank
            box: dict = {}
            try:
                mem = peak_rss(partial(_into, box, fn), gpu=device == "cuda")
            except Exception as e:
                recs.append(
                    record(
                        "finetune",
                        "step",
                        label,
                        params=rp,
                        status="unavailable",
                        reason="not available: " + error_text(e),
                    )
                )
                continue
            t = _stats(box["steps"])
            flops = train_flops(cfg, B, T, mode == "lora")
            metrics = {
                "tokens_per_s": B * T / t["min"],
                "flops": flops,
                "GFLOPs": flops / t["min"] / 1e9,
                **mem,
            }
            recs.append(record("finetune", "step", label, params=rp, time_s=t, metrics=metrics))
    return recs
