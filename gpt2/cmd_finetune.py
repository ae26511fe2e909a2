"""gpt2 finetune --model M --data FILE (.txt or .json) --out DIR [options] | --resume DIR

Full finetuning, or LoRA with --lora-rank R. Plain text (.txt) is cut into --context-length
windows; a .json file is a list of {instruction, input, output} records in the Alpaca format.
DIR receives a Hugging Face model directory (config.json + model.safetensors) that
`--model DIR` and transformers load, plus the optimizer state to resume from
(see weights/checkpoint.py). `--resume DIR` continues a run with its saved settings; only
--steps/--epochs (to extend it), --eval-every, --eval-batches, --save-every, --samples, --json
and --backend may differ. The run itself is gpt2/finetune.py; this file is its flags and its
printer, the same for every backend.

Output: in a terminal, a progress bar; piped, a line per step; with --json, one object per
line on stdout: {"event": "train", step, loss, lr, grad_norm, tokens, tokens_per_s},
{"event": "val", step, val_loss, val_perplexity, train_eval_loss},
{"event": "checkpoint", step, dir},
{"event": "sample", prompt, response}. Every backend prints the same.
"""

from __future__ import annotations

import argparse
import json
import sys

from gpt2 import finetune
from gpt2.cli import add_model_args
from gpt2.progress import Progress


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="finetune on a text or instruction data set")
    add_model_args(p)
    # every default is None here so --resume can tell which flags were given
    p.set_defaults(model=None)
    a = p.add_argument
    a(
        "--data",
        help="training data: a UTF-8 text file, or instruction records (a .json list or "
        ".jsonl lines of {instruction, input, output}) (default: the 1,100 instruction records "
        "of 'Build a Large Language Model (From Scratch)', ch. 7, shipped in weights/data/)",
    )
    add_run_args(p, finetune.DEFAULTS)
    a("--lora-rank", type=int, help="train LoRA adapters of this rank (0: full finetuning)")
    a(
        "--lora-alpha",
        type=float,
        help="LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank)",
    )
    a("--lora-dropout", type=float, help="dropout on the adapters' input (0)")
    a(
        "--lora-targets",
        help="comma-separated projections to adapt: c_attn, c_proj, c_fc, "
        "mlp_c_proj (default c_attn,c_proj)",
    )
    a(
        "--mask-prompt",
        action="store_true",
        default=None,
        help="instruction data: leave the prompt out of the loss",
    )
    p.set_defaults(run=run)


def add_run_args(p, defaults: dict) -> None:
    """The flags `gpt2 finetune` and `gpt2 train` share (their defaults in `defaults`, shown
    in the help; the parser's own defaults stay None so --resume can tell what was given)."""
    d = defaults
    a = p.add_argument
    a("--out", help="output directory (a checkpoint, loadable with --model DIR)")
    a("--resume", metavar="DIR", help="continue the run saved in DIR (written to DIR)")
    a("--steps", type=int, help="optimizer steps (default: --epochs 1)")
    a("--epochs", type=float, help="passes over the training split (instead of --steps)")
    a("--batch-size", type=int, help=f"rows per micro-batch ({d['batch_size']})")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step ({d['grad_accum']})")
    a("--lr", type=float, help=f"peak learning rate ({d['lr']:g})")
    a("--warmup", type=int, help="linear warmup steps before the cosine decay (0)")
    a(
        "--min-lr-ratio",
        type=float,
        help="the cosine decays to this fraction of --lr (0.1); 1 keeps the rate constant",
    )
    a("--weight-decay", type=float, help=f"AdamW's decoupled weight decay ({d['weight_decay']:g})")
    a(
        "--decay",
        choices=["matrices", "matrices+embeddings", "all"],
        help="which tensors decay: the projection matrices (default), plus the embeddings, "
        "or all (biases and LayerNorm too, as llm.c does)",
    )
    a("--grad-clip", type=float, help="clip gradients to this global norm (1.0); 0: off")
    a("--dropout", type=float, help="model dropout: embeddings, attention, residuals (0)")
    a("--embd-dropout", type=float, help="dropout after the embeddings (default --dropout)")
    a("--attn-dropout", type=float, help="dropout on attention probabilities (--dropout)")
    a("--resid-dropout", type=float, help="dropout on each residual branch (--dropout)")
    a("--eval-every", type=int, help="validation loss every N steps (0: at the end only)")
    a("--eval-batches", type=int, help="at most this many validation batches per evaluation")
    a("--save-every", type=int, help="checkpoint every N steps (0: at the end only)")
    a("--keep-best", action="store_true", default=None,
      help="also keep the saved model with the lowest validation loss in OUT/best/ (steps "
      "both evaluated and saved compete)")  # fmt: skip
    a("--seed", type=int, help="seed for batch order, init, adapters and dropout (0)")
    a(
        "--context-length",
        type=int,
        help="tokens per row: text windows, instruction rows "
        "are cut to it (default: the model's context)",
    )
    a("--val-fraction", type=float, help="fraction of the data held out for validation (0.1)")
    a(
        "--samples",
        type=int,
        help=f"responses generated from validation prompts ({d['samples']}; at the end, and "
        "for gpt2 train at each evaluation too)",
    )
    a(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out (refused otherwise, so no earlier run is lost)",
    )
    a("--json", action="store_true", help="log one JSON object per line on stdout")


