"""The HTTP side of `gpt2 serve`: OpenAI's completions and chat API on FastAPI.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text). Every error is OpenAI's object,
{"error": {"message", "type", "param", "code"}}, with the status: 400 for a malformed body (the
field named in `param`), 401 a wrong or missing --api-key, 404 an unknown model or route, 413 a
body over --max-body-bytes, 429 a full queue (with Retry-After), 503 while shutting down, 500
when the request itself failed inside the engine (the server carries on).

Requests are parsed by hand rather than by pydantic models so that each message names the
field the way the API spells it, and so that the sampler's own checks (`ref.sampling`) apply.
Beside OpenAI's fields, the sampler's extra knobs are accepted as vLLM accepts them: top_k,
min_p, repetition_penalty, no_repeat_ngram_size. Unknown fields are refused, by name.

Chat messages become the Alpaca prompt of the instruction finetuning (`ref.prompts`): earlier
user/assistant turns as finished examples, the last user message as the instruction, a
system message before them all; generation stops at <|endoftext|> or where the model starts
a new `### Instruction` section, and leading whitespace of the answer is dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2.serve.engine import Engine, EngineClosed, Job, QueueFull
from ref.prompts import INSTRUCTION_STOP, alpaca_prompt
from ref.sampling import SamplingError, SamplingParams, check_params
from weights.tokenizer import decode, decode_bytes, encode

EOT = 50256
MAX_N = 16  # samples per prompt
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code=None,
                 type: str = "invalid_request_error", headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message, "type": self.type, "param": self.param,
                "code": self.code,
            }
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# fields


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bad(field: str, why: str) -> ApiError:
    return ApiError(400, f"{field}: {why}", param=field, code="invalid_value")


def _get(body: dict, field: str, kind: str, default):
    """body[field] checked against `kind` (int, number, bool, str); null means the default."""
    x = body.get(field)
    if x is None:
        return default
    ok = {"int": _is_int, "number": _is_num, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[kind](x)  # fmt: skip
    if not ok:
        what = {"int": "an integer", "number": "a finite number", "bool": "true or false",
                "str": "a string"}[kind]  # fmt: skip
        raise _bad(field, f"must be {what}, got {json.dumps(x)[:60]}")
    return x


COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options",
    "presence_penalty", "frequency_penalty", "logit_bias", "seed", "user",
    "top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size",
}  # fmt: skip
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


def _check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unrecognized request field", param=unknown[0],
                       code="unknown_field")  # fmt: skip


def sampling(body: dict, n_vocab: int) -> SamplingParams:
    """The sampler's params from the request (OpenAI's defaults: temperature 1, top_p 1)."""
    bias_in = body.get("logit_bias") or {}
    if not isinstance(bias_in, dict):
        raise _bad("logit_bias", "must be an object {token id: bias}")
    bias = {}
    for k, v in bias_in.items():
        try:
            tok = int(k)
        except ValueError:
            raise _bad("logit_bias", f"key {k!r} is not a token id") from None
        if not _is_num(v) and not (isinstance(v, (int, float)) and v == -math.inf):
            raise _bad("logit_bias", f"bias of token {k} must be a number, got {v!r}")
        bias[tok] = float(v)
    try:
        p = SamplingParams(
            temperature=float(_get(body, "temperature", "number", 1.0)),
            top_p=float(_get(body, "top_p", "number", 1.0)),
            top_k=_get(body, "top_k", "int", 0),
            min_p=float(_get(body, "min_p", "number", 0.0)),
            repetition_penalty=float(_get(body, "repetition_penalty", "number", 1.0)),
            frequency_penalty=float(_get(body, "frequency_penalty", "number", 0.0)),
            presence_penalty=float(_get(body, "presence_penalty", "number", 0.0)),
            no_repeat_ngram_size=_get(body, "no_repeat_ngram_size", "int", 0),
            logit_bias=bias,
        )
        check_params(p, n_vocab)
    except SamplingError as e:
        raise _bad(e.field, e.reason) from None
    return p


def stops(body: dict) -> list[str]:
    s = body.get("stop")
    if s is None:
        return []
    s = [s] if isinstance(s, str) else s
    if not isinstance(s, list) or not all(isinstance(t, str) and t for t in s):
        raise _bad("stop", "must be a non-empty string or a list of them")
    return list(s)


def prompts_of(body: dict, n_vocab: int) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "prompt: required", param="prompt", code="missing_field")
    p = body["prompt"]
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise _bad("prompt", "must be a string, a list of strings or of token ids, non-empty")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(encode(item) or [EOT])  # "" starts from <|endoftext|>, as in training
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            bad = [t for t in item if not 0 <= t < n_vocab]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} is outside the vocabulary [0, {n_vocab})")
            out.append(list(item))
        else:
            raise _bad("prompt", "each prompt must be a string or a non-empty list of token ids")
    return out


def render_chat(messages) -> str:
    """OpenAI messages -> the Alpaca text the finetuned model continues."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {role, content}")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                            "assistant"):  # fmt: skip
            raise _bad(f"messages[{i}]", "needs a role: system, user or assistant")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            if not all(isinstance(x, dict) and x.get("type") == "text" for x in c):
                raise _bad(f"messages[{i}].content", "only text parts are supported")
            c = "".join(str(x.get("text", "")) for x in c)
        if not isinstance(c, str):
            raise _bad(f"messages[{i}].content", "must be a string")
        if m["role"] in ("system", "developer"):
            system.append(c)
        else:
            turns.append((m["role"], c))
    if not turns or turns[-1][0] != "user":
        raise _bad("messages", "the last message must be the user's")
    text = "\n\n".join(system) + ("\n\n" if system else "")
    pending_user = None
    for role, c in turns:
        if role == "user":
            if pending_user is not None:  # two user messages in a row: one instruction
                c = pending_user + "\n\n" + c
            pending_user = c
        else:
            text += alpaca_prompt(pending_user or "") + c + "\n\n"
            pending_user = None
    return text + alpaca_prompt(pending_user)


