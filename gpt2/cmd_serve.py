"""gpt2 serve --model M [--backend B] [--host 127.0.0.1] [--port 8000] [options]

An OpenAI-compatible HTTP server (POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics) with continuous batching: requests that arrive
while others decode join the running batch at the next step, and a request's tokens are the
same whatever shared its batch (gpt2/serve/engine.py). Binds to loopback unless --host says
otherwise. SIGTERM (or Ctrl-C) stops taking requests, lets those in flight finish (up to
--drain-timeout seconds), then exits 0. Needs the serve extra: pip install 'gpt2-spec[serve]'.
"""

from __future__ import annotations

import argparse
import signal
import sys

from gpt2.cli import UsageError, add_dtype_arg, add_model_args, check_dtype, load_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over OpenAI's HTTP API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_dtype_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: none)"
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send and /v1/models lists (default: the --model value)",
    )
    p.add_argument(
        "--max-batch", type=int, default=32, help="rows decoded together at most (default 32)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting to join the batch; beyond it 429 (default 64)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body accepted; beyond it 413 (default 1 MiB)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for requests in flight (default 30)",
    )
    p.set_defaults(run=run)


def validate(args: argparse.Namespace) -> None:
    check_dtype(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if not 1 <= args.max_batch <= 64:  # fast/numba/quant.py's ROWS_MAX_M: batch invariance
        raise UsageError(
            f"--max-batch must be in [1, 64], got {args.max_batch} (beyond 64 rows the decode "
            "kernel changes its order of summation and a row's tokens would depend on its batch)"
        )
    for name in ("max_batch", "max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.drain_timeout >= 0:
        raise UsageError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key must not be empty")


def run(args: argparse.Namespace) -> int:
    validate(args)
    try:
        import uvicorn

        from gpt2.serve.app import create_app
    except ImportError as e:
        raise UsageError(
            f"gpt2 serve needs {e.name}, which is not installed; pip install 'gpt2-spec[serve]'"
        ) from None
    from gpt2.serve.engine import Engine

    model = load_model(args)
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue).start()
    name = args.served_model_name or args.model
    app = create_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=args.drain_timeout,
    )
    server = uvicorn.Server(config)
    print(
        f"gpt2 serve: {name} on --backend {args.backend} ({engine.decode_kind()}), "
        f"http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn handles SIGTERM and SIGINT itself: it stops accepting, waits for the requests
    # in flight (up to --drain-timeout), then returns and raises the signal again under the
    # handler that was there before; for SIGTERM that is this no-op, so the drain ends in exit
    # status 0 (SIGINT keeps Python's KeyboardInterrupt: the command's 130)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    drained = engine.close(timeout=args.drain_timeout)
    print(
        "gpt2 serve: stopped" + ("" if drained else " (requests still running were dropped)"),
        file=sys.stderr,
    )
    return 0
