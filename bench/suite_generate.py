"""The generate suite: prefill tokens/s against prompt length, decode tokens/s against context
length and batch size, per backend and model size, with peak memory. Random weights at the real
shapes (speed does not depend on the values).

Shape legend: B = batch, T = prompt tokens, ctx = keys a decode step attends to (its own
included), k = timed steps per point.

prefill  -- one forward over T tokens of a batch of 1, no KV cache, only the last position
            through the LM head (what generation needs). Effective FLOP/s = model FLOPs
            (bench/workload.py: forward_flops) / time.
decode   -- single-token steps from a KV cache. A point `ctx` fills the cache to ctx - k - 1
            tokens, then takes k + 1 steps and drops the first (warm-up): the k timed steps
            attend to ctx - k + 1 ... ctx keys (the record says so). Caches with `length`,
            `mask` and `n_real` (ref.model.KVCache, fast.torch.model.TorchKVCache) are filled by
            setting those (the keys are zeros: speed does not depend on them); others by a real
            prefill. The ceiling is batch x streaming-read bandwidth / (bytes of weights + keys
            and values read per step).

Baselines: "ref-nocache" is the usual minimal numpy GPT-2, recomputing the whole forward for
every token (a decode step at ctx costs a prefill of ctx tokens: the ref prefill record at
T = ctx, or a measurement of it); "torch-eager" is bench/torch_gpt2.py; "hf-generate" is
transformers' GPT2LMHeadModel.generate (greedy, KV cache), timed per token by a streamer.
"""

from __future__ import annotations

import time

import numpy as np

from bench.backends import Backend, torch_devices
from bench.harness import error_record, measure, peak_rss, record, step_stats, with_peak_memory
from bench.plan import Plan, SuiteSetup
from bench.workload import (
    decode_ceiling,
    forward_flops,
    kv_bytes,
    random_params,
    weight_bytes,
)
from ref.config import GPT2Config


def _fill(cache, start: int) -> bool:
    """Make `cache` look as if `start` tokens had been prefilled; False if it cannot."""
    if not all(hasattr(cache, a) for a in ("length", "mask", "n_real")):
        return False
    cache.length = start
    cache.mask[:, :start] = True
    cache.n_real[:] = start
    return True


# ---------------------------------------------------------------------------------------------
# runners: {"prefill": fn(ids (1, T)) -> None (or None: not measured),
#           "decode": fn(B, start, n) -> the times of n single-token steps after `start` tokens,
#           "dtype": the weights' dtype where not float32}


def model_runner(model, dtype: str = "float32") -> dict:
    """A model with the interface of ref.generate (numpy ids in, numpy logits out)."""

    def prefill(ids):
        model.forward(ids, last_only=True)

    def decode(B: int, start: int, n: int) -> list[float]:
        cache = model.new_cache(B, start + n)
        if start and not _fill(cache, start):
            model.forward(np.zeros((B, start), np.int64), cache=cache, last_only=True)
        tok = np.zeros((B, 1), np.int64)  # (B, 1)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            model.forward(tok, cache=cache, last_only=True)
            times.append(time.perf_counter() - t0)
        return times

    return {"prefill": prefill, "decode": decode, "dtype": dtype}


def torch_eager_runner(cfg: GPT2Config, params: dict, device: str) -> dict:
    import torch

    from bench import torch_gpt2

    p = torch_gpt2.to_torch(params, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def prefill(ids):
        with torch.inference_mode():
            torch_gpt2.forward(p, torch.from_numpy(ids).to(device), cfg, last_only=True)
        sync()

    def decode(B: int, start: int, n: int) -> list[float]:
        cache = torch_gpt2.new_cache(cfg, B, start + n, device)
        tok = torch.zeros((B, 1), dtype=torch.int64, device=device)  # (B, 1)
        times = []
        with torch.inference_mode():
            for i in range(n):
                t0 = time.perf_counter()
                torch_gpt2.forward(p, tok, cfg, cache, P=start + i, last_only=True)
                sync()
                times.append(time.perf_counter() - t0)
        return times

    return {"prefill": prefill, "decode": decode}


def hf_runner(cfg: GPT2Config, device: str) -> dict:
    """transformers' GPT2LMHeadModel with random weights; decode only (generate)."""
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    d = cfg.to_hf_config()
    if cfg.n_vocab <= d["eos_token_id"]:  # a toy vocabulary: keep the special id inside it
        d["eos_token_id"] = d["bos_token_id"] = cfg.n_vocab - 1
    hf_cfg = transformers.GPT2Config(**d)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg).to(device).eval()

    class Clock(BaseStreamer):
        """Time of each new token (generate calls put() with the prompt first)."""

        def __init__(self):
            self.t: list[float] = []

        def put(self, value):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def decode(B: int, start: int, n: int) -> list[float]:
        if B != 1:
            raise ValueError("the HF streamer times batch 1 only")
        ids = torch.zeros((1, max(start, 1)), dtype=torch.int64, device=device)
        clock = Clock()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n + 1,
                min_new_tokens=n + 1,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        # puts: the prompt, then each new token; the gaps after the first new token are steps
        return list(np.diff(clock.t[1:]))

    attn = getattr(model.config, "_attn_implementation", None)
    return {"prefill": None, "decode": decode, "attn": attn}


