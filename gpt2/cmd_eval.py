"""gpt2 eval --model M FILE|- [--stride S] [--json]  (FILE `-`: the text on stdin)"""

from __future__ import annotations

import argparse
import json

from gpt2.cli import UsageError, add_dtype_arg, add_model_args, check_dtype, load_model


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="cross-entropy and perplexity of a text file")
    p.add_argument("file", help="a UTF-8 text file ('-': read stdin)")
    add_model_args(p)
    add_dtype_arg(p)
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="window advance for files longer than the context (default: n_ctx)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def read_text(path: str) -> str:
    """A UTF-8 text file (or stdin for `-`), or a UsageError naming it and the problem."""
    if path == "-":
        from gpt2.cmd_generate import _read_stdin

        return _read_stdin("FILE -")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e})") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:  # no permission, a path through a file, an I/O error
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    import gpt2
    from gpt2.progress import Progress
    from weights.loader import read_config

    if args.stride is not None and args.stride < 1:
        raise UsageError(f"--stride must be >= 1, got {args.stride}")
    check_dtype(args)
    text = read_text(args.file)
    ids = gpt2.encode(text)
    if len(ids) < 2:
        raise UsageError(f"{args.file}: needs at least 2 tokens, has {len(ids)}")
    n_ctx = read_config(args.model).n_ctx  # checked before any weights are read
    if args.stride is not None and args.stride > n_ctx:
        raise UsageError(f"--stride must be in [1, {n_ctx}], got {args.stride}")
    model = load_model(args)
    bar = Progress(len(ids) - 1, desc="eval", unit=" tok")
    res = gpt2.evaluate(model, ids, stride=args.stride, progress=lambda n, t: bar.set(n))
    bar.close()
    out = {"loss": res.loss, "perplexity": res.perplexity, "tokens": res.tokens}
    if args.json:
        print(json.dumps({"file": args.file, "model": args.model, **out}))
    else:
        print(f"loss {res.loss:.6f}  perplexity {res.perplexity:.4f}  tokens {res.tokens}")
    return 0
