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

Stored weight dtypes (issue 15), numba only, at the first model size: "numba-bf16",
"numba-f16", "numba-int8" (q8_0) and "numba-f32rows" (float32 QWeights through the same
row-invariant kernel) run ref.quant trees (`quantize_params`) at three points: decode batch 1
at the smallest context, prefill of 512 tokens (or n_ctx), and batched decode of 16 sequences
at context 256 (or the plan's nearest). Their decode records carry the bytes of weights a step
reads (`weight_bytes`, the stored sizes) and the GB/s that makes against the run's read_GBps.
Where bench/llama_cpp.py is present and `available()`, `llama_cpp_records` adds
"llama.cpp-<type>" rows (f32, f16, q8_0) for the same weights, prompt length, threads and
context (see it for the interface it expects).

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
        q_points = _quant_points(plan, cfg) if first else None
        runners = _runners(cfg, params, setup.backends, baselines)
        if first:
            runners = _chain(runners, _quant_runners(cfg, params, setup.backends))
        for label, device, runner in runners:
            setup.log(f"bench: generate {size} {label} ({device})")
            base = {"size": size, "device": device}
            if isinstance(runner, Exception):
                recs.append(error_record("generate", "decode", label, runner, params=base))
                continue
            read = limits.get("gpu_read_GBps" if device == "cuda" else "read_GBps")
            base["dtype"] = runner.get("dtype", "float32")
            quant = "weight_bytes" in runner
            if quant:  # the stored dtypes: their three points only
                recs += _prefill(plan, runner, label, base, cfg, q_points[0], limits, device)
                for B, ctx in q_points[1]:
                    recs.append(_decode(plan, runner, label, base, cfg, B, ctx, read))
                continue
            if runner["prefill"] is not None:
                lengths = prefill_T
                if label == "numba" and first:  # float32 beside the stored dtypes' prompt
                    lengths = sorted(set(prefill_T) | set(q_points[0]))
                recs += _prefill(plan, runner, label, base, cfg, lengths, limits, device)
                if label == "ref":
                    ctxs = sorted({c for B, c in points if B == 1})
                    recs += _nocache(plan, runner, base, cfg, recs, read, ctxs)
            hf = label == "hf-generate"
            for B, ctx in points:
                if hf and (B != 1 or ctx not in plan.hf_ctx):
                    continue
                recs.append(_decode(plan, runner, label, base, cfg, B, ctx, read))
        if first:
            recs += llama_cpp_records(setup, size, cfg, params, q_points)
    return recs


def _chain(*iterables):
    for it in iterables:
        yield from it


# ---------------------------------------------------------------------------------------------
# stored weight dtypes on numba (issue 15), and llama.cpp beside them

QUANT_LABELS = {"numba-f32rows": "float32", "numba-bf16": "bfloat16", "numba-f16": "float16",
                "numba-int8": "int8"}  # fmt: skip
LLAMA_CPP_TYPES = ("f32", "f16", "q8_0")  # llama.cpp's names of float32, float16 and q8_0


def _quant_points(plan: Plan, cfg: GPT2Config) -> tuple[list[int], list[tuple[int, int]]]:
    """(prefill lengths, (B, ctx) decode points) of the stored dtypes: a prompt of 512 tokens
    (or the plan's longest, if shorter), batch 1 at the smallest context, 16 sequences at
    context 256 (each clipped to the plan and the model: the tiny plan gives its own)."""
    # never above the plan's longest prompt: bench/ratios.py reads the longest of a size
    T = min(512, max([T for T in plan.prefill_T if T <= cfg.n_ctx], default=cfg.n_ctx))
    ctx1 = min([c for c in plan.decode_ctx if c <= cfg.n_ctx], default=1)
    B = 16 if 16 in plan.decode_batches else max(plan.decode_batches, default=1)
    ctxs = [c for c in plan.batch_ctx if c <= cfg.n_ctx]
    ctxB = 256 if 256 in ctxs else min(ctxs, default=ctx1)
    return [T], [(1, ctx1), (B, ctxB)]


def stored_weight_bytes(cfg: GPT2Config, tree: dict) -> int:
    """Bytes of weights a decode step of a quantized tree reads: its QWeights at their stored
    size, everything else (biases, LayerNorms, one row of wpe) in float32, as weight_bytes."""
    from ref.quant import PROJECTIONS, quantized_nbytes

    C = cfg.n_embd
    matrices = cfg.n_layer * sum(
        tree["blocks"][0][mod][proj]["w"].shape[0] * tree["blocks"][0][mod][proj]["w"].shape[1]
        for mod, proj in PROJECTIONS
    ) + cfg.n_vocab * C  # fmt: skip
    # weight_bytes counts wte once, as the head's read (the embedding's gather of a row is left
    # out there too); here the head is lm_head, one of the QWeights
    return quantized_nbytes(tree) + weight_bytes(cfg) - 4 * matrices


def _quant_runners(cfg: GPT2Config, params: dict, backends: list[Backend]):
    """(label, "cpu", runner or exception) per stored dtype on the numba backend."""
    be = next((b for b in backends if b.name == "numba"), None)
    if be is None:
        return
    from ref.model import Model
    from ref.quant import quantize_params

    for label, dtype in QUANT_LABELS.items():
        try:
            tree = quantize_params(params, dtype)
            runner = model_runner(Model(cfg, tree, be.module), dtype)
            runner["weight_bytes"] = stored_weight_bytes(cfg, tree)
            yield label, "cpu", runner
        except Exception as e:
            yield label, "cpu", e


def llama_cpp_records(setup: SuiteSetup, size: str, cfg: GPT2Config, params: dict, points):
    """llama.cpp rows beside the stored dtypes: THE HOOK for bench/llama_cpp.py (issue 15).

    Expects that module to offer `available() -> bool`, `export_gguf(cfg, params, path,
    gguf_type)` writing the params tree to a GGUF file of type f32 | f16 | q8_0, and
    `time_llama(gguf_path, threads, prompt_ids, n_decode, n_ctx) -> {"prefill_tokens_per_s",
    "decode_tokens_per_s"}`. Nothing when the module is absent or llama.cpp is not installed;
    an error record per type when a call fails. Same prompt length as our prefill, our
    thread count (numba's), decode steps at the contexts of our batch-1 point, each step timed
    (the best step's rate, as ours); batch 1 only (time_llama runs one sequence)."""
    try:
        from bench import llama_cpp
    except ImportError:
        return []
    if not llama_cpp.available():
        return []
    import os
    import tempfile

    try:  # our thread count: numba's where it is installed (the rows beside these)
        import numba

        threads = numba.get_num_threads()
    except ImportError:
        threads = os.cpu_count() or 1

    (T,), decode_points = points
    k = setup.plan.decode_steps
    ctx1 = decode_points[0][1]  # our batch-1 point: the same contexts as _decode's
    start = max(ctx1 - k - 1, 0) + 1  # ours time steps start + 2 ... start + k + 1
    start = min(start, T)
    prompt = [int(i) for i in setup.rng.integers(0, cfg.n_vocab, T)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for gtype in LLAMA_CPP_TYPES:
            label = f"llama.cpp-{gtype}"
            setup.log(f"bench: generate {size} {label} (cpu)")
            base = {"size": size, "device": "cpu", "dtype": gtype, "threads": threads}
            try:
                path = os.path.join(tmp, f"{size}-{gtype}.gguf")
                llama_cpp.export_gguf(cfg, params, path, gtype)
                r = llama_cpp.time_llama(path, threads, prompt, k, cfg.n_ctx, decode_start=start)
            except Exception as e:
                out.append(error_record("generate", "decode", label, e, params=base))
                continue
            out.append(
                record(
                    "generate", "prefill", label, params={**base, "B": 1, "T": T},
                    metrics={"tokens_per_s": r["prefill_tokens_per_s"]},
                )
            )  # fmt: skip
            out.append(
                record(
                    "generate", "decode", label,
                    params={**base, "B": 1, "ctx": ctx1, "contexts": r["decode_contexts"]},
                    metrics={"tokens_per_s": r["decode_tokens_per_s"],
                             "median_tokens_per_s": r["decode_median_tokens_per_s"],
                             "gomp_spincount": r["gomp_spincount"]},
                )
            )  # fmt: skip
    return out


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


def _stored_ceiling(cfg, B, ctx, tokens_per_s, read, wbytes: int) -> dict:
    """The ceiling of a step that reads `wbytes` of weights and a float32 KV cache, and the
    GB/s of weights the measured step reached (weight_GBps) against the bandwidth."""
    step_s = B / tokens_per_s
    out = {"weight_bytes": wbytes, "weight_GBps": wbytes / step_s / 1e9}
    if read:
        step = wbytes + kv_bytes(cfg, B, ctx)
        ceiling = B * read * 1e9 / step
        out.update(
            bytes_per_step=step,
            ceiling_tokens_per_s=ceiling,
            fraction_of_ceiling=tokens_per_s / ceiling,
            weight_fraction_of_read=wbytes / step_s / 1e9 / read,
        )
    return out


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
    mid = (lo + hi) // 2
    if "weight_bytes" in runner:  # stored dtypes: their own bytes, a float32 KV cache
        roof = _stored_ceiling(cfg, B, mid, tps, read, runner["weight_bytes"])
    else:
        roof = _ceiling(cfg, B, mid, tps, read, elt)
    metrics = {"tokens_per_s": tps, **roof, **mem}
    if "attn" in runner:
        metrics["attn_implementation"] = runner["attn"]
    return record("generate", "decode", label, params=params, time_s=t, metrics=metrics)
