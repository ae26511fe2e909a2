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
reference's per-row mat-vec on --backend ref, and on --backend numba the backend's
`qlinear_forward` over the weights in stored form (float32, or the --dtype the model was
loaded in), whose kernel for decode batches (M <= 64) computes every row in the same order
whatever else is in the batch (fast/numba/quant.py; the engine's tests check whole responses
bit for bit). Models decode_step cannot read (torch backends, LoRA adapters) decode each row
with its own `model.forward` of batch 1: invariant too, but without the shared weight reads.

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
# the row-invariant linear of the decode step (see the module docstring)


def plain_params(model) -> bool:
    """A numpy model whose weights decode_step can read: float32 arrays, or a stored tree
    (ref/quant.py, --dtype) whose projections and head are QWeights; no LoRA adapters."""
    from ref.model import Model

    if not isinstance(model, Model):
        return False
    p = model.params
    for blk in p["blocks"]:
        for part in blk.values():
            for leaf in part.values():
                if isinstance(leaf, dict) and set(leaf) != {"w", "b"}:
                    return False  # a projection with an adapter
    return True


def linear_for(model):
    """(linear, lm_head) for decode_step.

    --backend numba: the params as a stored tree (ref.quant.quantize_params; "float32" unless
    the model already holds --dtype weights), run by the backend's `qlinear_forward`, whose
    kernel for M <= ROWS_MAX_M rows computes each row in the same order whatever M is
    (fast/numba/quant.py; tests/test_numba_quant.py checks it bit for bit). Elsewhere: the
    reference's per-row mat-vec over the float32 weights.
    """
    from ref.quant import is_quantized, quantize_params

    p = model.params
    if getattr(model.ops, "__name__", "") != "fast.numba.backend":
        if is_quantized(p):
            raise ValueError("a stored (--dtype) model is served on --backend numba")
        return row_linear, None
    stored = p if is_quantized(p) else quantize_params(p, "float32")  # made once
    by_id = {}  # decode_step passes the float32 tree's w: map it to its stored form
    for blk, sblk in zip(p["blocks"], stored["blocks"], strict=True):
        for mod in ("attn", "mlp"):
            for proj in blk[mod]:
                by_id[id(blk[mod][proj]["w"])] = sblk[mod][proj]["w"]  # QWeight (N, K)
    head = stored["lm_head"]  # QWeight (V, C)
    by_id[id(head)] = head
    keep = (by_id, p, stored)  # the ids stay valid while these objects live
    qlinear = model.ops.qlinear_forward

    def linear(x, w, b=None):
        return qlinear(x, keep[0].get(id(w), w), b)  # (R, N)

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
            if max_batch > 64:  # fast/numba/quant.py's ROWS_MAX_M: beyond it, BLAS tiles
                raise ValueError(f"max_batch must be <= 64 for batch invariance, got {max_batch}")
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