# ---------------------------------------------------------------------------------------------


def _runners(cfg, params, backends: list[Backend], baselines: bool):
    """(label, device, runner or exception)."""
    from ref.model import Model

    for be in backends:
        try:
            if be.kind == "numpy":
                yield be.name, "cpu", model_runner(Model(cfg, params, be.module))
                continue
            from fast.torch.model import TorchModel

            yield be.name, be.device, model_runner(TorchModel(cfg, params, be.name, be.device))
            if be.device == "cuda":  # the GPU issue's half-precision weights and cache
                import torch

                model = TorchModel(cfg, params, be.name, be.device, dtype=torch.bfloat16)
                yield f"{be.name}-bf16", be.device, model_runner(model, "bfloat16")
        except Exception as e:
            yield be.name, be.device, e
    if not baselines:
        return
    try:
        import torch  # noqa: F401
    except ImportError as e:
        yield "torch-eager", "cpu", e
        return
    devices = torch_devices()
    for device in devices:
        try:
            yield "torch-eager", device, torch_eager_runner(cfg, params, device)
        except Exception as e:
            yield "torch-eager", device, e
    for device in devices:
        try:
            yield "hf-generate", device, hf_runner(cfg, device)
        except Exception as e:
            yield "hf-generate", device, e


def _points(plan: Plan, first_model: bool, cfg: GPT2Config) -> list[tuple[int, int]]:
    """(B, ctx) decode points."""
    ctxs = [c for c in plan.decode_ctx if c <= cfg.n_ctx]
    if not first_model:
        return [(1, c) for c in ctxs if c <= plan.short_ctx]
    pts = [(1, c) for c in ctxs]
    pts += [(B, c) for B in plan.decode_batches for c in plan.batch_ctx if c <= cfg.n_ctx]
    return pts


def run(setup: SuiteSetup) -> list[dict]:
    plan, limits = setup.plan, setup.limits
    recs: list[dict] = []
    for index, (size, cfg) in enumerate(plan.models):
        params = random_params(cfg, setup.rng)
        first = index == 0
        prefill_T = [T for T in plan.prefill_T if T <= cfg.n_ctx]
        if not first:
            prefill_T = [T for T in prefill_T if T <= plan.short_ctx]
        points = _points(plan, first, cfg)
        # the baselines at the first size only: transformers' random init of a large model
        # alone takes longer than its decode points
        baselines = setup.baselines and first
        for label, device, runner in _runners(cfg, params, setup.backends, baselines):
            setup.log(f"bench: generate {size} {label} ({device})")
            base = {"size": size, "device": device}
            if isinstance(runner, Exception):
                recs.append(error_record("generate", "decode", label, runner, params=base))
                continue
            read = limits.get("gpu_read_GBps" if device == "cuda" else "read_GBps")
            base["dtype"] = runner.get("dtype", "float32")
            if runner["prefill"] is not None:
                recs += _prefill(plan, runner, label, base, cfg, prefill_T, limits, device)
                if label == "ref":
                    ctxs = sorted({c for B, c in points if B == 1})
                    recs += _nocache(plan, runner, base, cfg, recs, read, ctxs)
            hf = label == "hf-generate"
            for B, ctx in points:
                if hf and (B != 1 or ctx not in plan.hf_ctx):
                    continue
                recs.append(_decode(plan, runner, label, base, cfg, B, ctx, read))
    return recs


