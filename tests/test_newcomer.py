"""Issue 13: the project tried as a new user would, each defect found there held by a test.

Most run the command line in a subprocess, as a user meets it. Nothing here needs a network:
"offline" is a download pointed at a port on 127.0.0.1 where nothing listens (refused).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from weights import DownloadError
from weights import download as dl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf-tiny")


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt2_cli(*args: str, env: dict | None = None, timeout: float = 120) -> tuple:
    """(exit status, stdout, stderr, seconds) of `python -m gpt2 ARGS`."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "gpt2", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t0


def offline_env(cache: str) -> dict:
    url = f"http://127.0.0.1:{closed_port()}"
    return {"GPT2_CACHE": cache, "GPT2_DOWNLOAD_URL_OPENAI": url, "GPT2_DOWNLOAD_URL_HF": url}


# ---------------------------------------------------------------------------------------------
# 1, 2: offline, the first command fails fast, says what to do, and leaves nothing behind


def test_offline_first_generate_fails_fast_and_says_what_to_do(tmp_path):
    """Before: silent for 62 s (five retries with backoff per source), exit 2, no way forward.
    Now: both sources refused at once, exit 3 (a download failure, not bad usage). The bound
    of 20 s is the interpreter's start and imports (~2-3 s here) with room for a busy CI
    machine; the old behaviour took 31 s of backoff per source."""
    cache = tmp_path / "cache"
    rc, out, err, seconds = gpt2_cli(
        "generate",
        "Alan Turing theorized that computers would one day become",
        "--max-new-tokens",
        "40",
        env=offline_env(str(cache)),
    )
    assert rc == 3, err
    assert seconds < 20, seconds
    assert "could not be reached" in err and "--model" in err and "GPT2_CACHE" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    # 2: nothing is left that looks like a model (before: 124M/ holding only .lock)
    assert not (cache / "124M").exists()
    assert not dl.is_complete("124M", str(cache))


