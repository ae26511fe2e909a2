"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: counters,
gauges and histograms with labels, enough for `GET /metrics`.

Each metric renders its `# HELP` and `# TYPE` lines, then one sample per label set; a histogram
has cumulative `_bucket{le=...}` samples ending at `+Inf`, then `_sum` and `_count`
(https://prometheus.io/docs/instrumenting/exposition_formats/). Updates come from the
scheduler thread and the HTTP handlers at once, so every metric takes one lock.
"""

from __future__ import annotations

import bisect
import math
import threading


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(str(labels[n]) for n in self.label_names), 0.0)

    def render(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items())
        lines = self.header()
        for key, v in items:
            lines.append(f"{self.name}{_labels(self.label_names, key)} {_num(v)}")
        return lines


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self.lock:
            self.values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        super().__init__(name, help)
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        i = bisect.bisect_left(self.bounds, x)  # le is inclusive: x == bound counts there
        with self.lock:
            self.counts[i] += 1
            self.sum += x
            self.count += 1

    def render(self) -> list[str]:
        with self.lock:
            counts, total, n = list(self.counts), self.sum, self.count
        lines = self.header()
        cum = 0
        for bound, c in zip(self.bounds + (math.inf,), counts, strict=True):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {cum}')
        lines += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {n}"]
        return lines


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The server's metrics, one object shared by the engine and the HTTP app."""

    def __init__(self):
        self.requests = Counter(
            "gpt2_requests_total", "HTTP requests by endpoint and status code", ("endpoint", "code")
        )
        self.prompt_tokens = Counter("gpt2_prompt_tokens_total", "prompt tokens prefilled")
        self.tokens = Counter("gpt2_generated_tokens_total", "tokens generated")
        self.finished = Counter(
            "gpt2_sequences_finished_total", "sequences ended, by reason", ("reason",)
        )
        self.queue = Gauge("gpt2_queue_length", "requests waiting to join the batch")
        self.batch = Gauge("gpt2_batch_size", "rows in the running batch")
        self.ttft = Histogram(
            "gpt2_time_to_first_token_seconds",
            "from a request's arrival at the engine to its first token",
            LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "gpt2_time_per_output_token_seconds",
            "time between a row's consecutive tokens",
            LATENCY_BUCKETS,
        )
        self.step_rows = Histogram(
            "gpt2_decode_step_rows", "rows in each decode step", (1, 2, 4, 8, 16, 32, 64)
        )

    def render(self) -> str:
        lines: list[str] = []
        for m in (
            self.requests, self.prompt_tokens, self.tokens, self.finished, self.queue,
            self.batch, self.ttft, self.tpot, self.step_rows,
        ):  # fmt: skip
            lines += m.render()
        return "\n".join(lines) + "\n"
