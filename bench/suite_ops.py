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
cross_entropy), forward without autograd, backward through torch.autograd.grad.
"""

from __future__ import annotations

import numpy as np

from bench.backends import Backend, cuda_available
from bench.harness import (
    CacheFlusher,
    cache_policy,
    error_text,
    llc_bytes,
    measure,
    record,
    silent,
)
from bench.plan import Plan
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


def _native_backends() -> list[tuple[str, str]]:
    """(backend label, device) of the torch baselines that can run here."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return []
    out = [("torch-native", "cpu")]
    if cuda_available():
        out.append(("torch-native", "cuda"))
    return out


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
    for label, device in _native_backends():
        import torch

        fwd, fwd_graph, bwd = native_ops(device)[op]
        sync = torch.cuda.synchronize if device == "cuda" else None

        def to(a, device=device):
            return torch.from_numpy(a).to(device) if isinstance(a, np.ndarray) else a

        yield label, "torch.nn.functional", device, to, sync, fwd, fwd_graph, bwd


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


def run(
    plan: Plan,
    backends: list[Backend],
    limits: dict,
    rng: np.random.Generator,
    native: bool = True,
    log=silent,
) -> list[dict]:
    llc = llc_bytes()
    flusher = CacheFlusher(llc)
    recs: list[dict] = []
    kw = {"budget_s": plan.budget_s, "max_repeats": plan.max_repeats, "warmup": 2}
    todo = cases(plan)
    for i, (op, shape, passes) in enumerate(todo):
        log(f"bench: ops {i + 1}/{len(todo)}: {op} {shape}")
        args_np, dout_np = make_inputs(op, shape, rng)
        for label, variant, device, to, sync, fwd, fwd_cache, bwd in _targets(backends, op):
            if not native and label == "torch-native":
                continue
            try:
                args = tuple(to(a) for a in args_np)
                dout = to(dout_np)
            except Exception as e:
                recs.append(
                    record(
                        "ops",
                        op,
                        label,
                        variant=variant,
                        status="error",
                        params={**shape, "pass": "forward", "device": device},
                        reason=error_text(e),
                    )
                )
                continue
            for direction in passes:
                params = {**shape, "pass": direction, "device": device}
                work = op_work(op, direction, shape)
                ws = work["read_bytes"] + work["write_bytes"]
                cache = cache_policy(ws, llc) if device == "cpu" else "device-not-flushed"
                before = flusher if cache == "flushed" else None
                try:
                    if direction == "forward":
                        t = measure(
                            lambda fwd=fwd, args=args: fwd(*args), before=before, sync=sync, **kw
                        )
                    else:
                        t = _measure_backward(fwd_cache, bwd, args, dout, before, sync, kw)
                except Exception as e:
                    recs.append(
                        record(
                            "ops",
                            op,
                            label,
                            variant=variant,
                            params=params,
                            status="error",
                            reason=error_text(e),
                        )
                    )
                    continue
                t_roof, bound = roofline(work, device_limits(limits, device))
                tm = t["min"]
                metrics = {
                    **work,
                    "GBps": ws / tm / 1e9,
                    "GFLOPs": work["flops"] / tm / 1e9,
                    "roofline_s": t_roof,
                    "bound": bound,
                    "fraction_of_limit": None if t_roof is None else t_roof / tm,
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
