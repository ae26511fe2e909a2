"""`gpt2`: download, generate, eval, finetune, bench.

Each subcommand lives in its own module (gpt2/cmd_*.py) with `add_parser(sub)` and `run(args)`.
Errors the user can fix (bad flags, missing or corrupt files) print one line and exit 2.
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
    "bench": "gpt2.cmd_bench",
}


EXIT_DOWNLOAD = 3  # a download failed (2 is bad usage, 130 an interrupt)


class UsageError(ValueError):
    """A flag has an invalid value; the message names the flag and the allowed range."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --cache-dir and --backend, shared by generate, eval and finetune."""
    p.add_argument(
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
    p.add_argument(
        "--backend",
        default="ref",
        choices=list(BACKENDS),
        help="which implementation of the ops to run (default ref, the numpy spec)",
    )


DTYPES = ("float32", "bfloat16", "float16")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype for the commands that run a model without training it (generate, eval)."""
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="weights, activations and KV cache on --backend torch|triton (default float32; "
        "the numpy backends compute in float32 only)",
    )


def check_dtype(args: argparse.Namespace) -> None:
    """A 16-bit --dtype needs a torch backend; raise UsageError naming the flag otherwise."""
    if args.dtype != "float32" and args.backend not in TORCH_BACKENDS:
        raise UsageError(
            f"--dtype {args.dtype} needs --backend torch or triton (--backend {args.backend} "
            "computes in float32)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2", description=__doc__.splitlines()[0])
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
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except DownloadError as e:  # its own status: the flags were fine, the network was not
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DOWNLOAD
    except (UsageError, WeightsError, ValueError, FileNotFoundError, BackendUnavailable) as e:
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