def test_a_failed_download_does_not_count_as_weights_present(tmp_path, monkeypatch):
    """The real-weights tests ask `real_weights.cached_124m`, which trusts only the manifest."""
    from real_weights import cached_124m

    monkeypatch.setenv("GPT2_CACHE", str(tmp_path))
    (tmp_path / "124M").mkdir()
    (tmp_path / "124M" / ".lock").write_text("")
    assert cached_124m() is None


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_retries_are_announced_as_they_happen(tmp_path):
    """A 5xx answer is worth retrying; each retry is told to `notify` before its wait."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    notes: list[str] = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/f"
        with pytest.raises(DownloadError, match="after retries"):
            dl.fetch(url, str(tmp_path / "f"), retries=2, backoff=0.0, notify=notes.append)
    finally:
        server.shutdown()
    assert len(notes) == 2 and all("503" in n and "retrying" in n for n in notes), notes


def test_refused_connection_is_not_retried(tmp_path):
    notes: list[str] = []
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match="could not be reached"):
        dl.fetch(f"http://127.0.0.1:{closed_port()}/f", str(tmp_path / "f"), notify=notes.append)
    assert notes == [] and time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------
# 7: a mistyped size is an unknown model, on every command


@pytest.mark.parametrize("command", ["generate", "eval", "finetune", "download"])
def test_mistyped_size_is_an_unknown_model(command, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50, encoding="utf-8")
    args = {
        "generate": ["generate", "hi", "--model", "125M"],
        "eval": ["eval", str(text), "--model", "125M"],
        "finetune": [
            "finetune",
            "--model",
            "125M",
            "--data",
            str(text),
            "--out",
            str(tmp_path / "o"),
        ],
        "download": ["download", "125M"],
    }[command]
    rc, _, err, _ = gpt2_cli(*args, env={"GPT2_CACHE": str(tmp_path / "cache")})
    assert rc == 2, err
    assert "unknown model '125M'; expected one of 124M" in err, err
    assert "no such file" not in err


# ---------------------------------------------------------------------------------------------
# 4: --stop "\n\n" as typed in a shell


def test_stop_escapes_are_read(monkeypatch, capsys):
    """The shell passes a backslash and an n; the stop string must be a newline."""
    import json

    from test_generate import ScriptModel

    import gpt2
    from gpt2.cli import main
    from gpt2.cmd_generate import unescape
    from weights.tokenizer import encode

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\\c\"d") == 'a\tb\\c"d'
    assert unescape(r"\q") == r"\q"  # an unknown escape stays as typed
    script = ScriptModel([encode(" One.\n\nTwo.")])
    monkeypatch.setattr(gpt2, "load", lambda *a, **k: script)
    argv = ["generate", "Hi", "-m", FIXTURE, "-n", "20", "--stop", r"\n\n", "--json"]
    assert main(argv) == 0
    (c,) = json.loads(capsys.readouterr().out)["completions"]
    assert c["text"] == " One." and c["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------
# 6: flags people know, errors from the subcommand's parser, --version, --threads


def test_unknown_flag_is_reported_by_the_subcommand_with_a_hint():
    rc, _, err, _ = gpt2_cli("generate", "x", "--n-predict", "3", "-m", FIXTURE)
    assert rc == 2
    assert err.startswith("usage: gpt2 generate") and "gpt2 generate: error:" in err
    assert "--n-predict is -n/--max-new-tokens here" in err
    rc, _, err, _ = gpt2_cli("generate", "x", "--max_new_tokens", "3", "-m", FIXTURE)
    assert rc == 2 and "did you mean --max-new-tokens?" in err


def test_short_flags_people_type(capsys):
    import json

    from gpt2.cli import main

    argv = ["generate", "-p", "The cat", "-m", FIXTURE, "-n", "3", "-s", "7", "--temp", "0.9"]
    argv += ["--repeat-penalty", "1.1", "-t", "1", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "The cat" and len(out["completions"][0]["token_ids"]) == 3
    assert out["seed"] == 7 and out["settings"]["temperature"] == 0.9
    assert out["settings"]["repetition_penalty"] == 1.1


def test_version():
    rc, out, _, _ = gpt2_cli("--version")
    assert rc == 0 and out.startswith("gpt2-spec ")


def test_threads_sets_the_libraries():
    """-t 1 sets BLAS (threadpoolctl), Numba and torch for the run (in a child process: a
    thread count, once set, stays for the process)."""
    pytest.importorskip("threadpoolctl")
    pytest.importorskip("numba")
    torch = pytest.importorskip("torch")
    code = (
        "from gpt2.cli import set_threads\n"
        "from threadpoolctl import threadpool_info\n"
        "import json, numba, torch\n"
        "set_threads(1, 'numba'); set_threads(1, 'torch')\n"
        "blas = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "print(json.dumps([blas, numba.get_num_threads(), torch.get_num_threads()]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    blas, nb, th = json.loads(r.stdout)
    assert blas and set(blas) == {1} and nb == 1 and th == 1, r.stdout
    del torch


# ---------------------------------------------------------------------------------------------
# 8: what can be checked is checked before any weights are read


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", "x", "--max-new-tokens", "99999"], "--max-new-tokens"),
        (["eval", "README.md", "--stride", "5000"], "--stride"),
    ],
)
def test_model_dependent_flags_are_checked_before_a_download(argv, flag, tmp_path):
    """With 124M not in the cache and no network, these were refused only after the download
    (which hung offline); now its known config refuses them at once, with no network use."""
    rc, _, err, _ = gpt2_cli(*argv, "-m", "124M", env=offline_env(str(tmp_path)))
    assert rc == 2 and flag in err and "could not be reached" not in err, err


# ---------------------------------------------------------------------------------------------
# 9, 10, 11: finetuning runs that are extended, interrupted, or pointed at a used directory

FT = ["--model", FIXTURE, "--batch-size", "2", "--context-length", "16", "--samples", "0"]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "notes.md"  # 15: any UTF-8 text, whatever its name
    p.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    return str(p)


def _losses(out: str) -> dict[int, float]:
    import json

    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


def test_extending_a_cosine_run_is_refused_with_the_reason(tmp_path, text_file, capsys):
    """Before: --resume A --steps 8 after a 5-step run silently re-stretched the cosine (the
    lr jumped back up at step 6). Now that is refused, saying why and what to do; with a
    constant rate (--min-lr-ratio 1) the extension is exactly the straight 8-step run."""
    from gpt2.cli import main

    a = str(tmp_path / "a")
    assert main(["finetune", *FT, "--data", text_file, "--out", a, "--steps", "5"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--resume", a, "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "laid out over 5 steps" in err and "--min-lr-ratio 1" in err
    const = [*FT, "--data", text_file, "--min-lr-ratio", "1", "--warmup", "2", "--json"]
    straight = str(tmp_path / "s")
    assert main(["finetune", *const, "--out", straight, "--steps", "8"]) == 0
    want = _losses(capsys.readouterr().out)
    b = str(tmp_path / "b")
    assert main(["finetune", *const, "--out", b, "--steps", "5"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--resume", b, "--steps", "8", "--json"]) == 0
    got = _losses(capsys.readouterr().out)
    assert sorted(got) == [6, 7, 8] and got == {s: want[s] for s in (6, 7, 8)}  # bit for bit


def test_ctrl_c_saves_the_last_step_and_says_how_to_resume(tmp_path, text_file):
    """SIGINT to a running `gpt2 finetune` (default --save-every 0): the step under way is
    finished and saved, the run says how to resume, exits 130, and the resumed run gives the
    uninterrupted run's losses bit for bit."""
    import json
    import signal

    from gpt2.cli import main

    out = tmp_path / "run"
    args = [*FT, "--data", text_file, "--steps", "300", "--min-lr-ratio", "1", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2", "finetune", *args, "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:  # wait for training to be under way
            if '"event": "train"' in line and json.loads(line)["step"] >= 3:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"gpt2 finetune --resume {out}" in err
    stopped = json.loads([x for x in rest.splitlines() if '"interrupted"' in x][-1])["step"]
    from weights import checkpoint, loader

    assert checkpoint.read_state(str(out))["step"] == stopped
    loader.load(str(out))
    # resuming continues the run exactly (compared over the next two steps)
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["finetune", "--resume", str(out), "--steps", str(stopped + 2), "--json"]) == 0
    resumed = _losses(buf.getvalue())
    buf = io.StringIO()
    with redirect_stdout(buf):
        straight = [*args, "--out", str(tmp_path / "s"), "--steps", str(stopped + 2)]
        assert main(["finetune", *straight]) == 0
    want = _losses(buf.getvalue())
    assert resumed == {s: want[s] for s in (stopped + 1, stopped + 2)}


