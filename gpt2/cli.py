"""`gpt2`: download, generate, eval, finetune, train, bench, serve.

Each subcommand lives in its own module (gpt2/cmd_*.py) with `add_parser(sub)` and `run(args)`.
Errors the user can fix (bad flags, missing or corrupt files) print one line and exit 2; a
failed download exits 3; an interrupt 130. With --json the error is also printed on stdout as
one JSON object, {"error": message, "exit_code": N}. An unknown flag is reported by the
subcommand's own parser, with a hint where it is a spelling of llama.cpp or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fast import BACKENDS, TORCH_BACKENDS

COMMANDS = {
    "download": "gpt2.cmd_download",
    "generate": "gpt2.cmd_generate",
    "eval": "gpt2.cmd_eval",
    "finetune": "gpt2.cmd_finetune",
    "train": "gpt2.cmd_train",
    "bench": "gpt2.cmd_bench",
    "serve": "gpt2.cmd_serve",
    "export": "gpt2.cmd_export",
}


EXIT_DOWNLOAD = 3  # a download failed (2 is bad usage, 130 an interrupt)


class UsageError(ValueError):
    """A flag has an invalid value; the message names the flag and the allowed range."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --cache-dir, --backend and --threads, shared by generate, eval and finetune."""
    p.add_argument(
        "-m",
        "--model",
        default="124M",
        help="size name (124M 355M 774M 1558M, gpt2 ... gpt2-xl), model directory "
        "or .safetensors file (default 124M; downloaded on first use)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where downloaded models live (default: $GPT2_CACHE or ~/.cache/gpt2-spec)",
    )
    add_backend_args(p)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--backend and --threads (train has no --model)."""
    p.add_argument(
        "--backend",
        default="ref",
        choices=list(BACKENDS),
        help="which implementation of the ops to run (default ref, the numpy spec)",
    )
    p.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="threads for BLAS, Numba and torch in this run (default: the libraries' own)",
    )


DTYPES = ("float32", "bfloat16", "float16", "int8")
KV_DTYPES = ("float32", "float16")  # ref.model.KV_DTYPES (cli imports no model code)


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype for the commands that run a model without training it (generate, eval)."""
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="float32 (default); bfloat16|float16: weights, activations and KV cache on "
        "--backend torch|triton, weights only on ref|numba (which compute in float32); int8: "
        "q8_0 weights (blocks of 32 with a float16 scale) on --backend ref|numba",
    )
    p.add_argument(
        "--kv-dtype",
        default="float32",
        choices=KV_DTYPES,
        help="float32 (default) or float16: how --backend ref|numba store the KV cache's keys "
        "and values (float16: half the memory and of the bytes a decode step reads, rounded "
        "when stored, computed in float32; llama.cpp's default, --cache-type-k/v f16). "
        "--backend torch|triton keep it in --dtype",
    )


def check_dtype(args: argparse.Namespace) -> None:
    """int8 and --kv-dtype need a numpy backend (the torch models have no q8_0 kernels and
    keep the cache in the model's dtype); raise UsageError naming the flag otherwise."""
    if args.dtype == "int8" and args.backend in TORCH_BACKENDS:
        raise UsageError(
            f"--dtype int8 needs --backend numba or ref (--backend {args.backend} runs "
            "float32, bfloat16 or float16)"
        )
    if args.kv_dtype != "float32" and args.backend in TORCH_BACKENDS:
        raise UsageError(
            f"--kv-dtype {args.kv_dtype} needs --backend numba or ref (--backend "
            f"{args.backend} keeps the KV cache in --dtype)"
        )


def load_model(args: argparse.Namespace):
    """gpt2.load with the flags of add_model_args, add_backend_args and add_dtype_arg."""
    import gpt2

    return gpt2.load(args.model, backend=args.backend, cache_dir=args.cache_dir,
                     dtype=args.dtype, kv_dtype=args.kv_dtype)  # fmt: skip


