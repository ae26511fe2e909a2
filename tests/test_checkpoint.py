"""`gpt2 finetune` end to end on a small model with GPT-2's vocabulary: its checkpoint loads in
transformers and as `--model`, resuming reproduces the uninterrupted run bit for bit, and a
process killed (SIGKILL, for real) during a save leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_model import tiny_params

from gpt2.cli import main
from ref.config import GPT2Config
from ref.data import DataError, read_instructions
from ref.model import forward
from weights import checkpoint, loader
from weights import safetensors as sft

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# GPT-2's vocabulary (the data is tokenised for real), everything else tiny
CFG = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
TEXT = (
    "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it "
    "was no great surprise to me to hear that, in the height of his glory, he had dropped his "
    "painting, married a rich widow, and established himself in a villa on the Riviera. "
) * 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    base = d / "base"
    base.mkdir()
    sft.write(str(base / "model.safetensors"), checkpoint.hf_tensors(tiny_params(CFG, seed=1)))
    (base / "config.json").write_text(json.dumps(CFG.to_hf_config()))
    (d / "data.txt").write_text(TEXT, encoding="utf-8")
    with open(
        os.path.join(ROOT, "weights", "data", "instruction-data.json"), encoding="utf-8"
    ) as f:
        records = json.load(f)[:12]
    (d / "data.json").write_text(json.dumps(records), encoding="utf-8")
    return d


def finetune(capsys, *argv: str) -> list[dict]:
    """Run `gpt2 finetune ... --json` in-process; the JSON log lines."""
    capsys.readouterr()
    rc = main(["finetune", *argv, "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def losses(log: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log if e["event"] == "train"}


COMMON = [
    "--steps",
    "6",
    "--batch-size",
    "2",
    "--context-length",
    "16",
    "--lr",
    "1e-2",
    "--warmup",
    "2",
    "--seed",
    "3",
    "--samples",
    "1",
]


def test_checkpoint_loads_in_transformers_and_as_model(files, capsys, tmp_path):
    out = tmp_path / "out"
    log = finetune(
        capsys,
        "--model",
        str(files / "base"),
        "--data",
        str(files / "data.txt"),
        "--out",
        str(out),
        *COMMON,
        "--eval-every",
        "3",
    )
    assert [e["step"] for e in log if e["event"] == "val"] == [3, 6]
    assert [e["step"] for e in log if e["event"] == "checkpoint"] == [6]
    assert any(e["event"] == "sample" for e in log)
    cfg, params = loader.load(str(out))  # works as --model
    assert cfg == CFG
    ids = np.random.default_rng(0).integers(0, CFG.n_vocab, (2, 12))
    ours = forward(params, ids, cfg)
    before = forward(loader.load(str(files / "base"))[1], ids, cfg)
    assert np.abs(ours - before).max() > 1e-3  # training changed the model

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    # float32 forward of 2 layers, C = 32: the two implementations sum in different orders;
    # 1e-4 of the logit scale is ~100x the round-off
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())

    capsys.readouterr()
    assert main(["eval", str(files / "data.txt"), "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_lora_checkpoint_merges_and_saves_adapters_alone(files, capsys, tmp_path):
    out = tmp_path / "lora"
    finetune(
        capsys,
        "--model",
        str(files / "base"),
        "--data",
        str(files / "data.json"),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lora-rank",
        "2",
        "--lora-alpha",
        "4",
        "--lora-targets",
        "c_attn,mlp_c_proj",
        "--lora-dropout",
        "0.1",
        "--mask-prompt",
        "--samples",
        "0",
    )
    adapters = sft.read(str(out / checkpoint.ADAPTER))
    assert sorted(adapters) == sorted(
        f"h{i}/{m}/lora_{x}" for i in range(2) for m in ("attn/c_attn", "mlp/c_proj") for x in "ab"
    )
    acfg = json.loads((out / checkpoint.ADAPTER_CONFIG).read_text())
    assert (
        acfg["rank"] == 2 and acfg["alpha"] == 4.0 and acfg["targets"] == ["c_attn", "mlp_c_proj"]
    )
    # the merged model = base + scale * A @ B on each adapted projection, nothing else changed
    _, base = loader.load(str(files / "base"))
    _, merged = loader.load(str(out))
    for i in range(2):
        a, b = adapters[f"h{i}/attn/c_attn/lora_a"], adapters[f"h{i}/attn/c_attn/lora_b"]
        want = base["blocks"][i]["attn"]["c_attn"]["w"] + np.float32(2.0) * (a @ b)
        np.testing.assert_array_equal(merged["blocks"][i]["attn"]["c_attn"]["w"], want)
        np.testing.assert_array_equal(
            merged["blocks"][i]["mlp"]["c_fc"]["w"], base["blocks"][i]["mlp"]["c_fc"]["w"]
        )


def _spawn(args: list[str], env_extra: dict) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2", "finetune", *args, "--json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"finetune exited early: {proc.stderr.read().decode()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the finetune subprocess")
        time.sleep(0.01)


def _committed_step(out) -> int | None:
    try:
        return checkpoint.read_state(str(out))["step"]
    except Exception:
        return None


def test_kill_mid_save_then_resume_is_bit_identical(files, capsys, tmp_path):
    """Save at step 3 completes; the process is SIGKILLed inside the step-6 save (paused by the
    test hook right after the new optimizer file). The step-3 checkpoint must load, and resuming
    it must give the uninterrupted run's losses for steps 4..6 exactly."""
    args = [
        "--model",
        str(files / "base"),
        "--data",
        str(files / "data.txt"),
        *COMMON,
        "--save-every",
        "3",
        "--grad-accum",
        "2",
        "--weight-decay",
        "0.1",
    ]
    full = losses(finetune(capsys, *args, "--out", str(tmp_path / "full")))
    out = tmp_path / "killed"
    proc = _spawn([*args, "--out", str(out)], {"GPT2_SPEC_SAVE_PAUSE": "1"})
    try:
        _wait_for(lambda: (out / "optimizer-00000006.safetensors").exists(), proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.read_state(str(out))["step"] == 3  # the previous checkpoint stands
    loader.load(str(out))
    resumed = losses(finetune(capsys, "--resume", str(out)))
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {s: full[s] for s in (4, 5, 6)}  # bit-identical
    assert checkpoint.read_state(str(out))["step"] == 6
    assert sorted(p for p in os.listdir(out) if p.startswith("optimizer-")) == [
        "optimizer-00000006.safetensors"
    ]


def test_kill_at_random_moments_leaves_a_loadable_checkpoint(files, capsys, tmp_path):
    """SIGKILL at random times while a run saves after every step: whatever committed last
    loads, its optimizer state is there, and the run resumes from it."""
    rng = np.random.default_rng(0)
    steps = set()
    for attempt in range(3):
        out = tmp_path / f"random{attempt}"
        args = [
            "--model",
            str(files / "base"),
            "--data",
            str(files / "data.txt"),
            "--steps",
            "500",
            # a constant rate: the resumed run below may then stop at another step count
            "--min-lr-ratio",
            "1",
            "--batch-size",
            "2",
            "--context-length",
            "16",
            "--save-every",
            "1",
            "--samples",
            "0",
            "--out",
            str(out),
        ]
        proc = _spawn(args, {"GPT2_SPEC_SAVE_PAUSE": "0.01"})
        try:
            _wait_for(lambda: _committed_step(out) is not None, proc)  # noqa: B023
            time.sleep(float(rng.uniform(0.0, 1.0)))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        state = checkpoint.read_state(str(out))
        steps.add(state["step"])
        cfg, _ = loader.load(str(out))
        moments, _ = checkpoint.read_optimizer(str(out), state)
        assert len(moments["m"]) == len(moments["v"]) == 4 + 12 * cfg.n_layer  # every tensor
        log = finetune(capsys, "--resume", str(out), "--steps", str(state["step"] + 1))
        assert sorted(losses(log)) == [state["step"] + 1]
    print(f"killed after steps {sorted(steps)}")


def test_resume_refuses_changed_settings(files, capsys, tmp_path):
    out = tmp_path / "r"
    finetune(
        capsys,
        "--model",
        str(files / "base"),
        "--data",
        str(files / "data.txt"),
        "--out",
        str(out),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--context-length",
        "16",
        "--samples",
        "0",
    )
    assert main(["finetune", "--resume", str(out), "--lr", "0.5"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(out)]) == 2  # already at its last step
    assert "--steps" in capsys.readouterr().err


def test_unreadable_state_is_a_weights_error(tmp_path):
    (tmp_path / "dir" / checkpoint.MODEL).mkdir(parents=True)  # a directory, not a file
    with pytest.raises(checkpoint.WeightsError, match="cannot read"):
        checkpoint.read_state(str(tmp_path / "dir"))
    (tmp_path / "deep").mkdir()
    header = b"[" * 100_000  # json.loads hits the recursion limit
    (tmp_path / "deep" / checkpoint.MODEL).write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(checkpoint.WeightsError, match="not valid JSON"):
        checkpoint.read_state(str(tmp_path / "deep"))


def test_resume_refuses_moments_of_another_shape(files, capsys, tmp_path):
    # a (1, C) moment for wpe (n_ctx, C) broadcast silently in AdamW before this was checked
    out = tmp_path / "m"
    base = ["--model", str(files / "base"), "--data", str(files / "data.txt")]
    # a constant rate, so the 1-step run may be extended (the moments are then read)
    finetune(
        capsys, *base, "--out", str(out), *COMMON[2:6], "--steps", "1", "--samples", "0",
        "--min-lr-ratio", "1",
    )  # fmt: skip
    state = checkpoint.read_state(str(out))
    path = str(out / state["optimizer_file"])
    tensors = {k: np.array(v) for k, v in sft.read(path).items()}
    tensors["m/wpe"] = tensors["m/wpe"][:1]
    sft.write(path, tensors)
    assert main(["finetune", "--resume", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "m/wpe" in err and "shape" in err


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--lr", "-1"], "--lr"),
        (["--steps", "0"], "--steps"),
        (["--steps", "3", "--epochs", "1"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--grad-accum", "0"], "--grad-accum"),
        (["--warmup", "-1"], "--warmup"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--lora-rank", "-1"], "--lora-rank"),
        (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
        (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout"),
        (["--lora-rank", "4", "--lora-targets", "q_proj"], "--lora-targets"),
        (["--context-length", "1"], "--context-length"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--seed", "-2"], "--seed"),
    ],
)
def test_flags_are_checked_before_the_model_loads(files, capsys, tmp_path, extra, word):
    """--model names a directory that does not exist: the flag error must come first."""
    argv = [
        "finetune",
        "--model",
        str(tmp_path / "missing"),
        "--data",
        str(files / "data.txt"),
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert word in err and "missing" not in err


def test_data_and_out_errors(files, capsys, tmp_path):
    assert main(["finetune", "--data", str(tmp_path / "none.txt"), "--out", "x"]) == 2
    assert "--data" in capsys.readouterr().err
    # any UTF-8 text trains (issue 13), whatever its name; what is not UTF-8 is refused, and
    # before the model is read or downloaded
    (tmp_path / "d.csv").write_bytes(b"a,b\n\xff\xfe")
    assert main(["finetune", "--data", str(tmp_path / "d.csv"), "--out", "x"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["finetune", "--data", str(files / "data.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]))
    assert (
        main(
            [
                "finetune",
                "--model",
                str(files / "base"),
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "'output'" in capsys.readouterr().err
    # unreadable paths (here through a file: NotADirectoryError) name the file, no traceback
    assert main(["eval", str(files / "data.txt" / "x")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(DataError, match="cannot read"):
        read_instructions(str(tmp_path))
    # --out naming a file: refused before training (the save at the end was a traceback)
    (tmp_path / "afile").write_text("x")
    out_file = str(tmp_path / "afile")
    assert main(["finetune", "--data", str(files / "data.txt"), "--out", out_file]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(checkpoint.WeightsError, match="cannot create the checkpoint directory"):
        checkpoint.save(str(tmp_path / "afile"), CFG, {}, {"step": 1}, {"m": {}, "v": {}})


def test_torch_backends_go_to_torch_train(files, capsys, tmp_path, monkeypatch):
    """`--backend torch` runs the torch trainer with the run's TrainConfig, through the same
    gpt2/finetune.py run (and printer) as the numpy backends."""
    pytest.importorskip("torch")
    from fast.torch import train as torch_train

    argv = [
        "finetune",
        "--model",
        str(files / "base"),
        "--data",
        str(files / "data.txt"),
        "--out",
        str(tmp_path / "o"),
        "--backend",
        "torch",
        "--steps",
        "2",
    ]
    seen = []
    monkeypatch.setattr(
        torch_train, "train", lambda *a, **kw: seen.append((a, kw)) or (None, None, [])
    )
    assert main(argv) == 0
    (args, kw) = seen[0]
    tcfg = args[4]
    assert tcfg.steps == 2 and tcfg.lr == 1e-4 and tcfg.train == "all"
    assert kw["backend"] == "torch" and kw["state"] is None


def test_lora_run_resumes_through_the_cli(files, capsys, tmp_path):
    """LoRA with dropout: 2 steps, then --resume --steps 4, equal the 4-step run bit for bit
    (a constant rate, --min-lr-ratio 1, makes the schedule independent of the run length)."""
    args = [
        "--model",
        str(files / "base"),
        "--data",
        str(files / "data.json"),
        "--batch-size",
        "2",
        "--lora-rank",
        "2",
        "--lora-dropout",
        "0.2",
        "--lora-targets",
        "c_attn,c_fc",
        "--min-lr-ratio",
        "1",
        "--lr",
        "1e-2",
        "--samples",
        "0",
        "--val-fraction",
        "0.2",
    ]
    full = losses(finetune(capsys, *args, "--steps", "4", "--out", str(tmp_path / "a")))
    finetune(capsys, *args, "--steps", "2", "--out", str(tmp_path / "b"))
    resumed = losses(finetune(capsys, "--resume", str(tmp_path / "b"), "--steps", "4"))
    assert resumed == {3: full[3], 4: full[4]}
