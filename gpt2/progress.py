"""A dependency-free progress bar on stderr (silent when stderr is not a terminal,
unless forced)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """`desc [#####-----]  50.0% 5/10 step 1.25 step/s ETA 4s postfix`: the rate counts from
    the first position set (a resumed run's bar starts where the run does), the ETA is what
    is left at that rate."""

    def __init__(self, total: float, desc: str = "", unit: str = "", enabled: bool | None = None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0.0
        self.start: float | None = None  # the first position set, and when
        self.t0 = time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self.postfix = ""

    def update(self, n: float = 1, postfix: str | None = None) -> None:
        self.set(self.n + n, postfix)

    def set(self, n: float, postfix: str | None = None) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start, self.t0 = n, now
        self.n = n
        if postfix is not None:
            self.postfix = postfix
        if self.enabled and (now - self._last > 0.1 or self.n >= self.total):
            self._last = now
            self._draw(now)

    def line(self, now: float) -> str:
        frac = min(self.n / self.total, 1.0) if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        done = self.n - (self.start or 0.0)
        rate = done / max(now - self.t0, 1e-9)
        eta = ""
        if done > 0 and self.n < self.total:
            eta = f" ETA {_duration((self.total - self.n) / rate)}"
        return (
            f"{self.desc} [{bar}] {frac * 100:5.1f}% {_fmt(self.n)}/{_fmt(self.total)}"
            f"{self.unit} {_rate(rate)}{self.unit}/s{eta} {self.postfix}"
        )

    def _draw(self, now: float) -> None:
        sys.stderr.write("\r" + self.line(now))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


def download_bar(enabled: bool | None = None) -> Callable[[int, str], Progress] | None:
    """The downloader's `progress` (weights.download.BarFactory): a byte bar per file on
    stderr, drawn when stderr is a terminal (None) or always (True); None, no bar, for False."""
    if enabled is False:
        return None
    return lambda total, name: Progress(total, desc=name, unit="B", enabled=enabled)


def note(message: str) -> None:
    """A line for the user on stderr, outside any bar (the downloader's retries)."""
    print(f"gpt2: {message}", file=sys.stderr, flush=True)


def _rate(x: float) -> str:
    """Three significant figures below 1000 (2.41 step/s, not 2), then as _fmt."""
    if abs(x) >= 1000:
        return _fmt(x)
    return f"{x:.3g}"


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.0f}{unit}" if unit == "" else f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"