def test_out_is_not_overwritten_without_overwrite(tmp_path, text_file, capsys):
    from gpt2.cli import main

    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    argv = ["finetune", *FT, "--data", text_file, "--out", str(used), "--steps", "1"]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err and (used / "notes.txt").read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0
    assert (used / "model.safetensors").exists()


def test_warmup_longer_than_the_run_is_refused(tmp_path, text_file, capsys):
    from gpt2.cli import main

    argv = ["finetune", *FT, "--data", text_file, "--out", str(tmp_path / "o"), "--steps", "3"]
    assert main([*argv, "--warmup", "5"]) == 2
    assert "--warmup 5 must be below the run's 3 steps" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 12: the Python API takes what users pass and names its own functions in errors


def test_api_accepts_what_users_pass():
    import numpy as np

    import gpt2

    m = gpt2.load(FIXTURE)
    batch = gpt2.generate(m, ["a", "b c"], max_new_tokens=2)  # a list of prompts: a batch
    assert len(batch) == 2 and all(len(r) == 1 for r in batch)
    assert len(gpt2.generate(m, [64, 65], max_new_tokens=2)[0].token_ids) == 2  # token ids
    assert m.forward([1, 2, 3]).shape == (1, 3, 50257)  # a list, one row
    assert m.forward(np.array([1, 2])).shape == (1, 2, 50257)  # a 1-D array, one row
    assert "n_layer=2" in repr(m) and "object at" not in repr(m)
    with pytest.raises(TypeError, match=r"^generate\(\) got an unexpected keyword .*'topk'"):
        gpt2.generate(m, "x", topk=3)
    with pytest.raises(ValueError, match=r"forward\(\): ids must be integer"):
        m.forward([[1.5, 2.0]])
    with pytest.raises(ValueError, match=r"generate\(\): prompt 0: token id 'a'"):
        gpt2.generate(m, [1, "a"])


