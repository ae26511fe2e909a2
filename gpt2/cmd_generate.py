"""gpt2 generate [PROMPT | - | --prompt-file FILE | --instruction TEXT [--input TEXT]] [options]

Prompts: PROMPT on the command line; `-` reads the whole of stdin as one prompt;
`--prompt-file FILE` reads one prompt per line (blank lines skipped; FILE `-` is stdin), and
generates for all of them in one batch. `--instruction` wraps the request in the Alpaca
prompt (ref/prompts.py), prints only the response, and stops at <|endoftext|> or where the
model starts a new `### Instruction` section.

Output: a single prompt decoded by sampling or greedily streams to the terminal as it is
generated; several prompts, several samples or beam search print when done, each completion
under a `--- prompt i, completion j ---` line. `--json` prints one JSON object per prompt
(one line each): prompt, prompt_token_ids, completions [{text, token_ids, finish_reason,
logprobs (with --logprobs), score (beam search)}] and timing {prefill_s, decode_s,
tokens_per_s} of the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from gpt2.cli import UsageError, add_dtype_arg, add_model_args, check_dtype, load_model

N_VOCAB = 50257  # GPT-2's tokenizer; a model's own n_vocab is checked once it is loaded


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="the prompt text ('-': read stdin; empty: start from <|endoftext|>)",
    )
    p.add_argument(
        "-p", "--prompt", dest="prompt_flag", metavar="PROMPT", help="the prompt (as PROMPT)"
    )
    p.add_argument("--prompt-file", default=None, help="one prompt per line ('-': stdin)")
    p.add_argument("--instruction", default=None, help="answer this instruction (Alpaca format)")
    p.add_argument("--input", default=None, help="the input of --instruction (optional)")
    add_model_args(p)
    add_dtype_arg(p)
    p.add_argument("-n", "--max-new-tokens", type=int, default=40, help="tokens to generate (40)")
    g = p.add_argument_group("sampling (applied in this order; see ref/sampling.py)")
    g.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS to token ID's logit (repeatable; -inf bans the token)",
    )
    g.add_argument(
        "--repetition-penalty",
        "--repeat-penalty",
        type=float,
        default=1.0,
        help="CTRL penalty on tokens already present, > 0 (default 1: off)",
    )
    g.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="subtract this times each token's count so far (default 0)",
    )
    g.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="subtract this from every token already generated (default 0)",
    )
    g.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="never repeat an n-gram of this size (default 0: off)",
    )
    g.add_argument(
        "--temperature", "--temp", type=float, default=0.0, help="0 is greedy (default 0)"
    )
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (1: off)")
    g.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="keep tokens with prob >= min-p * top prob, in [0, 1] (0: off)",
    )
    g.add_argument(
        "-s",
        "--seed",
        type=int,
        default=None,
        help="seed for sampling (default: one is drawn, and reported so the run can be repeated)",
    )
    b = p.add_argument_group("beam search")
    b.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beams (default 1: no beam search); with --temperature > 0, beam sampling",
    )
    b.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam score = sum of log-probs / length ** this (default 1)",
    )
    b.add_argument(
        "--early-stopping",
        action="store_true",
        help="stop as soon as num-beams hypotheses are finished",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--num-return-sequences",
        type=int,
        default=1,
        help="samples per prompt, or best beams (<= --num-beams) (default 1)",
    )
    o.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the text contains TEXT, which is left out (repeatable); the escapes "
        '\\n \\t \\r \\\\ \\" are read as newline, tab, return, backslash, quote',
    )
    o.add_argument("--json", action="store_true", help="print JSON, no streaming")
    o.add_argument("--logprobs", action="store_true", help="per-token log-probs in the JSON")
    p.set_defaults(run=run)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def parse_logit_bias(items: list[str]) -> dict[int, float]:
    bias: dict[int, float] = {}
    for item in items:
        tok, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            tok_id, b = int(tok), float(value)
        except ValueError:
            raise UsageError(
                f"--logit-bias expects ID=BIAS (e.g. 50256=-inf), got {item!r}"
            ) from None
        if not 0 <= tok_id < N_VOCAB or math.isnan(b) or b == math.inf:
            raise UsageError(
                f"--logit-bias needs a token id in [0, {N_VOCAB}) and a bias < inf, got {item!r}"
            )
        bias[tok_id] = b
    return bias


def validate(args: argparse.Namespace):
    """Check every flag before any work; returns the SamplingParams."""
    from ref.generate import check_generate_args
    from ref.sampling import SamplingError, SamplingParams

    check_dtype(args)
    if args.prompt_flag is not None:
        if args.prompt is not None:
            raise UsageError("give the prompt once: PROMPT or -p/--prompt")
        args.prompt = args.prompt_flag
    args.stop = [unescape(t) for t in args.stop]
    sources = [args.prompt is not None, args.prompt_file is not None, args.instruction is not None]
    if sum(sources) > 1:
        raise UsageError("give one of PROMPT, --prompt-file or --instruction")
    if args.input is not None and args.instruction is None:
        raise UsageError("--input needs --instruction")
    if args.logprobs and not args.json:
        raise UsageError("--logprobs needs --json")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            logit_bias=parse_logit_bias(args.logit_bias),
        )
        check_generate_args(
            args.max_new_tokens,
            params,
            args.num_beams,
            args.num_return_sequences,
            args.length_penalty,
            args.early_stopping,
            args.stop,
        )
    except SamplingError as e:
        raise UsageError(f"{flag(e.field)} {e.reason}") from None
    for warning in ineffective_flags(args):
        print(f"gpt2 generate: warning: {warning}", file=sys.stderr)
    return params


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def unescape(text: str) -> str:
    """The usual escapes of a --stop string typed in a shell: \\n, \\t, \\r, \\\\, \\", \\'.
    Any other backslash stays as it is."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPES:
            out.append(ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def ineffective_flags(args: argparse.Namespace) -> list[str]:
    """Sampling flags given where they change nothing (greedy decoding, temperature 0)."""
    if args.temperature != 0:
        return []
    given = [
        f for f, on in (("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0),
                        ("--min-p", args.min_p != 0.0), ("--seed", args.seed is not None))
        if on
    ]  # fmt: skip
    if not given:
        return []
    return [f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with "
            "--temperature 0 (greedy decoding); set --temperature > 0 to sample"]  # fmt: skip


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts, from the command line, stdin or --prompt-file."""
    if args.instruction is not None:
        from ref.prompts import alpaca_prompt

        return [alpaca_prompt(args.instruction, args.input or "")]
    if args.prompt_file is not None:
        text = _read(args.prompt_file)
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompt-file {args.prompt_file}: no prompts (all lines blank)")
        return prompts
    if args.prompt == "-":
        text = _read_stdin("PROMPT -")
        # `echo x | gpt2 generate -`: the shell's final newline is not part of the prompt
        return [text.removesuffix("\n").removesuffix("\r")]
    return [args.prompt or ""]


def _read_stdin(what: str) -> str:
    """All of stdin as UTF-8 text, held to the same rule as a --prompt-file."""
    try:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    except OSError as e:
        raise UsageError(f"{what}: cannot read stdin ({e})") from None
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what}: stdin is not UTF-8 text ({e})") from None


def _read(path: str) -> str:
    if path == "-":
        return _read_stdin("--prompt-file -")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"--prompt-file {path}: file not found") from None
    except IsADirectoryError:
        raise UsageError(f"--prompt-file {path}: is a directory") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompt-file {path}: not UTF-8 text ({e})") from None
    except OSError as e:  # no permission, a path through a file, an I/O error
        raise UsageError(f"--prompt-file {path}: cannot read ({e.strerror or e})") from None


class StreamPrinter:
    """Writes text pieces as they come; with strip=True leaves out leading whitespace and
    holds back trailing whitespace until more text follows (the --instruction response)."""

    def __init__(self, out=None, strip: bool = False):
        self.out = sys.stdout if out is None else out
        self.strip = strip
        self.started = False
        self.pending = ""  # whitespace held back

    def __call__(self, row: int, piece: str) -> None:
        if self.strip:
            if not self.started:
                piece = piece.lstrip()
                self.started = bool(piece)
            body = (self.pending + piece).rstrip()
            self.pending = (self.pending + piece)[len(body) :]
            piece = body
        if piece:
            self.out.write(piece)
            self.out.flush()


def run(args: argparse.Namespace) -> int:
    from gpt2.api import Timing, draw_seed, generate_batch
    from ref.prompts import INSTRUCTION_STOP
    from ref.sampling import SamplingError, check_params
    from weights.loader import read_config
    from weights.tokenizer import encode

    if hasattr(sys.stdout, "reconfigure"):
        # a prompt from argv may hold undecodable bytes (as lone surrogates): print them as
        # U+FFFD rather than fail after the work is done
        sys.stdout.reconfigure(errors="replace")
    params = validate(args)
    prompts = read_prompts(args)
    cfg = read_config(args.model)  # the model's context, before any weights are read
    try:
        check_params(params, cfg.n_vocab)
    except SamplingError as e:
        raise UsageError(f"{flag(e.field)} {e.reason}") from None
    prompt_ids = [encode(p) for p in prompts]
    longest = max(max(len(ids), 1) for ids in prompt_ids)  # "" starts from <|endoftext|>
    if longest + args.max_new_tokens > cfg.n_ctx:
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens} after a prompt of {plural(longest, 'token')} "
            f"exceeds the model's context of {cfg.n_ctx}"
        )
    seed = args.seed
    if seed is None and args.temperature != 0:
        seed = draw_seed()  # reported below, so the run can be repeated
        if not args.json:
            print(
                f"gpt2 generate: seed {seed} (pass -s {seed} to repeat this run)", file=sys.stderr
            )
    model = load_model(args)
    instruct = args.instruction is not None
    stop = ([INSTRUCTION_STOP] if instruct else []) + list(args.stop)
    n = args.num_return_sequences
    stream = not args.json and len(prompts) == 1 and args.num_beams == 1 and n == 1
    printer = StreamPrinter(strip=instruct) if stream else None
    if stream and not instruct:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    timing = Timing()
    try:
        results = generate_batch(
            model,
            prompt_ids,
            args.max_new_tokens,
            **{k: getattr(params, k) for k in params.__dataclass_fields__},
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            early_stopping=args.early_stopping,
            num_return_sequences=n,
            stop=stop,
            seed=seed,
            on_text=printer,
            timing=timing,
        )
    except SamplingError as e:
        raise UsageError(f"{flag(e.field)} {e.reason}") from None
    if instruct:
        for r in results[0]:
            r.text = r.text.strip()
    if stream:
        sys.stdout.write("\n")
    elif not args.json:
        for i, (prompt, rs) in enumerate(zip(prompts, results, strict=True)):
            for j, r in enumerate(rs):
                if len(prompts) > 1 or n > 1:
                    score = "" if r.score is None else f", score {r.score:.4f}"
                    print(f"--- prompt {i + 1}, completion {j + 1}{score} ---")
                print(r.text if instruct else prompt + r.text)
    else:
        settings = {
            **{k: getattr(params, k) for k in params.__dataclass_fields__},
            "logit_bias": {str(k): v for k, v in params.logit_bias.items()},
            "max_new_tokens": args.max_new_tokens,
            "num_beams": args.num_beams,
            "length_penalty": args.length_penalty,
            "early_stopping": args.early_stopping,
            "num_return_sequences": n,
            "stop": stop,
            "dtype": args.dtype,
            "kv_dtype": args.kv_dtype,
        }
        for prompt, ids, rs in zip(prompts, prompt_ids, results, strict=True):
            completions = []
            for r in rs:
                c = {"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
                if args.logprobs:
                    c["logprobs"] = r.logprobs
                if r.score is not None:
                    c["score"] = r.score
                completions.append(c)
            obj = {
                "prompt": prompt,
                "prompt_token_ids": ids,
                "model": args.model,
                "backend": args.backend,
                "seed": seed,
                "settings": settings,
                "completions": completions,
                "timing": {
                    "prefill_s": timing.prefill_s,
                    "decode_s": timing.decode_s,
                    "tokens_per_s": timing.tokens_per_s,
                },
            }
            print(json.dumps(obj, ensure_ascii=False))
    return 0
