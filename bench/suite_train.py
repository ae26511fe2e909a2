"""The train suite: pretraining tokens/s and peak memory, per backend, against torch autograd
on the same config in the same run.

Each case of plan.train_cases is a config and a batch shape (B, T): MINI (bench/plan.py: 4
layers, 4 heads, 128 wide, context 128, GPT-2's vocabulary) and, in the full plan, the first
model size at its context. Weights come from `ref.init.init_params` (GPT-2's initialisation),
tokens are random; each trainer starts from the same weights and trains every tensor
(train="all"): forward, cross-entropy, backward, clip to global norm 1, AdamW.

The steps are the finetune suite's (bench/suite_finetune.py: `jobs`, `step_record`): the numpy
backends run `ref.train.train` with `ops=` the backend, the torch backends (triton where CUDA
is present) `fast.torch.train.train`, each asked for 1 + train_steps steps, the first the
warm-up. Baseline "torch-autograd": bench/torch_gpt2.py's eager model with autograd and
torch.optim.AdamW, on every torch device.
"""

from __future__ import annotations

from bench.plan import SuiteSetup
from bench.suite_finetune import Steps, jobs, step_record
from bench.workload import train_flops


def run(setup: SuiteSetup) -> list[dict]:
    from ref.init import init_params

    recs: list[dict] = []
    for size, cfg, B, T in setup.plan.train_cases:
        params = init_params(cfg, setup.rng)
        spec = Steps(B, T, setup.plan.train_steps)
        model = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd}
        model["n_vocab"] = cfg.n_vocab
        flops = train_flops(cfg, B, T, lora=False)
        for label, device, mode, fn in jobs(setup, params, cfg, spec, ("all",), hf=False):
            setup.log(f"bench: train {size} {label} ({device}) B={B} T={T}")
            rp = {"size": size, **model, "device": device, "train": mode, "B": B, "T": T}
            recs.append(step_record("train", label, rp, fn, flops))
    return recs