# Spellings users bring from llama.cpp and transformers, and what they are called here.
HINTS = {
    "--n-predict": "-n/--max-new-tokens",
    "--predict": "-n/--max-new-tokens",
    "--max-tokens": "-n/--max-new-tokens",
    "--max-length": "-n/--max-new-tokens (new tokens, not prompt + new)",
    "--ctx-size": "the model's own context (n_ctx); nothing to set",
    "-c": "the model's own context (n_ctx); nothing to set",
    "--do-sample": "--temperature > 0 (sampling is on whenever the temperature is above 0)",
    "--sampling": "--temperature > 0",
    "--repeat-last-n": "--repetition-penalty (it looks at the whole sequence)",
    "--file": "--prompt-file",
    "-f": "--prompt-file",
    "--model-path": "-m/--model",
    "--beams": "--num-beams",
    "--num-return": "--num-return-sequences",
    "--random-seed": "-s/--seed",
    "--cache-type-k": "--kv-dtype (keys and values together)",
    "--cache-type-v": "--kv-dtype (keys and values together)",
    "-ctk": "--kv-dtype (keys and values together)",
    "-ctv": "--kv-dtype (keys and values together)",
}


def hint(flag: str, parser: argparse.ArgumentParser) -> str:
    """' (did you mean ...?)' for an unknown flag: a known spelling from llama.cpp or
    transformers, or the same flag with - for _ (transformers' keyword names)."""
    name = flag.split("=", 1)[0]
    known = {s for a in parser._actions for s in a.option_strings}
    if name in HINTS:
        return f" ({name} is {HINTS[name]} here)"
    dashed = name.replace("_", "-")
    if dashed in known:
        return f" (did you mean {dashed}?)"
    return ""


def set_threads(n: int, backend: str | None) -> None:
    """-t/--threads: the thread count of BLAS (OpenBLAS/MKL, through threadpoolctl where it is
    installed, and the environment for libraries not loaded yet), Numba and torch."""
    import os

    if n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        set_threads.limits = threadpool_limits(n)  # kept: the limit lasts for the run
    except ImportError:
        pass
    if backend == "numba":
        import numba

        import fast.numba.common  # noqa: F401  (its threading layer and spin count first: the
        # call below starts numba's pool, which takes whatever is set by then)

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if backend in TORCH_BACKENDS:
        import torch

        torch.set_num_threads(n)


# libgomp's spin count for training (fast/numba/common.py sets 3000 for everything else): a
# training step interleaves numba kernels with BLAS matmuls, and workers spinning 3000 turns
# after each kernel take the core BLAS's second thread needs. `python -m bench --suite train
# --quick --backends numba`, 2 cores, tokens/s: 878 at 3000, 1740 at 300, 1621 on workqueue;
# an int8 decode step's median 9.1 ms at 3000, 13.7 ms at 300 (so not for generation).
TRAIN_SPINCOUNT = "300"


def _spin_for(command: str) -> None:
    """GOMP_SPINCOUNT for `gpt2 train` and `gpt2 finetune`, unless the user set one or numba's
    kernels are already loaded (libgomp reads it once, when fast/numba loads it)."""
    import os

    if command in ("train", "finetune") and "GOMP_SPINCOUNT" not in os.environ:
        if "fast.numba.common" not in sys.modules:
            os.environ["GOMP_SPINCOUNT"] = TRAIN_SPINCOUNT


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("gpt2-spec")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gpt2-spec {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fast import BackendUnavailable
    from weights import DownloadError, WeightsError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own parser reports it, with its usage
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[args.command]
        p.error(f"unrecognized arguments: {' '.join(extra)}{hint(extra[0], p)}")
    try:
        _spin_for(args.command)
        if getattr(args, "threads", None) is not None:
            set_threads(args.threads, getattr(args, "backend", None))
        return int(args.run(args) or 0)
    except DownloadError as e:  # its own status: the flags were fine, the network was not
        return _fail(args, e, EXIT_DOWNLOAD)
    except (UsageError, WeightsError, ValueError, FileNotFoundError, BackendUnavailable) as e:
        return _fail(args, e, 2)
    except KeyboardInterrupt:
        # on a line of its own: the interrupt may come in the middle of a streamed line
        print(f"\ngpt2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpt2 ... | head`: the reader left; nothing more to say
        sys.stderr.close()
        return 0


def _fail(args: argparse.Namespace, e: Exception, code: int) -> int:
    """One line on stderr; with --json also one JSON object on stdout, for scripts."""
    print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
    if getattr(args, "json", False):
        import json

        print(json.dumps({"error": str(e), "exit_code": code}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
