"""Load test of `gpt2 serve` against issue 16's targets, all measured in one run.

    python -m bench.tools.serve_load [--tokens 64] [--clients 16] [--backend numba] [--repeat 3]

Model: GPT-2 124M's shapes with random weights (bench/workload.py random_params; speed does
not depend on the values), written once to a temporary model directory. Every request is
greedy with <|endoftext|> banned (logit_bias -100), so each stream runs its full --tokens.

    generate    `gpt2 generate --json` on the same model and backend: its decode tokens/s
    single      one streaming client: decode tokens/s, from its first token to its last
    ttft_idle   time to the first token of a short prompt on an idle server (median of 5)
    aggregate   --clients concurrent streams: (tokens after each stream's first) / (first
                first-token to last last-token)
    (single and aggregate are measured --repeat times in turn, and their medians compared: one
    64-token stream lasts a second or two, and the machine's other tenants move it by 30%)
    ttft_load   time to the first token of a short prompt while --clients - 1 others decode
                (median of 5 probes, one after the other, each after a seeded random pause of
                0-0.2 s: a request waits for the step in flight, so one probe's figure
                depends on where in that step it lands)

Targets: aggregate >= 4 x single; ttft_load <= 3 x ttft_idle; single >= 0.9 x generate.
Prints one JSON object with the figures, the ratios and the machine's load average before and
after (timings on a shared machine are only as good as its idleness).

The server is a subprocess (`python -m gpt2 serve`): bench/ sits below gpt2/ in the layers and
imports nothing from it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from bench.workload import random_params
from ref.config import SIZES
from weights import safetensors as st
from weights.checkpoint import hf_tensors

PROMPT = "The meaning of life is"
NO_EOT = {"50256": -100}


PROBES = 5  # time-to-first-token probes, idle and under load


def write_model(directory: str) -> None:
    cfg = SIZES["124M"]
    params = random_params(cfg, np.random.default_rng(0))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf_config(), f)
    st.write(os.path.join(directory, "model.safetensors"), hf_tensors(params))


def stream(port: int, prompt: str, tokens: int) -> dict:
    """One streaming completion: {"start", "first", "last", "n", "first_s"} (perf_counter
    seconds; first_s = first - start, the time to the first token)."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "logit_bias": NO_EOT}  # fmt: skip
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    first = last = None
    n = 0
    for line in r:
        if not line.startswith(b"data: {"):
            continue
        ch = json.loads(line[6:])["choices"][0]
        if ch["text"]:
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            n += 1
    c.close()
    return {"start": t0, "first": first, "last": last, "n": n, "first_s": first - t0}


def health(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/health")
    out = json.loads(c.getresponse().read())
    c.close()
    return out


def decode_rate(s: dict) -> float:
    return (s["n"] - 1) / (s["last"] - s["first"])


def aggregate(port: int, clients: int, tokens: int) -> float:
    """`clients` concurrent streams: (tokens after each stream's first) / (first first-token
    to last last-token)."""
    results: list = [None] * clients

    def client(i: int) -> None:
        results[i] = stream(port, PROMPT, tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(r["first"] for r in results)
    last = max(r["last"] for r in results)
    return sum(r["n"] - 1 for r in results) / (last - first)


def load_average() -> list[float]:
    return list(os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--repeat", type=int, default=3, help="single/aggregate rounds (median)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    out: dict = {"load_before": load_average(), "tokens": args.tokens, "clients": args.clients}
    with tempfile.TemporaryDirectory() as d:
        write_model(d)
        gen = subprocess.run(
            [sys.executable, "-m", "gpt2", "generate", PROMPT, "--model", d, "--backend",
             args.backend, "-n", str(args.tokens), "--json", "--logit-bias", "50256=-100"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        out["generate_tok_s"] = json.loads(gen.stdout)["timing"]["tokens_per_s"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "gpt2", "serve", "--model", d, "--backend", args.backend,
             "--port", str(port), "--max-batch", str(max(32, args.clients))],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(600):
                try:
                    stream(port, "x", 2)  # up, and the kernels compiled
                    break
                except OSError:
                    time.sleep(0.5)
            idle = [stream(port, "Hi", 2)["first_s"] for _ in range(PROBES)]
            out["ttft_idle_s"] = statistics.median(idle)
            out["ttft_idle_all_s"] = idle
            singles, aggregates = [], []
            for _ in range(args.repeat):  # single then aggregate, in turn: noise falls on both
                singles.append(decode_rate(stream(port, PROMPT, args.tokens)))
                aggregates.append(aggregate(port, args.clients, args.tokens))
            out["single_tok_s"] = statistics.median(singles)
            out["single_all_tok_s"] = singles
            out["aggregate_tok_s"] = statistics.median(aggregates)
            out["aggregate_all_tok_s"] = aggregates
            busy = [None] * (args.clients - 1)

            def background(i: int) -> None:
                busy[i] = stream(port, PROMPT, args.tokens)

            threads = [threading.Thread(target=background, args=(i,)) for i in range(len(busy))]
            for t in threads:
                t.start()
            deadline = time.time() + 300
            while health(port)["batch"] < len(busy) and time.time() < deadline:
                time.sleep(0.05)  # wait until all the others are decoding
            probes = []
            wait = random.Random(0)
            for _ in range(PROBES):  # at seeded random phases of the step in flight
                if health(port)["batch"] < len(busy):
                    break  # the others are finishing: no longer under load
                time.sleep(wait.uniform(0.0, 0.2))
                probes.append(stream(port, "Hi", 2)["first_s"])
            out["ttft_load_s"] = statistics.median(probes)
            out["ttft_load_all_s"] = probes
            for t in threads:
                t.join()
        finally:
            server.terminate()
            server.wait(120)
    out["aggregate_over_single"] = out["aggregate_tok_s"] / out["single_tok_s"]
    out["ttft_load_over_idle"] = out["ttft_load_s"] / out["ttft_idle_s"]
    out["single_over_generate"] = out["single_tok_s"] / out["generate_tok_s"]
    out["load_after"] = load_average()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
