"""The benchmark harness: the JSON schema, ratios computed from the same run, the work models,
and `python -m bench` end to end on a toy model (the hidden --tiny mode). No timing thresholds:
only structure and arithmetic are checked, never how fast anything is."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import cli, harness, report, workload
from bench.plan import MINI, TINY, make_plan
from bench.ratios import compute_ratios, measured
from ref.config import SIZES
from ref.model import forward

STATUSES = {"ok", "error", "unavailable"}
SUITES = {"limits", "ops", "generate", "finetune", "train"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One --tiny run of every suite (about 30 s on 2 cores, most of it imports and JIT)."""
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["--tiny", "--out", str(out)])
    assert rc == 0
    with open(out / "results.json", encoding="utf-8") as f:
        doc = json.load(f)
    return out, doc


def test_report_renders_again_from_results_json(tiny_run, tmp_path):
    """python -m bench.report: the same report.md from a copied results.json."""
    out, doc = tiny_run
    assert report.main([str(out / "results.json"), str(tmp_path)]) == 0
    again = (tmp_path / "report.md").read_text(encoding="utf-8")
    first = (out / "report.md").read_text(encoding="utf-8")
    assert again == first
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_outputs_written(tiny_run):
    out, doc = tiny_run
    for name in ("results.json", "report.md", "decode.png", "ops_fraction.png"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(doc["plots"]) == ["decode.png", "ops_fraction.png"]
    md = (out / "report.md").read_text(encoding="utf-8")
    for section in (
        "## Limits",
        "## Backends",
        "## Key ratios",
        "## All ratios",
        "## Ops",
        "## Prefill",
        "## Decode",
        "## Finetune",
        "## Train",
    ):
        assert section in md


def test_schema(tiny_run):
    _, doc = tiny_run
    assert doc["schema"] == cli.SCHEMA
    assert doc["mode"] == "tiny" and doc["complete"] is True
    for key in (
        "command",
        "options",
        "environment",
        "threads",
        "backends",
        "limits",
        "limits_start",
        "limits_end",
        "results",
        "ratios",
        "elapsed_s",
        "load_average_end",
    ):
        assert key in doc, key
    env = doc["environment"]
    for key in ("cpu_model", "cpu_count", "caches", "libraries", "env", "load_average"):
        assert key in env, key
    assert "OPENBLAS_CORETYPE" in env["env"] and "OPENBLAS_L2_SIZE" in env["env"]
    assert env["libraries"]["numpy"] == np.__version__
    assert isinstance(doc["threads"]["threadpools"], list)
    for name in ("read_GBps", "copy_GBps", "matmul_f32_GFLOPs"):
        assert doc["limits_start"][name] > 0 and doc["limits_end"][name] > 0
        # the fractions use the higher of the two passes
        assert doc["limits"][name] == max(doc["limits_start"][name], doc["limits_end"][name])
    tries = make_plan("tiny", None, None).limit_tries
    lim = [r for r in doc["results"] if r["suite"] == "limits" and r["status"] == "ok"]
    assert {r["params"]["phase"] for r in lim} == {"start", "end"}
    for r in lim:
        assert len(r["metrics"]["tries"]) == tries
    assert doc["backends"]["ref"]["status"] == "ok"
    for st_ in doc["backends"].values():
        assert st_["status"] in ("ok", "unavailable")
        assert st_["status"] == "ok" or st_["reason"]
    for r in doc["results"]:
        assert set(r) == {
            "suite",
            "case",
            "backend",
            "variant",
            "params",
            "status",
            "reason",
            "time_s",
            "cache",
            "metrics",
        }
        assert r["suite"] in SUITES and r["status"] in STATUSES
        if r["status"] != "ok":
            assert r["reason"], r
            continue
        t = r["time_s"]
        assert 0 < t["min"] <= t["median"] and t["n"] >= 1 and t["warmup"] >= 0, r
        for k, v in r["metrics"].items():
            if isinstance(v, float):
                assert math.isfinite(v) and v >= 0, (k, r)
    suites = {r["suite"] for r in doc["results"] if r["status"] == "ok"}
    assert suites == SUITES


def test_every_op_and_pass_measured_for_ref(tiny_run):
    _, doc = tiny_run
    got = {
        (r["case"], r["params"]["pass"])
        for r in doc["results"]
        if r["suite"] == "ops" and r["backend"] == "ref" and r["status"] == "ok"
    }
    for op in ("layernorm", "gelu", "bias_gelu", "attention", "crossentropy"):
        assert {(op, "forward"), (op, "backward")} <= got


def test_ops_metrics_follow_from_time_and_work(tiny_run):
    _, doc = tiny_run
    ops = [r for r in doc["results"] if r["suite"] == "ops" and r["status"] == "ok"]
    assert ops
    for r in ops:
        m, t = r["metrics"], r["time_s"]["min"]
        moved = m["read_bytes"] + m["write_bytes"]
        assert m["GBps"] == pytest.approx(moved / t / 1e9, rel=1e-12)
        assert m["fraction_of_limit"] == pytest.approx(m["roofline_s"] / t, rel=1e-12)
        assert r["cache"] in ("flushed", "exceeds-llc", "device-not-flushed")


def test_key_ratios_marked(tiny_run):
    _, doc = tiny_run
    key = [r["name"] for r in doc["ratios"] if r["key"]]
    assert any(n.startswith("prefill ") for n in key)
    assert any(n.startswith("finetune ") for n in key)
    assert any("bandwidth ceiling" in n and "ctx=32" in n for n in key)
    assert not any("bandwidth ceiling" in n and "ctx=1 " in n for n in key)


def test_ratios_come_from_this_run(tiny_run):
    """The stored ratios are exactly what the stored records give."""
    _, doc = tiny_run
    again = compute_ratios(doc)
    assert [r["name"] for r in again] == [r["name"] for r in doc["ratios"]]
    for a, b in zip(again, doc["ratios"], strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-12)


def _rec(doc, suite, case, backend, **params):
    hits = [
        r
        for r in doc["results"]
        if r["suite"] == suite
        and r["case"] == case
        and r["backend"] == backend
        and r["status"] == "ok"
        and all(r["params"].get(k) == v for k, v in params.items())
    ]
    return hits


def test_ratio_values(tiny_run):
    _, doc = tiny_run
    ratios = {r["name"]: r["value"] for r in doc["ratios"]}
    ok = {n for n, s in doc["backends"].items() if s["status"] == "ok"}
    if "numba" in ok:
        # speedup = time(ref) / time(best numba variant) at the headline shape (most rows)
        N = max(r["params"]["N"] for r in _rec(doc, "ops", "layernorm", "ref"))
        for direction in ("forward", "backward"):
            ref = _rec(doc, "ops", "layernorm", "ref", N=N, **{"pass": direction})
            nb = _rec(doc, "ops", "layernorm", "numba", N=N, **{"pass": direction})
            want = ref[0]["time_s"]["min"] / min(r["time_s"]["min"] for r in nb)
            assert ratios[f"layernorm {direction}: numba speedup over ref"] == pytest.approx(want)
        assert "gelu forward: numba GB/s / copy GB/s" in ratios
        assert "attention forward: numba speedup over ref" in ratios
        assert "attention backward: numba speedup over ref" in ratios
    # decode against the bandwidth ceiling: tokens/s over B * read / bytes per step
    for r in _rec(doc, "generate", "decode", "ref", B=1):
        lo, hi = r["params"]["contexts"]
        ceiling = workload.decode_ceiling(TINY, 1, (lo + hi) // 2, doc["limits"]["read_GBps"])
        assert r["metrics"]["fraction_of_ceiling"] == pytest.approx(
            r["metrics"]["tokens_per_s"] / ceiling
        )
    names = list(ratios)
    assert any(n.startswith("prefill 32 tokens B=1 (tiny, ref, cpu)") for n in names)
    assert any("ref with KV cache / ref-nocache" in n for n in names)
    assert any(n.startswith("decode B=4 / B=1 at ctx=32 (tiny, ref, cpu)") for n in names)
    torch_ok = doc["environment"]["libraries"]["torch"] is not None
    if torch_ok:
        assert "layernorm forward: torch-native speedup over ref" in ratios
        assert any("/ torch-autograd (cpu) tokens/s" in n for n in names)
    if torch_ok and doc["environment"]["libraries"]["transformers"] is not None:
        assert any("ref (cpu) / hf-generate (cpu)" in n for n in names)


def test_finetune_records(tiny_run):
    _, doc = tiny_run
    ft = [r for r in doc["results"] if r["suite"] == "finetune"]
    modes = {(r["backend"], r["params"]["train"]) for r in ft if r["status"] == "ok"}
    assert ("ref", "all") in modes and ("ref", "lora") in modes
    for r in ft:
        if r["status"] == "ok":
            B, T = r["params"]["B"], r["params"]["T"]
            assert r["metrics"]["tokens_per_s"] == pytest.approx(B * T / r["time_s"]["min"])
        else:
            assert r["reason"].startswith("not available")


def test_train_records_and_ratios(tiny_run):
    """The tiny plan's train suite: a record per backend and baseline, full training from the
    plan's shape, and each backend's ratio to torch-autograd from those records."""
    _, doc = tiny_run
    plan = make_plan("tiny", None, None)
    [(size, cfg, B, T)] = plan.train_cases
    recs = [r for r in doc["results"] if r["suite"] == "train"]
    ok = {r["backend"]: r for r in recs if r["status"] == "ok"}
    assert "ref" in ok
    for r in recs:
        assert r["case"] == "step" and r["params"]["train"] == "all", r
        assert (r["params"]["size"], r["params"]["B"], r["params"]["T"]) == (size, B, T)
        assert r["params"]["n_vocab"] == cfg.n_vocab and r["params"]["n_layer"] == cfg.n_layer
        if r["status"] != "ok":
            assert r["reason"].startswith("not available"), r
            continue
        t = r["time_s"]
        assert t["n"] == plan.train_steps and t["warmup"] == 1
        assert r["metrics"]["tokens_per_s"] == pytest.approx(B * T / t["min"])
        assert r["metrics"]["flops"] == workload.train_flops(cfg, B, T, lora=False)
    ratios = {r["name"]: r for r in doc["ratios"]}
    if "torch-autograd" in ok:
        base = ok["torch-autograd"]["metrics"]["tokens_per_s"]
        for be, r in ok.items():
            if be == "torch-autograd":
                continue
            name = f"train tiny B={B} T={T}: {be} (cpu) / torch-autograd (cpu) tokens/s"
            assert ratios[name]["value"] == pytest.approx(r["metrics"]["tokens_per_s"] / base)
            assert ratios[name]["key"], name
    else:
        assert not any(n.startswith("train ") for n in ratios)


def test_train_table_renders(tiny_run):
    """report.md's Train table: a row per measured train record, with the config's shape."""
    out, doc = tiny_run
    md = (out / "report.md").read_text(encoding="utf-8")
    table = md.split("## Train")[1].split("\n## ")[0]
    assert "| size | layers x heads x width | vocab | backend | device | BxT |" in table
    measured_ = [r for r in doc["results"] if r["suite"] == "train" and r["status"] == "ok"]
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == len(measured_)
    for row, r in zip(rows, measured_, strict=True):
        assert row.startswith(f"| tiny | 2x4x64 | 256 | {r['backend']} | cpu | 2x16 |"), row


def test_train_ratios_on_a_gpu_compare_one_device(tiny_run):
    """On a SYNTHETIC CUDA run each trainer is divided by torch-autograd on its own device (the
    finetune suite also by autograd on the CPU)."""
    _, doc = tiny_run
    shape = {"size": "124M", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_vocab": 50257}
    shape.update(train="all", B=1, T=1024)
    recs = [
        _fake_model("train", "step", "triton", 9000.0, **shape),
        _fake_model("train", "step", "torch-autograd", 6000.0, **shape),
        _fake_model("train", "step", "torch-autograd", 300.0, **shape),
    ]
    recs[2]["params"]["device"] = "cpu"
    got = [(r["name"], r["value"]) for r in compute_ratios({**doc, "results": recs})]
    assert got == [("train 124M B=1 T=1024: triton (cuda) / torch-autograd (cuda) tokens/s", 1.5)]


def test_train_step_of_a_broken_backend_is_unavailable():
    """A trainer that raises gives an "unavailable" record naming the error; the others run."""
    from types import ModuleType

    from bench import suite_train
    from bench.backends import Backend, load_backends
    from bench.plan import SuiteSetup

    plan = make_plan("tiny", None, None)
    (ref,), _ = load_backends(["ref"])
    broken = Backend("broken", ModuleType("broken"), "numpy", "cpu")  # no ops at all
    setup = SuiteSetup(plan, [broken, ref], {}, np.random.default_rng(0), baselines=False)
    recs = suite_train.run(setup)
    assert [(r["backend"], r["status"]) for r in recs] == [
        ("broken", "unavailable"),
        ("ref", "ok"),
    ]
    assert recs[0]["reason"].startswith("not available: AttributeError")


BARE = """
import sys
for name in ("torch", "numba", "triton", "transformers", "matplotlib", "threadpoolctl"):
    sys.modules[name] = None  # importing it raises ImportError, as where it is not installed
from bench.cli import main
sys.exit(main(["--tiny", "--out", sys.argv[1]]))
"""


def test_runs_with_numpy_alone(tmp_path):
    """Without the optional libraries the reference is still measured, and what could not run
    says why."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", BARE, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert doc["complete"] and doc["plots"] == []
    assert doc["backends"]["ref"]["status"] == "ok"
    for name in ("numba", "torch", "triton"):
        assert doc["backends"][name]["status"] == "unavailable"
    ok = {(r["suite"], r["backend"]) for r in doc["results"] if r["status"] == "ok"}
    assert {
        ("ops", "ref"),
        ("generate", "ref"),
        ("generate", "ref-nocache"),
        ("finetune", "ref"),
        ("train", "ref"),
    } <= ok
    assert not any(b.startswith(("torch", "hf")) for _, b in ok)
    assert "threadpoolctl not installed" in (tmp_path / "report.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# the harness and the work models, without running a suite


def test_measure_counts_and_order():
    calls = []
    t = harness.measure(
        lambda: calls.append(1), warmup=2, min_repeats=3, max_repeats=5, budget_s=10.0
    )
    # the budget is never reached by a no-op: max_repeats timed calls after the warm-up
    assert len(calls) == 2 + 5 and t["n"] == 5 and t["warmup"] == 2
    assert 0 <= t["min"] <= t["median"]
    seen = []
    harness.measure(
        lambda: seen.append("call"),
        before=lambda: seen.append("before"),
        warmup=1,
        min_repeats=2,
        max_repeats=2,
        budget_s=0.0,
    )
    assert seen == ["before", "call"] * 3


def test_step_stats_drop_the_warmup_step():
    assert harness.step_stats([5.0, 1.0, 3.0]) == {"min": 1.0, "median": 2.0, "n": 2, "warmup": 1}
    # a single step is the only figure there is: kept, and counted
    assert harness.step_stats([4.0]) == {"min": 4.0, "median": 4.0, "n": 1, "warmup": 0}


def test_with_peak_memory_returns_the_result():
    result, mem = harness.with_peak_memory(lambda: 42)
    assert result == 42 and set(mem) == {"peak_rss_bytes", "rss_before_bytes"}


def test_measured_keeps_the_ok_records_of_a_suite_and_case():
    recs = [
        harness.record("generate", "decode", "ref"),
        harness.record("generate", "prefill", "ref"),
        harness.record("generate", "decode", "numba", status="error", reason="E: x"),
        harness.record("ops", "gelu", "ref"),
    ]
    assert measured(recs, "generate") == recs[:2]
    assert measured(recs, "generate", "decode") == recs[:1]


def test_bench_imports_no_layer_above():
    """bench/ sits below gpt2/: none of its modules imports gpt2 (issue 12's layering)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "bench"
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "gpt2", f"{path.relative_to(root.parent)}: {name}"


def test_cache_policy_and_flusher():
    llc = 1 << 20
    assert harness.cache_policy(llc, llc) == "flushed"
    assert harness.cache_policy(harness.FLUSH_FACTOR * llc, llc) == "exceeds-llc"
    f = harness.CacheFlusher(llc)
    assert f.buf.nbytes == 2 * llc
    f()
    assert f.buf[0] == 1.0


def test_peak_rss_sees_an_allocation():
    if not harness.reset_peak_rss():
        pytest.skip("this kernel does not allow resetting VmHWM (/proc/self/clear_refs)")
    n = 64 * 2**20  # 64 MiB, touched page by page
    m = harness.peak_rss(lambda: np.ones(n, np.uint8).sum())
    # the allocation shows in the peak (minus slack for pages the allocator already held)
    assert m["peak_rss_bytes"] - m["rss_before_bytes"] >= n // 2


def test_environment_records_blas_and_env():
    env = harness.environment()
    assert env["env"]["OPENBLAS_CORETYPE"] == os.environ.get("OPENBLAS_CORETYPE")
    assert env["cpu_count"] == os.cpu_count()
    threads = harness.thread_settings()
    assert any(p.get("user_api") == "blas" for p in threads["threadpools"])


@given(st.integers(1, 64), st.integers(0, 64))
def test_causal_pairs_counts_visible_keys(Tq, extra):
    Tk = Tq + extra
    from ref.ops import causal_mask

    assert workload.causal_pairs(Tq, Tk) == int(causal_mask(Tq, Tk).sum())


@given(st.integers(1, 40), st.integers(1, 3))
def test_prefill_flops_equal_the_sum_of_decode_steps(T, B):
    """A forward over T tokens does the work of T single-token steps (every position through
    the LM head), so the attention accounting of the two paths agrees."""
    whole = workload.forward_flops(TINY, B, T)
    steps = sum(workload.forward_flops(TINY, B, 1, P=p) for p in range(T))
    assert whole == steps


def test_model_flops_of_gpt2_small():
    """2 x (non-embedding matmul params) per token, plus attention and the LM head: for 124M
    the dense part is 2 * 84,934,656 FLOPs per token (12 layers x 12 C^2)."""
    cfg = SIZES["124M"]
    assert workload.linear_params(cfg) == 84_934_656
    f = workload.forward_flops(cfg, 1, 1, head_rows=1)
    assert f == 2 * 84_934_656 + 12 * 4 * 768 * 1 + 2 * 768 * 50257


def test_decode_ceiling():
    cfg = SIZES["124M"]
    assert workload.weight_bytes(cfg) == 4 * (cfg.n_params() - 1024 * 768 + 768)
    c1 = workload.decode_ceiling(cfg, 1, 1, 10.0)
    c1024 = workload.decode_ceiling(cfg, 1, 1024, 10.0)
    assert c1 > c1024 > 0
    # batch 16 reads the weights once for 16 tokens
    assert workload.decode_ceiling(cfg, 16, 1, 10.0) > 10 * c1


def test_op_work_is_consistent_with_the_ops():
    """Bytes of the forward are the arrays the reference reads and returns."""
    rng = np.random.default_rng(0)
    from bench.suite_ops import make_inputs
    from ref import ops

    shapes = {
        "layernorm": {"N": 8, "C": 16},
        "gelu": {"N": 8, "H": 64},
        "linear": {"N": 8, "C": 16, "H": 64},
        "attention": {"B": 2, "NH": 3, "Tq": 5, "Tk": 7, "hs": 4},
        "embedding": {"N": 8, "C": 16, "V": 50, "n_ctx": 12},
    }
    for op, shape in shapes.items():
        args, dout = make_inputs(op, shape, rng)
        out, _ = getattr(ops, f"{op}_forward")(*args)
        w = workload.op_work(op, "forward", shape)
        assert w["write_bytes"] == out.nbytes, op
        assert dout.shape == out.shape, op
        if op == "embedding":  # two gathered rows per token, not the whole tables
            assert w["read_bytes"] == 2 * out.nbytes
        elif op in ("layernorm",):  # g and b are counted as negligible
            assert w["read_bytes"] == args[0].nbytes
        else:
            assert w["read_bytes"] == sum(a.nbytes for a in args), op


def test_random_params_run_finite():
    params = workload.random_params(TINY, np.random.default_rng(0))
    logits = forward(params, np.zeros((1, 5), np.int64), TINY)
    assert logits.shape == (1, 5, TINY.n_vocab) and np.isfinite(logits).all()


def test_plans():
    quick = make_plan("quick", None, None)
    full = make_plan("full", None, None)
    assert [s for s, _ in quick.widths] == ["124M"]
    assert [s for s, _ in full.widths] == ["124M", "355M", "774M", "1558M"]
    assert 1024 in full.decode_ctx and 1024 in full.prefill_T and 1024 in full.attn_T
    assert 16 in full.decode_batches and 256 in full.batch_ctx
    assert (full.ft_batch, full.ft_T) == (4, 256)
    # train: the small config everywhere, 124M at its context in the full run only (CI runs
    # --quick)
    assert [(s, c, B, T) for s, c, B, T in quick.train_cases] == [("mini", MINI, 4, 128)]
    assert [(s, B, T) for s, _, B, T in full.train_cases] == [("mini", 8, 128), ("124M", 1, 1024)]
    assert full.train_cases[1][1] == SIZES["124M"]
    assert (MINI.n_layer, MINI.n_head, MINI.n_embd, MINI.n_ctx) == (4, 4, 128, 128)
    assert MINI.n_vocab == SIZES["124M"].n_vocab
    assert [s for s, _ in make_plan("full", "gpt2-xl", "355M").models] == ["355M"]


def test_bad_flags(tmp_path, capsys):
    from gpt2.cli import main as gpt2_main

    # bench raises ValueError naming the flag; both command lines print it on one line, exit 2
    assert cli.main(["--tiny", "--suite", "ops,bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m bench: error: --suite: unknown suite(s) bogus")
    assert len(err.splitlines()) == 1
    assert gpt2_main(["bench", "--tiny", "--suite", "ops,bogus", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == err.replace("python -m bench", "gpt2 bench")
    assert cli.main(["--tiny", "--backends", "nope", "--out", str(tmp_path)]) == 2
    assert "--backends" in capsys.readouterr().err
    assert cli.main(["--quick", "--sizes", "999M", "--out", str(tmp_path)]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_gpt2_bench_subcommand():
    from gpt2.cli import build_parser

    args = build_parser().parse_args(["bench", "--tiny", "--suite", "ops", "--out", "x"])
    assert args.tiny and args.suite == "ops" and args.out == "x"
    assert args.run.__module__ == "gpt2.cmd_bench"


# ---------------------------------------------------------------------------------------------
# issue 6's GPU ratios, from SYNTHETIC records (no GPU here: this proves the report's
# arithmetic and row names, never GPU speed)

COPY = 2000.0  # the synthetic run's device copy bandwidth, GB/s


def _fake_op(op, backend, direction, t, variant="v", **shape):
    """A SYNTHETIC CUDA ops record: made-up time `t`, the work model's bytes and FLOPs."""
    work = workload.op_work(op, direction, shape)
    ws = work["read_bytes"] + work["write_bytes"]
    metrics = {**work, "GBps": ws / t / 1e9, "GFLOPs": work["flops"] / t / 1e9}
    metrics.update(roofline_s=None, bound=None, fraction_of_limit=None)
    return harness.record(
        "ops",
        op,
        backend,
        variant=variant,
        params={**shape, "pass": direction, "device": "cuda"},
        time_s={"min": t, "median": t, "n": 3, "warmup": 2},
        cache="exceeds-llc",
        metrics=metrics,
    )


def _fake_model(suite, case, backend, tokens_per_s, **params):
    """A SYNTHETIC CUDA generate or finetune record with a made-up tokens/s."""
    return harness.record(
        suite,
        case,
        backend,
        params={**params, "device": "cuda"},
        time_s={"min": 1.0, "median": 1.0, "n": 1, "warmup": 1},
        metrics={"tokens_per_s": tokens_per_s, "GFLOPs": 1.0, "fraction_of_matmul": None},
    )


def _synthetic_cuda_doc() -> dict:
    """A SYNTHETIC results document shaped like a CUDA run of the full suite: issue 6's shapes
    (bench.suite_ops.gpu_cases), triton against torch.nn.functional, the generate and finetune
    backends, with made-up times, tokens/s and peak memory."""
    from bench.suite_ops import ATTN_T, CE_V, GPT2_C, GPT2_ROWS, gpu_cases

    f32 = {"size": "124M", "dtype": "float32"}
    ln = {**f32, "N": GPT2_ROWS, "C": GPT2_C}
    big = {**f32, "N": 64 * 1024, "C": GPT2_C}
    gelu = {**f32, "N": 16 * 1024, "H": 4 * GPT2_C}
    bg = {**f32, "N": GPT2_ROWS, "H": 4 * GPT2_C}
    attn = {"size": "124M", "B": 8, "NH": 12, "Tq": ATTN_T, "Tk": ATTN_T, "hs": 64}
    attn["dtype"] = "bfloat16"
    ce = {"N": GPT2_ROWS, "V": CE_V, "dtype": "float32"}
    # the synthetic shapes are those the suite times on a GPU
    assert [s for _, s, _ in gpu_cases(make_plan("full", None, None))] == [
        ln,
        big,
        gelu,
        bg,
        attn,
        ce,
    ]
    recs = [
        _fake_op("layernorm", "triton", "forward", 1.0e-3, **big),
        _fake_op("layernorm", "torch-native", "forward", 1.5e-3, **big),
        _fake_op("layernorm", "triton", "forward", 4.0e-4, **ln),  # a slower variant
        _fake_op("layernorm", "triton", "forward", 2.0e-5, **ln),
        _fake_op("layernorm", "torch-native", "forward", 3.0e-5, **ln),
        _fake_op("layernorm", "triton", "backward", 5.0e-5, **ln),
        _fake_op("layernorm", "torch-native", "backward", 4.5e-5, **ln),
        _fake_op("gelu", "triton", "forward", 2.5e-4, **gelu),
        _fake_op("gelu", "torch-native", "forward", 3.0e-4, **gelu),
        _fake_op("bias_gelu", "triton", "forward", 1.0e-4, **bg),
        _fake_op("bias_gelu", "torch-native", "forward", 1.7e-4, **bg),
        _fake_op("attention", "triton", "forward", 4.0e-4, "flash64", **attn),
        _fake_op("attention", "triton", "forward", 3.0e-4, "flash32", **attn),  # the best one
        _fake_op("attention", "torch-native", "forward", 2.0e-4, **attn),
        _fake_op("attention", "triton", "forward+backward", 1.2e-3, "flash64", **attn),
        _fake_op("attention", "torch-native", "forward+backward", 7.0e-4, **attn),
        _fake_op("crossentropy", "triton", "forward", 1.0e-3, **ce),
        _fake_op("crossentropy", "torch-native", "forward", 2.2e-3, **ce),
        _fake_op("crossentropy", "triton", "forward+backward", 2.0e-3, **ce),
        _fake_op("crossentropy", "triton", "forward+backward", 2.4e-3, "inplace", **ce),
        _fake_op("crossentropy", "torch-native", "forward+backward", 5.0e-3, **ce),
    ]
    mem = {
        ("triton", "v"): (3_000_000_000, 2_000_000_000),
        ("triton", "inplace"): (2_000_100_000, 2_000_000_000),
        ("torch-native", "v"): (6_000_000_000, 2_000_000_000),
    }
    for r in recs:
        if r["case"] == "crossentropy" and r["params"]["pass"] == "forward+backward":
            peak, before = mem[r["backend"], r["variant"]]
            r["metrics"].update(peak_gpu_bytes=peak, gpu_bytes_before=before)
    size = {"size": "124M"}
    for be, tps in (("triton", 300.0), ("torch", 200.0), ("triton-bf16", 500.0)):
        dt = "bfloat16" if be.endswith("bf16") else "float32"
        recs.append(_fake_model("generate", "prefill", be, 50 * tps, **size, dtype=dt, B=1, T=1024))
        recs.append(_fake_model("generate", "decode", be, tps, **size, dtype=dt, B=1, ctx=1024))
    recs.append(
        _fake_model(
            "generate", "prefill", "torch-bf16", 40000.0, **size, dtype="bfloat16", B=1, T=1024
        )
    )
    recs.append(
        _fake_model(
            "generate", "decode", "torch-bf16", 400.0, **size, dtype="bfloat16", B=1, ctx=1024
        )
    )
    recs.append(
        _fake_model(
            "generate", "decode", "hf-generate", 100.0, **size, dtype="float32", B=1, ctx=1024
        )
    )
    for be, tps in (("triton", 9000.0), ("torch", 6000.0), ("hf-transformers", 4500.0)):
        recs.append(_fake_model("finetune", "step", be, tps, **size, train="all", B=4, T=256))
    for r in recs:
        if r["suite"] == "generate":
            r["params"]["contexts"] = [1023, 1024]
    return {
        "schema": cli.SCHEMA,
        "command": "SYNTHETIC (tests/test_bench.py)",
        "mode": "full",
        "complete": True,
        "environment": {
            "time_utc": "-",
            "cpu_model": "SYNTHETIC",
            "cpus_usable": 1,
            "cpu_count": 1,
            "caches": {},
            "memory_bytes": 0,
            "load_average": None,
            "env": {},
            "libraries": {},
            "git_commit": None,
        },
        "threads": {},
        "gpu": {"name": "SYNTHETIC"},
        "elapsed_s": 0.0,
        "backends": {},
        "limits": {
            "read_GBps": 10.0,
            "copy_GBps": 10.0,
            "matmul_f32_GFLOPs": 100.0,
            "gpu_copy_GBps": COPY,
            "gpu_read_GBps": 2500.0,
        },
        "results": recs,
    }


def test_issue6_gpu_ratios_from_synthetic_records():
    """Every issue-6 GPU target has its Key-ratios row, with the value recomputed here from the
    SYNTHETIC records fed in. This checks the report's selection and arithmetic, not GPU
    speed: the times, tokens/s and memory are made up (no GPU on the machine that runs it)."""
    doc = _synthetic_cuda_doc()
    ratios = compute_ratios(doc)
    got = {r["name"]: r for r in ratios}

    def t(op, be, direction, **m):
        return min(r["time_s"]["min"] for r in _rec(doc, "ops", op, be, **{"pass": direction, **m}))

    ws_big = 2 * 64 * 1024 * 768 * 4  # layernorm forward reads x and writes out, float32
    ws_gelu = 2 * 16 * 1024 * 3072 * 4
    attn = {"dtype": "bfloat16", "Tq": 1024}
    want = {
        "GPU layernorm forward: triton GB/s / device copy GB/s": ws_big / 1.0e-3 / 1e9 / COPY,
        "GPU layernorm forward: torch-native GB/s / device copy GB/s": ws_big / 1.5e-3 / 1e9 / COPY,
        "GPU layernorm forward 8x1024 rows of 768: triton / torch layer_norm": 3.0e-5 / 2.0e-5,
        "GPU layernorm backward 8x1024 rows of 768: triton / torch layer_norm": 4.5e-5 / 5.0e-5,
        "GPU gelu forward: triton GB/s / device copy GB/s": ws_gelu / 2.5e-4 / 1e9 / COPY,
        "GPU bias_gelu forward: triton / unfused torch pair": 1.7e-4 / 1.0e-4,
        "GPU attention forward bf16 T=1024: triton / torch SDPA": 2.0e-4 / 3.0e-4,
        "GPU attention forward+backward bf16 T=1024: triton / torch SDPA": 7.0e-4 / 1.2e-3,
        "GPU crossentropy forward V=50257: triton / torch cross_entropy": 2.2e-3 / 1.0e-3,
        "GPU crossentropy forward+backward V=50257: triton / torch cross_entropy": 5.0 / 2.0,
        "GPU crossentropy: torch peak memory / triton peak memory": 4e9 / 1e9,  # the fastest
        # every variant, fastest or not
        "GPU crossentropy forward+backward V=50257 (triton v): speedup over torch": 5.0 / 2.0,
        "GPU crossentropy (triton v): torch peak memory / its peak memory": 4e9 / 1e9,
        "GPU crossentropy forward+backward V=50257 (triton inplace): speedup over torch": 5 / 2.4,
        "GPU crossentropy (triton inplace): torch peak memory / its peak memory": 4e9 / 1e5,
        "GPU prefill T=1024 (124M, float32): triton / torch tokens/s": 300.0 / 200.0,
        "GPU prefill T=1024 (124M, bfloat16): triton-bf16 / torch-bf16 tokens/s": 25000 / 40000,
        "GPU decode B=1 ctx=1024 (124M, float32): triton / torch tokens/s": 300.0 / 200.0,
        "GPU decode B=1 ctx=1024 (124M, bfloat16): triton-bf16 / torch-bf16 tokens/s": 1.25,
        "GPU decode B=1 ctx=1024 (124M): triton (float32) / hf-generate (float32) tokens/s": 3.0,
        "GPU decode B=1 ctx=1024 (124M): triton-bf16 (bfloat16) / hf-generate (float32) "
        "tokens/s": 5.0,
        "GPU finetune all B=4 T=256 (124M): triton / torch tokens/s": 1.5,
        "GPU finetune all B=4 T=256 (124M): triton / hf-transformers tokens/s": 2.0,
    }
    # the same figures from the records by the test's own selection (best variant, same shape)
    assert want["GPU attention forward bf16 T=1024: triton / torch SDPA"] == pytest.approx(
        t("attention", "torch-native", "forward", **attn)
        / t("attention", "triton", "forward", **attn)
    )
    assert want["GPU layernorm forward 8x1024 rows of 768: triton / torch layer_norm"] == (
        pytest.approx(
            t("layernorm", "torch-native", "forward", N=8192)
            / t("layernorm", "triton", "forward", N=8192)
        )
    )
    # relative tolerance 1e-12: each value is one or two divisions of float64 numbers
    for name, value in want.items():
        assert name in got, name
        assert got[name]["value"] == pytest.approx(value, rel=1e-12), name
        assert got[name]["key"], name
    # rows on ops say how each record's cache was treated (all exceed L2 in this fake run)
    ops_rows = [n for n in want if n.startswith("GPU ") and " / " in n and "tokens/s" not in n]
    for name in ops_rows:
        if "peak memory" not in name:
            assert "cache: " in got[name]["note"] and "exceeds-llc" in got[name]["note"], name
    md = report.markdown({**doc, "ratios": ratios})
    key_section = md.split("## Key ratios")[1].split("## All ratios")[0]
    for name in want:
        assert f"| {name} |" in key_section, name
    assert "GPU op rows: GPU time between CUDA events" in key_section
    assert "L2 flushed before every call" in key_section


def test_cpu_only_run_has_no_gpu_rows(tiny_run):
    """A CPU-only document (the --tiny run of this machine, or with its GPU records removed)
    gives none of the GPU rows, and its report renders."""
    _, doc = tiny_run
    cpu = {**doc, "results": [r for r in doc["results"] if r["params"].get("device") != "cuda"]}
    ratios = compute_ratios(cpu)
    assert ratios and not [r["name"] for r in ratios if r["name"].startswith("GPU ")]
    md = report.markdown({**cpu, "ratios": ratios})
    assert "GPU op rows" not in md and "| GPU " not in md


def test_gpu_cases_and_forward_backward_work():
    """The GPU shapes are issue 6's; a forward+backward call does the work of both passes."""
    from bench.suite_ops import gpu_cases

    ops = {op: (s, p) for op, s, p in gpu_cases(make_plan("quick", None, None))}
    s, passes = ops["attention"]
    assert (s["Tq"], s["hs"], s["dtype"]) == (1024, 64, "bfloat16")
    assert passes == ("forward", "forward+backward")
    assert ops["crossentropy"][0]["V"] == 50257
    for op, s, _ in gpu_cases(make_plan("tiny", None, None)):
        f, b = workload.op_work(op, "forward", s), workload.op_work(op, "backward", s)
        fb = workload.op_work(op, "forward+backward", s)
        assert fb == {k: f[k] + b[k] for k in f}
    # bfloat16 attention moves half the bytes of float32 at the same FLOPs
    s = ops["attention"][0]
    w16 = workload.op_work("attention", "forward", s)
    w32 = workload.op_work("attention", "forward", {**s, "dtype": "float32"})
    assert (2 * w16["read_bytes"], w16["flops"]) == (w32["read_bytes"], w32["flops"])


def test_gpu_check_script_parses_and_names_real_paths():
    """bench/tools/gpu_check.sh runs only on a CUDA machine; here: it parses, and the fixture model,
    data file and modules it calls exist (a rename would otherwise surface on the GPU only)."""
    import re
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "bench", "tools", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script, encoding="utf-8").read()
    paths = re.findall(r"=((?:tests|weights)/[\w/.-]+)", text)
    mods = re.findall(r"-m ((?:bench|gpt2)[\w.]*)", text)
    assert len(paths) == 2 and "gpt2" in mods and "bench" in mods  # the model, the data
    for path in paths:
        assert os.path.exists(os.path.join(root, path)), path
    for mod in mods:
        assert os.path.exists(os.path.join(root, *mod.split("."))) or os.path.exists(
            os.path.join(root, *mod.split(".")) + ".py"
        ), mod


# ---------------------------------------------------------------------------------------------
# issue 13: where a run writes, the limits on a busy machine, fractions above the limit


def _digests(folder) -> dict:
    """{file name: (sha256, mtime_ns)} of every file in `folder`."""
    import hashlib

    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_default_out_leaves_the_committed_results_alone(tmp_path, monkeypatch):
    """Run from a checkout's root without --out (as the README's `gpt2 bench --quick`), both
    command lines write into ./bench-results/ and leave bench/results/, the committed full run
    and the PNGs the README shows, as it was."""
    import pathlib
    import shutil

    from gpt2.cli import main as gpt2_main

    repo_results = pathlib.Path(__file__).resolve().parent.parent / "bench" / "results"
    committed = tmp_path / "bench" / "results"  # a copy of the checkout's, the cwd its root
    shutil.copytree(repo_results, committed)
    before, repo_before = _digests(committed), _digests(repo_results)
    assert "results.json" in before
    monkeypatch.chdir(tmp_path)
    quick = ["--tiny", "--suite", "limits", "--backends", "ref"]
    assert cli.main(quick) == 0
    assert gpt2_main(["bench", *quick]) == 0
    assert _digests(committed) == before
    assert _digests(repo_results) == repo_before
    written = tmp_path / cli.DEFAULT_OUT
    assert (written / "results.json").stat().st_size > 0 and (written / "report.md").exists()
    assert not cli.DEFAULT_OUT.startswith("bench/results")


def test_limits_are_the_best_of_their_tries(monkeypatch):
    """Each limit is the fastest of plan.limit_tries tries, and the record keeps every try;
    the tries of the probes are taken in turn."""
    from bench import limits

    plan = make_plan("tiny", None, None)
    plan.limit_tries = 3
    slowdown = [3.0, 1.0, 2.0]  # the second try ran alone on the machine
    order = []
    # CPU probes per try: read (BLAS dot, numpy max, Numba's parallel sum where it is
    # installed), copy, matmul
    per_try = 4 + (limits._parallel_read(np.zeros(2048, np.float32)) is not None)

    def fake_measure(fn, **kw):
        order.append(fn)
        t = 1e-3 * slowdown[(len(order) - 1) // per_try]
        return {"min": t, "median": 2 * t, "n": 3, "warmup": 1}

    monkeypatch.setattr(limits, "measure", fake_measure)
    recs, got = limits.run(plan, np.random.default_rng(0), gpu=False, phase="end")
    assert len(order) == per_try * 3 and order[0] is order[per_try] and order[0] is not order[1]
    reads = {r["variant"] for r in recs if r["case"] == "read"}
    assert reads == ({"dot", "max", "numba_sum"} if per_try == 5 else {"dot", "max"})
    copy = next(r for r in recs if r["case"] == "copy")
    b = copy["params"]["bytes"]
    assert copy["metrics"]["tries"] == pytest.approx([2 * b / (1e-3 * s) / 1e9 for s in slowdown])
    assert got["copy_GBps"] == pytest.approx(2 * b / 1e-3 / 1e9)
    assert copy["time_s"]["min"] == 1e-3 and copy["params"]["phase"] == "end"
    n = plan.matmul_n
    assert got["matmul_f32_GFLOPs"] == pytest.approx(2 * n**3 / 1e-3 / 1e9)
    # the start's and the end's: the higher of each
    assert limits.best({"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 4.0, "c": 3.0}) == {
        "a": 2.0,
        "b": 5.0,
        "c": 3.0,
    }


def test_parallel_read_probe_reads_every_element():
    """bench/limits.py's parallel read (fast.numba.common.read_sum): its partial sums add up to
    the array's sum, every row counted once whatever the band count, and the bytes it claims
    are those of the rows it reads (x's whole rows of 1024 floats)."""
    pytest.importorskip("numba")
    from bench import limits
    from fast.numba.common import read_sum

    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, (37, 1024)).astype(np.float32)  # integers: every sum exact
    for parts in (1, 2, 16, 37):
        partials = np.empty(parts, np.float32)
        read_sum(a, partials)
        assert partials.sum() == a.sum()
    x = np.ones(3 * 1024 + 5, np.float32)
    _, nbytes = limits._parallel_read(x)
    assert nbytes == 3 * 1024 * 4


def test_rescore_uses_the_limits_given(tiny_run):
    """The stored fractions are those of the stored (best) limits; with a limit twice as high,
    every fraction of it halves, bound and all recomputed."""
    import copy

    from bench import limits

    _, doc = tiny_run
    results = copy.deepcopy(doc["results"])
    limits.rescore(results, doc["limits"])
    keys = ("fraction_of_limit", "fraction_of_matmul", "fraction_of_ceiling")
    for a, b in zip(results, doc["results"], strict=True):
        for k in keys:
            if b["metrics"].get(k) is not None:
                assert a["metrics"][k] == pytest.approx(b["metrics"][k], rel=1e-12), (k, b)
    doubled = {k: 2 * v for k, v in doc["limits"].items()}
    limits.rescore(results, doubled)
    for a, b in zip(results, doc["results"], strict=True):
        for k in keys:
            if b["metrics"].get(k) is not None:
                assert a["metrics"][k] == pytest.approx(b["metrics"][k] / 2, rel=1e-12), (k, b)


def _over_limit_doc(load=(0.2, 0.2, 0.2), load_end=(0.3, 0.3, 0.3), cpus=2) -> dict:
    """A SYNTHETIC CPU run with fractions of the limits above 1 (a limit measured low) and
    below, and the load averages given."""
    doc = _synthetic_cuda_doc()
    ln = {"size": "124M", "N": 4096, "C": 768}
    recs = []
    for be, frac in (("torch-native", 1.5), ("torch", 1.25), ("ref", 0.5)):
        r = _fake_op("layernorm", be, "forward", 1e-4, **ln)
        r["params"]["device"] = "cpu"
        r["metrics"].update(roofline_s=frac * 1e-4, bound="copy_GBps", fraction_of_limit=frac)
        recs.append(r)
    recs.append(
        harness.record(
            "generate",
            "prefill",
            "ref",
            params={"size": "124M", "device": "cpu", "dtype": "float32", "B": 1, "T": 1024},
            time_s={"min": 1.0, "median": 1.0, "n": 1, "warmup": 1},
            metrics={"tokens_per_s": 1024.0, "GFLOPs": 191.0, "fraction_of_matmul": 1.91},
        )
    )
    doc.update(results=recs, gpu=None, load_average_end=list(load_end))
    doc["environment"].update(load_average=list(load), cpu_count=cpus)
    doc["limits"] = {"read_GBps": 10.0, "copy_GBps": 10.0, "matmul_f32_GFLOPs": 100.0}
    return doc


def test_fraction_above_one_is_flagged_in_the_tables():
    doc = _over_limit_doc()
    doc["ratios"] = compute_ratios(doc)
    md = report.markdown(doc)
    ops = md.split("## Ops")[1].split("## Prefill")[0]
    row = next(line for line in ops.splitlines() if "torch-native/" in line)
    assert f"| 1.5 {report.MARK} |" in row
    ref_row = next(line for line in ops.splitlines() if "| ref/" in line)
    assert "| 0.5 |" in ref_row and report.MARK not in ref_row
    assert f"{report.MARK} above the measured limit: the limit was under-measured" in ops
    prefill = md.split("## Prefill")[1]
    assert f"| 1.91 {report.MARK} |" in prefill
    key = md.split("## Key ratios")[1].split("## All ratios")[0]
    assert f"effective FLOP/s / matmul FLOP/s | 1.91 {report.MARK} |" in key
    # the count, under the limits
    assert "3 measurement(s) below did better than a measured limit allows" in md
    # just above 1 shows the digits that make it so
    assert report._flag(1.0004) == f"1.0004 {report.MARK}" and report._flag(1.0) == 1.0


def test_fraction_above_one_is_hatched_in_the_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {"layernorm fwd N=4096,C=768": {"ref (cpu)": 0.5, "torch-native (cpu)": 1.5}}
    fig = report._ops_plot(plt, "124M", bars)
    ax = fig.axes[0]
    hatched = {p.get_width(): p.get_hatch() for p in ax.patches}
    assert hatched == {0.5: None, 1.5: "///"}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith(f"{report.MARK} above the measured limit") for t in legend)
    # torch-native is told apart from this project's torch backend
    assert "torch-native (cpu): torch.nn.functional itself (baseline)" in legend
    assert any(report.MARK in t.get_text() for t in ax.texts)
    plt.close(fig)
    fig = report._ops_plot(plt, "124M", {"gelu fwd": {"torch (cpu)": 0.9}})
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["torch (cpu): this project's torch backend (fast/torch/)"]
    assert fig.axes[0].patches[0].get_hatch() is None
    plt.close(fig)


def test_busy_machine_is_said_near_the_top():
    assert harness.busy_machine(2, [0.5, 1.0, 1.0], [1.9, 1.0, 1.0]) is None
    assert harness.busy_machine(None, [9.0, 9.0, 9.0]) is None
    warn = harness.busy_machine(2, [0.5, 1.0, 1.0], [3.5, 3.0, 2.0])
    assert warn.startswith("busy machine") and "3.50 at the end" in warn and "on 2 CPUs" in warn
    doc = _over_limit_doc(load=(5.0, 4.0, 3.0))
    doc["ratios"] = compute_ratios(doc)
    md = report.markdown(doc)
    top = md.split("## Limits")[0]
    assert "**Warning: busy machine: load average 5.00 at the start, 0.30 at the end" in top
    assert "unreliable" in top
    quiet = _over_limit_doc()
    quiet["ratios"] = compute_ratios(quiet)
    assert "Warning: busy machine" not in report.markdown(quiet)


def test_report_tells_torch_from_torch_native():
    doc = _over_limit_doc()
    doc["ratios"] = compute_ratios(doc)
    backends = report.markdown(doc).split("## Backends")[1].split("## Key ratios")[0]
    assert "- `torch`: this project's torch backend (fast/torch/backend.py)" in backends
    assert "- `torch-native`: baseline: torch.nn.functional itself" in backends


def test_vs_llama_cpp_pairs_each_round_with_its_own_round():
    """bench.tools.vs_llama_cpp's paired ratio: each round's best against the same round's
    best (tokens/s, so their time over ours), the median and range over rounds; a slow round
    on both sides moves neither. Mismatched round counts are refused."""
    from bench.tools.vs_llama_cpp import paired, render

    ours = [[0.010, 0.012], [0.020, 0.030], [0.011]]  # seconds; round 2 slow for both
    theirs = [[0.011], [0.024, 0.022], [0.0099]]
    got = paired(ours, theirs)
    assert got["rounds"] == pytest.approx([1.1, 1.1, 0.9])
    assert (got["median"], got["min"], got["max"]) == pytest.approx((1.1, 0.9, 1.1))
    with pytest.raises(ValueError, match="2 rounds of ours against 3"):
        paired(ours[:2], theirs)
    doc = {
        "rows": {"decode": {"numba": {"tokens_per_s": 100.0, "median_tokens_per_s": 90.0}},
                 "prefill": {}},
        "ratios": [{"case": "decode", "ours": "numba", "theirs": "llama.cpp-f32", "value": 1.05,
                    "paired": got, "target": 1.0, "met": True}],
    }  # fmt: skip
    assert "paired 1.10 [0.90, 1.10]  (target 1.0: met)" in render(doc)


def test_vs_llama_cpp_ceilings_are_the_limits_over_the_work():
    """The ceilings beside the ratios: a decode row's is the read rate over the bytes of its
    own dtype's step (llama.cpp's f32 against float32's bytes, q8_0 against int8's), a float32
    prompt's its FLOPs at the sgemm rate, with the ratio to llama.cpp's f32 prompt it allows."""
    from bench.tools.vs_llama_cpp import ceilings, render

    rows = {
        "decode": {"numba": {"tokens_per_s": 80.0}, "numba-blas": {"tokens_per_s": 60.0},
                   "numba-int8": {"tokens_per_s": 200.0},
                   "llama.cpp-f32": {"tokens_per_s": 90.0},
                   "llama.cpp-q8_0": {"tokens_per_s": 150.0}},
        "prefill": {"llama.cpp-f32": {"tokens_per_s": 1000.0}},
    }  # fmt: skip
    step = {"float32": 500e6, "int8": 125e6}
    got = ceilings(rows, 50.0, 200.0, step, prompt_flops=100e9, prompt_len=512)
    f32, q8 = got["decode"]["float32"], got["decode"]["int8"]
    assert f32["ceiling_tokens_per_s"] == pytest.approx(100.0)  # 50 GB/s / 500 MB
    assert f32["fraction"] == pytest.approx({"numba": 0.8, "numba-blas": 0.6, "llama.cpp-f32": 0.9})
    assert q8["ceiling_tokens_per_s"] == pytest.approx(400.0)
    assert q8["fraction"] == pytest.approx({"numba-int8": 0.5, "llama.cpp-q8_0": 0.375})
    pf = got["prefill_float32"]
    assert pf["ceiling_tokens_per_s"] == pytest.approx(1024.0)  # 0.5 s for 512 tokens
    assert pf["ratio_to_llama_cpp_f32"] == pytest.approx(1.024)
    for table in rows.values():
        for made in table.values():
            made["median_tokens_per_s"] = made["tokens_per_s"]
    doc = {"rows": rows, "ratios": [], "ceilings": got,
           "limits": {"best": {"read_GBps": 50.0, "matmul_f32_GFLOPs": 200.0}}}  # fmt: skip
    text = render(doc)
    assert "limits: read 50.0 GB/s, sgemm 200 GFLOP/s" in text
    assert "prefill ceiling float32 at sgemm  1024.0 tokens/s = 1.02x llama.cpp-f32" in text