# ---------------------------------------------------------------------------------------------
# 14: a sampled run can be reproduced afterwards


def test_unseeded_sampling_reports_its_seed_and_reruns_with_it(capsys):
    import json

    from gpt2.cli import main

    argv = ["generate", "The cat", "-m", FIXTURE, "-n", "6", "--temperature", "1", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert isinstance(first["seed"], int)
    assert first["settings"]["temperature"] == 1.0 and first["settings"]["max_new_tokens"] == 6
    assert main([*argv, "--seed", str(first["seed"])]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["completions"] == first["completions"]
    assert main(argv[:-1]) == 0  # without --json the drawn seed is said on stderr
    assert "pass -s " in capsys.readouterr().err


def test_flags_without_effect_at_temperature_0_are_warned(capsys):
    from gpt2.cli import main

    assert main(["generate", "x", "-m", FIXTURE, "-n", "2", "--top-k", "5", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: --top-k, --seed have no effect with --temperature 0" in err


def test_a_prompt_samples_alike_alone_or_in_a_batch(tmp_path, capsys):
    import json

    from gpt2.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat\nA dog ran\nOnce upon a time\n", encoding="utf-8")
    common = ["-m", FIXTURE, "-n", "8", "--temperature", "1", "--seed", "3", "--json"]
    assert main(["generate", "--prompt-file", str(prompts), *common]) == 0
    batch = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for row in batch:
        assert main(["generate", row["prompt"], *common]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert alone["completions"] == row["completions"], row["prompt"]


# ---------------------------------------------------------------------------------------------
# 15: smaller inconsistencies


def test_stdin_is_text_without_the_shells_newline_on_generate_and_eval():
    r = subprocess.run(
        [sys.executable, "-m", "gpt2", "generate", "-", "-m", FIXTURE, "-n", "1", "--json"],
        cwd=ROOT, input=b"Hello\n", capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout)["prompt"] == "Hello"
    r = subprocess.run(
        [sys.executable, "-m", "gpt2", "eval", "-", "-m", FIXTURE, "--json"],
        cwd=ROOT, input=b"The cat sat on the mat.\n", capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] > 2
    r = subprocess.run(  # invalid UTF-8 is refused on stdin, as in --prompt-file
        [sys.executable, "-m", "gpt2", "generate", "-", "-m", FIXTURE, "-n", "1"],
        cwd=ROOT, input=b"\xff\xfe bad", capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and b"not UTF-8" in r.stderr


def test_jsonl_instruction_records_train(tmp_path, capsys):
    import json

    from gpt2.cli import main

    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ("hi", "yo", "ok")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    argv = ["finetune", *FT, "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1"]
    assert main([*argv, "--json"]) == 0
    assert _losses(capsys.readouterr().out).keys() == {1}


def test_json_errors_are_json_on_stdout(capsys):
    import json

    from gpt2.cli import main

    assert main(["generate", "x", "-m", FIXTURE, "-n", "0", "--json"]) == 2
    out = capsys.readouterr().out
    assert json.loads(out) == {"error": json.loads(out)["error"], "exit_code": 2}
    assert "--max-new-tokens" in json.loads(out)["error"]


def test_short_messages_name_their_file_and_count_right(tmp_path, capsys):
    from gpt2.cli import main

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hi there", encoding="utf-8")
    argv = ["finetune", *FT, "--data", str(tiny), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--data {tiny}:" in err and "tokens leave too few" in err
    assert main(["generate", "x", "-m", FIXTURE, "-n", "128"]) == 2
    assert "after a prompt of 1 token exceeds" in capsys.readouterr().err


def test_the_bar_shows_a_fractional_rate_and_an_eta():
    from gpt2.progress import Progress

    bar = Progress(100, "finetune", " step", enabled=False)
    bar.set(40)  # a resumed run starts at step 40: its rate counts from there
    bar.t0 -= 8.0  # 8 s later ...
    bar.set(50)  # ... 10 steps done: 1.25 step/s, 50 left: 40 s
    line = bar.line(bar.t0 + 8.0)
    assert "1.25 step/s" in line and "ETA 40s" in line and "50/100" in line
