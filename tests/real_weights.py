"""Where OpenAI's GPT-2 124M weights are, for the tests marked `real_weights`.

One rule for every test file: the weights are present when the cache's completion manifest
says so (`weights.download.is_complete`: the manifest plus every file it lists, at its size),
in $GPT2_CACHE or ~/.cache/gpt2-spec. A directory that merely exists (a download that failed,
leaving a lock file) is not a model.
"""

from __future__ import annotations

import pytest

from weights import download as dl

SKIP_REASON = (
    "GPT-2 124M is not in the cache ($GPT2_CACHE or ~/.cache/gpt2-spec; `gpt2 download 124M`)"
)


def cached_124m() -> str | None:
    """The 124M model directory when the cache holds the whole model, else None."""
    return dl.model_dir("124M") if dl.is_complete("124M") else None


needs_124m = pytest.mark.skipif(cached_124m() is None, reason=SKIP_REASON)
