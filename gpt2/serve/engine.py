"""The serving engine: one scheduler thread owns the model and runs continuous batching.

Shape legend: R = rows in a decode step (one per sample of every running request),
K = a linear's input width, N = its output width, V = vocabulary.

A `Job` is one prompt with n samples. `Engine.submit` queues it (a bounded queue: `QueueFull`
beyond --max-queue); the scheduler loop, between decode steps:
  1. drops the rows of cancelled jobs (a client that left) and admits queued jobs while the
     batch has room: each prompt is prefilled alone (batch 1, `model.forward`) into its own
     KV cache, one copy per sample;
  2. chooses every row's next token from its logits with the sampler of `gpt2 generate`
     (`ref.sampling.choose` on that row alone, sample j drawing from default_rng([seed, j])),
     and handles <|endoftext|>, stop strings (`ref.generate.RowText`, across token
     boundaries) and max_tokens; finished rows leave;
  3. runs one decode step for all remaining rows together (`ref.batching.decode_step`).
A new request's first token is chosen right after its prefill, before the next decode step.

Batch invariance (a request's tokens never depend on the rows beside it): prefill is always
batch 1, sampling is per row, and the decode step is built so that each row is computed the
same way whatever R is (ref/batching.py). Its linears go through `linear_for(model)`: the
reference's per-row mat-vec on --backend ref, and on --backend numba the kernel below, which
computes every output as one dot product over K in the same order for every row (rows are
padded to a multiple of 4 and each group of 4 shares the weight loads; every lane runs the
same reduction, so a row's bits do not depend on its slot: tests/test_serve_engine.py checks
this bit for bit). Models whose params are not plain float32 arrays (torch backends, other
storage formats) decode each row with its own `model.forward` of batch 1: invariant too, but
without the shared weight reads.

Failures stay with their request: an exception in a job's prefill or sampling fails that job
(its sink receives an "error" event); if a batched decode step raises, each row is run alone
to find the rows that fail, and only their jobs fail.

Events a job's `emit` receives (from the scheduler thread; the sink must be thread-safe):
    {"type": "prompt_logprobs", "logprobs": [None, float, ...]}      (echo with logprobs)
    {"type": "delta", "index": j, "text": str, "tokens": [id], "logprobs": [float],
     "top": [[(id, logprob), ...]]}                                      (streamable text)
    {"type": "finish", "index": j, "reason": "stop" | "length", "completion_tokens": k}
    {"type": "done"}  |  {"type": "error", "message": str}
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gpt2.serve.metrics import ServerMetrics
from ref.batching import decode_step, row_linear
from ref.generate import EOT, RowText
from ref.sampling import SamplingParams, choose, log_softmax
from weights.tokenizer import decode_bytes


class QueueFull(RuntimeError):
    """The queue holds --max-queue requests already (the server answers 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests (503)."""


@dataclass(eq=False)
class Job:
    prompt: list[int]  # token ids, at least one
    max_tokens: int
    params: SamplingParams
    emit: Callable[[dict], None]
    n: int = 1
    seed: int | None = None  # sampling: sample j draws from default_rng([seed, j])
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False  # each token's log-prob (the model's, before the sampler)
    top_logprobs: int = 0  # and the most likely alternatives
    echo_logprobs: bool = False  # log-probs of the prompt's tokens too
    cancelled: bool = False  # set by the server when the client leaves
    t_submit: float = 0.0
    rows_left: int = 0
    failed: bool = False


@dataclass(eq=False)
class Row:
    job: Job
    index: int
    cache: object
    seq: list[int]  # prompt + generated: the penalties read it
    rng: np.random.Generator | None
    text: RowText
    counts: np.ndarray | None  # (V,) generated-token counts, for frequency/presence
    logits: np.ndarray | None = None  # (V,) the next token's, once computed
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    tops: list[list] = field(default_factory=list)
    sent: int = 0  # tokens already given to the sink
    t_last: float = 0.0


# ---------------------------------------------------------------------------------------------
# the row-invariant linear of --backend numba (see the module docstring)

_BLOCK_N = 16  # outputs per parallel work item
_ROW_GROUP = 4  # rows sharing one pass over a weight row


def _kernel():
    """The Numba kernel, compiled on first use (numba is optional for the engine); nogil, so
    the HTTP side keeps accepting and streaming while a step runs."""
    if _kernel.fn is not None:
        return _kernel.fn
    import numba
    from numba import prange

    from fast.numba.common import FASTMATH

    @numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
    def rows_matmul(x, wt, b, has_b, out):
        # x (R4, K) with R4 % 4 == 0, wt (N, K) contiguous, b (N,), out (R4, N): out[r, n] =
        # dot(x[r], wt[n]) (+ b[n]); each of the four lanes runs the same vectorised reduction
        R, K = x.shape
        N = wt.shape[0]
        for jb in prange((N + _BLOCK_N - 1) // _BLOCK_N):
            for n in range(jb * _BLOCK_N, min(N, jb * _BLOCK_N + _BLOCK_N)):
                bn = b[n] if has_b else np.float32(0.0)
                for r in range(0, R, 4):
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    s2 = np.float32(0.0)
                    s3 = np.float32(0.0)
                    for k in range(K):
                        w = wt[n, k]
                        s0 += x[r, k] * w
                        s1 += x[r + 1, k] * w
                        s2 += x[r + 2, k] * w
                        s3 += x[r + 3, k] * w
                    out[r, n] = s0 + bn
                    out[r + 1, n] = s1 + bn
                    out[r + 2, n] = s2 + bn
                    out[r + 3, n] = s3 + bn

    _kernel.fn = rows_matmul
    return rows_matmul


_kernel.fn = None


def numba_rows_matmul(x: np.ndarray, wt: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x (R, K) @ wt.T (+ b) -> (R, N), wt (N, K): row r's result depends on x[r] alone."""
    R, K = x.shape
    if wt.shape[1] != K or not wt.flags.c_contiguous or wt.dtype != np.float32:
        raise ValueError(f"numba_rows_matmul: wt must be contiguous float32 (N, {K})")
    R4 = -(-R // _ROW_GROUP) * _ROW_GROUP
    xp = np.zeros((R4, K), np.float32)  # (R4, K), zero rows pad the last group
    xp[:R] = x
    out = np.empty((R4, wt.shape[0]), np.float32)  # (R4, N)
    bias = np.zeros(1, np.float32) if b is None else np.ascontiguousarray(b, np.float32)
    _kernel()(xp, wt, bias, b is not None, out)
    return out[:R]


def plain_params(model) -> bool:
    """A numpy model whose weights are all float32 arrays (what decode_step reads)."""
    from ref.model import Model

    if not isinstance(model, Model):
        return False
    p = model.params
    leaves = [p["wte"], p["wpe"], p["ln_f"]["g"], p.get("lm_head", p["wte"])]
    for blk in p["blocks"]:
        for part in blk.values():
            for leaf in part.values():
                if isinstance(leaf, dict):  # a projection: w, b and nothing else (no LoRA)
                    if set(leaf) != {"w", "b"}:
                        return False
                    leaves += [leaf["w"], leaf["b"]]
                else:
                    leaves.append(leaf)
    return all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in leaves)


def linear_for(model):
    """(linear, lm_head) for decode_step: the Numba kernel over transposed copies of the
    weights on --backend numba (made once; the head is already (V, C)), else the reference's."""
    if getattr(model.ops, "__name__", "") != "fast.numba.backend":
        return row_linear, None
    transposed = {}
    for blk in model.params["blocks"]:
        for proj in (blk["attn"]["c_attn"], blk["attn"]["c_proj"]):
            transposed[id(proj["w"])] = np.ascontiguousarray(proj["w"].T)  # (N, K)
        for proj in (blk["mlp"]["c_fc"], blk["mlp"]["c_proj"]):
            transposed[id(proj["w"])] = np.ascontiguousarray(proj["w"].T)  # (N, K)
    p = model.params
    wte = np.ascontiguousarray(p.get("lm_head", p["wte"]))  # (V, C): tied, or its own head
    head = wte.T  # (C, V): the object decode_step passes back as w
    transposed[id(head)] = wte
    keep = (transposed, head)  # the ids stay valid while these objects live

    def linear(x, w, b=None):
        return numba_rows_matmul(x, keep[0][id(w)], b)  # (R, N)

    return linear, head


def clone_cache(cache):
    """An independent copy of a batch-1 KV cache (a sample of its own)."""
    c = copy.copy(cache)
    c.select(np.zeros(1, np.int64))  # select copies k and v (fancy indexing)
    return c


# ---------------------------------------------------------------------------------------------
# the engine


class Engine:
    """Continuous batching over `model` in a scheduler thread; `submit` jobs, `close` to stop."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 32,
        max_queue: int = 64,
        metrics: ServerMetrics | None = None,
        batched: bool | None = None,
    ):
        self.model = model
        self.cfg = model.cfg
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = ServerMetrics() if metrics is None else metrics
        self.batched = plain_params(model) if batched is None else batched
        if self.batched:
            self.linear, self.lm_head = linear_for(model)
        self.pending: deque[Job] = deque()
        self.rows: list[Row] = []
        self.cv = threading.Condition()
        self.closing = False
        self.steps = 0  # decode steps run (tests and metrics)
        self.thread = threading.Thread(target=self._loop, name="gpt2-serve-engine", daemon=True)

    # -- the HTTP side ------------------------------------------------------------------------

    def start(self) -> Engine:
        self.thread.start()
        return self

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request, all or none (QueueFull, EngineClosed)."""
        with self.cv:
            if self.closing:
                raise EngineClosed("the server is shutting down")
            if len(self.pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting (--max-queue)")
            now = time.perf_counter()
            for job in jobs:
                job.t_submit = now
                self.pending.append(job)
            self.metrics.queue.set(len(self.pending))
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        """The client left: its rows leave the batch at the next step."""
        job.cancelled = True
        with self.cv:
            self.cv.notify()

    def decode_kind(self) -> str:
        """How decode steps run, for the startup line."""
        if not self.batched:
            return "each row's own forward, batch 1"
        kernel = "Numba" if self.linear is not row_linear else "per-row mat-vec"
        return f"batched decode steps, row-invariant {kernel} linears"

    def load(self) -> dict:
        with self.cv:
            return {"queue": len(self.pending), "batch": len(self.rows)}

    def close(self, timeout: float = 30.0) -> bool:
        """Take no new jobs, finish those queued and running (up to `timeout` s), then stop.
        True if everything finished in time."""
        with self.cv:
            self.closing = True
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.pending and not self.rows and not self.closing:
                    self.cv.wait()
                if self.closing and not self.pending and not self.rows:
                    return
            self.run_once()

    def run_once(self) -> None:
        """One iteration of the scheduler: drop cancelled rows, admit queued jobs, choose each
        row's next token, run one decode step. The thread calls it in a loop; tests call it
        directly (without start()) to place arrivals at exact steps."""
        with self.cv:
            gone = [r for r in self.rows if r.job.cancelled]
            if gone:  # a client left: its rows (and their caches) go now
                self.metrics.finished.inc(len(gone), reason="cancelled")
                self.rows = [r for r in self.rows if not r.job.cancelled]
            admit = []
            room = self.max_batch - len(self.rows)
            while self.pending and (room > 0 or not self.rows):
                job = self.pending.popleft()
                if not job.cancelled:
                    admit.append(job)
                    room -= job.n
            self.metrics.queue.set(len(self.pending))
        for job in admit:
            self._prefill(job)
        self._choose_all()
        self._decode()
        self.metrics.batch.set(len(self.rows))

    def _fail(self, job: Job, e: BaseException) -> None:
        if job.failed:
            return
        job.failed = True
        self.rows = [r for r in self.rows if r.job is not job]
        self.metrics.finished.inc(reason="error")
        job.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})

    def _prefill(self, job: Job) -> None:
        try:
            ids = np.array([job.prompt], dtype=np.int64)  # (1, T)
            cache = self.model.new_cache(1, len(job.prompt) + job.max_tokens)
            logits = self.model.forward(ids, cache=cache, last_only=not job.echo_logprobs)
            self.metrics.prompt_tokens.inc(len(job.prompt))
            if job.echo_logprobs:  # the log-prob of each prompt token given those before it
                lp = log_softmax(logits[0, :-1])  # (T-1, V)
                given = [float(lp[t, job.prompt[t + 1]]) for t in range(len(job.prompt) - 1)]
                job.emit({"type": "prompt_logprobs", "logprobs": [None, *given]})
            last = logits[0, -1]  # (V,)
            V = last.shape[0]
            needs_counts = job.params.frequency_penalty != 0 or job.params.presence_penalty != 0
            job.rows_left = job.n
            caches = [cache] + [clone_cache(cache) for _ in range(job.n - 1)]  # one per sample
            for j, c in enumerate(caches):
                rng = None if job.seed is None else np.random.default_rng([job.seed, j])
                counts = np.zeros(V, np.int32) if needs_counts else None  # (V,)
                text = RowText(decode_bytes, job.stop)
                self.rows.append(Row(job, j, c, list(job.prompt), rng, text, counts, last))
        except Exception as e:  # the job's own failure, reported to it
            self._fail(job, e)

    def choose_row(self, row: Row) -> tuple[int, float, list]:
        """Row's next token, its log-prob and the top alternatives (per row: invariant)."""
        p = row.job.params
        rng = [row.rng] if row.rng is not None else np.random.default_rng(0)
        counts = None if row.counts is None else row.counts[None]  # (1, V)
        tok = int(choose(row.logits[None], p, [row.seq], rng, counts)[0])
        lp = None
        if row.job.logprobs:
            lp = log_softmax(row.logits[None])[0]  # (V,) the model's, before the sampler
        top = []
        if lp is not None and row.job.top_logprobs:
            k = row.job.top_logprobs
            idx = np.argpartition(-lp, k)[:k]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(int(i), float(lp[i])) for i in idx]
        return tok, (0.0 if lp is None else float(lp[tok])), top

    def _choose_all(self) -> None:
        now = time.perf_counter()
        keep = []
        for row in self.rows:
            if row.job.failed:
                continue
            try:
                if self._advance(row, now):
                    keep.append(row)
            except Exception as e:
                self._fail(row.job, e)
        self.rows = [r for r in keep if not r.job.failed]

    def _advance(self, row: Row, now: float) -> bool:
        """Choose, record and stream row's next token; False once the row has finished."""
        tok, lp, top = self.choose_row(row)
        row.logits = None
        if not row.tokens and row.t_last == 0.0:
            self.metrics.ttft.observe(now - row.job.t_submit)
        else:
            self.metrics.tpot.observe(now - row.t_last)
        row.t_last = now
        if tok == EOT:
            self._finish(row, "stop")
            return False
        row.tokens.append(tok)
        row.logps.append(lp)
        row.tops.append(top)
        row.seq.append(tok)
        self.metrics.tokens.inc()
        if row.counts is not None:
            row.counts[tok] += 1
        if row.text.push(tok):
            self._finish(row, "stop")
            return False
        if len(row.tokens) >= row.job.max_tokens:
            self._finish(row, "length")
            return False
        self._send(row, row.text.take_stream(done=False), len(row.tokens))
        return True

    def _send(self, row: Row, piece: str, limit: int) -> None:
        """Give the sink the new text and the tokens it covers (those whose text has all been
        streamed, and never past `limit`)."""
        ends = row.text.ends
        k = row.sent
        while k < min(limit, len(ends)) and ends[k] <= row.text.streamed:
            k += 1
        k = max(k, row.sent)
        if not piece and k == row.sent:
            return
        ev = {
            "type": "delta",
            "index": row.index,
            "text": piece,
            "tokens": row.tokens[row.sent : k],
        }
        if row.job.logprobs:
            ev["logprobs"] = row.logps[row.sent : k]
            ev["top"] = row.tops[row.sent : k]
        row.sent = k
        row.job.emit(ev)

    def _finish(self, row: Row, reason: str) -> None:
        rt = row.text
        if rt.flush():
            reason = "stop"
        k = rt.n_tokens()
        del row.tokens[k:], row.logps[k:], row.tops[k:]
        row.sent = min(row.sent, k)
        piece = rt.take_stream(done=True)
        # the last piece carries every token not sent yet
        ev = {"type": "delta", "index": row.index, "text": piece, "tokens": row.tokens[row.sent :]}
        if row.job.logprobs:
            ev["logprobs"] = row.logps[row.sent :]
            ev["top"] = row.tops[row.sent :]
        if piece or ev["tokens"]:
            row.job.emit(ev)
        row.sent = k
        self.metrics.finished.inc(reason=reason)
        row.job.emit(
            {"type": "finish", "index": row.index, "reason": reason, "completion_tokens": k}
        )
        row.job.rows_left -= 1
        if row.job.rows_left == 0:
            row.job.emit({"type": "done"})

    def _decode(self) -> None:
        """One step for every running row: logits for each row's next token."""
        rows = [r for r in self.rows if not r.job.failed]
        if not rows:
            return
        self.metrics.step_rows.observe(len(rows))
        self.steps += 1
        try:
            logits = self.step(rows)  # (R, V)
        except Exception:  # find the rows that fail alone; fail only their jobs
            logits = []
            for r in rows:
                try:
                    logits.append(self.step([r])[0])
                except Exception as e:
                    self._fail(r.job, e)
                    logits.append(None)
        for r, lg in zip(rows, logits, strict=True):
            r.logits = lg

    def step(self, rows: list[Row]) -> np.ndarray:
        """Logits (R, V) after feeding each row its last token."""
        tokens = np.array([r.tokens[-1] for r in rows], dtype=np.int64)  # (R,)
        if self.batched:
            m = self.model
            return decode_step(
                m.params, self.cfg, tokens, [r.cache for r in rows], ops=m.ops,
                linear=self.linear, lm_head=self.lm_head,
            )  # fmt: skip
        out = [
            self.model.forward(tokens[i : i + 1, None], cache=r.cache, last_only=True)[0, -1]
            for i, r in enumerate(rows)
        ]  # each (V,)
        return np.stack(out)  # (R, V)