def _time_prefill(plan: Plan, runner: dict, ids: np.ndarray, warmup: int) -> dict:
    """Time the runner's prefill of `ids` (1, T): a model forward, so the heavy repeats."""
    return measure(
        lambda: runner["prefill"](ids),
        warmup=warmup,
        min_repeats=plan.heavy_repeats,
        max_repeats=plan.max_repeats,
        budget_s=plan.budget_s,
    )


def _prefill(plan, runner, label, base, cfg, lengths, limits, device) -> list[dict]:
    out = []
    kind = "bf16" if runner.get("dtype") == "bfloat16" else "f32"
    peak = limits.get(f"gpu_matmul_{kind}_GFLOPs" if device == "cuda" else "matmul_f32_GFLOPs")
    for T in lengths:
        ids = np.zeros((1, T), np.int64)  # (1, T)
        params = {**base, "B": 1, "T": T}
        try:
            # the warm-up call is the one whose peak memory is read: it allocates everything
            mem = peak_rss(lambda ids=ids: runner["prefill"](ids), gpu=device == "cuda")
            t = _time_prefill(plan, runner, ids, warmup=0)
            t["warmup"] = 1
        except Exception as e:
            out.append(error_record("generate", "prefill", label, e, params=params))
            continue
        flops = forward_flops(cfg, 1, T, head_rows=1)
        gflops = flops / t["min"] / 1e9
        metrics = {
            "tokens_per_s": T / t["min"],
            "flops": flops,
            "GFLOPs": gflops,
            "fraction_of_matmul": gflops / peak if peak else None,
            **mem,
        }
        out.append(record("generate", "prefill", label, params=params, time_s=t, metrics=metrics))
    return out


def _nocache(plan, runner, base, cfg, recs, read, ctxs) -> list[dict]:
    """ref without a KV cache: a decode step at ctx is a forward over ctx tokens."""
    out = []
    prefills = {
        r["params"]["T"]: r
        for r in recs
        if r["case"] == "prefill"
        and r["backend"] == "ref"
        and r["status"] == "ok"
        and r["params"]["size"] == base["size"]
    }
    for ctx in ctxs:
        params = {**base, "B": 1, "ctx": ctx, "contexts": [ctx, ctx]}
        if ctx in prefills:
            t = prefills[ctx]["time_s"]
            source = "the ref prefill record at T = ctx"
        else:
            t = _time_prefill(plan, runner, np.zeros((1, ctx), np.int64), warmup=1)
            source = "a forward over ctx tokens"
        metrics = {
            "tokens_per_s": 1 / t["min"],
            "source": source,
            **_ceiling(cfg, 1, ctx, 1 / t["min"], read),
        }
        out.append(
            record("generate", "decode", "ref-nocache", params=params, time_s=t, metrics=metrics)
        )
    return out


def _ceiling(cfg, B, ctx, tokens_per_s, read, elt: int = 4) -> dict:
    if not read:
        return {}
    ceiling = decode_ceiling(cfg, B, ctx, read, elt)
    return {
        "bytes_per_step": weight_bytes(cfg, elt) + kv_bytes(cfg, B, ctx, elt),
        "ceiling_tokens_per_s": ceiling,
        "fraction_of_ceiling": tokens_per_s / ceiling,
    }


def _decode(plan, runner, label, base, cfg, B, ctx, read) -> dict:
    k = plan.decode_steps
    start = max(ctx - k - 1, 0)
    lo, hi = start + 2, start + k + 1  # keys attended by the timed steps
    params = {**base, "B": B, "ctx": ctx, "contexts": [lo, hi]}
    try:
        times, mem = with_peak_memory(
            lambda: runner["decode"](B, start, k + 1), gpu=base["device"] == "cuda"
        )
    except Exception as e:
        return error_record("generate", "decode", label, e, params=params)
    t = step_stats(times)
    tps = B / t["min"]
    elt = 2 if runner.get("dtype") == "bfloat16" else 4
    metrics = {"tokens_per_s": tps, **_ceiling(cfg, B, (lo + hi) // 2, tps, read, elt), **mem}
    if "attn" in runner:
        metrics["attn_implementation"] = runner["attn"]
    return record("generate", "decode", label, params=params, time_s=t, metrics=metrics)
