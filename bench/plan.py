"""What each run measures: the shapes, lengths and time budgets of the three modes.

full  -- the numbers for the README: every op at the widths of --sizes, generation and
         finetuning at --model-sizes (124M by default) at real shapes, pretraining (train) of
         MINI and of the first model size. ~10-15 min on 2 cores.
quick -- the same code paths on fewer shapes (--quick, under two minutes on 2 cores); train
         only MINI.
tiny  -- a 2-layer toy model (hidden --tiny flag): the tests run the whole pipeline with it.

SuiteSetup: the one argument of every suite's run(), the plan and what the run has at hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bench.harness import silent
from ref.config import SIZES, GPT2Config, canonical_size

if TYPE_CHECKING:
    import numpy as np

    from bench.backends import Backend

TINY = GPT2Config(n_vocab=256, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
# The train suite's small pretraining config: GPT-2's vocabulary on a 4-layer, 128-wide model,
# so the LM head and the cross-entropy over V = 50257 weigh as they do in a real small run.
MINI = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=128, n_head=4, n_layer=4)


class PlanError(ValueError):
    """A flag names a size or suite that does not exist."""


@dataclass
class Plan:
    mode: str
    widths: list[tuple[str, GPT2Config]]  # (size name, cfg) whose widths the ops suite sweeps
    models: list[tuple[str, GPT2Config]]  # (size name, cfg) for generate and finetune
    # harness
    budget_s: float = 0.25  # timed seconds per measurement (at least min_repeats calls)
    max_repeats: int = 30
    heavy_repeats: int = 2  # timed repeats of a model forward (prefill), after one warm-up
    # limits
    limit_tries: int = 3  # each limit: the best of this many tries, at the start and the end
    stream_bytes: int = 256 * 1024**2
    matmul_n: int = 2048
    gpu_stream_bytes: int = 1024**3
    gpu_matmul_n: int = 8192
    # ops
    # N = B * T: one decode token, one 1024-token sequence, a B=4 x T=1024 training batch
    rows: list[int] = field(default_factory=lambda: [1, 1024, 4096])
    linear_max_rows: int = 1024  # linear at rows up to this (a matmul at N=4096 adds little)
    attn_T: list[int] = field(default_factory=lambda: [128, 1024])  # prefill, Tq = Tk
    attn_decode_Tk: list[int] = field(default_factory=lambda: [1024])  # decode, Tq = 1
    ce_rows: list[int] = field(default_factory=lambda: [64, 1024])
    # generate
    prefill_T: list[int] = field(default_factory=lambda: [1, 16, 64, 256, 512, 1024])
    decode_ctx: list[int] = field(default_factory=lambda: [1, 16, 64, 256, 512, 1024])
    decode_batches: list[int] = field(default_factory=lambda: [4, 16])  # besides batch 1
    batch_ctx: list[int] = field(default_factory=lambda: [256, 1024])  # where batches run
    short_ctx: int = 256  # models after the first: contexts up to this, batch 1 only
    decode_steps: int = 8  # timed single-token steps per point
    hf_ctx: list[int] = field(default_factory=lambda: [1, 256, 1024])
    # finetune
    ft_batch: int = 4
    ft_T: int = 256
    ft_steps: int = 2  # timed steps after one warm-up step (0: one step, counted)
    lora_rank: int = 8
    # train (pretraining from GPT-2's initialisation): (size name, cfg, B, T) of each case;
    # make_plan("full") adds the first model size at its context, where GPT-2 pretrains
    # (B = 1, T = 1024 at 124M: a step of 1,024 tokens, as long as finetune's 4 x 256)
    train_cases: list[tuple[str, GPT2Config, int, int]] = field(
        default_factory=lambda: [("mini", MINI, 8, MINI.n_ctx)]
    )
    train_steps: int = 2  # timed steps after one warm-up step (0: one step, counted)


def parse_sizes(text: str, flag: str) -> list[tuple[str, GPT2Config]]:
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        name = canonical_size(part)
        if name is None:
            raise PlanError(
                f"{flag}: unknown size {part.strip()!r}; choose from {', '.join(SIZES)}"
            )
        out.append((name, SIZES[name]))
    if not out:
        raise PlanError(f"{flag}: no size given")
    return out


def make_plan(mode: str, sizes: str | None, model_sizes: str | None) -> Plan:
    if mode == "tiny":
        return Plan(
            mode="tiny",
            widths=[("tiny", TINY)],
            models=[("tiny", TINY)],
            budget_s=0.01,
            max_repeats=3,
            heavy_repeats=1,
            stream_bytes=16 * 1024**2,
            matmul_n=256,
            gpu_stream_bytes=64 * 1024**2,
            gpu_matmul_n=1024,
            rows=[1, 16],
            attn_T=[16],
            attn_decode_Tk=[32],
            ce_rows=[16],
            prefill_T=[4, 32],
            decode_ctx=[1, 32],
            decode_batches=[4],
            batch_ctx=[32],
            short_ctx=16,
            decode_steps=2,
            hf_ctx=[32],
            ft_batch=2,
            ft_T=16,
            ft_steps=1,
            lora_rank=2,
            train_cases=[("tiny", TINY, 2, 16)],
            train_steps=1,
        )
    if mode == "quick":
        return Plan(
            mode="quick",
            widths=parse_sizes(sizes or "124M", "--sizes"),
            models=parse_sizes(model_sizes or "124M", "--model-sizes"),
            budget_s=0.1,
            max_repeats=10,
            heavy_repeats=1,
            stream_bytes=128 * 1024**2,
            matmul_n=1024,
            gpu_stream_bytes=256 * 1024**2,
            gpu_matmul_n=4096,
            rows=[4096],  # the output far exceeds the LLC: writes reach memory in the timing
            linear_max_rows=4096,
            attn_T=[1024],
            attn_decode_Tk=[],
            ce_rows=[256],
            prefill_T=[1, 256, 1024],
            decode_ctx=[1, 256, 1024],
            decode_batches=[16],
            batch_ctx=[256],
            short_ctx=256,
            decode_steps=3,
            hf_ctx=[256],
            ft_batch=4,
            ft_T=32,
            ft_steps=0,  # one step, no warm-up: one-time costs included (the record says so)
            # MINI only (CI runs --quick): a warm-up step, then one timed
            train_cases=[("mini", MINI, 4, MINI.n_ctx)],
            train_steps=1,
        )
    if mode == "full":
        plan = Plan(
            mode="full",
            widths=parse_sizes(sizes or "124M,355M,774M,1558M", "--sizes"),
            models=parse_sizes(model_sizes or "124M", "--model-sizes"),
        )
        size, cfg = plan.models[0]
        plan.train_cases.append((size, cfg, 1, min(1024, cfg.n_ctx)))
        return plan
    raise PlanError(f"unknown mode {mode!r}")


@dataclass
class SuiteSetup:
    """What every suite's run(setup) -> records takes: the plan and what the run has at hand."""

    plan: Plan
    backends: list[Backend]  # those that loaded (bench.backends.load_backends)
    limits: dict  # measured at the start of the run (bench.limits.rescore: the best, at the end)
    rng: np.random.Generator  # the run's, from --seed: weights and inputs
    baselines: bool = True  # also time the baselines (torch, transformers, ref without a cache)
    log: Callable[[str], None] = silent  # progress lines
