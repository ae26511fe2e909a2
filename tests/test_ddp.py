"""Data-parallel finetuning (fast/torch/train.py) on CPU: 2 processes, gloo, loopback.

torchrun (`python -m torch.distributed.run --standalone`) starts this file as a script in two
processes; each trains the same small model on its half of every micro-batch and saves its
losses and weights. The test compares them with one process training on the whole batch.

Tolerance: the only difference is float32 summation order (the two halves' gradients are
added by the all-reduce instead of inside one matmul), ~1e-7 relative on gradients. Losses:
2e-6 (a few ulps of a mean near 11). Weights: 1e-6 after 3 steps of lr 1e-3, with AdamW's
eps = 1e-4 so that round-off in near-zero gradients is not amplified into lr-sized moves
(see tests/test_torch_backend.py::compare_trainers). The two ranks hold bitwise identical
weights: DDP gives both the same all-reduced gradients and the optimizer is deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, ROOT)

from ref.config import GPT2Config  # noqa: E402
from ref.data import Split  # noqa: E402
from ref.train import TrainConfig  # noqa: E402
from weights.layout import expected_shapes, nest  # noqa: E402

# instruction batches are padded with <|endoftext|> (50256): the model needs the full vocabulary
CFG = GPT2Config(n_vocab=50257, n_ctx=16, n_embd=16, n_head=2, n_layer=2)
# 3 rows over 2 ranks (2 + 1) with different counts of ignored targets, 2 micro-batches a step
TCFG = TrainConfig(
    steps=3, batch_size=3, grad_accum=2, lr=1e-3, warmup=1, weight_decay=0.1, eps=1e-4,
    seed=7, mask_prompt=True, n_samples=0,
)  # fmt: skip
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf-tiny")


def setup() -> tuple[dict, Split]:
    rng = np.random.default_rng(0)
    flat = {}
    for name, shape in expected_shapes(CFG).items():
        a = 0.1 * rng.standard_normal(shape)
        flat[name] = (a + 1.0 if name.endswith("/g") else a).astype(np.float32)
    examples = []
    for _ in range(10):
        n = int(rng.integers(3, 16))
        examples.append((rng.integers(0, 50000, n).tolist(), int(rng.integers(1, n))))
    return nest(flat, CFG), Split("instruction", examples=examples, context_length=16)


def worker(out_dir: str) -> None:
    """One rank of the torchrun job: train and save losses and weights."""
    import torch.distributed as dist

    from fast.torch.train import distributed, train

    rank, world = distributed()
    assert world == 2, f"expected 2 processes, got {world}"
    params, split = setup()
    _, state, losses = train(params, CFG, split, None, TCFG, backend="torch", device="cpu")
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), losses=np.array(losses), **state.trainable)
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from fast.torch.train import train

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        os.path.abspath(__file__), str(tmp_path),
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    params, split = setup()
    _, state, losses = train(params, CFG, split, None, TCFG, backend="torch", device="cpu")
    ranks = [np.load(tmp_path / f"rank{i}.npz") for i in range(2)]
    for name in state.trainable:
        assert np.array_equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
    np.testing.assert_allclose(ranks[0]["losses"], losses, atol=2e-6, rtol=2e-6)
    for name, want in state.trainable.items():
        np.testing.assert_allclose(ranks[0][name], want, atol=1e-6, err_msg=name)


def _cli_losses(capsys, argv: list[str]) -> list[float]:
    from gpt2.cli import main

    assert main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    return [e["loss"] for e in events if e["event"] == "train"]


@pytest.mark.skipif(not os.path.isdir(FIXTURE), reason="tests/fixtures/hf-tiny is missing")
@pytest.mark.parametrize("lora", [[], ["--lora-rank", "2", "--lora-targets", "c_attn,c_fc"]])
def test_cli_finetune_torch_equals_ref_and_resumes_across_backends(tmp_path, capsys, lora):
    """`gpt2 finetune --backend torch` logs the numpy trainer's losses; a checkpoint saved by
    `--backend ref` resumes under `--backend torch` onto the uninterrupted run's losses. With
    LoRA too: the torch run saves its adapters beside the merged model, and resumes them."""
    pytest.importorskip("torch")
    data = tmp_path / "d.json"
    records = [{"instruction": f"Say {w}", "input": "", "output": f"{w}, {w}."} for w in
               ("hi", "cat", "dog", "sun", "moon", "tree", "red", "blue")]  # fmt: skip
    data.write_text(json.dumps(records), encoding="utf-8")
    base = ["finetune", "--model", FIXTURE, "--data", str(data), "--batch-size", "2"]
    # a constant rate (--min-lr-ratio 1): a 2-step run is then the 3-step run cut short
    base += ["--lr", "1e-3", "--min-lr-ratio", "1", "--samples", "0", "--json", *lora]
    ref = _cli_losses(capsys, [*base, "--out", str(tmp_path / "r"), "--steps", "3"])
    tor = _cli_losses(
        capsys, [*base, "--out", str(tmp_path / "t"), "--steps", "3", "--backend", "torch"]
    )
    # losses near 11 over ~70 tokens; the runs drift apart only by float32 round-off
    np.testing.assert_allclose(tor, ref, rtol=1e-5)
    first = _cli_losses(capsys, [*base, "--out", str(tmp_path / "x"), "--steps", "2"])
    assert first == ref[:2]  # the same numpy run, cut short: bitwise the same
    rest = _cli_losses(
        capsys,
        ["finetune", "--resume", str(tmp_path / "x"), "--steps", "3", "--backend", "torch",
         "--json"],
    )  # fmt: skip
    np.testing.assert_allclose(rest, ref[2:], rtol=1e-5)
    from weights import loader

    _, params = loader.load(str(tmp_path / "t"))  # the torch run's checkpoint loads
    assert params["wte"].shape == (50257, 24)
    assert (tmp_path / "t" / "adapter_model.safetensors").exists() == bool(lora)


if __name__ == "__main__":
    worker(sys.argv[1])
