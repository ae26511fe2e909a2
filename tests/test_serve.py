"""`gpt2 serve` over HTTP: the real `openai` client against a server this test starts on a
free port of 127.0.0.1 (the shipped shakespeare model, --backend numba), OpenAI's error
objects, a bounded load test with cancels and malformed requests, and SIGTERM under load.

Correct output is defined as what the same request gives served alone (and, for the sampler,
what `gpt2.generate` gives in this process): the server is deterministic per request.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "weights", "models", "shakespeare")
NAME = "shakespeare"
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "gpt2", "serve", "--model", SHAKESPEARE, "--backend", "numba",
        "--served-model-name", NAME, "--port", str(port), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()!r}")
        try:
            if raw("GET", "/health", port=port)[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up")


def raw(method: str, path: str, body=None, port: int = 0, headers: dict | None = None):
    """(status, headers, parsed body) of one request, with the standard library."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return r.status, dict(r.getheaders()), parsed


@pytest.fixture(scope="module")
def server():
    proc, port = start_server("--api-key", KEY, "--max-queue", "256")
    yield port
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0)


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def local():
    import gpt2

    return gpt2.load(SHAKESPEARE, backend="numba")


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    status, _, body = raw("GET", "/health", port=server)
    assert status == 200 and body["status"] == "ok"


def test_completion_greedy_and_seeded_match_generate(client, local):
    import gpt2

    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=20, temperature=0)
    want = gpt2.generate(local, "ROMEO:", 20)[0]
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 20
    r = client.completions.create(
        model=NAME, prompt="JULIET:", max_tokens=15, temperature=0.9, top_p=0.95, n=3, seed=7,
        extra_body={"top_k": 50},
    )  # fmt: skip
    want = gpt2.generate(local, "JULIET:", 15, temperature=0.9, top_p=0.95, top_k=50, seed=7,
                         num_return_sequences=3)  # fmt: skip
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.completions.create(
        model=NAME, prompt="JULIET:", max_tokens=15, temperature=0.9, top_p=0.95, n=3, seed=7,
        extra_body={"top_k": 50},
    )  # fmt: skip
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_stream_equals_non_stream_and_stop_across_tokens(client):
    full = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=30, temperature=0)
    text = full.choices[0].text
    assert "man.\n\nRO" in text  # ' man', '.', '\n', '\n', 'ROM': a stop over five tokens
    cut = text.split("man.\n\nRO")[0]
    for stream in (False, True):
        r = client.completions.create(
            model=NAME, prompt="ROMEO:", max_tokens=30, temperature=0, stop=["man.\n\nRO"],
            stream=stream,
        )  # fmt: skip
        if stream:
            chunks = list(r)
            got = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            got, reason = r.choices[0].text, r.choices[0].finish_reason
        assert got == cut and reason == "stop"
    chunks = list(
        client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=30, temperature=0,
                                  stream=True, stream_options={"include_usage": True})
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 30


def test_logprobs_and_echo(client, local):
    import numpy as np

    from ref.sampling import log_softmax
    from weights.tokenizer import encode

    r = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=5, temperature=0,
                                  logprobs=3, echo=True)  # fmt: skip
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith("ROMEO:") and "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and len(lp.tokens) == 3 + 5
    ids = encode(c.text)
    logits = local.forward(np.array([ids]))[0]  # (T, V)
    want = log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]]
    # the decode steps' linears sum in another order than the full forward: 1e-4 on log-probs
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    for tok, tops in zip(lp.tokens[3:], lp.top_logprobs[3:], strict=True):
        assert len(tops) == 3 and max(tops, key=tops.get) == tok  # greedy picks the top one


def test_chat_alpaca_prompt(client, local):
    import gpt2

    msgs = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0)
    want = gpt2.api.instruct(local, "Name a colour.", max_new_tokens=20)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20,
                                                 temperature=0, stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)


