"""The ops suite: every op x backend x variant x shape, forward and backward.

Shape legend: B = batch, N = rows, C = n_embd, H = 4C (the MLP's hidden width), NH = heads,
hs = head size, Tq / Tk = query / key length, V = vocabulary.

Shapes come from the widths of the sizes asked for (--sizes): LayerNorm on (N, C); GELU and
bias+GELU on (N, H); linear (the MLP's c_fc) on (N, C) x (C, H); the embedding of N tokens
from (V, C) and (n_ctx, C); attention on (B=1, NH, T, hs) with Tq = Tk (prefill, forward and
backward) and with Tq = 1 (one decode step, forward); cross-entropy on (N, V).

Variants: a backend's VARIANTS[op]; where it lists none for an op, its contract pair
`<op>_forward` / `<op>_backward` as variant "default" (the reference lists no linear or
embedding variants, but exposes both).

Each record carries the op's compulsory work (bench/workload.py), the achieved GB/s and
FLOP/s, and `fraction_of_limit`: the roofline time (the least the measured limits allow)
over the measured min time. Baselines, where torch is installed: "torch-native" is
torch.nn.functional (layer_norm, gelu(approximate="tanh"), scaled_dot_product_attention,
cross_entropy), forward without autograd, backward through torch.autograd.grad. Its
bias_gelu, F.gelu(x + b) in eager mode, is the unfused torch pair: one kernel for the add,
one for the GELU.

On a CUDA device the suite also times the shapes issue 6 sets its GPU targets at (gpu_cases;
CUDA targets only, the CPU cases are the same with or without a GPU): LayerNorm on 8 x 1024
rows of 768 and on 64 x 1024 rows (far past any L2), GELU on 16 x 1024 rows of 3072, bias +
GELU on 8 x 1024 rows of 3072, causal attention in bfloat16 at B=8, NH=12, T=1024, hs=64 and
cross-entropy on 8 x 1024 rows of V = 50,257, the last two also as "forward+backward" (one
timed call: the forward that keeps what backward needs, then the backward). Their params carry
"dtype". On the GPU every op is timed by CUDA events around each call (GPU time, as
triton.testing.do_bench takes it), with the device's L2 flushed before each call when its
working set is under 4 x L2 (cache "flushed"), else it is far larger than L2 ("exceeds-llc");
the forward and forward+backward records carry peak_gpu_bytes (torch.cuda.max_memory_allocated
over one call, reset before it) and gpu_bytes_before (allocated when the call began).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from bench.backends import Backend, cuda_available, torch_devices
from bench.harness import CacheFlusher, cache_policy, error_record, llc_bytes, measure, record
from bench.plan import Plan, SuiteSetup
from bench.workload import device_limits, op_work, roofline


def cases(plan: Plan) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(op, shape, passes) for every shape of the plan."""
    out = []
    both = ("forward", "backward")
    for size, cfg in plan.widths:
        C, NH, hs = cfg.n_embd, cfg.n_head, cfg.head_size
        for N in plan.rows:
            out.append(("layernorm", {"size": size, "N": N, "C": C}, both))
            out.append(("gelu", {"size": size, "N": N, "H": 4 * C}, both))
            out.append(("bias_gelu", {"size": size, "N": N, "H": 4 * C}, both))
        for T in plan.attn_T:
            out.append(
                ("attention", {"size": size, "B": 1, "NH": NH, "Tq": T, "Tk": T, "hs": hs}, both)
            )
        for Tk in plan.attn_decode_Tk:
            out.append(
                (
                    "attention",
                    {"size": size, "B": 1, "NH": NH, "Tq": 1, "Tk": Tk, "hs": hs},
                    ("forward",),
                )
            )
        # the MLP's first projection (C -> 4C): a BLAS matmul in every numpy backend
        for N in [n for n in plan.rows if n <= plan.linear_max_rows]:
            out.append(("linear", {"size": size, "N": N, "C": C, "H": 4 * C}, both))
        out.append(
            (
                "embedding",
                {"size": size, "N": max(plan.rows), "C": C, "V": cfg.n_vocab, "n_ctx": cfg.n_ctx},
                both,
            )
        )
    V = plan.widths[0][1].n_vocab
    for N in plan.ce_rows:
        out.append(("crossentropy", {"N": N, "V": V}, both))
    return out