# ---------------------------------------------------------------------------------------------
# the app


def create_app(
    engine: Engine,
    model_name: str,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
):
    app = FastAPI(title="gpt2 serve")
    metrics = engine.metrics
    cfg = engine.cfg
    created = int(time.time())

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _crash(request, e):
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                       type="server_error"))  # fmt: skip

    @app.middleware("http")
    async def _count(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception as e:  # an error no handler took: still an OpenAI error object
            response = error_response(ApiError(500, f"internal error: {e}", type="server_error"))
        metrics.requests.inc(endpoint=request.url.path[:40], code=response.status_code)
        return response

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")  # fmt: skip

    async def read_json(request: Request, allowed: set[str]) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes exceeds {max_body_bytes}",
                           code="body_too_large")  # fmt: skip
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body_bytes:
                raise ApiError(413, f"request body exceeds {max_body_bytes} bytes",
                               code="body_too_large")  # fmt: skip
        try:
            body = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}",
                           code="invalid_json") from None  # fmt: skip
        _check_fields(body, allowed)
        model = body.get("model")
        if model is not None and model != model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server runs "
                           f"{model_name!r}", param="model", type="not_found",
                           code="model_not_found")  # fmt: skip
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.load()}

    @app.get("/metrics")
    async def get_metrics(request: Request):
        authorize(request)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "gpt2-spec",
                "max_model_len": cfg.n_ctx}  # fmt: skip
        return {"object": "list", "data": [card]}

    def request_options(body: dict, prompts: list[list[int]], *, chat: bool) -> dict:
        params = sampling(body, cfg.n_vocab)
        n = _get(body, "n", "int", 1)
        if not 1 <= n <= MAX_N:
            raise _bad("n", f"must be in [1, {MAX_N}], got {n}")
        if not chat and _get(body, "best_of", "int", n) != n:
            raise _bad("best_of", "is not supported (only best_of == n)")
        if not chat and body.get("suffix") is not None:
            raise _bad("suffix", "is not supported")
        seed = _get(body, "seed", "int", None)
        if seed is not None and seed < 0:
            raise _bad("seed", f"must be >= 0, got {seed}")
        if seed is None and not params.greedy:
            seed = secrets.randbelow(2**31)  # reported back, so the request can be repeated
        longest = max(len(p) for p in prompts)
        field = "max_tokens"
        if chat and body.get("max_completion_tokens") is not None:
            field = "max_completion_tokens"
        max_tokens = _get(body, field, "int", None)
        if max_tokens is None:
            max_tokens = cfg.n_ctx - longest if chat else 16  # OpenAI's defaults
        if longest >= cfg.n_ctx:
            raise ApiError(400, f"prompt of {longest} tokens leaves no room in the model's "
                           f"context of {cfg.n_ctx}", param="prompt",
                           code="context_length_exceeded")  # fmt: skip
        if max_tokens < 1:
            raise _bad(field, f"must be >= 1, got {max_tokens}")
        if longest + max_tokens > cfg.n_ctx:
            raise ApiError(400, f"prompt of {longest} tokens + {field} {max_tokens} exceeds "
                           f"the model's context of {cfg.n_ctx}", param=field,
                           code="context_length_exceeded")  # fmt: skip
        stream = _get(body, "stream", "bool", False)
        so = body.get("stream_options")
        if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}):
            raise _bad("stream_options", 'must be {"include_usage": bool}')
        include_usage = bool(so and so.get("include_usage"))
        _get(body, "user", "str", None)
        stop = stops(body)
        if chat:
            want = _get(body, "logprobs", "bool", False)
            top = _get(body, "top_logprobs", "int", 0)
            if top and not want:
                raise _bad("top_logprobs", "needs logprobs: true")
            echo = False
        else:
            lp = _get(body, "logprobs", "int", None)
            want, top = lp is not None, lp or 0
            echo = _get(body, "echo", "bool", False)
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise _bad("top_logprobs" if chat else "logprobs",
                       f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")  # fmt: skip
        return dict(params=params, n=n, seed=seed, max_tokens=max_tokens, stream=stream,
                    include_usage=include_usage, stop=stop, logprobs=want, top=top,
                    echo=echo)  # fmt: skip

    async def run_jobs(request: Request, prompts, o: dict, extra_stop: list[str]):
        """Submit one job per prompt; yields (prompt index, event) until every job is done."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(i):
            def emit(ev):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
                except RuntimeError:  # the event loop has closed: nobody is listening
                    pass

            return emit

        jobs = [
            Job(p, o["max_tokens"], o["params"], sink(i), n=o["n"], seed=o["seed"],
                stop=extra_stop + o["stop"], logprobs=o["logprobs"], top_logprobs=o["top"],
                echo_logprobs=o["echo"] and o["logprobs"])
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None  # fmt: skip
        except EngineClosed as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        return jobs, queue

    async def events(request: Request, jobs, queue, *, watch: bool):
        """(prompt index, event) until every job is done; cancels the jobs if the caller
        stops early (a client that left) or, with `watch`, when the client disconnects."""
        done: set[int] = set()
        try:
            while len(done) < len(jobs):
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=0.25 if watch else None)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if ev["type"] in ("done", "error"):
                    done.add(i)
                yield i, ev
        finally:
            for i, job in enumerate(jobs):
                if i not in done:
                    engine.cancel(job)

    def usage(prompts, completion_tokens: int) -> dict:
        pt = sum(len(p) for p in prompts)
        return {"prompt_tokens": pt, "completion_tokens": completion_tokens,
                "total_tokens": pt + completion_tokens}  # fmt: skip

    def token_str(t: int) -> str:
        return decode([t])

    # -- /v1/completions ----------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await read_json(request, COMPLETION_FIELDS)
        prompts = prompts_of(body, cfg.n_vocab)
        o = request_options(body, prompts, chat=False)
        jobs, queue = await run_jobs(request, prompts, o, [])
        n = o["n"]
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
        if o["seed"] is not None:
            head["seed"] = o["seed"]
        prompt_texts = [decode(p) for p in prompts]

        def lp_obj(tokens, lps, tops, offset0: int) -> dict:
            offs, pos = [], offset0
            for t in tokens:
                offs.append(pos)
                pos += len(token_str(t))
            return {"tokens": [token_str(t) for t in tokens], "token_logprobs": list(lps),
                    "top_logprobs": [{token_str(a): b for a, b in tp} for tp in tops] if o["top"]
                    else [None] * len(tokens), "text_offset": offs}  # fmt: skip

        if o["stream"]:

            async def gen():
                done_tokens = 0
                offsets = {}
                async for i, ev in events(request, jobs, queue, watch=False):
                    if ev["type"] == "error":
                        yield sse(ApiError(500, ev["message"], type="server_error").body())
                        continue
                    if ev["type"] == "prompt_logprobs":
                        continue
                    if ev["type"] == "done":
                        continue
                    idx = i * n + ev["index"]
                    if ev["type"] == "delta":
                        text = ev["text"]
                        if o["echo"] and idx not in offsets:
                            text = prompt_texts[i] + text
                        choice = {"index": idx, "text": text, "finish_reason": None,
                                  "logprobs": None}  # fmt: skip
                        if o["logprobs"]:
                            choice["logprobs"] = lp_obj(ev["tokens"], ev["logprobs"], ev["top"],
                                                        offsets.get(idx, 0))  # fmt: skip
                        offsets[idx] = offsets.get(idx, 0) + len(text)
                    else:
                        done_tokens += ev["completion_tokens"]
                        choice = {"index": idx, "text": "", "finish_reason": ev["reason"],
                                  "logprobs": None}  # fmt: skip
                    yield sse({**head, "choices": [choice]})
                if o["include_usage"]:
                    yield sse({**head, "choices": [], "usage": usage(prompts, done_tokens)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        res = await collect(request, jobs, queue, n)
        choices, total = [], 0
        for i, rows in enumerate(res):
            for j, r in enumerate(rows):
                total += r["k"]
                text = (prompt_texts[i] if o["echo"] else "") + r["text"]
                lp = None
                if o["logprobs"]:
                    lp = lp_obj(r["tokens"], r["logprobs"], r["top"], 0)
                    if o["echo"]:
                        lp = echo_logprobs(prompts[i], r["prompt_logprobs"], lp)
                choices.append({"index": i * n + j, "text": text,
                                "finish_reason": r["reason"], "logprobs": lp})  # fmt: skip
        return {**head, "choices": choices, "usage": usage(prompts, total)}

    def echo_logprobs(prompt, plp, lp) -> dict:
        toks = [token_str(t) for t in prompt]
        offs, pos = [], 0
        for t in toks:
            offs.append(pos)
            pos += len(t)
        tops = [None] * len(toks)  # no alternatives for the prompt's tokens
        return {"tokens": toks + lp["tokens"], "token_logprobs": plp + lp["token_logprobs"],
                "top_logprobs": tops + lp["top_logprobs"],
                "text_offset": offs + [x + pos for x in lp["text_offset"]]}  # fmt: skip

    async def collect(request: Request, jobs, queue, n: int) -> list[list[dict]]:
        """Every event of a non-streamed request, gathered into one result per row."""
        res = [[{"text": "", "tokens": [], "logprobs": [], "top": [], "reason": None, "k": 0,
                 "prompt_logprobs": []} for _ in range(n)] for _ in jobs]  # fmt: skip
        async for i, ev in events(request, jobs, queue, watch=True):
            if ev["type"] == "error":
                raise ApiError(500, f"generation failed: {ev['message']}", type="server_error",
                               code="generation_failed")  # fmt: skip
            if ev["type"] == "prompt_logprobs":
                for r in res[i]:
                    r["prompt_logprobs"] = ev["logprobs"]
            elif ev["type"] == "delta":
                r = res[i][ev["index"]]
                r["text"] += ev["text"]
                r["tokens"] += ev["tokens"]
                r["logprobs"] += ev.get("logprobs", [])
                r["top"] += ev.get("top", [])
            elif ev["type"] == "finish":
                r = res[i][ev["index"]]
                r["reason"], r["k"] = ev["reason"], ev["completion_tokens"]
        if any(r["reason"] is None for rows in res for r in rows):  # the client left
            raise ApiError(499, "client closed the request", code="cancelled")
        return res

    # -- /v1/chat/completions -----------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = await read_json(request, CHAT_FIELDS)
        prompts = [encode(render_chat(body.get("messages")))]
        o = request_options(body, prompts, chat=True)
        jobs, queue = await run_jobs(request, prompts, o, [INSTRUCTION_STOP])
        n = o["n"]
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": now, "model": model_name}
        if o["seed"] is not None:
            head["seed"] = o["seed"]

        def content_lp(tokens, lps, tops) -> list[dict]:
            def entry(t, lp):
                s = token_str(t)
                return {"token": s, "logprob": lp, "bytes": list(decode_bytes([t]))}

            return [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in tp]}
                    for t, lp, tp in zip(tokens, lps, tops, strict=True)]  # fmt: skip

        if o["stream"]:
            chunk_head = {**head, "object": "chat.completion.chunk"}

            async def gen():
                started = set()
                done_tokens = 0
                for j in range(n):
                    delta = {"role": "assistant", "content": ""}
                    yield sse({**chunk_head, "choices": [{"index": j, "delta": delta,
                                                          "finish_reason": None}]})  # fmt: skip
                async for _, ev in events(request, jobs, queue, watch=False):
                    if ev["type"] == "error":
                        yield sse(ApiError(500, ev["message"], type="server_error").body())
                        continue
                    if ev["type"] == "done":
                        continue
                    j = ev["index"]
                    if ev["type"] == "delta":
                        text = ev["text"]
                        if j not in started:  # the answer starts after the header's blank
                            text = text.lstrip()
                            if text:
                                started.add(j)
                        choice = {"index": j, "delta": {"content": text} if text else {},
                                  "finish_reason": None, "logprobs": None}  # fmt: skip
                        if o["logprobs"]:
                            choice["logprobs"] = {
                                "content": content_lp(ev["tokens"], ev["logprobs"], ev["top"])
                            }
                        if not text and not ev["tokens"]:
                            continue
                    else:
                        done_tokens += ev["completion_tokens"]
                        choice = {"index": j, "delta": {}, "finish_reason": ev["reason"],
                                  "logprobs": None}  # fmt: skip
                    yield sse({**chunk_head, "choices": [choice]})
                if o["include_usage"]:
                    yield sse({**chunk_head, "choices": [], "usage": usage(prompts, done_tokens)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        res = await collect(request, jobs, queue, n)
        choices, total = [], 0
        for j, r in enumerate(res[0]):
            total += r["k"]
            lp = None
            if o["logprobs"]:
                lp = {"content": content_lp(r["tokens"], r["logprobs"], r["top"])}
            msg = {"role": "assistant", "content": r["text"].strip()}
            choices.append({"index": j, "message": msg, "finish_reason": r["reason"],
                            "logprobs": lp})  # fmt: skip
        return {**head, "choices": choices, "usage": usage(prompts, total)}

    return app


def sse(obj: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
