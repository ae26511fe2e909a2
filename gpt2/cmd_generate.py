"""gpt2 generate PROMPT --model M --max-new-tokens N --temperature T --seed S [--json]"""

from __future__ import annotations

import argparse
import json
import sys

from gpt2.cli import UsageError, add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt text (empty: start from <|endoftext|>)")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (40)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    p.set_defaults(run=run)


def validate(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0.0 or args.temperature == float("inf"):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")


class StreamPrinter:
    """Prints tokens as they come, holding back bytes that do not yet form UTF-8 text."""

    def __init__(self, out=sys.stdout):
        from weights.tokenizer import decode_bytes

        self.decode_bytes = decode_bytes
        self.ids: list[int] = []
        self.printed = 0  # bytes already printed
        self.out = out

    def __call__(self, row: int, tok: int) -> None:
        self.ids.append(tok)
        data = self.decode_bytes(self.ids)
        text = data[self.printed :].decode("utf-8", errors="ignore")
        good = len(text.encode("utf-8"))
        if good:
            self.out.write(text)
            self.out.flush()
            self.printed += good


def run(args: argparse.Namespace) -> int:
    import gpt2
    from gpt2.api import Timing
    from weights.tokenizer import encode

    validate(args)
    prompt = args.prompt or ""
    model = gpt2.load(args.model, backend=args.backend, cache_dir=args.cache_dir)
    timing = Timing()
    stream = None
    if not args.json:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        stream = StreamPrinter()
    results = gpt2.generate(
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        on_token=stream,
        timing=timing,
    )
    if args.json:
        obj = {
            "prompt": prompt,
            "prompt_token_ids": encode(prompt),
            "model": args.model,
            "backend": args.backend,
            "completions": [
                {"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
                for r in results
            ],
            "timing": {
                "prefill_s": timing.prefill_s,
                "decode_s": timing.decode_s,
                "tokens_per_s": timing.tokens_per_s,
            },
        }
        print(json.dumps(obj, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0
