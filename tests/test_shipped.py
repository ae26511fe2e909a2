"""The model that ships in the package (issue 14): `--model shakespeare`, trained here by
`gpt2 train` on lines 1-36,000 of tiny Shakespeare. Lines 36,001-40,000 were never trained
on; its loss there is the figure the README states, and transformers agrees with it."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from weights.loader import SHIPPED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = SHIPPED["shakespeare"]
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(MODEL, "model.safetensors")), reason="no shipped model"
)


def held_out() -> str:
    with open(os.path.join(ROOT, "weights", "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    assert len(lines) == 40000
    return "".join(lines[36000:40000])


def stated_loss(path: str) -> float:
    """The held-out loss a README states, as 'held-out loss **X**'."""
    with open(path, encoding="utf-8") as f:
        m = re.search(r"held-out loss \*\*(\d+\.\d+)\*\*", f.read())
    assert m, f"{path} states no held-out loss"
    return float(m.group(1))


@pytest.fixture(scope="module")
def heldout_loss() -> float:
    import gpt2

    model = gpt2.load("shakespeare")  # from the package: no cache, no network
    return gpt2.evaluate(model, held_out()).loss


def test_shipped_model_is_small_and_complete():
    size = sum(os.path.getsize(os.path.join(MODEL, f)) for f in os.listdir(MODEL))
    assert size <= 16 * 2**20, size
    for f in ("config.json", "model.safetensors", "log.jsonl", "loss.png", "README.md"):
        assert os.path.exists(os.path.join(MODEL, f)), f
    log = [json.loads(x) for x in open(os.path.join(MODEL, "log.jsonl"), encoding="utf-8")]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))


def test_held_out_loss_is_the_stated_figure(heldout_loss):
    """The README's figure is printed to 4 decimals: equal within 1e-4 (the rounding, 5e-5,
    plus float32 summation order across machines, ~1e-6 on a mean over 30k tokens)."""
    for readme in (os.path.join(ROOT, "README.md"), os.path.join(MODEL, "README.md")):
        assert abs(heldout_loss - stated_loss(readme)) <= 1e-4, (readme, heldout_loss)


def test_transformers_gives_the_same_held_out_loss(heldout_loss):
    """transformers' GPT2LMHeadModel on the same float16-stored weights (loaded as float32) and
    the same windows (n_ctx tokens, advancing by n_ctx, as gpt2 eval's default stride): the
    mean loss within 1e-4 (both in float32; measured differences are ~1e-6)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from ref.evaluate import windows
    from weights.tokenizer import encode

    m = transformers.GPT2LMHeadModel.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    ids = np.array(encode(held_out()))
    n_ctx = m.config.n_positions
    total = 0.0
    with torch.no_grad():
        for start, end, first in windows(len(ids), n_ctx, n_ctx):
            x = torch.tensor(ids[None, start:end])
            logp = torch.log_softmax(m(x).logits[0].double(), -1)  # (T, V)
            tgt = torch.tensor(ids[first:end])
            total -= float(logp[first - start - 1 : end - start - 1].gather(1, tgt[:, None]).sum())
    theirs = total / (len(ids) - 1)
    assert abs(theirs - heldout_loss) <= 1e-4, (theirs, heldout_loss)