# issue 6's GPU shapes
GPT2_ROWS = 8 * 1024  # a B=8 x T=1024 batch of GPT-2 small
GPT2_C = 768
BIG_ROWS = 64 * 1024  # LayerNorm rows far past any L2: 192 MiB read, 192 MiB written
ATTN_T = 1024
CE_V = 50257


def gpu_cases(plan: Plan) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(op, shape, passes) of issue 6's GPU targets; toy shapes in the tiny mode (tests)."""
    if plan.mode == "tiny":
        size, N, big, C, B, NH, T, hs, V = "tiny", 32, 128, 64, 1, 4, 32, 16, 256
    else:
        size, N, big, C, B, NH, T, hs = "124M", GPT2_ROWS, BIG_ROWS, GPT2_C, 8, 12, ATTN_T, 64
        V = CE_V
    f32, fb = "float32", ("forward", "forward+backward")
    attn = {"size": size, "B": B, "NH": NH, "Tq": T, "Tk": T, "hs": hs, "dtype": "bfloat16"}
    return [
        ("layernorm", {"size": size, "N": N, "C": C, "dtype": f32}, ("forward", "backward")),
        ("layernorm", {"size": size, "N": big, "C": C, "dtype": f32}, ("forward",)),
        ("gelu", {"size": size, "N": big // 4, "H": 4 * C, "dtype": f32}, ("forward",)),
        ("bias_gelu", {"size": size, "N": N, "H": 4 * C, "dtype": f32}, ("forward",)),
        ("attention", attn, fb),
        ("crossentropy", {"N": N, "V": V, "dtype": f32}, fb),
    ]


def make_inputs(op: str, s: dict, rng: np.random.Generator) -> tuple[tuple, object]:
    """(forward args, dout) as numpy arrays for `op` at shape `s`."""

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    if op == "layernorm":
        C = s["C"]
        x = randn(s["N"], C)  # (N, C)
        return (x, np.ones(C, np.float32), np.zeros(C, np.float32)), randn(s["N"], C)
    if op == "gelu":
        return (randn(s["N"], s["H"]),), randn(s["N"], s["H"])  # (N, H)
    if op == "bias_gelu":
        return (randn(s["N"], s["H"]), randn(s["H"])), randn(s["N"], s["H"])
    if op == "attention":
        B, NH, Tq, Tk, hs = s["B"], s["NH"], s["Tq"], s["Tk"], s["hs"]
        q = randn(B, NH, Tq, hs)  # (B, NH, Tq, hs)
        k = randn(B, NH, Tk, hs)  # (B, NH, Tk, hs)
        v = randn(B, NH, Tk, hs)  # (B, NH, Tk, hs)
        return (q, k, v), randn(B, NH, Tq, hs)
    if op == "linear":
        x = randn(s["N"], s["C"])  # (N, C)
        w = randn(s["C"], s["H"])  # (C, H)
        return (x, w, randn(s["H"])), randn(s["N"], s["H"])
    if op == "embedding":
        N = s["N"]
        ids = rng.integers(0, s["V"], (1, N))  # (1, N)
        pos = (np.arange(N) % s["n_ctx"])[None, :]  # (1, N)
        wte = randn(s["V"], s["C"])  # (V, C)
        wpe = randn(s["n_ctx"], s["C"])  # (n_ctx, C)
        return (ids, pos, wte, wpe), randn(1, N, s["C"])
    if op == "crossentropy":
        logits = randn(s["N"], s["V"])  # (N, V)
        targets = rng.integers(0, s["V"], s["N"])  # (N,)
        return (logits, targets), 1.0
    raise ValueError(f"no inputs for op {op!r}")


# ---------------------------------------------------------------------------------------------
# torch.nn.functional baselines, wrapped in the (forward, backward) contract


def native_ops(device: str) -> dict:
    """{op: (forward, forward_with_graph, backward)} of torch.nn.functional on `device`."""
    import torch
    import torch.nn.functional as F

    def attention(q, k, v):
        Tq, Tk = q.shape[-2], k.shape[-2]
        if Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if Tq == 1:  # one decode query sees every key
            return F.scaled_dot_product_attention(q, k, v)
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    fns = {
        "embedding": lambda ids, pos, wte, wpe: wte[ids] + wpe[pos],
        "linear": lambda x, w, b: torch.addmm(b, x, w),
        "layernorm": lambda x, g, b: F.layer_norm(x, (x.shape[-1],), g, b, 1e-5),
        "gelu": lambda x: F.gelu(x, approximate="tanh"),
        "bias_gelu": lambda x, b: F.gelu(x + b, approximate="tanh"),
        "attention": attention,
        "crossentropy": lambda logits, targets: F.cross_entropy(logits, targets),
    }

    def pair(fn):
        def forward(*args):
            with torch.no_grad():
                return fn(*args), None

        def forward_graph(*args):
            leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
            out = fn(*leaves)
            return out, (out, [a for a in leaves if a.requires_grad])

        def backward(dout, cache):
            out, leaves = cache
            grad = torch.as_tensor(dout, dtype=out.dtype, device=out.device)
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)

        return forward, forward_graph, backward

    return {op: pair(fn) for op, fn in fns.items()}


# ---------------------------------------------------------------------------------------------


def _targets(backends: list[Backend], op: str):
    """(label, variant, device, to_device, sync, forward, forward_for_backward, backward)."""
    for be in backends:
        variants = be.module.VARIANTS.get(op)
        if not variants:  # the op's contract pair, which every backend exposes
            pair = [getattr(be.module, f"{op}_{d}", None) for d in ("forward", "backward")]
            variants = {"default": tuple(pair)} if all(pair) else {}
        for variant, fns in variants.items():
            fwd, bwd = fns
            yield be.name, variant, be.device, be.asarray, be.sync(), fwd, fwd, bwd
    for device in torch_devices():
        import torch

        fwd, fwd_graph, bwd = native_ops(device)[op]
        sync = torch.cuda.synchronize if device == "cuda" else None

        def to(a, device=device):
            return torch.from_numpy(a).to(device) if isinstance(a, np.ndarray) else a

        yield "torch-native", "torch.nn.functional", device, to, sync, fwd, fwd_graph, bwd


def _forward_backward(fwd, bwd, args: tuple, dout):
    """One training use of an op: forward keeping its cache, then backward."""
    return bwd(dout, fwd(*args)[1])


def _measure_backward(fwd, bwd, args, dout, flush, sync, kw) -> dict:
    """Time bwd(dout, cache) with a fresh forward before every call, untimed: a cache may be
    good for one backward only (an autograd graph), and the flush comes after the forward so
    the backward reads what the forward left from memory, as in a training step."""
    state = {}

    def before():
        state["cache"] = None
        state["cache"] = fwd(*args)[1]
        if sync is not None:
            sync()
        if flush is not None:
            flush()

    return measure(lambda: bwd(dout, state["cache"]), before=before, sync=sync, **kw)


def _device_flusher() -> tuple[Callable[[], None], int]:
    """(flush, L2 bytes) of the GPU: flush queues a rewrite of a device buffer of twice the L2,
    so the next timed call reads its inputs from device memory."""
    import torch

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or 64 * 1024**2  # 64 MiB: above any current L2
    buf = torch.empty(2 * l2 // 4, dtype=torch.float32, device="cuda")  # (2 L2 / 4,)

    def flush() -> None:  # queued, not waited for: the timed call's events follow it
        buf.fill_(1.0)

    return flush, l2


def _peak_gpu(call: Callable[[], object]) -> dict:
    """Device memory of one call: torch's peak of allocated bytes during it (reset first) and
    what was allocated when it began (its inputs and everything else alive)."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated(), "gpu_bytes_before": before}


def _cast(a, dtype: str):
    """A floating torch tensor in `dtype` (the GPU cases' bfloat16); anything else as is."""
    if dtype == "float32" or not hasattr(a, "is_floating_point") or not a.is_floating_point():
        return a
    import torch

    return a.to(getattr(torch, dtype))


def run(setup: SuiteSetup) -> list[dict]:
    plan, limits, rng = setup.plan, setup.limits, setup.rng
    llc = llc_bytes()
    flusher = CacheFlusher(llc)
    recs: list[dict] = []
    kw = {"budget_s": plan.budget_s, "max_repeats": plan.max_repeats, "warmup": 2}
    todo = [(*c, False) for c in cases(plan)]
    gpu_flush, l2 = None, 0
    if cuda_available():
        todo += [(*c, True) for c in gpu_cases(plan)]
        gpu_flush, l2 = _device_flusher()
    for i, (op, shape, passes, gpu_only) in enumerate(todo):
        setup.log(f"bench: ops {i + 1}/{len(todo)}: {op} {shape}")
        args_np, dout_np = make_inputs(op, shape, rng)
        dtype = shape.get("dtype", "float32")
        for label, variant, device, to, sync, fwd, fwd_cache, bwd in _targets(setup.backends, op):
            if (not setup.baselines and label == "torch-native") or (gpu_only and device != "cuda"):
                continue
            try:
                args = tuple(_cast(to(a), dtype) for a in args_np)
                dout = _cast(to(dout_np), dtype)
            except Exception as e:
                params = {**shape, "pass": "forward", "device": device}
                recs.append(error_record("ops", op, label, e, variant=variant, params=params))
                continue
            for direction in passes:
                params = {**shape, "pass": direction, "device": device}
                work = op_work(op, direction, shape)
                ws = work["read_bytes"] + work["write_bytes"]
                if device == "cpu":
                    cache = cache_policy(ws, llc)
                    before = flusher if cache == "flushed" else None
                elif gpu_flush is not None:
                    cache = cache_policy(ws, l2)
                    before = gpu_flush if cache == "flushed" else None
                else:
                    cache, before = "device-not-flushed", None
                if direction == "forward":
                    call = partial(fwd, *args)
                else:  # forward+backward: the forward that keeps the cache, then the backward
                    call = partial(_forward_backward, fwd_cache, bwd, args, dout)
                try:
                    ev = {"events": device == "cuda"}  # GPU time, as do_bench measures it
                    if direction == "backward":
                        t = _measure_backward(fwd_cache, bwd, args, dout, before, sync, kw | ev)
                    else:
                        t = measure(call, before=before, sync=sync, **kw, **ev)
                    mem = _peak_gpu(call) if device == "cuda" and direction != "backward" else {}
                except Exception as e:
                    recs.append(error_record("ops", op, label, e, variant=variant, params=params))
                    continue
                t_roof, bound = roofline(work, device_limits(limits, device, dtype))
                tm = t["min"]
                metrics = {
                    **work,
                    "GBps": ws / tm / 1e9,
                    "GFLOPs": work["flops"] / tm / 1e9,
                    "roofline_s": t_roof,
                    "bound": bound,
                    "fraction_of_limit": None if t_roof is None else t_roof / tm,
                    **mem,
                }
                recs.append(
                    record(
                        "ops",
                        op,
                        label,
                        variant=variant,
                        params=params,
                        time_s=t,
                        cache=cache,
                        metrics=metrics,
                    )
                )
    return recs