class Printer:
    """The one printer of a finetuning run's events (see the module docstring)."""

    def __init__(
        self, as_json: bool, out_dir: str = "", bar: bool | None = None, command: str = "finetune"
    ):
        self.as_json = as_json
        self.out_dir = out_dir
        self.command = command
        self.bar_enabled = (not as_json) and (sys.stderr.isatty() if bar is None else bar)
        self.bar: Progress | None = None
        self.bar_line = False  # the bar is drawn on the current line of stderr
        self.steps = 0
        self.world = 1

    def __call__(self, e: dict) -> None:
        from weights.tokenizer import decode

        kind = e["event"]
        if kind == "sample":
            e = {**e, "prompt": decode(e["prompt"]), "response": decode(e["response"])}
        if kind == "start":
            self.steps, self.world = e["steps"], e["world_size"]
            if self.bar_enabled:
                self.bar = Progress(self.steps, desc=self.command, unit=" step", enabled=True)
                self.bar.set(e["step"])
                self.bar_line = True
            return
        if self.as_json:
            print(json.dumps(e), flush=True)
            if kind not in ("interrupt", "interrupted"):  # those are said on stderr too
                return
        if kind == "train":
            if self.bar is not None:
                self.bar.set(e["step"], f"loss {e['loss']:.4f} {e['tokens_per_s']:.0f} tok/s")
                self.bar_line = True
                return
            procs = f" ({self.world} processes)" if self.world > 1 else ""
            print(
                f"step {e['step']}/{self.steps}: loss {e['loss']:.4f} lr {e['lr']:.2e} "
                f"{e['tokens_per_s']:.0f} tok/s{procs}",
                flush=True,
            )
            return
        self.end_line()
        if kind == "interrupt":
            print(
                f"gpt2 {self.command}: interrupted: finishing this step, then saving it "
                "(Ctrl-C again to quit at once, losing the step)",
                file=sys.stderr,
                flush=True,
            )
        elif kind == "interrupted":
            print(
                f"gpt2 {self.command}: stopped after step {e['step']} of {self.steps}; resume "
                f"with: gpt2 {self.command} --resume {self.out_dir}",
                file=sys.stderr,
                flush=True,
            )
        elif kind == "val":
            print(
                f"step {e['step']}: val loss {e['val_loss']:.4f} "
                f"perplexity {e['val_perplexity']:.2f}"
                + (f" (train loss {e['train_eval_loss']:.4f})" if "train_eval_loss" in e else ""),
                flush=True,
            )
        elif kind == "best":
            print(f"best so far: step {e['step']}, val loss {e['val_loss']:.4f}, in {e['dir']}",
                  file=sys.stderr, flush=True)  # fmt: skip
        elif kind == "checkpoint":
            print(f"saved {e['dir']} (step {e['step']})", file=sys.stderr, flush=True)
        elif kind == "sample":
            print(f"--- {e['prompt']!r}\n{e['response']}", flush=True)

    def end_line(self) -> None:
        """End the bar's line before printing under it (the bar redraws on the next one)."""
        if self.bar_line:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.bar_line = False

    def close(self) -> None:
        if self.bar_line and self.bar is not None:
            self.bar.close()  # the final state, then the line's end
        self.bar, self.bar_line = None, False


def run(args: argparse.Namespace) -> int:
    s, state = finetune.settings(args)
    finetune.validate(s)
    out_dir = args.resume or args.out
    command = getattr(args, "command", "finetune")
    printer = Printer(args.json, out_dir, command=command)
    try:
        interrupted = finetune.run(
            s, state, out_dir=out_dir, resume=args.resume,
            backend=args.backend or "ref", cache_dir=getattr(args, "cache_dir", None),
            on_event=printer, quiet=args.json,
        )  # fmt: skip
    finally:
        printer.close()
    return 130 if interrupted else 0  # 130: stopped by Ctrl-C (after saving)