def test_errors_are_openai_objects(client, server):
    def post(body, path="/v1/completions", headers=AUTH):
        return raw("POST", path, body, port=server, headers=headers)

    cases = [
        (b"{not json", 400, None),
        ([1, 2], 400, None),
        ({"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": NAME, "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
        ({"model": NAME, "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
        ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": NAME, "prompt": [99999]}, 400, "prompt"),
        ({"model": NAME}, 400, "prompt"),
        ({"model": NAME, "prompt": "x", "temprature": 1}, 400, "temprature"),
        ({"model": NAME, "prompt": "x", "stop": [3]}, 400, "stop"),
        ({"model": NAME, "prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ({"model": NAME, "prompt": "x" * 2_000_000}, 413, None),
    ]
    for body, status, param in cases:
        got, _, err = post(body)
        assert got == status, (body if not isinstance(body, dict) else list(body), err)
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["param"] == param
    got, _, err = post({"model": NAME, "messages": [{"role": "assistant", "content": "x"}]},
                       "/v1/chat/completions")  # fmt: skip
    assert got == 400 and err["error"]["param"] == "messages"
    got, _, err = post({"model": NAME, "prompt": "x"}, headers={"Authorization": "Bearer no"})
    assert got == 401 and err["error"]["type"] == "authentication_error"
    got, _, err = raw("GET", "/v1/nothing", port=server)
    assert got == 404 and "error" in err
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt="x", max_tokens=1000)


def _stream_raw(port: int, body: dict, read_chunks: int | None = None) -> list:
    """Stream a completion with http.client; stop after `read_chunks` events (a client that
    leaves mid-stream) or read to [DONE]."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/v1/completions", json.dumps(body), {**AUTH,
              "Content-Type": "application/json"})  # fmt: skip
    r = c.getresponse()
    assert r.status == 200
    events = []
    while True:
        line = r.fp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            events.append("[DONE]")
            break
        events.append(json.loads(line[6:]))
        if read_chunks is not None and len(events) >= read_chunks:
            break
    c.close()
    return events


def test_load_200_requests_16_clients(client, server):
    """200 requests from 16 threads: well-formed ones (streamed or not) equal the same request
    served alone, malformed ones get their 400, cancelled streams free their rows; afterwards
    the server is healthy and its batch and queue are empty."""
    templates = []
    for i in range(8):
        body = {"model": NAME, "prompt": ["ROMEO:", "JULIET: O", "First Citizen:", "KING"][i % 4],
                "max_tokens": 12 + i, "temperature": 0 if i < 4 else 0.8, "seed": i}  # fmt: skip
        want = client.completions.create(**body).choices[0].text
        templates.append((body, want))
    rnd = random.Random(0)
    plan = [rnd.choice(["ok", "ok", "ok", "stream", "stream", "cancel", "bad"]) for _ in range(200)]

    def one(kind: str):
        body, want = rnd.choice(templates)
        if kind == "ok":
            return client.completions.create(**body).choices[0].text == want
        if kind == "stream":
            ev = _stream_raw(server, {**body, "stream": True})
            return ev[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in ev[:-1]) == want
        if kind == "cancel":
            ev = _stream_raw(server, {**body, "max_tokens": 60, "stream": True}, read_chunks=2)
            return len(ev) == 2
        status, _, err = raw("POST", "/v1/completions", {**body, "n": "two"}, port=server,
                             headers=AUTH)  # fmt: skip
        return status == 400 and err["error"]["param"] == "n"

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, plan))
    assert all(results), [k for k, ok in zip(plan, results, strict=True) if not ok]
    deadline = time.time() + 10
    while True:  # cancelled rows leave at the next step
        _, _, health = raw("GET", "/health", port=server)
        if health["batch"] == 0 and health["queue"] == 0 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert health == {"status": "ok", "model": NAME, "queue": 0, "batch": 0}
    _, _, metrics = raw("GET", "/metrics", port=server, headers=AUTH)
    assert "gpt2_time_to_first_token_seconds_bucket" in metrics
    assert 'gpt2_sequences_finished_total{reason="cancelled"}' in metrics
    assert "gpt2_batch_size 0" in metrics and "gpt2_queue_length 0" in metrics


def test_sigterm_drains_in_flight_requests():
    proc, port = start_server()
    body = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 80, "temperature": 0, "stream": True}
    out: list = [None] * 4

    def run(i):
        out[i] = _stream_raw(port, body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while raw("GET", "/health", port=port)[2]["batch"] < 4 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert proc.wait(60) == 0
    for ev in out:
        assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] == "length"
    assert len({"".join(e["choices"][0]["text"] for e in ev[:-1]) for ev in out}) == 1


def test_queue_full_is_429():
    """An engine that never runs (not started) fills its queue: the next request is 429 with
    Retry-After, through an app served in this process."""
    import uvicorn

    import gpt2
    from gpt2.serve.app import create_app
    from gpt2.serve.engine import Engine

    engine = Engine(gpt2.load(os.path.join(ROOT, "tests", "fixtures", "hf-tiny")), max_queue=1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, NAME), port=port,
                                           log_level="warning"))  # fmt: skip
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    try:
        waiting = threading.Thread(
            target=lambda: raw("POST", "/v1/completions", {"prompt": "a"}, port=port), daemon=True
        )
        waiting.start()
        while engine.load()["queue"] < 1:
            time.sleep(0.02)
        status, headers, err = raw("POST", "/v1/completions", {"prompt": "b"}, port=port)
        assert status == 429 and headers.get("retry-after") == "1"
        assert err["error"]["type"] == "rate_limit_error"
        engine.start()  # the waiting request now completes, so the shutdown has nothing to wait
        waiting.join(30)
    finally:
        server.should_exit = True
        t.join(10)
